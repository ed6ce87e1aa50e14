//! The calls on a destination's transfers: start, commit, pause, resume,
//! throttle, abort, get, list; and the clone stack they build and tear down.

use std::{path::Path, sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{KnobRequest, Source, StartRequest, TransferView, clone_metadata_bytes};

use crate::{
    config::validate_region,
    context::Context,
    dm::{
        status::{CloneStatus, Health},
        table::DevRef,
        topology,
    },
    error::AgentError,
    failpoint,
    ids::{ThinId, TransferId},
    refusal::Refusal,
    stack::CloneDevices,
    store::{
        Change, Pending, ReturnTrip, SourceRecord, TransferPhase, TransferRecord, VolumeRecord,
    },
};

/// Held by a start from its room check to its records, and by an abort
/// that looks for a record: one start at a time counts on the free space,
/// and an abort either finds the start's records or marks its id.
pub(crate) const ROOM_FOR_MOVES: &str = "room for moves";

/// The knobs a transfer starts with: the request's, else the defaults.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    region_bytes: u64,
    hydration_threshold: u32,
    hydration_batch_size: u32,
    max_bytes_per_second: u64,
}

/// The destination side of a move: starting, steering, finalizing.
#[derive(Debug, Clone)]
pub struct Transfers {
    pub(crate) ctx: Arc<Context>,
}

impl Transfers {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    pub async fn get_transfer(&self, id: &TransferId) -> Result<TransferView, AgentError> {
        self.ctx.get_transfer(id).await
    }

    pub async fn list_transfers(&self) -> Result<Vec<TransferView>, AgentError> {
        self.ctx.list_transfers().await
    }

    /// Every change of a transfer's view, as it happens.
    pub fn watch_transfers(&self) -> tokio::sync::broadcast::Receiver<TransferView> {
        self.ctx.watch_transfers()
    }

    pub async fn start_transfer(&self, request: StartRequest) -> Result<TransferView, AgentError> {
        let size = self.ctx.volume_size("size_bytes", request.size_bytes)?;
        let knobs = self.resolve_knobs(&request.knobs)?;
        let _held = self.ctx.locks.lock(request.volume.as_str()).await;
        if let Some(existing) = self.ctx.transfer_record(&request.transfer).await? {
            return self.start_again(existing, &request).await;
        }
        let landing = match self.ctx.record(&request.volume).await? {
            Some(copy) => self.land_or_drop(copy, &request, size).await?,
            None => Landing::Empty { why_whole: None },
        };
        let mut source = source_record(&request.source);
        let (source_dev, source_bytes) = self.ctx.attach_source(&source, &request.volume).await?;
        if let SourceRecord::Device { path, identity } = &mut source {
            self.refuse_own_storage(path, source_dev).await?;
            *identity = Some(
                self.ctx
                    .dm
                    .device_identity(Path::new(path), source_dev)
                    .await?,
            );
        }
        if source_bytes < size {
            self.ctx.detach_source(&source).await;
            return Err(AgentError::InvalidArgument {
                field: "size_bytes",
                reason: format!("{size} bytes asked for, but the source holds only {source_bytes}"),
            });
        }
        let metadata_bytes = clone_metadata_bytes(size, knobs.region_bytes);
        // One start at a time from the room check to its records: two
        // moves must not both count on the same free space.
        let room_held = self.ctx.locks.lock(ROOM_FOR_MOVES).await;
        if self.ctx.given_up.take(&request.transfer) {
            drop(room_held);
            self.ctx.detach_source(&source).await;
            info!(transfer = %request.transfer, "start stopped: its transfer was aborted before it was recorded");
            return Err(AgentError::AlreadyExists {
                what: "transfer",
                id: request.transfer.to_string(),
                detail: "aborted before its start was recorded (its caller gave up); start the \
                         move again with a new transfer id"
                    .into(),
            });
        }
        // A copy landed on is counted already, and holds its blocks.
        let needed = size - landing.copy_bytes() + metadata_bytes;
        let room = match self.ctx.check_room_for(needed).await {
            Ok(()) => self.ctx.check_room_to_hydrate(needed).await,
            Err(err) => Err(err),
        };
        if let Err(err) = room {
            self.ctx.detach_source(&source).await;
            return Err(err);
        }
        let (volume, transfer) = match self
            .write_start_records(
                &request,
                size,
                source.clone(),
                StartShape {
                    knobs,
                    metadata_bytes,
                    landing,
                },
            )
            .await
        {
            Ok(records) => records,
            Err(err) => {
                self.ctx.detach_source(&source).await;
                return Err(err);
            }
        };
        // Recorded, the volume counts among those still arriving.
        drop(room_held);
        failpoint::hit("transfer.after_record");
        let hydrate = !request.deferred;
        let (mut volume, mut transfer) = (volume, transfer);
        if let Err(err) = self
            .build_new_stack(&mut volume, &mut transfer, source_dev, hydrate)
            .await
        {
            warn!(transfer = %transfer.id, error = %err, "could not build the clone stack; rolling back");
            if let Err(undo) = self.ctx.tear_down(&volume, &transfer).await {
                warn!(transfer = %transfer.id, error = %undo, "rollback incomplete; reconciliation finishes it");
                return Err(err);
            }
            self.ctx
                .store_call({
                    let (v, t) = (volume.id.clone(), transfer.id.clone());
                    move |store| {
                        store.commit(vec![
                            Change::remove::<VolumeRecord>(&v),
                            Change::remove::<TransferRecord>(&t),
                        ])
                    }
                })
                .await?;
            return Err(err);
        }
        volume.pending = None;
        transfer.phase = if hydrate {
            TransferPhase::Hydrating
        } else {
            TransferPhase::Deferred
        };
        self.ctx.commit_pair(&volume, &transfer).await?;
        info!(transfer = %transfer.id, volume = %volume.id, size, deferred = request.deferred, region = knobs.region_bytes, "transfer started: the volume is presented");
        self.spawn_monitor(transfer.id.clone(), hydrate);
        self.spawn_claim(&transfer);
        Ok(self.ctx.transfer_view(&transfer))
    }

