//! Scale benchmark: the status of many volumes, the agent's memory, and its
//! restart.
//!
//! One run against a real kernel (the guest test bed, or a host with
//! device-mapper via `benches/run --host`):
//!
//! 1. Starts the agent binary (`--agent`, `benches/run` passes the one cargo
//!    built) on an embedded pool file and creates N volumes (1,000) over its
//!    socket, eight calls at a time.
//! 2. The status of all of them, R times (3), alternating and rotating the
//!    order every round: one `ListVolumes` RPC (size, state, device and usage
//!    of each, from the store and the kernel), against the proof of
//!    concept's way, one `dmsetup status` process per volume device run one
//!    after the other. Under emulation one such process costs 0.17-0.7 s,
//!    so by default each round runs it for an evenly spread sample of 100
//!    devices and scales the time to all N (each process does the same one
//!    ioctl for one device); `--dmsetup-sample N` runs it for every device.
//!    The ratio is taken per round.
//! 3. The agent's resident memory serving N volumes; then `kill -9`, a
//!    restart on the same state, the reconcile time the agent logs for it,
//!    and the resident memory again once it serves.
//!
//! 4. Changed blocks (`--parts changes`, a second agent on a pool file big
//!    enough for the volume): a 10 GiB volume (`--changes-gib`), published
//!    (dm-era over its thin device), a `MarkCheckpoint`, then 4 KiB written
//!    at every 64th era block (`--changes-stride`) across the whole volume;
//!    `GetChangedBlocks` since that checkpoint's era, R times, each answer
//!    checked extent by extent against what was written (a wrong answer
//!    fails the bench), alternating with what a backup without changed-block
//!    tracking must do instead: read the whole volume (fio, 1 MiB sequential
//!    reads at queue depth 32 through the public device). Reads of the
//!    volume's unwritten blocks cost the thin device no data I/O, so the
//!    full read is faster than it would be on a written volume and the ratio
//!    understates what the changed blocks save.
//!
//! 5. Time until a moved volume is usable (`--parts usable`, two agents on
//!    this host, the source exporting over NVMe/TCP loopback): see
//!    `scale/usable.rs`.
//!
//! 6. A host drain (`--parts drain`, two agents): 16 volumes of 256 MiB
//!    moving at once, then the host byte budget: see `scale/drain.rs`.
//!
//! 7. A chained move (`--parts chain`, three agents): A→B→C while B still
//!    copies, against a single move: see `scale/chain.rs`.
//!
//! Writes `<part>.json` and `<part>.txt` for each part (scale, changes,
//! usable, drain, chain) to
//! `--results-dir`. Under `cargo test --benches` (no `--bench`) it only checks
//! its argument parsing. Without device-mapper, `dmsetup` or the agent
//! binary it fails and prints no figures.

