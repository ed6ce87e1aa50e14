//! Fixtures for the real-kernel tier: loop devices, data patterns, cleanup.
//!
//! Every test owns a name prefix and removes only devices with that prefix, so
//! tests can run in parallel and a re-run on an opted-in host starts clean.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::dm::{
    kernel::DeviceMapper,
    names::DeviceName,
    table::{DevRef, Table, Target, ThinPool, ThinPoolFeatures},
};
use loopdev::{LoopControl, LoopDevice};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub use dmclone::units::{SECTOR, Sectors, sectors};
pub const MIB: u64 = 1024 * 1024;

/// Opens device-mapper or fails the test with instructions: a real-kernel
/// test that cannot reach a kernel must fail, never pass by skipping.
/// `nvme.auth` for agents under test: "required" where this kernel's NVMe
/// target authenticates hosts (a host entry has `dhchap_key`: Linux 6.12
/// here), "none" where it cannot (Debian 12's 6.1).
pub fn nvme_auth_policy() -> &'static str {
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = Path::new("/sys/kernel/config/nvmet/hosts").join(format!(
        "nqn.2014-08.io.dmclone:test-probe-{}-{n}",
        std::process::id()
    ));
    if std::fs::create_dir(&probe).is_err() && !probe.exists() {
        return "none";
    }
    let authenticates = probe.join("dhchap_key").exists();
    let _ = std::fs::remove_dir(&probe);
    if authenticates { "required" } else { "none" }
}

pub fn kernel() -> DeviceMapper {
    DeviceMapper::open().unwrap_or_else(|err| {
        panic!(
            "this real-kernel test needs device-mapper with dm-clone, dm-era and dm-thin-pool \
             ({err}). Run it through tests/run-all, which boots a guest kernel, or on a host \
             with those modules loaded via tests/run-all --host"
        )
    })
}

pub fn name(prefix: &str, role: &str) -> DeviceName {
    DeviceName::new(&format!("{prefix}-{role}")).expect("test names are valid")
}

