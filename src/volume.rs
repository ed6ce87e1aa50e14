//! Volumes: a thin device in the pool (`<prefix>-thin-<id>`, active while the
//! volume exists) and, while published, a public device `<prefix>-<id>` whose
//! table the agent owns: dm-era over the thin device when the volume tracks
//! changes (see [`crate::changes`]), else a linear map of it; an arriving
//! volume's is dm-clone until its transfer finishes. Tables are swapped
//! atomically without the path changing.
//!
//! Every call here takes the volume's lock, validates against the record,
//! writes its intent, changes the kernel, then clears the intent.

use std::{path::PathBuf, sync::Arc};

use tracing::{info, warn};

use crate::{
    context::Context,
    error::AgentError,
    failpoint,
    ids::VolumeId,
    records::{new_record, not_found},
    refusal::Refusal,
    store::{Pending, VolumeRecord, WarmCopy},
};

pub use crate::records::{Outcome, Volume, VolumeState};

/// Creating, resizing, publishing and deleting volumes.
#[derive(Debug, Clone)]
pub struct Volumes {
    ctx: Arc<Context>,
}

impl Volumes {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    pub async fn create_volume(
        &self,
        id: &VolumeId,
        requested_bytes: u64,
    ) -> Result<(Volume, Outcome), AgentError> {
        let size = self.ctx.volume_size("size_bytes", requested_bytes)?;
        let _held = self.ctx.locks.lock(id.as_str()).await;
        if let Some(existing) = self.ctx.record(id).await? {
            return self.create_again(existing, size).await;
        }
        self.ctx.check_room_for(size).await?;
        let mut record = new_record(id, size);
        record.tracking = self.ctx.new_tracking(Some(0));
        let record = self
            .ctx
            .store_call(move |store| store.insert_volume_with_new_thin_id(record))
            .await?;
        failpoint::hit("create.after_record");
        match self.build_new_volume(&record).await {
            Ok(()) => {}
            Err(err) => {
                self.ctx.roll_back_create(&record).await;
                return Err(err);
            }
        }
        let record = self.ctx.settle(record).await?;
        info!(volume = %id, size, thin_id = %record.thin_id, "created volume");
        Ok((self.ctx.describe(&record).await?, Outcome::Created))
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
                let record = self.ctx.settle(existing).await?;
                Ok((self.ctx.describe(&record).await?, Outcome::Created))
            }
            Some(Pending::Delete) => Err(Refusal::VolumeBeingDeleted {
                volume: existing.id.clone(),
                action: "be created again",
            }
            .into()),
            _ => Ok((self.ctx.describe(&existing).await?, Outcome::Existed)),
        }
    }

    async fn build_new_volume(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        self.ctx.pool.create_thin(record.thin_id).await?;
        failpoint::hit("create.after_thin");
        self.ctx.ensure_thin_device(record).await?;
        self.ctx.ensure_era_metadata(record).await?;
        failpoint::hit("create.after_device");
        Ok(())
    }

    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let Some(record) = self.ctx.record(id).await? else {
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
        let snapshots = self.ctx.snapshots_of(Some(id)).await?;
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
                device: self.ctx.naming.public(id).mapper_path(),
                hint: "unpublish it before deleting it",
            }
            .into());
        }
        if let Some(open) = self.ctx.open_count(&self.ctx.thin_name(&record)).await?
            && open > 0
        {
            return Err(Refusal::VolumeInUse {
                volume: id.clone(),
                device: self.ctx.thin_name(&record).to_string(),
                open_count: open,
                hint: "close them before deleting it",
            }
            .into());
        }
        record.pending = Some(Pending::Delete);
        self.ctx.put(&record).await?;
        failpoint::hit("delete.after_record");
        self.ctx.finish_delete(&record).await?;
        info!(volume = %id, thin_id = %record.thin_id, "deleted volume");
        Ok(())
    }

    /// Drops the warm copies kept past their time; returns how many.
    pub async fn drop_expired_warm_copies(&self, now: i64) -> Result<usize, AgentError> {
        let mut dropped = 0;
        for (_, id) in self.warm_copies().await? {
            let expired = |warm: &WarmCopy| warm.until_unix <= now;
            if self
                .drop_warm_copy_if(&id, expired, "past its keeping")
                .await
            {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// The pool reached its low-space mark: warm copies go first, oldest
    /// first, until it is below the mark again. Returns how many went.
    pub async fn drop_warm_copies_while_low(&self) -> Result<usize, AgentError> {
        let mut dropped = 0;
        for (_, id) in self.warm_copies().await? {
            if !self.ctx.pool.usage().await?.low_space {
                break;
            }
            if self
                .drop_warm_copy_if(&id, |_| true, "for room: the pool is low on space")
                .await
            {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Every warm copy's id, oldest first, but those with snapshots: they
    /// stay as long as their snapshots do.
    async fn warm_copies(&self) -> Result<Vec<(i64, VolumeId)>, AgentError> {
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        let snapshots = self.ctx.snapshots_of(None).await?;
        let mut copies: Vec<_> = records
            .into_iter()
            .filter(|record| !snapshots.iter().any(|s| s.volume_id == record.id.as_str()))
            .filter_map(|record| Some((record.warm?.left_unix, record.id)))
            .collect();
        copies.sort();
        Ok(copies)
    }

    /// Deletes the volume if it is still a warm copy that `drop` accepts
    /// once its lock is held (a move back may have taken it meanwhile);
    /// whether it went.
    async fn drop_warm_copy_if(
        &self,
        id: &VolumeId,
        drop: impl Fn(&WarmCopy) -> bool,
        why: &'static str,
    ) -> bool {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let record = match self.ctx.record(id).await {
            Ok(Some(record)) if record.warm.as_ref().is_some_and(&drop) => record,
            Ok(_) => return false,
            Err(err) => {
                warn!(volume = %id, error = %err, "cannot read a warm copy's record");
                return false;
            }
        };
        match self.delete_locked(id, record).await {
            Ok(()) => {
                info!(volume = %id, why, "dropped a warm copy");
                true
            }
            Err(err) => {
                warn!(volume = %id, why, error = %err, "cannot drop a warm copy; trying again later");
                false
            }
        }
    }

    pub async fn extend_volume(
        &self,
        id: &VolumeId,
        requested_bytes: u64,
    ) -> Result<Volume, AgentError> {
        let new_size = self.ctx.volume_size("new_size_bytes", requested_bytes)?;
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "extend").await?;
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
            return self.ctx.describe(&record).await;
        }
        self.ctx
            .check_room_for(new_size - record.size_bytes)
            .await?;
        let from_bytes = record.size_bytes;
        record.size_bytes = new_size;
        record.pending = Some(Pending::Extend { from_bytes });
        self.ctx.put(&record).await?;
        failpoint::hit("extend.after_record");
        self.apply_size(&record).await?;
        let record = self.ctx.settle(record).await?;
        info!(volume = %id, from_bytes, to_bytes = new_size, "extended volume");
        self.ctx.describe(&record).await
    }

    /// Grows the thin device, then the public device on top of it.
    pub(crate) async fn apply_size(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        self.ctx.ensure_thin_device(record).await?;
        failpoint::hit("extend.after_thin_table");
        if let Some(transfer) = &record.transfer {
            self.ctx.resize_arriving(record, transfer).await?;
        } else if record.published {
            self.ctx.ensure_public_device(record).await?;
        }
        failpoint::hit("extend.after_public_table");
        Ok(())
    }

    pub async fn get_volume(&self, id: &VolumeId) -> Result<Volume, AgentError> {
        let record = self.ctx.record(id).await?.ok_or_else(|| not_found(id))?;
        self.ctx.describe(&record).await
    }

    /// Every volume of this host; warm copies (of volumes that moved away)
    /// only when asked for.
    pub async fn list_volumes(&self, include_warm: bool) -> Result<Vec<Volume>, AgentError> {
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        let mut volumes = Vec::with_capacity(records.len());
        for record in records.iter().filter(|r| include_warm || r.warm.is_none()) {
            volumes.push(self.ctx.describe(record).await?);
        }
        Ok(volumes)
    }

    /// Makes the public device present and returns its stable path.
    pub async fn publish_volume(&self, id: &VolumeId) -> Result<PathBuf, AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "publish").await?;
        if record.transfer.is_some() {
            // Arriving volumes are presented from the start; publishing
            // keeps the device after the transfer finishes.
            if !record.published {
                record.published = true;
                self.ctx.put(&record).await?;
                info!(volume = %id, "published arriving volume");
            }
            return Ok(self.ctx.naming.public(id).mapper_path());
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
            self.ctx.put(&record).await?;
            failpoint::hit("publish.after_record");
        }
        self.ctx.ensure_thin_device(&record).await?;
        self.ctx.ensure_public_device(&record).await?;
        self.ctx
            .note_history_start(
                &mut record,
                &crate::changes::EraDevice::public(self.ctx.naming.public(id)),
            )
            .await?;
        if record.pending.is_some() {
            self.ctx.settle(record).await?;
            info!(volume = %id, "published volume");
        }
        Ok(self.ctx.naming.public(id).mapper_path())
    }

    /// Removes the public device; refused while something holds it open.
    pub async fn unpublish_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "unpublish").await?;
        let public = self.ctx.naming.public(id);
        if let Some(open) = self.ctx.open_count(&public).await?
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
                self.ctx.put(&record).await?;
            }
            return Ok(());
        }
        if record.published {
            record.published = false;
            record.pending = Some(Pending::Unpublish);
            self.ctx.put(&record).await?;
            failpoint::hit("unpublish.after_record");
        }
        if let Err(err) = self.ctx.remove_public_stack(&mut record).await {
            // Opened between the check and the removal: it stays published.
            record.published = true;
            self.ctx.settle(record).await?;
            return Err(err);
        }
        if record.pending.is_some() {
            self.ctx.settle(record).await?;
            info!(volume = %id, "unpublished volume");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