    /// A move onto a host that holds a record of the volume: a return trip
    /// when that is a warm copy it can land on; else the warm copy goes
    /// first and the move copies everything; any other copy is a conflict.
    async fn land_or_drop(
        &self,
        copy: VolumeRecord,
        request: &StartRequest,
        size: u64,
    ) -> Result<Landing, AgentError> {
        // A copy kept for its snapshots shares their blocks: nothing may
        // land on it or drop it while they stay.
        let kept_for_snapshots = !self.ctx.snapshots_of(Some(&copy.id)).await?.is_empty();
        if copy.warm.is_none() || kept_for_snapshots {
            return Err(AgentError::AlreadyExists {
                what: "volume",
                id: copy.id.to_string(),
                detail: match &copy.transfer {
                    Some(other) => format!("here, arriving by transfer {other}"),
                    None => "on this host, where a copy of it stays (e.g. one kept for its snapshots): a volume cannot move onto its own copy".into(),
                },
            });
        }
        match self.landing_on(&copy, request, size).await? {
            Ok(trip) => Ok(Landing::OnCopy {
                copy: Box::new(copy),
                trip,
            }),
            Err(why) => {
                self.drop_warm_copy(copy, &why).await?;
                Ok(Landing::Empty {
                    why_whole: Some(why),
                })
            }
        }
    }

    /// A move back that cannot land on the warm copy copies the whole
    /// volume: the copy goes first (its space is counted for the move).
    async fn drop_warm_copy(&self, copy: VolumeRecord, why: &str) -> Result<(), AgentError> {
        let id = copy.id.clone();
        crate::volume::Volumes::new(Arc::clone(&self.ctx))
            .delete_locked(&id, copy)
            .await?;
        info!(volume = %id, why, "the volume moves back here: its warm copy was dropped, the move copies it whole");
        Ok(())
    }

