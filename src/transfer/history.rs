//! Finished transfers: how long they are kept, and listing transfers a page
//! at a time, so neither the store nor an answer grows without bound.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{TransferState, TransferView, Transfers};
use crate::{
    error::AgentError,
    ids::{TransferId, VolumeId},
    store::{TransferRecord, VolumeRecord},
};

/// The most transfers one page holds, and the size of a page not asked for.
pub const MAX_PAGE: usize = 1000;
/// How often finished transfers past their keeping are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Which transfers a caller lists, and from where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferQuery {
    pub volume: Option<VolumeId>,
    /// Empty: every state.
    pub states: Vec<TransferState>,
    /// The last id of the previous page.
    pub after: Option<TransferId>,
    /// 0: [`MAX_PAGE`].
    pub page_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransferPage {
    pub transfers: Vec<TransferView>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<TransferId>,
}

/// How many finished transfers are kept, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeping {
    pub seconds: u64,
    pub count: usize,
}

/// The page of `views` the query asks for, in id order.
pub fn page(mut views: Vec<TransferView>, query: &TransferQuery) -> TransferPage {
    let size = match query.page_size {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    };
    views.retain(|view| {
        query.volume.as_ref().is_none_or(|v| view.volume_id == *v)
            && (query.states.is_empty() || query.states.contains(&view.state))
            && query
                .after
                .as_ref()
                .is_none_or(|after| view.id.as_str() > after.as_str())
    });
    views.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    let next = (views.len() > size).then(|| views[size - 1].id.clone());
    views.truncate(size);
    TransferPage {
        transfers: views,
        next,
    }
}

/// Finished transfers past their keeping: older than `keep.seconds`, or
/// beyond the newest `keep.count`. A done move whose source has not yet
/// confirmed its release is kept, since its record drives the asking.
pub fn past_keeping(records: &[TransferRecord], now: i64, keep: Keeping) -> Vec<TransferId> {
    let mut finished: Vec<(i64, &TransferId)> = records
        .iter()
        .filter(|record| forgettable(record, None))
        .filter_map(|record| Some((record.finished_unix?, &record.id)))
        .collect();
    // Newest first; ties by id so the choice is stable.
    finished.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.as_str().cmp(b.1.as_str())));
    let oldest_kept = now.saturating_sub(i64::try_from(keep.seconds).unwrap_or(i64::MAX));
    finished
        .iter()
        .enumerate()
        .filter(|(rank, (finished, _))| *rank >= keep.count || *finished < oldest_kept)
        .map(|(_, (_, id))| (*id).clone())
        .collect()
}

/// Whether a finished transfer's record has no work left to drive. A finish
/// the agent has yet to complete (an abort or a done move cut by a crash)
/// leaves the volume naming the transfer; the next start needs the record.
fn forgettable(record: &TransferRecord, volume: Option<&VolumeRecord>) -> bool {
    record.phase.is_finished()
        && !awaits_release(record)
        && volume.is_none_or(|volume| volume.transfer.as_ref() != Some(&record.id))
}

fn awaits_release(record: &TransferRecord) -> bool {
    record.phase == crate::store::TransferPhase::Done && record.source_to_release().is_some()
}

impl Transfers {
    pub async fn list_page(&self, query: &TransferQuery) -> Result<TransferPage, AgentError> {
        Ok(page(self.ctx.list_transfers().await?, query))
    }

    /// Forgets finished transfers past their keeping; returns how many.
    pub async fn forget_finished(&self, now: i64) -> Result<usize, AgentError> {
        let keep = self.keeping();
        let forgotten = self
            .ctx
            .store_call(move |store| {
                let chosen = past_keeping(&store.all::<TransferRecord>()?, now, keep);
                // Judged again in the removing transaction: a retried
                // StartTransfer may have reused an id meanwhile.
                store.remove_transfers_if(&chosen, forgettable)
            })
            .await?;
        if forgotten > 0 {
            info!(
                forgotten,
                keep_seconds = keep.seconds,
                keep_count = keep.count,
                "forgot finished transfers past their keeping"
            );
        }
        Ok(forgotten)
    }

    fn keeping(&self) -> Keeping {
        let settings = &self.ctx.settings.transfer;
        Keeping {
            seconds: settings.keep_finished_seconds,
            count: settings.keep_finished as usize,
        }
    }

    /// Forgets finished transfers, and drops warm copies past their
    /// keeping, now and then, for as long as the agent lives.
    pub(crate) fn spawn_forgetting(&self) {
        let weak = Arc::downgrade(&self.ctx);
        self.ctx.background.spawn(async move {
            loop {
                let Some(ctx) = weak.upgrade() else { return };
                let now = crate::records::unix_now();
                let volumes = crate::volume::Volumes::new(Arc::clone(&ctx));
                if let Err(err) = volumes.drop_expired_warm_copies(now).await {
                    warn!(error = %err, "cannot drop expired warm copies; trying again later");
                }
                let transfers = Transfers::new(ctx);
                if let Err(err) = transfers.forget_finished(now).await {
                    warn!(error = %err, "cannot forget finished transfers; trying again later");
                }
                drop((volumes, transfers));
                tokio::time::sleep(SWEEP_EVERY).await;
            }
        });
    }
}

#[cfg(test)]
mod tests;
