//! Thin snapshots, volumes made from them, clones of volumes, and revert.
//!
//! A snapshot is a thin device made by the pool's `create_snap` from the
//! volume's thin device: instant, copy-on-write, sharing every block until
//! one side writes. It is not active; the agent activates it only for a
//! moment to read how much it maps. Volumes made from a snapshot and clones
//! of a volume are thin snapshots too, independent of their source from the
//! start. The origin is suspended only around the `create_snap` message, as
//! the kernel needs, so writes in flight cannot race the shared blocks.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    context::Context,
    dm::{names::DeviceName, status::ThinStatus},
    error::AgentError,
    failpoint,
    ids::{SnapshotId, ThinId, VolumeId},
    records::{new_record, unix_now},
    refusal::Refusal,
    store::{Change, Pending, SnapshotRecord, VolumeRecord},
    transfer::TransferState,
    units::bytes,
    volume::{Outcome, Volume},
};

/// How long a snapshot of an arriving volume waits for its hydration.
const HYDRATION_WAIT: Duration = Duration::from_secs(600);

/// A snapshot as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotView {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub size_bytes: u64,
    /// Bytes the snapshot maps (shared with the volume or not); `None` if
    /// the kernel could not say.
    pub allocated_bytes: Option<u64>,
    pub created_unix: i64,
    /// The volume's first era after the snapshot, when it tracks changes.
    pub era: Option<u64>,
    pub state: SnapshotState,
}

/// Where a snapshot stands, as its record's pending step says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    Creating,
    Available,
    Deleting,
    /// Travelling here with its volume; usable once it arrived.
    Arriving,
}

impl SnapshotState {
    pub fn of(record: &SnapshotRecord) -> Self {
        match record.pending {
            None => SnapshotState::Available,
            Some(Pending::Delete) => SnapshotState::Deleting,
            Some(Pending::Arrive { .. }) => SnapshotState::Arriving,
            // A snapshot has no other steps; anything unfinished is unusable.
            Some(_) => SnapshotState::Creating,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Available => "available",
            SnapshotState::Deleting => "deleting",
            SnapshotState::Arriving => "arriving",
        }
    }
}

/// Snapshots, volumes made from them, clones and revert.
#[derive(Debug, Clone)]
pub struct Snapshots {
    ctx: Arc<Context>,
}

impl Snapshots {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// Takes a snapshot. A volume still arriving is snapshotted once its
    /// hydration is done (the call waits, up to 10 minutes); one that is not
    /// hydrating (deferred, paused) is refused: waiting would be unbounded.
    pub async fn create_snapshot(
        &self,
        id: &SnapshotId,
        volume: &VolumeId,
    ) -> Result<SnapshotView, AgentError> {
        self.wait_until_local(volume).await?;
        let _held = self.ctx.locks.lock(volume.as_str()).await;
        if let Some(existing) = self.ctx.snapshot_record(id).await? {
            if existing.volume_id != volume.as_str() {
                return Err(AgentError::AlreadyExists {
                    what: "snapshot",
                    id: id.to_string(),
                    detail: format!("of volume {}, not of {volume}", existing.volume_id),
                });
            }
            match existing.pending {
                None => return Ok(self.snapshot_view(&existing).await),
                // The call that began it went away half-way (its caller gave
                // up): a success now would name a snapshot the next start
                // rolls back. Undo it and take it again.
                Some(Pending::Create) => {
                    info!(snapshot = %id, "a create of this snapshot stopped half-way: taking it again");
                    self.finish_snapshot_delete(&existing).await?;
                }
                Some(_) => {
                    return Err(Refusal::SnapshotPending {
                        snapshot: id.clone(),
                    }
                    .into());
                }
            }
        }
        let mut origin = self.ctx.ready_record(volume, "be snapshotted").await?;
        if let Some(transfer) = &origin.transfer {
            return Err(Refusal::VolumeArriving {
                volume: volume.clone(),
                transfer: transfer.clone(),
                hint: "snapshot it once its transfer is done",
            }
            .into());
        }
        self.ctx.check_room_for(origin.size_bytes).await?;
        let record = SnapshotRecord {
            id: id.clone(),
            volume_id: volume.clone(),
            thin_id: ThinId(0),
            size_bytes: origin.size_bytes,
            created_unix: unix_now(),
            pending: Some(Pending::Create),
            era: None,
            arrived_from: None,
        };
        let mut record = self.insert_snapshot(record).await?;
        failpoint::hit("snapshot.after_record");
        let thin_id = record.thin_id;
        let taken = self
            .ctx
            .snapshot_with_era(&mut origin, async |origin, era| {
                self.snapshot_thin(origin, thin_id, era).await
            })
            .await;
        match taken {
            Ok(era) => {
                failpoint::hit("snapshot.after_message");
                record.era = era;
            }
            Err(err) => {
                self.roll_back_snapshot(&record).await;
                return Err(err);
            }
        }
        let record = self.settle_snapshot(record).await?;
        info!(snapshot = %id, volume = %volume, thin_id = %record.thin_id, era = ?record.era, "snapshot taken");
        Ok(self.snapshot_view(&record).await)
    }

    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentError> {
        let Some(record) = self.ctx.snapshot_record(id).await? else {
            return Ok(());
        };
        let _held = self.ctx.locks.lock(&record.volume_id).await;
        let Some(record) = self.ctx.snapshot_record(id).await? else {
            return Ok(());
        };
        if matches!(record.pending, Some(Pending::Arrive { .. })) {
            return Err(Refusal::SnapshotPending {
                snapshot: id.clone(),
            }
            .into());
        }
        self.delete_locked(record).await?;
        drop(_held);
        info!(snapshot = %id, "snapshot deleted");
        // A copy that moved away and stayed only for its snapshots goes
        // with the last of them, not at the next sweep.
        let volumes = crate::volume::Volumes::new(Arc::clone(&self.ctx));
        if let Err(err) = volumes.drop_expired_warm_copies(unix_now()).await {
            warn!(error = %err, "cannot drop warm copies past their keeping; the next sweep does");
        }
        Ok(())
    }