    /// A local source must lie outside this agent's storage: not one of its
    /// devices, nor a device on top of one, nor a disk, partition or loop
    /// file under its pool (another move's source is not the agent's). Copying from there would hand one volume's
    /// content (another tenant's) to another.
    async fn refuse_own_storage(&self, path: &str, source: DevRef) -> Result<(), AgentError> {
        let naming = &self.ctx.naming;
        let prefix = format!("{}-", naming.prefix());
        let pool_names = [naming.pool(), naming.pool_meta(), naming.pool_data()];
        let (mut own, mut pool) = (Vec::new(), Vec::new());
        for device in self.ctx.dm.list().await? {
            if pool_names.iter().any(|name| name.as_str() == device.name) {
                pool.push(device.device);
            }
            if device.name.starts_with(&prefix) {
                own.push(device.device);
            }
        }
        let meeting = tokio::task::spawn_blocking(move || {
            topology::meeting_point(&topology::Sysfs::default(), source, &own, &pool)
        })
        .await
        .map_err(|err| AgentError::Internal(format!("device topology: {err}")))?;
        match meeting {
            Some(point) => Err(AgentError::InvalidArgument {
                field: "device_path",
                reason: format!(
                    "{path} is, or sits on, this agent's own storage ({point}): a transfer copies \
                     from a device outside the agent's pool and devices"
                ),
            }),
            None => Ok(()),
        }
    }

    /// A start repeated with the same transfer id returns the transfer;
    /// the same id for another volume is a conflict.
    async fn start_again(
        &self,
        existing: TransferRecord,
        request: &StartRequest,
    ) -> Result<TransferView, AgentError> {
        if existing.volume_id != request.volume.as_str() {
            return Err(AgentError::AlreadyExists {
                what: "transfer",
                id: existing.id.to_string(),
                detail: format!("for volume {}, not {}", existing.volume_id, request.volume),
            });
        }
        Ok(self.ctx.transfer_view(&existing))
    }

    /// Live migration: the source let go, so hydration may start.
    pub async fn commit_transfer(&self, id: &TransferId) -> Result<TransferView, AgentError> {
        use TransferPhase::*;
        self.switch_hydration(
            id,
            "commit",
            Deferred,
            &[Hydrating, Finalizing, Done],
            Hydrating,
            "enable_hydration",
        )
        .await
    }

    /// In-flight copies finish; writes still hydrate the regions they touch.
    pub async fn pause_transfer(&self, id: &TransferId) -> Result<TransferView, AgentError> {
        use TransferPhase::*;
        self.switch_hydration(
            id,
            "pause",
            Hydrating,
            &[Paused],
            Paused,
            "disable_hydration",
        )
        .await
    }

    pub async fn resume_transfer(&self, id: &TransferId) -> Result<TransferView, AgentError> {
        use TransferPhase::*;
        self.switch_hydration(
            id,
            "resume",
            Paused,
            &[Hydrating],
            Hydrating,
            "enable_hydration",
        )
        .await
    }

    /// Moves a transfer from `from` to `to` by sending `message` to its
    /// clone. One already in a phase of `arrived` answers as it is (a
    /// repeated call); any other phase is refused.
    async fn switch_hydration(
        &self,
        id: &TransferId,
        action: &'static str,
        from: TransferPhase,
        arrived: &[TransferPhase],
        to: TransferPhase,
        message: &str,
    ) -> Result<TransferView, AgentError> {
        let (mut transfer, _held) = self.ctx.locked_transfer(id).await?;
        if arrived.contains(&transfer.phase) {
            return Ok(self.ctx.transfer_view(&transfer));
        }
        if transfer.phase != from {
            return Err(wrong_phase(&transfer, action, transfer.phase));
        }
        if to == TransferPhase::Hydrating {
            self.skip_unchanged(&mut transfer).await?;
        }
        self.ctx.message_clone(&transfer, message).await?;
        transfer.phase = to;
        self.ctx.put_transfer(&transfer).await?;
        self.ctx.registry.wake(&transfer.id);
        info!(transfer = %transfer.id, action, "hydration switched");
        Ok(self.ctx.transfer_view(&transfer))
    }

