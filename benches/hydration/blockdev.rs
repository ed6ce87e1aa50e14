//! Block-device helpers: patterns, hashes, loop files and write counters.

use std::{
    fs,
    fs::File,
    io::{Read, Write},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dmclone::{aligned::AlignedBuf, dm::table::DevRef};
use loopdev::{LoopControl, LoopDevice};
use sha2::{Digest, Sha256};

use crate::{
    MIB, WRITE_SAMPLE,
    common::{BenchResult, open_direct},
};

/// Deterministic bytes for `[offset, offset+len)` of the stream `seed`
/// (8-byte aligned offsets).
pub(crate) fn pattern_into(seed: u64, offset: u64, out: &mut [u8]) {
    for (index, word) in (offset / 8..).zip(out.chunks_exact_mut(8)) {
        word.copy_from_slice(&splitmix(seed ^ index).to_le_bytes());
    }
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Writes `buf` over the first `len` bytes of `path`, 1 MiB at a time.
pub(crate) fn overwrite(path: &Path, len: u64, buf: &AlignedBuf) -> BenchResult<()> {
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
pub(crate) fn sha256_of(path: &Path, len: u64) -> BenchResult<String> {
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

pub(crate) fn dev_of(path: &Path) -> BenchResult<DevRef> {
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
pub(crate) type Fill = dyn Fn(u64, &mut [u8]);

/// A file on tmpfs behind a loop device (buffered: tmpfs has no O_DIRECT).
pub(crate) struct LoopFile {
    pub(crate) device: LoopDevice,
    pub(crate) path: PathBuf,
    pub(crate) dev: DevRef,
}

impl LoopFile {
    /// Creates `name` in `dir` with `len` bytes, filled by `fill` (written to
    /// the file itself, so the loop device's page cache holds no second copy).
    pub(crate) fn create(
        dir: &Path,
        name: &str,
        len: u64,
        fill: Option<&Fill>,
    ) -> BenchResult<Self> {
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
pub(crate) struct WriteWatcher {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: Option<thread::JoinHandle<Option<Instant>>>,
}

impl WriteWatcher {
    pub(crate) fn start(dev: DevRef) -> BenchResult<Self> {
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
    pub(crate) fn finish(mut self) -> Option<Instant> {
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
pub(crate) fn sectors_written(path: &Path) -> BenchResult<u64> {
    let text = fs::read_to_string(path).map_err(|err| format!("read {}: {err}", path.display()))?;
    text.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("{}: unexpected content {text:?}", path.display()).into())
}
