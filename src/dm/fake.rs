//! An in-memory device-mapper for host tests of the domain logic.
//!
//! It models what the agent's decisions depend on: devices and their
//! live/inactive tables, suspend state, open counts (a table holds the
//! devices it maps open, as the kernel does), event counters, a thin pool's
//! thin ids and allocation, dm-era's era counter and dm-clone's hydration
//! progress (both kept with the metadata's thin id, so they survive a
//! device's re-creation as they survive it on disk). It does not move data.
//! Where the kernel refuses (a missing device in a table, removing an open
//! device, deleting an active thin id, a message to a suspended dm-era) the
//! fake refuses with the same error the ioctl layer produces.
//!
//! Test-only: compiled for unit tests and the `kernel-fake` feature, never a
//! runtime mode of the agent.

use crate::units::Sectors;
use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use async_trait::async_trait;
use nix::errno::Errno;
use tokio::sync::watch;

use crate::{
    dm::{
        Kernel,
        kernel::{DeviceState, Flush, ListedDevice, SegmentStatus, TargetVersion},
        names::DeviceName,
        status::{CloneFeatures, CloneMode, CloneStatus, EraStatus, Usage},
        table::{CloneParams, DevRef, Table, Target, Thin},
    },
    error::{Error, Result},
};

/// Device numbers of devices the fake did not make (a pool's backing).
const EXTERNAL_MAJOR: u32 = 7;
const DM_MAJOR: u32 = 253;

/// Where a thin device's content lives: the pool (by name, which a reboot
/// keeps, unlike its device number) and the thin id.
type ThinKey = (String, u32);

#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
    events: Option<watch::Sender<u64>>,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<String, Device>,
    /// Block devices that exist outside device-mapper, with their sectors.
    external: BTreeMap<DevRef, u64>,
    next_minor: u32,
    next_external: u32,
    /// Thin ids of every pool, with what they hold.
    thins: BTreeMap<ThinKey, ThinContent>,
    /// Paths of block devices outside device-mapper.
    paths: BTreeMap<std::path::PathBuf, DevRef>,
    /// One-shot failures: (operation, device) -> errno.
    faults: Vec<(&'static str, String, Errno)>,
    /// Every call that changed something, for order checks.
    journal: Vec<String>,
    /// Status reads, to tell polling from waiting.
    status_reads: u64,
    /// The event monitor failed: every wait for an event fails at once.
    events_failed: bool,
    /// Bytes read through `read_at`.
    bytes_read: u64,
}

#[derive(Debug, Clone)]
struct Device {
    dev: DevRef,
    live: Option<Table>,
    inactive: Option<Table>,
    suspended: bool,
    /// Opens from outside device-mapper (an attached instance).
    external_opens: i32,
    /// Opens that end by themselves (a forked process, a udev probe): they
    /// count until someone waits for the device to settle.
    transient_opens: i32,
    event_nr: u32,
    /// The live clone as messages left it: its status reports it, while its
    /// table reads back as built (as the kernel's do), until the next load.
    told: Option<CloneParams>,
}

/// What a thin id holds, as far as the domain can see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ThinContent {
    mapped_sectors: u64,
    /// dm-era's era when the thin id holds formatted era metadata.
    era: Option<u32>,
    held_metadata_snapshot: bool,
    /// dm-clone's hydrated regions when it holds clone metadata.
    hydrated_regions: Option<u64>,
    /// What was written through `write_at`, by 4 KiB page; other pages
    /// read as zeros.
    pages: BTreeMap<u64, Vec<u8>>,
}

