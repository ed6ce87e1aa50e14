//! The stack steps services share, over the context: adopting a volume's
//! thin and public devices from its record, removing devices, rolling back
//! or finishing a create or delete, and the arriving stack of a transfer
//! (its clone table, metadata device and source).

use std::{net::IpAddr, path::Path, time::Duration};

use tracing::{info, warn};

use crate::{
    AgentError, Refusal,
    context::Context,
    dm::{
        names::DeviceName,
        table::{DevRef, Table},
    },
    failpoint,
    ids::{TransferId, VolumeId},
    nvme::{
        ConnectOptions, ConnectRequest, ConnectTimeouts, Nqn, TcpAddress, auth::DhchapKeys,
        namespace_ids, onward_namespace_ids,
    },
    stack::{self, CloneDevices, CloneLayer},
    store::{SnapshotRecord, SourceRecord, TransferPhase, TransferRecord, VolumeRecord},
};

/// How long a destination waits for the source's namespace to appear.
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT_DELAY_SECONDS: u32 = 2;

impl Context {
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
    /// the volume tracks changes), or resizes it. A volume that arrived with
    /// dm-era above its clone keeps the layer beneath, now the volume's thin
    /// device activated a second time, until its public device is next made.
    pub(crate) async fn ensure_public_device(
        &self,
        record: &VolumeRecord,
    ) -> Result<DevRef, AgentError> {
        let thin = self.ensure_thin_device(record).await?;
        let origin = if record.on_lower {
            self.ensure_lower_device(record).await?
        } else {
            thin
        };
        self.ensure_era_above(record, origin).await
    }

    /// The layer beneath dm-era of a volume that arrived: its thin id
    /// activated a second time (made again after a reboot).
    pub(crate) async fn ensure_lower_device(
        &self,
        record: &VolumeRecord,
    ) -> Result<DevRef, AgentError> {
        let table = self.pool.thin_table(record.thin_id, record.size_bytes)?;
        self.ensure_device(&self.naming.lower(&record.id), &table, |live| {
            stack::is_resize_of(live, &table)
        })
        .await
    }

    /// Makes the public device the volume's local table over `origin` (the
    /// thin device, or the layer beneath dm-era), or resizes it.
    pub(crate) async fn ensure_era_above(
        &self,
        record: &VolumeRecord,
        origin: DevRef,
    ) -> Result<DevRef, AgentError> {
        let table = self.local_table(record, origin).await?;
        let public = self.naming.public(&record.id);
        self.ensure_device(&public, &table, |live| stack::is_resize_of(live, &table))
            .await
    }

