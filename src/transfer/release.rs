//! Releasing the source's copy once a volume has moved here. The domain says
//! whom to ask and what; the API layer, which speaks the wire, does the
//! asking (api::GrpcSourceReleaser), so nothing here knows gRPC.

use std::{fmt, future::Future, path::PathBuf, pin::Pin};

use crate::{client::ClientTls, error::AgentError};

/// Where the source agent of a transfer listens.
#[derive(Debug, Clone)]
pub enum SourceAgent {
    /// An agent on this host, on its Unix socket (`unix:<path>` endpoints).
    Unix(PathBuf),
    /// `host:port`, reached over mutual TLS with this agent's peer identity.
    Tls { address: String, tls: ClientTls },
}

/// A request that the source drop its copy of a volume.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    pub source: SourceAgent,
    pub volume_id: String,
    /// This host's NQN: a source releases only to the host it exported to.
    pub host_nqn: String,
}

pub type ReleaseFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send + 'a>>;

/// Sends release requests to source agents. It returns a boxed future so
/// that the agent can hold any implementation as `dyn SourceReleaser`.
pub trait SourceReleaser: fmt::Debug + Send + Sync {
    /// Resolves once the source has acknowledged; an error says why not,
    /// and the caller asks again later.
    fn release<'a>(&'a self, request: &'a ReleaseRequest) -> ReleaseFuture<'a>;
}
