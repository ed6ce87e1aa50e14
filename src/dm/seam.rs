//! The seam between the agent's logic and the kernel: what the services need
//! from device-mapper, as one narrow trait. [`LiveKernel`] is the real thing
//! (ioctls through [`DeviceMapper`], events through [`EventMonitor`]); the
//! in-memory fake in [`super::fake`] lets host tests drive every state
//! transition of the domain in seconds. The real-kernel tests stay the proof.

use std::{fmt, ops::Range, path::Path, str::FromStr};

use async_trait::async_trait;

use crate::{
    dm::{
        events::EventMonitor,
        kernel::{DeviceMapper, DeviceState, Flush, ListedDevice, SegmentStatus, TargetVersion},
        names::DeviceName,
        status::{CloneStatus, Health},
        table::{DevRef, Table},
    },
    error::{AgentError, Error, ParseError, Result},
};

/// How long an open that is not a user's may last: see
/// [`Kernel::settled_open_count`]: as long as dmsetup retries a busy
/// removal, and enough for a short-lived child that inherited the device to
/// exit on a loaded host.
const TRANSIENT_OPEN: std::time::Duration = std::time::Duration::from_secs(5);
const TRANSIENT_OPEN_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Everything the agent asks of device-mapper. Method semantics are those
/// of [`DeviceMapper`] (and [`EventMonitor`] for the two event calls).
#[async_trait]
pub trait Kernel: Send + Sync + fmt::Debug {
    /// The ioctl interface version, e.g. (4, 47, 0).
    async fn version(&self) -> Result<(u32, u32, u32)>;
    /// Every loaded target type with its version.
    async fn target_versions(&self) -> Result<Vec<TargetVersion>>;
    /// Creates, loads and activates a device; a rejected table leaves nothing.
    async fn create(
        &self,
        name: &DeviceName,
        uuid: Option<&str>,
        table: &Table,
    ) -> Result<DeviceState>;
    /// Loads `table` into the inactive slot.
    async fn load(&self, name: &DeviceName, table: &Table) -> Result<()>;
    async fn suspend(&self, name: &DeviceName, flush: Flush) -> Result<()>;
    /// Drops an inactive table, so the next resume keeps the live one.
    async fn clear_inactive(&self, name: &DeviceName) -> Result<()>;
    /// Resumes, swapping in the inactive table if one is loaded.
    async fn resume(&self, name: &DeviceName) -> Result<DeviceState>;
    /// Suspend (flush), load, resume; the old table keeps serving on failure.
    async fn swap_table(&self, name: &DeviceName, table: &Table) -> Result<DeviceState>;
    /// INFO status of every segment (read without flushing).
    async fn status(&self, name: &DeviceName) -> Result<Vec<SegmentStatus>>;
    /// The live table, parsed.
    async fn table(&self, name: &DeviceName) -> Result<Table>;
    /// The device's number and live table in one call, or `None` if it does
    /// not exist: what adopting a device needs.
    async fn live_table(&self, name: &DeviceName) -> Result<Option<(DevRef, Table)>>;
    /// Sends a target message to the segment covering `sector`.
    async fn message(
        &self,
        name: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>>;
    /// Suspends `name` (with flush; a table waits in its inactive slot),
    /// reads its status and resumes, onto the loaded table if `switch`
    /// accepts the status, else onto the live one: one step that resumes on
    /// every path (see [`super::held::resume_loaded_if`]).
    async fn resume_loaded_if(
        &self,
        name: &DeviceName,
        switch: super::held::SwitchCheck,
    ) -> Result<super::held::HeldSwap>;
    /// Sends a target message while every device of `hold` is suspended
    /// with flush (in order), resuming them on every path, as one step that
    /// no caller can stop half-way.
    async fn message_while_suspended(
        &self,
        hold: &[DeviceName],
        target: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>>;
    /// Removes the device; [`Error::DeviceBusy`] while it is open.
    async fn remove(&self, name: &DeviceName) -> Result<()>;
    /// The device's state, or `None` if it does not exist.
    async fn info(&self, name: &DeviceName) -> Result<Option<DeviceState>>;
    /// The state of each device, as [`Kernel::info`], in one call.
    async fn infos(&self, names: Vec<DeviceName>) -> Result<Vec<Option<DeviceState>>>;
    /// The device's open count once transient openers had time to let go,
    /// or `None` if it does not exist. A process forked while a caller held
    /// the device keeps a descriptor until it execs, and udev probes a
    /// device after each close of a write: both hold it open for moments
    /// after its user closed it (the reason `dmsetup remove --retry` exists).
    async fn settled_open_count(&self, name: &DeviceName) -> Result<Option<i32>>;
    /// Every device-mapper device of the host.
    async fn list(&self) -> Result<Vec<ListedDevice>>;
    /// Overwrites the device's first 4 KiB with zeros, so that a target
    /// formats fresh metadata there instead of adopting old blocks.
    async fn zero_first_block(&self, name: &DeviceName) -> Result<()>;
    /// Sends the device a cache flush (an fsync of its node). dm-clone
    /// answers one by committing its metadata at once, which also raises
    /// its completion event when every region is in.
    async fn flush(&self, name: &DeviceName) -> Result<()>;
    /// Discards the byte ranges of the device (BLKDISCARD), in order. A
    /// dm-clone marks every region a discard covers whole as hydrated
    /// without copying it, and with `no_discard_passdown` leaves the
    /// destination's blocks as they are: how a clone over an older copy
    /// of its source skips the regions known to be unchanged.
    async fn discard(&self, name: &DeviceName, ranges: Vec<Range<u64>>) -> Result<()>;
    /// `length` bytes of the device from `offset`, past the page cache
    /// (both multiples of 4 KiB).
    async fn read_at(&self, name: &DeviceName, offset: u64, length: usize) -> Result<Vec<u8>>;
    /// Writes `data` to the device from `offset`, past the page cache (both
    /// multiples of 4 KiB); on the device once it is flushed.
    async fn write_at(&self, name: &DeviceName, offset: u64, data: Vec<u8>) -> Result<()>;
    /// The number and size in bytes of the block device at `path` (a
    /// transfer's local source).
    async fn block_device(&self, path: &Path) -> Result<(DevRef, u64), AgentError>;
    /// What identifies the block device `dev` at `path` across reboots
    /// (see [`super::topology::identity`]).
    async fn device_identity(&self, path: &Path, dev: DevRef) -> Result<String, AgentError>;
    /// The device's event counter as last seen by the event watcher.
    fn event_counter(&self, name: &DeviceName) -> Option<u32>;
    /// Waits until the device's event counter differs from `seen`.
    async fn wait_for_event(&self, name: &DeviceName, seen: u32) -> Result<u32>;
}

impl dyn Kernel + '_ {
    /// Parses the INFO status of the segment at `index`.
    pub async fn status_of<T>(&self, name: &DeviceName, index: usize) -> Result<T>
    where
        T: FromStr<Err = ParseError>,
    {
        crate::dm::kernel::parse_segment(name, &self.status(name).await?, index)
    }
}

/// The host's device-mapper: the ioctl handle and the event watcher.
#[derive(Debug)]
pub struct LiveKernel {
    dm: DeviceMapper,
    events: EventMonitor,
}

impl LiveKernel {
    /// Opens `/dev/mapper/control` and starts watching device events.
    pub fn open() -> Result<Self> {
        Ok(Self::from_parts(
            DeviceMapper::open()?,
            EventMonitor::start()?,
        ))
    }