    /// Deletes a snapshot whose volume's lock the caller holds.
    pub(crate) async fn delete_locked(&self, mut record: SnapshotRecord) -> Result<(), AgentError> {
        record.pending = Some(Pending::Delete);
        self.put_snapshot(&record).await?;
        failpoint::hit("snapshot.delete_after_record");
        self.finish_snapshot_delete(&record).await
    }

    pub(crate) async fn finish_snapshot_delete(
        &self,
        record: &SnapshotRecord,
    ) -> Result<(), AgentError> {
        self.ctx
            .remove_device_if_present(&self.ctx.snapshot_name(record))
            .await?;
        self.ctx.pool.delete_thin(record.thin_id).await?;
        let key = record.id.clone();
        self.ctx
            .store_call(move |store| store.commit(vec![Change::remove::<SnapshotRecord>(&key)]))
            .await
    }

    pub async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotView, AgentError> {
        let record = self
            .ctx
            .snapshot_record(id)
            .await?
            .ok_or_else(|| snapshot_not_found(id))?;
        let _held = self.ctx.locks.lock(&record.volume_id).await;
        Ok(self.snapshot_view(&record).await)
    }

    pub async fn list_snapshots(
        &self,
        volume: Option<&VolumeId>,
    ) -> Result<Vec<SnapshotView>, AgentError> {
        let records = self.ctx.snapshots_of(volume).await?;
        let mut views = Vec::with_capacity(records.len());
        for record in &records {
            let _held = self.ctx.locks.lock(&record.volume_id).await;
            views.push(self.snapshot_view(record).await);
        }
        Ok(views)
    }

    /// Makes a new volume equal to a snapshot; it may be larger.
    pub async fn create_volume_from_snapshot(
        &self,
        id: &VolumeId,
        requested_bytes: u64,
        snapshot: &SnapshotId,
    ) -> Result<(Volume, Outcome), AgentError> {
        let size = self.ctx.volume_size("size_bytes", requested_bytes)?;
        let source = self
            .ctx
            .snapshot_record(snapshot)
            .await?
            .ok_or_else(|| snapshot_not_found(snapshot))?;
        let _held = self
            .ctx
            .locks
            .lock_all(&[id.as_str(), source.volume_id.as_str()])
            .await;
        let source = self
            .ctx
            .snapshot_record(snapshot)
            .await?
            .ok_or_else(|| snapshot_not_found(snapshot))?;
        if source.pending.is_some() {
            return Err(Refusal::SnapshotPending {
                snapshot: snapshot.clone(),
            }
            .into());
        }
        if size < source.size_bytes {
            return Err(smaller_than_source(
                "snapshot",
                snapshot.as_str(),
                size,
                source.size_bytes,
            ));
        }
        if let Some(existing) = self.ctx.record(id).await? {
            return self
                .made_already(existing, size, Some(snapshot), None)
                .await;
        }
        self.ctx.check_room_for(size).await?;
        let mut record = new_record(id, size);
        record.source_snapshot = Some(snapshot.clone());
        record.tracking = self.ctx.new_tracking(None);
        let record = self
            .ctx
            .store_call(move |store| store.insert_volume_with_new_thin_id(record))
            .await?;
        failpoint::hit("clone.after_record");
        let made = async {
            self.ctx
                .remove_device_if_present(&self.ctx.snapshot_name(&source))
                .await?;
            self.ctx
                .pool
                .snapshot(record.thin_id, source.thin_id, &[])
                .await?;
            self.ctx.ensure_era_metadata(&record).await?;
            self.ctx.ensure_thin_device(&record).await
        }
        .await;
        self.finish_made(record, made, "volume made from snapshot")
            .await
    }

