//! The demo behind `./demo`: a volume that lives elsewhere is presented at once
//! through dm-clone, hydrated in the background into a thin volume of the local
//! file-backed pool, finalized on the kernel's completion event, and verified.
//!
//! Needs a kernel with dm-clone, dm-era and dm-thin-pool (the guest test bed).
//! Size in MiB from `DMCLONE_DEMO_MIB` (default 256).
#![allow(clippy::unwrap_used)]

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::dm::{
    events::EventMonitor,
    kernel::DeviceMapper,
    names::DeviceName,
    status::CloneStatus,
    table::{CloneParams, DevRef, Table, Target, Thin, ThinPool, ThinPoolFeatures},
};
use loopdev::{LoopControl, LoopDevice};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
const POOL_BLOCK_SECTORS: u64 = 128;
const REGION_SECTORS: u64 = 8;

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> DemoResult<()> {
    let size_mib: u64 = std::env::var("DMCLONE_DEMO_MIB")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(256);
    let size = size_mib * MIB;
    let dir = tempfile::tempdir()?;
    let dm = DeviceMapper::open()?;
    let events = EventMonitor::start()?;
    println!(
        "== dmclone demo: {size_mib} MiB volume, state in {}",
        dir.path().display()
    );

    // The embedded default: a thin pool on sparse files behind loop devices.
    let pool_meta = attach(&sparse_file(dir.path(), "pool-meta.img", 64 * MIB)?)?;
    let pool_data = attach(&sparse_file(dir.path(), "pool-data.img", 4 * size)?)?;
    zero_first_block(&pool_meta.1)?;
    let pool = DeviceName::new("dmclone-demo-pool")?;
    let pool_table = Table::single(
        4 * size / SECTOR,
        Target::ThinPool(ThinPool {
            metadata: pool_meta.2,
            data: pool_data.2,
            data_block_sectors: POOL_BLOCK_SECTORS,
            low_water_blocks: 0,
            features: ThinPoolFeatures::default(),
        }),
    )?;
    let pool_dev = dm.create(&pool, None, &pool_table).await?.device;
    println!(
        "thin pool /dev/mapper/{pool} on {} + {}",
        pool_meta.1.display(),
        pool_data.1.display()
    );

    // The volume's home copy: a device "attached from another host".
    let remote = attach(&sparse_file(dir.path(), "remote-volume.img", size)?)?;
    fill_with_pattern(&remote.1, size)?;
    let source_sha = sha256(&remote.1, size)?;
    println!(
        "source volume {} sha256 {}",
        remote.1.display(),
        &source_sha[..16]
    );

    // Local space: the destination thin volume and the clone's metadata.
    let dest = thin_volume(&dm, &pool, pool_dev, 1, "dmclone-demo-dest", size).await?;
    let meta = thin_volume(&dm, &pool, pool_dev, 2, "dmclone-demo-clonemeta", 16 * MIB).await?;
    zero_first_block(&meta.0.mapper_path())?;

    let public = DeviceName::new("dmclone-demo-volume")?;
    let clone = Target::Clone(CloneParams {
        metadata: meta.1,
        destination: dest.1,
        source: remote.2,
        region_sectors: REGION_SECTORS,
        hydration: false,
        discard_passdown: true,
        hydration_threshold: Some(1024),
        hydration_batch_size: Some(256),
    });
    let presented = Instant::now();
    dm.create(&public, None, &Table::single(size / SECTOR, clone)?)
        .await?;
    println!(
        "presented {} in {:?}; hydration deferred, reads come from the source",
        public.mapper_path().display(),
        presented.elapsed()
    );
    let seen = dm
        .info(&public)
        .await?
        .ok_or("public device vanished")?
        .event_nr;

    dm.message(&public, 0, "enable_hydration").await?;
    let started = Instant::now();
    watch_hydration(&dm, &events, &public, seen).await?;
    let took = started.elapsed();
    println!(
        "hydrated {size_mib} MiB in {took:.2?} ({:.1} MB/s), completion taken from the dm event",
        size as f64 / took.as_secs_f64() / 1e6
    );

    // Finalize: the public device now maps the local thin volume directly.
    let finalize = Instant::now();
    let local = Target::Thin(Thin {
        pool: pool_dev,
        device_id: 1,
        external_origin: None,
    });
    dm.swap_table(&public, &Table::single(size / SECTOR, local)?)
        .await?;
    let swap = finalize.elapsed();
    dm.remove(&meta.0).await?;
    dm.message(&pool, 0, "delete 2").await?;
    dm.remove(&dest.0).await?;
    println!("finalized: table swapped clone -> thin in {swap:.2?}; clone metadata released");

    let public_sha = sha256(&public.mapper_path(), size)?;
    println!("public device sha256 {}", &public_sha[..16]);
    if public_sha != source_sha {
        return Err("the hydrated volume differs from its source".into());
    }
    println!("OK: the local volume equals the source; the source can be released");

    dm.remove(&public).await?;
    dm.remove(&pool).await?;
    for (device, ..) in [remote, pool_meta, pool_data] {
        device.detach()?;
    }
    Ok(())
}

