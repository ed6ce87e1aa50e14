//! Volumes: a thin device in the pool (`<prefix>-thin-<id>`, active while the
//! volume exists) and, while published, a public device `<prefix>-<id>` whose
//! table the agent owns: dm-era over the thin device when the volume tracks
//! changes (see [`crate::changes`]), else a linear map of it; an arriving
//! volume's is dm-clone until its transfer finishes. Tables are swapped
//! atomically without the path changing.
//!
//! Every call here takes the volume's lock, validates against the record,
//! writes its intent, changes the kernel, then clears the intent.

use std::path::PathBuf;

use tracing::{info, warn};

use crate::{
    agent::Agent,
    config::{MIB, Size},
    dm::{
        names::DeviceName,
        status::ThinStatus,
        table::{DevRef, Table},
    },
    error::AgentError,
    failpoint,
    ids::{SnapshotId, ThinId, VolumeId},
    refusal::Refusal,
    stack,
    store::{Pending, VolumeRecord},
};

use crate::units::bytes;

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
        }
    }
}

/// Whether a create made the volume or found it made (a retried call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Existed,
}

impl Agent {
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

    pub async fn create_volume(
        &self,
        id: &VolumeId,
        requested_bytes: u64,
    ) -> Result<(Volume, Outcome), AgentError> {
        let size = self.volume_size("size_bytes", requested_bytes)?;
        let _held = self.locks.lock(id.as_str()).await;
        if let Some(existing) = self.record(id).await? {
            return self.create_again(existing, size).await;
        }
        self.check_room_for(size).await?;
        let mut record = new_record(id, size);
        record.tracking = self.new_tracking(Some(0));
        let record = self
            .store_call(move |store| store.insert_volume_with_new_thin_id(record))
            .await?;
        failpoint::hit("create.after_record");
        match self.build_new_volume(&record).await {
            Ok(()) => {}
            Err(err) => {
                self.roll_back_create(&record).await;
                return Err(err);
            }
        }
        let record = self.settle(record).await?;
        info!(volume = %id, size, thin_id = %record.thin_id, "created volume");
        Ok((self.describe(&record).await?, Outcome::Created))
    }

    /// A create for an id that exists: the same size returns the volume
    /// (Cinder retries), another size is a conflict.
    async fn create_again(
        &self,
        existing: VolumeRecord,
        size: u64,
    ) -> Result<(Volume, Outcome), AgentError> {
        if existing.size_bytes != size {
            return Err(AgentError::AlreadyExists {
                what: "volume",
                id: existing.id.to_string(),
                detail: format!(
                    "with size {} bytes, not the {size} bytes asked for",
                    existing.size_bytes
                ),
            });
        }
        match existing.pending {
            Some(Pending::Create) => {
                // A create that failed half-way and could not be rolled back:
                // the caller retries, so finish it.
                self.build_new_volume(&existing).await?;
                let record = self.settle(existing).await?;
                Ok((self.describe(&record).await?, Outcome::Created))
            }
            Some(Pending::Delete) => Err(Refusal::VolumeBeingDeleted {
                volume: existing.id.clone(),
                action: "be created again",
            }
            .into()),
            _ => Ok((self.describe(&existing).await?, Outcome::Existed)),
        }
    }

    async fn build_new_volume(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        self.pool.create_thin(record.thin_id).await?;
        failpoint::hit("create.after_thin");
        self.ensure_thin_device(record).await?;
        self.ensure_era_metadata(record).await?;
        failpoint::hit("create.after_device");
        Ok(())
    }

