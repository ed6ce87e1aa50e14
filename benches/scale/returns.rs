//! A return trip against a full move of the same volume.
//!
//! Two agents on this host, both exporting over NVMe/TCP loopback; A keeps
//! the copies of volumes that moved away (`--transfer-keep-source-copy-
//! seconds`). A sample: a volume of `--returns-mib` (256 MiB), written in
//! full on A, moves A→B (the full move: `StartTransfer` to B's transfer
//! done); on B one 4 KiB write lands in every (100 / percent)th region of
//! the agent's default size, spread over the volume; then the volume moves
//! back onto A's warm copy (the return trip: `StartTransfer` to A's
//! transfer done). Bytes are what the source's thin device read in the
//! meantime (its sectors-read counter), against the bytes of the changed
//! regions; the written blocks are read back on A. Both moves use the
//! agent's default knobs. Verdicts: at 1 % the return trip is at least 20x
//! faster than the full move; at every percentage it reads at most 1.1x the
//! changed bytes.

use std::{
    fmt::Write as _,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    time::Instant,
};

use dmclone::{aligned::AlignedBuf, config::DEFAULT_REGION_BYTES};
use serde_json::{Value, json};

use super::{
    Agent, Params,
    chain::{
        delete_when_released, released, start_logged, start_source, state_of, unpublish, wait_done,
        wind_up,
    },
    common::{self, BenchResult, open_direct, stats_json},
    preflight, summary,
    usable::{Route, create, source_flags, start},
};

const A_PREFIX: &str = "dmbenchra";
const B_PREFIX: &str = "dmbenchrb";
const A_PORT: &str = "14951";
const B_PORT: &str = "14952";
const A_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000008";
const A_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000008";
const B_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000009";
const B_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000009";
const MIB: u64 = 1 << 20;
/// Shares of the regions written while away.
const PERCENTS: [u64; 2] = [1, 10];
/// How much faster than the full move a return trip at 1 % must be.
const SPEEDUP_TARGET: f64 = 20.0;
/// Bytes a return trip may read against the changed regions' bytes.
const BYTES_TARGET: f64 = 1.1;
const WRITE_BYTES: usize = 4096;

pub(crate) async fn measure(params: &Params) -> BenchResult<(Value, String)> {
    let dm = preflight(params)?;
    for prefix in [A_PREFIX, B_PREFIX] {
        common::remove_devices_with_prefix(&dm, prefix).await?;
    }
    let size = params.returns_mib * MIB;
    // One volume at a time: A holds it, then its warm copy, then it again.
    let pool = format!("{}M", 2 * params.returns_mib + 512);
    let mut a_flags = source_flags(A_PORT, A_NQN, A_HOST_ID);
    a_flags.extend(["--transfer-keep-source-copy-seconds", "3600"].map(str::to_owned));
    let a = start_logged(params, &pool, A_PREFIX, a_flags).await?;
    let b = start_source(params, &pool, B_PREFIX, [B_PORT, B_NQN, B_HOST_ID]).await?;
    let measured = measure_trips(params, size, [&a, &b]).await;
    wind_up("returns", params, &dm, vec![a, b], measured).await
}

/// One sample's figures.
struct Trip {
    full_s: f64,
    return_s: f64,
    full_bytes: u64,
    return_bytes: u64,
    changed_bytes: u64,
}

async fn measure_trips(
    params: &Params,
    size: u64,
    agents: [&Agent; 2],
) -> BenchResult<(Value, String)> {
    let reps = params.returns_reps;
    let mut trips = Vec::new();
    for (n, percent) in PERCENTS.into_iter().enumerate() {
        let mut samples = Vec::new();
        for rep in 0..reps {
            let trip = one_trip(size, percent, n * reps + rep, agents).await?;
            eprintln!(
                "returns: {percent} %, rep {rep}: full move {:.2} s ({} bytes read), return \
                 trip {:.2} s ({} bytes read for {} changed)",
                trip.full_s, trip.full_bytes, trip.return_s, trip.return_bytes, trip.changed_bytes
            );
            samples.push(trip);
        }
        trips.push((percent, samples));
    }
    report(params, &trips)
}

