//! Hydration benchmark: decides the agent's default dm-clone knobs and
//! measures what a move costs the volume's user.
//!
//! One run, against a real kernel (the guest test bed, or a host with dm-clone
//! via `benches/run --host`), measures five things:
//!
//! 1. Hydration throughput over NVMe/TCP loopback. The source is a loop device
//!    on tmpfs filled with a deterministic pattern, exported by nvmet on
//!    127.0.0.1 to one host NQN and connected with the kernel host. The
//!    destination is a thin device of a thin pool on tmpfs loop devices,
//!    written in full before anything is timed, so no run pays block or page
//!    allocation (and overwritten with bytes unlike the source before each
//!    contender's one verified run). Contenders, each run R times, alternating
//!    round-robin (the order rotates every round): fio 1M sequential read of
//!    the namespace and 1M sequential write of the destination (qd32: the
//!    physical limit is the lower of the two), a raw `dd` copy (the baseline),
//!    dm-clone with the kernel defaults the proof of concept uses, and tuned
//!    candidates. A dm-clone run starts its clock at creation (fresh zeroed
//!    metadata, hydration on) and stops it when the clone's completion event
//!    arrives (status is read once right after creation in case it is already
//!    complete). Every contender's copy is verified by sha256 once (untimed).
//!    The wait is the agent monitor's: dm-clone raises the event when it
//!    commits its metadata, on a 1 s tick, so close to the end the clone is
//!    looked at every 20 ms and a flush makes it commit (and signal) once
//!    every region is in. The destination's write counter is also sampled
//!    (a probe; completion is still the event) and candidates are ranked by
//!    that copy phase, with both figures and their ratios printed.
//! 2. 4 KiB random-read IOPS through the public device during hydration (a
//!    slow knob set) and after finalize (dm-era over the thin device, the
//!    agent's stack for a change-tracking volume), each
//!    against the raw thin device in the same run; then one 4 KiB read at
//!    a time of a region not yet copied in turn with one of a copied region
//!    (hot_reads.rs: what steering the copy toward read regions could save).
//! 3. The I/O pause of the finalize swap (the local dm-era table loaded
//!    beside the clone, then suspend with flush, status check, resume, as the
//!    agent does it; alternating with a variant that loads inside the pause)
//!    seen by a reader issuing
//!    4 KiB O_DIRECT reads back to back on the public device.
//! 4. done→finalized: completion event received → resume returned, over the
//!    dm-clone runs of section 1, next to the proof of concept's 10 s polling.
//! 5. 4 KiB random-write IOPS through dm-era over the (pre-filled, so fully
//!    provisioned) thin device, as a change-tracking volume's public device
//!    maps it (the agent's era block; metadata on a thin device of the same
//!    pool), against a linear map of the same thin device, alternating:
//!    steady state within one era (every era block already written in it),
//!    and right after a checkpoint (each first write to a block in the new
//!    era waits for a metadata commit).
//!
//! Run it with `benches/run` (see `benches/run --help`). Under `cargo test
//! --benches` (no `--bench` argument) it only checks its argument parsing and
//! says so; asked to measure on a kernel without device-mapper, dm-clone or
//! NVMe/TCP, it fails with a non-zero exit and prints no figures.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use clap::CommandFactory;
use serde_json::{Value, json};

#[path = "../common/mod.rs"]
mod common;
#[macro_use]
mod report;
mod blockdev;
mod done_to_finalized;
mod era_writes;
mod hot_reads;
mod params;
mod pause;
mod random_read;
mod rig;
mod throughput;
mod tools;

use common::BenchResult;
use done_to_finalized::section_done_to_finalized;
use era_writes::section_era;
use params::{Knobs, Params, Sections};
use pause::section_pause;
use random_read::section_iops;
use report::Report;
use rig::{Rig, preflight};
use throughput::section_hydration;

use dmclone::units::SECTOR;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const MB: f64 = 1e6;