// Drives the agent over gRPC: tonic and the generated clients are its
// vocabulary (clippy.toml keeps them out of the library's domain).
#![allow(clippy::disallowed_types)]

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use dmclone::{
    aligned::AlignedBuf,
    api::proto::v1::{
        CreateVolumeRequest, GetChangedBlocksRequest, ListVolumesRequest, MarkCheckpointRequest,
        PublishVolumeRequest, get_changed_blocks_request::Since, snapshots_client::SnapshotsClient,
        volumes_client::VolumesClient,
    },
    client::connect_unix,
    config::DEFAULT_CHANGE_BLOCK_BYTES,
    dm::kernel::DeviceMapper,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

#[path = "scale/chain.rs"]
mod chain;
mod common;
#[path = "scale/drain.rs"]
mod drain;
#[path = "scale/usable.rs"]
mod usable;

use common::{BenchResult, FioJob, Stats, fio, open_direct, run_tool, stats, stats_json};

const PREFIX: &str = "dmbenchscale";
const LIST_TARGET: f64 = 50.0;
const RSS_TARGET_MIB: f64 = 64.0;
const RECONCILE_TARGET_MS: f64 = 1500.0;
const GIB: u64 = 1 << 30;
/// The agent's default dm-era block: the granularity of changed extents.
const ERA_BLOCK: u64 = DEFAULT_CHANGE_BLOCK_BYTES;
const WRITE_BYTES: usize = 4096;
/// Threads writing the changed blocks (each first write to an era block
/// waits for a dm-era metadata commit; several in flight share commits).
const WRITERS: u64 = 8;
const USAGE: &str = "\
usage: scale --bench [--agent PATH] [--parts LIST] [--volumes N] [--reps N] [--results-dir DIR]
                     [--changes-gib N] [--changes-stride N] [--usable-gib LIST] [--usable-reps N]
                     [--drain-volumes N] [--drain-mib N] [--chain-mib N] [--chain-reps N]
  --agent PATH       the dmclone-agent binary (or DMCLONE_BENCH_AGENT)
  --parts LIST       scale,changes,usable,drain,chain or some of them (all, or
                     DMCLONE_BENCH_SCALE_PARTS)
  --volumes N        volumes to create (1000, or DMCLONE_BENCH_VOLUMES)
  --reps N           rounds of the status comparison and of the changed-blocks
                     comparison (3, or DMCLONE_BENCH_REPS)
  --dmsetup-sample N devices run through dmsetup per round, scaled to all
                     (100, or DMCLONE_BENCH_DMSETUP_SAMPLE)
  --changes-gib N    size of the changed-blocks volume (10, or DMCLONE_BENCH_CHANGES_GIB)
  --changes-stride N 4 KiB written at every Nth era block, N >= 2 (64, or
                     DMCLONE_BENCH_CHANGES_STRIDE)
  --usable-gib LIST  sizes of the moved volume whose first read is timed, e.g. 1,10; the
                     first is written in full, the others stay sparse (1, or
                     DMCLONE_BENCH_USABLE_GIB)
  --usable-reps N    moves timed per size (20, or DMCLONE_BENCH_USABLE_REPS)
  --drain-volumes N  volumes moved at once in the drain (16, or DMCLONE_BENCH_DRAIN_VOLUMES)
  --drain-mib N      their size in MiB (256, or DMCLONE_BENCH_DRAIN_MIB)
  --chain-mib N      size of the volume moved A->B->C and A->B, in MiB (256, or
                     DMCLONE_BENCH_CHAIN_MIB)
  --chain-reps N     samples of each (3, or DMCLONE_BENCH_CHAIN_REPS)
  --results-dir DIR  where <part>.json and <part>.txt go (default: .)";

#[derive(Debug, PartialEq)]
struct Params {
    measure: bool,
    agent: PathBuf,
    scale: bool,
    changes: bool,
    volumes: usize,
    reps: usize,
    sample: usize,
    changes_gib: u64,
    changes_stride: u64,
    usable: bool,
    usable_gib: Vec<u64>,
    usable_reps: usize,
    drain: bool,
    drain_volumes: usize,
    drain_mib: u64,
    chain: bool,
    chain_mib: u64,
    chain_reps: usize,
    results: PathBuf,
}

impl Params {
    fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> BenchResult<Self> {
        let mut params = Params {
            measure: false,
            agent: PathBuf::from(env("DMCLONE_BENCH_AGENT").unwrap_or_default()),
            scale: true,
            changes: true,
            volumes: number(env("DMCLONE_BENCH_VOLUMES").as_deref(), 1000, "volumes")?,
            reps: number(env("DMCLONE_BENCH_REPS").as_deref(), 3, "reps")?,
            sample: number(
                env("DMCLONE_BENCH_DMSETUP_SAMPLE").as_deref(),
                100,
                "dmsetup-sample",
            )?,
            changes_gib: number(
                env("DMCLONE_BENCH_CHANGES_GIB").as_deref(),
                10,
                "changes-gib",
            )? as u64,
            changes_stride: number(
                env("DMCLONE_BENCH_CHANGES_STRIDE").as_deref(),
                64,
                "changes-stride",
            )? as u64,
            usable: true,
            usable_gib: sizes_gib(env("DMCLONE_BENCH_USABLE_GIB").as_deref().unwrap_or("1"))?,
            usable_reps: number(
                env("DMCLONE_BENCH_USABLE_REPS").as_deref(),
                20,
                "usable-reps",
            )?,
            drain: true,
            drain_volumes: number(
                env("DMCLONE_BENCH_DRAIN_VOLUMES").as_deref(),
                16,
                "drain-volumes",
            )?,
            drain_mib: number(env("DMCLONE_BENCH_DRAIN_MIB").as_deref(), 256, "drain-mib")? as u64,
            chain: true,
            chain_mib: number(env("DMCLONE_BENCH_CHAIN_MIB").as_deref(), 256, "chain-mib")? as u64,
            chain_reps: number(env("DMCLONE_BENCH_CHAIN_REPS").as_deref(), 3, "chain-reps")?,
            results: PathBuf::from("."),
        };
        if let Some(parts) = env("DMCLONE_BENCH_SCALE_PARTS").filter(|p| !p.is_empty()) {
            params.parts(&parts)?;
        }
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--bench" => params.measure = true,
                "--agent" => params.agent = PathBuf::from(value()?),
                "--volumes" => params.volumes = number(Some(&value()?), 0, "volumes")?,
                "--reps" => params.reps = number(Some(&value()?), 0, "reps")?,
                "--dmsetup-sample" => params.sample = number(Some(&value()?), 0, "dmsetup-sample")?,
                "--parts" => params.parts(&value()?)?,
                "--changes-gib" => {
                    params.changes_gib = number(Some(&value()?), 0, "changes-gib")? as u64;
                }
                "--changes-stride" => {
                    params.changes_stride = number(Some(&value()?), 0, "changes-stride")? as u64;
                }
                "--usable-gib" => params.usable_gib = sizes_gib(&value()?)?,
                "--usable-reps" => {
                    params.usable_reps = number(Some(&value()?), 0, "usable-reps")?;
                }
                "--drain-volumes" => {
                    params.drain_volumes = number(Some(&value()?), 0, "drain-volumes")?;
                }
                "--drain-mib" => params.drain_mib = number(Some(&value()?), 0, "drain-mib")? as u64,
                "--chain-mib" => params.chain_mib = number(Some(&value()?), 0, "chain-mib")? as u64,
                "--chain-reps" => params.chain_reps = number(Some(&value()?), 0, "chain-reps")?,
                "--results-dir" => params.results = PathBuf::from(value()?),
                other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
            }
        }
        if params.volumes == 0
            || params.reps == 0
            || params.sample == 0
            || params.usable_reps == 0
            || params.drain_volumes == 0
            || params.chain_reps == 0
        {
            return Err(format!(
                "--volumes, --reps, --dmsetup-sample, --usable-reps, --drain-volumes and --chain-reps must be at least 1\n{USAGE}"
            )
            .into());
        }
        // dm-clone's regions and the pool's blocks divide whole MiB.
        if !(4..=65536).contains(&params.drain_mib) {
            return Err(format!("--drain-mib must be from 4 to 65536\n{USAGE}").into());
        }
        if !(4..=65536).contains(&params.chain_mib) {
            return Err(format!("--chain-mib must be from 4 to 65536\n{USAGE}").into());
        }
        if !(1..=1024).contains(&params.changes_gib) {
            return Err(format!("--changes-gib must be from 1 to 1024\n{USAGE}").into());
        }
        // A stride of 1 writes neighbouring blocks, which come back merged.
        if params.changes_stride < 2 {
            return Err(format!("--changes-stride must be at least 2\n{USAGE}").into());
        }
        Ok(params)
    }

    fn parts(&mut self, list: &str) -> BenchResult<()> {
        (
            self.scale,
            self.changes,
            self.usable,
            self.drain,
            self.chain,
        ) = (false, false, false, false, false);
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "scale" => self.scale = true,
                "changes" => self.changes = true,
                "usable" => self.usable = true,
                "drain" => self.drain = true,
                "chain" => self.chain = true,
                other => {
                    return Err(format!("--parts: unknown part {other:?}\n{USAGE}").into());
                }
            }
        }
        if !(self.scale || self.changes || self.usable || self.drain || self.chain) {
            return Err(format!("--parts names no part\n{USAGE}").into());
        }
        Ok(())
    }
}

