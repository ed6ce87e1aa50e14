use dmclone::units::Sectors;
use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::{Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dmclone::dm::{
    Kernel, LiveKernel,
    events::EventMonitor,
    kernel::DeviceMapper,
    names::DeviceName,
    status::CloneStatus,
    table::{CloneParams, Linear, Target},
};
use sha2::{Digest, Sha256};

use crate::support::*;

/// Tuned knobs: 4 KiB regions, many concurrent copies, large batches. The
/// kernel defaults (threshold 1, batch 1) copy about 14x slower.
const REGION_SECTORS: u64 = 8;
const THRESHOLD: u32 = 1024;
const BATCH: u32 = 256;

/// How a fixture's clone is built.
struct Shape {
    region_sectors: u64,
    hydration: bool,
    discard_passdown: bool,
}

struct CloneFixture {
    source: LoopDisk,
    dest: LoopDisk,
    _meta: LoopDisk,
    name: DeviceName,
    seed: u64,
}

impl CloneFixture {
    async fn create(dm: &DeviceMapper, prefix: &str, size: u64, hydration: bool) -> Self {
        let seed = 0xC10E;
        let source = LoopDisk::with_pattern(size, seed);
        let shape = Shape {
            region_sectors: REGION_SECTORS,
            hydration,
            discard_passdown: true,
        };
        Self::over(dm, prefix, source, LoopDisk::new(size), shape, seed).await
    }

    /// A clone of `source` onto `dest` (whatever it holds already).
    async fn over(
        dm: &DeviceMapper,
        prefix: &str,
        source: LoopDisk,
        dest: LoopDisk,
        shape: Shape,
        seed: u64,
    ) -> Self {
        let meta = LoopDisk::metadata(8 * MIB);
        let name = name(prefix, "clone");
        let params = CloneParams {
            metadata: meta.dev,
            destination: dest.dev,
            source: source.dev,
            region_sectors: Sectors(shape.region_sectors),
            hydration: shape.hydration,
            discard_passdown: shape.discard_passdown,
            hydration_threshold: Some(THRESHOLD),
            hydration_batch_size: Some(BATCH),
        };
        dm.create(&name, None, &table(source.sectors(), Target::Clone(params)))
            .await
            .unwrap();
        Self {
            source,
            dest,
            _meta: meta,
            name,
            seed,
        }
    }

    async fn status(&self, dm: &DeviceMapper) -> CloneStatus {
        dm.status_of(&self.name, 0).await.unwrap()
    }
}

/// Waits for the clone's "hydration complete" event, then checks the status.
async fn wait_until_hydrated(
    dm: &DeviceMapper,
    events: &EventMonitor,
    fixture: &CloneFixture,
    seen: u32,
) {
    // A clone whose metadata is already complete never raises the event, so
    // read the status once before waiting.
    if fixture.status(dm).await.is_fully_hydrated() {
        return;
    }
    let waited = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(300),
        events.wait_for_event(&fixture.name, seen),
    )
    .await
    .expect("hydration-complete event within 300 s")
    .unwrap();
    let status = fixture.status(dm).await;
    assert!(
        status.is_fully_hydrated(),
        "event arrived after {:?} but clone is not hydrated: {status:?}",
        waited.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_hydrates_and_completion_arrives_as_an_event() {
    let dm = kernel();
    let prefix = "dmct-hydrate";
    remove_all_with_prefix(&dm, prefix).await;
    let events = EventMonitor::start().unwrap();
    let size = 32 * MIB;
    let fixture = CloneFixture::create(&dm, prefix, size, false).await;

    let before = fixture.status(&dm).await;
    assert_eq!(before.hydrated_regions, 0, "{before:?}");
    assert_eq!(before.total_regions, size / SECTOR / REGION_SECTORS);
    assert!(before.features.no_hydration, "{before:?}");
    // Reads of unhydrated regions come from the source.
    assert_eq!(
        read_at(&fixture.name.mapper_path(), 5 * MIB, 8192),
        pattern(fixture.seed, 5 * MIB, 8192)
    );

    let seen = dm.info(&fixture.name).await.unwrap().unwrap().event_nr;
    dm.message(&fixture.name, 0, "enable_hydration")
        .await
        .unwrap();
    wait_until_hydrated(&dm, &events, &fixture, seen).await;

    let source = sha256_of(fixture.source.path(), size);
    assert_eq!(sha256_of(&fixture.name.mapper_path(), size), source);
    assert_eq!(
        sha256_of(fixture.dest.path(), size),
        source,
        "destination must hold the whole source after hydration"
    );
    remove_all_with_prefix(&dm, prefix).await;
}

/// dm-clone signals its end when it commits its metadata: on a 1 s timer, or
/// at once for a flush. The agent flushes a clone it finds finished, so the
/// event is out (and the end on disk) as soon as that flush returns.
#[tokio::test(flavor = "multi_thread")]
async fn a_flush_commits_a_finished_clone_and_raises_its_event_before_returning() {
    let dm = kernel();
    let prefix = "dmct-flush";
    remove_all_with_prefix(&dm, prefix).await;
    let size = 8 * MIB;
    let fixture = CloneFixture::create(&dm, prefix, size, false).await;
    let before = dm.info(&fixture.name).await.unwrap().unwrap().event_nr;
    // Whole-region writes hydrate their regions without a copy; O_DIRECT
    // and no fsync, so nothing but the flush below asks for a commit.
    let mut device = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(fixture.name.mapper_path())
        .unwrap();
    let mut chunk = AlignedBuf::new(MIB as usize);
    for offset in (0..size).step_by(MIB as usize) {
        chunk
            .as_mut_slice()
            .copy_from_slice(&pattern(0xF1u64, offset, MIB as usize));
        device.write_all(chunk.as_mut_slice()).unwrap();
    }
    drop(device);
    let status = fixture.status(&dm).await;
    assert!(status.is_fully_hydrated(), "{status:?}");

    let agent_kernel = LiveKernel::from_parts(kernel(), EventMonitor::start().unwrap());
    // (Moved already only if the clone's 1 s timer committed in between.)
    let unflushed = dm.info(&fixture.name).await.unwrap().unwrap().event_nr;
    agent_kernel.flush(&fixture.name).await.unwrap();
    let after = dm.info(&fixture.name).await.unwrap().unwrap().event_nr;
    println!(
        "MEASURED event counter: {before} at the start, {unflushed} before the flush, {after} after it"
    );
    assert!(
        after > before,
        "the completion event is raised by the time the flush returns (event counter {before} -> {after})"
    );
    assert_eq!(
        sha256_of(&fixture.name.mapper_path(), size),
        sha256_of(fixture.dest.path(), size),
        "the writes went to the destination"
    );
    remove_all_with_prefix(&dm, prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_steer_hydration_knobs() {
    let dm = kernel();
    let prefix = "dmct-knobs";
    remove_all_with_prefix(&dm, prefix).await;
    let fixture = CloneFixture::create(&dm, prefix, 4 * MIB, false).await;

    dm.message(&fixture.name, 0, "hydration_threshold 7")
        .await
        .unwrap();
    dm.message(&fixture.name, 0, "hydration_batch_size 3")
        .await
        .unwrap();
    let status = fixture.status(&dm).await;
    assert_eq!(status.hydration_threshold, 7, "{status:?}");
    assert_eq!(status.hydration_batch_size, 3, "{status:?}");

    let err = dm
        .message(&fixture.name, 0, "make_it_faster")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(fixture.name.as_str()), "{text}");
    assert!(text.contains("EINVAL"), "{text}");
    remove_all_with_prefix(&dm, prefix).await;
}

/// Writes 4 KiB blocks at scattered offsets with O_DIRECT until told to stop,
/// recording which write last touched each block, and the slowest write.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(HashMap<u64, u64>, Duration, u64)>,
}

const BLOCK: u64 = 4096;

impl Writer {
    fn start(path: PathBuf, blocks: u64, pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut file = OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(&path)
                .expect("open public device");
            let mut last_write = HashMap::new();
            let mut slowest = Duration::ZERO;
            let mut buf = AlignedBuf::new(BLOCK as usize);
            let mut n: u64 = 0;
            while !flag.load(Ordering::Relaxed) {
                let block = (n * 7919) % blocks;
                buf.as_mut_slice().copy_from_slice(&write_pattern(n));
                let started = Instant::now();
                file.seek(SeekFrom::Start(block * BLOCK)).expect("seek");
                file.write_all(buf.as_mut_slice())
                    .unwrap_or_else(|err| panic!("write {n} at block {block} failed: {err}"));
                slowest = slowest.max(started.elapsed());
                last_write.insert(block, n);
                n += 1;
                thread::sleep(pace);
            }
            (last_write, slowest, n)
        });
        Self { stop, handle }
    }

    fn finish(self) -> (HashMap<u64, u64>, Duration, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread")
    }
}

