//! The domain's SourceReleaser over gRPC: the source agent's
//! Transfers.ReleaseVolume, or UnexportVolume after an abort, ClaimExport
//! while a move runs, ReadSnapshotDelta after it.

use crate::{
    api::{
        convert,
        proto::v1::{
            ClaimExportRequest, ReleaseVolumeRequest, UnexportVolumeRequest,
            transfers_client::TransfersClient,
        },
        status::code_label,
    },
    client::{connect_tls, connect_unix},
    error::AgentError,
    transfer::release::{
        DeltaChunk, DeltaChunks, DeltaFuture, DeltaRequest, ReleaseFuture, ReleaseRequest,
        SourceAction, SourceAgent, SourceAnswer, SourceReleaser,
    },
};

/// Calls ReleaseVolume on the source agent, over a new connection each time
/// (releases are rare and retried with backoff).
#[derive(Debug, Default, Clone, Copy)]
pub struct GrpcSourceReleaser;

impl SourceReleaser for GrpcSourceReleaser {
    fn release<'a>(&'a self, request: &'a ReleaseRequest) -> ReleaseFuture<'a> {
        Box::pin(release_volume(request))
    }

    fn snapshot_delta<'a>(&'a self, request: &'a DeltaRequest) -> DeltaFuture<'a> {
        Box::pin(snapshot_delta(request))
    }
}

/// A client of the source agent, and how to name it in errors.
async fn connect(
    source: &SourceAgent,
) -> Result<(TransfersClient<tonic::transport::Channel>, String), AgentError> {
    let (channel, endpoint) = match source {
        SourceAgent::Unix(path) => (
            connect_unix(path).await?,
            format!("unix:{}", path.display()),
        ),
        SourceAgent::Tls { address, tls } => (connect_tls(address, tls).await?, address.clone()),
    };
    Ok((TransfersClient::new(channel), endpoint))
}

fn presented(token: Option<&crate::transfer::token::ReleaseToken>) -> String {
    token
        .map(|token| token.expose().to_owned())
        .unwrap_or_default()
}

/// Opens the source's stream of a snapshot's delta and relays its chunks.
async fn snapshot_delta(request: &DeltaRequest) -> Result<DeltaChunks, AgentError> {
    let (mut client, endpoint) = connect(&request.source).await?;
    let message = convert::delta_request_message(
        &request.volume_id,
        &request.host_nqn,
        presented(request.token.as_ref()),
        &request.ask,
    );
    let snapshot = request.ask.snapshot.to_string();
    let failed = move |status: tonic::Status| delta_error(&status, &endpoint, &snapshot);
    let mut stream = client
        .read_snapshot_delta(message)
        .await
        .map_err(&failed)?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let next = match stream.message().await {
                Ok(Some(chunk)) => Ok(DeltaChunk {
                    offset: chunk.offset_bytes,
                    data: chunk.data,
                }),
                Ok(None) => return,
                Err(status) => Err(failed(status)),
            };
            let last = next.is_err();
            if tx.send(next).await.is_err() || last {
                return;
            }
        }
    });
    Ok(rx)
}

/// What the source's refusal of a delta means for the destination: a
/// snapshot or export that is gone stays gone, a refusal stays a refusal,
/// anything else may pass.
fn delta_error(status: &tonic::Status, endpoint: &str, snapshot: &str) -> AgentError {
    let reason = format!(
        "{endpoint} answered {}: {}",
        code_label(status.code()),
        status.message()
    );
    match status.code() {
        tonic::Code::PermissionDenied => AgentError::PermissionDenied { reason },
        tonic::Code::NotFound | tonic::Code::FailedPrecondition => AgentError::NotFound {
            what: "snapshot on the source",
            id: format!("{snapshot} ({reason})"),
        },
        _ => AgentError::Unavailable { reason },
    }
}

async fn release_volume(request: &ReleaseRequest) -> Result<SourceAnswer, AgentError> {
    let (mut client, endpoint) = connect(&request.source).await?;
    let token = presented(request.token.as_ref());
    let answer = match request.action {
        SourceAction::Release => client
            .release_volume(ReleaseVolumeRequest {
                volume_id: request.volume_id.clone(),
                host_nqn: request.host_nqn.clone(),
                release_token: token,
                snapshots_moved: request
                    .snapshots_moved
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            })
            .await
            .map(|_| SourceAnswer::default()),
        SourceAction::Withdraw => {
            let withdrawn = client
                .unexport_volume(UnexportVolumeRequest {
                    volume_id: request.volume_id.clone(),
                    release_token: token,
                    force: false,
                })
                .await;
            match withdrawn {
                // The volume is gone from the source: nothing is exported.
                Err(status) if status.code() == tonic::Code::NotFound => {
                    Ok(SourceAnswer::default())
                }
                other => other.map(|_| SourceAnswer::default()),
            }
        }
        SourceAction::Claim => client
            .claim_export(ClaimExportRequest {
                volume_id: request.volume_id.clone(),
                host_nqn: request.host_nqn.clone(),
                release_token: token,
                return_trip: request
                    .return_trip
                    .as_ref()
                    .map(convert::return_trip_ask_message),
            })
            .await
            .map(|answer| convert::source_answer(answer.into_inner())),
    };
    answer.map_err(|status| {
        let reason = format!(
            "{endpoint} answered {}: {}",
            code_label(status.code()),
            status.message()
        );
        match status.code() {
            tonic::Code::PermissionDenied => AgentError::PermissionDenied { reason },
            // No export to claim: no repeat brings it back.
            tonic::Code::NotFound | tonic::Code::FailedPrecondition
                if request.action == SourceAction::Claim =>
            {
                AgentError::NotFound {
                    what: "export for this move",
                    id: format!("of volume {} ({reason})", request.volume_id),
                }
            }
            _ => AgentError::Unavailable { reason },
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The transfer's release loop logs and retries on this error, so it
    /// must be UNAVAILABLE-class and name the source it could not reach.
    #[tokio::test]
    async fn an_unreachable_source_is_unavailable_and_named() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("absent-agent.sock");
        let releaser: Arc<dyn SourceReleaser> = Arc::new(GrpcSourceReleaser);
        let request = ReleaseRequest {
            source: SourceAgent::Unix(socket),
            action: SourceAction::Release,
            token: None,
            return_trip: None,
            snapshots_moved: Vec::new(),
            volume_id: "00000000-0000-4000-8000-000000000001".into(),
            host_nqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-9000-000000000001".into(),
        };
        let err = releaser
            .release(&request)
            .await
            .expect_err("nothing listens on the socket");
        assert!(matches!(err, AgentError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("absent-agent.sock"), "{err}");
    }
}