    /// Makes a new volume equal to another volume now; it may be larger.
    pub async fn clone_volume(
        &self,
        id: &VolumeId,
        requested_bytes: u64,
        source: &VolumeId,
    ) -> Result<(Volume, Outcome), AgentError> {
        let size = self.ctx.volume_size("size_bytes", requested_bytes)?;
        self.wait_until_local(source).await?;
        let _held = self
            .ctx
            .locks
            .lock_all(&[id.as_str(), source.as_str()])
            .await;
        if let Some(existing) = self.ctx.record(id).await? {
            return self.made_already(existing, size, None, Some(source)).await;
        }
        let origin = self.ctx.ready_record(source, "be cloned").await?;
        if let Some(transfer) = &origin.transfer {
            return Err(Refusal::VolumeArriving {
                volume: source.clone(),
                transfer: transfer.clone(),
                hint: "clone it once its transfer is done",
            }
            .into());
        }
        if size < origin.size_bytes {
            return Err(smaller_than_source(
                "volume",
                source.as_str(),
                size,
                origin.size_bytes,
            ));
        }
        self.ctx.check_room_for(size).await?;
        let mut record = new_record(id, size);
        record.source_volume = Some(source.clone());
        record.tracking = self.ctx.new_tracking(None);
        let record = self
            .ctx
            .store_call(move |store| store.insert_volume_with_new_thin_id(record))
            .await?;
        failpoint::hit("clone.after_record");
        let made = async {
            self.snapshot_thin(&origin, record.thin_id, None).await?;
            self.ctx.ensure_era_metadata(&record).await?;
            self.ctx.ensure_thin_device(&record).await
        }
        .await;
        self.finish_made(record, made, "volume cloned").await
    }

    /// Makes the volume's content equal to the snapshot's. The volume must
    /// not be published: nobody may see its content change underneath.
    pub async fn revert_volume(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
    ) -> Result<(), AgentError> {
        let _held = self.ctx.locks.lock(volume.as_str()).await;
        let mut record = self.ctx.ready_record(volume, "be reverted").await?;
        let source = self
            .ctx
            .snapshot_record(snapshot)
            .await?
            .ok_or_else(|| snapshot_not_found(snapshot))?;
        if source.volume_id != volume.as_str() {
            return Err(AgentError::InvalidArgument {
                field: "snapshot_id",
                reason: format!(
                    "snapshot {snapshot} is of volume {}, not of {volume}",
                    source.volume_id
                ),
            });
        }
        if source.pending.is_some() {
            return Err(Refusal::SnapshotPending {
                snapshot: snapshot.clone(),
            }
            .into());
        }
        if record.published {
            return Err(Refusal::VolumePublished {
                volume: volume.clone(),
                device: self.ctx.naming.public(volume).mapper_path(),
                hint: "unpublish it before reverting it",
            }
            .into());
        }
        if let Some(transfer) = &record.transfer {
            return Err(Refusal::VolumeArriving {
                volume: volume.clone(),
                transfer: transfer.clone(),
                hint: "revert it once its transfer is done",
            }
            .into());
        }
        if let Some(export) = &record.export {
            return Err(Refusal::VolumeExported {
                volume: volume.clone(),
                host_nqn: export.host_nqn.clone(),
                hint: "revert it on its new host",
            }
            .into());
        }
        let old_thin = record.thin_id;
        crate::changes::restart_history(&mut record);
        record.pending = Some(Pending::Revert {
            old_thin,
            snapshot_thin: source.thin_id,
        });
        let reverting = record.clone();
        record.thin_id = self
            .ctx
            .store_call(move |store| {
                store.allocate_one_and_commit(|thin_id| {
                    let mut reverting = reverting;
                    reverting.thin_id = thin_id;
                    Ok(vec![Change::put(&reverting)?])
                })
            })
            .await?;
        failpoint::hit("revert.after_record");
        self.finish_revert(&record).await?;
        info!(volume = %volume, snapshot = %snapshot, "reverted to the snapshot");
        Ok(())
    }

