//! What the benchmarks share.

use std::{
    error::Error as StdError,
    fs::{File, OpenOptions},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use dmclone::dm::{kernel::DeviceMapper, names::DeviceName};
use serde_json::Value;

pub mod stats;

pub use stats::{Stats, stats, stats_json};

pub type BenchResult<T> = Result<T, Box<dyn StdError + Send + Sync>>;

/// An option's value checked against its range (a clap value parser's
/// error: it names the option).
pub fn within(n: u64, range: std::ops::RangeInclusive<u64>) -> BenchResult<u64> {
    if !range.contains(&n) {
        return Err(format!("must be from {} to {}", range.start(), range.end()).into());
    }
    Ok(n)
}

/// Parses a bench's options from `args` (the program name first). The
/// DMCLONE_BENCH_* variables are read only if `environment` (a self-check
/// must not depend on the caller's); an empty one counts as unset, where
/// clap would take "" as the value.
pub fn parse_options<P, I, T>(args: I, environment: bool) -> Result<P, clap::Error>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let command = P::command().mut_args(|arg| {
        let ignored = arg.get_env().is_some_and(|name| {
            !environment || std::env::var_os(name).is_some_and(|v| v.is_empty())
        });
        if ignored { arg.env(None) } else { arg }
    });
    P::from_arg_matches(&command.try_get_matches_from(args)?)
}

/// Removes every device named `<prefix>-…`, those stacked on others first
/// (a device is removable once nothing holds it open).
pub async fn remove_devices_with_prefix(dm: &DeviceMapper, prefix: &str) -> BenchResult<()> {
    loop {
        let mut ours = Vec::new();
        for device in dm.list().await? {
            if device.name.starts_with(&format!("{prefix}-")) {
                ours.push(DeviceName::new(&device.name)?);
            }
        }
        if ours.is_empty() {
            return Ok(());
        }
        let mut removed = false;
        for name in &ours {
            if dm.info(name).await?.map(|s| s.open_count) == Some(0) {
                dm.remove(name).await?;
                removed = true;
            }
        }
        if !removed {
            return Err(format!("bench devices {ours:?} are held open by something else").into());
        }
    }
}

/// Runs a tool to completion and returns its stdout.
#[allow(clippy::disallowed_types)] // dd, fio and dmsetup are contenders and probes, not device-mapper control
pub fn run_tool(program: &str, args: &[String]) -> BenchResult<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|err| format!("cannot start {program}: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn open_direct(path: &Path, write: bool) -> BenchResult<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|err| format!("open {} (O_DIRECT): {err}", path.display()).into())
}

/// One fio job: libaio, O_DIRECT, queue depth 32.
#[derive(Debug, Clone, Copy)]
pub struct FioJob {
    /// fio's `--rw`: read, write, randread or randwrite.
    pub rw: &'static str,
    pub block_bytes: u64,
    /// Time-based for this long, at random offsets that may repeat; `None`
    /// is one pass over the size.
    pub seconds: Option<u64>,
}

/// Runs one fio job over the first `size` bytes of `path` and returns
/// (bytes/s, IOPS) of its direction.
pub fn fio(path: &Path, job: FioJob, size: u64) -> BenchResult<(f64, f64)> {
    Ok(fio_in_turn(&[path], job, size)?[0])
}

/// Runs `job` on each path one after another in one fio process (each run
/// waits for the one before it), and returns (bytes/s, IOPS) of each run in
/// order. Runs compared with each other follow each other closely this way:
/// under emulation a fio process takes seconds to start, and the guest's
/// speed drifts in between.
pub fn fio_in_turn(paths: &[&Path], job: FioJob, size: u64) -> BenchResult<Vec<(f64, f64)>> {
    let mut args = vec![
        "--ioengine=libaio".to_owned(),
        "--direct=1".into(),
        "--iodepth=32".into(),
        format!("--size={size}"),
        // Under emulation fio's latency bookkeeping costs more than the I/O:
        // clock calls per I/O, and percentiles that took ~20 s to print.
        "--gtod_reduce=1".into(),
        "--output-format=json".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.block_bytes),
    ];
    if let Some(seconds) = job.seconds {
        args.extend([
            "--time_based=1".into(),
            format!("--runtime={seconds}"),
            "--norandommap=1".into(),
            "--randrepeat=0".into(),
        ]);
    }
    for (index, path) in paths.iter().enumerate() {
        args.extend([
            format!("--name=bench{index}"),
            format!("--filename={}", path.display()),
            "--stonewall".into(),
        ]);
    }
    let stdout = run_tool("fio", &args)?;
    let start = stdout
        .find('{')
        .ok_or_else(|| format!("fio printed no JSON: {stdout}"))?;
    let report: Value = serde_json::from_str(&stdout[start..])
        .map_err(|err| format!("fio JSON: {err}: {stdout}"))?;
    paths
        .iter()
        .enumerate()
        .map(|(index, path)| fio_figures(&report["jobs"][index], job, path))
        .collect()
}

/// (bytes/s, IOPS) of one job of fio's JSON report.
fn fio_figures(report: &Value, job: FioJob, path: &Path) -> BenchResult<(f64, f64)> {
    let direction = if job.rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let side = &report[direction];
    let errors = report["error"].as_i64().unwrap_or(0);
    if errors != 0 {
        return Err(format!("fio on {} reported error {errors}", path.display()).into());
    }
    let bw = side["bw_bytes"]
        .as_f64()
        .ok_or_else(|| format!("fio JSON lacks {direction}.bw_bytes"))?;
    let iops = side["iops"]
        .as_f64()
        .ok_or_else(|| format!("fio JSON lacks {direction}.iops"))?;
    if bw <= 0.0 {
        return Err(format!("fio on {} moved no data", path.display()).into());
    }
    Ok((bw, iops))
}