    /// Best effort: a failed create leaves nothing behind, or, if even that
    /// fails, its intent for the next start (or the next retry) to finish.
    pub(crate) async fn roll_back_create(&self, record: &VolumeRecord) {
        if let Err(err) = self.undo_create(record).await {
            warn!(volume = %record.id, error = %err, "could not roll back a failed create; its intent stays for reconciliation");
        }
    }

    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        let _held = self.locks.lock(id.as_str()).await;
        let Some(record) = self.record(id).await? else {
            info!(volume = %id, "delete of an absent volume: nothing to do");
            return Ok(());
        };
        if let Some(export) = &record.export {
            return Err(Refusal::VolumeExported {
                volume: id.clone(),
                host_nqn: export.host_nqn.clone(),
                hint: "unexport it before deleting it",
            }
            .into());
        }
        self.delete_locked(id, record).await
    }

    /// Deletes a volume whose lock the caller holds.
    pub(crate) async fn delete_locked(
        &self,
        id: &VolumeId,
        mut record: VolumeRecord,
    ) -> Result<(), AgentError> {
        let snapshots = self.snapshots_of(Some(id)).await?;
        if !snapshots.is_empty() {
            return Err(Refusal::VolumeHasSnapshots {
                volume: id.clone(),
                snapshots: snapshots.into_iter().map(|s| s.id).collect(),
            }
            .into());
        }
        if let Some(transfer) = &record.transfer {
            return Err(Refusal::VolumeArriving {
                volume: id.clone(),
                transfer: transfer.clone(),
                hint: "abort the transfer to remove it",
            }
            .into());
        }
        if record.published {
            return Err(Refusal::VolumePublished {
                volume: id.clone(),
                device: self.naming.public(id).mapper_path(),
                hint: "unpublish it before deleting it",
            }
            .into());
        }
        if let Some(open) = self.open_count(&self.thin_name(&record)).await?
            && open > 0
        {
            return Err(Refusal::VolumeInUse {
                volume: id.clone(),
                device: self.thin_name(&record).to_string(),
                open_count: open,
                hint: "close them before deleting it",
            }
            .into());
        }
        record.pending = Some(Pending::Delete);
        self.put(&record).await?;
        failpoint::hit("delete.after_record");
        self.finish_delete(&record).await?;
        info!(volume = %id, thin_id = %record.thin_id, "deleted volume");
        Ok(())
    }

    /// Undoes a create that stopped half-way: whatever of its stack exists
    /// goes, then its record. Reconciliation does the same after a crash.
    pub(crate) async fn undo_create(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        let id = record.id.clone();
        stack::tear_down(
            self.dm.as_ref(),
            &self.pool,
            &self.naming,
            &id,
            &record.owned_thin_ids(),
        )
        .await?;
        self.store_call(move |store| store.remove_volume(&id)).await
    }

    /// The steps after the intent: remove devices, free the thin ids'
    /// blocks, forget the record. Each step is idempotent, so
    /// reconciliation repeats them after a crash.
    pub(crate) async fn finish_delete(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        let id = record.id.clone();
        stack::remove_volume_devices(self.dm.as_ref(), &self.naming, &id).await?;
        failpoint::hit("delete.after_devices");
        stack::free_thin_ids(&self.pool, &record.owned_thin_ids()).await?;
        failpoint::hit("delete.after_thin");
        self.store_call(move |store| store.remove_volume(&id)).await
    }

    pub async fn extend_volume(
        &self,
        id: &VolumeId,
        requested_bytes: u64,
    ) -> Result<Volume, AgentError> {
        let new_size = self.volume_size("new_size_bytes", requested_bytes)?;
        let _held = self.locks.lock(id.as_str()).await;
        let mut record = self.ready_record(id, "extend").await?;
        if let Some(export) = &record.export {
            return Err(Refusal::VolumeExported {
                volume: id.clone(),
                host_nqn: export.host_nqn.clone(),
                hint: "extend it on its new host",
            }
            .into());
        }
        if new_size < record.size_bytes {
            return Err(AgentError::InvalidArgument {
                field: "new_size_bytes",
                reason: format!(
                    "{new_size} bytes is smaller than the volume's {} bytes; volumes never shrink",
                    record.size_bytes
                ),
            });
        }
        if new_size == record.size_bytes {
            return self.describe(&record).await;
        }
        self.check_room_for(new_size - record.size_bytes).await?;
        let from_bytes = record.size_bytes;
        record.size_bytes = new_size;
        record.pending = Some(Pending::Extend { from_bytes });
        self.put(&record).await?;
        failpoint::hit("extend.after_record");
        self.apply_size(&record).await?;
        let record = self.settle(record).await?;
        info!(volume = %id, from_bytes, to_bytes = new_size, "extended volume");
        self.describe(&record).await
    }

    /// Grows the thin device, then the public device on top of it.
    pub(crate) async fn apply_size(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        self.ensure_thin_device(record).await?;
        failpoint::hit("extend.after_thin_table");
        if let Some(transfer) = &record.transfer {
            self.resize_arriving(record, transfer).await?;
        } else if record.published {
            self.ensure_public_device(record).await?;
        }
        failpoint::hit("extend.after_public_table");
        Ok(())
    }

    pub async fn get_volume(&self, id: &VolumeId) -> Result<Volume, AgentError> {
        let record = self.record(id).await?.ok_or_else(|| not_found(id))?;
        self.describe(&record).await
    }

    pub async fn list_volumes(&self) -> Result<Vec<Volume>, AgentError> {
        let records = self.store_call(|store| store.volumes()).await?;
        let mut volumes = Vec::with_capacity(records.len());
        for record in &records {
            volumes.push(self.describe(record).await?);
        }
        Ok(volumes)
    }

    /// Makes the public device present and returns its stable path.
    pub async fn publish_volume(&self, id: &VolumeId) -> Result<PathBuf, AgentError> {
        let _held = self.locks.lock(id.as_str()).await;
        let mut record = self.ready_record(id, "publish").await?;
        if record.transfer.is_some() {
            // Arriving volumes are presented from the start; publishing
            // keeps the device after the transfer finishes.
            if !record.published {
                record.published = true;
                self.put(&record).await?;
                info!(volume = %id, "published arriving volume");
            }
            return Ok(self.naming.public(id).mapper_path());
        }
        if let Some(export) = &record.export
            && !record.published
        {
            // Its copy is moving away: no new writer may appear here.
            return Err(Refusal::VolumeExported {
                volume: id.clone(),
                host_nqn: export.host_nqn.clone(),
                hint: "it cannot be published here again",
            }
            .into());
        }
        if !record.published {
            record.published = true;
            record.pending = Some(Pending::Publish);
            self.put(&record).await?;
            failpoint::hit("publish.after_record");
        }
        self.ensure_thin_device(&record).await?;
        self.ensure_public_device(&record).await?;
        self.note_history_start(&mut record, &self.naming.public(id))
            .await?;
        if record.pending.is_some() {
            self.settle(record).await?;
            info!(volume = %id, "published volume");
        }
        Ok(self.naming.public(id).mapper_path())
    }

    /// Removes the public device; refused while something holds it open.
    pub async fn unpublish_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        let _held = self.locks.lock(id.as_str()).await;
        let mut record = self.ready_record(id, "unpublish").await?;
        let public = self.naming.public(id);
        if let Some(open) = self.open_count(&public).await?
            && open > 0
        {
            return Err(Refusal::VolumeInUse {
                volume: id.clone(),
                device: public.mapper_path().display().to_string(),
                open_count: open,
                hint: "detach it first (an attached instance holds it open, for example)",
            }
            .into());
        }
        if let Some(transfer) = &record.transfer {
            // Hydration runs through the public device: it goes when the
            // transfer finishes (see `withdraw_unpublished`).
            if record.published {
                info!(volume = %id, %transfer, "unpublished arriving volume: its device goes when the transfer finishes");
                record.published = false;
                self.put(&record).await?;
            }
            return Ok(());
        }
        if record.published {
            record.published = false;
            record.pending = Some(Pending::Unpublish);
            self.put(&record).await?;
            failpoint::hit("unpublish.after_record");
        }
        if let Err(err) = self.remove_device_if_present(&public).await {
            // Opened between the check and the removal: it stays published.
            record.published = true;
            self.settle(record).await?;
            return Err(err);
        }
        if record.pending.is_some() {
            self.settle(record).await?;
            info!(volume = %id, "unpublished volume");
        }
        Ok(())
    }

    /// After a transfer finished: an arriving volume that was unpublished
    /// meanwhile loses its public device, unless someone opened it since.
    pub(crate) async fn withdraw_unpublished(
        &self,
        mut record: VolumeRecord,
    ) -> Result<(), AgentError> {
        if record.published || record.transfer.is_some() {
            return Ok(());
        }
        let id = record.id.clone();
        let public = self.naming.public(&id);
        // The kernel refuses to remove an open device: busy means opened.
        match self.remove_device_if_present(&public).await {
            Ok(()) => {
                info!(volume = %id, "unpublished volume");
                Ok(())
            }
            Err(AgentError::Refused(Refusal::DeviceInUse { .. })) => {
                warn!(volume = %id, "unpublished volume's device is open; keeping it published");
                record.published = true;
                self.put(&record).await
            }
            Err(err) => Err(err),
        }
    }

    // ---- helpers shared with reconciliation ----------------------------

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

    pub(crate) fn thin_name(&self, record: &VolumeRecord) -> DeviceName {
        self.naming.thin(&record.id)
    }

    /// Creates the thin device, or brings a live one to the record's size.
    pub(crate) async fn ensure_thin_device(
        &self,
        record: &VolumeRecord,
    ) -> Result<DevRef, AgentError> {
        let table = self.pool.thin_table(record.thin_id, record.size_bytes)?;
        self.ensure_device(&self.thin_name(record), &table, |live| {
            stack::is_resize_of(live, &table)
        })
        .await
    }

    /// Creates the public device over the thin device (through dm-era when
    /// the volume tracks changes), or resizes it.
    pub(crate) async fn ensure_public_device(
        &self,
        record: &VolumeRecord,
    ) -> Result<DevRef, AgentError> {
        let thin = self.ensure_thin_device(record).await?;
        let table = self.local_table(record, thin).await?;
        let public = self.naming.public(&record.id);
        self.ensure_device(&public, &table, |live| stack::is_resize_of(live, &table))
            .await
    }

    /// Makes `name` carry `table` (see [`stack::ensure_device`]).
    pub(crate) async fn ensure_device(
        &self,
        name: &DeviceName,
        table: &Table,
        may_swap: impl Fn(&Table) -> bool,
    ) -> Result<DevRef, AgentError> {
        stack::ensure_device(self.dm.as_ref(), name, table, may_swap).await
    }

    pub(crate) async fn remove_device_if_present(
        &self,
        name: &DeviceName,
    ) -> Result<(), AgentError> {
        stack::remove_if_present(self.dm.as_ref(), name).await
    }

    /// Who holds the device open, not counting openers that let go by
    /// themselves in a moment.
    pub(crate) async fn open_count(&self, name: &DeviceName) -> Result<Option<i32>, AgentError> {
        Ok(self.dm.settled_open_count(name).await?)
    }

    /// A record's state as callers see it.
    pub(crate) fn volume_state(&self, record: &VolumeRecord) -> VolumeState {
        match (&record.quarantine, &record.pending) {
            (Some(reason), _) => VolumeState::Quarantined(reason.clone()),
            (None, Some(Pending::Create)) => VolumeState::Creating,
            (None, Some(Pending::Delete)) => VolumeState::Deleting,
            (None, _) if record.transfer.is_some() => VolumeState::Hydrating,
            (None, _) => VolumeState::Available,
        }
    }

    /// The caller's view of a record plus what the kernel says now.
    async fn describe(&self, record: &VolumeRecord) -> Result<Volume, AgentError> {
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
}

fn not_found(id: &VolumeId) -> AgentError {
    AgentError::NotFound {
        what: "volume",
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
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
