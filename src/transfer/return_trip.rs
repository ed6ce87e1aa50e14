//! The destination's half of a return trip: a volume moves back onto a
//! host that kept its copy (a warm copy). The clone lands on that copy's
//! thin device instead of an empty one, with discards not passed down;
//! before hydration starts, the source says which regions changed since
//! the volume left, and every other region is discarded on the clone,
//! which marks it held without copying it. Nothing else changes: a region
//! not discarded is copied as in any move, so whenever the source cannot
//! tell (a revert, a copy from elsewhere, an older agent, no answer) the
//! move copies everything and says why.

use std::ops::Range;

use tracing::{info, warn};

use super::{
    Source, StartRequest, Transfers,
    release::{ReturnTripAsk, ReturnTripDelta, SourceAnswer},
};
use crate::{
    error::AgentError,
    store::{HistoryOrigin, ReturnTrip, TransferRecord, VolumeRecord},
};

impl Transfers {
    /// The return trip `request` makes onto `copy`, this host's warm copy
    /// of the volume, or why it cannot land on it.
    pub(super) async fn landing_on(
        &self,
        copy: &VolumeRecord,
        request: &StartRequest,
        size: u64,
    ) -> Result<Result<ReturnTrip, String>, AgentError> {
        let Some(tracking) = &copy.tracking else {
            return Ok(Err("the copy kept here tracks no changes".into()));
        };
        if self.ctx.settings.change_block_bytes.is_none() {
            return Ok(Err(
                "this host tracks no changes any more (change_block_size)".into(),
            ));
        }
        let asks_agent = matches!(
            &request.source,
            Source::NvmeTcp { agent_endpoint, release_token: Some(_), .. } if !agent_endpoint.is_empty()
        );
        if !asks_agent {
            return Ok(Err(
                "the source is not another agent's export with a release token: nothing can \
                 say what changed"
                    .into(),
            ));
        }
        if copy.size_bytes > size {
            return Ok(Err(format!(
                "the copy kept here ({} bytes) is larger than the volume ({size} bytes)",
                copy.size_bytes
            )));
        }
        if copy.pending.is_some() || copy.quarantine.is_some() {
            return Ok(Err("the copy kept here is not at rest".into()));
        }
        Ok(Ok(ReturnTrip {
            history: tracking.history,
            copy_bytes: copy.size_bytes,
            skipped_bytes: None,
        }))
    }

    /// Before hydration starts: asks the source what changed since the
    /// volume left this host, and discards every other region of the copy
    /// it lands on. Once answered (recorded in the transfer) never again:
    /// a resume after a pause copies on. Discarding is idempotent, so a
    /// crash before the answer is recorded asks and discards again.
    pub(super) async fn skip_unchanged(
        &self,
        transfer: &mut TransferRecord,
    ) -> Result<(), AgentError> {
        let Some(answer) = self.ask_what_changed(transfer).await else {
            return Ok(());
        };
        self.skip_as_answered(transfer, answer).await
    }

    /// Claims the source's export with the return trip's question, when
    /// one is still to be asked, and returns the answer.
    pub(super) async fn ask_what_changed(
        &self,
        transfer: &TransferRecord,
    ) -> Option<Result<SourceAnswer, AgentError>> {
        let ask = self.what_changed_ask(transfer)?;
        Some(self.claim_asking(transfer, Some(ask)).await)
    }

    /// The question a return trip still has to ask its source (none once
    /// answered, nor for any other move).
    fn what_changed_ask(&self, transfer: &TransferRecord) -> Option<ReturnTripAsk> {
        let trip = transfer.return_trip.as_ref()?;
        if trip.skipped_bytes.is_some() {
            return None;
        }
        Some(ReturnTripAsk {
            origin: HistoryOrigin {
                node_id: self.ctx.node_id.clone(),
                history: trip.history,
            },
            region_bytes: transfer.region_bytes,
        })
    }