    /// The steps after a revert's record, each tolerating having been done:
    /// the new thin device as a snapshot of the snapshot, the volume's device
    /// switched to it, the old one freed.
    pub(crate) async fn finish_revert(&self, record: &VolumeRecord) -> Result<(), AgentError> {
        let Some(Pending::Revert {
            old_thin,
            snapshot_thin,
        }) = record.pending
        else {
            return Ok(());
        };
        self.ctx
            .pool
            .snapshot(record.thin_id, snapshot_thin, &[])
            .await?;
        let thin = self.ctx.thin_name(record);
        self.ctx.remove_device_if_present(&thin).await?;
        self.ctx.ensure_thin_device(record).await?;
        self.ctx.pool.delete_thin(old_thin).await?;
        self.ctx.settle(record.clone()).await?;
        Ok(())
    }

    /// Snapshots the volume's thin device into `new_thin`, which no record
    /// names yet (a snapshot arriving with the volume is made from it);
    /// returns the era it starts, as [`Context::snapshot_with_era`] does.
    /// Callers hold the volume's lock.
    pub(crate) async fn snapshot_volume_into(
        &self,
        origin: &mut VolumeRecord,
        new_thin: ThinId,
    ) -> Result<Option<u64>, AgentError> {
        self.ctx
            .snapshot_with_era(origin, async |origin, era| {
                self.snapshot_thin(origin, new_thin, era).await
            })
            .await
    }

    // ---- helpers -------------------------------------------------------

    /// Snapshots the volume's thin device into `new_thin`. The origin, and
    /// `above` it (a published volume's dm-era), are suspended only around
    /// the message, in one kernel step that resumes them whatever happens.
    async fn snapshot_thin(
        &self,
        origin: &VolumeRecord,
        new_thin: ThinId,
        above: Option<&DeviceName>,
    ) -> Result<(), AgentError> {
        // An arrived volume's layer beneath dm-era is its thin id activated
        // a second time: held too.
        let lower = origin.on_lower.then(|| self.ctx.naming.lower(&origin.id));
        let hold: Vec<DeviceName> = above
            .cloned()
            .into_iter()
            .chain(lower)
            .chain([self.ctx.thin_name(origin)])
            .collect();
        self.ctx
            .pool
            .snapshot(new_thin, origin.thin_id, &hold)
            .await?;
        Ok(())
    }

    /// A create-from for an id that exists: the same size and source return
    /// it (Cinder retries), anything else is a conflict.
    async fn made_already(
        &self,
        existing: VolumeRecord,
        size: u64,
        snapshot: Option<&SnapshotId>,
        volume: Option<&VolumeId>,
    ) -> Result<(Volume, Outcome), AgentError> {
        let same = existing.size_bytes == size
            && existing.source_snapshot.as_ref() == snapshot
            && existing.source_volume.as_ref() == volume
            && existing.pending.is_none();
        if !same {
            return Err(AgentError::AlreadyExists {
                what: "volume",
                id: existing.id.to_string(),
                detail: format!(
                    "with size {} bytes made from {}",
                    existing.size_bytes,
                    describe_source(&existing)
                ),
            });
        }
        Ok((self.ctx.describe(&existing).await?, Outcome::Existed))
    }

    async fn finish_made(
        &self,
        record: VolumeRecord,
        made: Result<crate::dm::table::DevRef, AgentError>,
        what: &str,
    ) -> Result<(Volume, Outcome), AgentError> {
        if let Err(err) = made {
            self.ctx.roll_back_create(&record).await;
            return Err(err);
        }
        let record = self.ctx.settle(record).await?;
        info!(volume = %record.id, source = %describe_source(&record), "{what}");
        Ok((self.ctx.describe(&record).await?, Outcome::Created))
    }

