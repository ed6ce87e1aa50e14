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
//!    The completion event comes on dm-clone's 1 s commit tick, up to ~2 s
//!    after the last copy, which at these sizes hides the knobs' differences;
//!    so the destination's write counter is also sampled (a probe; completion
//!    is still the event) and candidates are ranked by that copy phase, with
//!    both figures and their ratios printed.
//! 2. 4 KiB random-read IOPS through the public device during hydration (a
//!    slow knob set) and after finalize (dm-era over the thin device, the
//!    agent's stack for a change-tracking volume), each
//!    against the raw thin device in the same run.
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
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dmclone::{
    aligned::AlignedBuf,
    dm::{
        events::EventMonitor,
        kernel::{DeviceMapper, Flush},
        names::DeviceName,
        status::{CloneMode, CloneStatus, EraStatus, Health},
        table::{CloneParams, DevRef, Era, Linear, Table, Target as DmTarget, Thin, ThinPool},
    },
    error::Error as DmError,
    ids::VolumeId,
    nvme::{
        ConnectOptions, ConnectRequest, ConnectTimeouts, Controller, ExportRequest, Host, HostId,
        NamespaceDevice, Nqn, PortSpec, Target as NvmeTarget, TcpAddress, namespace_ids,
    },
};
use loopdev::{LoopControl, LoopDevice};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

mod common;

use common::{BenchResult, FioJob, fio, open_direct, run_tool};

const SECTOR: u64 = 512;
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

// ---------------------------------------------------------------------------
// Parameters

/// dm-clone knobs; `None` leaves the kernel default (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Knobs {
    region_bytes: u64,
    threshold: Option<u32>,
    batch: Option<u32>,
}

impl Knobs {
    const KERNEL_DEFAULTS: Knobs = Knobs {
        region_bytes: 4 * KIB,
        threshold: None,
        batch: None,
    };

    fn threshold(&self) -> u32 {
        self.threshold.unwrap_or(1)
    }

    fn batch(&self) -> u32 {
        self.batch.unwrap_or(1)
    }

    fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            size_label(self.region_bytes),
            self.threshold(),
            self.batch()
        )
    }

    /// `REGION/THRESHOLD/BATCH`, region with an optional K/M/G suffix.
    fn parse(spec: &str) -> BenchResult<Self> {
        let parts: Vec<&str> = spec.trim().split('/').collect();
        let [region, threshold, batch] = parts.as_slice() else {
            return Err(format!("candidate {spec:?}: expected REGION/THRESHOLD/BATCH").into());
        };
        let region_bytes = parse_size(region)?;
        if !region_bytes.is_power_of_two() || !(4 * KIB..=1024 * MIB).contains(&region_bytes) {
            return Err(format!(
                "candidate {spec:?}: the region must be a power of two from 4K to 1G"
            )
            .into());
        }
        let number = |what: &str, text: &str| -> BenchResult<u32> {
            let value: u32 = text
                .parse()
                .map_err(|_| format!("candidate {spec:?}: {what} {text:?} is not a number"))?;
            if value == 0 {
                return Err(format!("candidate {spec:?}: {what} must be positive").into());
            }
            Ok(value)
        };
        Ok(Knobs {
            region_bytes,
            threshold: Some(number("threshold", threshold)?),
            batch: Some(number("batch", batch)?),
        })
    }

    fn json(&self) -> Value {
        json!({
            "region_bytes": self.region_bytes,
            "hydration_threshold": self.threshold(),
            "hydration_batch_size": self.batch(),
        })
    }
}

fn parse_size(text: &str) -> BenchResult<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} is not a number"))?;
    let unit = match unit.to_ascii_uppercase().trim_end_matches("IB") {
        "" => 1,
        "K" => KIB,
        "M" => MIB,
        "G" => 1024 * MIB,
        other => return Err(format!("size {text:?}: unknown unit {other:?}").into()),
    };
    Ok(value * unit)
}

fn size_label(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}M", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{}K", bytes / KIB)
    } else {
        format!("{bytes}B")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sections {
    hydration: bool,
    iops: bool,
    pause: bool,
    era: bool,
}

impl Sections {
    const ALL: Sections = Sections {
        hydration: true,
        iops: true,
        pause: true,
        era: true,
    };
    const NONE: Sections = Sections {
        hydration: false,
        iops: false,
        pause: false,
        era: false,
    };
}

#[derive(Debug, Clone)]
struct Params {
    /// `--bench` was given (cargo bench and benches/run pass it).
    measure: bool,
    size: u64,
    reps: usize,
    candidates: Vec<Knobs>,
    fio_seconds: u64,
    port: u16,
    json: PathBuf,
    results_dir: Option<PathBuf>,
    sections: Sections,
    hydration_timeout: Duration,
}

const USAGE: &str = "\
usage: hydration --bench [--size-mib N] [--reps N] [--candidates LIST] [--fio-seconds N]
                 [--port N] [--sections LIST] [--json PATH] [--results-dir DIR]
                 [--hydration-timeout SECONDS]
  --size-mib N        volume size (default 256; env DMCLONE_BENCH_SIZE_MIB)
  --reps N            repetitions of every contender (default 3; DMCLONE_BENCH_REPS)
  --candidates LIST   comma-separated REGION/THRESHOLD/BATCH, e.g. 1M/16/8
                      (default 64K/64/16,256K/32/8,1M/16/8,1M/4/2,4M/4/1,4K/1024/256;
                      DMCLONE_BENCH_CANDIDATES)
  --fio-seconds N     length of each 4 KiB random-read or -write run (default 4; DMCLONE_BENCH_FIO_SECONDS)
  --port N            NVMe/TCP port on 127.0.0.1 (default 14900; DMCLONE_BENCH_PORT)
  --sections LIST     any of hydration,iops,pause,era (default all; DMCLONE_BENCH_SECTIONS)
  --json PATH         JSON result (default /tmp/dmclone-hydration-bench.json, or
                      DIR/hydration.json with --results-dir; DMCLONE_BENCH_JSON)
  --results-dir DIR   also write hydration.json and hydration.txt there (DMCLONE_BENCH_RESULTS)
  --hydration-timeout SECONDS  fail if a clone does not complete in time (default 900)
Without --bench (as under `cargo test --benches`) nothing is measured.";

impl Params {
    fn parse(args: &[String]) -> BenchResult<Self> {
        let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        for (flag, var) in [
            ("size-mib", "DMCLONE_BENCH_SIZE_MIB"),
            ("reps", "DMCLONE_BENCH_REPS"),
            ("candidates", "DMCLONE_BENCH_CANDIDATES"),
            ("fio-seconds", "DMCLONE_BENCH_FIO_SECONDS"),
            ("port", "DMCLONE_BENCH_PORT"),
            ("sections", "DMCLONE_BENCH_SECTIONS"),
            ("json", "DMCLONE_BENCH_JSON"),
            ("results-dir", "DMCLONE_BENCH_RESULTS"),
            ("hydration-timeout", "DMCLONE_BENCH_HYDRATION_TIMEOUT"),
        ] {
            if let Some(value) = env(var) {
                values.insert(flag, value);
            }
        }
        let mut measure = false;
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if arg == "--bench" {
                measure = true;
                continue;
            }
            if arg == "-h" || arg == "--help" {
                return Err(USAGE.into());
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}\n{USAGE}").into());
            };
            let (flag, inline) = match flag.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (flag, None),
            };
            let key = [
                "size-mib",
                "reps",
                "candidates",
                "fio-seconds",
                "port",
                "sections",
                "json",
                "results-dir",
                "hydration-timeout",
            ]
            .into_iter()
            .find(|k| *k == flag)
            .ok_or_else(|| format!("unknown option --{flag}\n{USAGE}"))?;
            let value = match inline {
                Some(value) => value,
                None => iter
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("--{flag} needs a value"))?,
            };
            values.insert(key, value);
        }
        let number = |key: &str, default: u64| -> BenchResult<u64> {
            match values.get(key) {
                Some(text) => text
                    .parse()
                    .map_err(|_| format!("--{key} {text:?} is not a number").into()),
                None => Ok(default),
            }
        };
        let size_mib = number("size-mib", 256)?;
        if !(16..=64 * 1024).contains(&size_mib) || !size_mib.is_multiple_of(4) {
            return Err("--size-mib must be a multiple of 4 from 16 to 65536".into());
        }
        let reps = number("reps", 3)?;
        if !(1..=100).contains(&reps) {
            return Err("--reps must be from 1 to 100".into());
        }
        let candidates = values
            .get("candidates")
            .map_or(DEFAULT_CANDIDATES, String::as_str)
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Knobs::parse)
            .collect::<BenchResult<Vec<_>>>()?;
        if candidates.is_empty() {
            return Err("--candidates is empty".into());
        }
        let fio_seconds = number("fio-seconds", 4)?;
        if !(1..=600).contains(&fio_seconds) {
            return Err("--fio-seconds must be from 1 to 600".into());
        }
        let port = u16::try_from(number("port", 14900)?).map_err(|_| "--port must fit u16")?;
        let mut sections = Sections::ALL;
        if let Some(list) = values.get("sections") {
            sections = Sections::NONE;
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match name {
                    "hydration" => sections.hydration = true,
                    "iops" => sections.iops = true,
                    "pause" => sections.pause = true,
                    "era" => sections.era = true,
                    "all" => sections = Sections::ALL,
                    other => {
                        return Err(format!(
                            "--sections: unknown section {other:?} (hydration, iops, pause, era)"
                        )
                        .into());
                    }
                }
            }
            if sections == Sections::NONE {
                return Err("--sections names no section".into());
            }
        }
        let results_dir = values.get("results-dir").map(PathBuf::from);
        let json = match (values.get("json"), &results_dir) {
            (Some(path), _) => PathBuf::from(path),
            (None, Some(dir)) => dir.join("hydration.json"),
            (None, None) => PathBuf::from("/tmp/dmclone-hydration-bench.json"),
        };
        Ok(Params {
            measure,
            size: size_mib * MIB,
            reps: reps as usize,
            candidates,
            fio_seconds,
            port,
            json,
            results_dir,
            sections,
            hydration_timeout: Duration::from_secs(number("hydration-timeout", 900)?),
        })
    }
}

// ---------------------------------------------------------------------------
// Output: printed and kept for hydration.txt

#[derive(Debug, Default)]
struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }
}

macro_rules! out {
    ($report:expr) => { $report.line("") };
    ($report:expr, $($arg:tt)*) => { $report.line(format!($($arg)*)) };
}

// ---------------------------------------------------------------------------
// Statistics