    /// A kernel over handles a caller already holds (the benches keep using
    /// the ioctl handle directly beside it).
    pub fn from_parts(dm: DeviceMapper, events: EventMonitor) -> Self {
        Self { dm, events }
    }
}

#[async_trait]
impl Kernel for LiveKernel {
    async fn version(&self) -> Result<(u32, u32, u32)> {
        self.dm.version().await
    }

    async fn target_versions(&self) -> Result<Vec<TargetVersion>> {
        self.dm.target_versions().await
    }

    async fn create(
        &self,
        name: &DeviceName,
        uuid: Option<&str>,
        table: &Table,
    ) -> Result<DeviceState> {
        self.dm.create(name, uuid, table).await
    }

    async fn load(&self, name: &DeviceName, table: &Table) -> Result<()> {
        self.dm.load(name, table).await
    }

    async fn suspend(&self, name: &DeviceName, flush: Flush) -> Result<()> {
        self.dm.suspend(name, flush).await
    }

    async fn clear_inactive(&self, name: &DeviceName) -> Result<()> {
        self.dm.clear_inactive(name).await
    }

    async fn resume(&self, name: &DeviceName) -> Result<DeviceState> {
        self.dm.resume(name).await
    }

    async fn swap_table(&self, name: &DeviceName, table: &Table) -> Result<DeviceState> {
        self.dm.swap_table(name, table).await
    }

    async fn status(&self, name: &DeviceName) -> Result<Vec<SegmentStatus>> {
        self.dm.status(name).await
    }

