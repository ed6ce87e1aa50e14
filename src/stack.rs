//! The devices that make up a volume, and the one routine for each thing
//! done to them: build, tear down, swap under I/O.
//!
//! A volume's stack in each stage of its life (`<p>` is the dm prefix):
//!
//! ```text
//! local, untracked   <p>-<id>        linear(thin)
//! local, tracked     <p>-<id>        era(<p>-emeta-<id>, thin)
//! arriving, tracked  <p>-<id>        era(emeta, <p>-lower-<id>)
//!                    <p>-lower-<id>  clone(<p>-cmeta-<id>, thin, source) [+ linear(thin) past the clone]
//! arrived, tracked   <p>-<id>        era(emeta, <p>-lower-<id>)
//!                    <p>-lower-<id>  thin(pool, thin id), until the public device is next made
//! arriving, untracked <p>-<id>       clone(cmeta, thin, source) [+ linear(thin) past the clone]
//! unpublished, asked <p>-era-<id>    era(emeta, thin), for the length of one call
//! always             <p>-thin-<id>   thin(pool, thin id);  <p>-emeta-<id> thin(pool, era metadata id)
//! snapshot view      <p>-snap-<sid>  thin(pool, snapshot thin id), for the length of one read
//! ```
//!
//! dm-era sits above an arriving volume's dm-clone from presentation on, so
//! every write made here is tracked while the volume arrives, and finalize
//! swaps only the layer beneath: dm-era is never reloaded in the pause. The
//! clone's device then maps the volume's thin device itself (a second
//! activation of the same thin id, as a reload makes for a moment), so no
//! extra layer stays under dm-era: a linear map of `<p>-thin-<id>` there
//! cost random reads about a tenth. Transfers recorded before this stack (`era_above` unset)
//! keep the clone as their public device until they finish.
//!
//! Tables are pure functions of the records and the device numbers of the
//! layers beneath ([`thin_table`], [`local_table`], [`clone_table`]); the
//! routines below them talk to the kernel only through [`Kernel`].

use std::time::{Duration, Instant};

use tracing::warn;

use crate::{
    dm::{
        Kernel,
        held::SwitchCheck,
        kernel::SegmentStatus,
        names::{DeviceName, Naming},
        status::{CloneMode, CloneStatus, Health},
        table::{CloneParams, DevRef, Era, Linear, Segment, Table, Target},
    },
    error::{AgentError, Error},
    ids::{ThinId, VolumeId},
    pool::Pool,
    refusal::Refusal,
    units::{Sectors, sectors},
};

pub use crate::{
    dm::{adopt, ensure_device},
    pool::thin_table,
};

/// dm-era's place in a tracked volume's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EraLayer {
    /// The era metadata's thin device.
    pub metadata: DevRef,
    pub block_bytes: u64,
}

/// The public table of a local volume: dm-era over the thin device when it
/// tracks changes, else a linear map of it.
pub fn local_table(
    size_bytes: u64,
    thin: DevRef,
    era: Option<EraLayer>,
) -> Result<Table, AgentError> {
    let target = match era {
        Some(era) => Target::Era(Era {
            metadata: era.metadata,
            origin: thin,
            block_sectors: sectors(era.block_bytes),
        }),
        None => Target::Linear(Linear {
            device: thin,
            offset: Sectors::ZERO,
        }),
    };
    Ok(Table::single(sectors(size_bytes), target)?)
}

/// How an arriving volume's dm-clone is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneLayer {
    /// The range the clone covers: the source's size.
    pub clone_bytes: u64,
    pub region_bytes: u64,
    /// `None` leaves the kernel's default (1), as the benches' baseline
    /// runs it; the agent always sets both.
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
    /// Background hydration on (off while a move is deferred or paused).
    pub hydrate: bool,
    /// Discards reach the destination. Off when the destination holds an
    /// older copy whose unchanged regions are discarded on the clone to
    /// mark them held: passed down, they would erase those very regions.
    pub discard_passdown: bool,
}

/// The devices dm-clone stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneDevices {
    pub metadata: DevRef,
    pub destination: DevRef,
    pub source: DevRef,
}

/// The public table while hydrating: the clone over the source's range, and
/// the local thin device beyond it after an extend.
pub fn clone_table(
    size_bytes: u64,
    layer: &CloneLayer,
    devices: CloneDevices,
) -> Result<Table, AgentError> {
    let clone_sectors = sectors(layer.clone_bytes);
    let mut segments = vec![Segment {
        start: Sectors::ZERO,
        len: clone_sectors,
        target: Target::Clone(CloneParams {
            metadata: devices.metadata,
            destination: devices.destination,
            source: devices.source,
            region_sectors: sectors(layer.region_bytes),
            hydration: layer.hydrate,
            discard_passdown: layer.discard_passdown,
            hydration_threshold: layer.hydration_threshold,
            hydration_batch_size: layer.hydration_batch_size,
        }),
    }];
    let total = sectors(size_bytes);
    if total > clone_sectors {
        segments.push(Segment {
            start: clone_sectors,
            len: total - clone_sectors,
            target: Target::Linear(Linear {
                device: devices.destination,
                offset: clone_sectors,
            }),
        });
    }
    Ok(Table::new(segments)?)
}

/// Whether a live table may be replaced by `wanted` on the agent's own
/// authority: only a resize (same single target, other length), as an
/// interrupted extend leaves it.
pub fn is_resize_of(live: &Table, wanted: &Table) -> bool {
    match (live.segments(), wanted.segments()) {
        ([a], [b]) => a.target == b.target && a.start == b.start,
        _ => false,
    }
}