#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
    n: usize,
}

fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Stats {
        min: sorted[0],
        median,
        max: sorted[n - 1],
        n,
    })
}

fn stats_json(values: &[f64]) -> Value {
    match stats(values) {
        Some(s) => {
            json!({"min": s.min, "median": s.median, "max": s.max, "n": s.n, "samples": values})
        }
        None => Value::Null,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// Block-device helpers

/// Deterministic bytes for `[offset, offset+len)` of the stream `seed`
/// (8-byte aligned offsets).
fn pattern_into(seed: u64, offset: u64, out: &mut [u8]) {
    for (index, word) in (offset / 8..).zip(out.chunks_exact_mut(8)) {
        word.copy_from_slice(&splitmix(seed ^ index).to_le_bytes());
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Writes `buf` over the first `len` bytes of `path`, 1 MiB at a time.
fn overwrite(path: &Path, len: u64, buf: &AlignedBuf) -> BenchResult<()> {
    let mut file = open_direct(path, true)?;
    let chunk = buf.as_slice().len() as u64;
    let mut done = 0;
    while done < len {
        let want = chunk.min(len - done) as usize;
        file.write_all(&buf.as_slice()[..want])
            .map_err(|err| format!("write {}: {err}", path.display()))?;
        done += want as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// sha256 of the first `len` bytes, read with O_DIRECT so no page cache can
/// hide what is on the device.
fn sha256_of(path: &Path, len: u64) -> BenchResult<String> {
    let mut file = open_direct(path, false)?;
    let mut hasher = Sha256::new();
    let mut buf = AlignedBuf::new(MIB as usize);
    let mut left = len;
    while left > 0 {
        let want = left.min(MIB) as usize;
        file.read_exact(&mut buf.as_mut_slice()[..want])
            .map_err(|err| format!("read {}: {err}", path.display()))?;
        hasher.update(&buf.as_slice()[..want]);
        left -= want as u64;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn dev_of(path: &Path) -> BenchResult<DevRef> {
    let meta = fs::metadata(path).map_err(|err| format!("stat {}: {err}", path.display()))?;
    if !meta.file_type().is_block_device() {
        return Err(format!("{} is not a block device", path.display()).into());
    }
    let rdev = meta.rdev();
    Ok(DevRef::from((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    )))
}

/// Fills `[offset, offset + chunk.len())` of a new backing file.
type Fill = dyn Fn(u64, &mut [u8]);

/// A file on tmpfs behind a loop device (buffered: tmpfs has no O_DIRECT).
struct LoopFile {
    device: LoopDevice,
    path: PathBuf,
    dev: DevRef,
}

impl LoopFile {
    /// Creates `name` in `dir` with `len` bytes, filled by `fill` (written to
    /// the file itself, so the loop device's page cache holds no second copy).
    fn create(dir: &Path, name: &str, len: u64, fill: Option<&Fill>) -> BenchResult<Self> {
        let backing = dir.join(name);
        let mut file = File::create(&backing)?;
        file.set_len(len)?;
        if let Some(fill) = fill {
            let mut chunk = vec![0u8; MIB as usize];
            let mut offset = 0;
            while offset < len {
                let want = MIB.min(len - offset) as usize;
                fill(offset, &mut chunk[..want]);
                file.write_all(&chunk[..want])?;
                offset += want as u64;
            }
        }
        file.sync_all()?;
        drop(file);
        let mut last_err = None;
        for _ in 0..20 {
            let device = LoopControl::open()?.next_free()?;
            match device.with().autoclear(true).attach(&backing) {
                Ok(()) => {
                    let path = device.path().ok_or("loop device without a path")?;
                    let dev = dev_of(&path)?;
                    return Ok(Self { device, path, dev });
                }
                Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => {
                    last_err = Some(err);
                    thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(format!("attach {}: {err}", backing.display()).into()),
            }
        }
        Err(format!("no free loop device: {last_err:?}").into())
    }
}

impl Drop for LoopFile {
    fn drop(&mut self) {
        // autoclear detaches at the last close; this covers a device nobody opened.
        let _ = self.device.detach();
    }
}

/// Samples the write-sector counter of a block device and remembers when it
/// last moved: the end of the copy as the destination saw it.
struct WriteWatcher {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Option<Instant>>>,
}

impl WriteWatcher {
    fn start(dev: DevRef) -> BenchResult<Self> {
        let path = PathBuf::from(format!("/sys/dev/block/{}:{}/stat", dev.major, dev.minor));
        let first = sectors_written(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("write-watcher".into())
            .spawn(move || {
                let mut last = first;
                let mut moved = None;
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(WRITE_SAMPLE);
                    if let Ok(now) = sectors_written(&path)
                        && now != last
                    {
                        last = now;
                        moved = Some(Instant::now());
                    }
                }
                moved
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// When the counter last moved, if it did.
    fn finish(mut self) -> Option<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take()?.join().ok().flatten()
    }
}

impl Drop for WriteWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Field 7 of `/sys/block/<dev>/stat`: sectors written.
fn sectors_written(path: &Path) -> BenchResult<u64> {
    let text = fs::read_to_string(path).map_err(|err| format!("read {}: {err}", path.display()))?;
    text.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("{}: unexpected content {text:?}", path.display()).into())
}

// ---------------------------------------------------------------------------
// dd and fio: the contenders and probes that are processes

const SEQ_READ: FioJob = FioJob {
    rw: "read",
    block_bytes: MIB,
    seconds: None,
};
const SEQ_WRITE: FioJob = FioJob {
    rw: "write",
    block_bytes: MIB,
    seconds: None,
};

/// 4 KiB at random offsets (`randread` or `randwrite`) for `seconds`.
fn random_4k(rw: &'static str, seconds: u64) -> FioJob {
    FioJob {
        rw,
        block_bytes: 4 * KIB,
        seconds: Some(seconds),
    }
}

fn dd_copy(from: &Path, to: &Path, size: u64) -> BenchResult<()> {
    run_tool(
        "dd",
        &[
            format!("if={}", from.display()),
            format!("of={}", to.display()),
            "bs=1M".into(),
            format!("count={}", size / MIB),
            "iflag=direct".into(),
            "oflag=direct".into(),
            "status=none".into(),
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The rig: source, NVMe/TCP, thin pool and destination

struct Rig {
    dm: DeviceMapper,
    events: EventMonitor,
    nvme_target: NvmeTarget,
    nvme_host: Host,
    subsystem: Nqn,
    controller: Controller,
    namespace: NamespaceDevice,
    size: u64,
    dest: DeviceName,
    dest_dev: DevRef,
    pool_dev: DevRef,
    /// dm-era's metadata for the finalized public device, as the agent
    /// stacks a tracked volume: a thin device of the pool, formatted once.
    local_meta: DevRef,
    public: DeviceName,
    clone_meta: LoopFile,
    source: LoopFile,
    source_sha: String,
    stale: AlignedBuf,
    zeros: AlignedBuf,
    event_retries: u32,
    hydration_timeout: Duration,
    // Dropped last: the loop devices' backing files.
    _pool_meta: LoopFile,
    _pool_data: LoopFile,
    _dir: TempDir,
}

/// The public device of a finalized, tracked volume, as the agent maps it:
/// dm-era over the destination thin device.
fn local_table(size: u64, metadata: DevRef, destination: DevRef) -> BenchResult<Table> {
    Ok(Table::single(
        size / SECTOR,
        DmTarget::Era(Era {
            metadata,
            origin: destination,
            block_sectors: ERA_BLOCK_BYTES / SECTOR,
        }),
    )?)
}

/// A new thin device of the pool for dm-era's metadata, sized as the agent
/// sizes it (a fresh thin device reads as zeros, so dm-era formats it).
async fn era_metadata_device(
    dm: &DeviceMapper,
    pool_dev: DevRef,
    thin_id: u32,
    role: &str,
) -> BenchResult<DevRef> {
    dm.message(&dm_name("pool")?, 0, &format!("create_thin {thin_id}"))
        .await?;
    let bytes = dmclone::changes::era_metadata_bytes(
        dmclone::config::DEFAULT_MAX_VOLUME_SIZE,
        ERA_BLOCK_BYTES,
    );
    let table = Table::single(
        bytes / SECTOR,
        DmTarget::Thin(Thin {
            pool: pool_dev,
            device_id: thin_id,
            external_origin: None,
        }),
    )?;
    Ok(dm.create(&dm_name(role)?, None, &table).await?.device)
}

fn dm_name(role: &str) -> BenchResult<DeviceName> {
    Ok(DeviceName::new(&format!("{PREFIX}-{role}"))?)
}

fn nqn(name: &str) -> BenchResult<Nqn> {
    Ok(Nqn::parse("bench", &format!("{NQN_BASE}:{name}"))?)
}

/// Removes every device with the bench's prefix, each once nothing holds it
/// open (stacked devices go first).
async fn remove_bench_devices(dm: &DeviceMapper) -> BenchResult<()> {
    common::remove_devices_with_prefix(dm, PREFIX).await
}

/// Fails loudly, with what to do, when this kernel cannot run the bench.
async fn preflight() -> BenchResult<(DeviceMapper, NvmeTarget, Host, String)> {
    let dm = DeviceMapper::open().map_err(|err| {
        format!(
            "no device-mapper here ({err}). Run the bench with benches/run, which boots a guest \
             kernel, or benches/run --host on a host with dm-clone, dm-thin-pool and NVMe/TCP"
        )
    })?;
    let loaded: Vec<String> = dm
        .target_versions()
        .await?
        .into_iter()
        .map(|t| format!("{} {}.{}.{}", t.name, t.version.0, t.version.1, t.version.2))
        .collect();
    // era: every rig finalizes onto dm-era, as the agent does.
    let needed = ["clone", "thin-pool", "thin", "linear", "era"];
    for needed in &needed {
        if !loaded.iter().any(|t| t.split(' ').next() == Some(needed)) {
            return Err(format!(
                "the kernel has no {needed} target (loaded: {}); modprobe dm_clone dm_thin_pool dm_era",
                loaded.join(", ")
            )
            .into());
        }
    }
    let nvme_target = NvmeTarget::open().map_err(|err| format!("NVMe target: {err}"))?;
    let nvme_host = Host::open().map_err(|err| format!("NVMe/TCP host: {err}"))?;
    run_tool("fio", &["--version".into()]).map_err(|err| format!("fio is needed: {err}"))?;
    run_tool("dd", &["--version".into()]).map_err(|err| format!("dd is needed: {err}"))?;
    let targets = loaded
        .iter()
        .filter(|t| needed.contains(&t.split(' ').next().unwrap_or("")))
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    Ok((dm, nvme_target, nvme_host, targets))
}

impl Rig {
    async fn build(
        params: &Params,
        dm: DeviceMapper,
        nvme_target: NvmeTarget,
        nvme_host: Host,
    ) -> BenchResult<Self> {
        let size = params.size;
        let subsystem = nqn("source")?;
        let host_nqn = nqn("host")?;
        let volume = VolumeId::parse(VOLUME)?;

        // Leftovers of an interrupted run on an opted-in host.
        remove_bench_devices(&dm).await?;
        if let Some(controller) = nvme_host.find_connection(&subsystem).await? {
            nvme_host.disconnect(&controller).await?;
        }
        nvme_target.unexport(&subsystem).await?;

        let dir = tempfile::Builder::new()
            .prefix("dmclone-hydration-bench.")
            .tempdir_in(std::env::temp_dir())?;
        let source = LoopFile::create(
            dir.path(),
            "source.img",
            size,
            Some(&|offset, chunk: &mut [u8]| pattern_into(PATTERN_SEED, offset, chunk)),
        )?;
        let pool_meta = LoopFile::create(dir.path(), "pool-meta.img", POOL_META_BYTES, None)?;
        // Room for the whole volume, dm-era's metadata (section 5) and the
        // pool's rounding; sparse on tmpfs, so unused room costs nothing.
        let pool_data_bytes = size + 128 * MIB;
        let pool_data = LoopFile::create(dir.path(), "pool-data.img", pool_data_bytes, None)?;
        let clone_meta = LoopFile::create(dir.path(), "clone-meta.img", CLONE_META_BYTES, None)?;

        let pool = dm_name("pool")?;
        let pool_table = Table::single(
            pool_data_bytes / SECTOR,
            DmTarget::ThinPool(ThinPool {
                metadata: pool_meta.dev,
                data: pool_data.dev,
                data_block_sectors: POOL_BLOCK_SECTORS,
                low_water_blocks: 0,
                features: Default::default(),
            }),
        )?;
        let pool_dev = dm.create(&pool, None, &pool_table).await?.device;
        dm.message(&pool, 0, "create_thin 1").await?;
        let dest = dm_name("dest")?;
        let dest_table = Table::single(
            size / SECTOR,
            DmTarget::Thin(Thin {
                pool: pool_dev,
                device_id: 1,
                external_origin: None,
            }),
        )?;
        let dest_dev = dm.create(&dest, None, &dest_table).await?.device;
        let local_meta =
            era_metadata_device(&dm, pool_dev, LOCAL_ERA_META_THIN_ID, "local-meta").await?;
        // Formatted now, as the agent formats an arriving volume's at start.
        let probe = dm_name("era-probe")?;
        dm.create(&probe, None, &local_table(size, local_meta, dest_dev)?)
            .await?;
        dm.remove(&probe).await?;

        let port = PortSpec {
            id: PORT_ID,
            address: TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), params.port),
        };
        nvme_target
            .export(&ExportRequest {
                subsystem_nqn: subsystem.clone(),
                device_path: source.path.clone(),
                namespace: namespace_ids(&volume),
                host_nqn: host_nqn.clone(),
                port,
            })
            .await?;
        let connection = nvme_host
            .connect(&ConnectRequest {
                options: ConnectOptions {
                    address: port.address,
                    subsystem_nqn: subsystem.clone(),
                    host_nqn,
                    host_id: HostId::parse(HOST_ID)?,
                    timeouts: ConnectTimeouts::default(),
                },
                expected_namespace: Some(namespace_ids(&volume)),
                namespace_timeout: Duration::from_secs(60),
            })
            .await?;
        if connection.namespace.size_bytes != size {
            return Err(format!(
                "the namespace has {} bytes, the source {size}",
                connection.namespace.size_bytes
            )
            .into());
        }

        let mut stale = AlignedBuf::new(MIB as usize);
        pattern_into(STALE_SEED, 0, stale.as_mut_slice());
        let zeros = AlignedBuf::new(MIB as usize);
        let events = EventMonitor::start()?;
        let mut rig = Rig {
            dm,
            events,
            nvme_target,
            nvme_host,
            subsystem,
            controller: connection.controller,
            namespace: connection.namespace,
            size,
            dest_dev,
            pool_dev,
            local_meta,
            public: dm_name("public")?,
            dest,
            clone_meta,
            source_sha: String::new(),
            source,
            stale,
            zeros,
            event_retries: 0,
            hydration_timeout: params.hydration_timeout,
            _pool_meta: pool_meta,
            _pool_data: pool_data,
            _dir: dir,
        };
        // Pre-fill: every block of the destination is allocated now, once.
        let step = Instant::now();
        rig.stale_dest()?;
        let prefill = step.elapsed();
        let step = Instant::now();
        rig.source_sha = sha256_of(&rig.source.path, size)?;
        let hashing = step.elapsed();
        // Warm the NVMe/TCP path once (untimed).
        fio(&rig.namespace.path, SEQ_READ, size)?;
        eprintln!(
            "[bench] ready: destination pre-filled in {:.1} s, source sha256 {} in {:.1} s",
            prefill.as_secs_f64(),
            &rig.source_sha[..16],
            hashing.as_secs_f64()
        );
        Ok(rig)
    }

    fn dest_path(&self) -> PathBuf {
        self.dest.mapper_path()
    }

    /// Overwrites the whole destination with bytes that differ from the
    /// source, so a verified copy proves itself; nothing allocates (every
    /// block was written at setup).
    fn stale_dest(&self) -> BenchResult<()> {
        overwrite(&self.dest_path(), self.size, &self.stale)
    }

    fn zero_clone_meta(&self) -> BenchResult<()> {
        overwrite(&self.clone_meta.path, CLONE_META_BYTES, &self.zeros)
    }

    fn verify_dest(&self) -> BenchResult<bool> {
        Ok(sha256_of(&self.dest_path(), self.size)? == self.source_sha)
    }

    fn clone_table(&self, knobs: &Knobs) -> BenchResult<Table> {
        Ok(Table::single(
            self.size / SECTOR,
            DmTarget::Clone(CloneParams {
                metadata: self.clone_meta.dev,
                destination: self.dest_dev,
                source: self.namespace.device,
                region_sectors: knobs.region_bytes / SECTOR,
                hydration: true,
                discard_passdown: true,
                hydration_threshold: knobs.threshold,
                hydration_batch_size: knobs.batch,
            }),
        )?)
    }

    fn linear_table(&self) -> BenchResult<Table> {
        Ok(Table::single(
            self.size / SECTOR,
            DmTarget::Linear(Linear {
                device: self.dest_dev,
                offset: 0,
            }),
        )?)
    }

    /// Fresh metadata, then the clone is created with hydration on; the clock
    /// starts just before the create call. With `stale`, the destination is
    /// overwritten with bytes unlike the source first (for a verified run:
    /// a clone with fresh metadata copies every region whatever the
    /// destination holds, so other runs skip it). With `watch`, the
    /// destination's writes are sampled from just before the create.
    async fn start_clone(&self, knobs: &Knobs, stale: bool, watch: bool) -> BenchResult<Started> {
        self.zero_clone_meta()?;
        if stale {
            self.stale_dest()?;
        }
        let table = self.clone_table(knobs)?;
        let watcher = if watch {
            Some(WriteWatcher::start(self.dest_dev)?)
        } else {
            None
        };
        let at = Instant::now();
        let state = self.dm.create(&self.public, None, &table).await?;
        Ok(Started {
            at,
            seen: state.event_nr,
            watcher,
        })
    }

    async fn clone_status(&self) -> BenchResult<CloneStatus> {
        match self
            .dm
            .status_of::<Health<CloneStatus>>(&self.public, 0)
            .await?
        {
            Health::Running(status) => Ok(status),
            other => Err(format!("the clone reports {other}").into()),
        }
    }

    /// Waits for the clone's completion event (after one status read: a clone
    /// complete before the wait starts raises nothing we could still see).
    async fn wait_hydrated(&mut self, seen: u32) -> BenchResult<Completion> {
        let status = self.clone_status().await?;
        if status.is_fully_hydrated() {
            return Ok(Completion {
                received: Instant::now(),
                status,
                via_event: false,
                other_events: 0,
            });
        }
        let deadline = Instant::now() + self.hydration_timeout;
        let mut seen = seen;
        let mut other_events = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = tokio::time::timeout(left, self.events.wait_for_event(&self.public, seen))
                .await
                .map_err(|_| {
                    format!(
                        "no completion event from {} within {:?}",
                        self.public, self.hydration_timeout
                    )
                })?;
            let received = Instant::now();
            match waited {
                Ok(counter) => {
                    let status = self.clone_status().await?;
                    if status.is_fully_hydrated() {
                        return Ok(Completion {
                            received,
                            status,
                            via_event: true,
                            other_events,
                        });
                    }
                    if status.mode != CloneMode::ReadWrite {
                        return Err(format!("the clone's metadata went {:?}", status.mode).into());
                    }
                    other_events += 1;
                    seen = counter;
                }
                // The monitor has not listed the just-created device yet.
                Err(DmError::NoSuchDevice { .. })
                    if self.dm.info(&self.public).await?.is_some() =>
                {
                    self.event_retries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The agent's finalize: the local table (dm-era over the destination)
    /// loaded beside the live clone, then suspend with flush, status check
    /// while suspended, resume (which swaps the tables); an incomplete clone
    /// gets its loaded table dropped and resumes unchanged.
    async fn finalize(&self) -> BenchResult<Swap> {
        let local = local_table(self.size, self.local_meta, self.dest_dev)?;
        let preload_started = Instant::now();
        self.dm.load(&self.public, &local).await?;
        let preload = preload_started.elapsed();
        let started = Instant::now();
        self.dm.suspend(&self.public, Flush::Flush).await?;
        let suspended = Instant::now();
        let complete = self.clone_complete().await;
        let checked = Instant::now();
        if !complete {
            self.dm.clear_inactive(&self.public).await?;
            self.dm.resume(&self.public).await?;
            return Err("the clone was not complete when suspended for the swap".into());
        }
        self.dm.resume(&self.public).await?;
        let resumed = Instant::now();
        self.check_local().await?;
        Ok(Swap {
            started,
            resumed,
            preload: Some(preload),
            suspend: suspended - started,
            status: checked - suspended,
            load: None,
            resume: resumed - checked,
        })
    }

    /// Section 3's variant, the agent's order before dm-era joined the
    /// stack: suspend with flush, status check, load the local table (dm-era
    /// opens its metadata inside the pause), resume.
    async fn finalize_loading_in_pause(&self) -> BenchResult<Swap> {
        let local = local_table(self.size, self.local_meta, self.dest_dev)?;
        let started = Instant::now();
        self.dm.suspend(&self.public, Flush::Flush).await?;
        let suspended = Instant::now();
        let complete = self.clone_complete().await;
        let checked = Instant::now();
        if !complete {
            self.dm.resume(&self.public).await?;
            return Err("the clone was not complete when suspended for the swap".into());
        }
        let loaded = self.dm.load(&self.public, &local).await;
        let load_done = Instant::now();
        self.dm.resume(&self.public).await?;
        let resumed = Instant::now();
        loaded?;
        self.check_local().await?;
        Ok(Swap {
            started,
            resumed,
            preload: None,
            suspend: suspended - started,
            status: checked - suspended,
            load: Some(load_done - checked),
            resume: resumed - load_done,
        })
    }

    async fn clone_complete(&self) -> bool {
        matches!(
            self.dm.status_of::<Health<CloneStatus>>(&self.public, 0).await,
            Ok(Health::Running(s)) if s.is_fully_hydrated() && s.mode == CloneMode::ReadWrite
        )
    }

    async fn check_local(&self) -> BenchResult<()> {
        let live = self.dm.table(&self.public).await?;
        if live.segments()[0].target.type_name() != "era" {
            return Err(format!("after the swap the public table is {live}").into());
        }
        Ok(())
    }

    async fn teardown(&self) -> BenchResult<()> {
        remove_bench_devices(&self.dm).await?;
        self.nvme_host.disconnect(&self.controller).await?;
        self.nvme_target.unexport(&self.subsystem).await?;
        Ok(())
    }
}

struct Started {
    at: Instant,
    seen: u32,
    watcher: Option<WriteWatcher>,
}

#[derive(Debug)]
struct Completion {
    received: Instant,
    status: CloneStatus,
    via_event: bool,
    other_events: u32,
}

#[derive(Debug, Clone, Copy)]
struct Swap {
    /// The suspend call.
    started: Instant,
    resumed: Instant,
    /// A load before the suspend, outside the pause window.
    preload: Option<Duration>,
    suspend: Duration,
    status: Duration,
    /// A load inside the pause window.
    load: Option<Duration>,
    resume: Duration,
}

impl Swap {
    fn total(&self) -> Duration {
        self.resumed - self.started
    }

    fn json(&self) -> Value {
        json!({
            "total_ms": ms(self.total()),
            "preload_ms": self.preload.map(ms),
            "suspend_ms": ms(self.suspend),
            "status_ms": ms(self.status),
            "load_ms": self.load.map(ms),
            "resume_ms": ms(self.resume),
        })
    }
}

// ---------------------------------------------------------------------------
// Section 1: hydration throughput

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Physical,
    Baseline,
    KernelDefaults,
    Candidate,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    FioRead,
    FioWrite,
    Dd,
    Clone(Knobs),
}

#[derive(Debug, Clone)]
struct CloneRun {
    /// Last sampled destination write → completion event received.
    commit_lag: Option<Duration>,
    /// Completion event received → resume of the swap returned.
    done_to_final: Duration,
    /// Last sampled destination write → resume returned.
    copied_to_final: Option<Duration>,
    swap: Swap,
    via_event: bool,
    other_events: u32,
    status: CloneStatus,
}

#[derive(Debug, Clone)]
struct Sample {
    /// Start -> end as the contender defines it (dd and fio: the process;
    /// clone: creation -> completion event received).
    secs: f64,
    mbps: f64,
    /// Start -> last write to the destination, as sampled (dd and clones).
    copy_secs: Option<f64>,
    clone: Option<CloneRun>,
}

#[derive(Debug)]
struct Contender {
    label: String,
    kind: Kind,
    role: Role,
    samples: Vec<Sample>,
    verified: Option<bool>,
}

impl Contender {
    fn new(label: impl Into<String>, kind: Kind, role: Role) -> Self {
        Self {
            label: label.into(),
            kind,
            role,
            samples: Vec::new(),
            verified: None,
        }
    }

    fn mbps(&self) -> Option<Stats> {
        stats(&self.samples.iter().map(|s| s.mbps).collect::<Vec<_>>())
    }

    fn clone_runs(&self) -> impl Iterator<Item = &CloneRun> {
        self.samples.iter().filter_map(|s| s.clone.as_ref())
    }

    fn metric_values(&self, metric: Metric, size: u64) -> Vec<f64> {
        match metric {
            Metric::Event => self.samples.iter().map(|s| s.mbps).collect(),
            Metric::Copy => self
                .samples
                .iter()
                .filter_map(|s| s.copy_secs)
                .map(|secs| size as f64 / secs / MB)
                .collect(),
        }
    }

    fn metric(&self, metric: Metric, size: u64) -> Option<Stats> {
        stats(&self.metric_values(metric, size))
    }

    fn commit_lag_ms(&self) -> Option<Stats> {
        stats(
            &self
                .clone_runs()
                .filter_map(|c| c.commit_lag.map(ms))
                .collect::<Vec<_>>(),
        )
    }

    fn done_to_final_ms(&self) -> Option<Stats> {
        stats(
            &self
                .clone_runs()
                .map(|c| ms(c.done_to_final))
                .collect::<Vec<_>>(),
        )
    }

    fn knobs(&self) -> Option<Knobs> {
        match self.kind {
            Kind::Clone(knobs) => Some(knobs),
            _ => None,
        }
    }
}

async fn run_contender(rig: &mut Rig, contender: &Contender, verify: bool) -> BenchResult<Sample> {
    let size = rig.size;
    let throughput = |secs: f64| size as f64 / secs / MB;
    match contender.kind {
        Kind::FioRead => {
            let (bw, _) = fio(&rig.namespace.path, SEQ_READ, size)?;
            Ok(Sample {
                secs: size as f64 / bw,
                mbps: bw / MB,
                copy_secs: Some(size as f64 / bw),
                clone: None,
            })
        }
        Kind::FioWrite => {
            let (bw, _) = fio(&rig.dest_path(), SEQ_WRITE, size)?;
            Ok(Sample {
                secs: size as f64 / bw,
                mbps: bw / MB,
                copy_secs: Some(size as f64 / bw),
                clone: None,
            })
        }
        Kind::Dd => {
            if verify {
                rig.stale_dest()?;
            }
            let watcher = WriteWatcher::start(rig.dest_dev)?;
            let started = Instant::now();
            dd_copy(&rig.namespace.path, &rig.dest_path(), size)?;
            let secs = started.elapsed().as_secs_f64();
            let last_write = watcher.finish();
            Ok(Sample {
                secs,
                mbps: throughput(secs),
                copy_secs: last_write.map(|at| (at - started).as_secs_f64()),
                clone: None,
            })
        }
        Kind::Clone(knobs) => {
            let started = rig.start_clone(&knobs, verify, true).await?;
            let completion = rig.wait_hydrated(started.seen).await?;
            let last_write = started.watcher.and_then(WriteWatcher::finish);
            let secs = (completion.received - started.at).as_secs_f64();
            let status = &completion.status;
            if status.hydration_threshold != knobs.threshold()
                || status.hydration_batch_size != knobs.batch()
                || status.region_sectors * SECTOR != knobs.region_bytes
            {
                return Err(format!(
                    "{}: the clone reports region {} sectors, threshold {}, batch {}",
                    contender.label,
                    status.region_sectors,
                    status.hydration_threshold,
                    status.hydration_batch_size
                )
                .into());
            }
            let swap = rig.finalize().await?;
            let run = CloneRun {
                commit_lag: last_write.map(|at| completion.received.saturating_duration_since(at)),
                done_to_final: swap.resumed - completion.received,
                copied_to_final: last_write.map(|at| swap.resumed - at),
                swap,
                via_event: completion.via_event,
                other_events: completion.other_events,
                status: completion.status,
            };
            Ok(Sample {
                secs,
                mbps: throughput(secs),
                copy_secs: last_write.map(|at| (at - started.at).as_secs_f64()),
                clone: Some(run),
            })
        }
    }
}

/// Verifies the destination and removes the public device of a clone run.
async fn after_run(rig: &Rig, contender: &mut Contender, verify: bool) -> BenchResult<()> {
    if verify && !matches!(contender.kind, Kind::FioRead | Kind::FioWrite) {
        contender.verified = Some(rig.verify_dest()?);
    }
    if rig.dm.info(&rig.public).await?.is_some() {
        rig.dm.remove(&rig.public).await?;
    }
    Ok(())
}

struct HydrationResult {
    contenders: Vec<Contender>,
    winner: Option<usize>,
    json: Value,
}

async fn section_hydration(
    rig: &mut Rig,
    params: &Params,
    report: &mut Report,
) -> BenchResult<HydrationResult> {
    let mut contenders = vec![
        Contender::new("fio read namespace 1M qd32", Kind::FioRead, Role::Physical),
        Contender::new("fio write dest 1M qd32", Kind::FioWrite, Role::Physical),
        Contender::new("dd bs=1M direct (baseline)", Kind::Dd, Role::Baseline),
        Contender::new(
            "clone 4K/1/1 kernel defaults",
            Kind::Clone(Knobs::KERNEL_DEFAULTS),
            Role::KernelDefaults,
        ),
    ];
    for knobs in &params.candidates {
        contenders.push(Contender::new(
            format!("clone {}", knobs.label()),
            Kind::Clone(*knobs),
            Role::Candidate,
        ));
    }
    let n = contenders.len();
    for round in 0..params.reps {
        for k in 0..n {
            let index = (k + round) % n;
            let verify = contenders[index].verified.is_none();
            let sample = run_contender(rig, &contenders[index], verify).await?;
            after_run(rig, &mut contenders[index], verify).await?;
            let contender = &mut contenders[index];
            let copy = sample.copy_secs.map_or(String::new(), |s| {
                format!(", copy phase {:.1} MB/s", rig.size as f64 / s / MB)
            });
            let detail = match &sample.clone {
                Some(c) => format!(
                    ", event {}, done→finalized {:.1} ms",
                    if c.via_event {
                        "received"
                    } else {
                        "none: complete at first status"
                    },
                    ms(c.done_to_final)
                ),
                None => String::new(),
            };
            eprintln!(
                "[bench] round {}/{} {:<32} {:8.1} MB/s ({:.2} s){copy}{detail}{}",
                round + 1,
                params.reps,
                contender.label,
                sample.mbps,
                sample.secs,
                match (verify, contender.verified) {
                    (true, Some(true)) => ", sha256 ok",
                    (true, Some(false)) => ", SHA256 MISMATCH",
                    _ => "",
                }
            );
            contender.samples.push(sample);
        }
    }

    let size = rig.size;
    let median_of = |role: Role, metric: Metric| {
        contenders
            .iter()
            .find(|c| c.role == role)
            .and_then(|c| c.metric(metric, size))
            .map(|s| s.median)
    };
    let physical = contenders
        .iter()
        .filter(|c| c.role == Role::Physical)
        .filter_map(|c| c.mbps().map(|s| s.median))
        .reduce(f64::min);
    let bases = |metric: Metric| Bases {
        dd: median_of(Role::Baseline, metric),
        kdef: median_of(Role::KernelDefaults, metric),
        physical,
    };
    let (event_bases, copy_bases) = (bases(Metric::Event), bases(Metric::Copy));
    let fmt_ratio = |r: Option<f64>| r.map_or("     -".to_owned(), |r| format!("{r:6.2}"));
    let fmt_opt = |v: Option<f64>, width: usize, prec: usize| {
        v.map_or(format!("{:>width$}", "-"), |v| format!("{v:>width$.prec$}"))
    };

    out!(report);
    out!(
        report,
        "1. Hydration throughput: {} MiB over NVMe/TCP loopback into a pre-filled thin device ({} runs per contender,",
        size / MIB,
        params.reps
    );
    out!(
        report,
        "   round-robin, order rotated each round; MB/s = 10^6 B/s over the whole volume)"
    );
    out!(
        report,
        "   to event: clone creation -> completion event received (dd: process start -> exit; fio: its own rate)"
    );
    out!(
        report,
        "   copy:     start -> last write to the destination, sampled every {} ms from /sys/dev/block/<dest>/stat",
        WRITE_SAMPLE.as_millis()
    );
    out!(
        report,
        "   lag:      that last write -> completion event (dm-clone commits, and signals, on a 1 s tick)"
    );
    out!(
        report,
        "   ratios:   medians against dd, the kernel defaults and the physical limit, for each metric"
    );
    out!(
        report,
        "{:<29}|{:^23}|{:^23}|{:>6} |{:^19}|{:^19}|{:>8} |{:>7}",
        "",
        "to event MB/s",
        "copy MB/s",
        "lag",
        "to-event ratios",
        "copy ratios",
        "done→fin",
        ""
    );
    out!(
        report,
        "{:<29}|{:>7}{:>8}{:>7} |{:>7}{:>8}{:>7} |{:>6} | {:>6}{:>6}{:>6}| {:>6}{:>6}{:>6}|{:>8} |{:>7}",
        "contender",
        "min",
        "median",
        "max",
        "min",
        "median",
        "max",
        "ms",
        "×dd",
        "×kdef",
        "×phys",
        "×dd",
        "×kdef",
        "×phys",
        "ms",
        "sha256"
    );
    for c in &contenders {
        let Some(e) = c.mbps() else { continue };
        let copy = c.metric(Metric::Copy, size);
        let verified = match c.verified {
            Some(true) => "ok",
            Some(false) => "DIFFERS",
            None => "-",
        };
        let ratios = |bases: &Bases, value: Option<f64>| {
            let [a, b, p] = bases.ratios(value);
            format!("{}{}{}", fmt_ratio(a), fmt_ratio(b), fmt_ratio(p))
        };
        out!(
            report,
            "{:<29}|{:7.1}{:8.1}{:7.1} |{}{}{} |{} | {}| {}|{} |{:>7}",
            c.label,
            e.min,
            e.median,
            e.max,
            fmt_opt(copy.map(|s| s.min), 7, 1),
            fmt_opt(copy.map(|s| s.median), 8, 1),
            fmt_opt(copy.map(|s| s.max), 7, 1),
            fmt_opt(c.commit_lag_ms().map(|s| s.median), 6, 0),
            ratios(&event_bases, Some(e.median)),
            ratios(&copy_bases, copy.map(|s| s.median)),
            fmt_opt(c.done_to_final_ms().map(|s| s.median), 8, 1),
            verified
        );
    }
    if let Some(physical) = physical {
        out!(
            report,
            "physical limit = min(fio read of the namespace, fio write of the destination) = {physical:.1} MB/s"
        );
    }
    let clone_runs: Vec<&CloneRun> = contenders.iter().flat_map(Contender::clone_runs).collect();
    let no_event = clone_runs.iter().filter(|c| !c.via_event).count();
    let other_events: u32 = clone_runs.iter().map(|c| c.other_events).sum();
    out!(
        report,
        "completion: {} of {} clone runs ended on the clone's completion event; {no_event} were complete at the first status read; {other_events} other events",
        clone_runs.len() - no_event,
        clone_runs.len()
    );
    let event_secs: Vec<String> = contenders
        .iter()
        .filter(|c| c.role == Role::Candidate)
        .flat_map(|c| c.samples.iter().map(|s| format!("{:.2}", s.secs)))
        .collect();
    out!(
        report,
        "candidate times to the event (s): {} (the event lands on the clone's 1 s commit tick, so these cluster one second apart)",
        event_secs.join(" ")
    );

    // The winner among the candidates, ranked by the copy phase: the event
    // adds the kernel's commit tick (0..2 s, independent of the knobs), which
    // at this size is a third of the time and decides the ranking by chance.
    let rank = |metric: Metric| {
        let mut ranked: Vec<usize> = (0..n)
            .filter(|&i| {
                contenders[i].role == Role::Candidate
                    && contenders[i].verified != Some(false)
                    && contenders[i].metric(metric, size).is_some()
            })
            .collect();
        let m = |i: usize| contenders[i].metric(metric, size).map_or(0.0, |s| s.median);
        ranked.sort_by(|&a, &b| m(b).total_cmp(&m(a)));
        ranked
    };
    let ranked = rank(Metric::Copy);
    let by_event = rank(Metric::Event);
    // A check against load that drifts between rounds: each candidate's copy
    // rate over the median candidate of the same round, median over rounds.
    let mut relative: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for round in 0..params.reps {
        let rates: Vec<(usize, f64)> = ranked
            .iter()
            .filter_map(|&i| {
                let secs = contenders[i].samples.get(round)?.copy_secs?;
                Some((i, size as f64 / secs / MB))
            })
            .collect();
        let Some(mid) = stats(&rates.iter().map(|(_, r)| *r).collect::<Vec<_>>()) else {
            continue;
        };
        for (i, rate) in rates {
            relative.entry(i).or_default().push(rate / mid.median);
        }
    }
    let mut by_round: Vec<(usize, f64)> = relative
        .iter()
        .filter_map(|(&i, v)| Some((i, stats(v)?.median)))
        .collect();
    by_round.sort_by(|a, b| b.1.total_cmp(&a.1));
    let winner = ranked.first().copied();
    let mut defaults_json = Value::Null;
    let mut winner_json = Value::Null;
    if let Some(w) = winner {
        let c = &contenders[w];
        let copy = c
            .metric(Metric::Copy, size)
            .ok_or("winner without samples")?;
        let event = c.mbps().ok_or("winner without samples")?;
        let knobs = c.knobs().ok_or("winner is not a clone")?;
        let [cd, ck, cp] = copy_bases.ratios(Some(copy.median));
        let [ed, ek, ep] = event_bases.ratios(Some(event.median));
        let r = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        out!(report);
        out!(
            report,
            "WINNER: region {} hydration_threshold {} hydration_batch_size {} ({}), ranked by copy phase:",
            size_label(knobs.region_bytes),
            knobs.threshold(),
            knobs.batch(),
            knobs.label()
        );
        out!(
            report,
            "  copy phase median {:.1} MB/s (min {:.1}, max {:.1}) = {}× dd, {}× kernel defaults, {}× physical limit",
            copy.median,
            copy.min,
            copy.max,
            r(cd),
            r(ck),
            r(cp)
        );
        out!(
            report,
            "  to the completion event median {:.1} MB/s (min {:.1}, max {:.1}) = {}× dd, {}× kernel defaults, {}× physical limit",
            event.median,
            event.min,
            event.max,
            r(ed),
            r(ek),
            r(ep)
        );
        if let Some(&second) = ranked.get(1) {
            let other = &contenders[second];
            if let Some(os) = other.metric(Metric::Copy, size) {
                let noise = if os.n < 3 || copy.n < 3 {
                    "; too few runs to judge run-to-run noise"
                } else if os.max >= copy.min {
                    "; its range overlaps the winner's: within run-to-run noise"
                } else {
                    "; the ranges do not overlap"
                };
                out!(
                    report,
                    "  runner-up {}: copy phase median {:.1} MB/s ({:+.1} %){noise}",
                    other.knobs().map_or(other.label.clone(), |k| k.label()),
                    os.median,
                    (os.median / copy.median - 1.0) * 100.0,
                );
            }
        }
        let within: Vec<String> = by_round
            .iter()
            .map(|&(i, r)| {
                let c = &contenders[i];
                format!(
                    "{} {r:.2}",
                    c.knobs().map_or(c.label.clone(), |k| k.label())
                )
            })
            .collect();
        out!(
            report,
            "  within-round check (copy rate / the round's median candidate, median over rounds): {}{}",
            within.join(", "),
            match by_round.first() {
                Some(&(i, _)) if i != w => " (a different leader: the ranking is not settled)",
                Some(_) => " (same leader)",
                None => "",
            }
        );
        if let Some(&first) = by_event.first()
            && first != w
        {
            let other = &contenders[first];
            out!(
                report,
                "  ranked by time to the event instead, {} would win ({:.1} MB/s median)",
                other.knobs().map_or(other.label.clone(), |k| k.label()),
                other.mbps().map_or(0.0, |s| s.median)
            );
        }
        winner_json = json!({
            "knobs": knobs.json(),
            "label": knobs.label(),
            "ranked_by": "copy phase median (creation -> last destination write)",
            "copy_mbps": stats_json(&c.metric_values(Metric::Copy, size)),
            "event_mbps": stats_json(&c.metric_values(Metric::Event, size)),
            "copy_vs_dd": cd, "copy_vs_kernel_defaults": ck, "copy_vs_physical_limit": cp,
            "event_vs_dd": ed, "event_vs_kernel_defaults": ek, "event_vs_physical_limit": ep,
            "winner_by_event": by_event.first().map(|&i| contenders[i].label.clone()),
            "within_round_relative_copy": by_round.iter().map(|&(i, r)| json!({"candidate": contenders[i].label, "median_relative": r})).collect::<Vec<_>>(),
        });

        // The measurement behind each default.
        out!(report);
        out!(
            report,
            "Defaults for the agent and the measurement behind each (copy-phase median MB/s; to-event median in brackets):"
        );
        let mut by_region: BTreeMap<u64, (f64, f64, String)> = BTreeMap::new();
        for c in contenders.iter().filter(|c| c.role == Role::Candidate) {
            if let (Some(k), Some(s), Some(e)) = (c.knobs(), c.metric(Metric::Copy, size), c.mbps())
                && by_region
                    .get(&k.region_bytes)
                    .is_none_or(|(best, _, _)| s.median > *best)
            {
                by_region.insert(k.region_bytes, (s.median, e.median, k.label()));
            }
        }
        let regions: Vec<String> = by_region
            .iter()
            .map(|(region, (m, e, label))| {
                format!("{}: {m:.1} [{e:.1}] ({label})", size_label(*region))
            })
            .collect();
        out!(
            report,
            "  transfer.region_size = {}: best candidate per region size: {}",
            size_label(knobs.region_bytes),
            regions.join(", ")
        );
        let same_region: Vec<String> = contenders
            .iter()
            .filter(|c| c.role == Role::Candidate)
            .filter_map(|c| Some((c.knobs()?, c.metric(Metric::Copy, size)?, c.mbps()?)))
            .filter(|(k, _, _)| k.region_bytes == knobs.region_bytes)
            .map(|(k, s, e)| {
                format!(
                    "{}/{}: {:.1} [{:.1}]",
                    k.threshold(),
                    k.batch(),
                    s.median,
                    e.median
                )
            })
            .collect();
        out!(
            report,
            "  transfer.hydration_threshold = {}, transfer.hydration_batch_size = {}: threshold/batch at region {}: {}",
            knobs.threshold(),
            knobs.batch(),
            size_label(knobs.region_bytes),
            same_region.join(", ")
        );
        out!(
            report,
            "  against: kernel defaults 4K/1/1 (the proof of concept's) {} [{}]; dd {} [{}]; physical limit {}",
            fmt_opt(copy_bases.kdef, 0, 1),
            fmt_opt(event_bases.kdef, 0, 1),
            fmt_opt(copy_bases.dd, 0, 1),
            fmt_opt(event_bases.dd, 0, 1),
            fmt_opt(physical, 0, 1)
        );
        defaults_json = json!({
            "region_bytes": {"value": knobs.region_bytes, "best_per_region": by_region.iter().map(|(r, (m, e, l))| json!({"region_bytes": r, "copy_median_mbps": m, "event_median_mbps": e, "candidate": l})).collect::<Vec<_>>()},
            "hydration_threshold": {"value": knobs.threshold()},
            "hydration_batch_size": {"value": knobs.batch()},
            "same_region_candidates": same_region,
            "basis": "highest copy-phase median throughput among the candidates (creation -> last destination write); the to-event figures are listed beside it",
        });
    }

    let json = json!({
        "size_bytes": size,
        "physical_limit_mbps": physical,
        "dd_median_mbps": {"event": event_bases.dd, "copy": copy_bases.dd},
        "kernel_defaults_median_mbps": {"event": event_bases.kdef, "copy": copy_bases.kdef},
        "contenders": contenders.iter().map(|c| contender_json(c, size, &event_bases, &copy_bases)).collect::<Vec<_>>(),
        "winner": winner_json,
        "defaults": defaults_json,
        "completion": {"clone_runs": clone_runs.len(), "ended_on_event": clone_runs.len() - no_event, "complete_at_first_status": no_event, "other_events": other_events},
    });
    Ok(HydrationResult {
        contenders,
        winner,
        json,
    })
}

/// Which figure of a run: up to the completion event (dd: the process; fio:
/// its rate), or up to the last write to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Event,
    Copy,
}

/// The medians the ratios divide by.
#[derive(Debug, Clone, Copy)]
struct Bases {
    dd: Option<f64>,
    kdef: Option<f64>,
    physical: Option<f64>,
}

impl Bases {
    fn ratios(&self, value: Option<f64>) -> [Option<f64>; 3] {
        let ratio = |base: Option<f64>| Some(value? / base?);
        [ratio(self.dd), ratio(self.kdef), ratio(self.physical)]
    }
}

fn contender_json(c: &Contender, size: u64, event: &Bases, copy: &Bases) -> Value {
    let median = |metric| c.metric(metric, size).map(|s| s.median);
    let [ed, ek, ep] = event.ratios(median(Metric::Event));
    let [cd, ck, cp] = copy.ratios(median(Metric::Copy));
    json!({
        "label": c.label,
        "role": format!("{:?}", c.role),
        "knobs": c.knobs().map(|k| k.json()),
        "event_mbps": stats_json(&c.metric_values(Metric::Event, size)),
        "event_seconds": stats_json(&c.samples.iter().map(|s| s.secs).collect::<Vec<_>>()),
        "copy_mbps": stats_json(&c.metric_values(Metric::Copy, size)),
        "commit_lag_ms": stats_json(&c.clone_runs().filter_map(|r| r.commit_lag.map(ms)).collect::<Vec<_>>()),
        "done_to_finalized_ms": stats_json(&c.clone_runs().map(|r| ms(r.done_to_final)).collect::<Vec<_>>()),
        "swaps": c.clone_runs().map(|r| r.swap.json()).collect::<Vec<_>>(),
        "completion_via_event": c.clone_runs().map(|r| r.via_event).collect::<Vec<_>>(),
        "final_status": c.clone_runs().last().map(|r| r.status.to_string()),
        "event_vs_dd": ed, "event_vs_kernel_defaults": ek, "event_vs_physical_limit": ep,
        "copy_vs_dd": cd, "copy_vs_kernel_defaults": ck, "copy_vs_physical_limit": cp,
        "sha256_verified": c.verified,
    })
}

// ---------------------------------------------------------------------------
// Section 2: random-read IOPS during hydration and after finalize

async fn section_iops(rig: &mut Rig, params: &Params, report: &mut Report) -> BenchResult<Value> {
    let job = random_4k("randread", params.fio_seconds);
    let size = rig.size;
    let mut raw_thin = Vec::new();
    let mut raw_ns = Vec::new();
    let mut during = Vec::new();
    let mut after = Vec::new();
    let mut hydrated = Vec::new();
    // Warm-up (untimed): emulation translates code paths on first use.
    fio(&rig.dest_path(), random_4k("randread", 1), size)?;
    for rep in 0..params.reps {
        let mut steps = Steps::default();
        let (_, iops) = fio(&rig.dest_path(), job, size)?;
        raw_thin.push(iops);
        steps.mark("fio thin");
        let (_, iops) = fio(&rig.namespace.path, job, size)?;
        raw_ns.push(iops);
        steps.mark("fio namespace");

        let started = rig
            .start_clone(&Knobs::KERNEL_DEFAULTS, false, false)
            .await?;
        let before = rig.clone_status().await?;
        steps.mark("clone");
        let (_, iops) = fio(&rig.public.mapper_path(), job, size)?;
        let later = rig.clone_status().await?;
        during.push(iops);
        hydrated.push((before.hydrated_fraction(), later.hydrated_fraction()));
        steps.mark("fio during");

        // Finish quickly, then finalize as the agent does.
        rig.dm
            .message(&rig.public, 0, "hydration_threshold 1024")
            .await?;
        rig.dm
            .message(&rig.public, 0, "hydration_batch_size 256")
            .await?;
        rig.wait_hydrated(started.seen).await?;
        steps.mark("rest of hydration");
        rig.finalize().await?;
        let (_, iops) = fio(&rig.public.mapper_path(), job, size)?;
        after.push(iops);
        steps.mark("finalize + fio after");
        let (_, iops) = fio(&rig.dest_path(), job, size)?;
        raw_thin.push(iops);
        rig.dm.remove(&rig.public).await?;
        steps.mark("fio thin");
        eprintln!(
            "[bench] iops run {}/{}: raw thin {:.0}, namespace {:.0}, clone during hydration {:.0} (hydrated {:.1}% -> {:.1}%), era after finalize {:.0}; {}",
            rep + 1,
            params.reps,
            raw_thin[raw_thin.len() - 2],
            raw_ns[rep],
            during[rep],
            before.hydrated_fraction() * 100.0,
            later.hydrated_fraction() * 100.0,
            after[rep],
            steps.text
        );
    }
    let thin = stats(&raw_thin).ok_or("no raw thin samples")?;
    out!(report);
    out!(
        report,
        "2. 4 KiB random-read IOPS through the public device (fio randread bs=4k iodepth=32 libaio direct gtod_reduce, {} s each, {} runs)",
        params.fio_seconds,
        params.reps
    );
    out!(
        report,
        "{:<48} {:>9} {:>9} {:>9} | {:>9}",
        "device",
        "min",
        "median",
        "max",
        "×raw thin"
    );
    let rows: [(&str, &Vec<f64>); 4] = [
        ("raw thin device (destination)", &raw_thin),
        ("raw namespace (NVMe/TCP source)", &raw_ns),
        ("public = clone during hydration (4K/1/1)", &during),
        ("public = era over thin after finalize", &after),
    ];
    for (label, values) in rows {
        let s = stats(values).ok_or("no samples")?;
        out!(
            report,
            "{label:<48} {:9.0} {:9.0} {:9.0} | {:9.2}",
            s.min,
            s.median,
            s.max,
            s.median / thin.median
        );
    }
    let fractions: Vec<String> = hydrated
        .iter()
        .map(|(a, b)| format!("{:.1}%→{:.1}%", a * 100.0, b * 100.0))
        .collect();
    let finished_during = hydrated.iter().filter(|(_, b)| *b >= 1.0).count();
    out!(
        report,
        "hydrated share before→after each during-hydration fio run: {}{}",
        fractions.join(", "),
        if finished_during > 0 {
            format!("; WARNING: {finished_during} run(s) finished hydrating during fio")
        } else {
            "; hydration still running at the end of every run".to_owned()
        }
    );
    let ratio = |v: &[f64]| stats(v).map(|s| s.median / thin.median);
    Ok(json!({
        "fio": {"rw": "randread", "bs": 4096, "iodepth": 32, "ioengine": "libaio", "direct": true, "gtod_reduce": true, "seconds": params.fio_seconds},
        "raw_thin_iops": stats_json(&raw_thin),
        "raw_namespace_iops": stats_json(&raw_ns),
        "clone_during_hydration_iops": stats_json(&during),
        "linear_after_finalize_iops": stats_json(&after),
        "during_vs_raw_thin": ratio(&during),
        "after_vs_raw_thin": ratio(&after),
        "namespace_vs_raw_thin": ratio(&raw_ns),
        "hydrated_fraction_before_after": hydrated,
        "slow_knobs": Knobs::KERNEL_DEFAULTS.json(),
    }))
}

// ---------------------------------------------------------------------------
// Section 3: the I/O pause of the finalize swap

/// Step durations for progress lines.
#[derive(Debug)]
struct Steps {
    last: Instant,
    text: String,
}

impl Default for Steps {
    fn default() -> Self {
        Self {
            last: Instant::now(),
            text: String::new(),
        }
    }
}

impl Steps {
    fn mark(&mut self, what: &str) {
        let now = Instant::now();
        if !self.text.is_empty() {
            self.text.push_str(", ");
        }
        let _ = write!(self.text, "{what} {:.1} s", (now - self.last).as_secs_f64());
        self.last = now;
    }
}

/// Reads 4 KiB with O_DIRECT back to back and records each read's latency.
struct Reader {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<BenchResult<Vec<(Instant, Duration)>>>,
}

impl Reader {
    fn start(path: &Path, size: u64) -> BenchResult<Self> {
        use std::os::unix::fs::FileExt;
        let file = open_direct(path, false)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("pause-reader".into())
            .spawn(move || {
                let mut buf = AlignedBuf::new(4096);
                let mut reads = Vec::with_capacity(1 << 16);
                let mut offset = 0;
                while !flag.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    file.read_exact_at(buf.as_mut_slice(), offset)
                        .map_err(|err| format!("read at {offset}: {err}"))?;
                    reads.push((at, at.elapsed()));
                    offset = (offset + 4096) % size;
                }
                Ok(reads)
            })?;
        Ok(Self { stop, handle })
    }

    fn finish(self) -> BenchResult<Vec<(Instant, Duration)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "the reader thread panicked")?
    }
}

/// How the finalize swap is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SwapOrder {
    /// What the agent does: the local table loaded beside the live clone,
    /// then suspend (flush), status check, resume.
    Agent,
    /// The load inside the pause: suspend (flush), status check, load,
    /// resume; dm-era's constructor then runs while I/O waits.
    LoadInPause,
}

impl SwapOrder {
    fn name(self) -> &'static str {
        match self {
            SwapOrder::Agent => "agent",
            SwapOrder::LoadInPause => "in-pause",
        }
    }
}

async fn section_pause(
    rig: &mut Rig,
    params: &Params,
    knobs: Knobs,
    report: &mut Report,
) -> BenchResult<Value> {
    out!(report);
    out!(
        report,
        "3. I/O pause during the finalize swap, clone {} hydrated, then a reader issues 4 KiB O_DIRECT reads back to back",
        knobs.label()
    );
    out!(
        report,
        "   on the public device from 300 ms before to 300 ms after the swap. order agent: load era(meta, thin) beside the clone,"
    );
    out!(
        report,
        "   then suspend (flush), status check, resume (the agent's finalize); in-pause: suspend (flush), status check, load,"
    );
    out!(
        report,
        "   resume. pause = the longest read overlapping the swap; swap = suspend call -> resume returned."
    );
    out!(
        report,
        "{:<4} {:<8} {:>6} {:>8} {:>9} | {:>9} {:>8} | {:>7} {:>7} {:>6} {:>7} | {:>10}",
        "run",
        "order",
        "reads",
        "p50 µs",
        "pause ms",
        "swap ms",
        "preload",
        "suspend",
        "status",
        "load",
        "resume",
        "<20 ms p/s"
    );
    let mut runs = Vec::new();
    let mut pauses: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut swaps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let orders = [SwapOrder::Agent, SwapOrder::LoadInPause];
    for rep in 0..params.reps {
        for k in 0..orders.len() {
            let order = orders[(k + rep) % orders.len()];
            let started = rig.start_clone(&knobs, false, false).await?;
            rig.wait_hydrated(started.seen).await?;
            let reader = Reader::start(&rig.public.mapper_path(), rig.size)?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let swap = match order {
                SwapOrder::Agent => rig.finalize().await,
                SwapOrder::LoadInPause => rig.finalize_loading_in_pause().await,
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            let reads = reader.finish()?;
            let swap = swap?;
            rig.dm.remove(&rig.public).await?;

            let before: Vec<f64> = reads
                .iter()
                .filter(|(at, d)| *at + *d < swap.started)
                .map(|(_, d)| d.as_secs_f64() * 1e6)
                .collect();
            let overlapping: Vec<Duration> = reads
                .iter()
                .filter(|(at, d)| *at < swap.resumed && *at + *d > swap.started)
                .map(|(_, d)| *d)
                .collect();
            let pause = overlapping.iter().max().copied().unwrap_or_default();
            let base = stats(&before).ok_or("no reads before the swap")?;
            let verdict = |d: Duration| if d < PAUSE_TARGET { "yes" } else { "NO" };
            out!(
                report,
                "{:<4} {:<8} {:>6} {:>8.0} {:>9.2} | {:>9.2} {:>8} | {:>7.2} {:>7.2} {:>6} {:>7.2} | {:>10}",
                rep + 1,
                order.name(),
                reads.len(),
                base.median,
                ms(pause),
                ms(swap.total()),
                swap.preload
                    .map_or("-".to_owned(), |d| format!("{:.2}", ms(d))),
                ms(swap.suspend),
                ms(swap.status),
                swap.load
                    .map_or("-".to_owned(), |d| format!("{:.2}", ms(d))),
                ms(swap.resume),
                format!("{}/{}", verdict(pause), verdict(swap.total()))
            );
            pauses.entry(order.name()).or_default().push(ms(pause));
            swaps
                .entry(order.name())
                .or_default()
                .push(ms(swap.total()));
            runs.push(json!({
                "order": order.name(),
                "reads": reads.len(),
                "reads_overlapping_swap": overlapping.len(),
                "read_p50_before_us": base.median,
                "pause_ms": ms(pause),
                "swap": swap.json(),
                "pause_under_20ms": pause < PAUSE_TARGET,
                "swap_under_20ms": swap.total() < PAUSE_TARGET,
            }));
        }
    }
    let mut summary = serde_json::Map::new();
    for order in orders {
        let (Some(p), Some(s)) = (
            pauses.get(order.name()).and_then(|v| stats(v)),
            swaps.get(order.name()).and_then(|v| stats(v)),
        ) else {
            continue;
        };
        out!(
            report,
            "{:<8} pause median {:.2} ms (min {:.2}, max {:.2}); swap median {:.2} ms (min {:.2}, max {:.2}); target < {} ms: pause {}, swap {}",
            order.name(),
            p.median,
            p.min,
            p.max,
            s.median,
            s.min,
            s.max,
            PAUSE_TARGET.as_millis(),
            if p.max < ms(PAUSE_TARGET) {
                "met in every run"
            } else {
                "MISSED in at least one run"
            },
            if s.max < ms(PAUSE_TARGET) {
                "met in every run"
            } else {
                "MISSED in at least one run"
            }
        );
        summary.insert(
            order.name().to_owned(),
            json!({"pause_ms": stats_json(&pauses[order.name()]), "swap_ms": stats_json(&swaps[order.name()])}),
        );
    }
    Ok(json!({
        "knobs": knobs.json(),
        "runs": runs,
        "summary": summary,
        "target_ms": ms(PAUSE_TARGET),
    }))
}

// ---------------------------------------------------------------------------
// Section 4: done → finalized

fn section_done_to_finalized(contenders: &[Contender], report: &mut Report) -> Value {
    let runs: Vec<&CloneRun> = contenders.iter().flat_map(Contender::clone_runs).collect();
    let done: Vec<f64> = runs.iter().map(|r| ms(r.done_to_final)).collect();
    let copied: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.copied_to_final.map(ms))
        .collect();
    let swaps: Vec<f64> = runs.iter().map(|r| ms(r.swap.total())).collect();
    let poc_expected = ms(POC_POLL) / 2.0;
    out!(report);
    out!(
        report,
        "4. done→finalized over the {} clone runs of section 1 (event received -> the swap's resume returned; no reader)",
        runs.len()
    );
    let mut json = json!({"poc_poll_interval_ms": ms(POC_POLL), "poc_expected_ms": poc_expected, "poc_worst_ms": ms(POC_POLL)});
    if let Some(s) = stats(&done) {
        out!(
            report,
            "   event -> finalized:        min {:8.2} ms  median {:8.2} ms  max {:8.2} ms",
            s.min,
            s.median,
            s.max
        );
        json["event_to_finalized_ms"] = stats_json(&done);
        json["poc_expected_over_median"] = json!(poc_expected / s.median);
        if let Some(c) = stats(&copied) {
            out!(
                report,
                "   last copy -> finalized:    min {:8.2} ms  median {:8.2} ms  max {:8.2} ms (includes the kernel's commit lag)",
                c.min,
                c.median,
                c.max
            );
            json["last_copy_to_finalized_ms"] = stats_json(&copied);
        }
        if let Some(w) = stats(&swaps) {
            out!(
                report,
                "   of which the swap itself:  min {:8.2} ms  median {:8.2} ms  max {:8.2} ms",
                w.min,
                w.median,
                w.max
            );
            json["swap_ms"] = stats_json(&swaps);
        }
        out!(
            report,
            "   baseline, the proof of concept polling every {} s: expected {:.0} ms after done (uniform 0..{} s), worst {} ms; event-driven median is {:.0}× sooner",
            POC_POLL.as_secs(),
            poc_expected,
            POC_POLL.as_secs(),
            ms(POC_POLL),
            poc_expected / s.median
        );
    }
    json
}

// ---------------------------------------------------------------------------
// Section 5: 4 KiB random writes with dm-era in the stack

/// The era block of a change-tracking volume (the agent's default).
const ERA_BLOCK_BYTES: u64 = dmclone::config::DEFAULT_CHANGE_BLOCK_BYTES;
/// The thin id of dm-era's metadata in the rig's pool (the destination is 1).
const ERA_META_THIN_ID: u32 = 2;
const LOCAL_ERA_META_THIN_ID: u32 = 3;
/// The target for era steady-state IOPS over linear.
const ERA_TARGET: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteRun {
    /// linear over the thin device, as an untracked volume's public device.
    Linear,
    /// dm-era over the thin device, every era block already written in the
    /// current era.
    EraSteady,
    /// dm-era right after a `checkpoint` message: a new era, so each first
    /// write to a block waits for a metadata commit.
    EraAfterCheckpoint,
}

impl WriteRun {
    const ALL: [WriteRun; 3] = [
        WriteRun::Linear,
        WriteRun::EraAfterCheckpoint,
        WriteRun::EraSteady,
    ];

    fn label(self) -> &'static str {
        match self {
            WriteRun::Linear => "linear over thin (baseline)",
            WriteRun::EraSteady => "era over thin, steady within one era",
            WriteRun::EraAfterCheckpoint => "era over thin, right after a checkpoint",
        }
    }
}

/// The devices of section 5, all over the rig's destination thin device.
struct EraRig {
    linear: DeviceName,
    era: DeviceName,
}

impl EraRig {
    /// dm-era's metadata on a new thin device of the rig's pool, sized and
    /// formatted as the agent does it (a fresh thin device reads as zeros,
    /// so dm-era formats it), then era(meta, dest) and linear(dest) side by
    /// side: both map the same provisioned blocks.
    async fn build(rig: &Rig) -> BenchResult<Self> {
        let meta = era_metadata_device(&rig.dm, rig.pool_dev, ERA_META_THIN_ID, "era-meta").await?;
        let era = dm_name("era")?;
        let era_table = Table::single(
            rig.size / SECTOR,
            DmTarget::Era(Era {
                metadata: meta,
                origin: rig.dest_dev,
                block_sectors: ERA_BLOCK_BYTES / SECTOR,
            }),
        )?;
        rig.dm.create(&era, None, &era_table).await?;
        let linear = dm_name("linear")?;
        rig.dm.create(&linear, None, &rig.linear_table()?).await?;
        Ok(Self { linear, era })
    }

    async fn era_status(&self, rig: &Rig) -> BenchResult<EraStatus> {
        Ok(rig.dm.status_of::<EraStatus>(&self.era, 0).await?)
    }

    /// One timed run of `kind`, the checkpoint run after a `checkpoint`
    /// message. Linear keeps no state: every block of the thin device was
    /// provisioned at setup. Returns the IOPS.
    async fn run(&self, rig: &Rig, kind: WriteRun, seconds: u64) -> BenchResult<f64> {
        let path = match kind {
            WriteRun::Linear => self.linear.mapper_path(),
            WriteRun::EraSteady | WriteRun::EraAfterCheckpoint => self.era.mapper_path(),
        };
        if kind == WriteRun::EraAfterCheckpoint {
            rig.dm.message(&self.era, 0, "checkpoint").await?;
        }
        let (_, iops) = fio(&path, random_4k("randwrite", seconds), rig.size)?;
        Ok(iops)
    }

    /// Writes the whole range once through dm-era, untimed (1 MiB
    /// sequential): every era block is then marked in the current era. Slow
    /// where it marks blocks: each first write to an era block waits for a
    /// dm-era commit, which flushes its metadata thin device, which commits
    /// the pool's metadata.
    fn mark_all(&self, rig: &Rig) -> BenchResult<()> {
        fio(&self.era.mapper_path(), SEQ_WRITE, rig.size)?;
        Ok(())
    }

    /// Removes the devices; the thin id goes with the pool at teardown.
    async fn remove(self, rig: &Rig) -> BenchResult<()> {
        rig.dm.remove(&self.era).await?;
        rig.dm.remove(&self.linear).await?;
        rig.dm.remove(&dm_name("era-meta")?).await?;
        Ok(())
    }
}

async fn section_era(rig: &mut Rig, params: &Params, report: &mut Report) -> BenchResult<Value> {
    let era_rig = EraRig::build(rig).await?;
    let measured = era_runs(rig, &era_rig, params).await;
    let removed = era_rig.remove(rig).await;
    let samples = measured?;
    removed?;
    let values = |kind: WriteRun| samples.iops[&(kind as usize)].clone();
    let ratios = |kind: WriteRun| samples.ratios[&(kind as usize)].clone();
    out!(report);
    out!(
        report,
        "5. 4 KiB random-write IOPS, dm-era (block {}) vs linear over the same pre-filled thin device (fio randwrite bs=4k",
        size_label(ERA_BLOCK_BYTES)
    );
    out!(
        report,
        "   iodepth=32 libaio direct gtod_reduce, {} s each, {} rounds). A round: a `checkpoint` message and the checkpoint",
        params.fio_seconds,
        params.reps
    );
    out!(
        report,
        "   run (all {} era blocks start unwritten in the new era); an untimed 1M sequential write of the whole range",
        rig.size / ERA_BLOCK_BYTES
    );
    out!(
        report,
        "   through dm-era (every block marked); then steady and linear runs back to back, A B B A, A and B swapped"
    );
    out!(
        report,
        "   every round. ×linear: each round's mean over the same round's linear mean, median over rounds (min, max)"
    );
    out!(
        report,
        "{:<48} {:>9} {:>9} {:>9} | {:>9} {:>15}",
        "device",
        "min",
        "median",
        "max",
        "×linear",
        "(min, max)"
    );
    for kind in WriteRun::ALL {
        let s = stats(&values(kind)).ok_or("no samples")?;
        let r = stats(&ratios(kind)).ok_or("no samples")?;
        out!(
            report,
            "{:<48} {:9.0} {:9.0} {:9.0} | {:9.2} {:>15}",
            kind.label(),
            s.min,
            s.median,
            s.max,
            r.median,
            format!("({:.2}, {:.2})", r.min, r.max)
        );
    }
    let median_ratio = |kind: WriteRun| stats(&ratios(kind)).map(|s| s.median);
    let steady = median_ratio(WriteRun::EraSteady).ok_or("no era samples")?;
    let after = median_ratio(WriteRun::EraAfterCheckpoint).ok_or("no era samples")?;
    out!(
        report,
        "era steady state / linear = {steady:.2}× (target >= {ERA_TARGET}×) {}; right after a checkpoint {after:.2}×",
        if steady >= ERA_TARGET {
            "pass"
        } else {
            "MISSED"
        },
    );
    Ok(json!({
        "fio": {"rw": "randwrite", "bs": 4096, "iodepth": 32, "ioengine": "libaio", "direct": true, "gtod_reduce": true, "seconds": params.fio_seconds},
        "era_block_bytes": ERA_BLOCK_BYTES,
        "era_blocks": rig.size / ERA_BLOCK_BYTES,
        "size_bytes": rig.size,
        "era_metadata": "a thin device of the same pool, sized as the agent sizes it",
        "linear_iops": stats_json(&values(WriteRun::Linear)),
        "era_steady_iops": stats_json(&values(WriteRun::EraSteady)),
        "era_after_checkpoint_iops": stats_json(&values(WriteRun::EraAfterCheckpoint)),
        "steady_vs_linear_per_round": stats_json(&ratios(WriteRun::EraSteady)),
        "after_checkpoint_vs_linear_per_round": stats_json(&ratios(WriteRun::EraAfterCheckpoint)),
        "steady_vs_linear": steady,
        "after_checkpoint_vs_linear": after,
        "ratio_basis": "each round's mean era IOPS over the same round's mean linear IOPS (two runs each, A B B A), median over rounds",
        "target": ERA_TARGET,
        "pass": steady >= ERA_TARGET,
        "era_status_per_round": samples.statuses,
    }))
}

/// Per `WriteRun` (as usize): IOPS of every run, and each round's mean over
/// that round's linear mean.
struct EraSamples {
    iops: BTreeMap<usize, Vec<f64>>,
    ratios: BTreeMap<usize, Vec<f64>>,
    statuses: Vec<String>,
}

async fn era_runs(rig: &Rig, era_rig: &EraRig, params: &Params) -> BenchResult<EraSamples> {
    // Warm-up (untimed): emulation translates code paths on first use.
    for path in [era_rig.linear.mapper_path(), era_rig.era.mapper_path()] {
        fio(&path, random_4k("randwrite", 1), rig.size)?;
    }
    let mut samples: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut statuses = Vec::new();
    for round in 0..params.reps {
        let mut steps = Steps::default();
        let after = era_rig
            .run(rig, WriteRun::EraAfterCheckpoint, params.fio_seconds)
            .await?;
        steps.mark(&format!("after checkpoint {after:.0} IOPS"));
        era_rig.mark_all(rig)?;
        steps.mark("marking every block");
        // The steady runs and their baseline back to back, A B B A with A
        // and B swapped every round, so that a drift of the machine's speed
        // within the round weighs on both alike (linear writes do not pass
        // through dm-era, so the era stays fully marked).
        let (a, b) = if round % 2 == 0 {
            (WriteRun::Linear, WriteRun::EraSteady)
        } else {
            (WriteRun::EraSteady, WriteRun::Linear)
        };
        let mut iops: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        iops.insert(WriteRun::EraAfterCheckpoint as usize, vec![after]);
        for kind in [a, b, b, a] {
            let value = era_rig.run(rig, kind, params.fio_seconds).await?;
            steps.mark(&format!("{kind:?} {value:.0} IOPS"));
            iops.entry(kind as usize).or_default().push(value);
        }
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let linear = mean(&iops[&(WriteRun::Linear as usize)]);
        for (kind, values) in iops {
            ratios.entry(kind).or_default().push(mean(&values) / linear);
            samples.entry(kind).or_default().extend(values);
        }
        let status = era_rig.era_status(rig).await?;
        eprintln!(
            "[bench] era run {}/{}: {}; era {} metadata {}/{}",
            round + 1,
            params.reps,
            steps.text,
            status.current_era,
            status.metadata.used,
            status.metadata.total
        );
        statuses.push(format!(
            "era {} metadata {}/{}",
            status.current_era, status.metadata.used, status.metadata.total
        ));
    }
    Ok(EraSamples {
        iops: samples,
        ratios,
        statuses,
    })
}

// ---------------------------------------------------------------------------
// Main

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let params = match Params::parse(&args) {
        Ok(params) => params,
        Err(err) => {
            eprintln!("hydration bench: {err}");
            return std::process::ExitCode::from(2);
        }
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

/// Checks the section selection (under `cargo test --benches`).
fn self_check() -> Result<(), String> {
    let sections = |list: &str| {
        Params::parse(&["--sections".to_owned(), list.to_owned()])
            .map(|p| p.sections)
            .map_err(|err| err.to_string())
    };
    let era_only = Sections {
        era: true,
        ..Sections::NONE
    };
    if sections("era")? != era_only || sections("all")? != Sections::ALL {
        return Err("--sections selects wrongly".into());
    }
    for (list, reason) in [("frob", "unknown section"), (",", "names no section")] {
        match sections(list) {
            Err(err) if err.contains(reason) => {}
            other => {
                return Err(format!(
                    "--sections {list:?} should fail with {reason:?}: {other:?}"
                ));
            }
        }
    }
    Ok(())
}
