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
//! 8. Return trips (`--parts returns`, two agents): a volume moved back onto
//!    the copy it left, 1 % and 10 % of it written while away, against the
//!    full move: see `scale/returns.rs`.
//!
//! 9. Snapshots travelling with their volume (`--parts travel`, two
//!    agents): bytes received against the deltas, and the destination's
//!    pool against the source's: see `scale/travel.rs`.
//!
//! Writes `<part>.json` and `<part>.txt` for each part (scale, changes,
//! usable, drain, chain, returns, travel) to
//! `--results-dir`. Under `cargo test --benches` (no `--bench`) it only checks
//! its argument parsing. Without device-mapper, `dmsetup` or the agent
//! binary it fails and prints no figures.

// Drives the agent over gRPC: tonic and the generated clients are its
// vocabulary (clippy.toml keeps them out of the library's domain).
#![allow(clippy::disallowed_types)]

use std::{
    convert::Infallible,
    ffi::OsStr,
    fmt::Write as _,
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use clap::{CommandFactory, Parser};
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
#[path = "scale/returns.rs"]
mod returns;
#[path = "scale/travel.rs"]
mod travel;
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

/// The scale bench: the status of many volumes, the agent's memory and
/// restart, changed blocks, a moved volume's first read, a host drain and a
/// chained move.
///
/// Without --bench (as under `cargo test --benches`) it only checks its
/// argument parsing. Every option also reads the DMCLONE_BENCH_* variable
/// shown; the flag wins, an empty variable counts as unset.
#[derive(Debug, PartialEq, Parser)]
// A repeated flag replaces the earlier one, as it always did, rather than
// being clap's error (benches/suite-job puts the caller's options after its own).
#[command(name = "scale", bin_name = "scale", args_override_self = true)]
struct Params {
    /// Measure (cargo bench and benches/run pass it)
    #[arg(long = "bench")]
    measure: bool,
    /// The dmclone-agent binary
    #[arg(long, value_name = "PATH", default_value = "", value_parser = any_path)]
    #[arg(env = "DMCLONE_BENCH_AGENT", hide_default_value = true)]
    agent: PathBuf,
    /// The parts to run: any of scale, changes, usable, drain, chain,
    /// returns, travel
    #[arg(long, value_name = "LIST", default_value = ALL_PARTS, value_parser = parts)]
    #[arg(env = "DMCLONE_BENCH_SCALE_PARTS")]
    parts: Parts,
    /// Volumes to create
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_VOLUMES")]
    volumes: usize,
    /// Rounds of the status comparison and of the changed-blocks comparison
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_REPS")]
    reps: usize,
    /// Devices run through dmsetup per round, the time scaled to all
    #[arg(long = "dmsetup-sample", value_name = "N", default_value_t = 100, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_DMSETUP_SAMPLE")]
    sample: usize,
    /// Size of the changed-blocks volume in GiB, 1 to 1024
    #[arg(long = "changes-gib", value_name = "N", default_value_t = 10, value_parser = gib)]
    #[arg(env = "DMCLONE_BENCH_CHANGES_GIB")]
    changes_gib: u64,
    /// 4 KiB written at every Nth era block, N at least 2
    #[arg(long = "changes-stride", value_name = "N", default_value_t = 64, value_parser = stride)]
    #[arg(env = "DMCLONE_BENCH_CHANGES_STRIDE")]
    changes_stride: u64,
    /// Sizes in GiB of the moved volume whose first read is timed, e.g. 1,10;
    /// the first is written in full, the others stay sparse
    // The full path keeps clap from reading a Vec as a repeated flag: one
    // value holds the whole list.
    #[arg(long = "usable-gib", value_name = "LIST", default_value = "1", value_parser = sizes_gib)]
    #[arg(env = "DMCLONE_BENCH_USABLE_GIB")]
    usable_gib: ::std::vec::Vec<u64>,
    /// Moves timed per size
    #[arg(long = "usable-reps", value_name = "N", default_value_t = 20, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_USABLE_REPS")]
    usable_reps: usize,
    /// Volumes moved at once in the drain
    #[arg(long = "drain-volumes", value_name = "N", default_value_t = 16, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_DRAIN_VOLUMES")]
    drain_volumes: usize,
    /// Size of each drained volume in MiB, 4 to 65536
    #[arg(long = "drain-mib", value_name = "N", default_value_t = 256, value_parser = mib)]
    #[arg(env = "DMCLONE_BENCH_DRAIN_MIB")]
    drain_mib: u64,
    /// Size of the volume moved A->B->C and A->B, in MiB, 4 to 65536
    #[arg(long = "chain-mib", value_name = "N", default_value_t = 256, value_parser = mib)]
    #[arg(env = "DMCLONE_BENCH_CHAIN_MIB")]
    chain_mib: u64,
    /// Samples of the chained move and of the single one (each varies by a
    /// fifth run to run under emulation: three made the verdict a draw)
    #[arg(long = "chain-reps", value_name = "N", default_value_t = 7, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_CHAIN_REPS")]
    chain_reps: usize,
    /// Size of the volume of the return trips, in MiB, 4 to 65536
    #[arg(long = "returns-mib", value_name = "N", default_value_t = 256, value_parser = mib)]
    #[arg(env = "DMCLONE_BENCH_RETURNS_MIB")]
    returns_mib: u64,
    /// Return trips (and full moves) per share of regions written away
    #[arg(long = "returns-reps", value_name = "N", default_value_t = 3, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_RETURNS_REPS")]
    returns_reps: usize,
    /// Size of the volume moved with its snapshots, in MiB, 4 to 65536
    #[arg(long = "travel-mib", value_name = "N", default_value_t = 256, value_parser = mib)]
    #[arg(env = "DMCLONE_BENCH_TRAVEL_MIB")]
    travel_mib: u64,
    /// Moves of a volume with its snapshots
    #[arg(long = "travel-reps", value_name = "N", default_value_t = 3, value_parser = count)]
    #[arg(env = "DMCLONE_BENCH_TRAVEL_REPS")]
    travel_reps: usize,
    /// The agents' log level (e.g. debug, to time a move's steps in the
    /// logs the chain keeps beside its results)
    #[arg(long = "agent-log-level", value_name = "LEVEL", default_value = "info")]
    #[arg(env = "DMCLONE_BENCH_AGENT_LOG_LEVEL")]
    agent_log_level: String,
    /// Where <part>.json and <part>.txt go
    #[arg(long = "results-dir", value_name = "DIR", default_value = ".")]
    results: PathBuf,
}

/// Which parts run (`--parts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Parts {
    scale: bool,
    changes: bool,
    usable: bool,
    drain: bool,
    chain: bool,
    returns: bool,
    travel: bool,
}

