//! Telling the source agent what became of a move: release your copy (the
//! move is done) or withdraw your export (it was aborted). The domain says
//! whom to ask and what; the API layer, which speaks the wire, does the
//! asking (api::GrpcSourceReleaser), so nothing here knows gRPC.

use std::{fmt, future::Future, ops::Range, path::PathBuf, pin::Pin};

use crate::{
    client::ClientTls, error::AgentError, ids::SnapshotId, store::HistoryOrigin,
    transfer::token::ReleaseToken,
};

/// Where the source agent of a transfer listens.
#[derive(Debug, Clone)]
pub enum SourceAgent {
    /// An agent on this host, on its Unix socket (`unix:<path>` endpoints).
    Unix(PathBuf),
    /// `host:port`, reached over mutual TLS with this agent's peer identity.
    Tls { address: String, tls: ClientTls },
}

/// What the source is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    /// The move is done: drop the copy (Transfers.ReleaseVolume).
    Release,
    /// The move was aborted: withdraw the export, keep the copy
    /// (Transfers.UnexportVolume).
    Withdraw,
    /// The destination is connected: the export must not expire
    /// (Transfers.ClaimExport).
    Claim,
}

/// A request to the source agent of a move.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    pub source: SourceAgent,
    pub action: SourceAction,
    pub volume_id: String,
    /// This host's NQN: a source releases only to the host it exported to.
    pub host_nqn: String,
    /// The export's release token, which proves the right to ask.
    pub token: Option<ReleaseToken>,
    /// With a claim: what changed since the volume left this host's copy.
    pub return_trip: Option<ReturnTripAsk>,
    /// With a release: the snapshots that arrived here, which the source
    /// deletes with its copy.
    pub snapshots_moved: Vec<SnapshotId>,
}

/// A destination's question about its warm copy: which regions changed
/// since the volume left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnTripAsk {
    /// The copy: the node that kept it and the history it was written under.
    pub origin: HistoryOrigin,
    /// The answer is in whole regions of this size.
    pub region_bytes: u64,
}

/// The source's answer to a [`ReturnTripAsk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnTripDelta {
    /// Byte ranges written since, in whole regions, merged and in order;
    /// everything else is unchanged.
    Changed(Vec<Range<u64>>),
    /// The history does not reach back to the copy: copy the whole volume.
    WholeCopy(String),
}

/// What a source answers: to a claim, where the volume comes from (the
/// source itself first, then the hosts it still copies from), its history
/// tag there, and what a return trip asked; to anything else, nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceAnswer {
    pub upstream: Vec<String>,
    /// `None`: the volume tracks no changes there (or the source is older).
    pub history: Option<u32>,
    pub return_trip: Option<ReturnTripDelta>,
    /// The volume's snapshots there, oldest first: they may travel too.
    pub snapshots: Vec<TravellingSnapshot>,
}

/// A snapshot the source offers to send after the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TravellingSnapshot {
    pub id: SnapshotId,
    pub size_bytes: u64,
    pub created_unix: i64,
}

/// What a destination asks of one snapshot (`ReadSnapshotDelta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaAsk {
    pub snapshot: SnapshotId,
    /// The newer snapshot the destination holds already; `None`: the
    /// volume as exported.
    pub against: Option<SnapshotId>,
    /// The comparison's granularity: a power of two, 4 KiB to 1 MiB.
    pub block_bytes: u64,
    /// Byte ranges sent whatever they hold, in order.
    pub also: Vec<Range<u64>>,
    /// Send every block: the destination compares each itself.
    pub everything: bool,
}

/// Whole blocks of a snapshot from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaChunk {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A [`DeltaAsk`] sent to the source agent of a move.
#[derive(Debug, Clone)]
pub struct DeltaRequest {
    pub source: SourceAgent,
    pub volume_id: String,
    /// This host's NQN: the host the volume is exported to.
    pub host_nqn: String,
    pub token: Option<ReleaseToken>,
    pub ask: DeltaAsk,
}

/// The chunks of a snapshot's delta as they arrive; an error ends them.
pub type DeltaChunks = tokio::sync::mpsc::Receiver<Result<DeltaChunk, AgentError>>;

pub type DeltaFuture<'a> =
    Pin<Box<dyn Future<Output = Result<DeltaChunks, AgentError>> + Send + 'a>>;

pub type ReleaseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<SourceAnswer, AgentError>> + Send + 'a>>;

/// Sends release requests to source agents. It returns a boxed future so
/// that the agent can hold any implementation as `dyn SourceReleaser`.
pub trait SourceReleaser: fmt::Debug + Send + Sync {
    /// Resolves once the source has acknowledged; an error says why not.
    /// The caller asks again later, except after PERMISSION_DENIED, which
    /// no repeat changes, and after `NotFound` for a claim: the source has
    /// no export for the move (any more).
    fn release<'a>(&'a self, request: &'a ReleaseRequest) -> ReleaseFuture<'a>;

    /// Opens the stream of a snapshot's delta; the chunks follow on the
    /// receiver.
    fn snapshot_delta<'a>(&'a self, request: &'a DeltaRequest) -> DeltaFuture<'a>;
}