/// Removes every device whose name starts with `prefix`, each once nothing
/// holds it open, so stacked devices go before the ones they sit on (minor
/// numbers are reused, so creation order cannot be read from them). A
/// device written a moment ago may be open for a few milliseconds more
/// (udev probes it once the writer closes it): that is waited out, up to
/// [`BRIEF_OPENER`].
pub async fn remove_all_with_prefix(dm: &DeviceMapper, prefix: &str) {
    let mut held_since: Option<Instant> = None;
    loop {
        let mut ours = Vec::new();
        for device in dm.list().await.expect("list devices") {
            if device.name.starts_with(&format!("{prefix}-")) {
                ours.push(DeviceName::new(&device.name).expect("listed names are valid"));
            }
        }
        if ours.is_empty() {
            return;
        }
        let mut removed = false;
        for name in &ours {
            let open = dm
                .info(name)
                .await
                .expect("device info")
                .map(|s| s.open_count);
            if open == Some(0) {
                dm.remove(name).await.expect("remove test device");
                removed = true;
            }
        }
        if removed {
            held_since = None;
            continue;
        }
        let since = *held_since.get_or_insert_with(Instant::now);
        assert!(
            since.elapsed() < BRIEF_OPENER,
            "test devices {ours:?} are all held open by something else for {BRIEF_OPENER:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a test waits out another opener of its devices (udev's probe).
const BRIEF_OPENER: Duration = Duration::from_secs(5);

/// A sparse file on a loop device that detaches itself once closed.
#[derive(Debug)]
pub struct LoopDisk {
    _dir: TempDir,
    device: LoopDevice,
    path: PathBuf,
    pub dev: DevRef,
    pub size: u64,
}

impl LoopDisk {
    pub fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let backing = dir.path().join("disk.img");
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("create backing file");
        // Another test may grab the same free device between the lookup and the
        // attach; try again on EBUSY.
        for _ in 0..20 {
            let control = LoopControl::open().expect("open /dev/loop-control");
            let device = control.next_free().expect("free loop device");
            match device.with().autoclear(true).attach(&backing) {
                Ok(()) => {
                    let path = device.path().expect("loop device path");
                    let meta = std::fs::metadata(&path).expect("stat loop device");
                    assert!(meta.file_type().is_block_device());
                    let rdev = meta.rdev();
                    let dev = DevRef::from((
                        nix::sys::stat::major(rdev) as u32,
                        nix::sys::stat::minor(rdev) as u32,
                    ));
                    return Self {
                        _dir: dir,
                        device,
                        path,
                        dev,
                        size,
                    };
                }
                Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => panic!("attach loop device: {err}"),
            }
        }
        panic!("no free loop device after 20 tries");
    }

    /// A loop disk whose first 4 KiB are zero, as every new dm-clone, dm-era or
    /// thin-pool metadata device must be (stale metadata is silently reused).
    pub fn metadata(size: u64) -> Self {
        let disk = Self::new(size);
        write_at(&disk.path, 0, &[0u8; 4096]);
        disk
    }

    /// A loop disk filled with the deterministic pattern of `seed`.
    pub fn with_pattern(size: u64, seed: u64) -> Self {
        let disk = Self::new(size);
        let mut file = OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .expect("open");
        let mut offset = 0;
        while offset < size {
            let chunk = pattern(seed, offset, MIB.min(size - offset) as usize);
            file.write_all(&chunk).expect("fill");
            offset += chunk.len() as u64;
        }
        file.sync_all().expect("sync");
        disk
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        // autoclear detaches once the last user closes; this covers the case
        // where nothing ever opened it.
        let _ = self.device.detach();
    }
}

/// Deterministic bytes for `[offset, offset+len)` of the stream `seed`, so any
/// range can be regenerated for comparison without keeping it in memory.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut word_index = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        out.extend_from_slice(&splitmix(seed ^ word_index).to_le_bytes());
        word_index += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The counters of a block device's `/sys/dev/block/<major>:<minor>/stat`:
/// reads completed, reads merged, sectors read, time reading, writes...
pub fn block_stat(dev: DevRef) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/stat", dev.major, dev.minor))
        .unwrap();
    stat.split_whitespace()
        .map(|field| field.parse().unwrap())
        .collect()
}

/// Sectors read from the block device at `path` since it was made.
pub fn sectors_read(path: &Path) -> u64 {
    let rdev = std::fs::metadata(path).expect("stat block device").rdev();
    block_stat(DevRef::from((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    )))[2]
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(data).expect("write");
    file.sync_all().expect("sync");
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .expect("open for read");
    let mut buf = AlignedBuf::new(len);
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(buf.as_mut_slice()).expect("read");
    buf.as_mut_slice().to_vec()
}

/// sha256 of the first `len` bytes of a block device, read with O_DIRECT so the
/// page cache cannot hide what is on the device.
pub fn sha256_of(path: &Path, len: u64) -> String {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|err| panic!("open {}: {err}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = AlignedBuf::new(MIB as usize);
    let mut left = len;
    while left > 0 {
        let want = left.min(MIB) as usize;
        file.read_exact(&mut buf.as_mut_slice()[..want])
            .expect("read device");
        hasher.update(&buf.as_mut_slice()[..want]);
        left -= want as u64;
    }
    hex(&hasher.finalize())
}

pub use dmclone::aligned::AlignedBuf;

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A thin pool on two loop disks: 64 KiB data blocks, no low-water mark.
#[derive(Debug)]
pub struct PoolFixture {
    _meta: LoopDisk,
    _data: LoopDisk,
    pub name: DeviceName,
    pub dev: DevRef,
}

pub const POOL_BLOCK_SECTORS: u64 = 128;

impl PoolFixture {
    pub async fn create(dm: &DeviceMapper, prefix: &str, data_size: u64) -> Self {
        let meta = LoopDisk::metadata(16 * MIB);
        let data = LoopDisk::new(data_size);
        let name = name(prefix, "pool");
        let table = table(
            data.sectors(),
            Target::ThinPool(ThinPool {
                metadata: meta.dev,
                data: data.dev,
                data_block_sectors: Sectors(POOL_BLOCK_SECTORS),
                low_water_blocks: 0,
                features: ThinPoolFeatures::default(),
            }),
        );
        let state = dm
            .create(&name, None, &table)
            .await
            .expect("create thin pool");
        Self {
            _meta: meta,
            _data: data,
            name,
            dev: state.device,
        }
    }
}

/// A single-segment table.
pub fn table(len: u64, target: Target) -> Table {
    Table::single(Sectors(len), target).expect("valid table")
}

/// The refusal reason a status carries (its `google.rpc.ErrorInfo.reason`).
#[allow(clippy::disallowed_types)] // the tests are gRPC clients
pub fn refusal_reason(status: &tonic::Status) -> Option<String> {
    dmclone::api::status::reason_of(status)
}
