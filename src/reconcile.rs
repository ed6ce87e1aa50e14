//! Start-up reconciliation: the store says what should be, the kernel what
//! is. For every volume the agent finishes or rolls back the step that was in
//! flight when it stopped, then rebuilds missing devices (after a reboot,
//! all of them). Devices whose names are ours but which no record explains are
//! reported and left alone: the agent never deletes what it cannot account
//! for. A device whose table contradicts its record puts the volume in
//! quarantine instead of being "repaired" over data.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    context::Context,
    dm::names::DeviceRole,
    error::AgentError,
    ids::VolumeId,
    snapshot::Snapshots,
    store::{Change, Pending, SnapshotRecord, TransferPhase, TransferRecord, VolumeRecord},
    transfer::{Exports, Transfers},
};

/// What reconciliation found and did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    pub volumes: usize,
    /// Devices created because they were missing (e.g. after a reboot).
    pub rebuilt: usize,
    /// Interrupted deletes, extends, publishes and unpublishes completed.
    pub finished: usize,
    /// Interrupted creates undone.
    pub rolled_back: usize,
    pub quarantined: usize,
    /// Transfers whose devices could not be brought back at start; their
    /// monitors keep trying.
    pub degraded: usize,
    /// Volumes whose devices could not be brought back at start for a
    /// reason that may pass; the agent keeps trying.
    pub unsettled: usize,
    /// Devices with our prefix that no record explains, left in place.
    pub unknown_devices: Vec<String>,
    pub duration: Duration,
}

/// The longest pause between two tries of a volume that did not come back.
const UNSETTLED_RETRY_MAX: Duration = Duration::from_secs(300);

/// Brings the kernel in line with the store at start.
#[derive(Debug, Clone)]
pub struct Reconciler {
    ctx: Arc<Context>,
    /// Interrupted calls are finished or rolled back by their own services.
    snapshots: Snapshots,
    transfers: Transfers,
    exports: Exports,
}

impl Reconciler {
    pub(crate) fn new(
        ctx: Arc<Context>,
        snapshots: Snapshots,
        transfers: Transfers,
        exports: Exports,
    ) -> Self {
        Self {
            ctx,
            snapshots,
            transfers,
            exports,
        }
    }

    pub(crate) async fn reconcile_all(&self) -> Result<ReconcileReport, AgentError> {
        let mut report = ReconcileReport::default();
        let before = self.our_device_names().await?;
        self.resume_suspended(&before).await?;
        self.reconcile_snapshots().await?;
        let transfers = self
            .ctx
            .store_call(|store| store.all::<TransferRecord>())
            .await?;
        for transfer in &transfers {
            // One transfer (say, whose source is unreachable after a reboot)
            // must not keep every other volume of the host down.
            if let Err(err) = self
                .reconcile_transfer(transfer, &before, &mut report)
                .await
            {
                report.degraded += 1;
                let reason = format!("its devices did not come back at start: {err}; retrying");
                warn!(transfer = %transfer.id, %reason, "transfer degraded");
                self.ctx
                    .registry
                    .with_live(&transfer.id, |live| live.degraded = Some(reason));
            }
        }
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        report.volumes = records.len();
        for record in records {
            if record.transfer.is_some() {
                continue; // its transfer brought it to where it should be
            }
            self.reconcile_volume(record, &before, &mut report).await?;
        }
        self.exports.reconcile_exports().await?;
        let records = self.ctx.store_call(|store| store.volumes()).await?;
        report.unknown_devices = self.unexplained_devices(&records).await?;
        for name in &report.unknown_devices {
            warn!(device = %name, "a device-mapper device with this agent's prefix matches no volume; left untouched for an operator");
        }
        report.volumes = records.len();
        Ok(report)
    }