    async fn table(&self, name: &DeviceName) -> Result<Table> {
        self.dm.table(name).await
    }

    async fn live_table(&self, name: &DeviceName) -> Result<Option<(DevRef, Table)>> {
        self.dm.live_table(name).await
    }

    async fn message(
        &self,
        name: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>> {
        self.dm.message(name, sector, message).await
    }

    async fn resume_loaded_if(
        &self,
        name: &DeviceName,
        switch: super::held::SwitchCheck,
    ) -> Result<super::held::HeldSwap> {
        self.dm.resume_loaded_if(name, switch).await
    }

    async fn message_while_suspended(
        &self,
        hold: &[DeviceName],
        target: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>> {
        self.dm
            .message_while_suspended(hold, target, sector, message)
            .await
    }

    async fn remove(&self, name: &DeviceName) -> Result<()> {
        self.dm.remove(name).await
    }

    async fn info(&self, name: &DeviceName) -> Result<Option<DeviceState>> {
        self.dm.info(name).await
    }

    async fn infos(&self, names: Vec<DeviceName>) -> Result<Vec<Option<DeviceState>>> {
        self.dm.infos(names).await
    }

    async fn settled_open_count(&self, name: &DeviceName) -> Result<Option<i32>> {
        let deadline = tokio::time::Instant::now() + TRANSIENT_OPEN;
        loop {
            let open = self.dm.info(name).await?.map(|state| state.open_count);
            if open.is_none_or(|count| count == 0) || tokio::time::Instant::now() >= deadline {
                return Ok(open);
            }
            tokio::time::sleep(TRANSIENT_OPEN_POLL).await;
        }
    }

    async fn list(&self) -> Result<Vec<ListedDevice>> {
        self.dm.list().await
    }

    async fn zero_first_block(&self, name: &DeviceName) -> Result<()> {
        let path = name.mapper_path();
        tokio::task::spawn_blocking(move || zero_head(&path))
            .await
            .map_err(|err| Error::Other(format!("zeroing worker failed: {err}")))?
    }

    async fn flush(&self, name: &DeviceName) -> Result<()> {
        let path = name.mapper_path();
        tokio::task::spawn_blocking(move || flush_device(&path))
            .await
            .map_err(|err| Error::Other(format!("flush worker failed: {err}")))?
    }

    async fn discard(&self, name: &DeviceName, ranges: Vec<Range<u64>>) -> Result<()> {
        let path = name.mapper_path();
        tokio::task::spawn_blocking(move || discard_ranges(&path, &ranges))
            .await
            .map_err(|err| Error::Other(format!("discard worker failed: {err}")))?
    }

    async fn read_at(&self, name: &DeviceName, offset: u64, length: usize) -> Result<Vec<u8>> {
        let path = name.mapper_path();
        tokio::task::spawn_blocking(move || {
            super::direct_io::read_at(&path, offset, length).map_err(io_error("cannot read", &path))
        })
        .await
        .map_err(|err| Error::Other(format!("read worker failed: {err}")))?
    }

    async fn write_at(&self, name: &DeviceName, offset: u64, data: Vec<u8>) -> Result<()> {
        let path = name.mapper_path();
        tokio::task::spawn_blocking(move || {
            super::direct_io::write_at(&path, offset, &data)
                .map_err(io_error("cannot write", &path))
        })
        .await
        .map_err(|err| Error::Other(format!("write worker failed: {err}")))?
    }

    async fn block_device(&self, path: &Path) -> Result<(DevRef, u64), AgentError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || block_device(&path))
            .await
            .map_err(|err| AgentError::Internal(format!("block device worker failed: {err}")))?
    }

    async fn device_identity(&self, path: &Path, dev: DevRef) -> Result<String, AgentError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            super::topology::identity(&super::topology::Sysfs::default(), &path, dev).map_err(
                |source| AgentError::Io {
                    context: format!("cannot identify {}", path.display()),
                    source,
                },
            )
        })
        .await
        .map_err(|err| AgentError::Internal(format!("identity worker failed: {err}")))?
    }

    fn event_counter(&self, name: &DeviceName) -> Option<u32> {
        self.events.counter(name)
    }

    async fn wait_for_event(&self, name: &DeviceName, seen: u32) -> Result<u32> {
        self.events.wait_for_event(name, seen).await
    }
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io {
        context,
        path,
        source,
    }
}

/// Flushes the device's write cache; reading rights suffice for that.
fn flush_device(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(io_error("cannot flush", path))
}

