//! Per-id serialization: calls on one volume run one at a time, calls on
//! different volumes run in parallel. One mutex per id (never a fixed set of
//! shards, which would make unrelated volumes wait on each other); entries go
//! away once nobody holds or waits for them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Debug, Default)]
pub struct Locks {
    entries: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

/// Held while one call works on one id.
#[derive(Debug)]
pub struct Held {
    _guard: OwnedMutexGuard<()>,
}

impl Locks {
    /// Waits for the lock of `id`.
    pub async fn lock(&self, id: impl AsRef<str>) -> Held {
        let mutex = self.mutex_for(id.as_ref());
        Held {
            _guard: mutex.lock_owned().await,
        }
    }

    /// Waits for the locks of several ids, taken in sorted order so that two
    /// calls naming the same ids can never wait for each other.
    pub async fn lock_all(&self, ids: &[&str]) -> Vec<Held> {
        let mut ids: Vec<&str> = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut held = Vec::with_capacity(ids.len());
        for id in ids {
            held.push(self.lock(id).await);
        }
        held
    }

    fn mutex_for(&self, id: &str) -> Arc<AsyncMutex<()>> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(live) = entries.get(id).and_then(Weak::upgrade) {
            return live;
        }
        entries.retain(|_, weak| weak.strong_count() > 0);
        let fresh = Arc::new(AsyncMutex::new(()));
        entries.insert(id.to_owned(), Arc::downgrade(&fresh));
        fresh
    }

    /// Ids with a live lock entry (for tests).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|weak| weak.strong_count() > 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_id_runs_one_call_at_a_time_and_others_run_alongside() {
        let locks = Arc::new(Locks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (locks, inside, most_inside) = (locks.clone(), inside.clone(), most_inside.clone());
            tasks.push(tokio::spawn(async move {
                let _held = locks.lock("a").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // While "a" is busy, "b" is not blocked by it.
        let _a = tokio::time::timeout(Duration::from_secs(5), locks.lock("b"))
            .await
            .expect("a lock on another id must not wait");
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(most_inside.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn entries_are_dropped_when_unused() {
        let locks = Locks::default();
        {
            let _a = locks.lock("a").await;
            let _b = locks.lock("b").await;
            assert_eq!(locks.len(), 2);
        }
        assert!(locks.is_empty());
    }
}