    /// Changes the copy knobs of a running transfer. The region size is
    /// fixed once the clone exists (its metadata records it).
    pub async fn throttle_transfer(
        &self,
        id: &TransferId,
        knobs: KnobRequest,
    ) -> Result<TransferView, AgentError> {
        let (mut transfer, _held) = self.ctx.locked_transfer(id).await?;
        if transfer.phase.is_finished() || transfer.phase == TransferPhase::Finalizing {
            return Err(wrong_phase(&transfer, "throttle", transfer.phase));
        }
        if let Some(region) = knobs.region_bytes
            && region != transfer.region_bytes
        {
            return Err(AgentError::InvalidArgument {
                field: "knobs.region_bytes",
                reason: format!(
                    "the region size of a running transfer is fixed at {} bytes; leave it 0",
                    transfer.region_bytes
                ),
            });
        }
        if let Some(threshold) = knobs.hydration_threshold {
            self.ctx
                .message_clone(&transfer, &format!("hydration_threshold {threshold}"))
                .await?;
            transfer.hydration_threshold = threshold;
        }
        if let Some(batch) = knobs.hydration_batch_size {
            self.ctx
                .message_clone(&transfer, &format!("hydration_batch_size {batch}"))
                .await?;
            transfer.hydration_batch_size = batch;
        }
        if let Some(limit) = knobs.max_bytes_per_second {
            transfer.max_bytes_per_second = limit;
        }
        self.ctx.put_transfer(&transfer).await?;
        self.ctx.registry.wake(&transfer.id);
        info!(transfer = %transfer.id, threshold = transfer.hydration_threshold, batch = transfer.hydration_batch_size, limit = transfer.max_bytes_per_second, "throttled");
        Ok(self.ctx.transfer_view(&transfer))
    }

    /// Tears the destination down; the source is never touched. Refused once
    /// finalizing (the local copy is then the volume), while something
    /// holds the public device open, and, unless `force`, for a deferred
    /// transfer whose destination was written.
    pub async fn abort_transfer(
        &self,
        id: &TransferId,
        force: bool,
    ) -> Result<TransferView, AgentError> {
        self.recorded_or_given_up(id).await?;
        let (mut transfer, _held) = self.ctx.locked_transfer(id).await?;
        match transfer.phase {
            TransferPhase::Aborted => return Ok(self.ctx.transfer_view(&transfer)),
            TransferPhase::Finalizing | TransferPhase::Done | TransferPhase::Failed => {
                return Err(wrong_phase(&transfer, "abort", transfer.phase));
            }
            _ => {}
        }
        let volume_id = transfer.volume_id.clone();
        let volume = self.ctx.record(&volume_id).await?;
        if let Some(export) = volume.as_ref().and_then(|v| v.export.as_ref()) {
            return Err(Refusal::VolumeExported {
                volume: volume_id,
                host_nqn: export.host_nqn.clone(),
                hint: "it moves on from here and that host reads through this copy: abort that \
                       move on its destination first",
            }
            .into());
        }
        if let Some(open) = self
            .ctx
            .open_count(&self.ctx.naming.public(&volume_id))
            .await?
            && open > 0
        {
            return Err(Refusal::VolumeInUse {
                device: self
                    .ctx
                    .naming
                    .public(&volume_id)
                    .mapper_path()
                    .display()
                    .to_string(),
                volume: volume_id,
                open_count: open,
                hint: "detach it before aborting its transfer",
            }
            .into());
        }
        if transfer.phase == TransferPhase::Deferred && !force {
            self.refuse_losing_writes(&transfer).await?;
        }
        transfer.phase = TransferPhase::Aborted;
        transfer.message = "aborted: the destination was torn down; the source is untouched".into();
        transfer.finished_unix = Some(crate::records::unix_now());
        self.ctx.put_transfer(&transfer).await?;
        failpoint::hit("abort.after_record");
        self.finish_abort(volume, &transfer).await?;
        self.ctx.registry.wake(&transfer.id);
        self.spawn_withdraw(&transfer);
        info!(transfer = %transfer.id, volume = %volume_id, "aborted");
        Ok(self.ctx.transfer_view(&transfer))
    }

    /// An abort may overtake the start it is meant for. Under the lock the
    /// start takes before writing its records, either the record is there
    /// (abort it as any other) or the id is marked given up, for the start
    /// to find, and the abort answers NOT_FOUND as before.
    async fn recorded_or_given_up(&self, id: &TransferId) -> Result<(), AgentError> {
        let _room = self.ctx.locks.lock(ROOM_FOR_MOVES).await;
        if self.ctx.transfer_record(id).await?.is_some() {
            return Ok(());
        }
        self.ctx.given_up.mark(id);
        Err(crate::records::transfer_not_found(id))
    }