fn report(params: &Params, trips: &[(u64, Vec<Trip>)]) -> BenchResult<(Value, String)> {
    let full: Vec<f64> = trips
        .iter()
        .flat_map(|(_, s)| s)
        .map(|t| t.full_s)
        .collect();
    let full_s = summary(&full)?;
    let mut text = String::new();
    let mut rows = Vec::new();
    for (percent, samples) in trips {
        let returns: Vec<f64> = samples.iter().map(|t| t.return_s).collect();
        let read: Vec<f64> = samples.iter().map(|t| t.return_bytes as f64).collect();
        let changed = samples.first().map_or(0, |t| t.changed_bytes);
        let (return_s, read_bytes) = (summary(&returns)?, summary(&read)?);
        let speedup = full_s.median / return_s.median;
        let bytes_ratio = read_bytes.max / changed.max(1) as f64;
        let speed_verdict = match *percent {
            1 if speedup >= SPEEDUP_TARGET => "pass",
            1 => "MISSED",
            _ => "no target",
        };
        writeln!(
            text,
            "return trip: a {} MiB volume moved away, {percent} % of its regions written \
             there, moved back onto its warm copy: {:.2} s against the full move's {:.2} s \
             (medians) = {speedup:.1}x faster (target >= {SPEEDUP_TARGET}x at 1 %) \
             {speed_verdict}; at most {:.0} bytes read for {changed} changed = \
             {bytes_ratio:.3}x (target <= {BYTES_TARGET}x) {}",
            params.returns_mib,
            return_s.median,
            full_s.median,
            read_bytes.max,
            if bytes_ratio <= BYTES_TARGET {
                "pass"
            } else {
                "MISSED"
            },
        )?;
        rows.push(json!({
            "percent": percent,
            "changed_bytes": changed,
            "return_s": stats_json(&returns),
            "bytes_read": stats_json(&read),
            "speedup": speedup,
            "bytes_ratio": bytes_ratio,
        }));
    }
    let full_read: Vec<f64> = trips
        .iter()
        .flat_map(|(_, s)| s)
        .map(|t| t.full_bytes as f64)
        .collect();
    let report = json!({
        "volume_mib": params.returns_mib,
        "reps": params.returns_reps,
        "region_bytes": DEFAULT_REGION_BYTES,
        "full_s": stats_json(&full),
        "full_bytes_read": stats_json(&full_read),
        "trips": rows,
        "speedup_target": SPEEDUP_TARGET,
        "bytes_target": BYTES_TARGET,
    });
    Ok((report, text))
}

fn volume_of(sample: usize) -> String {
    format!("5ab1e000-0000-4000-d100-{sample:012x}")
}

fn transfer_of(sample: usize, leg: u8) -> String {
    format!("5ab1e000-0000-4000-e1{leg:02x}-{sample:012x}")
}

/// A→B in full, written on B, then back onto A's warm copy.
async fn one_trip(
    size: u64,
    percent: u64,
    sample: usize,
    [a, b]: [&Agent; 2],
) -> BenchResult<Trip> {
    let volume = volume_of(sample);
    let (away, back) = (transfer_of(sample, 1), transfer_of(sample, 2));
    create(a, &volume, size, true).await?;
    let a_thin = device(A_PREFIX, "thin-", &volume);
    let read_before = sectors_read(&a_thin)?;
    let began = Instant::now();
    start(&Route::new(a, b, B_NQN), &away, &volume, size, false).await?;
    wait_done(b, &away).await?;
    let full_s = began.elapsed().as_secs_f64();
    let full_bytes = (sectors_read(&a_thin)? - read_before) * 512;
    released(b, &away).await?;

    let written = write_spread(&device(B_PREFIX, "", &volume), size, percent, sample)?;
    let b_thin = device(B_PREFIX, "thin-", &volume);
    let read_before = sectors_read(&b_thin)?;
    // B stays published (its release waits), so its thin device and its
    // counters outlive the trip back until they are read.
    let began = Instant::now();
    start(&Route::new(b, a, A_NQN), &back, &volume, size, false).await?;
    wait_done(a, &back).await?;
    let return_s = began.elapsed().as_secs_f64();
    let return_bytes = (sectors_read(&b_thin)? - read_before) * 512;
    let done = state_of(a, &back).await?;
    if done.bytes_skipped == 0 {
        return Err(format!("the trip back copied everything: {}", done.message).into());
    }
    check_written(&device(A_PREFIX, "", &volume), &written, sample)?;
    unpublish(b, &volume).await?;
    delete_when_released(a, &back, &volume).await?;
    Ok(Trip {
        full_s,
        return_s,
        full_bytes,
        return_bytes,
        changed_bytes: written.len() as u64 * DEFAULT_REGION_BYTES,
    })
}

