//! The domain's SourceReleaser over gRPC: the source agent's
//! Transfers.ReleaseVolume.

use crate::{
    api::{
        proto::v1::{ReleaseVolumeRequest, transfers_client::TransfersClient},
        status::code_label,
    },
    client::{connect_tls, connect_unix},
    error::AgentError,
    transfer::release::{ReleaseFuture, ReleaseRequest, SourceAgent, SourceReleaser},
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

async fn release_volume(request: &ReleaseRequest) -> Result<(), AgentError> {
    let (channel, endpoint) = match &request.source {
        SourceAgent::Unix(path) => (
            connect_unix(path).await?,
            format!("unix:{}", path.display()),
        ),
        SourceAgent::Tls { address, tls } => (connect_tls(address, tls).await?, address.clone()),
    };
    let message = ReleaseVolumeRequest {
        volume_id: request.volume_id.clone(),
        host_nqn: request.host_nqn.clone(),
    };
    TransfersClient::new(channel)
        .release_volume(message)
        .await
        .map(drop)
        .map_err(|status| AgentError::Unavailable {
            reason: format!(
                "{endpoint} answered {}: {}",
                code_label(status.code()),
                status.message()
            ),
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
