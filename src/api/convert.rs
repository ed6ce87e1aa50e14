//! Domain values to wire messages: the only code that knows both.

use crate::{
    agent::NodeInfo,
    api::proto::v1 as pb,
    config::validate_region,
    error::AgentError,
    ids::SnapshotId,
    pool::PoolUsage,
    snapshot::SnapshotState,
    store::HistoryOrigin,
    transfer::{
        TransferState, TransferView,
        release::{
            DeltaAsk, DeltaChunk, ReturnTripAsk, ReturnTripDelta, SourceAnswer, TravellingSnapshot,
        },
    },
    volume::{Volume, VolumeState},
};

/// What a client shows for a wire state the agent never sends (the unset
/// zero value, or one from a newer agent).
const UNKNOWN_STATE: &str = "unknown";

fn transfer_state(state: TransferState) -> pb::TransferState {
    match state {
        TransferState::Connecting => pb::TransferState::Connecting,
        TransferState::Deferred => pb::TransferState::Deferred,
        TransferState::Hydrating => pb::TransferState::Hydrating,
        TransferState::Paused => pb::TransferState::Paused,
        TransferState::Finalizing => pb::TransferState::Finalizing,
        TransferState::Done => pb::TransferState::Done,
        TransferState::Degraded => pb::TransferState::Degraded,
        TransferState::Failed => pb::TransferState::Failed,
        TransferState::Aborted => pb::TransferState::Aborted,
    }
}

pub fn transfer_state_from_wire(state: pb::TransferState) -> Option<TransferState> {
    Some(match state {
        pb::TransferState::Unspecified => return None,
        pb::TransferState::Connecting => TransferState::Connecting,
        pb::TransferState::Deferred => TransferState::Deferred,
        pb::TransferState::Hydrating => TransferState::Hydrating,
        pb::TransferState::Paused => TransferState::Paused,
        pb::TransferState::Finalizing => TransferState::Finalizing,
        pb::TransferState::Done => TransferState::Done,
        pb::TransferState::Degraded => TransferState::Degraded,
        pb::TransferState::Failed => TransferState::Failed,
        pb::TransferState::Aborted => TransferState::Aborted,
    })
}

/// The domain's name of a transfer state received over the wire.
pub fn transfer_state_name(state: pb::TransferState) -> &'static str {
    transfer_state_from_wire(state).map_or(UNKNOWN_STATE, TransferState::as_str)
}

pub fn snapshot_state(state: SnapshotState) -> pb::SnapshotState {
    match state {
        SnapshotState::Creating => pb::SnapshotState::Creating,
        SnapshotState::Available => pb::SnapshotState::Available,
        SnapshotState::Deleting => pb::SnapshotState::Deleting,
        SnapshotState::Arriving => pb::SnapshotState::Arriving,
    }
}

/// The domain's name of a snapshot state received over the wire.
pub fn snapshot_state_name(state: pb::SnapshotState) -> &'static str {
    let state = match state {
        pb::SnapshotState::Unspecified => return UNKNOWN_STATE,
        pb::SnapshotState::Creating => SnapshotState::Creating,
        pb::SnapshotState::Available => SnapshotState::Available,
        pb::SnapshotState::Deleting => SnapshotState::Deleting,
        pb::SnapshotState::Arriving => SnapshotState::Arriving,
    };
    state.as_str()
}

fn volume_state(state: &VolumeState) -> pb::VolumeState {
    match state {
        VolumeState::Creating => pb::VolumeState::Creating,
        VolumeState::Available => pb::VolumeState::Available,
        VolumeState::Deleting => pb::VolumeState::Deleting,
        VolumeState::Quarantined(_) => pb::VolumeState::Quarantined,
        VolumeState::Degraded(_) => pb::VolumeState::Degraded,
        VolumeState::Hydrating => pb::VolumeState::Hydrating,
        VolumeState::Warm(_) => pb::VolumeState::Warm,
    }
}