fn device(prefix: &str, kind: &str, volume: &str) -> PathBuf {
    PathBuf::from(format!("/dev/mapper/{prefix}-{kind}{volume}"))
}

/// Sectors read from the block device at `path` since it was made.
fn sectors_read(path: &Path) -> BenchResult<u64> {
    let rdev = std::fs::metadata(path)?.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))?;
    stat.split_whitespace()
        .nth(2)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| format!("no sectors-read field in {stat:?}").into())
}

/// Where one 4 KiB write lands in every (100 / percent)th region, at a
/// different place within each.
fn spread_offsets(size: u64, percent: u64) -> Vec<u64> {
    let regions = size / DEFAULT_REGION_BYTES;
    (0..regions)
        .step_by((100 / percent.clamp(1, 100)) as usize)
        .map(|region| {
            let within = (region * 7 % (DEFAULT_REGION_BYTES / WRITE_BYTES as u64)) * 4096;
            region * DEFAULT_REGION_BYTES + within
        })
        .collect()
}

/// What sample `sample` writes at `offset`: it differs from fio's data.
fn block_of(offset: u64, sample: usize) -> AlignedBuf {
    let mut block = AlignedBuf::new(WRITE_BYTES);
    let seed = (offset / WRITE_BYTES as u64) as u8 ^ sample as u8 ^ 0xa5;
    for (i, byte) in block.as_mut_slice().iter_mut().enumerate() {
        *byte = seed.wrapping_add(i as u8);
    }
    block
}

/// Writes the spread blocks through `path`; returns their offsets.
fn write_spread(path: &Path, size: u64, percent: u64, sample: usize) -> BenchResult<Vec<u64>> {
    let offsets = spread_offsets(size, percent);
    let file = open_direct(path, true)?;
    for &offset in &offsets {
        file.write_all_at(block_of(offset, sample).as_slice(), offset)?;
    }
    file.sync_all()?;
    Ok(offsets)
}

/// Every written block came back.
fn check_written(path: &Path, offsets: &[u64], sample: usize) -> BenchResult<()> {
    let file = open_direct(path, false)?;
    let mut read = AlignedBuf::new(WRITE_BYTES);
    for &offset in offsets {
        file.read_exact_at(read.as_mut_slice(), offset)?;
        if read.as_slice() != block_of(offset, sample).as_slice() {
            return Err(format!("the block written at {offset} did not come back").into());
        }
    }
    Ok(())
}

/// The workload's own arithmetic, checked without a kernel.
pub(super) fn self_check() -> Result<(), String> {
    let size = 256 * MIB;
    let one = spread_offsets(size, 1);
    let ten = spread_offsets(size, 10);
    let regions = |offsets: &[u64]| {
        offsets
            .iter()
            .map(|o| o / DEFAULT_REGION_BYTES)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    if one.len() != 3 || ten.len() != 26 || regions(&one) != 3 || regions(&ten) != 26 {
        return Err(format!(
            "the return trip's writes are wrong: {} and {} offsets",
            one.len(),
            ten.len()
        ));
    }
    if ten
        .iter()
        .any(|o| o % WRITE_BYTES as u64 != 0 || o + WRITE_BYTES as u64 > size)
    {
        return Err("a return trip's write is misplaced".into());
    }
    Ok(())
}