    async fn reconcile_volume(
        &self,
        record: VolumeRecord,
        existing: &[String],
        report: &mut ReconcileReport,
    ) -> Result<(), AgentError> {
        let id = record.id.clone();
        let result = match record.pending.clone() {
            Some(Pending::Create) => {
                info!(volume = %id, "rolling back a create interrupted by a crash");
                report.rolled_back += 1;
                self.ctx.undo_create(&record).await
            }
            Some(Pending::Delete) => {
                info!(volume = %id, "finishing a delete interrupted by a crash");
                report.finished += 1;
                self.ctx.finish_delete(&record).await
            }
            Some(Pending::Revert { .. }) => {
                info!(volume = %id, "finishing a revert interrupted by a crash");
                report.finished += 1;
                self.snapshots.finish_revert(&record).await
            }
            Some(pending) => {
                info!(volume = %id, step = ?pending, "finishing a step interrupted by a crash");
                report.finished += 1;
                self.converge(&record, existing, report).await
            }
            None if record.quarantine.is_some() => Ok(()),
            None => self.converge(&record, existing, report).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(err @ (AgentError::Conflict(_) | AgentError::Refused(_))) => {
                report.quarantined += 1;
                self.quarantine(record, err.to_string()).await
            }
            // One volume that cannot come back now (a device the kernel
            // refuses, a full pool) must not keep the host's others down.
            Err(err) => {
                report.unsettled += 1;
                let reason = format!("its devices did not come back at start: {err}; retrying");
                warn!(volume = %id, %reason, "volume degraded");
                self.ctx.unsettled.mark(&id, reason);
                Ok(())
            }
        }
    }

