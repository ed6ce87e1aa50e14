//! The host's thin pool: every volume is a thin device in it.
//!
//! Layout on the backing device: a 4 KiB label, then the pool's metadata from
//! 1 MiB, then its data. Two linear devices carve metadata and data out of the
//! backing device and a thin-pool device sits on them:
//!
//! ```text
//! <prefix>-pool-meta  linear  backing [metadata_offset, +metadata_bytes)
//! <prefix>-pool-data  linear  backing [data_offset, +data_bytes)
//! <prefix>-pool       thin-pool <meta> <data> <block> <low water>
//! ```
//!
//! At start the agent adopts these devices when they exist with the expected
//! tables and creates them otherwise; it never rewrites a device it did not
//! label itself.

pub mod backing;
pub mod label;

use nix::errno::Errno;
use tracing::{info, warn};

use self::{
    backing::Backing,
    label::{BLANK_CHECK_BYTES, Found, LABEL_BYTES, PoolLayout},
};
use crate::{
    config::{PoolBacking, PoolSettings, Size},
    dm::{
        Kernel,
        names::{DeviceName, Naming},
        status::{Health, PoolMode, ThinPoolStatus},
        table::{DevRef, Linear, Table, Target, ThinPool, ThinPoolFeatures},
    },
    error::{AgentError, Error},
    ids::ThinId,
};

use crate::units::sectors;
const METADATA_BLOCK: u64 = 4096;

/// The pool's space, as the kernel reports it now.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolUsage {
    pub data_total_bytes: u64,
    pub data_used_bytes: u64,
    pub metadata_total_bytes: u64,
    pub metadata_used_bytes: u64,
    pub health: PoolHealth,
    /// Data or metadata use reached the low-space mark.
    pub low_space: bool,
}

/// Whether the pool takes writes, in an operator's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolHealth {
    Healthy,
    /// Metadata space ran out or the kernel switched the pool to read-only.
    ReadOnly,
    OutOfDataSpace,
    /// `needs_check` is set: repair the metadata offline (thin_check/thin_repair).
    NeedsCheck,
    Failed,
}

impl PoolHealth {
    pub fn as_str(&self) -> &'static str {
        match self {
            PoolHealth::Healthy => "healthy",
            PoolHealth::ReadOnly => "read-only",
            PoolHealth::OutOfDataSpace => "out of data space",
            PoolHealth::NeedsCheck => "needs check",
            PoolHealth::Failed => "failed",
        }
    }
}

/// Whether `create_thin` made the device or found it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinCreated {
    Created,
    Existed,
}

/// The running pool.
#[derive(Debug)]
pub struct Pool {
    dm: std::sync::Arc<dyn Kernel>,
    pub name: DeviceName,
    pub dev: DevRef,
    pub layout: PoolLayout,
    pub backing_path: std::path::PathBuf,
    low_space_percent: u8,
    oversubscription: f64,
    _backing: Backing,
}

impl Pool {
    /// Adopts or builds the pool described by `settings` on `backing`.
    pub async fn open(
        dm: &std::sync::Arc<dyn Kernel>,
        naming: &Naming,
        settings: &PoolSettings,
        backing: Backing,
    ) -> Result<Self, AgentError> {
        let (backing, layout) = tokio::task::spawn_blocking({
            let settings = settings.clone();
            move || {
                let layout = read_or_write_label(&backing, &settings)?;
                Ok::<_, AgentError>((backing, layout))
            }
        })
        .await
        .map_err(|err| AgentError::Internal(format!("pool setup task failed: {err}")))??;

        let meta = ensure_linear(
            dm.as_ref(),
            &naming.pool_meta(),
            backing.dev,
            layout.metadata_offset,
            layout.metadata_bytes,
        )
        .await?;
        let data = ensure_linear(
            dm.as_ref(),
            &naming.pool_data(),
            backing.dev,
            layout.data_offset,
            layout.data_bytes,
        )
        .await?;
        let name = naming.pool();
        let table = pool_table(meta, data, &layout, settings.low_space_percent)?;
        let dev = ensure_pool(dm.as_ref(), &name, &table).await?;
        info!(pool = %name, device = %backing.path.display(), data = %Size(layout.data_bytes), metadata = %Size(layout.metadata_bytes), block = %Size(layout.block_bytes), "thin pool ready");
        Ok(Self {
            dm: std::sync::Arc::clone(dm),
            name,
            dev,
            backing_path: backing.path.clone(),
            layout,
            low_space_percent: settings.low_space_percent,
            oversubscription: settings.max_oversubscription_ratio,
            _backing: backing,
        })
    }