    /// Discards what the source's `answer` to [`Self::ask_what_changed`]
    /// says is unchanged, on the clone of `transfer`, which must exist; an
    /// answer that is missing, failed or unusable copies everything.
    pub(super) async fn skip_as_answered(
        &self,
        transfer: &mut TransferRecord,
        answer: Result<SourceAnswer, AgentError>,
    ) -> Result<(), AgentError> {
        let Some(mut trip) = transfer.return_trip.clone() else {
            return Ok(());
        };
        let delta = match answer {
            Ok(answer) => answer.return_trip.unwrap_or_else(|| {
                ReturnTripDelta::WholeCopy("the source does not answer return trips".into())
            }),
            Err(err) => {
                ReturnTripDelta::WholeCopy(format!("the source could not say what changed: {err}"))
            }
        };
        let delta = match delta {
            ReturnTripDelta::Changed(changed) => match malformed(&changed, transfer.region_bytes) {
                Some(why) => {
                    ReturnTripDelta::WholeCopy(format!("the source's answer is not usable ({why})"))
                }
                None => ReturnTripDelta::Changed(changed),
            },
            whole => whole,
        };
        let skipped = match delta {
            ReturnTripDelta::Changed(changed) => {
                let held = held_bytes(&trip, transfer);
                let unchanged = unchanged_ranges(&changed, held);
                let skipped = unchanged.iter().map(|r| r.end - r.start).sum();
                self.ctx
                    .dm
                    .discard(&self.ctx.clone_device(transfer), unchanged)
                    .await?;
                self.ctx
                    .registry
                    .with_live(&transfer.id, |live| live.progress.forget_rate());
                transfer.message = format!(
                    "return trip: {skipped} of {} bytes are unchanged on the copy kept here and \
                     are not copied",
                    transfer.clone_bytes
                );
                info!(transfer = %transfer.id, skipped, changed_ranges = changed.len(), "return trip: only what changed is copied");
                skipped
            }
            ReturnTripDelta::WholeCopy(reason) => {
                transfer.message = format!("full copy: {reason}");
                warn!(transfer = %transfer.id, %reason, "return trip copies the whole volume");
                0
            }
        };
        trip.skipped_bytes = Some(skipped);
        transfer.return_trip = Some(trip);
        Ok(())
    }
}

/// Bytes at the start of the clone held by the copy in whole regions: a
/// region the copy holds only part of is copied.
fn held_bytes(trip: &ReturnTrip, transfer: &TransferRecord) -> u64 {
    let region = transfer.region_bytes.max(1);
    trip.copy_bytes.min(transfer.clone_bytes) / region * region
}

/// Why an answer's changed ranges cannot be used as they are, if they
/// cannot: they must be whole regions, in order, not overlapping.
fn malformed(changed: &[Range<u64>], region_bytes: u64) -> Option<String> {
    let mut end = 0;
    for range in changed {
        if range.start % region_bytes != 0 || range.end % region_bytes != 0 {
            return Some(format!(
                "{range:?} is not whole regions of {region_bytes} bytes"
            ));
        }
        if range.start >= range.end || range.start < end {
            return Some(format!("{range:?} is empty, out of order or overlapping"));
        }
        end = range.end;
    }
    None
}

/// `[0, held)` without the `changed` ranges (in order, whole regions).
pub(crate) fn unchanged_ranges(changed: &[Range<u64>], held: u64) -> Vec<Range<u64>> {
    let mut unchanged = Vec::new();
    let mut at = 0;
    for range in changed {
        let start = range.start.min(held);
        if start > at {
            unchanged.push(at..start);
        }
        at = at.max(range.end);
        if at >= held {
            return unchanged;
        }
    }
    if at < held {
        unchanged.push(at..held);
    }
    unchanged
}

#[cfg(test)]
// Ranges of bytes, one or many, are the point here.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_ranges_are_the_held_bytes_around_the_changed_ones() {
        assert_eq!(unchanged_ranges(&[], 100), vec![0..100]);
        assert_eq!(unchanged_ranges(&[0..100], 100), vec![]);
        assert_eq!(
            unchanged_ranges(&[10..20, 40..50], 100),
            vec![0..10, 20..40, 50..100]
        );
        // Changes past what the copy holds leave its end as it is.
        assert_eq!(unchanged_ranges(&[90..200], 100), vec![0..90]);
        assert_eq!(unchanged_ranges(&[120..200], 100), vec![0..100]);
        assert_eq!(unchanged_ranges(&[0..10], 0), vec![]);
    }

    #[test]
    fn only_whole_regions_in_order_are_taken_from_a_source() {
        assert_eq!(malformed(&[0..64, 128..192], 64), None);
        assert_eq!(malformed(&[0..64, 64..128], 64), None);
        assert_eq!(malformed(&[], 64), None);
        for bad in [
            vec![0..10],
            vec![64..64],
            vec![128..192, 0..64],
            vec![0..128, 64..192],
        ] {
            assert!(malformed(&bad, 64).is_some(), "{bad:?}");
        }
    }
}
