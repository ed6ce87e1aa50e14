//! The source side of a move: exporting a volume over NVMe/TCP to the one
//! host it moves to, unexporting, releasing the copy once the destination has
//! all of it, and connecting to another agent's export as a destination.

use std::{net::IpAddr, sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    agent::Agent,
    client::ClientTls,
    dm::table::DevRef,
    error::AgentError,
    ids::{TransferId, VolumeId},
    nvme::{
        ConnectRequest, ConnectTimeouts, Host, Nqn, Target, TcpAddress,
        fabrics::{ConnectOptions, namespace_ids},
        subsystem_nqn,
        target::{ExportRequest, PortSpec},
        volume_of_subsystem,
    },
    refusal::Refusal,
    store::{ExportRecord, SourceRecord, TransferRecord},
    transfer::release::{ReleaseRequest, SourceAgent},
};

/// An export, as the source reports it to the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportView {
    pub volume_id: String,
    pub subsystem_nqn: String,
    pub address: String,
    pub port: u16,
    pub host_nqn: String,
}

/// How long a destination waits for the source's namespace to appear.
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT_DELAY_SECONDS: u32 = 2;
/// Release retries back off up to this.
const RELEASE_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Agent {
    /// The NQN prefix of this node's exports.
    fn export_prefix(&self) -> String {
        format!("nqn.2014-08.io.dmclone:{}", self.node_id)
    }

    pub async fn export_volume(
        &self,
        id: &VolumeId,
        host_nqn: &str,
    ) -> Result<ExportView, AgentError> {
        let host = Nqn::parse("host_nqn", host_nqn)?;
        let address = self.settings.nvme.export.ok_or_else(|| {
            Refusal::NotConfigured {
                setting: "nvme.export_address",
                explanation: "this agent exports nothing until it knows the storage network address other hosts reach it at".into(),
            }
        })?;
        let _held = self.locks.lock(id.as_str()).await;
        let mut record = self.ready_record(id, "be exported").await?;
        if let Some(transfer) = &record.transfer {
            return Err(Refusal::VolumeArriving {
                volume: id.clone(),
                transfer: transfer.clone(),
                hint: "it can move on once that transfer is done",
            }
            .into());
        }
        let subsystem = subsystem_nqn(&self.export_prefix(), id)?;
        match &record.export {
            Some(existing) if existing.host_nqn != host.as_str() => {
                return Err(AgentError::AlreadyExists {
                    what: "export of volume",
                    id: id.to_string(),
                    detail: format!(
                        "to {}; unexport it before exporting to {host}",
                        existing.host_nqn
                    ),
                });
            }
            Some(_) => {}
            None => {
                record.export = Some(ExportRecord {
                    host_nqn: host.to_string(),
                    subsystem_nqn: subsystem.to_string(),
                });
                self.put(&record).await?;
            }
        }
        let request = ExportRequest {
            subsystem_nqn: subsystem.clone(),
            device_path: self.thin_name(&record).mapper_path(),
            namespace: namespace_ids(id),
            host_nqn: host.clone(),
            port: PortSpec {
                id: self.settings.nvme.export_port_id,
                address: TcpAddress::new(address.ip(), address.port()),
            },
        };
        Target::open()?.export(&request).await?;
        info!(volume = %id, host = %host, subsystem = %subsystem, %address, "exported");
        Ok(ExportView {
            volume_id: id.to_string(),
            subsystem_nqn: subsystem.to_string(),
            address: address.ip().to_string(),
            port: address.port(),
            host_nqn: host.to_string(),
        })
    }

    pub async fn unexport_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        let _held = self.locks.lock(id.as_str()).await;
        let mut record = self.record(id).await?.ok_or_else(|| AgentError::NotFound {
            what: "volume",
            id: id.to_string(),
        })?;
        self.remove_export(id).await?;
        if record.export.take().is_some() {
            self.put(&record).await?;
            info!(volume = %id, "unexported");
        }
        Ok(())
    }

    async fn remove_export(&self, id: &VolumeId) -> Result<(), AgentError> {
        let subsystem = subsystem_nqn(&self.export_prefix(), id)?;
        match Target::open() {
            Ok(target) => target.unexport(&subsystem).await,
            // No nvmet in this kernel: nothing can be exported either.
            Err(AgentError::Unavailable { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The destination has every region: drop this host's copy, unless it
    /// is still attached here or exported to someone else.
    pub async fn release_volume(&self, id: &VolumeId, host_nqn: &str) -> Result<(), AgentError> {
        let host = Nqn::parse("host_nqn", host_nqn)?;
        let _held = self.locks.lock(id.as_str()).await;
        let Some(record) = self.record(id).await? else {
            info!(volume = %id, "release of an absent volume: already released");
            return Ok(());
        };
        if let Some(transfer) = &record.transfer {
            return Err(Refusal::VolumeArriving {
                volume: id.clone(),
                transfer: transfer.clone(),
                hint: "it is nobody's source yet",
            }
            .into());
        }
        if let Some(export) = &record.export
            && export.host_nqn != host.as_str()
        {
            return Err(Refusal::VolumeExportedElsewhere {
                volume: id.clone(),
                host_nqn: export.host_nqn.clone(),
                requester: host.to_string(),
            }
            .into());
        }
        if record.published {
            return Err(Refusal::VolumePublished {
                volume: id.clone(),
                device: self.naming.public(id).mapper_path(),
                hint: "the copy stays until it is unpublished here (detached)",
            }
            .into());
        }
        self.remove_export(id).await?;
        let mut record = record;
        record.export = None;
        self.put(&record).await?;
        self.delete_locked(id, record).await?;
        info!(volume = %id, host = %host, "released: the volume now lives on the destination only");
        Ok(())
    }

    /// After a restart: every recorded export is in place, and exports of
    /// ours that no record names (an unexport cut short) are removed.
    pub(crate) async fn reconcile_exports(&self) -> Result<(), AgentError> {
        let target = match Target::open() {
            Ok(target) => target,
            Err(AgentError::Unavailable { reason }) => {
                warn!(%reason, "no NVMe/TCP target in this kernel: exports are unavailable");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let records = self.store_call(|store| store.volumes()).await?;
        let prefix = self.export_prefix();
        for export in target.list_exports().await? {
            let Some(volume) = volume_of_subsystem(&prefix, &export.subsystem_nqn) else {
                continue;
            };
            if !records
                .iter()
                .any(|r| r.id == volume.as_str() && r.export.is_some())
            {
                info!(subsystem = %export.subsystem_nqn, "removing an export no record names");
                target
                    .unexport(&Nqn::parse("subsystem_nqn", &export.subsystem_nqn)?)
                    .await?;
            }
        }
        for record in records {
            if let Some(export) = &record.export {
                let id = record.id.clone();
                if let Err(err) = self.export_volume(&id, &export.host_nqn).await {
                    warn!(volume = %id, error = %err, "cannot restore an export");
                }
            }
        }
        Ok(())
    }

    // ---- the destination's side of NVMe/TCP ---------------------------

    /// Connects to another agent's export of `volume` (or adopts the
    /// connection that is already there) and returns the namespace.
    pub(crate) async fn connect_source(
        &self,
        volume: &VolumeId,
        subsystem: &str,
        address: &str,
        port: u32,
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
        let options = ConnectOptions {
            address: TcpAddress::new(ip, port),
            subsystem_nqn: Nqn::parse("nvme_tcp.subsystem_nqn", subsystem)?,
            host_nqn: self.nvme.host_nqn.clone(),
            host_id: self.nvme.host_id.clone(),
            timeouts: ConnectTimeouts {
                ctrl_loss_tmo_secs: self.settings.nvme.ctrl_loss_timeout_seconds,
                reconnect_delay_secs: RECONNECT_DELAY_SECONDS,
                fast_io_fail_tmo_secs: self.settings.nvme.fast_io_fail_timeout_seconds,
            },
        };
        let connection = Host::open()?
            .connect(&ConnectRequest {
                options,
                expected_namespace: Some(namespace_ids(volume)),
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
        let host = Host::open()?;
        let nqn = Nqn::parse("subsystem_nqn", subsystem)?;
        if let Some(controller) = host.find_connection(&nqn).await? {
            host.disconnect(&controller).await?;
            info!(%subsystem, controller = %controller.name, "disconnected from the source");
        }
        Ok(())
    }

    /// Tells the source agent to drop its copy, until it acknowledges:
    /// nothing is lost by asking again, and a source that is down now will
    /// be up later.
    pub(crate) fn spawn_release(self: &Arc<Self>, transfer: &TransferRecord) {
        let SourceRecord::NvmeTcp { agent_endpoint, .. } = &transfer.source else {
            return;
        };
        if agent_endpoint.is_empty() || transfer.source_released {
            return;
        }
        let agent = Arc::clone(self);
        let (id, volume, endpoint) = (
            transfer.id.clone(),
            transfer.volume_id.clone(),
            agent_endpoint.clone(),
        );
        self.background.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                match agent.ask_source_to_release(&endpoint, &volume).await {
                    Ok(()) => break,
                    Err(err) => {
                        warn!(transfer = %id, %endpoint, error = %err, retry_in = ?backoff, "the source did not release its copy yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RELEASE_BACKOFF_MAX);
                    }
                }
            }
            if let Err(err) = agent.mark_released(&id).await {
                warn!(transfer = %id, error = %err, "cannot record the source's release");
            }
        });
    }

    async fn ask_source_to_release(
        &self,
        endpoint: &str,
        volume: &VolumeId,
    ) -> Result<(), AgentError> {
        let source = match endpoint.strip_prefix("unix:") {
            Some(path) => SourceAgent::Unix(path.into()),
            None => SourceAgent::Tls {
                address: endpoint.to_owned(),
                tls: self.peer_tls(endpoint)?,
            },
        };
        let request = ReleaseRequest {
            source,
            volume_id: volume.to_string(),
            host_nqn: self.nvme.host_nqn.to_string(),
        };
        self.source_releaser.release(&request).await
    }

    fn peer_tls(&self, endpoint: &str) -> Result<ClientTls, AgentError> {
        let peers = self
            .settings
            .peers
            .as_ref()
            .ok_or_else(|| Refusal::NotConfigured {
                setting: "peers.tls_cert, peers.tls_key and peers.ca",
                explanation: format!("the source agent {endpoint} is reached over mutual TLS"),
            })?;
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| AgentError::Io {
                context: format!("cannot read {}", path.display()),
                source,
            })
        };
        let host = endpoint.rsplit_once(':').map_or(endpoint, |(host, _)| host);
        Ok(ClientTls {
            ca_pem: read(&peers.ca)?,
            cert_pem: Some(read(&peers.tls_cert)?),
            key_pem: Some(read(&peers.tls_key)?),
            server_name: host.trim_matches(['[', ']']).to_owned(),
        })
    }

    async fn mark_released(&self, id: &TransferId) -> Result<(), AgentError> {
        let (mut record, _held) = self.locked_transfer(id).await?;
        record.source_released = true;
        self.put_transfer(&record).await?;
        info!(transfer = %id, "the source released its copy");
        Ok(())
    }
}
