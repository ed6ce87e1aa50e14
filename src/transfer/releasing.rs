//! After a move: asking the source agent to drop its copy, until it does.

use std::time::Duration;

use tracing::{info, warn};

use super::{
    Transfers,
    release::{ReleaseRequest, SourceAgent},
};

use crate::{
    client::ClientTls,
    error::AgentError,
    ids::{TransferId, VolumeId},
    refusal::Refusal,
    store::TransferRecord,
};

/// Release retries back off up to this.
const RELEASE_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Transfers {
    /// Tells the source agent to drop its copy, until it acknowledges:
    /// nothing is lost by asking again, and a source that is down now will
    /// be up later.
    pub(crate) fn spawn_release(&self, transfer: &TransferRecord) {
        let Some(agent_endpoint) = transfer.source_to_release() else {
            return;
        };
        let transfers = self.clone();
        let (id, volume, endpoint) = (
            transfer.id.clone(),
            transfer.volume_id.clone(),
            agent_endpoint.to_owned(),
        );
        self.ctx.background.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                match transfers.ask_source_to_release(&endpoint, &volume).await {
                    Ok(()) => break,
                    Err(err) => {
                        warn!(transfer = %id, %endpoint, error = %err, retry_in = ?backoff, "the source did not release its copy yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RELEASE_BACKOFF_MAX);
                    }
                }
            }
            if let Err(err) = transfers.mark_released(&id).await {
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
            host_nqn: self.ctx.nvme.host_nqn.to_string(),
        };
        self.ctx.source_releaser.release(&request).await
    }

    fn peer_tls(&self, endpoint: &str) -> Result<ClientTls, AgentError> {
        let peers = self
            .ctx
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
        let (mut record, _held) = self.ctx.locked_transfer(id).await?;
        record.source_released = true;
        self.ctx.put_transfer(&record).await?;
        info!(transfer = %id, "the source released its copy");
        Ok(())
    }
}
