//! Moving a volume here: the destination side of a transfer.
//!
//! The volume's public device is presented at once as a dm-clone of the
//! source (a device on this host, or another agent's NVMe/TCP export) over a
//! fresh thin device of the local pool, with the clone's metadata on a second
//! thin device. The kernel copies ("hydrates") in the background; when it
//! raises the clone's completion event the public table is switched to the
//! local thin device, the clone's pieces are torn down and the source is
//! released. Every step is recorded first, so a crash or reboot resumes where
//! the persistent clone metadata says.
//!
//! ```text
//! hydrating:  <prefix>-<id>        clone(<prefix>-cmeta-<id>, <prefix>-thin-<id>, source)
//!                                  [+ linear <prefix>-thin-<id> beyond the source, after an extend]
//! finished:   <prefix>-<id>        linear <prefix>-thin-<id>
//! ```

pub mod export;
pub mod history;
mod hydrate;
mod monitor;
mod outage;
pub mod phase;
pub mod progress;
pub mod release;
mod releasing;
mod return_trip;
mod snapshots;
pub mod token;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::{Notify, broadcast};

use crate::{
    config::MIB,
    ids::{TransferId, VolumeId},
    store::TransferRecord,
};

pub use self::{
    export::Exports,
    history::{TransferPage, TransferQuery},
    hydrate::Transfers,
    progress::Progress,
};

/// A transfer's state as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Connecting,
    Deferred,
    Hydrating,
    Paused,
    Finalizing,
    Done,
    /// Hydrating, but not getting anywhere (source unreachable, copy errors).
    Degraded,
    Failed,
    Aborted,
}

impl TransferState {
    /// The state's name wherever people read it: metrics labels, the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Connecting => "connecting",
            TransferState::Deferred => "deferred",
            TransferState::Hydrating => "hydrating",
            TransferState::Paused => "paused",
            TransferState::Finalizing => "finalizing",
            TransferState::Done => "done",
            TransferState::Degraded => "degraded",
            TransferState::Failed => "failed",
            TransferState::Aborted => "aborted",
        }
    }
}

/// What a start request asks for, validated.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub transfer: TransferId,
    pub volume: VolumeId,
    pub size_bytes: u64,
    pub source: Source,
    pub deferred: bool,
    pub knobs: KnobRequest,
    /// Leave the volume's snapshots on the source.
    pub leave_snapshots: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Device(PathBuf),
    NvmeTcp {
        subsystem_nqn: String,
        address: String,
        port: u32,
        agent_endpoint: String,
        release_token: Option<token::ReleaseToken>,
        auth: Option<crate::nvme::auth::DhchapKeys>,
    },
}

/// Knobs a caller sets; `None` keeps the configured default (or, for a
/// throttle, the current value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KnobRequest {
    pub region_bytes: Option<u64>,
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
    pub max_bytes_per_second: Option<u64>,
}

/// A snapshot of one transfer for callers and watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferView {
    pub id: TransferId,
    pub volume_id: VolumeId,
    pub state: TransferState,
    pub regions_hydrated: u64,
    pub regions_total: u64,
    pub region_bytes: u64,
    pub bytes_hydrated: u64,
    pub bytes_total: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<u64>,
    pub hydration_threshold: u32,
    pub hydration_batch_size: u32,
    pub max_bytes_per_second: u64,
    pub device_path: PathBuf,
    pub message: String,
    pub finalize_pause_micros: Option<u64>,
    pub done_to_finalized_micros: Option<u64>,
    pub source_released: bool,
    /// Started deferred and not committed yet (phase `deferred`).
    pub deferred: bool,
    /// Where the copy comes from (see [`crate::store::SourceRecord::describe`]).
    pub source: String,
    /// The hosts the volume comes from, nearest first (empty: not known yet).
    pub upstream: Vec<String>,
    /// Done by moving on: the host that holds every byte now.
    pub passed_on_to: Option<String>,
    /// A return trip: bytes known unchanged on this host's copy, not copied
    /// (left out of `bytes_total` and `bytes_hydrated`).
    pub bytes_skipped: u64,
    /// Snapshots travelling with the volume, how many arrived, and the
    /// bytes of their content received.
    pub snapshots_total: u32,
    pub snapshots_arrived: u32,
    pub snapshot_bytes_received: u64,
}

/// What the agent knows about a running transfer beyond its record.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub progress: Progress,
    pub degraded: Option<String>,
    /// Wakes the monitor after a state change made by a call.
    pub wake: Arc<Notify>,
    /// When the monitor saw the kernel report completion.
    pub completed_at: Option<Instant>,
    /// Copying in the background at the last look: one of those sharing
    /// the host's byte budget.
    pub copying: bool,
    /// Why the transfer does not copy although nothing is wrong (it moves
    /// on from here), shown as its message.
    pub note: Option<String>,
}

/// The running transfers and the stream of their updates.
#[derive(Debug)]
pub(crate) struct Registry {
    pub live: Mutex<HashMap<TransferId, Live>>,
    pub updates: broadcast::Sender<TransferView>,
    budget: Mutex<monitor::HostBudget>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            updates: broadcast::channel(1024).0,
            budget: Mutex::new(monitor::HostBudget::default()),
        }
    }
}

