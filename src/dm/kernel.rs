//! The ioctl boundary: the only module that talks to device-mapper.
//!
//! Every call runs on tokio's blocking pool, never on the runtime's worker
//! threads, because ioctls such as a flushing suspend can block for as long as
//! in-flight I/O takes. Device nodes under `/dev/mapper` are created here when no
//! udev daemon does it, so `/dev/mapper/<name>` is stable on every host.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use devicemapper::{DM, DevId, DmError, DmFlags, DmName, DmOptions, errors as dm_errors};
use nix::{
    errno::Errno,
    sys::stat::{Mode, SFlag, makedev, mknod},
};
use tracing::{debug, warn};

use crate::{
    dm::{
        names::DeviceName,
        table::{DevRef, Table},
    },
    error::{Error, ParseError, Result},
};

const CONTROL_PATH: &str = "/dev/mapper/control";
const UDEV_CONTROL_PATH: &str = "/run/udev/control";

/// How a suspend treats I/O that targets hold back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Let targets flush and commit (required before replacing a clone or era
    /// table: their metadata is read at load time).
    Flush,
    /// Keep held I/O queued (e.g. a thin device waiting for pool space).
    NoFlush,
}

/// A loaded target type and its version, as `DM_LIST_VERSIONS` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetVersion {
    pub name: String,
    pub version: (u32, u32, u32),
}

/// What the kernel knows about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub name: DeviceName,
    pub device: DevRef,
    pub event_nr: u32,
    pub open_count: i32,
    pub suspended: bool,
    pub active_table: bool,
    pub inactive_table: bool,
}

impl DeviceState {
    /// `/dev/dm-<minor>`: created by devtmpfs, present with or without udev.
    pub fn dm_node(&self) -> PathBuf {
        PathBuf::from(format!("/dev/dm-{}", self.device.minor))
    }
}

/// One entry of `DM_LIST_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDevice {
    pub name: String,
    pub device: DevRef,
    pub event_nr: u32,
}

/// One segment's INFO status text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentStatus {
    pub start: u64,
    pub len: u64,
    pub target_type: String,
    pub text: String,
}

/// Handle on `/dev/mapper/control`. Cheap to clone.
#[derive(Clone)]
pub struct DeviceMapper {
    dm: Arc<DM>,
    nodes: NodePolicy,
}

impl std::fmt::Debug for DeviceMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMapper")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

/// Who creates `/dev/mapper/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodePolicy {
    /// udev is running: its rules create the node; we only fill a gap.
    Udev,
    /// No udev: we create and remove block nodes ourselves.
    Own,
}

impl DeviceMapper {
    /// Opens the control device. Fails with [`Error::DmUnavailable`] when the
    /// kernel has no device-mapper or we lack the privilege to use it.
    pub fn open() -> Result<Self> {
        if !Path::new(CONTROL_PATH).exists() {
            return Err(Error::DmUnavailable {
                reason: format!("{CONTROL_PATH} does not exist"),
            });
        }
        let dm = DM::new().map_err(|err| Error::DmUnavailable {
            reason: err.to_string(),
        })?;
        let nodes = if Path::new(UDEV_CONTROL_PATH).exists() {
            NodePolicy::Udev
        } else {
            NodePolicy::Own
        };
        Ok(Self {
            dm: Arc::new(dm),
            nodes,
        })
    }

    /// Hands the event monitor its own control fd. The fd's poll state is per
    /// open file, so the monitor must not share it with other callers.
    pub(crate) fn control_for_events(self) -> Result<DM> {
        Arc::try_unwrap(self.dm)
            .map_err(|_| Error::Other("the event monitor needs its own control handle".into()))
    }

    /// Runs a blocking closure over the control handle on the blocking pool.
    async fn blocking<T, F>(&self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&DM) -> Result<T> + Send + 'static,
    {
        let dm = Arc::clone(&self.dm);
        tokio::task::spawn_blocking(move || call(&dm))
            .await
            .map_err(|err| Error::Other(format!("device-mapper worker failed: {err}")))?
    }

