//! What every service of the agent shares: the kernel handle, the store, the
//! pool, the device names, the per-object locks, the settings, the metrics,
//! the live transfers and the background tasks. Services hold an `Arc` of
//! one [`Context`] and call downward only: the steps two services need live
//! here (record steps in [`crate::records`], stack steps in
//! [`crate::stack::steps`], change-tracking steps in
//! [`crate::changes::steps`]), never in one of the services.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use crate::{
    config::Settings,
    dm::{Kernel, names::Naming},
    error::AgentError,
    ids::{TransferId, VolumeId},
    locks::Locks,
    metrics::Metrics,
    nvme::{Fabric, HostId, Nqn},
    pool::Pool,
    store::Store,
    transfer::{Registry, release::SourceReleaser},
};

#[derive(Debug)]
pub struct Context {
    pub(crate) dm: Arc<dyn Kernel>,
    pub(crate) store: Store,
    pub(crate) pool: Pool,
    pub(crate) naming: Naming,
    pub(crate) locks: Locks,
    pub(crate) settings: Settings,
    pub(crate) node_id: String,
    /// What the monitors know of each unfinished transfer.
    pub(crate) registry: Registry,
    pub(crate) nvme: NvmeIdentity,
    /// The kernel's NVMe/TCP target (exports) and host (sources).
    pub(crate) fabric: Arc<dyn Fabric>,
    pub(crate) metrics: Metrics,
    /// Asks source agents to drop their copies once a move here is done.
    pub(crate) source_releaser: Arc<dyn SourceReleaser>,
    pub(crate) background: Background,
    /// Volumes whose devices did not come back at start, and why.
    pub(crate) unsettled: Unsettled,
    /// Transfer ids aborted before their start was recorded.
    pub(crate) given_up: GivenUp,
}

/// Transfer ids aborted before any start had recorded them. A caller that
/// gave up on StartTransfer (its deadline passed while the source was
/// connecting) aborts the transfer it named, and that abort can overtake
/// the start: the start, on reaching its records, finds the id here and
/// stops instead of leaving a move nobody will commit or abort. In memory
/// only: a restart ends every start under way. Bounded, because any
/// caller may abort ids that never existed.
#[derive(Debug, Default)]
pub(crate) struct GivenUp(Mutex<BTreeMap<TransferId, Instant>>);

impl GivenUp {
    /// Long past any start's deadline.
    const KEEP: Duration = Duration::from_secs(600);
    const MOST: usize = 10_000;

    fn map(&self) -> MutexGuard<'_, BTreeMap<TransferId, Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn mark(&self, id: &TransferId) {
        let mut map = self.map();
        if map.len() >= Self::MOST {
            map.retain(|_, marked| marked.elapsed() < Self::KEEP);
        }
        if map.len() >= Self::MOST
            && let Some(oldest) = map.iter().min_by_key(|(_, marked)| **marked)
        {
            let oldest = oldest.0.clone();
            map.remove(&oldest);
        }
        map.insert(id.clone(), Instant::now());
    }

    /// Whether id was given up (and forgets it: one start stops).
    pub(crate) fn take(&self, id: &TransferId) -> bool {
        self.map().remove(id).is_some()
    }
}

/// Volumes reconciliation could not bring back for a reason that may pass;
/// in memory only, since every start looks again.
#[derive(Debug, Default)]
pub(crate) struct Unsettled(Mutex<BTreeMap<VolumeId, String>>);

impl Unsettled {
    fn map(&self) -> MutexGuard<'_, BTreeMap<VolumeId, String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn mark(&self, id: &VolumeId, reason: String) {
        self.map().insert(id.clone(), reason);
    }

    pub(crate) fn clear(&self, id: &VolumeId) {
        self.map().remove(id);
    }

    pub(crate) fn reason(&self, id: &VolumeId) -> Option<String> {
        self.map().get(id).cloned()
    }

    pub(crate) fn ids(&self) -> Vec<VolumeId> {
        self.map().keys().cloned().collect()
    }
}

/// This agent on NVMe/TCP.
#[derive(Debug, Clone)]
pub struct NvmeIdentity {
    pub host_nqn: Nqn,
    pub host_id: HostId,
}

/// The agent's own tasks (transfer monitors, source releases, the pool
/// watcher), kept so that stopping the agent stops them.
#[derive(Debug, Default)]
pub(crate) struct Background(std::sync::Mutex<Vec<tokio::task::AbortHandle>>);

impl Background {
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        let mut tasks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle);
    }

    pub(crate) fn stop(&self) {
        let mut tasks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl Context {
    /// Runs a store call on the blocking pool (commits fsync).
    pub(crate) async fn store_call<T, F>(&self, call: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, AgentError> + Send + 'static,
    {
        let store = self.store.clone();
        blocking(move || call(&store)).await
    }
}

pub(crate) async fn blocking<T, F>(call: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| AgentError::Internal(format!("a blocking task failed: {err}")))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn transfer_id(n: usize) -> TransferId {
        TransferId::parse(&format!("40000000-0000-4000-8000-{n:012}")).unwrap()
    }

    #[test]
    fn a_given_up_id_stops_one_start_and_the_marks_stay_bounded() {
        let given_up = GivenUp::default();
        assert!(!given_up.take(&transfer_id(0)), "never marked");
        for n in 0..=GivenUp::MOST {
            given_up.mark(&transfer_id(n));
        }
        assert_eq!(given_up.map().len(), GivenUp::MOST);
        assert!(!given_up.take(&transfer_id(0)), "the oldest made room");
        assert!(given_up.take(&transfer_id(GivenUp::MOST)));
        assert!(!given_up.take(&transfer_id(GivenUp::MOST)), "taken once");
    }
}