    /// Waits (without holding any lock) until the volume is not arriving any
    /// more, if it is hydrating; refuses if it arrives but is not copying.
    async fn wait_until_local(&self, volume: &VolumeId) -> Result<(), AgentError> {
        let deadline = tokio::time::Instant::now() + HYDRATION_WAIT;
        let mut updates = self.ctx.watch_transfers();
        loop {
            let Some(record) = self.ctx.record(volume).await? else {
                return Ok(());
            };
            let Some(transfer) = &record.transfer else {
                return Ok(());
            };
            let view = self.ctx.get_transfer(transfer).await?;
            if !matches!(
                view.state,
                TransferState::Hydrating | TransferState::Finalizing | TransferState::Done
            ) {
                return Err(Refusal::VolumeArriving {
                    volume: volume.clone(),
                    transfer: transfer.clone(),
                    hint: "it is not copying now (deferred, paused or degraded); it can be snapshotted or cloned once the transfer is done",
                }
                .into());
            }
            match tokio::time::timeout_at(deadline, updates.recv()).await {
                Ok(_) => {}
                Err(_) => {
                    return Err(AgentError::Unavailable {
                        reason: format!(
                            "volume {volume} is still hydrating after 10 minutes; retry once transfer {transfer} is done"
                        ),
                    });
                }
            }
        }
    }

    async fn insert_snapshot(&self, record: SnapshotRecord) -> Result<SnapshotRecord, AgentError> {
        let thin_id = self
            .ctx
            .store_call({
                let record = record.clone();
                move |store| {
                    store.allocate_one_and_commit(|thin_id| {
                        let mut record = record;
                        record.thin_id = thin_id;
                        Ok(vec![Change::insert(&record)?])
                    })
                }
            })
            .await?;
        Ok(SnapshotRecord { thin_id, ..record })
    }

    async fn put_snapshot(&self, record: &SnapshotRecord) -> Result<(), AgentError> {
        let record = record.clone();
        self.ctx
            .store_call(move |store| store.commit(vec![Change::put(&record)?]))
            .await
    }

    async fn settle_snapshot(
        &self,
        mut record: SnapshotRecord,
    ) -> Result<SnapshotRecord, AgentError> {
        record.pending = None;
        self.put_snapshot(&record).await?;
        Ok(record)
    }

    /// Best effort; what fails stays recorded for reconciliation.
    pub(crate) async fn roll_back_snapshot(&self, record: &SnapshotRecord) {
        if let Err(err) = self.finish_snapshot_delete(record).await {
            warn!(snapshot = %record.id, error = %err, "could not roll back a failed snapshot; reconciliation finishes it");
        }
    }

    /// Size and mapped bytes; the snapshot is activated for the moment it
    /// takes to read that. Callers hold the volume's lock.
    async fn snapshot_view(&self, record: &SnapshotRecord) -> SnapshotView {
        SnapshotView {
            id: record.id.clone(),
            volume_id: record.volume_id.clone(),
            size_bytes: record.size_bytes,
            allocated_bytes: self.mapped_bytes(record).await,
            created_unix: record.created_unix,
            era: record.era,
            state: SnapshotState::of(record),
        }
    }

    async fn mapped_bytes(&self, record: &SnapshotRecord) -> Option<u64> {
        if record.pending.is_some() {
            return None;
        }
        let name = self.ctx.snapshot_name(record);
        let table = self
            .ctx
            .pool
            .thin_table(record.thin_id, record.size_bytes)
            .ok()?;
        let measured = async {
            self.ctx.dm.create(&name, None, &table).await?;
            let status = self.ctx.dm.status_of::<ThinStatus>(&name, 0).await;
            self.ctx.dm.remove(&name).await?;
            Ok::<_, AgentError>(status?.mapped_sectors().map(bytes))
        }
        .await;
        match measured {
            Ok(bytes) => bytes,
            Err(err) => {
                warn!(snapshot = %record.id, error = %err, "cannot read how much the snapshot maps");
                let _ = self.ctx.remove_device_if_present(&name).await;
                None
            }
        }
    }
}

fn describe_source(record: &VolumeRecord) -> String {
    match (&record.source_snapshot, &record.source_volume) {
        (Some(snapshot), _) => format!("snapshot {snapshot}"),
        (None, Some(volume)) => format!("volume {volume}"),
        (None, None) => "nothing (empty)".into(),
    }
}

fn smaller_than_source(what: &str, id: &str, size: u64, source: u64) -> AgentError {
    AgentError::InvalidArgument {
        field: "size_bytes",
        reason: format!("{size} bytes is smaller than {what} {id} ({source} bytes)"),
    }
}

fn snapshot_not_found(id: &SnapshotId) -> AgentError {
    AgentError::NotFound {
        what: "snapshot",
        id: id.to_string(),
    }
}

#[cfg(test)]
mod tests;