/// The domain's name of a volume state received over the wire.
pub fn volume_state_name(state: pb::VolumeState) -> &'static str {
    let state = match state {
        pb::VolumeState::Unspecified => return UNKNOWN_STATE,
        pb::VolumeState::Creating => VolumeState::Creating,
        pb::VolumeState::Available => VolumeState::Available,
        pb::VolumeState::Deleting => VolumeState::Deleting,
        // The reason travels in its own field; the name does not need it.
        pb::VolumeState::Quarantined => VolumeState::Quarantined(String::new()),
        pb::VolumeState::Degraded => VolumeState::Degraded(String::new()),
        pb::VolumeState::Hydrating => VolumeState::Hydrating,
        pb::VolumeState::Warm => VolumeState::Warm(String::new()),
    };
    state.as_str()
}

pub fn transfer(view: TransferView) -> pb::Transfer {
    pb::Transfer {
        transfer_id: view.id.to_string(),
        volume_id: view.volume_id.to_string(),
        state: transfer_state(view.state).into(),
        regions_hydrated: view.regions_hydrated,
        regions_total: view.regions_total,
        bytes_hydrated: view.bytes_hydrated,
        bytes_total: view.bytes_total,
        bytes_per_second: view.bytes_per_second,
        eta_seconds: view.eta_seconds.unwrap_or(0),
        knobs: Some(pb::HydrationKnobs {
            region_bytes: u32::try_from(view.region_bytes).unwrap_or(u32::MAX),
            hydration_threshold: view.hydration_threshold,
            hydration_batch_size: view.hydration_batch_size,
            max_bytes_per_second: view.max_bytes_per_second,
        }),
        device_path: view.device_path.display().to_string(),
        message: view.message,
        finalize_pause_micros: view.finalize_pause_micros.unwrap_or(0),
        done_to_finalized_micros: view.done_to_finalized_micros.unwrap_or(0),
        source_released: view.source_released,
        deferred: view.deferred,
        source: view.source,
        upstream: view.upstream,
        passed_on_to: view.passed_on_to.unwrap_or_default(),
        bytes_skipped: view.bytes_skipped,
        snapshots_total: view.snapshots_total,
        snapshots_arrived: view.snapshots_arrived,
        snapshot_bytes_received: view.snapshot_bytes_received,
    }
}

/// A return trip's question as the domain takes it, checked: a peer may
/// send anything.
pub fn return_trip_ask(ask: pb::ReturnTripAsk) -> Result<ReturnTripAsk, AgentError> {
    let invalid = |field, reason: String| AgentError::InvalidArgument { field, reason };
    if ask.origin_node_id.is_empty() || ask.origin_node_id.len() > 64 {
        return Err(invalid(
            "return_trip.origin_node_id",
            "must be the asking node's id (1 to 64 characters)".into(),
        ));
    }
    if ask.origin_history == 0 {
        return Err(invalid(
            "return_trip.origin_history",
            "must be the copy's history tag (never 0)".into(),
        ));
    }
    validate_region("return_trip.region_bytes", ask.region_bytes)
        .map_err(|err| invalid("return_trip.region_bytes", err.to_string()))?;
    Ok(ReturnTripAsk {
        origin: HistoryOrigin {
            node_id: ask.origin_node_id,
            history: ask.origin_history,
        },
        region_bytes: ask.region_bytes,
    })
}

pub fn return_trip_ask_message(ask: &ReturnTripAsk) -> pb::ReturnTripAsk {
    pb::ReturnTripAsk {
        origin_node_id: ask.origin.node_id.clone(),
        origin_history: ask.origin.history,
        region_bytes: ask.region_bytes,
    }
}

