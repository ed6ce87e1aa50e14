//! Record steps over the store that more than one service takes: reading a
//! volume, snapshot or transfer record, checking it is ready for a call,
//! writing it and clearing its intent, the room checks before an
//! allocation, and the views callers get of volumes and transfers.

use std::path::PathBuf;

use crate::{
    AgentError, Refusal,
    config::{MIB, Size},
    context::Context,
    dm::status::ThinStatus,
    ids::{SnapshotId, ThinId, TransferId, VolumeId},
    store::{Change, Pending, SnapshotRecord, TransferRecord, VolumeRecord},
    transfer::{TransferView, view},
    units::bytes,
};

/// A volume as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: VolumeId,
    pub size_bytes: u64,
    pub state: VolumeState,
    pub published: bool,
    pub device_path: Option<PathBuf>,
    /// Bytes the pool has allocated for the volume; `None` if the kernel
    /// could not say (the thin device is missing).
    pub allocated_bytes: Option<u64>,
    pub source_snapshot: Option<SnapshotId>,
    pub source_volume: Option<VolumeId>,
    /// Whether dm-era tracks the volume's changed blocks.
    pub change_tracking: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeState {
    Creating,
    Available,
    Deleting,
    /// Arriving from another host: presented, copying in the background.
    Hydrating,
    /// The kernel disagrees with the store; refuses changes until an operator
    /// looks. Holds the reason.
    Quarantined(String),
    /// Its devices did not come back at start for a reason that may pass
    /// (not a contradiction); the agent retries. Holds the reason.
    Degraded(String),
    /// The copy a volume left here when it moved away, kept read-only for
    /// a move back. Holds where it went and until when it is kept.
    Warm(String),
}

impl VolumeState {
    /// The state's name wherever people read it: metrics labels, the CLI.
    pub fn as_str(&self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Available => "available",
            VolumeState::Deleting => "deleting",
            VolumeState::Hydrating => "hydrating",
            VolumeState::Quarantined(_) => "quarantined",
            VolumeState::Degraded(_) => "degraded",
            VolumeState::Warm(_) => "warm",
        }
    }
}

/// Whether a create made the volume or found it made (a retried call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Existed,
}

impl Context {
    /// The allocation unit: sizes are rounded up to whole pool blocks, and to
    /// at least 1 MiB so that every later stack (clone regions, era blocks)
    /// divides the volume evenly.
    pub fn size_unit(&self) -> u64 {
        self.pool.layout.block_bytes.max(MIB)
    }

    /// Validates a requested size and rounds it up to the allocation unit.
    pub fn volume_size(&self, field: &'static str, requested: u64) -> Result<u64, AgentError> {
        let max = self.settings.max_volume_size;
        if requested == 0 {
            return Err(AgentError::InvalidArgument {
                field,
                reason: "must be greater than zero".into(),
            });
        }
        if requested > max {
            return Err(AgentError::InvalidArgument {
                field,
                reason: format!(
                    "{requested} bytes is more than the largest volume this agent makes ({}, volumes.max_size)",
                    Size(max)
                ),
            });
        }
        let unit = self.size_unit();
        Ok(requested.div_ceil(unit) * unit)
    }

