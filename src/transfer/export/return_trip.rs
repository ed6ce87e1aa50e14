//! The source's half of a return trip: a destination that kept an older
//! copy of the volume asks what changed since the volume left it, and this
//! host answers from its change history when that history began with the
//! very copy, else says why it cannot.

use std::{ops::Range, sync::Arc};

use super::Exports;
use crate::{
    changes::Changes,
    ids::VolumeId,
    transfer::release::{ReturnTripAsk, ReturnTripDelta},
};

/// Past this many changed ranges a return trip copies the whole volume: the
/// answer must fit one gRPC message (16 bytes a range, 4 MiB a message),
/// and writes this scattered leave little to skip.
pub(crate) const MAX_CHANGED_RANGES: usize = 128 * 1024;

impl Exports {
    /// What a return trip onto `ask`'s copy must copy of volume `id`.
    pub(super) async fn return_trip_delta(
        &self,
        id: &VolumeId,
        ask: &ReturnTripAsk,
    ) -> ReturnTripDelta {
        match self.changed_since_origin(id, ask).await {
            Ok(ranges) => ReturnTripDelta::Changed(ranges),
            Err(reason) => ReturnTripDelta::WholeCopy(reason),
        }
    }

    async fn changed_since_origin(
        &self,
        id: &VolumeId,
        ask: &ReturnTripAsk,
    ) -> Result<Vec<Range<u64>>, String> {
        let node = &self.ctx.node_id;
        let record = self
            .ctx
            .record(id)
            .await
            .map_err(|err| err.to_string())?
            .ok_or_else(|| format!("volume {id} is no longer on {node}"))?;
        if record.tracking.is_none() {
            return Err(format!("volume {id} tracks no changes on {node}"));
        }
        let before = record
            .export
            .as_ref()
            .and_then(|export| export.history_before.as_ref())
            .filter(|before| before.origin == ask.origin)
            .ok_or_else(|| {
                format!(
                    "volume {id}'s history on {node} does not begin with the copy on {} (it \
                     came from elsewhere, or was reverted or restarted before this export)",
                    ask.origin.node_id
                )
            })?;
        let changes = Changes::new(Arc::clone(&self.ctx))
            .written_since_kernel_era(id, before.from_era)
            .await
            .map_err(|err| format!("{node} cannot read what changed: {err}"))?;
        let ranges = whole_regions(
            changes
                .extents()
                .map(|e| e.offset_bytes..e.offset_bytes + e.length_bytes),
            ask.region_bytes,
        );
        if ranges.len() > MAX_CHANGED_RANGES {
            return Err(format!(
                "{} separate changed ranges: too scattered to skip the rest",
                ranges.len()
            ));
        }
        Ok(ranges)
    }
}

/// Byte ranges widened to whole regions of `region_bytes` and merged where
/// they meet; `ranges` must be in order.
pub(crate) fn whole_regions(
    ranges: impl Iterator<Item = Range<u64>>,
    region_bytes: u64,
) -> Vec<Range<u64>> {
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in ranges.filter(|r| r.start < r.end) {
        let start = range.start / region_bytes * region_bytes;
        let end = range.end.div_ceil(region_bytes) * region_bytes;
        match merged.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => merged.push(start..end),
        }
    }
    merged
}

#[cfg(test)]
// Ranges of bytes, one or many, are the point here.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn ranges_widen_to_whole_regions_and_merge_where_they_meet() {
        let region = 64;
        let ranges = [0..1, 10..20, 64..65, 200..300, 320..321, 1000..1000];
        assert_eq!(
            whole_regions(ranges.into_iter(), region),
            vec![0..128, 192..384]
        );
        assert_eq!(whole_regions(std::iter::empty(), region), vec![]);
        assert_eq!(
            whole_regions([128..192].into_iter(), region),
            vec![128..192]
        );
    }
}