fn write_pattern(n: u64) -> Vec<u8> {
    pattern(0xBEEF ^ n, 0, BLOCK as usize)
}

/// The image the device must hold: the source, overlaid with every last write.
fn expected_sha(seed: u64, size: u64, writes: &HashMap<u64, u64>) -> String {
    let mut hasher = Sha256::new();
    for block in 0..size / BLOCK {
        match writes.get(&block) {
            Some(n) => hasher.update(write_pattern(*n)),
            None => hasher.update(pattern(seed, block * BLOCK, BLOCK as usize)),
        }
    }
    hex(&hasher.finalize())
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_clone_swaps_to_linear_under_io_without_loss() {
    let dm = kernel();
    let prefix = "dmct-finalize";
    remove_all_with_prefix(&dm, prefix).await;
    let events = EventMonitor::start().unwrap();
    let size = 16 * MIB;
    let fixture = CloneFixture::create(&dm, prefix, size, true).await;
    let seen = dm.info(&fixture.name).await.unwrap().unwrap().event_nr;

    // Foreground writes run through hydration, the swap and after it.
    let writer = Writer::start(
        fixture.name.mapper_path(),
        size / BLOCK,
        Duration::from_millis(2),
    );
    wait_until_hydrated(&dm, &events, &fixture, seen).await;

    let linear = Target::Linear(Linear {
        device: fixture.dest.dev,
        offset: Sectors(0),
    });
    let swap_started = Instant::now();
    dm.swap_table(&fixture.name, &table(fixture.source.sectors(), linear))
        .await
        .unwrap();
    let swap_took = swap_started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (writes, slowest, count) = writer.finish();

    let live = dm.table(&fixture.name).await.unwrap();
    assert_eq!(live.segments()[0].target.type_name(), "linear");
    let expected = expected_sha(fixture.seed, size, &writes);
    assert_eq!(sha256_of(&fixture.name.mapper_path(), size), expected);
    assert_eq!(sha256_of(fixture.dest.path(), size), expected);
    eprintln!(
        "finalize: {count} writes during hydration and swap, swap {swap_took:?}, slowest write {slowest:?}"
    );
    remove_all_with_prefix(&dm, prefix).await;
}

/// A move onto a host holding an older copy of the volume: the clone is
/// built idle over that copy with `no_discard_passdown`, the regions known
/// unchanged are discarded, and hydration copies only the others. Under a
/// discard the copy's blocks stay as they were (a region that differs from
/// the source there keeps its difference: nothing was copied), and a write
/// made through the clone before the discards survives them.
#[tokio::test(flavor = "multi_thread")]
async fn discards_let_a_clone_over_an_older_copy_copy_only_the_rest() {
    const REGION: u64 = 64 * 1024;
    let dm = kernel();
    let prefix = "dmct-skip";
    remove_all_with_prefix(&dm, prefix).await;
    let size = 16 * MIB;
    let regions = size / REGION;
    let (copy_seed, changed_seed, canary_seed, write_seed) = (0x01D, 0x2E7, 0xCA7, 0x3E1);
    // The source and the older copy agree but for the changed regions, and
    // the canary region, which only the copy holds differently.
    let source = LoopDisk::with_pattern(size, copy_seed);
    let dest = LoopDisk::with_pattern(size, copy_seed);
    let changed = [3u64, 100, 200];
    for region in changed {
        write_at(
            source.path(),
            region * REGION,
            &pattern(changed_seed, region * REGION, REGION as usize),
        );
    }
    let (canary, written) = (50u64, 120u64);
    write_at(
        dest.path(),
        canary * REGION,
        &pattern(canary_seed, canary * REGION, REGION as usize),
    );
    let shape = Shape {
        region_sectors: REGION / SECTOR,
        hydration: false,
        discard_passdown: false,
    };
    let fixture = CloneFixture::over(&dm, prefix, source, dest, shape, copy_seed).await;
    // A guest's 4 KiB write into a region about to be discarded: dm-clone
    // copies that region first, then writes.
    let write_at_offset = written * REGION + 4096;
    write_at(
        &fixture.name.mapper_path(),
        write_at_offset,
        &pattern(write_seed, write_at_offset, 4096),
    );

    let read_before = block_stat(fixture.source.dev)[2];
    let unchanged: Vec<_> = (0..regions)
        .filter(|region| !changed.contains(region))
        .map(|region| region * REGION..(region + 1) * REGION)
        .collect();
    let agent_kernel = LiveKernel::from_parts(kernel(), EventMonitor::start().unwrap());
    agent_kernel
        .discard(&fixture.name, unchanged)
        .await
        .unwrap();
    let status = fixture.status(&dm).await;
    assert_eq!(
        status.hydrated_regions,
        regions - changed.len() as u64,
        "every region but the changed ones is marked hydrated: {status:?}"
    );

    let events = EventMonitor::start().unwrap();
    let seen = dm.info(&fixture.name).await.unwrap().unwrap().event_nr;
    dm.message(&fixture.name, 0, "enable_hydration")
        .await
        .unwrap();
    wait_until_hydrated(&dm, &events, &fixture, seen).await;
    let copied = (block_stat(fixture.source.dev)[2] - read_before) * SECTOR;
    println!(
        "MEASURED read from the source after the discards: {copied} bytes for {} changed regions of {REGION} bytes ({} regions in all)",
        changed.len(),
        regions
    );
    assert!(
        copied <= changed.len() as u64 * REGION,
        "only the changed regions are copied: {copied} bytes read from the source"
    );

    let mut expected = pattern(copy_seed, 0, size as usize);
    let mut put = |offset: u64, bytes: Vec<u8>| {
        expected[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes)
    };
    for region in changed {
        put(
            region * REGION,
            pattern(changed_seed, region * REGION, REGION as usize),
        );
    }
    put(
        canary * REGION,
        pattern(canary_seed, canary * REGION, REGION as usize),
    );
    put(write_at_offset, pattern(write_seed, write_at_offset, 4096));
    for device in [fixture.name.mapper_path(), fixture.dest.path().to_owned()] {
        let got = read_at(&device, 0, size as usize);
        let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(
            first_difference,
            None,
            "{} differs from the expected image (region {:?})",
            device.display(),
            first_difference.map(|at| at as u64 / REGION)
        );
    }
    remove_all_with_prefix(&dm, prefix).await;
}