    /// A deferred clone hydrates nothing in the background, so every region
    /// it holds was written (or discarded) on the destination since it was
    /// presented: those writes exist nowhere else. Where the clone cannot be
    /// read (its stack is not up), nothing can write to it now either.
    async fn refuse_losing_writes(&self, transfer: &TransferRecord) -> Result<(), AgentError> {
        let clone = self.ctx.clone_device(transfer);
        let written = match self
            .ctx
            .dm
            .status_of::<Health<CloneStatus>>(&clone, 0)
            .await
        {
            Ok(Health::Running(status)) => status.hydrated_regions,
            Ok(_) | Err(_) => return Ok(()),
        };
        if written == 0 {
            return Ok(());
        }
        Err(Refusal::DestinationWritten {
            transfer: transfer.id.clone(),
            volume: transfer.volume_id.clone(),
            regions: written,
        }
        .into())
    }

    /// The steps after an abort's record: idempotent, repeated at start.
    pub(crate) async fn finish_abort(
        &self,
        volume: Option<VolumeRecord>,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        // Snapshots that were to follow the volume stay on the source.
        self.drop_arriving_snapshots(transfer).await?;
        if let Some(volume) = volume {
            self.ctx.tear_down(&volume, transfer).await?;
            let key = volume.id.clone();
            self.ctx
                .store_call(move |store| store.remove_volume(&key))
                .await?;
        }
        let _ = self
            .ctx
            .registry
            .updates
            .send(self.ctx.transfer_view(transfer));
        Ok(())
    }

    // ---- the clone stack ---------------------------------------------

    fn resolve_knobs(&self, knobs: &KnobRequest) -> Result<Knobs, AgentError> {
        let defaults = self.ctx.settings.transfer;
        let region_bytes = knobs.region_bytes.unwrap_or(defaults.region_bytes);
        validate_region("knobs.region_bytes", region_bytes).map_err(|err| {
            AgentError::InvalidArgument {
                field: "knobs.region_bytes",
                reason: err.to_string(),
            }
        })?;
        Ok(Knobs {
            region_bytes,
            hydration_threshold: knobs
                .hydration_threshold
                .unwrap_or(defaults.hydration_threshold),
            hydration_batch_size: knobs
                .hydration_batch_size
                .unwrap_or(defaults.hydration_batch_size),
            max_bytes_per_second: knobs.max_bytes_per_second.unwrap_or(0),
        })
    }

    async fn write_start_records(
        &self,
        request: &StartRequest,
        size: u64,
        source: SourceRecord,
        shape: StartShape,
    ) -> Result<(VolumeRecord, TransferRecord), AgentError> {
        let StartShape {
            knobs,
            metadata_bytes,
            landing,
        } = shape;
        let now = crate::records::unix_now();
        let mut tracking = self.ctx.new_tracking(None);
        if let (Landing::OnCopy { copy, .. }, Some(tracking)) = (&landing, tracking.as_mut())
            && let Some(kept) = &copy.tracking
        {
            // The copy's era metadata is started afresh (see build_new_stack).
            tracking.metadata_thin_id = kept.metadata_thin_id;
            tracking.metadata_bytes = kept.metadata_bytes;
        }
        // dm-era goes above the clone wherever the volume tracks changes.
        let era_above = tracking.is_some();
        let volume = VolumeRecord {
            id: request.volume.clone(),
            size_bytes: size,
            thin_id: ThinId(0),
            published: true,
            created_unix: now,
            pending: Some(Pending::Create),
            quarantine: None,
            transfer: Some(request.transfer.clone()),
            export: None,
            source_snapshot: None,
            source_volume: None,
            tracking,
            on_lower: era_above,
            warm: None,
        };
        let transfer = TransferRecord {
            id: request.transfer.clone(),
            volume_id: request.volume.clone(),
            source,
            phase: TransferPhase::Starting,
            clone_bytes: size,
            region_bytes: knobs.region_bytes,
            hydration_threshold: knobs.hydration_threshold,
            hydration_batch_size: knobs.hydration_batch_size,
            max_bytes_per_second: knobs.max_bytes_per_second,
            metadata_thin_id: ThinId(0),
            metadata_bytes,
            created_unix: now,
            finished_unix: None,
            message: landing.why_whole(),
            finalize_pause_micros: None,
            done_to_finalized_micros: None,
            source_released: false,
            export_withdrawn: false,
            export_claimed: false,
            switched_local: false,
            era_above,
            arrival_history: volume
                .tracking
                .as_ref()
                .filter(|_| era_above)
                .map(|t| t.history),
            upstream: None,
            passed_on_to: None,
            return_trip: landing.trip(),
            leave_snapshots: request.leave_snapshots,
            snapshots_listed: false,
            snapshots: Vec::new(),
            snapshots_arrived: Vec::new(),
            snapshot_bytes: 0,
        };
        let transfer = TransferRecord {
            upstream: upstream_at_start(&transfer),
            ..transfer
        };
        let volume = match &landing {
            Landing::OnCopy { copy, .. } => VolumeRecord {
                thin_id: copy.thin_id,
                ..volume
            },
            Landing::Empty { .. } => volume,
        };
        let on_copy = matches!(landing, Landing::OnCopy { .. });
        let ids = self
            .ctx
            .store_call({
                let (volume, transfer) = (volume.clone(), transfer.clone());
                move |store| {
                    let fresh = if on_copy { 0 } else { volume.thin_ids_needed() };
                    store.allocate_and_commit(fresh + 1, |ids| {
                        let (volume, transfer) = arriving_ids(volume, transfer, ids, on_copy);
                        // A return trip's record replaces the warm copy's.
                        let volume = if on_copy {
                            Change::put(&volume)?
                        } else {
                            Change::insert(&volume)?
                        };
                        Ok(vec![volume, Change::insert(&transfer)?])
                    })
                }
            })
            .await?;
        Ok(arriving_ids(volume, transfer, &ids, on_copy))
    }