/// Every device-mapper device of the bench starts with this.
const PREFIX: &str = "dmbench-hyd";
const NQN_BASE: &str = "nqn.2014-08.io.dmclone.bench:hydration";
const VOLUME: &str = "00000000-0000-4000-8000-0000000b0001";
const HOST_ID: &str = "00000000-0000-4000-9000-0000000b0001";
/// configfs port id; the kernel tests use 7000..7100.
const PORT_ID: u16 = 7900;
const POOL_BLOCK_SECTORS: u64 = 128;
const CLONE_META_BYTES: u64 = 16 * MIB;
const POOL_META_BYTES: u64 = 16 * MIB;
const PATTERN_SEED: u64 = 0x4859_4452;
const STALE_SEED: u64 = 0x5354_414c;
/// The destination's write counter is sampled this often to timestamp the
/// last copy write (a measurement probe only: completion is the dm event).
const WRITE_SAMPLE: Duration = Duration::from_millis(10);
/// The proof of concept polls the clone's status this often.
const POC_POLL: Duration = Duration::from_secs(10);
/// The finalize pause target.
const PAUSE_TARGET: Duration = Duration::from_millis(20);
const DEFAULT_CANDIDATES: &str = "64K/64/16,256K/32/8,1M/16/8,1M/4/2,4M/4/1,4K/1024/256";

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn environment(rig: &Rig, targets: &str) -> Value {
    let mem_kib = read_trimmed("/proc/meminfo").and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    json!({
        "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
        "cpus": thread::available_parallelism().map(|n| n.get()).ok(),
        "mem_total_kib": mem_kib,
        "targets": targets,
        "clone_hydration_throttle": read_trimmed("/sys/module/dm_clone/parameters/clone_hydration_throttle"),
        "namespace": rig.namespace.path,
        "controller": rig.controller.name,
        "pool_block_bytes": POOL_BLOCK_SECTORS * SECTOR,
        "source": "loop device on tmpfs, deterministic pattern, exported by nvmet-tcp on 127.0.0.1",
        "destination": "thin device of a thin pool on tmpfs loop devices, pre-filled, overwritten with stale bytes before every run",
        "clone_metadata": format!("loop device on tmpfs, {} MiB, zeroed before every clone", CLONE_META_BYTES / MIB),
    })
}

