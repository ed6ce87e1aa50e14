//! Change-tracking steps other services take while building a volume's
//! stack: choosing a new volume's tracking, formatting and adopting dm-era's
//! metadata, the local table with or without dm-era, and noting where a
//! volume's history starts.

use tracing::{info, warn};

use crate::{
    AgentError, Refusal,
    changes::{EraDevice, era_metadata_bytes, new_history_tag, public_era, tracking_of},
    context::Context,
    dm::{
        names::DeviceName,
        status::EraStatus,
        table::{DevRef, Table},
    },
    ids::ThinId,
    pool::ThinCreated,
    stack::{self, EraLayer},
    store::{ChangeTracking, VolumeRecord},
};

impl Context {
    /// Tracking for a new volume, per the configuration; `known_from_era` is
    /// `Some(0)` for an empty volume, `None` when its content comes from
    /// elsewhere.
    pub(crate) fn new_tracking(&self, known_from_era: Option<u32>) -> Option<ChangeTracking> {
        let block_bytes = self.settings.change_block_bytes?;
        Some(ChangeTracking {
            history: new_history_tag(None),
            metadata_thin_id: ThinId(0),
            metadata_bytes: era_metadata_bytes(self.settings.max_volume_size, block_bytes),
            block_bytes,
            known_from_era,
            origin: None,
        })
    }

    /// Makes the era metadata's thin device exist and be active. A thin id
    /// made here and now starts zeroed, so dm-era formats it; one found made
    /// is never touched (it holds the history).
    pub(crate) async fn ensure_era_metadata(
        &self,
        record: &VolumeRecord,
    ) -> Result<Option<DevRef>, AgentError> {
        let Some(tracking) = &record.tracking else {
            return Ok(None);
        };
        let name = self.naming.era_metadata(&record.id);
        let table = self
            .pool
            .thin_table(tracking.metadata_thin_id, tracking.metadata_bytes)?;
        let Some(found) = self.dm.live_table(&name).await? else {
            let created = self.pool.create_thin(tracking.metadata_thin_id).await?;
            let device = self.dm.create(&name, None, &table).await?.device;
            if created == ThinCreated::Created {
                self.dm.zero_first_block(&name).await?;
            }
            return Ok(Some(device));
        };
        let adopted = stack::adopt(self.dm.as_ref(), &name, found, &table, |_| false).await?;
        Ok(Some(adopted))
    }

    /// Lets dm-era format its metadata now, over the arriving volume's thin
    /// device, so that the finalize swap later only opens it: formatting
    /// writes the whole space map, which would lengthen the I/O pause.
    pub(crate) async fn format_era_metadata(
        &self,
        record: &VolumeRecord,
        thin: DevRef,
    ) -> Result<(), AgentError> {
        if record.tracking.is_none() {
            return Ok(());
        }
        let probe = self.naming.era_probe(&record.id);
        self.remove_device_if_present(&probe).await?;
        let table = self.local_table(record, thin).await?;
        self.dm.create(&probe, None, &table).await?;
        self.remove_device_if_present(&probe).await
    }

    /// What the public device maps once the volume is local: dm-era over
    /// the thin device when the volume tracks changes, else a linear map.
    pub(crate) async fn local_table(
        &self,
        record: &VolumeRecord,
        thin: DevRef,
    ) -> Result<Table, AgentError> {
        let era = match (&record.tracking, self.ensure_era_metadata(record).await?) {
            (Some(tracking), Some(metadata)) => Some(EraLayer {
                metadata,
                block_bytes: tracking.block_bytes,
            }),
            _ => None,
        };
        stack::local_table(record.size_bytes, thin, era)
    }

    /// After dm-era came up over the volume: a history without a start gets
    /// the era now current (writes from here on are all seen).
    pub(crate) async fn note_history_start(
        &self,
        record: &mut VolumeRecord,
        era: &EraDevice,
    ) -> Result<(), AgentError> {
        if self.begin_history(record, era).await? {
            self.put(record).await?;
        }
        Ok(())
    }