pub fn claim_response(answer: SourceAnswer) -> pb::ClaimExportResponse {
    pb::ClaimExportResponse {
        upstream: answer.upstream,
        history: answer.history.unwrap_or(0),
        return_trip: answer.return_trip.map(|delta| match delta {
            ReturnTripDelta::Changed(ranges) => pb::ReturnTripDelta {
                changed: ranges
                    .into_iter()
                    .map(|range| pb::Extent {
                        offset_bytes: range.start,
                        length_bytes: range.end - range.start,
                    })
                    .collect(),
                whole_copy_reason: String::new(),
            },
            ReturnTripDelta::WholeCopy(reason) => pb::ReturnTripDelta {
                changed: Vec::new(),
                whole_copy_reason: reason,
            },
        }),
        snapshots: answer
            .snapshots
            .into_iter()
            .map(|s| pb::TravellingSnapshot {
                snapshot_id: s.id.to_string(),
                size_bytes: s.size_bytes,
                created_unix_seconds: s.created_unix,
            })
            .collect(),
    }
}

/// Past this many, a source's list of snapshots is not believed: none travel.
const MAX_TRAVELLING_SNAPSHOTS: usize = 4096;

/// A claim's answer in the domain's terms; history tag 0 is "none".
pub fn source_answer(answer: pb::ClaimExportResponse) -> SourceAnswer {
    SourceAnswer {
        upstream: answer.upstream,
        history: (answer.history != 0).then_some(answer.history),
        return_trip: answer.return_trip.map(|delta| {
            if delta.whole_copy_reason.is_empty() {
                ReturnTripDelta::Changed(
                    delta
                        .changed
                        .iter()
                        .map(|e| e.offset_bytes..e.offset_bytes.saturating_add(e.length_bytes))
                        .collect(),
                )
            } else {
                ReturnTripDelta::WholeCopy(delta.whole_copy_reason)
            }
        }),
        snapshots: travelling_snapshots(answer.snapshots),
    }
}

/// The snapshots a source offers, those with valid ids; none from a source
/// that lists implausibly many.
fn travelling_snapshots(offered: Vec<pb::TravellingSnapshot>) -> Vec<TravellingSnapshot> {
    if offered.len() > MAX_TRAVELLING_SNAPSHOTS {
        return Vec::new();
    }
    offered
        .into_iter()
        .filter_map(|s| {
            Some(TravellingSnapshot {
                id: SnapshotId::parse(&s.snapshot_id).ok()?,
                size_bytes: s.size_bytes,
                created_unix: s.created_unix_seconds,
            })
        })
        .collect()
}

/// A destination's request for a snapshot's delta, checked for shape (the
/// source checks the rest against its records).
pub fn delta_ask(request: &pb::ReadSnapshotDeltaRequest) -> Result<DeltaAsk, AgentError> {
    let invalid = |field, reason: String| AgentError::InvalidArgument { field, reason };
    let against = match request.against_snapshot_id.as_str() {
        "" => None,
        id => Some(SnapshotId::parse(id)?),
    };
    let also = request
        .also
        .iter()
        .map(|e| {
            e.offset_bytes
                .checked_add(e.length_bytes)
                .map(|end| e.offset_bytes..end)
                .ok_or_else(|| invalid("also", format!("{e:?} ends past 2^64")))
        })
        .collect::<Result<_, _>>()?;
    Ok(DeltaAsk {
        snapshot: SnapshotId::parse(&request.snapshot_id)?,
        against,
        block_bytes: request.block_bytes,
        also,
        everything: request.everything,
    })
}

pub fn delta_request_message(
    volume_id: &str,
    host_nqn: &str,
    release_token: String,
    ask: &DeltaAsk,
) -> pb::ReadSnapshotDeltaRequest {
    pb::ReadSnapshotDeltaRequest {
        volume_id: volume_id.to_owned(),
        host_nqn: host_nqn.to_owned(),
        release_token,
        snapshot_id: ask.snapshot.to_string(),
        against_snapshot_id: ask
            .against
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        block_bytes: ask.block_bytes,
        also: ask
            .also
            .iter()
            .map(|r| pb::Extent {
                offset_bytes: r.start,
                length_bytes: r.end - r.start,
            })
            .collect(),
        everything: ask.everything,
    }
}