fn number(text: Option<&str>, default: usize, what: &str) -> BenchResult<usize> {
    match text {
        None | Some("") => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| format!("{what}: {text:?} is not a whole number").into()),
    }
}

/// A comma-separated list of sizes in GiB, each from 1 to 1024.
fn sizes_gib(list: &str) -> BenchResult<Vec<u64>> {
    let sizes = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| number(Some(s), 0, "usable-gib").map(|n| n as u64))
        .collect::<BenchResult<Vec<u64>>>()?;
    if sizes.is_empty() || sizes.iter().any(|gib| !(1..=1024).contains(gib)) {
        return Err(format!("--usable-gib: sizes from 1 to 1024, not {list:?}\n{USAGE}").into());
    }
    Ok(sizes)
}

fn volume_id(i: usize) -> String {
    format!("5c000000-0000-4000-8000-{i:012x}")
}

/// The summary of at least one round (`--reps` is at least 1).
fn summary(values: &[f64]) -> BenchResult<Stats> {
    stats(values).ok_or_else(|| "no rounds were measured".into())
}

struct Agent {
    binary: PathBuf,
    /// `--pool-file-size`: a sparse file, so only what is written takes room.
    pool_file_size: String,
    prefix: &'static str,
    /// Flags beyond the state, prefix and pool ones.
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Agent {
    async fn start(binary: &Path, pool_file_size: &str) -> BenchResult<Self> {
        Self::start_as(binary, pool_file_size, PREFIX, Vec::new()).await
    }

    async fn start_as(
        binary: &Path,
        pool_file_size: &str,
        prefix: &'static str,
        extra: Vec<String>,
    ) -> BenchResult<Self> {
        let mut agent = Agent {
            binary: binary.to_owned(),
            pool_file_size: pool_file_size.to_owned(),
            prefix,
            extra,
            dir: tempfile::tempdir()?,
            child: None,
        };
        agent.spawn().await?;
        Ok(agent)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    async fn spawn(&mut self) -> BenchResult<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        #[allow(clippy::disallowed_types)] // the agent under measurement is a process
        let child = std::process::Command::new(&self.binary)
            .args(["--config", "/dev/null", "--state-dir"])
            .arg(self.dir.path())
            .args([
                "--dm-prefix",
                self.prefix,
                "--pool-file-size",
                &self.pool_file_size,
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot run {}: {err}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten()
            {
                return Err(format!(
                    "the agent exited with {status}; see {}",
                    self.log().display()
                )
                .into());
            }
            if let Ok(channel) = connect_unix(&self.socket()).await {
                let mut client = VolumesClient::new(channel);
                if client.list_volumes(ListVolumesRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the agent did not serve within 300 s".into())
    }

    async fn channel(&self) -> BenchResult<Channel> {
        Ok(connect_unix(&self.socket()).await?)
    }

    async fn client(&self) -> BenchResult<VolumesClient<Channel>> {
        Ok(VolumesClient::new(self.channel().await?))
    }

    fn rss_mib(&self) -> BenchResult<f64> {
        let pid = self.child.as_ref().ok_or("the agent is not running")?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no VmRSS in /proc/<pid>/status")?;
        Ok(kib / 1024.0)
    }

    /// The agent's CPU time so far, user and system, in seconds.
    fn cpu_seconds(&self) -> BenchResult<f64> {
        let pid = self.child.as_ref().ok_or("the agent is not running")?.id();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): state is
        // the 3rd field, utime and stime the 14th and 15th.
        let after_name = stat
            .rsplit_once(") ")
            .ok_or("no command name in /proc/<pid>/stat")?
            .1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> BenchResult<f64> {
            Ok(fields
                .get(i)
                .ok_or("short /proc/<pid>/stat")?
                .parse::<f64>()?)
        };
        let per_second: f64 = run_tool("getconf", &["CLK_TCK".to_owned()])?
            .trim()
            .parse()?;
        Ok((ticks(11)? + ticks(12)?) / per_second)
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The duration the agent logged for its last reconcile.
    fn reconcile_ms(&self) -> BenchResult<f64> {
        let log = fs::read_to_string(self.log())?;
        log.lines()
            .rev()
            .find(|line| line.contains("reconciled the kernel with the store"))
            .and_then(|line| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix("millis="))
            })
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| "the agent logged no reconcile duration".into())
    }

    /// Kills the agent and removes the devices it made.
    async fn remove(mut self, dm: &DeviceMapper) -> BenchResult<()> {
        self.kill9();
        common::remove_devices_with_prefix(dm, self.prefix).await
    }
}

async fn create_volumes(agent: &Agent, count: usize) -> BenchResult<f64> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let mut client = agent.client().await?;
        tasks.spawn(async move {
            for i in (worker..count).step_by(8) {
                client
                    .create_volume(CreateVolumeRequest {
                        volume_id: volume_id(i),
                        size_bytes: 1 << 20,
                        ..Default::default()
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One ListVolumes; checks it returned every volume.
async fn list_once(agent: &Agent, count: usize) -> BenchResult<f64> {
    let mut client = agent.client().await?;
    let started = Instant::now();
    let listed = client
        .list_volumes(ListVolumesRequest {})
        .await?
        .into_inner();
    let took = started.elapsed().as_secs_f64();
    if listed.volumes.len() != count {
        return Err(format!(
            "ListVolumes returned {} of {count} volumes",
            listed.volumes.len()
        )
        .into());
    }
    Ok(took)
}

/// The proof of concept's way: one `dmsetup status` process per device.
/// Returns the seconds it took for `devices`.
fn dmsetup_once(devices: &[String]) -> BenchResult<f64> {
    let started = Instant::now();
    for device in devices {
        let status = run_tool("dmsetup", &["status".to_owned(), device.clone()])?;
        if !status.contains(" thin ") {
            return Err(format!("dmsetup status {device}: {status:?} is no thin status").into());
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn thin_devices(dm: &DeviceMapper) -> BenchResult<Vec<String>> {
    let thin = format!("{PREFIX}-thin-");
    Ok(dm
        .list()
        .await?
        .into_iter()
        .map(|device| device.name)
        .filter(|name| name.starts_with(&thin))
        .collect())
}

fn verdict(pass: bool) -> &'static str {
    if pass { "pass" } else { "MISSED" }
}

/// What `preflight` found: this kernel's device-mapper, and the agent binary.
fn preflight(params: &Params) -> BenchResult<DeviceMapper> {
    let dm = DeviceMapper::open()
        .map_err(|err| format!("this kernel offers no device-mapper: {err}"))?;
    run_tool("dmsetup", &["version".to_owned()])?;
    if !params.agent.is_file() {
        return Err(format!(
            "no agent binary at {:?} (--agent or DMCLONE_BENCH_AGENT)",
            params.agent
        )
        .into());
    }
    Ok(dm)
}

/// The byte offsets of the 4 KiB writes: one in every `stride`th era block,
/// at a 4 KiB-aligned place inside it that varies from block to block.
fn changed_offsets(size: u64, stride: u64) -> Vec<u64> {
    let pages = ERA_BLOCK / WRITE_BYTES as u64;
    (0..size / ERA_BLOCK)
        .step_by(stride as usize)
        .map(|block| block * ERA_BLOCK + (block / stride % pages) * WRITE_BYTES as u64)
        .collect()
}

/// The extents a correct answer holds for writes at `offsets`: each written
/// era block whole, none merged (the stride leaves gaps), in offset order.
fn expected_extents(offsets: &[u64], size: u64) -> Vec<(u64, u64)> {
    offsets
        .iter()
        .map(|offset| {
            let start = offset / ERA_BLOCK * ERA_BLOCK;
            (start, ERA_BLOCK.min(size - start))
        })
        .collect()
}

/// Writes 4 KiB of non-zero bytes at every offset with O_DIRECT, from
/// `WRITERS` threads; returns the seconds it took.
fn write_changes(device: &Path, offsets: &[u64]) -> BenchResult<f64> {
    let file = open_direct(device, true)?;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WRITERS as usize)
            .map(|worker| {
                let file = &file;
                scope.spawn(move || -> BenchResult<()> {
                    let mut buf = AlignedBuf::new(WRITE_BYTES);
                    for &offset in offsets.iter().skip(worker).step_by(WRITERS as usize) {
                        buf.as_mut_slice().fill((offset / ERA_BLOCK) as u8 | 1);
                        file.write_all_at(buf.as_slice(), offset)
                            .map_err(|err| format!("write at {offset}: {err}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .map_err(|_| -> Box<dyn std::error::Error + Send + Sync> {
                    "a writer thread panicked".into()
                })?
        })
    })?;
    file.sync_all()?;
    Ok(started.elapsed().as_secs_f64())
}

/// One timed `GetChangedBlocks` since `era`, its whole stream; the answer
/// is checked against `expected` after the clock stops.
async fn changed_blocks_once(
    client: &mut SnapshotsClient<Channel>,
    volume: &str,
    era: u64,
    expected: &[(u64, u64)],
) -> BenchResult<(f64, usize)> {
    let started = Instant::now();
    let mut stream = client
        .get_changed_blocks(GetChangedBlocksRequest {
            volume_id: volume.to_owned(),
            since: Some(Since::Era(era)),
        })
        .await?
        .into_inner();
    let mut extents = Vec::with_capacity(expected.len());
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await? {
        extents.extend(
            message
                .extents
                .iter()
                .map(|e| (e.offset_bytes, e.length_bytes)),
        );
        messages.push((message.since_era, message.next_era, message.block_bytes));
    }
    let took = started.elapsed().as_secs_f64();
    if let Some(&(since, next, block)) = messages
        .iter()
        .find(|(since, next, block)| *since != era || next <= since || *block != ERA_BLOCK)
    {
        return Err(format!(
            "GetChangedBlocks since era {era} answered since_era {since}, next_era {next}, block_bytes {block} (expected since {era}, a later next era, blocks of {ERA_BLOCK})"
        )
        .into());
    }
    if extents != expected {
        let first = extents
            .iter()
            .zip(expected)
            .position(|(got, want)| got != want)
            .unwrap_or(extents.len().min(expected.len()));
        let bytes = |list: &[(u64, u64)]| list.iter().map(|(_, len)| len).sum::<u64>();
        return Err(format!(
            "GetChangedBlocks since era {era} is WRONG: {} extents, {} bytes; {} were written, {} bytes at era-block granularity; first difference at index {first}: got {:?}, expected {:?}",
            extents.len(),
            bytes(&extents),
            expected.len(),
            bytes(expected),
            extents.get(first),
            expected.get(first)
        )
        .into());
    }
    Ok((took, messages.len()))
}

/// What a backup without changed-block tracking does: read the whole
/// volume. Seconds at fio's own rate (its start-up is not counted).
fn full_read(device: &Path, size: u64) -> BenchResult<f64> {
    let job = FioJob {
        rw: "read",
        block_bytes: 1 << 20,
        seconds: None,
    };
    let (bytes_per_s, _) = fio(device, job, size)?;
    Ok(size as f64 / bytes_per_s)
}

async fn measure_changes(params: &Params) -> BenchResult<(Value, String)> {
    let dm = preflight(params)?;
    common::remove_devices_with_prefix(&dm, PREFIX).await?;
    // The default max_oversubscription_ratio is 1: the pool's data must hold
    // the whole volume. Sparse, so only what is written takes room.
    let agent = Agent::start(&params.agent, &format!("{}G", params.changes_gib + 2)).await?;
    let measured = changes_on(&agent, params).await;
    agent.remove(&dm).await?;
    measured
}

async fn changes_on(agent: &Agent, params: &Params) -> BenchResult<(Value, String)> {
    let size = params.changes_gib * GIB;
    let volume = volume_id(0xc0de);
    let mut volumes = agent.client().await?;
    volumes
        .create_volume(CreateVolumeRequest {
            volume_id: volume.clone(),
            size_bytes: size,
            ..Default::default()
        })
        .await?;
    let device = PathBuf::from(
        volumes
            .publish_volume(PublishVolumeRequest {
                volume_id: volume.clone(),
            })
            .await?
            .into_inner()
            .device_path,
    );
    let mut snapshots = SnapshotsClient::new(agent.channel().await?);
    let era = snapshots
        .mark_checkpoint(MarkCheckpointRequest {
            volume_id: volume.clone(),
        })
        .await?
        .into_inner()
        .era;
    let offsets = changed_offsets(size, params.changes_stride);
    let expected = expected_extents(&offsets, size);
    let write_s = {
        let (device, offsets) = (device.clone(), offsets.clone());
        tokio::task::spawn_blocking(move || write_changes(&device, &offsets)).await??
    };
    eprintln!(
        "[bench] changes: {} writes of 4 KiB into {} GiB in {write_s:.1} s, since era {era}",
        offsets.len(),
        params.changes_gib
    );
    // Untimed and checked: the first answer warms the agent's path.
    let (warm_s, messages) = changed_blocks_once(&mut snapshots, &volume, era, &expected).await?;
    let (mut rpc, mut reads, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..params.reps {
        let (rpc_s, read_s) = if round % 2 == 0 {
            let (rpc_s, _) = changed_blocks_once(&mut snapshots, &volume, era, &expected).await?;
            (rpc_s, full_read(&device, size)?)
        } else {
            let read_s = full_read(&device, size)?;
            let (rpc_s, _) = changed_blocks_once(&mut snapshots, &volume, era, &expected).await?;
            (rpc_s, read_s)
        };
        eprintln!(
            "[bench] changes round {}/{}: GetChangedBlocks {:.1} ms, full read {:.1} s",
            round + 1,
            params.reps,
            rpc_s * 1e3,
            read_s
        );
        rpc.push(rpc_s * 1e3);
        reads.push(read_s * 1e3);
        ratios.push(read_s / rpc_s);
    }
    let changed_bytes: u64 = expected.iter().map(|(_, len)| len).sum();
    let rpc_summary = summary(&rpc)?;
    let (rpc_min, rpc_med, rpc_max) = (rpc_summary.min, rpc_summary.median, rpc_summary.max);
    let read_med = summary(&reads)?.median;
    let ratio_summary = summary(&ratios)?;
    let (ratio_min, ratio, ratio_max) =
        (ratio_summary.min, ratio_summary.median, ratio_summary.max);
    let report = json!({
        "volume_bytes": size,
        "era_block_bytes": ERA_BLOCK,
        "stride_blocks": params.changes_stride,
        "writes": offsets.len(),
        "write_bytes": offsets.len() * WRITE_BYTES,
        "write_seconds": write_s,
        "since_era": era,
        "extents": expected.len(),
        "changed_bytes": changed_bytes,
        "verified": true,
        "messages": messages,
        "reps": params.reps,
        "warm_up_ms": warm_s * 1e3,
        "get_changed_blocks_ms": stats_json(&rpc),
        "full_read_ms": stats_json(&reads),
        "full_read_over_changed_blocks": stats_json(&ratios),
    });
    let mut text = String::new();
    writeln!(
        text,
        "changed blocks: {} GiB volume (dm-era block {} KiB), 4 KiB written at every {}th era block: {} writes in {write_s:.1} s",
        params.changes_gib,
        ERA_BLOCK >> 10,
        params.changes_stride,
        offsets.len()
    )?;
    writeln!(
        text,
        "GetChangedBlocks since the checkpoint: {} extents, {} MiB, as written (checked every run); \
         {rpc_min:.1} / {rpc_med:.1} / {rpc_max:.1} ms (min / median / max, {} runs)",
        expected.len(),
        changed_bytes >> 20,
        params.reps
    )?;
    writeln!(
        text,
        "against reading the whole volume (fio 1 MiB sequential, qd32): {read_med:.0} ms median; \
         {ratio:.0}x faster (min {ratio_min:.0}x, max {ratio_max:.0}x), reported"
    )?;
    Ok((report, text))
}

async fn measure_scale(params: &Params) -> BenchResult<(Value, String)> {
    let dm = preflight(params)?;
    let n = params.volumes;
    common::remove_devices_with_prefix(&dm, PREFIX).await?;
    let mut agent = Agent::start(&params.agent, "4G").await?;
    let create_s = create_volumes(&agent, n).await?;
    let devices = thin_devices(&dm).await?;
    if devices.len() != n {
        return Err(format!("{} thin devices for {n} volumes", devices.len()).into());
    }
    // Evenly spread over all devices; the time is scaled to all of them.
    let sample = params.sample.min(n);
    let sampled: Vec<String> = (0..sample)
        .map(|i| devices[i * n / sample].clone())
        .collect();
    let to_all = n as f64 / sample as f64;
    let (mut rpc, mut procs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..params.reps {
        let (list_s, dmsetup_s) = if round % 2 == 0 {
            let list_s = list_once(&agent, n).await?;
            (list_s, dmsetup_once(&sampled)? * to_all)
        } else {
            let dmsetup_s = dmsetup_once(&sampled)? * to_all;
            (list_once(&agent, n).await?, dmsetup_s)
        };
        rpc.push(list_s * 1e3);
        procs.push(dmsetup_s * 1e3);
        ratios.push(dmsetup_s / list_s);
    }
    let rss_serving = agent.rss_mib()?;
    agent.kill9();
    agent.spawn().await?;
    let reconcile_ms = agent.reconcile_ms()?;
    list_once(&agent, n).await?;
    let rss_restarted = agent.rss_mib()?;
    agent.remove(&dm).await?;

    let speedup = summary(&ratios)?;
    let ratio = speedup.median;
    let rss = rss_serving.max(rss_restarted);
    let report = json!({
        "volumes": n,
        "reps": params.reps,
        "create_seconds": create_s,
        "list_rpc_ms": stats_json(&rpc),
        "dmsetup_all_devices_ms": stats_json(&procs),
        "dmsetup_sampled_devices": sample,
        "list_speedup": stats_json(&ratios),
        "list_target": LIST_TARGET,
        "list_pass": ratio >= LIST_TARGET,
        "rss_mib_serving": rss_serving,
        "rss_mib_after_restart": rss_restarted,
        "rss_target_mib": RSS_TARGET_MIB,
        "rss_pass": rss < RSS_TARGET_MIB,
        "reconcile_ms": reconcile_ms,
        "reconcile_target_ms": RECONCILE_TARGET_MS,
        "reconcile_pass": reconcile_ms < RECONCILE_TARGET_MS,
    });
    let (min, med, max) = (speedup.min, speedup.median, speedup.max);
    let rpc_med = summary(&rpc)?.median;
    let procs_med = summary(&procs)?.median;
    let scaled = if sample < n {
        format!(" (timed on {sample}, scaled to {n})")
    } else {
        String::new()
    };
    let mut text = String::new();
    writeln!(
        text,
        "scale: {n} volumes (created in {create_s:.1} s), {} rounds",
        params.reps
    )?;
    writeln!(
        text,
        "status of all volumes: one ListVolumes {rpc_med:.1} ms vs {n} dmsetup status processes{scaled} \
         {procs_med:.0} ms (medians): {med:.0}x faster (min {min:.0}x, max {max:.0}x; target >= {LIST_TARGET}x) {}",
        verdict(med >= LIST_TARGET)
    )?;
    writeln!(
        text,
        "agent RSS: {rss_serving:.1} MiB serving, {rss_restarted:.1} MiB after restart (target < {RSS_TARGET_MIB} MiB) {}",
        verdict(rss < RSS_TARGET_MIB)
    )?;
    writeln!(
        text,
        "reconcile at restart after kill -9: {reconcile_ms:.0} ms (target < {RECONCILE_TARGET_MS} ms) {}",
        verdict(reconcile_ms < RECONCILE_TARGET_MS)
    )?;
    Ok((report, text))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let params = match Params::parse(&args, |name| std::env::var(name).ok()) {
        Ok(params) => params,
        Err(err) => {
            eprintln!("scale: {err}");
            std::process::exit(2);
        }
    };
    if !params.measure {
        if let Err(err) = self_check() {
            eprintln!("scale: self-check failed: {err}");
            std::process::exit(1);
        }
        println!(
            "scale: test mode, argument parsing checked, nothing measured; measure with benches/run"
        );
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut failed = false;
    for (part, wanted) in [
        ("scale", params.scale),
        ("changes", params.changes),
        ("usable", params.usable),
        ("drain", params.drain),
        ("chain", params.chain),
    ] {
        if !wanted {
            continue;
        }
        let measured = runtime.block_on(async {
            match part {
                "scale" => measure_scale(&params).await,
                "changes" => measure_changes(&params).await,
                "usable" => usable::measure(&params).await,
                "drain" => drain::measure(&params).await,
                _ => chain::measure(&params).await,
            }
        });
        match measured {
            Ok((report, text)) => {
                print!("{text}");
                let written = fs::create_dir_all(&params.results)
                    .and_then(|()| fs::write(params.results.join(format!("{part}.txt")), &text))
                    .and_then(|()| {
                        fs::write(
                            params.results.join(format!("{part}.json")),
                            serde_json::to_string_pretty(&report).unwrap_or_default(),
                        )
                    });
                if let Err(err) = written {
                    eprintln!(
                        "scale: cannot write results to {}: {err}",
                        params.results.display()
                    );
                    failed = true;
                }
            }
            Err(err) => {
                eprintln!("scale: {part}: could not measure: {err}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// `cargo test --benches` runs bench targets without `--bench`: then the
/// argument parsing is checked instead of measured.
fn self_check() -> Result<(), String> {
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let env = |name: &str| (name == "DMCLONE_BENCH_VOLUMES").then(|| "20".to_owned());
    let parsed =
        Params::parse(&args(&["--bench", "--reps", "5"]), env).map_err(|e| e.to_string())?;
    if (parsed.measure, parsed.volumes, parsed.reps) != (true, 20, 5) {
        return Err(format!(
            "flags and environment combined wrongly: {parsed:?}"
        ));
    }
    let none = |_: &str| None;
    for (given, reason) in [
        (&["--volumes", "x"][..], "not a whole number"),
        (&["--reps", "0"][..], "at least 1"),
        (&["--frobnicate"][..], "unknown argument"),
        (&["--agent"][..], "needs a value"),
    ] {
        match Params::parse(&args(given), none) {
            Err(err) if err.to_string().contains(reason) => {}
            other => return Err(format!("{given:?} should fail with {reason:?}: {other:?}")),
        }
    }
    common::stats::self_check()?;
    let parts = |list: &str| {
        Params::parse(&args(&["--parts", list]), none)
            .map(|p| (p.scale, p.changes, p.usable, p.drain, p.chain))
    };
    if parts("changes").ok() != Some((false, true, false, false, false))
        || parts("scale,changes").ok() != Some((true, true, false, false, false))
        || parts("usable").ok() != Some((false, false, true, false, false))
        || parts("drain").ok() != Some((false, false, false, true, false))
        || parts("chain").ok() != Some((false, false, false, false, true))
    {
        return Err("--parts selects wrongly".into());
    }
    let sizes = Params::parse(&args(&["--usable-gib", "1, 10"]), none).map(|p| p.usable_gib);
    if sizes.ok() != Some(vec![1, 10]) {
        return Err("--usable-gib reads wrongly".into());
    }
    for (given, reason) in [
        (&["--parts", "era"][..], "unknown part"),
        (&["--parts", ","][..], "names no part"),
        (&["--changes-stride", "1"][..], "at least 2"),
        (&["--changes-gib", "0"][..], "from 1 to 1024"),
        (&["--usable-gib", "0"][..], "sizes from 1 to 1024"),
        (&["--usable-reps", "0"][..], "at least 1"),
        (&["--drain-volumes", "0"][..], "at least 1"),
        (&["--drain-mib", "2"][..], "from 4 to 65536"),
        (&["--chain-reps", "0"][..], "at least 1"),
        (&["--chain-mib", "2"][..], "from 4 to 65536"),
    ] {
        match Params::parse(&args(given), none) {
            Err(err) if err.to_string().contains(reason) => {}
            other => return Err(format!("{given:?} should fail with {reason:?}: {other:?}")),
        }
    }
    // The changed-blocks workload: one write in each of 2,560 distinct,
    // non-adjacent era blocks of 10 GiB, so a correct answer is 2,560 whole
    // blocks, none merged.
    let size = 10 * GIB;
    let offsets = changed_offsets(size, 64);
    let extents = expected_extents(&offsets, size);
    if offsets.len() != 2560
        || offsets
            .iter()
            .any(|o| o % WRITE_BYTES as u64 != 0 || o + WRITE_BYTES as u64 > size)
        || offsets
            .iter()
            .zip(&extents)
            .any(|(o, (start, len))| !(*start..start + len).contains(o) || *len != ERA_BLOCK)
        || extents.windows(2).any(|w| w[0].0 + w[0].1 >= w[1].0)
        || offsets
            .iter()
            .map(|o| o % ERA_BLOCK)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            < 2
    {
        return Err(format!(
            "the changed-blocks workload is wrong: {} offsets, first {:?}",
            offsets.len(),
            &offsets[..offsets.len().min(3)]
        ));
    }
    Ok(())
}