    /// The ioctl interface version, e.g. (4, 47, 0).
    pub async fn version(&self) -> Result<(u32, u32, u32)> {
        self.blocking(|dm| dm.version().map_err(|err| ioctl_error("version", "-", err)))
            .await
    }

    /// Every target type the kernel has loaded, with its version.
    pub async fn target_versions(&self) -> Result<Vec<TargetVersion>> {
        self.blocking(|dm| {
            let versions = dm
                .list_versions()
                .map_err(|err| ioctl_error("list versions", "-", err))?;
            Ok(versions
                .into_iter()
                .map(|(name, a, b, c)| TargetVersion {
                    name,
                    version: (a, b, c),
                })
                .collect())
        })
        .await
    }

    /// Creates a device, loads `table` and activates it, then makes
    /// `/dev/mapper/<name>`. If the table does not load, the empty device is
    /// removed again so that a failed create leaves nothing behind.
    pub async fn create(
        &self,
        name: &DeviceName,
        uuid: Option<&str>,
        table: &Table,
    ) -> Result<DeviceState> {
        let name = name.clone();
        let uuid = uuid.map(str::to_owned);
        let table = table.clone();
        let nodes = self.nodes;
        self.blocking(move |dm| {
            create_device(dm, &name, uuid.as_deref())?;
            let activated =
                load_table(dm, &name, &table).and_then(|()| activate(dm, &name, &table));
            if let Err(err) = activated {
                discard_failed_create(dm, &name);
                return Err(err);
            }
            let state = device_state(dm, &name)?;
            ensure_mapper_node(nodes, &name, state.device)?;
            Ok(state)
        })
        .await
    }

    /// Loads `table` into the inactive slot without touching the live table.
    pub async fn load(&self, name: &DeviceName, table: &Table) -> Result<()> {
        let name = name.clone();
        let table = table.clone();
        self.blocking(move |dm| load_table(dm, &name, &table)).await
    }

    /// Suspends the device; I/O arriving meanwhile is queued, not failed.
    pub async fn suspend(&self, name: &DeviceName, flush: Flush) -> Result<()> {
        let name = name.clone();
        self.blocking(move |dm| suspend_device(dm, &name, flush))
            .await
    }

    /// Drops a table loaded into the inactive slot (none loaded is fine), so
    /// that the next resume keeps the live one.
    pub async fn clear_inactive(&self, name: &DeviceName) -> Result<()> {
        let name = name.clone();
        self.blocking(move |dm| clear_inactive_table(dm, &name))
            .await
    }

    /// Resumes the device, swapping in the inactive table if one is loaded.
    pub async fn resume(&self, name: &DeviceName) -> Result<DeviceState> {
        let name = name.clone();
        let nodes = self.nodes;
        self.blocking(move |dm| {
            resume_device(dm, &name)?;
            let state = device_state(dm, &name)?;
            ensure_mapper_node(nodes, &name, state.device)?;
            Ok(state)
        })
        .await
    }

    /// Atomically replaces the live table: suspend (with flush) -> load ->
    /// resume. Suspending first matters for clone and era: they read their
    /// metadata when a table is loaded, so loading beside a live instance would
    /// lose what it commits afterwards. If the new table is rejected the old one
    /// is resumed and keeps serving I/O.
    pub async fn swap_table(&self, name: &DeviceName, table: &Table) -> Result<DeviceState> {
        let name = name.clone();
        let table = table.clone();
        self.blocking(move |dm| {
            suspend_device(dm, &name, Flush::Flush)?;
            let swapped = load_table(dm, &name, &table).and_then(|()| activate(dm, &name, &table));
            if let Err(err) = swapped {
                // The rejected table is gone from the inactive slot, so this
                // resumes the old one.
                if let Err(resume_err) = resume_device(dm, &name) {
                    warn!(device = %name, error = %resume_err, "old table did not resume after a rejected swap");
                }
                return Err(err);
            }
            device_state(dm, &name)
        })
        .await
    }