pub fn delta_chunk(chunk: DeltaChunk) -> pb::SnapshotDeltaChunk {
    pb::SnapshotDeltaChunk {
        offset_bytes: chunk.offset,
        data: chunk.data,
    }
}

pub fn volume(volume: Volume) -> pb::Volume {
    pb::Volume {
        volume_id: volume.id.to_string(),
        size_bytes: volume.size_bytes,
        state: volume_state(&volume.state).into(),
        device_path: volume
            .device_path
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        published: volume.published,
        allocated_bytes: volume.allocated_bytes.unwrap_or(0),
        source_snapshot_id: volume.source_snapshot.map(String::from).unwrap_or_default(),
        source_volume_id: volume.source_volume.map(String::from).unwrap_or_default(),
        change_tracking: volume.change_tracking,
        state_reason: match volume.state {
            VolumeState::Quarantined(reason)
            | VolumeState::Degraded(reason)
            | VolumeState::Warm(reason) => reason,
            _ => String::new(),
        },
    }
}

pub fn node_info(info: NodeInfo) -> pb::NodeInfo {
    let (major, minor, patch) = info.dm_ioctl_version;
    pb::NodeInfo {
        node_id: info.node_id,
        hostname: info.hostname,
        agent_version: info.agent_version.to_owned(),
        api_version: info.api_version.to_owned(),
        kernel_release: info.kernel_release,
        dm_ioctl_version: format!("{major}.{minor}.{patch}"),
        targets: info
            .targets
            .into_iter()
            .map(|t| pb::TargetVersion {
                name: t.name,
                major: t.version.0,
                minor: t.version.1,
                patch: t.version.2,
            })
            .collect(),
        pool: Some(pool(info.pool, info.provisioned_bytes, info.volume_count)),
        host_nqn: info.host_nqn,
    }
}

fn pool(usage: PoolUsage, provisioned_bytes: u64, volume_count: usize) -> pb::PoolUsage {
    pb::PoolUsage {
        data_total_bytes: usage.data_total_bytes,
        data_used_bytes: usage.data_used_bytes,
        metadata_total_bytes: usage.metadata_total_bytes,
        metadata_used_bytes: usage.metadata_used_bytes,
        low_space: usage.low_space,
        health: usage.health.as_str().to_owned(),
        provisioned_bytes,
        volume_count: volume_count as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_states_carry_the_domain_names() {
        for state in [
            VolumeState::Creating,
            VolumeState::Available,
            VolumeState::Deleting,
            VolumeState::Hydrating,
            VolumeState::Quarantined("metadata differs".into()),
            VolumeState::Degraded("the pool refused".into()),
        ] {
            assert_eq!(volume_state_name(volume_state(&state)), state.as_str());
        }
        for state in [
            TransferState::Connecting,
            TransferState::Deferred,
            TransferState::Hydrating,
            TransferState::Paused,
            TransferState::Finalizing,
            TransferState::Done,
            TransferState::Degraded,
            TransferState::Failed,
            TransferState::Aborted,
        ] {
            assert_eq!(transfer_state_name(transfer_state(state)), state.as_str());
        }
        for state in [
            SnapshotState::Creating,
            SnapshotState::Available,
            SnapshotState::Deleting,
            SnapshotState::Arriving,
        ] {
            assert_eq!(snapshot_state_name(snapshot_state(state)), state.as_str());
        }
        assert_eq!(
            snapshot_state_name(pb::SnapshotState::Unspecified),
            "unknown"
        );
        assert_eq!(volume_state_name(pb::VolumeState::Unspecified), "unknown");
        assert_eq!(
            transfer_state_name(pb::TransferState::Unspecified),
            "unknown"
        );
    }
}