    /// Tries the volumes that did not come back at start again, less often
    /// each round (1 s doubling to 5 min), until none is left.
    pub(crate) fn spawn_unsettled_retries(&self) {
        if self.ctx.unsettled.ids().is_empty() {
            return;
        }
        let reconciler = self.clone();
        self.ctx.background.spawn(async move {
            let mut pause = Duration::from_secs(1);
            while !reconciler.ctx.unsettled.ids().is_empty() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(UNSETTLED_RETRY_MAX);
                for id in reconciler.ctx.unsettled.ids() {
                    reconciler.retry_unsettled(&id).await;
                }
            }
        });
    }

    async fn retry_unsettled(&self, id: &VolumeId) {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let record = match self.ctx.record(id).await {
            Ok(Some(record)) => record,
            Ok(None) => return self.ctx.unsettled.clear(id),
            Err(err) => {
                return warn!(volume = %id, error = %err, "cannot read the volume's record; retrying");
            }
        };
        let existing = match self.our_device_names().await {
            Ok(names) => names,
            Err(err) => return warn!(volume = %id, error = %err, "cannot list devices; retrying"),
        };
        // Marked again below if it still fails.
        self.ctx.unsettled.clear(id);
        let mut report = ReconcileReport::default();
        match self.reconcile_volume(record, &existing, &mut report).await {
            Ok(()) if report.unsettled == 0 => info!(volume = %id, "volume came back"),
            Ok(()) => {}
            Err(err) => {
                warn!(volume = %id, error = %err, "volume still degraded");
                self.ctx.unsettled.mark(
                    id,
                    format!("its devices did not come back: {err}; retrying"),
                );
            }
        }
    }

    /// Brings the kernel to the record: the thin device and dm-era's
    /// metadata always, the public device while published, at the record's
    /// size.
    async fn converge(
        &self,
        record: &VolumeRecord,
        existing: &[String],
        report: &mut ReconcileReport,
    ) -> Result<(), AgentError> {
        let id = record.id.clone();
        let thin = self.ctx.thin_name(record);
        let public = self.ctx.naming.public(&id);
        for name in [&thin, &public] {
            let wanted = name == &thin || record.published;
            if wanted && !existing.iter().any(|e| e == name.as_str()) {
                report.rebuilt += 1;
            }
        }
        // A probe lives only inside one call; one found here outlived a crash.
        let probe = self.ctx.naming.era_probe(&id);
        if existing.iter().any(|e| e == probe.as_str()) {
            self.ctx.remove_device_if_present(&probe).await?;
        }
        let mut record = record.clone();
        // The start's listing answers for a device it did not see: no probe.
        let public_exists = existing.iter().any(|e| e == public.as_str());
        if !record.published
            && public_exists
            && self
                .ctx
                .open_count(&public)
                .await?
                .is_some_and(|open| open > 0)
        {
            // An unpublish that stopped before removing the device, which
            // someone has opened since: the kernel's fact wins.
            warn!(volume = %id, "unpublished volume's device is open; keeping it published");
            record.published = true;
            record.pending = Some(Pending::Publish);
        }
        if record.on_lower && !public_exists {
            // Made again (after a reboot): dm-era goes straight over the
            // thin device, and a layer beneath left alone goes.
            self.ctx.remove_public_stack(&mut record).await?;
        }
        if record.published {
            // The thin device and dm-era's metadata beneath it too.
            self.ctx.ensure_public_device(&record).await?;
        } else {
            self.ctx.ensure_thin_device(&record).await?;
            self.ctx.ensure_era_metadata(&record).await?;
            if public_exists || record.on_lower {
                self.ctx.remove_public_stack(&mut record).await?;
            }
            if record.on_lower {
                // Kept for the export that serves it.
                self.ctx.ensure_lower_device(&record).await?;
            }
        }
        if record.pending.is_some() {
            self.ctx.settle(record).await?;
        }
        Ok(())
    }

    /// A transfer on this host after a restart: a start is rolled back, a
    /// running one gets its stack back (hydration resumes from the clone's
    /// persistent metadata), a finalize or abort is finished.
    async fn reconcile_transfer(
        &self,
        transfer: &TransferRecord,
        existing: &[String],
        report: &mut ReconcileReport,
    ) -> Result<(), AgentError> {
        let volume_id = transfer.volume_id.clone();
        let volume = self.ctx.record(&volume_id).await?;
        let missing =
            |name: crate::dm::names::DeviceName| !existing.iter().any(|e| e == name.as_str());
        let public_missing = missing(self.ctx.naming.public(&volume_id));
        let clone_missing = missing(self.ctx.clone_device(transfer));
        match (transfer.phase, volume) {
            (TransferPhase::Starting, volume) => {
                info!(transfer = %transfer.id, "rolling back a transfer start interrupted by a crash");
                report.rolled_back += 1;
                if let Some(volume) = &volume {
                    self.ctx.tear_down(volume, transfer).await?;
                }
                let (v, t) = (transfer.volume_id.clone(), transfer.id.clone());
                self.ctx
                    .store_call(move |store| {
                        store.commit(vec![
                            Change::remove::<VolumeRecord>(&v),
                            Change::remove::<TransferRecord>(&t),
                        ])
                    })
                    .await
            }
            (TransferPhase::Aborted, Some(volume)) => {
                report.finished += 1;
                self.transfers.finish_abort(Some(volume), transfer).await
            }
            (
                TransferPhase::Deferred | TransferPhase::Hydrating | TransferPhase::Paused,
                Some(volume),
            ) => {
                if public_missing || clone_missing {
                    report.rebuilt += 1;
                }
                self.ctx.rebuild_stack(&volume, transfer).await
            }
            (TransferPhase::Finalizing, Some(volume)) => {
                report.finished += 1;
                // A crash between the swap and its record: the live local
                // table says the switch happened.
                let switched = transfer.switched_local
                    || (!clone_missing && !self.ctx.clone_is_live(transfer).await?);
                if switched {
                    self.ctx.ensure_public_device(&volume).await.map(drop)
                } else {
                    self.ctx.rebuild_stack(&volume, transfer).await
                }
            }
            (TransferPhase::Done, Some(volume))
                if transfer.passed_on_to.is_some()
                    && volume.transfer.as_ref() == Some(&transfer.id) =>
            {
                report.finished += 1;
                self.exports.finish_pass_on(volume, transfer).await
            }
            (TransferPhase::Done, Some(volume)) if volume.transfer.is_some() => {
                self.transfers.detach_finished(&volume).await
            }
            _ => Ok(()),
        }
    }

    async fn quarantine(&self, mut record: VolumeRecord, reason: String) -> Result<(), AgentError> {
        warn!(volume = %record.id, %reason, "volume quarantined: an operator must look");
        record.quarantine = Some(reason);
        self.ctx
            .store_call(move |store| store.put_volume(&record))
            .await
    }

    async fn our_device_names(&self) -> Result<Vec<String>, AgentError> {
        Ok(self
            .ctx
            .dm
            .list()
            .await?
            .into_iter()
            .map(|d| d.name)
            .filter(|name| self.ctx.naming.parse(name).is_some())
            .collect())
    }

    /// A crash between a suspend and its resume leaves a device holding all
    /// I/O. Every step records its intent before suspending, so resuming
    /// (and with it any table loaded meanwhile) is what the step wanted.
    async fn resume_suspended(&self, names: &[String]) -> Result<(), AgentError> {
        let names = names
            .iter()
            .map(|name| crate::dm::names::DeviceName::new(name))
            .collect::<Result<Vec<_>, _>>()?;
        // One worker call for all: a thousand hops to the blocking pool
        // cost more than the ioctls themselves.
        let states = self.ctx.dm.infos(names).await?;
        let suspended = states.into_iter().flatten().filter(|state| state.suspended);
        for name in suspended.map(|state| state.name) {
            warn!(device = %name, "resuming a device a crash left suspended");
            // A table a crashed call loaded but did not check (finalize
            // loads before it checks) must not go live here; the step
            // that loaded it is redone by reconciliation.
            self.ctx.dm.clear_inactive(&name).await?;
            self.ctx.dm.resume(&name).await?;
        }
        Ok(())
    }

    /// Interrupted snapshot creates are rolled back, deletes finished, and
    /// snapshot devices activated for a moment (to measure them) removed.
    async fn reconcile_snapshots(&self) -> Result<(), AgentError> {
        let snapshots = self
            .ctx
            .store_call(|store| store.all::<SnapshotRecord>())
            .await?;
        for snapshot in snapshots {
            if let Err(err) = self.reconcile_snapshot(&snapshot).await {
                // Its intent stays: the next start (or a retried delete)
                // finishes it.
                warn!(snapshot = %snapshot.id, error = %err, "cannot finish a snapshot step interrupted by a crash");
            }
        }
        Ok(())
    }

    async fn reconcile_snapshot(&self, snapshot: &SnapshotRecord) -> Result<(), AgentError> {
        self.ctx
            .remove_device_if_present(&self.ctx.snapshot_name(snapshot))
            .await?;
        self.ctx
            .remove_device_if_present(&self.ctx.naming.snapshot_read(&snapshot.id))
            .await?;
        match snapshot.pending {
            Some(Pending::Create) => {
                info!(snapshot = %snapshot.id, "rolling back a snapshot interrupted by a crash");
                self.snapshots.finish_snapshot_delete(snapshot).await
            }
            // Its travel starts it afresh once its volume's transfer resumes.
            Some(Pending::Arrive { .. }) => Ok(()),
            Some(_) => {
                info!(snapshot = %snapshot.id, "finishing a snapshot delete interrupted by a crash");
                self.snapshots.finish_snapshot_delete(snapshot).await
            }
            None => Ok(()),
        }
    }

    async fn unexplained_devices(
        &self,
        records: &[VolumeRecord],
    ) -> Result<Vec<String>, AgentError> {
        let snapshots = self
            .ctx
            .store_call(|store| store.all::<SnapshotRecord>())
            .await?;
        let mut unknown = Vec::new();
        for name in self.our_device_names().await? {
            let explained = match self.ctx.naming.parse(&name) {
                Some(DeviceRole::Pool | DeviceRole::PoolMeta | DeviceRole::PoolData) => true,
                Some(
                    DeviceRole::Thin(id)
                    | DeviceRole::Public(id)
                    | DeviceRole::CloneMetadata(id)
                    | DeviceRole::EraMetadata(id)
                    | DeviceRole::EraProbe(id)
                    | DeviceRole::Lower(id),
                ) => records.iter().any(|r| r.id == id),
                Some(DeviceRole::Snapshot(id) | DeviceRole::SnapshotRead(id)) => {
                    snapshots.iter().any(|s| s.id == id)
                }
                Some(DeviceRole::Other(_)) | None => false,
            };
            if !explained {
                unknown.push(name);
            }
        }
        unknown.sort();
        Ok(unknown)
    }
}