    /// The table of a volume's thin device.
    pub fn thin_table(&self, thin_id: ThinId, size_bytes: u64) -> Result<Table, AgentError> {
        thin_table(self.dev, thin_id, size_bytes)
    }

    /// Creates thin device `thin_id`; finding it there already is fine (a
    /// retried step after a crash).
    pub async fn create_thin(&self, thin_id: ThinId) -> Result<ThinCreated, AgentError> {
        self.make_thin(&format!("create_thin {thin_id}"), &[]).await
    }

    /// Creates thin device `thin_id` as a snapshot of `origin`; finding it
    /// there already is fine. `hold` names the origin's active devices (its
    /// thin device, and any dm-era above it, outermost first): they are
    /// suspended around the message and resumed whatever happens.
    pub async fn snapshot(
        &self,
        thin_id: ThinId,
        origin: ThinId,
        hold: &[DeviceName],
    ) -> Result<ThinCreated, AgentError> {
        self.make_thin(&format!("create_snap {thin_id} {origin}"), hold)
            .await
    }

    /// Sends a pool message that makes a thin device; EEXIST means a retried
    /// step finds it made.
    async fn make_thin(
        &self,
        message: &str,
        hold: &[DeviceName],
    ) -> Result<ThinCreated, AgentError> {
        match self
            .dm
            .message_while_suspended(hold, &self.name, 0, message)
            .await
        {
            Ok(_) => Ok(ThinCreated::Created),
            Err(Error::Ioctl {
                errno: Errno::EEXIST,
                ..
            }) => Ok(ThinCreated::Existed),
            Err(err) => Err(err.into()),
        }
    }