impl FakeKernel {
    pub fn new() -> Self {
        let (events, _) = watch::channel(0);
        Self {
            state: Mutex::default(),
            events: Some(events),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// A block device outside device-mapper (e.g. a pool's backing device).
    pub fn add_block_device(&self, sectors: u64) -> DevRef {
        let mut state = self.state();
        state.next_external += 1;
        let dev = DevRef::from((EXTERNAL_MAJOR, state.next_external));
        state.external.insert(dev, sectors);
        dev
    }

    /// A block device outside device-mapper at `path` (a transfer's source).
    pub fn add_block_device_at(&self, path: &std::path::Path, sectors: u64) -> DevRef {
        let dev = self.add_block_device(sectors);
        self.state().paths.insert(path.to_owned(), dev);
        dev
    }

    /// The path names `dev` from now on (a disk renamed by a reboot).
    pub fn point_at(&self, path: &std::path::Path, dev: DevRef) {
        self.state().paths.insert(path.to_owned(), dev);
    }

    /// The device at `path`, if the fake has one there.
    pub fn device_at(&self, path: &std::path::Path) -> Option<DevRef> {
        self.state().paths.get(path).copied()
    }

    /// Something outside device-mapper opens the device (a VM attaches).
    pub fn open_device(&self, name: &str) {
        self.device_mut(name, |device| device.external_opens += 1);
    }

    pub fn close_device(&self, name: &str) {
        self.device_mut(name, |device| device.external_opens -= 1);
    }

    /// Something holds the device open for a moment (a udev probe).
    pub fn open_briefly(&self, name: &str) {
        self.device_mut(name, |device| device.transient_opens += 1);
    }

    /// Writes `sectors` more sectors to a thin device (allocates them).
    pub fn write(&self, name: &str, sectors: u64) {
        let mut state = self.state();
        let key = state.thin_key_of(name).expect("a thin device");
        state.thins.entry(key).or_default().mapped_sectors += sectors;
    }

    /// Writes through a clone device land in `regions` regions, which
    /// dm-clone then counts hydrated (no event: the copy is not complete).
    pub fn write_regions(&self, name: &str, regions: u64) {
        let mut state = self.state();
        let (clone, _) = state.clone_of(name).expect("a clone device");
        let key = state
            .thin_behind(clone.metadata)
            .expect("clone metadata on a thin device");
        state.thins.entry(key).or_default().hydrated_regions = Some(regions);
    }

    /// dm-clone copies every region of the device's clone segment, then
    /// raises its event, as the kernel does when hydration completes.
    pub fn hydrate(&self, name: &str) {
        {
            let mut state = self.state();
            let (clone, len) = state.clone_of(name).expect("a clone device");
            let regions = len.0.div_ceil(clone.region_sectors.0);
            let key = state
                .thin_behind(clone.metadata)
                .expect("clone metadata on a thin device");
            state.thins.entry(key).or_default().hydrated_regions = Some(regions);
            if let Some(device) = state.devices.get_mut(name) {
                device.event_nr += 1;
            }
        }
        self.publish_event();
    }

    /// The next `op` ("create", "load", "suspend", "resume", "remove",
    /// "message", "status", "swap") on `name` fails with `errno`.
    pub fn fail_next(&self, op: &'static str, name: &str, errno: Errno) {
        self.state().faults.push((op, name.to_owned(), errno));
    }

    /// The host reboots: every device-mapper device is gone; what the pool
    /// holds on disk (thin ids, metadata) stays.
    pub fn reboot(&self) {
        let mut state = self.state();
        state.devices.clear();
        state.journal.push("reboot".to_owned());
    }

    /// The pool named `pool` holds `ids` in its on-disk metadata (a store
    /// and a pool from an earlier run, brought to this host).
    pub fn restore_thin_ids(&self, pool: &str, ids: impl IntoIterator<Item = u32>) {
        let mut state = self.state();
        for id in ids {
            state.thins.entry((pool.to_owned(), id)).or_default();
        }
    }

    /// A device-mapper device the agent did not make (an operator's), with
    /// a linear table over a fresh block device.
    pub fn add_foreign_device(&self, name: &str) {
        let disk = self.add_block_device(8);
        let table = Table::single(
            Sectors(8),
            Target::Linear(crate::dm::table::Linear {
                device: disk,
                offset: Sectors(0),
            }),
        )
        .expect("a valid table");
        let mut state = self.state();
        state.next_minor += 1;
        let device = Device {
            dev: DevRef::from((DM_MAJOR, state.next_minor)),
            live: Some(table),
            inactive: None,
            suspended: false,
            external_opens: 0,
            transient_opens: 0,
            event_nr: 0,
            told: None,
        };
        state.devices.insert(name.to_owned(), device);
    }

    /// The live table of `name`, as text.
    pub fn table_text(&self, name: &str) -> Option<String> {
        let state = self.state();
        state.devices.get(name)?.live.as_ref().map(Table::to_string)
    }

    /// Names of every device, sorted.
    pub fn device_names(&self) -> Vec<String> {
        self.state().devices.keys().cloned().collect()
    }

    /// Whether the device is suspended (`None`: no such device).
    pub fn is_suspended(&self, name: &str) -> Option<bool> {
        self.state().devices.get(name).map(|d| d.suspended)
    }

    /// The thin ids the pool device `pool` holds.
    pub fn thin_ids(&self, pool: &str) -> Vec<u32> {
        let state = self.state();
        state
            .thins
            .keys()
            .filter(|(p, _)| p == pool)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Bytes read through `read_at` so far.
    pub fn bytes_read(&self) -> u64 {
        self.state().bytes_read
    }

    /// What `write_at` left in thin id `id` of the pool device `pool`, by
    /// 4 KiB page (a snapshot starts with its origin's).
    pub fn thin_pages(&self, pool: &str, id: u32) -> BTreeMap<u64, Vec<u8>> {
        self.state()
            .thins
            .get(&(pool.to_owned(), id))
            .map(|content| content.pages.clone())
            .unwrap_or_default()
    }

    /// What changed, in order: "create NAME", "suspend NAME", "message NAME TEXT", ...
    pub fn journal(&self) -> Vec<String> {
        self.state().journal.clone()
    }

    fn device_mut(&self, name: &str, change: impl FnOnce(&mut Device)) {
        let mut state = self.state();
        change(state.devices.get_mut(name).expect("an existing device"));
    }

    pub fn status_reads(&self) -> u64 {
        self.state().status_reads
    }

    /// The event monitor fails, as when its thread hits an error.
    pub fn fail_events(&self) {
        self.state().events_failed = true;
        self.publish_event();
    }

    fn publish_event(&self) {
        if let Some(events) = &self.events {
            events.send_modify(|generation| *generation += 1);
        }
    }

    fn status_now(&self, name: &DeviceName) -> Result<Vec<SegmentStatus>> {
        self.with("status", name, |state| {
            state.status_reads += 1;
            let table = state.device(name)?.live.clone();
            table
                .iter()
                .flat_map(|t| t.segments())
                .map(|segment| {
                    Ok(SegmentStatus {
                        start: segment.start.0,
                        len: segment.len.0,
                        target_type: segment.target.type_name().to_owned(),
                        text: state.segment_status(name, &segment.target, segment.len)?,
                    })
                })
                .collect()
        })
    }

    fn clear_inactive_now(&self, name: &DeviceName) -> Result<()> {
        self.with("clear", name, |state| {
            state.device_mut(name)?.inactive = None;
            Ok(())
        })
    }

    fn suspend_now(&self, name: &DeviceName) -> Result<()> {
        self.with("suspend", name, |state| {
            state.device_mut(name)?.suspended = true;
            state.journal.push(format!("suspend {name}"));
            Ok(())
        })
    }

    fn resume_now(&self, name: &DeviceName) -> Result<DeviceState> {
        self.with("resume", name, |state| {
            state.activate(name)?;
            state.journal.push(format!("resume {name}"));
            state.info(name)
        })
    }

    fn message_now(&self, name: &DeviceName, sector: u64, message: &str) -> Result<Option<String>> {
        self.with("message", name, |state| {
            let table = state
                .device(name)?
                .live
                .clone()
                .ok_or_else(|| no_such(name))?;
            let segment = table
                .segments()
                .iter()
                .find(|s| s.start <= Sectors(sector) && Sectors(sector) < s.start + s.len)
                .ok_or_else(|| ioctl("message", name.as_str(), Errno::EINVAL))?;
            match &segment.target {
                Target::ThinPool(_) => state.pool_message(name, message)?,
                Target::Era(era) => state.era_message(name, era.metadata, message)?,
                Target::Clone(built) => {
                    let device = state.device_mut(name)?;
                    let live = device.told.as_ref().unwrap_or(built);
                    device.told = Some(clone_message(name, live, message)?);
                }
                _ => return Err(ioctl("message", name.as_str(), Errno::EINVAL)),
            }
            state.journal.push(format!("message {name} {message}"));
            Ok(None)
        })
    }

    /// Runs `call` on the state unless a fault is armed for (`op`, `name`).
    fn with<T>(
        &self,
        op: &'static str,
        name: &DeviceName,
        call: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        let mut state = self.state();
        if let Some(index) = state
            .faults
            .iter()
            .position(|(o, n, _)| *o == op && n == name.as_str())
        {
            let (_, _, errno) = state.faults.remove(index);
            return Err(ioctl(op, name.as_str(), errno));
        }
        call(&mut state)
    }
}

/// The fake's unit of content.
const PAGE: usize = 4096;

/// The pages a read or write of `length` bytes at `offset` covers; both
/// must be whole pages, as O_DIRECT wants.
fn page_span(offset: u64, length: usize) -> Result<std::ops::Range<u64>> {
    if !offset.is_multiple_of(PAGE as u64) || !length.is_multiple_of(PAGE) {
        return Err(Error::Other(format!(
            "unaligned direct I/O: {length} bytes at {offset}"
        )));
    }
    let first = offset / PAGE as u64;
    Ok(first..first + (length / PAGE) as u64)
}

impl State {
    fn device(&self, name: &DeviceName) -> Result<&Device> {
        self.devices.get(name.as_str()).ok_or_else(|| no_such(name))
    }

    fn device_mut(&mut self, name: &DeviceName) -> Result<&mut Device> {
        self.devices
            .get_mut(name.as_str())
            .ok_or_else(|| no_such(name))
    }

    fn by_dev(&self, dev: DevRef) -> Option<(&String, &Device)> {
        self.devices.iter().find(|(_, d)| d.dev == dev)
    }

    fn exists(&self, dev: DevRef) -> bool {
        self.external.contains_key(&dev) || self.by_dev(dev).is_some()
    }

    fn open_count(&self, dev: DevRef) -> i32 {
        let holders = self
            .devices
            .values()
            .flat_map(|d| d.live.iter().chain(d.inactive.iter()))
            .flat_map(|table| table.segments())
            .flat_map(|segment| devices_of(&segment.target))
            .filter(|held| *held == dev)
            .count() as i32;
        let external = self
            .by_dev(dev)
            .map_or(0, |(_, d)| d.external_opens + d.transient_opens);
        holders + external
    }

    fn info(&self, name: &DeviceName) -> Result<DeviceState> {
        let device = self.device(name)?;
        Ok(DeviceState {
            name: name.clone(),
            device: device.dev,
            event_nr: device.event_nr,
            open_count: self.open_count(device.dev),
            suspended: device.suspended,
            active_table: device.live.is_some(),
            inactive_table: device.inactive.is_some(),
        })
    }

    /// The kernel's checks at load time: every mapped device exists, thin
    /// ids exist in their pool.
    fn check_loadable(&self, name: &DeviceName, table: &Table) -> Result<()> {
        for segment in table.segments() {
            let missing = devices_of(&segment.target)
                .into_iter()
                .any(|dev| !self.exists(dev));
            let thin_missing = matches!(&segment.target, Target::Thin(thin)
                if !self.thin_key(thin).is_some_and(|key| self.thins.contains_key(&key)));
            if missing || thin_missing {
                return Err(Error::TableLoad {
                    device: name.to_string(),
                    errno: Errno::EINVAL,
                    table: table.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Activation: targets open their metadata (dm-era formats blank
    /// metadata and, like every resume, begins a new era).
    fn activate(&mut self, name: &DeviceName) -> Result<()> {
        let device = self.device_mut(name)?;
        if let Some(table) = device.inactive.take() {
            device.live = Some(table);
            device.told = None;
        }
        device.suspended = false;
        let live = device.live.clone();
        for segment in live.iter().flat_map(|t| t.segments()) {
            match &segment.target {
                Target::Era(era) => {
                    let key = self.thin_behind(era.metadata);
                    let content = self.content_mut(key);
                    content.era = Some(content.era.map_or(1, |era| era + 1));
                }
                Target::Clone(clone) => {
                    let key = self.thin_behind(clone.metadata);
                    let content = self.content_mut(key);
                    content.hydrated_regions.get_or_insert(0);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Content of a thin id; metadata on a non-thin device goes to a
    /// scratch entry keyed by device number.
    fn content_mut(&mut self, key: Option<ThinKey>) -> &mut ThinContent {
        let key = key.unwrap_or((String::new(), 0));
        self.thins.entry(key).or_default()
    }

    fn thin_key(&self, thin: &Thin) -> Option<ThinKey> {
        let (pool, _) = self.by_dev(thin.pool)?;
        Some((pool.clone(), thin.device_id))
    }

    fn thin_key_of(&self, name: &str) -> Option<ThinKey> {
        let table = self.devices.get(name)?.live.as_ref()?;
        match &table.segments().first()?.target {
            Target::Thin(thin) => self.thin_key(thin),
            _ => None,
        }
    }

    /// The thin id behind device number `dev`, if it is a thin device.
    fn thin_behind(&self, dev: DevRef) -> Option<ThinKey> {
        let (name, _) = self.by_dev(dev)?;
        self.thin_key_of(name)
    }

    /// The clone segment's parameters and length.
    fn clone_of(&self, name: &str) -> Option<(crate::dm::table::CloneParams, Sectors)> {
        let table = self.devices.get(name)?.live.as_ref()?;
        table.segments().iter().find_map(|s| match &s.target {
            Target::Clone(clone) => Some((clone.clone(), s.len)),
            _ => None,
        })
    }

    fn segment_status(&self, name: &DeviceName, target: &Target, len: Sectors) -> Result<String> {
        let device = self.device(name)?;
        Ok(match target {
            Target::ThinPool(pool) => self.pool_status(name.as_str(), pool, len),
            Target::Thin(thin) => {
                let mapped = self
                    .thin_key(thin)
                    .and_then(|key| self.thins.get(&key))
                    .map_or(0, |c| c.mapped_sectors);
                if mapped == 0 {
                    "0 -".to_owned()
                } else {
                    format!("{mapped} {}", mapped - 1)
                }
            }
            Target::Era(era) => {
                if device.suspended {
                    return Err(would_block(name));
                }
                let content = self
                    .thin_behind(era.metadata)
                    .and_then(|key| self.thins.get(&key).cloned())
                    .unwrap_or_default();
                EraStatus {
                    metadata_block_sectors: Sectors(8),
                    metadata: Usage {
                        used: 8,
                        total: 1024,
                    },
                    current_era: content.era.unwrap_or(1),
                    held_root: content.held_metadata_snapshot.then_some(7),
                }
                .to_string()
            }
            Target::Clone(built) => {
                let clone = device.told.as_ref().unwrap_or(built);
                let hydrated = self
                    .thin_behind(clone.metadata)
                    .and_then(|key| self.thins.get(&key))
                    .and_then(|c| c.hydrated_regions)
                    .unwrap_or(0);
                CloneStatus {
                    metadata_block_sectors: Sectors(8),
                    metadata: Usage {
                        used: 8,
                        total: 1024,
                    },
                    region_sectors: clone.region_sectors,
                    hydrated_regions: hydrated,
                    total_regions: len.0.div_ceil(clone.region_sectors.0),
                    hydrating_regions: 0,
                    features: CloneFeatures {
                        no_hydration: !clone.hydration,
                        no_discard_passdown: !clone.discard_passdown,
                    },
                    hydration_threshold: clone.hydration_threshold.unwrap_or(1),
                    hydration_batch_size: clone.hydration_batch_size.unwrap_or(1),
                    mode: CloneMode::ReadWrite,
                }
                .to_string()
            }
            _ => String::new(),
        })
    }

    fn pool_status(&self, pool: &str, table: &crate::dm::table::ThinPool, len: Sectors) -> String {
        let used_sectors: u64 = self
            .thins
            .iter()
            .filter(|((p, _), _)| p == pool)
            .map(|(_, c)| c.mapped_sectors)
            .sum();
        let block = table.data_block_sectors;
        format!(
            "1 20/4096 {}/{} - rw discard_passdown queue_if_no_space - 1024 ",
            used_sectors.div_ceil(block.0),
            len.0 / block.0
        )
    }

    fn pool_message(&mut self, name: &DeviceName, message: &str) -> Result<()> {
        self.device(name)?;
        let pool = name.to_string();
        let words: Vec<&str> = message.split_whitespace().collect();
        let number = |index: usize| -> Result<u32> {
            words
                .get(index)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| ioctl("message", name.as_str(), Errno::EINVAL))
        };
        match words.first().copied() {
            Some("create_thin") => self.new_thin(name, (pool, number(1)?), None),
            Some("create_snap") => {
                let origin = (pool.clone(), number(2)?);
                let content = self
                    .thins
                    .get(&origin)
                    .cloned()
                    .ok_or_else(|| ioctl("message", name.as_str(), Errno::ENODATA))?;
                self.new_thin(name, (pool, number(1)?), Some(content))
            }
            Some("delete") => {
                let key = (pool, number(1)?);
                if !self.thins.contains_key(&key) {
                    return Err(ioctl("message", name.as_str(), Errno::ENODATA));
                }
                let active = self.devices.values().any(|d| {
                    d.live
                        .iter()
                        .flat_map(|t| t.segments())
                        .any(|s| matches!(&s.target, Target::Thin(t) if self.thin_key(t).as_ref() == Some(&key)))
                });
                if active {
                    return Err(ioctl("message", name.as_str(), Errno::EBUSY));
                }
                self.thins.remove(&key);
                Ok(())
            }
            _ => Err(ioctl("message", name.as_str(), Errno::EINVAL)),
        }
    }

    fn new_thin(
        &mut self,
        name: &DeviceName,
        key: ThinKey,
        content: Option<ThinContent>,
    ) -> Result<()> {
        if self.thins.contains_key(&key) {
            return Err(ioctl("message", name.as_str(), Errno::EEXIST));
        }
        self.thins.insert(key, content.unwrap_or_default());
        Ok(())
    }

    fn era_message(&mut self, name: &DeviceName, metadata: DevRef, message: &str) -> Result<()> {
        if self.device(name)?.suspended {
            return Err(would_block(name));
        }
        let key = self.thin_behind(metadata);
        let content = self.content_mut(key);
        let era = content.era.get_or_insert(1);
        match message {
            "checkpoint" => *era += 1,
            "take_metadata_snap" if !content.held_metadata_snapshot => {
                *era += 1;
                content.held_metadata_snapshot = true;
            }
            "drop_metadata_snap" if content.held_metadata_snapshot => {
                content.held_metadata_snapshot = false;
            }
            _ => return Err(ioctl("message", name.as_str(), Errno::EINVAL)),
        }
        Ok(())
    }
}

#[async_trait]
impl Kernel for FakeKernel {
    async fn version(&self) -> Result<(u32, u32, u32)> {
        Ok((4, 48, 0))
    }

    async fn target_versions(&self) -> Result<Vec<TargetVersion>> {
        Ok(["linear", "thin-pool", "thin", "clone", "era", "error"]
            .into_iter()
            .map(|name| TargetVersion {
                name: name.to_owned(),
                version: (1, 0, 0),
            })
            .collect())
    }

    async fn create(
        &self,
        name: &DeviceName,
        _uuid: Option<&str>,
        table: &Table,
    ) -> Result<DeviceState> {
        self.with("create", name, |state| {
            if state.devices.contains_key(name.as_str()) {
                return Err(ioctl("create", name.as_str(), Errno::EBUSY));
            }
            state.check_loadable(name, table)?;
            state.next_minor += 1;
            let device = Device {
                dev: DevRef::from((DM_MAJOR, state.next_minor)),
                live: None,
                inactive: Some(table.clone()),
                suspended: false,
                external_opens: 0,
                transient_opens: 0,
                event_nr: 0,
                told: None,
            };
            state.devices.insert(name.to_string(), device);
            state.activate(name)?;
            state.journal.push(format!("create {name}"));
            state.info(name)
        })
    }

    async fn load(&self, name: &DeviceName, table: &Table) -> Result<()> {
        self.with("load", name, |state| {
            state.device(name)?;
            state.check_loadable(name, table)?;
            state.device_mut(name)?.inactive = Some(table.clone());
            state.journal.push(format!("load {name}"));
            Ok(())
        })
    }

    async fn suspend(&self, name: &DeviceName, _flush: Flush) -> Result<()> {
        self.suspend_now(name)
    }

    async fn clear_inactive(&self, name: &DeviceName) -> Result<()> {
        self.clear_inactive_now(name)
    }

    async fn resume(&self, name: &DeviceName) -> Result<DeviceState> {
        self.resume_now(name)
    }

    async fn swap_table(&self, name: &DeviceName, table: &Table) -> Result<DeviceState> {
        self.with("swap", name, |state| {
            state.device(name)?;
            state.check_loadable(name, table)?;
            state.device_mut(name)?.inactive = Some(table.clone());
            state.activate(name)?;
            state.journal.push(format!("swap {name}"));
            state.info(name)
        })
    }

    async fn status(&self, name: &DeviceName) -> Result<Vec<SegmentStatus>> {
        self.status_now(name)
    }

    async fn table(&self, name: &DeviceName) -> Result<Table> {
        self.with("table", name, |state| {
            state
                .device(name)?
                .live
                .clone()
                .ok_or_else(|| Error::Other(format!("device {name} has no live table")))
        })
    }

    async fn live_table(&self, name: &DeviceName) -> Result<Option<(DevRef, Table)>> {
        self.with("table", name, |state| {
            let Some(device) = state.devices.get(name.as_str()) else {
                return Ok(None);
            };
            let live = device
                .live
                .clone()
                .ok_or_else(|| Error::Other(format!("device {name} has no live table")))?;
            Ok(Some((device.dev, live)))
        })
    }

    async fn message(
        &self,
        name: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>> {
        self.message_now(name, sector, message)
    }

    async fn resume_loaded_if(
        &self,
        name: &DeviceName,
        switch: super::held::SwitchCheck,
    ) -> Result<super::held::HeldSwap> {
        let steps = super::held::SwapSteps {
            suspend: |name: &DeviceName| self.suspend_now(name),
            resume: |name: &DeviceName| self.resume_now(name).map(drop),
            status: || self.status_now(name),
            drop_loaded: || self.clear_inactive_now(name),
        };
        super::held::resume_loaded_if(name, steps, switch)
    }

    async fn message_while_suspended(
        &self,
        hold: &[DeviceName],
        target: &DeviceName,
        sector: u64,
        message: &str,
    ) -> Result<Option<String>> {
        super::held::while_suspended(
            hold,
            |name| self.suspend_now(name),
            |name| self.resume_now(name).map(drop),
            || self.message_now(target, sector, message),
        )
    }

    async fn remove(&self, name: &DeviceName) -> Result<()> {
        self.with("remove", name, |state| {
            let dev = state.device(name)?.dev;
            let open_count = state.open_count(dev);
            if open_count > 0 {
                return Err(Error::DeviceBusy {
                    device: name.to_string(),
                    open_count,
                });
            }
            state.devices.remove(name.as_str());
            state.journal.push(format!("remove {name}"));
            Ok(())
        })
    }

    async fn info(&self, name: &DeviceName) -> Result<Option<DeviceState>> {
        self.with("info", name, |state| match state.info(name) {
            Ok(info) => Ok(Some(info)),
            Err(Error::NoSuchDevice { .. }) => Ok(None),
            Err(err) => Err(err),
        })
    }

    async fn infos(&self, names: Vec<DeviceName>) -> Result<Vec<Option<DeviceState>>> {
        let mut states = Vec::with_capacity(names.len());
        for name in &names {
            states.push(self.info(name).await?);
        }
        Ok(states)
    }

    async fn settled_open_count(&self, name: &DeviceName) -> Result<Option<i32>> {
        self.with("info", name, |state| {
            let Ok(device) = state.device_mut(name) else {
                return Ok(None);
            };
            device.transient_opens = 0;
            let dev = device.dev;
            Ok(Some(state.open_count(dev)))
        })
    }

    async fn list(&self) -> Result<Vec<ListedDevice>> {
        let state = self.state();
        Ok(state
            .devices
            .iter()
            .map(|(name, device)| ListedDevice {
                name: name.clone(),
                device: device.dev,
                event_nr: device.event_nr,
            })
            .collect())
    }

    async fn flush(&self, name: &DeviceName) -> Result<()> {
        self.with("flush", name, |state| {
            state.device(name)?;
            state.journal.push(format!("flush {name}"));
            Ok(())
        })
    }

    async fn discard(&self, name: &DeviceName, ranges: Vec<std::ops::Range<u64>>) -> Result<()> {
        self.with("discard", name, |state| {
            state.device(name)?;
            let spans: Vec<String> = ranges
                .iter()
                .map(|range| format!("{}..{}", range.start, range.end))
                .collect();
            state
                .journal
                .push(format!("discard {name} {}", spans.join(",")));
            Ok(())
        })
    }

    async fn read_at(&self, name: &DeviceName, offset: u64, length: usize) -> Result<Vec<u8>> {
        self.with("read", name, |state| {
            let key = state.thin_key_of(name.as_str()).ok_or_else(|| {
                Error::Other(format!("the fake reads thin devices only, not {name}"))
            })?;
            let pages = state.thins.get(&key).map(|c| &c.pages);
            let mut data = Vec::with_capacity(length);
            for page in page_span(offset, length)? {
                match pages.and_then(|pages| pages.get(&page)) {
                    Some(bytes) => data.extend_from_slice(bytes),
                    None => data.extend_from_slice(&[0u8; PAGE]),
                }
            }
            state.bytes_read += length as u64;
            Ok(data)
        })
    }

    async fn write_at(&self, name: &DeviceName, offset: u64, data: Vec<u8>) -> Result<()> {
        self.with("write", name, |state| {
            let key = state.thin_key_of(name.as_str()).ok_or_else(|| {
                Error::Other(format!("the fake writes thin devices only, not {name}"))
            })?;
            let content = state.thins.entry(key).or_default();
            for (page, bytes) in page_span(offset, data.len())?.zip(data.chunks(PAGE)) {
                content.pages.insert(page, bytes.to_vec());
            }
            state.journal.push(format!(
                "write {name} {}..{}",
                offset,
                offset + data.len() as u64
            ));
            Ok(())
        })
    }

    async fn zero_first_block(&self, name: &DeviceName) -> Result<()> {
        self.with("zero", name, |state| {
            let key = state.thin_key_of(name.as_str()).ok_or_else(|| {
                Error::Other(format!("the fake zeroes thin devices only, not {name}"))
            })?;
            let content = state.thins.entry(key).or_default();
            content.era = None;
            content.hydrated_regions = None;
            content.held_metadata_snapshot = false;
            state.journal.push(format!("zero {name}"));
            Ok(())
        })
    }

    async fn block_device(
        &self,
        path: &std::path::Path,
    ) -> std::result::Result<(DevRef, u64), crate::error::AgentError> {
        let state = self.state();
        // A device-mapper device by its /dev/mapper path, as the kernel's.
        let mapped = path
            .strip_prefix("/dev/mapper")
            .ok()
            .and_then(|name| state.devices.get(name.to_str()?));
        if let Some(device) = mapped {
            let sectors = device.live.as_ref().map_or(0, |t| t.len_sectors().0);
            return Ok((device.dev, sectors * 512));
        }
        let dev = state.paths.get(path).copied().ok_or_else(|| {
            crate::error::AgentError::InvalidArgument {
                field: "device",
                reason: format!("{} is not a block device", path.display()),
            }
        })?;
        Ok((dev, state.external.get(&dev).copied().unwrap_or(0) * 512))
    }

    async fn device_identity(
        &self,
        _path: &std::path::Path,
        dev: DevRef,
    ) -> std::result::Result<String, crate::error::AgentError> {
        Ok(format!("fake device {}:{}", dev.major, dev.minor))
    }

    fn event_counter(&self, name: &DeviceName) -> Option<u32> {
        self.state().devices.get(name.as_str()).map(|d| d.event_nr)
    }

    async fn wait_for_event(&self, name: &DeviceName, seen: u32) -> Result<u32> {
        let Some(events) = &self.events else {
            return Err(Error::Other("the fake has no event channel".into()));
        };
        let mut generations = events.subscribe();
        loop {
            if self.state().events_failed {
                return Err(Error::Other("the fake's event monitor failed".into()));
            }
            match self.event_counter(name) {
                None => return Err(no_such(name)),
                Some(now) if now != seen => return Ok(now),
                Some(_) => {}
            }
            generations
                .changed()
                .await
                .map_err(|_| Error::Other("the fake kernel went away".into()))?;
        }
    }
}

/// The clone as a message leaves it.
fn clone_message(name: &DeviceName, clone: &CloneParams, message: &str) -> Result<CloneParams> {
    let mut told = clone.clone();
    let mut words = message.split_whitespace();
    let number = |word: Option<&str>| word.and_then(|n| n.parse::<u32>().ok());
    match (words.next(), words.next(), words.next()) {
        (Some("enable_hydration"), None, None) => told.hydration = true,
        (Some("disable_hydration"), None, None) => told.hydration = false,
        (Some("hydration_threshold"), n, None) if number(n).is_some() => {
            told.hydration_threshold = number(n);
        }
        (Some("hydration_batch_size"), n, None) if number(n).is_some() => {
            told.hydration_batch_size = number(n);
        }
        _ => return Err(ioctl("message", name.as_str(), Errno::EINVAL)),
    }
    Ok(told)
}

/// The devices a target maps (and so holds open).
fn devices_of(target: &Target) -> Vec<DevRef> {
    match target {
        Target::Linear(linear) => vec![linear.device],
        Target::ThinPool(pool) => vec![pool.metadata, pool.data],
        Target::Thin(thin) => [Some(thin.pool), thin.external_origin]
            .into_iter()
            .flatten()
            .collect(),
        Target::Clone(clone) => vec![clone.metadata, clone.destination, clone.source],
        Target::Era(era) => vec![era.metadata, era.origin],
        Target::Flakey(flakey) => vec![flakey.device],
        Target::Delay(delay) => [Some(delay.read), delay.write, delay.flush]
            .into_iter()
            .flatten()
            .map(|leg| leg.device)
            .collect(),
        Target::Error => Vec::new(),
    }
}

fn no_such(name: &DeviceName) -> Error {
    Error::NoSuchDevice {
        device: name.to_string(),
    }
}

fn ioctl(op: &'static str, device: &str, errno: Errno) -> Error {
    Error::Ioctl {
        op,
        device: device.to_owned(),
        errno,
        detail: errno.desc().to_owned(),
    }
}

/// The kernel parks dm-era's worker while suspended: a status or message
/// would block until resume. The fake refuses instead, so a test sees it.
fn would_block(name: &DeviceName) -> Error {
    Error::Other(format!(
        "status or message to suspended dm-era device {name} would block until it is resumed"
    ))
}
