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
//! Writes `scale.json` and `scale.txt` to `--results-dir`. Under `cargo test
//! --benches` (no `--bench`) it only checks its argument parsing. Without
//! device-mapper, `dmsetup` or the agent binary it fails and prints no
//! figures.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use dmclone::{
    client::connect_unix,
    dm::kernel::DeviceMapper,
    proto::v1::{CreateVolumeRequest, ListVolumesRequest, volumes_client::VolumesClient},
};
use serde_json::{Value, json};
use tonic::transport::Channel;

mod common;

use common::BenchResult;

const PREFIX: &str = "dmbenchscale";
const LIST_TARGET: f64 = 50.0;
const RSS_TARGET_MIB: f64 = 64.0;
const RECONCILE_TARGET_MS: f64 = 3000.0;
const USAGE: &str = "\
usage: scale --bench [--agent PATH] [--volumes N] [--reps N] [--results-dir DIR]
  --agent PATH       the dmclone-agent binary (or DMCLONE_BENCH_AGENT)
  --volumes N        volumes to create (1000, or DMCLONE_BENCH_VOLUMES)
  --reps N           rounds of the status comparison (3, or DMCLONE_BENCH_REPS)
  --dmsetup-sample N devices run through dmsetup per round, scaled to all
                     (100, or DMCLONE_BENCH_DMSETUP_SAMPLE)
  --results-dir DIR  where scale.json and scale.txt go (default: .)";

#[derive(Debug, PartialEq)]
struct Params {
    measure: bool,
    agent: PathBuf,
    volumes: usize,
    reps: usize,
    sample: usize,
    results: PathBuf,
}

impl Params {
    fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> BenchResult<Self> {
        let mut params = Params {
            measure: false,
            agent: PathBuf::from(env("DMCLONE_BENCH_AGENT").unwrap_or_default()),
            volumes: number(env("DMCLONE_BENCH_VOLUMES").as_deref(), 1000, "volumes")?,
            reps: number(env("DMCLONE_BENCH_REPS").as_deref(), 3, "reps")?,
            sample: number(
                env("DMCLONE_BENCH_DMSETUP_SAMPLE").as_deref(),
                100,
                "dmsetup-sample",
            )?,
            results: PathBuf::from("."),
        };
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
                "--results-dir" => params.results = PathBuf::from(value()?),
                other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
            }
        }
        if params.volumes == 0 || params.reps == 0 || params.sample == 0 {
            return Err(format!(
                "--volumes, --reps and --dmsetup-sample must be at least 1\n{USAGE}"
            )
            .into());
        }
        Ok(params)
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

fn volume_id(i: usize) -> String {
    format!("5c000000-0000-4000-8000-{i:012x}")
}

/// min, median, max.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    )
}

fn spread_json(values: &[f64]) -> Value {
    let (min, median, max) = spread(values);
    json!({ "min": min, "median": median, "max": max, "values": values })
}

struct Agent {
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Agent {
    async fn start(binary: &Path) -> BenchResult<Self> {
        let mut agent = Agent {
            binary: binary.to_owned(),
            dir: tempfile::tempdir()?,
            child: None,
        };
        agent.spawn().await?;
        Ok(agent)
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
            .args(["--dm-prefix", PREFIX, "--pool-file-size", "4G"])
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
            if let Ok(channel) = connect_unix(&self.dir.path().join("agent.sock")).await {
                let mut client = VolumesClient::new(channel);
                if client.list_volumes(ListVolumesRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the agent did not serve within 300 s".into())
    }

    async fn client(&self) -> BenchResult<VolumesClient<Channel>> {
        Ok(VolumesClient::new(
            connect_unix(&self.dir.path().join("agent.sock")).await?,
        ))
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
        common::remove_devices_with_prefix(dm, PREFIX).await
    }
}

#[allow(clippy::disallowed_types)] // dmsetup is the baseline: the proof of concept's way
fn run(program: &str, args: &[String]) -> BenchResult<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("cannot run {program}: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
        let status = run("dmsetup", &["status".to_owned(), device.clone()])?;
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

async fn measure(params: &Params) -> BenchResult<(Value, String)> {
    let dm = DeviceMapper::open()
        .map_err(|err| format!("this kernel offers no device-mapper: {err}"))?;
    run("dmsetup", &["version".to_owned()])?;
    if !params.agent.is_file() {
        return Err(format!(
            "no agent binary at {:?} (--agent or DMCLONE_BENCH_AGENT)",
            params.agent
        )
        .into());
    }
    let n = params.volumes;
    common::remove_devices_with_prefix(&dm, PREFIX).await?;
    let mut agent = Agent::start(&params.agent).await?;
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

    let (_, ratio, _) = spread(&ratios);
    let rss = rss_serving.max(rss_restarted);
    let report = json!({
        "volumes": n,
        "reps": params.reps,
        "create_seconds": create_s,
        "list_rpc_ms": spread_json(&rpc),
        "dmsetup_all_devices_ms": spread_json(&procs),
        "dmsetup_sampled_devices": sample,
        "list_speedup": spread_json(&ratios),
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
    let (min, med, max) = spread(&ratios);
    let (_, rpc_med, _) = spread(&rpc);
    let (_, procs_med, _) = spread(&procs);
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
    match runtime.block_on(measure(&params)) {
        Ok((report, text)) => {
            print!("{text}");
            let written = fs::create_dir_all(&params.results)
                .and_then(|()| fs::write(params.results.join("scale.txt"), &text))
                .and_then(|()| {
                    fs::write(
                        params.results.join("scale.json"),
                        serde_json::to_string_pretty(&report).unwrap_or_default(),
                    )
                });
            if let Err(err) = written {
                eprintln!(
                    "scale: cannot write results to {}: {err}",
                    params.results.display()
                );
                std::process::exit(1);
            }
        }
        Err(err) => {
            eprintln!("scale: could not measure: {err}");
            std::process::exit(1);
        }
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
    if spread(&[3.0, 1.0, 2.0]) != (1.0, 2.0, 3.0) {
        return Err("spread is not min, median, max".into());
    }
    Ok(())
}