const ALL_PARTS: &str = "scale,changes,usable,drain,chain,returns,travel";

fn parts(list: &str) -> BenchResult<Parts> {
    let mut parts = Parts::default();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let wanted = match part {
            "scale" => &mut parts.scale,
            "changes" => &mut parts.changes,
            "usable" => &mut parts.usable,
            "drain" => &mut parts.drain,
            "chain" => &mut parts.chain,
            "returns" => &mut parts.returns,
            "travel" => &mut parts.travel,
            other => return Err(format!("unknown part {other:?} (of {ALL_PARTS})").into()),
        };
        *wanted = true;
    }
    if parts == Parts::default() {
        return Err("names no part".into());
    }
    Ok(parts)
}

/// The agent's path, the empty one too (clap's own parser refuses it):
/// unset, it is missed only when measuring, where `preflight` says so.
fn any_path(text: &str) -> Result<PathBuf, Infallible> {
    Ok(PathBuf::from(text))
}

fn whole<T: FromStr>(text: &str) -> BenchResult<T> {
    text.parse().map_err(|_| "not a whole number".into())
}

/// Volumes, rounds, samples: none would measure nothing.
fn count(text: &str) -> BenchResult<usize> {
    match whole(text)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// A stride of 1 writes neighbouring blocks, which come back merged.
fn stride(text: &str) -> BenchResult<u64> {
    match whole(text)? {
        n @ 2.. => Ok(n),
        _ => Err("must be at least 2".into()),
    }
}

fn gib(text: &str) -> BenchResult<u64> {
    common::within(whole(text)?, 1..=1024)
}

/// dm-clone's regions and the pool's blocks divide whole MiB.
fn mib(text: &str) -> BenchResult<u64> {
    common::within(whole(text)?, 4..=65536)
}

/// A comma-separated list of sizes in GiB, spaces allowed ("1, 10").
fn sizes_gib(list: &str) -> BenchResult<Vec<u64>> {
    let sizes = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(gib)
        .collect::<BenchResult<Vec<u64>>>()?;
    if sizes.is_empty() {
        return Err("names no size".into());
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
                if client
                    .list_volumes(ListVolumesRequest::default())
                    .await
                    .is_ok()
                {
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

    /// Copies the agent's log beside the results, where the figures it
    /// explains (e.g. a move's steps, by their timestamps) can be read.
    fn keep_log(&self, results: &Path) -> BenchResult<()> {
        fs::create_dir_all(results)?;
        fs::copy(
            self.log(),
            results.join(format!("agent-{}.log", self.prefix)),
        )?;
        Ok(())
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
        .list_volumes(ListVolumesRequest::default())
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
    let params = match common::parse_options::<Params, _, _>(std::env::args_os(), true) {
        Ok(params) => params,
        // --help too: clap prints it (or the error) and exits 0 (or 2).
        Err(err) => err.exit(),
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
        ("scale", params.parts.scale),
        ("changes", params.parts.changes),
        ("usable", params.parts.usable),
        ("drain", params.parts.drain),
        ("chain", params.parts.chain),
        ("returns", params.parts.returns),
        ("travel", params.parts.travel),
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
                "chain" => chain::measure(&params).await,
                "returns" => returns::measure(&params).await,
                _ => travel::measure(&params).await,
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
    Params::command().debug_assert();
    check_variables()?;
    // Flags only: the caller's DMCLONE_BENCH_* variables must not decide.
    let parse = |given: &[&str]| {
        common::parse_options::<Params, _, _>(["scale"].iter().chain(given), false)
    };
    let parsed = parse(&["--bench", "--reps", "5"]).map_err(|e| e.to_string())?;
    if (parsed.measure, parsed.volumes, parsed.reps) != (true, 1000, 5) {
        return Err(format!("flags and defaults combined wrongly: {parsed:?}"));
    }
    let parts = |given: &[&str]| {
        parse(given)
            .map(|p| p.parts)
            .map(|p| {
                [
                    p.scale, p.changes, p.usable, p.drain, p.chain, p.returns, p.travel,
                ]
            })
            .ok()
    };
    let only = |n: usize| Some(std::array::from_fn(|i| i == n));
    if parts(&["--parts", "changes"]) != only(1)
        || parts(&["--parts", "scale, changes"])
            != Some([true, true, false, false, false, false, false])
        || parts(&["--parts", "usable"]) != only(2)
        || parts(&["--parts", "drain"]) != only(3)
        || parts(&["--parts", "chain"]) != only(4)
        || parts(&["--parts", "returns"]) != only(5)
        || parts(&["--parts", "travel"]) != only(6)
        || parts(&[]) != Some([true; 7])
    {
        return Err("--parts selects wrongly".into());
    }
    let sizes = parse(&["--usable-gib", "1, 10"]).map(|p| p.usable_gib);
    if sizes.ok() != Some(vec![1, 10]) {
        return Err("--usable-gib reads wrongly".into());
    }
    // Each error names the flag, and what is wrong with its value.
    for (given, reason) in [
        (&["--volumes", "x"][..], "not a whole number"),
        (&["--reps", "0"][..], "must be at least 1"),
        (&["--frobnicate"][..], "unexpected argument"),
        (&["--agent"][..], "a value is required"),
        (&["--parts", "era"][..], "unknown part \"era\""),
        (&["--parts", ","][..], "names no part"),
        (&["--changes-stride", "1"][..], "must be at least 2"),
        (&["--changes-gib", "0"][..], "must be from 1 to 1024"),
        (&["--usable-gib", "1,0"][..], "must be from 1 to 1024"),
        (&["--usable-gib", " "][..], "names no size"),
        (&["--usable-reps", "0"][..], "must be at least 1"),
        (&["--drain-volumes", "0"][..], "must be at least 1"),
        (&["--drain-mib", "2"][..], "must be from 4 to 65536"),
        (&["--chain-reps", "0"][..], "must be at least 1"),
        (&["--chain-mib", "2"][..], "must be from 4 to 65536"),
        (&["--returns-reps", "0"][..], "must be at least 1"),
        (&["--returns-mib", "2"][..], "must be from 4 to 65536"),
        (&["--travel-reps", "0"][..], "must be at least 1"),
        (&["--travel-mib", "2"][..], "must be from 4 to 65536"),
    ] {
        match parse(given).map_err(|err| err.to_string()) {
            Err(err) if err.contains(given[0]) && err.contains(reason) => {}
            other => return Err(format!("{given:?} should fail with {reason:?}: {other:?}")),
        }
    }
    common::stats::self_check()?;
    returns::self_check()?;
    travel::self_check()?;
    chain::self_check()?;
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

/// benches/run and benches/suite-job set these variables (and pass the
/// flags): their names are an interface.
fn check_variables() -> Result<(), String> {
    let command = Params::command();
    for (flag, variable) in [
        ("agent", "DMCLONE_BENCH_AGENT"),
        ("parts", "DMCLONE_BENCH_SCALE_PARTS"),
        ("volumes", "DMCLONE_BENCH_VOLUMES"),
        ("reps", "DMCLONE_BENCH_REPS"),
        ("dmsetup-sample", "DMCLONE_BENCH_DMSETUP_SAMPLE"),
        ("changes-gib", "DMCLONE_BENCH_CHANGES_GIB"),
        ("changes-stride", "DMCLONE_BENCH_CHANGES_STRIDE"),
        ("usable-gib", "DMCLONE_BENCH_USABLE_GIB"),
        ("usable-reps", "DMCLONE_BENCH_USABLE_REPS"),
        ("drain-volumes", "DMCLONE_BENCH_DRAIN_VOLUMES"),
        ("drain-mib", "DMCLONE_BENCH_DRAIN_MIB"),
        ("chain-mib", "DMCLONE_BENCH_CHAIN_MIB"),
        ("chain-reps", "DMCLONE_BENCH_CHAIN_REPS"),
        ("returns-mib", "DMCLONE_BENCH_RETURNS_MIB"),
        ("returns-reps", "DMCLONE_BENCH_RETURNS_REPS"),
        ("travel-mib", "DMCLONE_BENCH_TRAVEL_MIB"),
        ("travel-reps", "DMCLONE_BENCH_TRAVEL_REPS"),
    ] {
        let read = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(flag))
            .and_then(|arg| arg.get_env());
        if read != Some(OsStr::new(variable)) {
            return Err(format!("--{flag} should read {variable}, reads {read:?}"));
        }
    }
    Ok(())
}