impl Registry {
    pub fn with_live<T>(&self, id: &TransferId, f: impl FnOnce(&mut Live) -> T) -> T {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(live.entry(id.clone()).or_default())
    }

    pub fn forget(&self, id: &TransferId) {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// How many transfers copied in the background at their last look.
    pub fn copying(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|live| live.copying)
            .count()
    }

    /// Spends one look's copies from the host's byte budget, shared by
    /// the transfers copying.
    pub(crate) fn spend_budget(&self, spending: monitor::Spending) -> monitor::Allowance {
        let copying = self.copying();
        self.budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spend(spending, copying)
    }

    pub fn wake(&self, id: &TransferId) {
        let notify = self.with_live(id, |live| live.wake.clone());
        notify.notify_one();
    }
}

/// Size of a clone's metadata device: the region bitmap (32,576 regions per
/// 4 KiB block), its index and space map, twice over for copy-on-write
/// commits (dm-facts.md), and never below 4 MiB. Thin-provisioned, so only
/// what the kernel writes is allocated.
pub fn clone_metadata_bytes(clone_bytes: u64, region_bytes: u64) -> u64 {
    let regions = clone_bytes.div_ceil(region_bytes);
    let bitmap_blocks = regions.div_ceil(32_576);
    let blocks = (bitmap_blocks + bitmap_blocks / 100 + 1 + 20) * 2;
    (blocks * 4096).div_ceil(MIB).max(4) * MIB
}

/// The caller's view of a record plus what the monitor observed.
pub(crate) fn view(
    record: &TransferRecord,
    live: Option<&Live>,
    device_path: PathBuf,
) -> TransferView {
    use crate::store::TransferPhase as P;
    let total_regions = record.clone_bytes.div_ceil(record.region_bytes);
    let (hydrated, rate, eta, degraded) = match live {
        Some(live) if live.progress.total_regions > 0 => (
            live.progress.hydrated_regions,
            live.progress.regions_per_second(),
            live.progress.eta_seconds(),
            live.degraded.clone(),
        ),
        Some(live) => (0, 0.0, None, live.degraded.clone()),
        None => (0, 0.0, None, None),
    };
    let note = live.and_then(|live| live.note.clone());
    let hydrated = if record.phase == P::Done {
        total_regions
    } else {
        hydrated
    };
    let state = match (record.phase, &degraded) {
        (P::Starting, _) => TransferState::Connecting,
        (P::Deferred, _) => TransferState::Deferred,
        (P::Hydrating, Some(_)) => TransferState::Degraded,
        (P::Hydrating, None) => TransferState::Hydrating,
        (P::Paused, _) => TransferState::Paused,
        (P::Finalizing, _) => TransferState::Finalizing,
        (P::Done, _) => TransferState::Done,
        (P::Aborted, _) => TransferState::Aborted,
        (P::Failed, _) => TransferState::Failed,
    };
    // Regions a return trip skipped count as hydrated in the kernel.
    let skipped = record.skipped_bytes().min(record.clone_bytes);
    let message = match (&degraded, &note, record.phase) {
        (Some(reason), _, P::Hydrating) => reason.clone(),
        (None, Some(note), P::Hydrating) => note.clone(),
        _ => record.message.clone(),
    };
    TransferView {
        id: record.id.clone(),
        volume_id: record.volume_id.clone(),
        state,
        regions_hydrated: hydrated,
        regions_total: total_regions,
        region_bytes: record.region_bytes,
        bytes_hydrated: progress::bytes_of(
            hydrated,
            total_regions,
            record.region_bytes,
            record.clone_bytes,
        )
        .saturating_sub(skipped),
        bytes_total: record.clone_bytes - skipped,
        bytes_skipped: skipped,
        snapshots_total: u32::try_from(record.snapshots.len()).unwrap_or(u32::MAX),
        snapshots_arrived: u32::try_from(record.snapshots_arrived.len()).unwrap_or(u32::MAX),
        snapshot_bytes_received: record.snapshot_bytes,
        bytes_per_second: rate * record.region_bytes as f64,
        eta_seconds: eta,
        hydration_threshold: record.hydration_threshold,
        hydration_batch_size: record.hydration_batch_size,
        max_bytes_per_second: record.max_bytes_per_second,
        device_path,
        message,
        finalize_pause_micros: record.finalize_pause_micros,
        done_to_finalized_micros: record.done_to_finalized_micros,
        source_released: record.source_released,
        deferred: record.phase == crate::store::TransferPhase::Deferred,
        source: record.source.describe(),
        upstream: record.upstream.clone().unwrap_or_default(),
        passed_on_to: record.passed_on_to.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GIB, KIB, TIB};

    #[test]
    fn metadata_covers_the_bitmap_twice_and_has_a_floor() {
        assert_eq!(clone_metadata_bytes(GIB, MIB), 4 * MIB);
        // 1 TiB at 4 KiB regions: 2^28 regions, 8,241 bitmap blocks (~33 MiB), doubled.
        let big = clone_metadata_bytes(TIB, 4 * KIB);
        assert!((64 * MIB..=70 * MIB).contains(&big), "{big}");
        assert_eq!(big % MIB, 0);
    }
}

#[cfg(test)]
mod chain_tests;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod move_tests;
#[cfg(test)]
mod return_trip_tests;
#[cfg(test)]
mod snapshots_tests;
#[cfg(test)]
mod warm_tests;