    /// Removes the public device, and the layer beneath it if the volume
    /// still has one (its next public device maps the thin device), unless
    /// an export serves that layer (a volume that moved on while arriving).
    pub(crate) async fn remove_public_stack(
        &self,
        record: &mut VolumeRecord,
    ) -> Result<(), AgentError> {
        self.remove_device_if_present(&self.naming.public(&record.id))
            .await?;
        if record.on_lower && !record.export.as_ref().is_some_and(|e| e.serves_lower) {
            self.remove_device_if_present(&self.naming.lower(&record.id))
                .await?;
            record.on_lower = false;
            self.put(record).await?;
        }
        Ok(())
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

    /// Best effort: a failed create leaves nothing behind, or, if even that
    /// fails, its intent for the next start (or the next retry) to finish.
    pub(crate) async fn roll_back_create(&self, record: &VolumeRecord) {
        if let Err(err) = self.undo_create(record).await {
            warn!(volume = %record.id, error = %err, "could not roll back a failed create; its intent stays for reconciliation");
        }
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
        // The kernel refuses to remove an open device: busy means opened.
        match self.remove_public_stack(&mut record).await {
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

    pub(crate) fn snapshot_name(&self, record: &SnapshotRecord) -> DeviceName {
        self.naming.snapshot(&record.id)
    }

    /// After an extend of an arriving volume: the clone keeps its range, the
    /// new range maps the local thin device (a second segment).
    pub(crate) async fn resize_arriving(
        &self,
        volume: &VolumeRecord,
        transfer_id: &TransferId,
    ) -> Result<(), AgentError> {
        let transfer = self.arriving_transfer(volume, transfer_id).await?;
        if transfer.phase.is_finished() || !self.clone_is_live(&transfer).await? {
            self.ensure_public_device(volume).await?;
            return Ok(());
        }
        self.reload_arriving(volume, &transfer).await
    }

    /// Loads an arriving volume's clone table again where it differs from
    /// the live one: a new size, or a new namespace of its source after the
    /// connection was lost and made again. dm-era above it follows a new
    /// size.
    pub(crate) async fn reload_arriving(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        let clone = self.clone_device(transfer);
        let table = self.arriving_table(volume, transfer).await?;
        let found =
            self.dm
                .live_table(&clone)
                .await?
                .ok_or_else(|| crate::Error::NoSuchDevice {
                    device: clone.to_string(),
                })?;
        // swap_table (through adopt) suspends before loading: the clone's
        // metadata stays consistent across the reload.
        let device = stack::adopt(self.dm.as_ref(), &clone, found, &table, |_| true).await?;
        if transfer.era_above {
            self.ensure_era_above(volume, device).await?;
        }
        Ok(())
    }

    /// Brings an existing transfer's stack back (after a restart or reboot):
    /// adopts live devices, creates missing ones, never zeroes metadata.
    pub(crate) async fn rebuild_stack(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        let table = self.arriving_table(volume, transfer).await?;
        let clone = self
            .ensure_device(&self.clone_device(transfer), &table, |_| false)
            .await?;
        if transfer.era_above {
            self.ensure_era_above(volume, clone).await?;
        }
        // An export onward serves the clone: back with it (the start's
        // restore of exports fails while the clone cannot be made).
        if let Some(request) = self
            .export_request(volume)?
            .filter(|_| volume.export.as_ref().is_some_and(|e| e.serves_lower))
        {
            self.fabric.export(&request).await?;
        }
        Ok(())
    }

    /// The device carrying a transfer's dm-clone: the layer beneath dm-era,
    /// or the public device itself (see [`TransferRecord::era_above`]).
    pub(crate) fn clone_device(&self, transfer: &TransferRecord) -> DeviceName {
        if transfer.era_above {
            self.naming.lower(&transfer.volume_id)
        } else {
            self.naming.public(&transfer.volume_id)
        }
    }

    /// The clone table of an arriving volume, over its source, clone
    /// metadata and thin device (each adopted, or made when missing).
    async fn arriving_table(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<Table, AgentError> {
        let (source, _) = self.attach_source(&transfer.source, &volume.id).await?;
        let metadata = self.ensure_metadata_device(volume, transfer).await?;
        let destination = self.ensure_thin_device(volume).await?;
        let hydrate = matches!(
            transfer.phase,
            TransferPhase::Hydrating | TransferPhase::Finalizing
        );
        let devices = CloneDevices {
            metadata,
            destination,
            source,
        };
        self.clone_table(volume, transfer, devices, hydrate)
    }

    pub(crate) async fn ensure_metadata_device(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<DevRef, AgentError> {
        let table = self
            .pool
            .thin_table(transfer.metadata_thin_id, transfer.metadata_bytes)?;
        self.ensure_device(&self.metadata_name(volume), &table, |_| false)
            .await
    }

    pub(crate) fn metadata_name(&self, volume: &VolumeRecord) -> DeviceName {
        self.naming.clone_metadata(&volume.id)
    }

    /// The public table while hydrating (see [`stack::clone_table`]).
    pub(crate) fn clone_table(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
        devices: CloneDevices,
        hydrate: bool,
    ) -> Result<Table, AgentError> {
        // Under a byte limit the clone copies nothing until its monitor's
        // first look sets the pace: until then nothing watches what it
        // copies, and a fast source would copy seconds of the limit in one
        // burst, repaid by as long a hold.
        let (threshold, batch) = if self.byte_limit(transfer, 1) > 0 {
            (0, 1)
        } else {
            (transfer.hydration_threshold, transfer.hydration_batch_size)
        };
        let layer = CloneLayer {
            clone_bytes: transfer.clone_bytes,
            region_bytes: transfer.region_bytes,
            hydration_threshold: Some(threshold),
            hydration_batch_size: Some(batch),
            hydrate,
            discard_passdown: transfer.return_trip.is_none(),
        };
        stack::clone_table(volume.size_bytes, &layer, devices)
    }

    /// Removes every device of the stack, frees its thin devices and lets go
    /// of the source. Each step tolerates having been done already.
    pub(crate) async fn tear_down(
        &self,
        volume: &VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        let mut thin_ids = volume.owned_thin_ids();
        thin_ids.push(transfer.metadata_thin_id);
        stack::tear_down(
            self.dm.as_ref(),
            &self.pool,
            &self.naming,
            &volume.id.clone(),
            &thin_ids,
        )
        .await?;
        self.detach_source(&transfer.source).await;
        Ok(())
    }

    /// Sends a message to the transfer's dm-clone.
    pub(crate) async fn message_clone(
        &self,
        transfer: &TransferRecord,
        message: &str,
    ) -> Result<(), AgentError> {
        match self
            .dm
            .message(&self.clone_device(transfer), 0, message)
            .await
        {
            Ok(_) => Ok(()),
            // After a start that could not rebuild the clone (its source
            // unreachable), the monitor keeps trying; so may the caller.
            Err(crate::Error::NoSuchDevice { .. }) => Err(AgentError::Unavailable {
                reason: format!(
                    "transfer {} has no clone device yet: its devices did not come back (see the transfer's message) and are being rebuilt; try again",
                    transfer.id
                ),
            }),
            Err(err) => Err(err.into()),
        }
    }

    /// The source's device number and size.
    pub(crate) async fn attach_source(
        &self,
        source: &SourceRecord,
        volume: &VolumeId,
    ) -> Result<(DevRef, u64), AgentError> {
        match source {
            SourceRecord::Device { path, identity } => {
                let found = self.dm.block_device(Path::new(path)).await.map_err(|err| {
                    AgentError::InvalidArgument {
                        field: "device_path",
                        reason: err.to_string(),
                    }
                })?;
                if let Some(recorded) = identity {
                    self.check_identity(path, found.0, recorded).await?;
                }
                Ok(found)
            }
            SourceRecord::NvmeTcp {
                subsystem_nqn,
                address,
                port,
                auth,
                ..
            } => {
                let target = (subsystem_nqn.as_str(), address.as_str(), *port);
                self.connect_source(volume, target, auth.clone()).await
            }
        }
    }

    /// After a reboot a path may name another disk: a transfer copies only
    /// from the device it started with.
    async fn check_identity(
        &self,
        path: &str,
        dev: DevRef,
        recorded: &str,
    ) -> Result<(), AgentError> {
        let now = self.dm.device_identity(Path::new(path), dev).await?;
        if now == recorded {
            return Ok(());
        }
        Err(AgentError::Unavailable {
            reason: format!(
                "{path} is now another device ({now}) than the transfer's source ({recorded}): \
                 nothing is copied from it; put the source back at {path}, or abort the transfer"
            ),
        })
    }

    /// Best effort: a source we cannot let go of is logged, not fatal.
    pub(crate) async fn detach_source(&self, source: &SourceRecord) {
        match source {
            SourceRecord::Device { .. } => {}
            SourceRecord::NvmeTcp { subsystem_nqn, .. } => {
                if let Err(err) = self.disconnect_source(subsystem_nqn).await {
                    warn!(%subsystem_nqn, error = %err, "cannot disconnect from the source");
                }
            }
        }
    }

    /// Connects to another agent's export of `volume` (or adopts the
    /// connection that is already there) and returns the namespace.
    pub(crate) async fn connect_source(
        &self,
        volume: &VolumeId,
        (subsystem, address, port): (&str, &str, u32),
        auth: Option<DhchapKeys>,
    ) -> Result<(DevRef, u64), AgentError> {
        let ip: IpAddr = address.parse().map_err(|_| AgentError::InvalidArgument {
            field: "nvme_tcp.transport_address",
            reason: format!("{} is not an IP address", crate::ids::quoted(address)),
        })?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| AgentError::InvalidArgument {
                field: "nvme_tcp.transport_service_id",
                reason: format!("{port} is not a TCP port"),
            })?;
        let subsystem_nqn = Nqn::parse("nvme_tcp.subsystem_nqn", subsystem)?;
        // The source exports the volume under its own ids, or, moving it on
        // while it still arrives there, under the onward ids.
        let expected_namespace = vec![namespace_ids(volume), onward_namespace_ids(&subsystem_nqn)];
        let options = ConnectOptions {
            address: TcpAddress::new(ip, port),
            subsystem_nqn,
            host_nqn: self.nvme.host_nqn.clone(),
            host_id: self.nvme.host_id.clone(),
            timeouts: ConnectTimeouts {
                ctrl_loss_tmo_secs: self.settings.nvme.ctrl_loss_timeout_seconds,
                reconnect_delay_secs: RECONNECT_DELAY_SECONDS,
                fast_io_fail_tmo_secs: self.settings.nvme.fast_io_fail_timeout_seconds,
            },
            auth,
        };
        let connection = self
            .fabric
            .connect(&ConnectRequest {
                options,
                expected_namespace,
                namespace_timeout: NAMESPACE_TIMEOUT,
            })
            .await?;
        info!(
            volume = %volume,
            controller = %connection.controller.name,
            device = %connection.namespace.path.display(),
            adopted = connection.adopted,
            "connected to the source"
        );
        Ok((connection.namespace.device, connection.namespace.size_bytes))
    }

    pub(crate) async fn disconnect_source(&self, subsystem: &str) -> Result<(), AgentError> {
        let nqn = Nqn::parse("subsystem_nqn", subsystem)?;
        if let Some(controller) = self.fabric.disconnect(&nqn).await? {
            info!(%subsystem, %controller, "disconnected from the source");
        }
        Ok(())
    }

    /// Whether the transfer's clone device still maps dm-clone (finalize
    /// has not switched it to the local copy).
    pub(crate) async fn clone_is_live(
        &self,
        transfer: &TransferRecord,
    ) -> Result<bool, AgentError> {
        stack::is_clone(self.dm.as_ref(), &self.clone_device(transfer)).await
    }
}