    /// INFO status of every segment, read with `DM_NOFLUSH` so that clone and
    /// thin-pool do not commit metadata just because someone looked.
    pub async fn status(&self, name: &DeviceName) -> Result<Vec<SegmentStatus>> {
        self.read_status(name, DmFlags::DM_NOFLUSH).await
    }

    /// Parses the INFO status of the segment at `index`.
    pub async fn status_of<T>(&self, name: &DeviceName, index: usize) -> Result<T>
    where
        T: std::str::FromStr<Err = ParseError>,
    {
        parse_segment(name, &self.status(name).await?, index)
    }

    /// The live table, read back from the kernel and parsed.
    pub async fn table(&self, name: &DeviceName) -> Result<Table> {
        self.live_table(name)
            .await?
            .map(|(_, table)| table)
            .ok_or_else(|| Error::NoSuchDevice {
                device: name.to_string(),
            })
    }

    /// The device's number and live table, in one ioctl; `None` if it does
    /// not exist.
    pub async fn live_table(&self, name: &DeviceName) -> Result<Option<(DevRef, Table)>> {
        let name = name.clone();
        self.blocking(move |dm| {
            let options = DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE);
            let (info, lines) = match dm.table_status(&dev_id(&name)?, options) {
                Ok(read) => read,
                Err(err) => {
                    return match ioctl_error("status", name.as_str(), err) {
                        Error::NoSuchDevice { .. } => Ok(None),
                        other => Err(other),
                    };
                }
            };
            let device = info.device();
            Ok(Some((
                DevRef::from((device.major, device.minor)),
                Table::parse_lines(&lines)?,
            )))
        })
        .await
    }

    async fn read_status(&self, name: &DeviceName, flags: DmFlags) -> Result<Vec<SegmentStatus>> {
        let name = name.clone();
        self.blocking(move |dm| status_lines(dm, &name, flags))
            .await
    }

    /// Sends `message` to the target covering `sector`; returns its reply.
    pub async fn message(
        &self,
        name: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>> {
        let name = name.clone();
        let message = message.to_owned();
        self.blocking(move |dm| {
            debug!(device = %name, %message, "message");
            dm.target_msg(&dev_id(&name)?, Some(sector), &message)
                .map(|(_, reply)| reply)
                .map_err(|err| ioctl_error("message", name.as_str(), err))
        })
        .await
    }

    /// See [`super::seam::Kernel::resume_loaded_if`].
    pub async fn resume_loaded_if(
        &self,
        name: &DeviceName,
        switch: super::held::SwitchCheck,
    ) -> Result<super::held::HeldSwap> {
        let name = name.clone();
        self.blocking(move |dm| {
            let steps = super::held::SwapSteps {
                suspend: |name: &DeviceName| suspend_device(dm, name, Flush::Flush),
                resume: |name: &DeviceName| resume_device(dm, name),
                status: || status_lines(dm, &name, DmFlags::DM_NOFLUSH),
                drop_loaded: || clear_inactive_table(dm, &name),
            };
            super::held::resume_loaded_if(&name, steps, switch)
        })
        .await
    }

    /// Sends a target message while each device of `hold` is suspended with
    /// flush, in one blocking call that resumes them on every path (see
    /// [`super::held`]).
    pub async fn message_while_suspended(
        &self,
        hold: &[DeviceName],
        target: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>> {
        let (hold, target, message) = (hold.to_vec(), target.clone(), message.to_owned());
        self.blocking(move |dm| {
            super::held::while_suspended(
                &hold,
                |name| suspend_device(dm, name, Flush::Flush),
                |name| resume_device(dm, name),
                || {
                    dm.target_msg(&dev_id(&target)?, Some(sector), &message)
                        .map(|(_, reply)| reply)
                        .map_err(|err| ioctl_error("message", target.as_str(), err))
                },
            )
        })
        .await
    }

    /// Removes the device and its `/dev/mapper` node. The crate retries EBUSY
    /// (5 tries, 200 ms apart); a device still open after that is reported as
    /// [`Error::DeviceBusy`] and left alone.
    pub async fn remove(&self, name: &DeviceName) -> Result<()> {
        let name = name.clone();
        let nodes = self.nodes;
        self.blocking(move |dm| {
            let state = device_state(dm, &name)?;
            match dm.device_remove(&dev_id(&name)?, DmOptions::default()) {
                Ok(_) => {}
                Err(err) if errno_of(&err) == Some(Errno::EBUSY) => {
                    let open_count = device_state(dm, &name).map_or(-1, |s| s.open_count);
                    return Err(Error::DeviceBusy {
                        device: name.to_string(),
                        open_count,
                    });
                }
                Err(err) => return Err(ioctl_error("remove", name.as_str(), err)),
            }
            remove_mapper_node(nodes, &name, state.device)
        })
        .await
    }

    /// Current state of one device, or `None` if it does not exist.
    pub async fn info(&self, name: &DeviceName) -> Result<Option<DeviceState>> {
        let name = name.clone();
        self.blocking(move |dm| match device_state(dm, &name) {
            Ok(state) => Ok(Some(state)),
            Err(Error::NoSuchDevice { .. }) => Ok(None),
            Err(err) => Err(err),
        })
        .await
    }

    /// The state of each device (`None`: it does not exist), read in one
    /// worker call: many devices cost no more hops to the blocking pool
    /// than one.
    pub async fn infos(&self, names: Vec<DeviceName>) -> Result<Vec<Option<DeviceState>>> {
        self.blocking(move |dm| {
            names
                .iter()
                .map(|name| match device_state(dm, name) {
                    Ok(state) => Ok(Some(state)),
                    Err(Error::NoSuchDevice { .. }) => Ok(None),
                    Err(err) => Err(err),
                })
                .collect()
        })
        .await
    }

    /// Every device-mapper device on the host with its event counter.
    pub async fn list(&self) -> Result<Vec<ListedDevice>> {
        self.blocking(list_devices).await
    }
}

/// Parses the INFO status text of the segment at `index`.
pub(crate) fn parse_segment<T>(
    name: &DeviceName,
    segments: &[SegmentStatus],
    index: usize,
) -> Result<T>
where
    T: std::str::FromStr<Err = ParseError>,
{
    let segment = segments.get(index).ok_or_else(|| {
        Error::Other(format!(
            "device {name} has {} segments, no segment {index}",
            segments.len()
        ))
    })?;
    Ok(segment.text.parse::<T>()?)
}

/// `DM_LIST_DEVICES`, shared with the event monitor.
pub(crate) fn list_devices(dm: &DM) -> Result<Vec<ListedDevice>> {
    let devices = dm
        .list_devices()
        .map_err(|err| ioctl_error("list", "-", err))?;
    devices
        .into_iter()
        .map(|(name, device, event_nr)| {
            // Event numbers in the list need ioctl interface 4.37 (Linux 4.14).
            let event_nr = event_nr.ok_or_else(|| Error::DmUnavailable {
                reason: "the kernel's device-mapper is older than ioctl 4.37".into(),
            })?;
            Ok(ListedDevice {
                name: name.to_string(),
                device: DevRef::from((device.major, device.minor)),
                event_nr,
            })
        })
        .collect()
}

/// Re-arms the control fd's poll state; see [`crate::dm::events`].
pub(crate) fn arm_poll(dm: &DM) -> Result<()> {
    dm.arm_poll()
        .map(|_| ())
        .map_err(|err| ioctl_error("arm poll", "-", err))
}

fn dev_id(name: &DeviceName) -> Result<DevId<'_>> {
    let dm_name = DmName::new(name.as_str()).map_err(|err| Error::InvalidName {
        name: name.to_string(),
        reason: err.to_string(),
    })?;
    Ok(DevId::Name(dm_name))
}