async fn measure(
    rig: &mut Rig,
    params: &Params,
    report: &mut Report,
    json: &mut Value,
    timings: &mut Vec<(&'static str, f64)>,
) -> BenchResult<bool> {
    let mut ok = true;
    let mut winner_knobs = None;
    let mut contenders = Vec::new();
    if params.sections.hydration {
        let step = Instant::now();
        let result = section_hydration(rig, params, report).await?;
        timings.push(("1 hydration", step.elapsed().as_secs_f64()));
        ok &= result.contenders.iter().all(|c| c.verified != Some(false));
        winner_knobs = result.winner.and_then(|w| result.contenders[w].knobs());
        json["hydration"] = result.json;
        contenders = result.contenders;
    }
    if params.sections.iops {
        let step = Instant::now();
        json["iops"] = section_iops(rig, params, report).await?;
        timings.push(("2 iops", step.elapsed().as_secs_f64()));
    }
    if params.sections.pause {
        // The winner's knobs, or the first candidate without section 1.
        let knobs = winner_knobs.unwrap_or(params.candidates[0]);
        let step = Instant::now();
        json["pause"] = section_pause(rig, params, knobs, report).await?;
        timings.push(("3 pause", step.elapsed().as_secs_f64()));
    }
    if params.sections.hydration {
        json["done_to_finalized"] = section_done_to_finalized(&contenders, report);
    }
    if params.sections.era {
        let step = Instant::now();
        json["era"] = section_era(rig, params, report).await?;
        timings.push(("5 era", step.elapsed().as_secs_f64()));
    }
    json["winner_knobs"] = winner_knobs.map_or(Value::Null, |k| k.json());
    json["event_monitor_retries"] = json!(rig.event_retries);
    Ok(ok)
}

async fn run(params: Params) -> BenchResult<bool> {
    let began = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut report = Report::default();
    let (dm, nvme_target, nvme_host, targets) = preflight().await?;
    eprintln!(
        "[bench] preparing: {} MiB source, thin pool, NVMe/TCP export on 127.0.0.1:{}",
        params.size / MIB,
        params.port
    );
    let mut rig = Rig::build(&params, dm, nvme_target, nvme_host).await?;
    let setup = began.elapsed();
    out!(
        report,
        "== dm-clone hydration bench: {} MiB, {} repetitions, kernel {}, {} CPUs; targets {targets}",
        params.size / MIB,
        params.reps,
        read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    out!(
        report,
        "source {} (NVMe/TCP 127.0.0.1:{}, loop on tmpfs) -> thin {} (pool block {} KiB, pre-filled); setup {:.1} s",
        rig.namespace.path.display(),
        params.port,
        rig.dest_path().display(),
        POOL_BLOCK_SECTORS * SECTOR / KIB,
        setup.as_secs_f64()
    );
    let mut json = json!({
        "bench": "hydration",
        "started_unix": started_unix,
        "params": {
            "size_bytes": params.size,
            "reps": params.reps,
            "candidates": params.candidates.iter().map(Knobs::label).collect::<Vec<_>>(),
            "fio_seconds": params.fio_seconds,
            "port": params.port,
            "sections": format!("{:?}", params.sections),
        },
        "environment": environment(&rig, &targets),
    });
    let mut timings = vec![("setup", setup.as_secs_f64())];
    let measured = measure(&mut rig, &params, &mut report, &mut json, &mut timings).await;
    let teardown = rig.teardown().await;
    drop(rig);
    let ok = measured?;
    teardown?;
    let total = began.elapsed();
    out!(report);
    let parts: Vec<String> = timings
        .iter()
        .map(|(name, secs)| format!("{name} {secs:.0} s"))
        .collect();
    out!(
        report,
        "total runtime {:.1} s in the bench ({}){}",
        total.as_secs_f64(),
        parts.join(", "),
        if ok {
            ""
        } else {
            "; FAILED: a destination differed from the source"
        }
    );
    json["total_runtime_s"] = json!(total.as_secs_f64());
    json["section_seconds"] = json!(
        timings
            .iter()
            .map(|(name, secs)| json!({"section": name, "seconds": secs}))
            .collect::<Vec<_>>()
    );
    json["ok"] = json!(ok);
    if let Some(parent) = params.json.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&params.json, serde_json::to_string_pretty(&json)?)
        .map_err(|err| format!("write {}: {err}", params.json.display()))?;
    let mut written = vec![params.json.display().to_string()];
    if let Some(dir) = &params.results_dir {
        fs::create_dir_all(dir)?;
        let text = dir.join("hydration.txt");
        fs::write(&text, &report.text)?;
        written.push(text.display().to_string());
    }
    println!("results: {}", written.join(", "));
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let params = match Params::parse_args(std::env::args_os(), true) {
        Ok(params) => params,
        // --help too: clap prints it (or the error) and exits 0 (or 2).
        Err(err) => err.exit(),
    };
    if !params.measure {
        // `cargo test --benches` runs bench targets without --bench.
        if let Err(err) = self_check() {
            eprintln!("hydration bench: self-check failed: {err}");
            return std::process::ExitCode::FAILURE;
        }
        let mut check = String::new();
        let _ = write!(
            check,
            "{} candidates parse ({})",
            params.candidates.len(),
            params
                .candidates
                .iter()
                .map(Knobs::label)
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "hydration bench: test mode, nothing measured ({check}); measure with benches/run or `--bench`"
        );
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hydration bench: cannot start tokio: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(params)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("hydration bench FAILED, nothing measured is reported as a result: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Checks the argument parsing (under `cargo test --benches`).
fn self_check() -> Result<(), String> {
    common::stats::self_check()?;
    Params::command().debug_assert();
    // Flags only: the caller's DMCLONE_BENCH_* variables must not decide.
    let parse = |given: &[&str]| Params::parse_args(["hydration"].iter().chain(given), false);
    let sections = |list: &str| parse(&["--sections", list]).map(|p| p.sections).ok();
    let era_only = Sections {
        era: true,
        ..Sections::NONE
    };
    if sections("era") != Some(era_only) || sections("all") != Some(Sections::ALL) {
        return Err("--sections selects wrongly".into());
    }
    let defaults = parse(&[]).map_err(|err| err.to_string())?;
    if (defaults.size, defaults.reps, defaults.candidates.len()) != (256 * MIB, 3, 6)
        || defaults.json != Path::new("/tmp/dmclone-hydration-bench.json")
    {
        return Err(format!("the defaults are wrong: {defaults:?}"));
    }
    let kdef = parse(&["--kernel-defaults-reps", "1"]).map(|p| p.kernel_defaults_reps);
    if defaults.kernel_defaults_reps.is_some() || kdef.ok() != Some(Some(1)) {
        return Err("--kernel-defaults-reps reads wrongly".into());
    }
    let json = parse(&["--results-dir", "/r"]).map(|p| p.json);
    if json.ok().as_deref() != Some(Path::new("/r/hydration.json")) {
        return Err("--results-dir does not hold the JSON result".into());
    }
    // Each error names the flag, and what is wrong with its value.
    for (given, reason) in [
        (&["--sections", "frob"][..], "unknown section \"frob\""),
        (&["--sections", ","][..], "names no section"),
        (&["--size-mib", "17"][..], "must be a multiple of 4"),
        (&["--reps", "0"][..], "must be from 1 to 100"),
        (
            &["--kernel-defaults-reps", "0"][..],
            "must be from 1 to 100",
        ),
        (&["--fio-seconds", "x"][..], "not a number"),
        (&["--port", "65536"][..], "must be from 0 to 65535"),
        (&["--candidates", "3K/1/1"][..], "must be a power of two"),
        (
            &["--candidates", "1M/16"][..],
            "expected REGION/THRESHOLD/BATCH",
        ),
        (&["--candidates", ","][..], "names no candidate"),
        (&["--frob"][..], "unexpected argument"),
        (&["--json"][..], "a value is required"),
    ] {
        match parse(given).map_err(|err| err.to_string()) {
            Err(err) if err.contains(given[0]) && err.contains(reason) => {}
            other => {
                return Err(format!("{given:?} should fail with {reason:?}: {other:?}"));
            }
        }
    }
    Ok(())
}
