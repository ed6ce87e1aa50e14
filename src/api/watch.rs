//! WatchTransfers streams: how many one caller may hold, and how a stream
//! ends. A stream that falls behind the agent's updates reads the current
//! state again instead of skipping what it missed (a watch of one transfer
//! must see its final state, or it would never end), and a stream whose
//! client went away ends at once instead of waiting for the next update.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::{
    agent::Agent,
    api::{convert, proto::v1 as pb},
    error::AgentError,
    ids::TransferId,
    transfer::{TransferState, TransferView},
};

/// Open streams per caller.
#[derive(Debug, Default, Clone)]
pub struct Watchers {
    open: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// One open stream; the count goes down when it is dropped.
#[derive(Debug)]
pub struct WatchSlot {
    watchers: Watchers,
    caller: String,
}

impl Watchers {
    /// A slot for `caller`'s new stream, or RESOURCE_EXHAUSTED once it holds
    /// `max` of them.
    pub fn admit(&self, caller: &str, max: usize) -> Result<WatchSlot, Status> {
        let mut open = self.lock();
        let count = open.entry(caller.to_owned()).or_default();
        if *count >= max {
            return Err(Status::resource_exhausted(format!(
                "{caller} already holds {count} WatchTransfers streams, the most one caller may \
                 (limits.max_watches_per_caller); close one first"
            )));
        }
        *count += 1;
        Ok(WatchSlot {
            watchers: self.clone(),
            caller: caller.to_owned(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    #[cfg(test)]
    fn held_by(&self, caller: &str) -> usize {
        self.lock().get(caller).copied().unwrap_or(0)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watchers.lock();
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

type Sender = mpsc::Sender<Result<pb::Transfer, Status>>;

fn is_final(state: TransferState) -> bool {
    matches!(
        state,
        TransferState::Done | TransferState::Failed | TransferState::Aborted
    )
}

/// The transfers a stream shows now: one, or all. Subscribe to the updates
/// before reading these, so nothing falls between.
pub async fn current(
    agent: &Agent,
    only: Option<&TransferId>,
) -> Result<Vec<TransferView>, AgentError> {
    match only {
        Some(id) => Ok(vec![agent.transfers.get_transfer(id).await?]),
        None => agent.transfers.list_transfers().await,
    }
}

/// Sends views; `false` once the stream is over (its client left, or the
/// one transfer it watches reached its final state).
async fn send_all(tx: &Sender, only: Option<&TransferId>, views: Vec<TransferView>) -> bool {
    for view in views {
        if only.is_some_and(|id| view.id != id.as_str()) {
            continue;
        }
        let done = only.is_some() && is_final(view.state);
        if tx.send(Ok(convert::transfer(view))).await.is_err() || done {
            return false;
        }
    }
    true
}

/// Feeds one stream until it is over; `slot` is held as long.
pub async fn feed(
    agent: Arc<Agent>,
    only: Option<TransferId>,
    mut updates: broadcast::Receiver<TransferView>,
    first: Vec<TransferView>,
    tx: Sender,
    slot: WatchSlot,
) {
    let _slot = slot;
    if !send_all(&tx, only.as_ref(), first).await {
        return;
    }
    loop {
        let views = tokio::select! {
            () = tx.closed() => return,
            update = updates.recv() => match update {
                Ok(view) => vec![view],
                // Missed updates: what is current now replaces them.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match current(&agent, only.as_ref()).await {
                        Ok(views) => views,
                        Err(err) => {
                            let _ = tx.send(Err(crate::api::status::status_of(&err))).await;
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if !send_all(&tx, only.as_ref(), views).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A stream that fell behind while its transfer finished still ends,
    /// with the final state.
    #[tokio::test]
    async fn a_lagging_stream_of_one_transfer_still_sees_its_end() {
        let host = crate::testing::TestHost::new();
        let (agent, transfer) = crate::testing::finished_transfer(&host).await;
        let done = agent.transfers.get_transfer(&transfer).await.unwrap();
        assert_eq!(done.state, TransferState::Done);
        let (updates_tx, updates) = broadcast::channel(2);
        let mut stale = done.clone();
        stale.state = TransferState::Hydrating;
        for _ in 0..10 {
            updates_tx.send(stale.clone()).unwrap();
        }
        let (tx, mut rx) = mpsc::channel(4);
        let slot = Watchers::default().admit("test", 1).unwrap();
        let fed = tokio::spawn(feed(agent, Some(transfer), updates, Vec::new(), tx, slot));
        let mut states = Vec::new();
        while let Some(view) = rx.recv().await {
            states.push(view.unwrap().state());
        }
        fed.await.unwrap();
        assert_eq!(states.last(), Some(&pb::TransferState::Done), "{states:?}");
    }

    #[test]
    fn a_caller_holds_at_most_its_share_and_a_closed_stream_frees_its_slot() {
        let watchers = Watchers::default();
        let first = watchers.admit("reader a", 2).expect("first");
        let second = watchers.admit("reader a", 2).expect("second");
        let refused = watchers.admit("reader a", 2).expect_err("third");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("reader a"), "{refused:?}");
        assert!(
            watchers.admit("reader b", 2).is_ok(),
            "others are not held back"
        );
        drop(first);
        assert_eq!(watchers.held_by("reader a"), 1);
        let _third = watchers.admit("reader a", 2).expect("a freed slot");
        drop(second);
        assert_eq!(watchers.held_by("reader a"), 1);
    }
}