    /// Sets the start of a history that has none, in `record` only; returns
    /// whether it did (see [`Context::note_history_start`]).
    pub(crate) async fn begin_history(
        &self,
        record: &mut VolumeRecord,
        era: &EraDevice,
    ) -> Result<bool, AgentError> {
        let Some(tracking) = record.tracking.as_mut() else {
            return Ok(false);
        };
        if tracking.known_from_era.is_some() {
            return Ok(false);
        }
        // The history begins with an era that begins now: the current one
        // may have seen what the history must not answer for (writes over
        // an export that has since closed). A probe's activation already
        // began one.
        if !era.probe {
            self.dm.message(&era.name, 0, "checkpoint").await?;
        }
        let current = self.current_era(&era.name).await?;
        tracking.known_from_era = Some(current);
        info!(volume = %record.id, era = current, "changed-block tracking starts");
        Ok(true)
    }

    /// Takes a thin snapshot through `take` and returns the era it starts, or
    /// `None` when the volume does not track changes. A published volume's
    /// dm-era is handed to `take` to be suspended around the snapshot, so its
    /// resume begins the new era exactly at the snapshot; a probe begins it
    /// on activation.
    pub(crate) async fn snapshot_with_era<F>(
        &self,
        record: &mut VolumeRecord,
        take: F,
    ) -> Result<Option<u64>, AgentError>
    where
        F: AsyncFnOnce(&VolumeRecord, Option<&DeviceName>) -> Result<(), AgentError>,
    {
        // An exported volume has no history to place the snapshot in.
        if record.tracking.is_none() || record.export.is_some() {
            take(record, None).await?;
            return Ok(None);
        }
        let era = self.era_device(record).await?;
        let result = async {
            take(record, (!era.probe).then_some(&era.name)).await?;
            self.current_era(&era.name).await
        }
        .await;
        self.release_era_device(era).await;
        Ok(Some(public_era(tracking_of(record)?, result?)))
    }

    pub(crate) async fn current_era(&self, era_device: &DeviceName) -> Result<u32, AgentError> {
        Ok(self
            .dm
            .status_of::<EraStatus>(era_device, 0)
            .await?
            .current_era)
    }

    /// The volume's dm-era: its public device, or a probe when unpublished.
    pub(crate) async fn era_device(
        &self,
        record: &mut VolumeRecord,
    ) -> Result<EraDevice, AgentError> {
        // The lasting reason first: a volume without tracking never answers.
        tracking_of(record)?;
        if let Some(export) = &record.export {
            return Err(Refusal::VolumeExported {
                volume: record.id.clone(),
                host_nqn: export.host_nqn.clone(),
                hint: "writes arriving over NVMe/TCP bypass change tracking, so none is answered while it is exported; ask again from a checkpoint taken after it is unexported",
            }
            .into());
        }
        let era = self.era_device_while_exported(record).await?;
        if let Err(err) = self.note_history_start(record, &era).await {
            self.release_era_device(era).await;
            return Err(err);
        }
        Ok(era)
    }

    /// The volume's dm-era even while it is exported for a move, for what
    /// dm-era saw before the export (see `ExportRecord::history_before`).
    /// No new history begins here: none does while an export lasts.
    pub(crate) async fn era_device_while_exported(
        &self,
        record: &mut VolumeRecord,
    ) -> Result<EraDevice, AgentError> {
        tracking_of(record)?;
        if let Some(transfer) = &record.transfer
            && !record.on_lower
        {
            return Err(Refusal::VolumeArriving {
                volume: record.id.clone(),
                transfer: transfer.clone(),
                hint: "changed-block tracking starts when the transfer finishes",
            }
            .into());
        }
        self.open_era_device(record).await
    }

    /// The public device when it is up (or kept up by a transfer), else a
    /// probe over the thin device.
    async fn open_era_device(&self, record: &mut VolumeRecord) -> Result<EraDevice, AgentError> {
        let id = record.id.clone();
        let era = if record.transfer.is_some() {
            // dm-era above the clone: the transfer keeps the stack up.
            EraDevice::public(self.naming.public(&id))
        } else if record.published {
            self.ensure_public_device(record).await?;
            EraDevice::public(self.naming.public(&id))
        } else {
            let name = self.naming.era_probe(&id);
            self.remove_device_if_present(&name).await?;
            let thin = self.ensure_thin_device(record).await?;
            let table = self.local_table(record, thin).await?;
            self.dm.create(&name, None, &table).await?;
            EraDevice { name, probe: true }
        };
        Ok(era)
    }

    pub(crate) async fn release_era_device(&self, era: EraDevice) {
        if era.probe
            && let Err(err) = self.remove_device_if_present(&era.name).await
        {
            warn!(device = %era.name, error = %err, "cannot remove the dm-era probe; the next start removes it");
        }
    }
}