    pub(crate) async fn record(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, AgentError> {
        let id = id.clone();
        self.store_call(move |store| store.volume(&id)).await
    }

    /// The record of a volume that exists and is not in the middle of being
    /// created, deleted or quarantined.
    pub(crate) async fn ready_record(
        &self,
        id: &VolumeId,
        action: &'static str,
    ) -> Result<VolumeRecord, AgentError> {
        let record = self.record(id).await?.ok_or_else(|| not_found(id))?;
        if let Some(why) = &record.quarantine {
            return Err(Refusal::VolumeQuarantined {
                volume: id.clone(),
                why: why.clone(),
                action,
            }
            .into());
        }
        if let Some(warm) = &record.warm {
            return Err(Refusal::VolumeWarm {
                volume: id.clone(),
                left_for: warm.left_for.clone(),
                action,
            }
            .into());
        }
        match record.pending {
            Some(Pending::Create) => Err(Refusal::VolumeBeingCreated { volume: id.clone() }.into()),
            Some(Pending::Delete) => Err(Refusal::VolumeBeingDeleted {
                volume: id.clone(),
                action,
            }
            .into()),
            _ => Ok(record),
        }
    }

    pub(crate) async fn put(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        let record = record.clone();
        self.store_call(move |store| store.put_volume(&record))
            .await
    }

    /// Clears the intent: the operation is complete.
    pub(crate) async fn settle(
        &self,
        mut record: VolumeRecord,
    ) -> Result<VolumeRecord, AgentError> {
        record.pending = None;
        self.put(&record).await?;
        Ok(record)
    }

    /// What the pool has promised: every volume's and every snapshot's size
    /// (a snapshot may come to hold a full copy once its volume is rewritten).
    pub(crate) async fn provisioned_bytes(&self) -> Result<u64, AgentError> {
        self.store_call(|store| {
            let volumes: u64 = store.volumes()?.iter().map(|r| r.size_bytes).sum();
            let snapshots: u64 = store
                .all::<crate::store::SnapshotRecord>()?
                .iter()
                .map(|s| s.size_bytes)
                .sum();
            Ok(volumes + snapshots)
        })
        .await
    }

    /// Refuses `bytes` more of promised space when the pool cannot take it.
    pub(crate) async fn check_room_for(&self, bytes: u64) -> Result<(), AgentError> {
        let usage = self.pool.usage().await?;
        let provisioned = self.provisioned_bytes().await?;
        self.pool.check_room(&usage, provisioned, bytes)
    }

    /// Refuses a move of `bytes` (its size and clone metadata) that the
    /// pool could not write in full: the data below the low-space mark must
    /// hold it and what the moves already arriving still have to write.
    pub(crate) async fn check_room_to_hydrate(&self, bytes: u64) -> Result<(), AgentError> {
        let usage = self.pool.usage().await?;
        let pending = self.bytes_still_arriving().await?;
        self.pool.check_fill(&usage, pending, bytes)
    }

    /// What arriving volumes have yet to write: their size less what their
    /// thin device maps already (all of it where the kernel does not say).
    async fn bytes_still_arriving(&self) -> Result<u64, AgentError> {
        let records = self.store_call(|store| store.volumes()).await?;
        let mut pending = 0u64;
        for record in records.iter().filter(|record| record.transfer.is_some()) {
            let mapped = self
                .dm
                .status_of::<ThinStatus>(&self.naming.thin(&record.id), 0)
                .await
                .ok()
                .and_then(|status| status.mapped_sectors())
                .map_or(0, bytes);
            pending = pending.saturating_add(record.size_bytes.saturating_sub(mapped));
        }
        Ok(pending)
    }

    /// A record's state as callers see it.
    pub(crate) fn volume_state(&self, record: &VolumeRecord) -> VolumeState {
        if record.quarantine.is_none()
            && let Some(reason) = self.unsettled.reason(&record.id)
        {
            return VolumeState::Degraded(reason);
        }
        match (&record.quarantine, &record.pending) {
            (Some(reason), _) => VolumeState::Quarantined(reason.clone()),
            (None, Some(Pending::Create)) => VolumeState::Creating,
            (None, Some(Pending::Delete)) => VolumeState::Deleting,
            (None, _) if record.transfer.is_some() => VolumeState::Hydrating,
            (None, _) => match &record.warm {
                Some(warm) => VolumeState::Warm(format!(
                    "moved to host {} at {}; this copy is kept until {} (Unix seconds) for a move back",
                    warm.left_for, warm.left_unix, warm.until_unix
                )),
                None => VolumeState::Available,
            },
        }
    }

    /// The caller's view of a record plus what the kernel says now.
    pub(crate) async fn describe(&self, record: &VolumeRecord) -> Result<Volume, AgentError> {
        let id = record.id.clone();
        let state = self.volume_state(record);
        let allocated_bytes = self
            .dm
            .status_of::<ThinStatus>(&self.naming.thin(&id), 0)
            .await
            .ok()
            .and_then(|s| s.mapped_sectors())
            .map(bytes);
        Ok(Volume {
            device_path: record
                .published
                .then(|| self.naming.public(&id).mapper_path()),
            id,
            size_bytes: record.size_bytes,
            state,
            published: record.published,
            allocated_bytes,
            source_snapshot: record.source_snapshot.clone(),
            source_volume: record.source_volume.clone(),
            change_tracking: record.tracking.is_some(),
        })
    }

    pub(crate) async fn snapshot_record(
        &self,
        id: &SnapshotId,
    ) -> Result<Option<SnapshotRecord>, AgentError> {
        let id = id.to_string();
        self.store_call(move |store| store.get::<SnapshotRecord>(&id))
            .await
    }

    pub(crate) async fn snapshots_of(
        &self,
        volume: Option<&VolumeId>,
    ) -> Result<Vec<SnapshotRecord>, AgentError> {
        let all = self
            .store_call(|store| store.all::<SnapshotRecord>())
            .await?;
        Ok(all
            .into_iter()
            .filter(|s| volume.is_none_or(|v| s.volume_id == v.as_str()))
            .collect())
    }

    pub(crate) async fn transfer_record(
        &self,
        id: &TransferId,
    ) -> Result<Option<TransferRecord>, AgentError> {
        let id = id.clone();
        self.store_call(move |store| store.get::<TransferRecord>(id.as_str()))
            .await
    }

    /// The transfer an arriving volume's record names; its absence is a
    /// store that contradicts itself.
    pub(crate) async fn arriving_transfer(
        &self,
        volume: &VolumeRecord,
        transfer_id: &TransferId,
    ) -> Result<TransferRecord, AgentError> {
        self.transfer_record(transfer_id).await?.ok_or_else(|| {
            AgentError::Internal(format!(
                "volume {} names a missing transfer {transfer_id}",
                volume.id
            ))
        })
    }

    pub(crate) async fn put_transfer(&self, transfer: &TransferRecord) -> Result<(), AgentError> {
        let record = transfer.clone();
        self.store_call(move |store| store.commit(vec![Change::put(&record)?]))
            .await?;
        let _ = self.registry.updates.send(self.transfer_view(transfer));
        Ok(())
    }

    pub(crate) async fn commit_pair(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        let (v, t) = (volume.clone(), transfer.clone());
        self.store_call(move |store| store.commit(vec![Change::put(&v)?, Change::put(&t)?]))
            .await?;
        let _ = self.registry.updates.send(self.transfer_view(transfer));
        Ok(())
    }

    /// The record of a transfer, with its volume locked.
    pub(crate) async fn locked_transfer(
        &self,
        id: &TransferId,
    ) -> Result<(TransferRecord, crate::locks::Held), AgentError> {
        let record = self
            .transfer_record(id)
            .await?
            .ok_or_else(|| transfer_not_found(id))?;
        let held = self.locks.lock(&record.volume_id).await;
        // Read again under the lock: the monitor may have moved it on.
        let record = self
            .transfer_record(id)
            .await?
            .ok_or_else(|| transfer_not_found(id))?;
        Ok((record, held))
    }

    pub(crate) fn transfer_view(&self, record: &TransferRecord) -> TransferView {
        let device_path = self.naming.public(&record.volume_id).mapper_path();
        let live = self
            .registry
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        view(record, live.get(&record.id), device_path)
    }

    pub async fn get_transfer(&self, id: &TransferId) -> Result<TransferView, AgentError> {
        let record = self
            .transfer_record(id)
            .await?
            .ok_or_else(|| transfer_not_found(id))?;
        Ok(self.transfer_view(&record))
    }

    /// Updates of every transfer (state changes and progress ticks).
    pub fn watch_transfers(&self) -> tokio::sync::broadcast::Receiver<TransferView> {
        self.registry.updates.subscribe()
    }

    pub async fn list_transfers(&self) -> Result<Vec<TransferView>, AgentError> {
        let records = self
            .store_call(|store| store.all::<TransferRecord>())
            .await?;
        Ok(records.iter().map(|r| self.transfer_view(r)).collect())
    }
}

pub(crate) fn not_found(id: &VolumeId) -> AgentError {
    AgentError::NotFound {
        what: "volume",
        id: id.to_string(),
    }
}

pub(crate) fn transfer_not_found(id: &TransferId) -> AgentError {
    AgentError::NotFound {
        what: "transfer",
        id: id.to_string(),
    }
}

/// The record of a volume about to be created: thin id to be allocated.
pub(crate) fn new_record(id: &VolumeId, size: u64) -> VolumeRecord {
    VolumeRecord {
        id: id.clone(),
        size_bytes: size,
        thin_id: ThinId(0),
        published: false,
        created_unix: unix_now(),
        pending: Some(Pending::Create),
        quarantine: None,
        transfer: None,
        export: None,
        source_snapshot: None,
        source_volume: None,
        tracking: None,
        on_lower: false,
        warm: None,
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
