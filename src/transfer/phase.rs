//! The persisted steps of a transfer, named once for the store, the
//! refusals and the views.

use serde::{Deserialize, Serialize};

/// The persisted steps of a transfer. Degraded is not among them: it is
/// observed at run time, never decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferPhase {
    /// Records written, the stack not complete: rolled back after a crash.
    Starting,
    /// Presented with hydration off (live migration before commit).
    Deferred,
    Hydrating,
    Paused,
    /// Every region copied; the public table is being switched to local.
    Finalizing,
    Done,
    /// Torn down on request; the source was never touched.
    Aborted,
    Failed,
}

impl TransferPhase {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TransferPhase::Done | TransferPhase::Aborted | TransferPhase::Failed
        )
    }

    /// The phase as the store spells it (snake_case), for messages and
    /// error metadata.
    pub fn name(self) -> &'static str {
        match self {
            TransferPhase::Starting => "starting",
            TransferPhase::Deferred => "deferred",
            TransferPhase::Hydrating => "hydrating",
            TransferPhase::Paused => "paused",
            TransferPhase::Finalizing => "finalizing",
            TransferPhase::Done => "done",
            TransferPhase::Aborted => "aborted",
            TransferPhase::Failed => "failed",
        }
    }
}
