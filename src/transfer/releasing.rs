//! While a move runs: telling the source agent we claim its export; after
//! it: asking the source to drop its copy, until it does; after an abort:
//! asking it to withdraw its export.

use std::time::Duration;

use tracing::{error, info, warn};

use super::{
    Transfers,
    release::{ReleaseRequest, ReturnTripAsk, SourceAction, SourceAgent, SourceAnswer},
    token::ReleaseToken,
};

use crate::{
    client::ClientTls,
    error::AgentError,
    ids::{SnapshotId, TransferId, VolumeId},
    refusal::Refusal,
    store::{HistoryOrigin, TransferRecord},
};

/// A source that answers a claim without saying where the volume comes
/// from (an agent from before chained moves) is the whole chain itself.
fn upstream_or(answer: &SourceAnswer, endpoint: &str) -> Vec<String> {
    if answer.upstream.is_empty() {
        vec![endpoint.to_owned()]
    } else {
        answer.upstream.clone()
    }
}

/// What a request to the source carries besides its action.
#[derive(Debug, Clone, Default)]
struct Extra {
    return_trip: Option<ReturnTripAsk>,
    snapshots_moved: Vec<SnapshotId>,
}

/// Release retries back off up to this.
const RELEASE_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Transfers {
    /// Tells the source agent to drop its copy, until it acknowledges:
    /// nothing is lost by asking again, and a source that is down now will
    /// be up later.
    pub(crate) fn spawn_release(&self, transfer: &TransferRecord) {
        if let Some(endpoint) = transfer.source_to_release() {
            let token = transfer.release_token().cloned();
            self.spawn_asking(transfer, endpoint, SourceAction::Release, token);
        }
    }

    /// After an abort: tells the source agent to withdraw its export, with
    /// the release token (without one the source would refuse).
    pub(crate) fn spawn_withdraw(&self, transfer: &TransferRecord) {
        if let Some((endpoint, token)) = transfer.export_to_withdraw() {
            let token = Some(token.clone());
            self.spawn_asking(transfer, endpoint, SourceAction::Withdraw, token);
        }
    }

    /// Once connected: tells the source agent this destination claims its
    /// export, so that the export does not expire under the move.
    pub(crate) fn spawn_claim(&self, transfer: &TransferRecord) {
        if let Some((endpoint, token)) = transfer.export_to_claim() {
            let token = Some(token.clone());
            self.spawn_asking(transfer, endpoint, SourceAction::Claim, token);
        }
    }

    /// Claims the source's export now and records where the volume comes
    /// from, for a caller that holds the volume's lock and needs the answer
    /// (a chained move: the depth of the chain bounds it).
    pub(crate) async fn claim_now(&self, transfer: &mut TransferRecord) -> Result<(), AgentError> {
        let Some((endpoint, token)) = transfer.export_to_claim() else {
            return Ok(());
        };
        let (endpoint, token) = (endpoint.to_owned(), token.clone());
        let answer = self
            .ask_source(
                &endpoint,
                &transfer.volume_id,
                SourceAction::Claim,
                Some(token),
                Extra::default(),
            )
            .await?;
        self.note_claim_answer(transfer, &answer, &endpoint).await?;
        self.plan_snapshots(transfer, &answer).await?;
        self.ctx.put_transfer(transfer).await?;
        info!(transfer = %transfer.id, "the source knows its export is claimed");
        Ok(())
    }

    fn spawn_asking(
        &self,
        transfer: &TransferRecord,
        endpoint: &str,
        action: SourceAction,
        token: Option<ReleaseToken>,
    ) {
        let transfers = self.clone();
        let (id, volume, endpoint) = (
            transfer.id.clone(),
            transfer.volume_id.clone(),
            endpoint.to_owned(),
        );
        // A release names the snapshots that arrived here: the source drops
        // exactly those with its copy.
        let extra = Extra {
            snapshots_moved: match action {
                SourceAction::Release => transfer.snapshots_arrived.clone(),
                _ => Vec::new(),
            },
            ..Extra::default()
        };
        self.ctx.background.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            let answer = loop {
                if action == SourceAction::Claim && !transfers.claim_wanted(&id).await {
                    return;
                }
                match transfers
                    .ask_source(&endpoint, &volume, action, token.clone(), extra.clone())
                    .await
                {
                    Ok(answer) => break answer,
                    Err(err @ AgentError::NotFound { .. }) if action == SourceAction::Claim => {
                        warn!(transfer = %id, %endpoint, error = %err, "the source has no export to claim (it may have expired): reads of regions not yet copied fail until it is exported again");
                        return;
                    }
                    Err(err @ AgentError::PermissionDenied { .. }) => {
                        // Asking again changes nothing; the next start asks once more.
                        error!(transfer = %id, %endpoint, ?action, error = %err, "the source refused; its copy and export stay as they are until an operator acts");
                        return;
                    }
                    Err(err) => {
                        warn!(transfer = %id, %endpoint, ?action, error = %err, retry_in = ?backoff, "the source did not acknowledge yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RELEASE_BACKOFF_MAX);
                    }
                }
            };
            if let Err(err) = transfers
                .mark_acknowledged(&id, action, &answer, &endpoint)
                .await
            {
                warn!(transfer = %id, error = %err, "cannot record the source's answer");
            }
        });
    }

    async fn ask_source(
        &self,
        endpoint: &str,
        volume: &VolumeId,
        action: SourceAction,
        token: Option<ReleaseToken>,
        extra: Extra,
    ) -> Result<SourceAnswer, AgentError> {
        let request = ReleaseRequest {
            source: self.source_agent_at(endpoint)?,
            action,
            volume_id: volume.to_string(),
            host_nqn: self.ctx.nvme.host_nqn.to_string(),
            token,
            return_trip: extra.return_trip,
            snapshots_moved: extra.snapshots_moved,
        };
        self.ctx.source_releaser.release(&request).await
    }

    /// How to reach the source agent at `endpoint`.
    pub(super) fn source_agent_at(&self, endpoint: &str) -> Result<SourceAgent, AgentError> {
        Ok(match endpoint.strip_prefix("unix:") {
            Some(path) => SourceAgent::Unix(path.into()),
            None => SourceAgent::Tls {
                address: endpoint.to_owned(),
                tls: self.peer_tls(endpoint)?,
            },
        })
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

    async fn mark_acknowledged(
        &self,
        id: &TransferId,
        action: SourceAction,
        answer: &SourceAnswer,
        endpoint: &str,
    ) -> Result<(), AgentError> {
        let (mut record, _held) = self.ctx.locked_transfer(id).await?;
        match action {
            SourceAction::Release => record.source_released = true,
            SourceAction::Withdraw => record.export_withdrawn = true,
            SourceAction::Claim => {
                self.note_claim_answer(&mut record, answer, endpoint)
                    .await?;
                self.plan_snapshots(&mut record, answer).await?;
            }
        }
        self.ctx.put_transfer(&record).await?;
        match action {
            SourceAction::Release => info!(transfer = %id, "the source released its copy"),
            SourceAction::Withdraw => info!(transfer = %id, "the source withdrew its export"),
            SourceAction::Claim => info!(transfer = %id, "the source knows its export is claimed"),
        }
        Ok(())
    }

    /// Claims the source's export now, with a return trip's question if
    /// any, and returns the answer; also after this destination is done,
    /// while the source is not released yet.
    pub(crate) async fn claim_asking(
        &self,
        transfer: &TransferRecord,
        ask: Option<ReturnTripAsk>,
    ) -> Result<SourceAnswer, AgentError> {
        let (endpoint, token) = transfer.source_agent().ok_or_else(|| {
            AgentError::Internal(format!("transfer {} has no source agent", transfer.id))
        })?;
        let (endpoint, token) = (endpoint.to_owned(), token.clone());
        self.ask_source(
            &endpoint,
            &transfer.volume_id,
            SourceAction::Claim,
            Some(token),
            Extra {
                return_trip: ask,
                ..Extra::default()
            },
        )
        .await
    }

    /// What the answer of the source at `endpoint` to a claim says: the
    /// claim holds, and where the volume comes from. Callers store
    /// `transfer` afterwards.
    pub(super) async fn note_claim_answer(
        &self,
        transfer: &mut TransferRecord,
        answer: &SourceAnswer,
        endpoint: &str,
    ) -> Result<(), AgentError> {
        transfer.export_claimed = true;
        transfer.upstream = Some(upstream_or(answer, endpoint));
        self.record_origin(transfer, answer).await
    }

    /// The history of an arriving volume begins with the source's copy:
    /// recorded, so that a return trip there can learn what changed. Only
    /// while the volume's history is the one that began with this transfer
    /// (nothing has restarted it since).
    async fn record_origin(
        &self,
        transfer: &TransferRecord,
        answer: &SourceAnswer,
    ) -> Result<(), AgentError> {
        let (Some(history), Some(node_id)) = (answer.history, answer.upstream.first()) else {
            return Ok(());
        };
        let Some(mut volume) = self.ctx.record(&transfer.volume_id).await? else {
            return Ok(());
        };
        let origin = HistoryOrigin {
            node_id: node_id.clone(),
            history,
        };
        match volume.tracking.as_mut() {
            Some(tracking)
                if (volume.transfer.as_ref() == Some(&transfer.id)
                    || transfer.history_began_with(tracking))
                    && tracking.origin.as_ref() != Some(&origin) =>
            {
                tracking.origin = Some(origin);
                self.ctx.put(&volume).await
            }
            _ => Ok(()),
        }
    }

    /// A claim is worth (re)sending while the transfer runs unclaimed; a
    /// finished one releases or withdraws instead.
    async fn claim_wanted(&self, id: &TransferId) -> bool {
        match self.ctx.transfer_record(id).await {
            Ok(Some(record)) => record.export_to_claim().is_some(),
            Ok(None) => false,
            Err(_) => true,
        }
    }
}