    /// Makes the arriving stack: the clone over the source, and dm-era
    /// above it when the transfer has it (its history starts at once).
    /// A return trip that hydrates at once asks its source what changed
    /// while the devices are made: the answer is used only once the clone
    /// exists, and nothing writes the source any more (a deferred start,
    /// whose source still runs the instance, asks at its commit).
    async fn build_new_stack(
        &self,
        volume: &mut VolumeRecord,
        transfer: &mut TransferRecord,
        source: DevRef,
        hydrate: bool,
    ) -> Result<(), AgentError> {
        let making = &*transfer;
        let asking = async {
            if hydrate {
                self.ask_what_changed(making).await
            } else {
                None
            }
        };
        // Asked first, so the question is out before the first device.
        let (answer, built) = tokio::join!(asking, self.make_devices(volume, making, source));
        built?;
        if hydrate {
            if let Some(answer) = answer {
                self.skip_as_answered(transfer, answer).await?;
            }
            let clone = self.ctx.clone_device(transfer);
            self.ctx.dm.message(&clone, 0, "enable_hydration").await?;
        }
        Ok(())
    }

    /// The arriving stack's devices, the clone not copying yet. The clone's
    /// metadata and its destination are independent until the clone
    /// joins them: they are made side by side.
    async fn make_devices(
        &self,
        volume: &mut VolumeRecord,
        transfer: &TransferRecord,
        source: DevRef,
    ) -> Result<(), AgentError> {
        // Both run to their end, so that a rollback finds no step still
        // under way.
        let (metadata, destination) = tokio::join!(
            self.make_clone_metadata(volume, transfer),
            self.make_destination(volume, transfer),
        );
        let (metadata, destination) = (metadata?, destination?);
        let devices = CloneDevices {
            metadata,
            destination,
            source,
        };
        // The clone copies nothing until the stack above it is up: its
        // copying would slow each later step, every flush committing the
        // pool it fills, and keep the volume from being presented sooner.
        let table = self.ctx.clone_table(volume, transfer, devices, false)?;
        let clone = self.ctx.clone_device(transfer);
        let lower = self.ctx.dm.create(&clone, None, &table).await?.device;
        if transfer.era_above {
            self.ctx.ensure_era_above(volume, lower).await?;
            let public = self.ctx.naming.public(&volume.id);
            self.ctx
                .begin_history(volume, &crate::changes::EraDevice::public(public))
                .await?;
        }
        Ok(())
    }