    /// Deletes thin device `thin_id` and frees its blocks; an id that is
    /// already gone is fine. Returns whether it existed.
    pub async fn delete_thin(&self, thin_id: ThinId) -> Result<bool, AgentError> {
        match self
            .dm
            .message(&self.name, 0, &format!("delete {thin_id}"))
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Ioctl {
                errno: Errno::ENODATA,
                ..
            }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Data and metadata use now.
    pub async fn usage(&self) -> Result<PoolUsage, AgentError> {
        let status: Health<ThinPoolStatus> = self.dm.status_of(&self.name, 0).await?;
        Ok(self.usage_from(&status))
    }

    fn usage_from(&self, status: &Health<ThinPoolStatus>) -> PoolUsage {
        let data_total_bytes = self.layout.data_bytes;
        let metadata_total_bytes = self.layout.metadata_bytes;
        let Health::Running(status) = status else {
            return PoolUsage {
                data_total_bytes,
                data_used_bytes: 0,
                metadata_total_bytes,
                metadata_used_bytes: 0,
                health: PoolHealth::Failed,
                low_space: true,
            };
        };
        let health = match (status.needs_check, status.mode) {
            (true, _) => PoolHealth::NeedsCheck,
            (false, PoolMode::ReadWrite) => PoolHealth::Healthy,
            (false, PoolMode::ReadOnly) => PoolHealth::ReadOnly,
            (false, PoolMode::OutOfDataSpace) => PoolHealth::OutOfDataSpace,
        };
        let mark = u64::from(self.low_space_percent);
        let low_space = status.data.used * 100 >= status.data.total * mark
            || status.metadata.used * 100 >= status.metadata.total * mark;
        PoolUsage {
            data_total_bytes: status.data.total * self.layout.block_bytes,
            data_used_bytes: status.data.used * self.layout.block_bytes,
            metadata_total_bytes: status.metadata.total * METADATA_BLOCK,
            metadata_used_bytes: status.metadata.used * METADATA_BLOCK,
            health,
            low_space,
        }
    }

    /// Refuses to write `extra` more bytes of data (a move hydrates every
    /// region it copies) when, with `pending` bytes other moves still have
    /// to write, the data would pass the low-space mark.
    pub fn check_fill(
        &self,
        usage: &PoolUsage,
        pending: u64,
        extra: u64,
    ) -> Result<(), AgentError> {
        let mark = u128::from(self.low_space_percent);
        let limit =
            u64::try_from(u128::from(usage.data_total_bytes) * mark / 100).unwrap_or(u64::MAX);
        let due = usage
            .data_used_bytes
            .saturating_add(pending)
            .saturating_add(extra);
        if due <= limit {
            return Ok(());
        }
        Err(AgentError::ResourceExhausted {
            reason: format!(
                "a move writes every region it copies, and the thin pool {} cannot take {} more: \
                 {} of data is used and {} is still to arrive for moves under way, against {} \
                 below its low-space mark of {}% of {}; free space, grow the pool, or move the \
                 volume to another host",
                self.name,
                Size(extra),
                Size(usage.data_used_bytes),
                Size(pending),
                Size(limit),
                self.low_space_percent,
                Size(usage.data_total_bytes)
            ),
        })
    }

    /// Refuses a new allocation of `extra` bytes of volume when the pool is not
    /// healthy, has reached its low-space mark, or would promise more than
    /// `max_oversubscription_ratio` allows with `provisioned` bytes promised.
    pub fn check_room(
        &self,
        usage: &PoolUsage,
        provisioned: u64,
        extra: u64,
    ) -> Result<(), AgentError> {
        if usage.health != PoolHealth::Healthy {
            return Err(AgentError::Unavailable {
                reason: format!(
                    "the thin pool {} is {}: no new allocations until an operator repairs it",
                    self.name,
                    usage.health.as_str()
                ),
            });
        }
        if usage.low_space {
            return Err(AgentError::ResourceExhausted {
                reason: format!(
                    "the thin pool {} reached its low-space mark of {}% (data {} of {}, metadata {} of {}); new allocations are refused so that existing volumes keep room to write: free space or grow the pool",
                    self.name,
                    self.low_space_percent,
                    Size(usage.data_used_bytes),
                    Size(usage.data_total_bytes),
                    Size(usage.metadata_used_bytes),
                    Size(usage.metadata_total_bytes)
                ),
            });
        }
        let limit = (usage.data_total_bytes as f64 * self.oversubscription) as u64;
        let wanted = provisioned.saturating_add(extra);
        if wanted > limit {
            return Err(AgentError::ResourceExhausted {
                reason: format!(
                    "the thin pool {} cannot fit {} more: {} are promised to volumes and the limit is {} ({} of data × max_oversubscription_ratio {})",
                    self.name,
                    Size(extra),
                    Size(provisioned),
                    Size(limit),
                    Size(usage.data_total_bytes),
                    self.oversubscription
                ),
            });
        }
        Ok(())
    }
}

/// Reads the label, or writes one on a blank device. A device that is neither
/// labelled nor blank is refused untouched.
fn read_or_write_label(
    backing: &Backing,
    settings: &PoolSettings,
) -> Result<PoolLayout, AgentError> {
    let refuse = |reason: String| AgentError::Config {
        option: match settings.backing {
            PoolBacking::Device(_) => "pool.device".to_owned(),
            PoolBacking::File { .. } => "pool.file_size".to_owned(),
        },
        reason,
    };
    match PoolLayout::decode(&backing.read(0, LABEL_BYTES)?) {
        Found::Label(layout) => {
            if layout.data_offset + layout.data_bytes > backing.size_bytes {
                return Err(refuse(format!(
                    "{} is {} but its pool label says the pool ends at {}: the device shrank",
                    backing.path.display(),
                    Size(backing.size_bytes),
                    Size(layout.data_offset + layout.data_bytes)
                )));
            }
            if layout.block_bytes != settings.block_size {
                warn!(
                    label = layout.block_bytes,
                    configured = settings.block_size,
                    "pool.block_size applies to new pools only; the existing pool keeps its block size"
                );
            }
            Ok(layout)
        }
        Found::Blank => {
            if backing.read(0, BLANK_CHECK_BYTES)?.iter().any(|b| *b != 0) {
                return Err(refuse(foreign_message(backing)));
            }
            let layout = PoolLayout::plan(
                backing.size_bytes,
                settings.block_size,
                settings.metadata_size,
            )
            .map_err(|reason| refuse(format!("{}: {reason}", backing.path.display())))?;
            // Zeroed metadata makes the kernel format a new pool; the label
            // goes last, so a crash in between leaves a blank device again.
            backing.write(layout.metadata_offset, &[0u8; METADATA_BLOCK as usize])?;
            backing.write(0, &layout.encode())?;
            info!(device = %backing.path.display(), "labelled a new pool");
            Ok(layout)
        }
        Found::Foreign => Err(refuse(foreign_message(backing))),
        Found::Damaged(reason) => Err(refuse(format!(
            "{} carries a damaged dmclone pool label ({reason}); the agent will not guess its layout",
            backing.path.display()
        ))),
    }
}

fn foreign_message(backing: &Backing) -> String {
    format!(
        "{} holds data and no dmclone pool label; the agent only uses a device that is blank (first MiB all zero) or labelled by it. If the device is meant for dmclone, wipe it (wipefs -a, then blkdiscard or zero its first MiB)",
        backing.path.display()
    )
}

fn pool_table(
    meta: DevRef,
    data: DevRef,
    layout: &PoolLayout,
    low_space_percent: u8,
) -> Result<Table, AgentError> {
    let blocks = layout.data_blocks();
    let target = Target::ThinPool(ThinPool {
        metadata: meta,
        data,
        data_block_sectors: sectors(layout.block_bytes),
        low_water_blocks: blocks * (100 - u64::from(low_space_percent)) / 100,
        features: ThinPoolFeatures::default(),
    });
    Ok(Table::single(sectors(layout.data_bytes), target)?)
}

async fn ensure_linear(
    dm: &dyn Kernel,
    name: &DeviceName,
    device: DevRef,
    offset: u64,
    len: u64,
) -> Result<DevRef, AgentError> {
    let table = Table::single(
        sectors(len),
        Target::Linear(Linear {
            device,
            offset: sectors(offset),
        }),
    )?;
    adopt(dm, name, &table, |_| false, "but the pool label asks for").await
}

/// Adopts the pool device, reloading it when only its arguments changed (a
/// thin-pool reload is safe: the new table shares the live pool object).
async fn ensure_pool(
    dm: &dyn Kernel,
    name: &DeviceName,
    table: &Table,
) -> Result<DevRef, AgentError> {
    let same_devices = |live: &Table| {
        let same = match (live.segments().first(), table.segments().first()) {
            (Some(a), Some(b)) => match (&a.target, &b.target) {
                (Target::ThinPool(a), Target::ThinPool(b)) => {
                    a.metadata == b.metadata && a.data == b.data
                }
                _ => false,
            },
            _ => false,
        };
        if same {
            info!(pool = %name, from = %live, to = %table, "reloading the pool with the configured arguments");
        }
        same
    };
    adopt(
        dm,
        name,
        table,
        same_devices,
        "and is not a thin pool on this agent's devices",
    )
    .await
}

/// Adopts or creates one of the pool's devices through the stack's one
/// routine. A device of that name whose table may not be swapped belongs
/// to another pool or agent: the agent leaves it alone and does not start.
async fn adopt(
    dm: &dyn Kernel,
    name: &DeviceName,
    table: &Table,
    may_swap: impl Fn(&Table) -> bool,
    mismatch: &str,
) -> Result<DevRef, AgentError> {
    match crate::dm::ensure_device(dm, name, table, may_swap).await {
        Err(AgentError::Conflict(_)) => {
            let live = dm.table(name).await?;
            Err(AgentError::Unavailable {
                reason: format!(
                    "device-mapper device {name} exists with table \"{live}\" {mismatch} \"{table}\"; another pool or agent owns it"
                ),
            })
        }
        adopted => adopted,
    }
}

/// The table of a thin device of the pool.
pub fn thin_table(pool: DevRef, thin_id: ThinId, size_bytes: u64) -> Result<Table, AgentError> {
    let target = Target::Thin(crate::dm::table::Thin {
        pool,
        device_id: thin_id.0,
        external_origin: None,
    });
    Ok(Table::single(sectors(size_bytes), target)?)
}