fn create_device(dm: &DM, name: &DeviceName, uuid: Option<&str>) -> Result<()> {
    let dm_name = DmName::new(name.as_str()).map_err(|err| Error::InvalidName {
        name: name.to_string(),
        reason: err.to_string(),
    })?;
    let dm_uuid = uuid
        .map(devicemapper::DmUuid::new)
        .transpose()
        .map_err(|err| Error::InvalidName {
            name: name.to_string(),
            reason: format!("uuid: {err}"),
        })?;
    debug!(device = %name, "create");
    dm.device_create(dm_name, dm_uuid, DmOptions::default())
        .map(|_| ())
        .map_err(|err| ioctl_error("create", name.as_str(), err))
}

fn load_table(dm: &DM, name: &DeviceName, table: &Table) -> Result<()> {
    debug!(device = %name, table = %table, "load");
    dm.table_load(
        &dev_id(name)?,
        &table.to_ioctl_targets(),
        DmOptions::default(),
    )
    .map(|_| ())
    .map_err(|err| rejected_table(dm, name, table, err, "load"))
}

/// Resumes a freshly loaded table. The kernel checks some things only now
/// (e.g. that every mapped range fits its underlying device), so a failure
/// here is also the table's fault.
fn activate(dm: &DM, name: &DeviceName, table: &Table) -> Result<()> {
    debug!(device = %name, "resume");
    dm.device_suspend(&dev_id(name)?, DmOptions::default())
        .map(|_| ())
        .map_err(|err| rejected_table(dm, name, table, err, "resume"))
}