    /// The clone's metadata device, zeroed: a fresh clone must start from
    /// zeroed metadata, or the kernel would adopt whatever an earlier user
    /// of these blocks left.
    async fn make_clone_metadata(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<DevRef, AgentError> {
        self.ctx.pool.create_thin(transfer.metadata_thin_id).await?;
        let metadata = self.ctx.ensure_metadata_device(volume, transfer).await?;
        self.ctx
            .dm
            .zero_first_block(&self.ctx.metadata_name(volume))
            .await?;
        failpoint::hit("transfer.after_metadata");
        Ok(metadata)
    }

    /// The thin device the clone copies into, with its era metadata ready.
    async fn make_destination(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<DevRef, AgentError> {
        self.ctx.pool.create_thin(volume.thin_id).await?;
        let destination = self.ctx.ensure_thin_device(volume).await?;
        if transfer.return_trip.is_some() && transfer.era_above {
            // The copy's history ends here: dm-era formats its metadata
            // afresh and a new history begins with the move.
            self.ctx.ensure_era_metadata(volume).await?;
            self.ctx
                .dm
                .zero_first_block(&self.ctx.naming.era_metadata(&volume.id))
                .await?;
        }
        if !transfer.era_above {
            self.ctx.format_era_metadata(volume, destination).await?;
        }
        Ok(destination)
    }

    // ---- sources -------------------------------------------------------

    // ---- records -------------------------------------------------------
}

fn source_record(source: &Source) -> SourceRecord {
    match source {
        Source::Device(path) => SourceRecord::Device {
            path: path.display().to_string(),
            identity: None,
        },
        Source::NvmeTcp {
            subsystem_nqn,
            address,
            port,
            agent_endpoint,
            release_token,
            auth,
        } => SourceRecord::NvmeTcp {
            subsystem_nqn: subsystem_nqn.clone(),
            address: address.clone(),
            port: *port,
            agent_endpoint: agent_endpoint.clone(),
            release_token: release_token.clone(),
            auth: auth.clone(),
        },
    }
}

/// Where a new transfer's volume comes from, as far as known before its
/// source answers a claim: a source that will be claimed answers then.
fn upstream_at_start(transfer: &TransferRecord) -> Option<Vec<String>> {
    if transfer.export_to_claim().is_some() {
        return None;
    }
    Some(vec![transfer.source.describe()])
}

fn wrong_phase(
    transfer: &TransferRecord,
    action: &'static str,
    phase: TransferPhase,
) -> AgentError {
    Refusal::TransferWrongState {
        transfer: transfer.id.clone(),
        phase,
        action,
    }
    .into()
}

/// Hands fresh thin ids to an arriving volume (its own, its era
/// metadata's; none when it lands on a copy, whose ids it keeps) and then
/// to its transfer's clone metadata.
fn arriving_ids(
    mut volume: VolumeRecord,
    mut transfer: TransferRecord,
    ids: &[ThinId],
    on_copy: bool,
) -> (VolumeRecord, TransferRecord) {
    let mut ids = ids.iter().copied();
    if !on_copy {
        volume.take_thin_ids(&mut ids);
    }
    transfer.metadata_thin_id = ids.next().expect("one id allocated for the clone metadata");
    (volume, transfer)
}

/// What a start lands the volume on.
#[derive(Debug)]
enum Landing {
    /// Fresh thin devices; why not on a warm copy, when there was one.
    Empty { why_whole: Option<String> },
    /// The warm copy this host kept: a return trip.
    OnCopy {
        copy: Box<VolumeRecord>,
        trip: ReturnTrip,
    },
}

impl Landing {
    fn copy_bytes(&self) -> u64 {
        match self {
            Self::OnCopy { copy, .. } => copy.size_bytes,
            Self::Empty { .. } => 0,
        }
    }

    fn trip(&self) -> Option<ReturnTrip> {
        match self {
            Self::OnCopy { trip, .. } => Some(trip.clone()),
            Self::Empty { .. } => None,
        }
    }

    fn why_whole(&self) -> String {
        match self {
            Self::Empty {
                why_whole: Some(why),
            } => format!("full copy: {why}"),
            _ => String::new(),
        }
    }
}

/// How a start's records are shaped beyond the request.
#[derive(Debug)]
struct StartShape {
    knobs: Knobs,
    metadata_bytes: u64,
    landing: Landing,
}

/// How long a monitor sleeps between progress reads while hydrating.
pub(crate) const TICK: Duration = Duration::from_millis(500);