/// Every device a volume may have, in the order tear-down removes them (a
/// device goes before the devices it maps).
pub fn volume_devices(naming: &Naming, id: &VolumeId) -> [DeviceName; 6] {
    [
        naming.public(id),
        naming.lower(id),
        naming.era_probe(id),
        naming.clone_metadata(id),
        naming.thin(id),
        naming.era_metadata(id),
    ]
}

/// Removes a device; one already gone is fine, an open one is refused once
/// transient openers (see [`Kernel::settled_open_count`]) had their moment.
pub async fn remove_if_present(dm: &dyn Kernel, name: &DeviceName) -> Result<(), AgentError> {
    let busy = match dm.remove(name).await {
        Ok(()) | Err(Error::NoSuchDevice { .. }) => return Ok(()),
        Err(Error::DeviceBusy { device, open_count }) => {
            Refusal::DeviceInUse { device, open_count }
        }
        Err(err) => return Err(err.into()),
    };
    match dm.settled_open_count(name).await? {
        None => Ok(()),
        Some(0) => match dm.remove(name).await {
            Ok(()) | Err(Error::NoSuchDevice { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        },
        Some(_) => Err(busy.into()),
    }
}

/// Removes every device of the volume that exists, top first.
pub async fn remove_volume_devices(
    dm: &dyn Kernel,
    naming: &Naming,
    id: &VolumeId,
) -> Result<(), AgentError> {
    for name in volume_devices(naming, id) {
        remove_if_present(dm, &name).await?;
    }
    Ok(())
}

/// Frees thin ids of the pool; ids already gone are fine.
pub async fn free_thin_ids(pool: &Pool, ids: &[ThinId]) -> Result<(), AgentError> {
    for id in ids {
        pool.delete_thin(*id).await?;
    }
    Ok(())
}

/// Tears a volume's stack down completely: every device, then every thin id
/// it owns. Each step tolerates having been done, so a crash anywhere is
/// finished by doing it again.
pub async fn tear_down(
    dm: &dyn Kernel,
    pool: &Pool,
    naming: &Naming,
    id: &VolumeId,
    thin_ids: &[ThinId],
) -> Result<(), AgentError> {
    remove_volume_devices(dm, naming, id).await?;
    free_thin_ids(pool, thin_ids).await
}

/// How a swap under I/O went, timed.
#[derive(Debug, Clone, Copy)]
pub struct SwapTimings {
    /// Loading the new table beside the live one (outside the pause).
    pub preload: Duration,
    /// When I/O stopped being served (the suspend began).
    pub started: Instant,
    /// When the new table served I/O.
    pub resumed: Instant,
    pub suspend: Duration,
    pub check: Duration,
    pub resume: Duration,
}

impl SwapTimings {
    /// How long I/O was held.
    pub fn pause(&self) -> Duration {
        self.resumed - self.started
    }
}

#[derive(Debug, Clone, Copy)]
pub enum SwapOutcome {
    Swapped(SwapTimings),
    /// The check failed while suspended: the old table serves again.
    Kept,
}

/// Replaces the live table of `name` with `table`, holding I/O only for
/// the swap: load beside the live table (constructors run outside the
/// pause), then in one kernel step suspend with flush (the old target drains
/// and commits), ask `ready` of the status read while suspended, and resume
/// onto the new table, or drop it and resume the old one when `ready` says
/// no.
pub async fn swap_under_io(
    dm: &dyn Kernel,
    name: &DeviceName,
    table: &Table,
    ready: SwitchCheck,
) -> Result<SwapOutcome, AgentError> {
    let preload_started = Instant::now();
    dm.load(name, table).await?;
    let preload = preload_started.elapsed();
    let held = match dm.resume_loaded_if(name, ready).await {
        Ok(held) => held,
        Err(err) => {
            // A suspend that failed resumed nothing and left the table
            // loaded: drop it so no later resume picks it up.
            if let Err(cleared) = dm.clear_inactive(name).await {
                warn!(device = %name, error = %cleared, "cannot drop the loaded table after a failed swap");
            }
            return Err(err.into());
        }
    };
    if !held.switched {
        return Ok(SwapOutcome::Kept);
    }
    Ok(SwapOutcome::Swapped(SwapTimings {
        preload,
        started: held.started,
        resumed: held.resumed,
        suspend: held.suspended - held.started,
        check: held.checked - held.suspended,
        resume: held.resumed - held.checked,
    }))
}

/// Whether the clone whose status is `segments` (its top segment first) has
/// copied every region and its metadata is writable: the condition for
/// switching to the local copy.
pub fn clone_ready(segments: &[SegmentStatus]) -> bool {
    let Some(top) = segments.first() else {
        return false;
    };
    match top.text.parse::<Health<CloneStatus>>() {
        Ok(Health::Running(status)) => {
            status.is_fully_hydrated() && status.mode == CloneMode::ReadWrite
        }
        Ok(other) => {
            warn!(status = %other, "the clone is not running");
            false
        }
        Err(err) => {
            warn!(error = %err, "cannot read the clone's status");
            false
        }
    }
}

/// Whether the live table of `name` has a dm-clone segment.
pub async fn is_clone(dm: &dyn Kernel, name: &DeviceName) -> Result<bool, AgentError> {
    let table = dm.table(name).await?;
    Ok(table
        .segments()
        .iter()
        .any(|s| matches!(s.target, Target::Clone(_))))
}

pub(crate) mod steps;
#[cfg(test)]
mod tests;