/// Discards each range of the device at `path`.
fn discard_ranges(path: &Path, ranges: &[Range<u64>]) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("cannot open for discarding", path))?;
    tracing::debug!(device = %path.display(), ranges = ranges.len(), "discard");
    for range in ranges.iter().filter(|range| !range.is_empty()) {
        block_ioctl::discard(&file, range).map_err(|errno| {
            io_error("cannot discard a range of", path)(std::io::Error::from(errno))
        })?;
    }
    Ok(())
}

/// The one block-layer ioctl the agent issues: nix declares it, and only
/// as an `unsafe fn`; no maintained crate offers it safely.
#[allow(unsafe_code)]
mod block_ioctl {
    use std::{fs::File, ops::Range, os::fd::AsRawFd};

    // BLKDISCARD is _IO(0x12, 119) in <linux/fs.h>, taking a u64 pair.
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);

    pub(super) fn discard(file: &File, range: &Range<u64>) -> nix::Result<()> {
        let span = [range.start, range.end - range.start];
        // SAFETY: BLKDISCARD reads two u64 (offset, length) through the
        // pointer, which points at `span` for the whole call, and `file`
        // keeps the descriptor open until the call returns.
        unsafe { blkdiscard(file.as_raw_fd(), &span) }.map(drop)
    }
}

/// Writes zeros over the first 4 KiB and syncs them to the device.
fn zero_head(path: &Path) -> Result<()> {
    use std::io::Write;
    let io_error = |context| io_error(context, path);
    tracing::debug!(device = %path.display(), "zero the first block");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("cannot open for zeroing"))?;
    file.write_all(&[0u8; 4096])
        .and_then(|()| file.sync_all())
        .map_err(io_error("cannot zero the first block of"))
}

/// Device number and size of the block device at `path`.
pub(crate) fn block_device(path: &Path) -> Result<(DevRef, u64), AgentError> {
    use std::{
        io::Seek,
        os::unix::fs::{FileTypeExt, MetadataExt},
    };
    let meta = std::fs::metadata(path).map_err(|source| AgentError::Io {
        context: format!("cannot inspect {}", path.display()),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(AgentError::InvalidArgument {
            field: "device",
            reason: format!("{} is not a block device", path.display()),
        });
    }
    let rdev = meta.rdev();
    let dev = DevRef::from((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ));
    let size = std::fs::File::open(path)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .map_err(|source| AgentError::Io {
            context: format!("cannot size {}", path.display()),
            source,
        })?;
    Ok((dev, size))
}

/// Tells a clone to hydrate or not unless its status says it does; a
/// clone the kernel stopped is left to its monitor to report.
async fn switch_hydration(dm: &dyn Kernel, name: &DeviceName, hydrate: bool) -> Result<()> {
    let status = dm.status_of::<Health<CloneStatus>>(name, 0).await?;
    if let Health::Running(status) = status
        && status.features.no_hydration == hydrate
    {
        let message = if hydrate {
            "enable_hydration"
        } else {
            "disable_hydration"
        };
        dm.message(name, 0, message).await?;
    }
    Ok(())
}

/// Makes `name` carry `table`: creates it, adopts it when it already does,
/// swaps the table when `may_swap` allows it, and refuses otherwise.
pub async fn ensure_device(
    dm: &dyn Kernel,
    name: &DeviceName,
    table: &Table,
    may_swap: impl Fn(&Table) -> bool,
) -> Result<DevRef, AgentError> {
    match dm.live_table(name).await? {
        None => Ok(dm.create(name, None, table).await?.device),
        Some(found) => adopt(dm, name, found, table, may_swap).await,
    }
}

/// Makes the existing device `name`, found as `device` with the live table
/// `live`, carry `table` (see [`ensure_device`]). A clone differing only in
/// what messages set is kept, with no pause of its I/O, and told the
/// hydration switch of `table` where its status says otherwise; its copy
/// knobs are its monitor's, which reads them from the same status.
pub async fn adopt(
    dm: &dyn Kernel,
    name: &DeviceName,
    (device, live): (DevRef, Table),
    table: &Table,
    may_swap: impl Fn(&Table) -> bool,
) -> Result<DevRef, AgentError> {
    if live.differs_only_in_messages(table) {
        if let Some(hydrate) = table.clone_hydration() {
            switch_hydration(dm, name, hydrate).await?;
        }
        return Ok(device);
    }
    if may_swap(&live) {
        return Ok(dm.swap_table(name, table).await?.device);
    }
    Err(AgentError::Conflict(format!(
        "device-mapper device {name} has table \"{live}\", expected \"{table}\""
    )))
}