/// ENXIO means either our device or a device the table refers to is missing;
/// only the first is "no such device".
fn rejected_table(
    dm: &DM,
    name: &DeviceName,
    table: &Table,
    err: DmError,
    op: &'static str,
) -> Error {
    let Some(errno) = errno_of(&err) else {
        return ioctl_error(op, name.as_str(), err);
    };
    if errno == Errno::ENXIO && matches!(device_state(dm, name), Err(Error::NoSuchDevice { .. })) {
        return Error::NoSuchDevice {
            device: name.to_string(),
        };
    }
    Error::TableLoad {
        device: name.to_string(),
        errno,
        table: table.to_string(),
    }
}

/// Best effort: a create whose table was rejected must not leave an empty
/// device behind, but the load error is what the caller needs to see.
fn discard_failed_create(dm: &DM, name: &DeviceName) {
    let removed = dev_id(name).and_then(|id| {
        dm.device_remove(&id, DmOptions::default())
            .map_err(|err| ioctl_error("remove", name.as_str(), err))
    });
    if let Err(err) = removed {
        warn!(device = %name, error = %err, "could not remove a device whose table was rejected");
    }
}

fn suspend_device(dm: &DM, name: &DeviceName, flush: Flush) -> Result<()> {
    let mut flags = DmFlags::DM_SUSPEND;
    if flush == Flush::NoFlush {
        flags |= DmFlags::DM_NOFLUSH;
    }
    debug!(device = %name, ?flush, "suspend");
    dm.device_suspend(&dev_id(name)?, DmOptions::default().set_flags(flags))
        .map(|_| ())
        .map_err(|err| ioctl_error("suspend", name.as_str(), err))
}

fn clear_inactive_table(dm: &DM, name: &DeviceName) -> Result<()> {
    debug!(device = %name, "clear inactive table");
    dm.table_clear(&dev_id(name)?)
        .map(drop)
        .map_err(|err| ioctl_error("table clear", name.as_str(), err))
}

fn status_lines(dm: &DM, name: &DeviceName, flags: DmFlags) -> Result<Vec<SegmentStatus>> {
    let options = DmOptions::default().set_flags(flags);
    let (_, lines) = dm
        .table_status(&dev_id(name)?, options)
        .map_err(|err| ioctl_error("status", name.as_str(), err))?;
    Ok(lines
        .into_iter()
        .map(|(start, len, target_type, text)| SegmentStatus {
            start,
            len,
            target_type,
            text,
        })
        .collect())
}

