//! The block device under the pool: an operator's device, or the embedded
//! default's sparse file attached to a loop device.
//!
//! Loop devices are attached with autoclear: the kernel detaches one once its
//! last user (our pool's linear devices) lets go, so nothing leaks when the
//! pool is torn down, and an agent restart finds the same loop device still
//! attached (matched by its backing file) instead of attaching a second one.

use std::{
    fs::{self, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use loopdev::{LoopControl, LoopDevice};
use tracing::info;

use crate::{aligned::AlignedBuf, config::PoolBacking, dm::table::DevRef, error::AgentError};

/// The device the pool sits on.
#[derive(Debug)]
pub struct Backing {
    pub path: PathBuf,
    pub dev: DevRef,
    pub size_bytes: u64,
    /// Keeps a freshly attached loop device until the pool holds it open.
    _loop: Option<LoopDevice>,
}

impl Backing {
    /// The device `settings` name: an operator's device, or the embedded
    /// pool file on a loop device.
    pub async fn open(settings: &PoolBacking) -> Result<Self, AgentError> {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || match settings {
            PoolBacking::File { path, size } => Self::file(&path, size).map(|(backing, _)| backing),
            PoolBacking::Device(path) => Self::device(&path),
        })
        .await
        .map_err(|err| AgentError::Internal(format!("pool setup task failed: {err}")))?
    }

    /// An operator-named block device, used whole.
    pub fn device(path: &Path) -> Result<Self, AgentError> {
        let (dev, size_bytes) = block_device_for(path, "pool.device")?;
        Ok(Self {
            path: path.to_owned(),
            dev,
            size_bytes,
            _loop: None,
        })
    }

    /// The embedded pool file, created sparse if missing, on a loop device.
    /// Returns whether the file was created now.
    pub fn file(file: &Path, size: u64) -> Result<(Self, bool), AgentError> {
        let created = create_sparse(file, size)?;
        let file = fs::canonicalize(file).map_err(|err| io_error("resolve", file, err))?;
        if let Some(path) = attached_loop(&file)? {
            let (dev, size_bytes) = block_device_for(&path, "pool.file_size")?;
            info!(loop_device = %path.display(), file = %file.display(), "pool file already attached");
            return Ok((
                Self {
                    path,
                    dev,
                    size_bytes,
                    _loop: None,
                },
                created,
            ));
        }
        let device = attach_loop(&file)?;
        let path = device
            .path()
            .ok_or_else(|| AgentError::Internal("a loop device without a path".into()))?;
        let (dev, size_bytes) = block_device_for(&path, "pool.file_size")?;
        info!(loop_device = %path.display(), file = %file.display(), "pool file attached");
        Ok((
            Self {
                path,
                dev,
                size_bytes,
                _loop: Some(device),
            },
            created,
        ))
    }

    /// A plain file standing in for a block device, for tests over an
    /// in-memory kernel: `dev` is the number that kernel gave it.
    #[cfg(any(test, feature = "kernel-fake"))]
    pub fn plain_file(file: &Path, size: u64, dev: DevRef) -> Result<Self, AgentError> {
        create_sparse(file, size)?;
        Ok(Self {
            path: file.to_owned(),
            dev,
            size_bytes: size,
            _loop: None,
        })
    }

    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, AgentError> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&self.path)
            .map_err(|err| io_error("open", &self.path, err))?;
        let mut buf = AlignedBuf::new(len);
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(buf.as_mut_slice()))
            .map_err(|err| io_error("read", &self.path, err))?;
        Ok(buf.as_mut_slice().to_vec())
    }

    /// Writes and syncs, so the kernel targets that read the device next see it.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), AgentError> {
        let mut file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|err| io_error("open", &self.path, err))?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(data))
            .and_then(|()| file.sync_all())
            .map_err(|err| io_error("write", &self.path, err))
    }
}

fn create_sparse(file: &Path, size: u64) -> Result<bool, AgentError> {
    match OpenOptions::new().write(true).create_new(true).open(file) {
        Ok(created) => {
            created
                .set_len(size)
                .and_then(|()| created.sync_all())
                .map_err(|err| io_error("size", file, err))?;
            info!(file = %file.display(), size, "created the sparse pool file");
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(io_error("create", file, err)),
    }
}

/// The loop device already attached to `file`, if any.
fn attached_loop(file: &Path) -> Result<Option<PathBuf>, AgentError> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Ok(None);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let backing = entry.path().join("loop/backing_file");
        let Ok(text) = fs::read_to_string(&backing) else {
            continue;
        };
        if Path::new(text.trim_end()) == file {
            return Ok(Some(PathBuf::from("/dev").join(name)));
        }
    }
    Ok(None)
}

fn attach_loop(file: &Path) -> Result<LoopDevice, AgentError> {
    let control =
        LoopControl::open().map_err(|err| io_error("open", Path::new("/dev/loop-control"), err))?;
    // Another process may take the free device between lookup and attach.
    for _ in 0..20 {
        let device = control
            .next_free()
            .map_err(|err| io_error("find a free loop device for", file, err))?;
        match device.with().autoclear(true).attach(file) {
            Ok(()) => return Ok(device),
            Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(io_error("attach a loop device to", file, err)),
        }
    }
    Err(AgentError::Unavailable {
        reason: format!(
            "no loop device could be attached to {} after 20 tries",
            file.display()
        ),
    })
}

/// Device number and size of the block device at `path`, for a config
/// option: errors name the option.
fn block_device_for(path: &Path, option: &str) -> Result<(DevRef, u64), AgentError> {
    crate::dm::block_device(path).map_err(|err| AgentError::Config {
        option: option.to_owned(),
        reason: err.to_string(),
    })
}

fn io_error(op: &str, path: &Path, err: io::Error) -> AgentError {
    AgentError::Io {
        context: format!("cannot {op} {}", path.display()),
        source: err,
    }
}