/// Prints progress twice a second (display only); completion is the event.
/// `seen` was read before hydration was enabled, so an event that fires
/// before the wait starts still ends it.
async fn watch_hydration(
    dm: &DeviceMapper,
    events: &EventMonitor,
    public: &DeviceName,
    seen: u32,
) -> DemoResult<()> {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let done = events.wait_for_event(public, seen);
    tokio::pin!(done);
    loop {
        tokio::select! {
            result = &mut done => { result?; break; }
            _ = ticker.tick() => {
                let status: CloneStatus = dm.status_of(public, 0).await?;
                print_progress(&status, started.elapsed());
            }
        }
    }
    let status: CloneStatus = dm.status_of(public, 0).await?;
    print_progress(&status, started.elapsed());
    if !status.is_fully_hydrated() {
        return Err(format!("event arrived but the clone is not hydrated: {status:?}").into());
    }
    Ok(())
}

fn print_progress(status: &CloneStatus, elapsed: Duration) {
    let done = status.hydrated_regions as f64 / status.total_regions.max(1) as f64;
    let bytes = status.hydrated_regions * status.region_sectors * SECTOR;
    let rate = bytes as f64 / elapsed.as_secs_f64().max(1e-3);
    let left = (status.total_regions - status.hydrated_regions) * status.region_sectors * SECTOR;
    let eta = if rate > 0.0 {
        format!("{:.1}s", left as f64 / rate)
    } else {
        "-".to_owned()
    };
    println!(
        "  hydrating {:5.1}%  {}/{} regions  {:6.1} MB/s  ETA {eta}",
        done * 100.0,
        status.hydrated_regions,
        status.total_regions,
        rate / 1e6,
    );
}

async fn thin_volume(
    dm: &DeviceMapper,
    pool: &DeviceName,
    pool_dev: DevRef,
    id: u32,
    name: &str,
    size: u64,
) -> DemoResult<(DeviceName, DevRef)> {
    dm.message(pool, 0, &format!("create_thin {id}")).await?;
    let name = DeviceName::new(name)?;
    let thin = Target::Thin(Thin {
        pool: pool_dev,
        device_id: id,
        external_origin: None,
    });
    let state = dm
        .create(&name, None, &Table::single(size / SECTOR, thin)?)
        .await?;
    Ok((name, state.device))
}

fn sparse_file(dir: &Path, name: &str, size: u64) -> DemoResult<PathBuf> {
    let path = dir.join(name);
    File::create(&path)?.set_len(size)?;
    Ok(path)
}

fn attach(file: &Path) -> DemoResult<(LoopDevice, PathBuf, DevRef)> {
    let device = LoopControl::open()?.next_free()?;
    device.with().attach(file)?;
    let path = device.path().ok_or("loop device without a path")?;
    let rdev = std::fs::metadata(&path)?.rdev();
    let dev = DevRef::from((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ));
    Ok((device, path, dev))
}

fn zero_first_block(path: &Path) -> DemoResult<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(&[0u8; 4096])?;
    file.sync_all()?;
    Ok(())
}

fn fill_with_pattern(path: &Path, size: u64) -> DemoResult<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    let mut state = 0x5eed_u64;
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(())
}

fn sha256(path: &Path, len: u64) -> DemoResult<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let want = left.min(MIB) as usize;
        file.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