fn resume_device(dm: &DM, name: &DeviceName) -> Result<()> {
    debug!(device = %name, "resume");
    dm.device_suspend(&dev_id(name)?, DmOptions::default())
        .map(|_| ())
        .map_err(|err| ioctl_error("resume", name.as_str(), err))
}

fn device_state(dm: &DM, name: &DeviceName) -> Result<DeviceState> {
    let info = dm
        .device_info(&dev_id(name)?)
        .map_err(|err| ioctl_error("info", name.as_str(), err))?;
    let flags = info.flags();
    let device = info.device();
    Ok(DeviceState {
        name: name.clone(),
        device: DevRef::from((device.major, device.minor)),
        event_nr: info.event_nr(),
        open_count: info.open_count(),
        suspended: flags.contains(DmFlags::DM_SUSPEND),
        active_table: flags.contains(DmFlags::DM_ACTIVE_PRESENT),
        inactive_table: flags.contains(DmFlags::DM_INACTIVE_PRESENT),
    })
}

/// Makes `/dev/mapper/<name>` a block node for `device`. With udev running the
/// node is udev's (the crate waited for its cookie), so we only fill a gap.
fn ensure_mapper_node(policy: NodePolicy, name: &DeviceName, device: DevRef) -> Result<()> {
    let path = name.mapper_path();
    let wanted = makedev(u64::from(device.major), u64::from(device.minor));
    match fs::metadata(&path) {
        Ok(meta) if meta.file_type().is_block_device() && meta.rdev() == wanted => return Ok(()),
        Ok(_) if policy == NodePolicy::Udev => return Ok(()),
        Ok(_) => remove_node(&path)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Io {
                context: "cannot inspect device node",
                path,
                source,
            });
        }
    }
    mknod(
        &path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        wanted,
    )
    .map_err(|errno| Error::Io {
        context: "cannot create device node",
        path: path.clone(),
        source: io::Error::from(errno),
    })
}

/// Removes the node we made; a udev-owned node is left to udev.
fn remove_mapper_node(policy: NodePolicy, name: &DeviceName, device: DevRef) -> Result<()> {
    if policy == NodePolicy::Udev {
        return Ok(());
    }
    let path = name.mapper_path();
    let ours = makedev(u64::from(device.major), u64::from(device.minor));
    match fs::metadata(&path) {
        Ok(meta) if meta.file_type().is_block_device() && meta.rdev() == ours => remove_node(&path),
        // Someone else's node, or none: not ours to delete.
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            context: "cannot inspect device node",
            path,
            source,
        }),
    }
}

fn remove_node(path: &Path) -> Result<()> {
    fs::remove_file(path).map_err(|source| Error::Io {
        context: "cannot remove stale device node",
        path: path.to_owned(),
        source,
    })
}

fn errno_of(err: &DmError) -> Option<Errno> {
    match err {
        DmError::Core(dm_errors::Error::Ioctl(_, _, _, errno)) => Some(**errno),
        _ => None,
    }
}

fn ioctl_error(op: &'static str, device: &str, err: DmError) -> Error {
    match errno_of(&err) {
        Some(Errno::ENXIO) => Error::NoSuchDevice {
            device: device.to_owned(),
        },
        Some(errno) => Error::Ioctl {
            op,
            device: device.to_owned(),
            errno,
            detail: describe(op, errno),
        },
        None => Error::Other(format!("{op} on {device:?}: {err}")),
    }
}

/// A short hint per errno, so an operator need not read the crate's header dump.
fn describe(op: &str, errno: Errno) -> String {
    match errno {
        Errno::EINVAL => format!("the kernel rejected the {op}; see the kernel log"),
        Errno::EBUSY => "the device is in use".to_owned(),
        Errno::EEXIST => "a device with this name or uuid already exists".to_owned(),
        Errno::EPERM | Errno::EACCES => "device-mapper needs CAP_SYS_ADMIN".to_owned(),
        Errno::ENOTSUP => "the target does not support this in its current mode".to_owned(),
        other => other.desc().to_owned(),
    }
}
