//! The domain's SourceReleaser over gRPC: the source agent's
//! Transfers.ReleaseVolume, or UnexportVolume after an abort.

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
        ReleaseFuture, ReleaseRequest, SourceAction, SourceAgent, SourceAnswer, SourceReleaser,
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
}

async fn release_volume(request: &ReleaseRequest) -> Result<SourceAnswer, AgentError> {
    let (channel, endpoint) = match &request.source {
        SourceAgent::Unix(path) => (
            connect_unix(path).await?,
            format!("unix:{}", path.display()),
        ),
        SourceAgent::Tls { address, tls } => (connect_tls(address, tls).await?, address.clone()),
    };
    let token = request
        .token
        .as_ref()
        .map(|token| token.expose().to_owned())
        .unwrap_or_default();
    let mut client = TransfersClient::new(channel);
    let answer = match request.action {
        SourceAction::Release => client
            .release_volume(ReleaseVolumeRequest {
                volume_id: request.volume_id.clone(),
                host_nqn: request.host_nqn.clone(),
                release_token: token,
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
