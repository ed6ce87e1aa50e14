//! Refusals: a call the agent will not carry out because of an object's state.
//!
//! Each variant is one reason, carries the ids involved and renders the
//! operator's message. [`Refusal::reason`] is the stable code a program acts
//! on (the API sends it as `google.rpc.ErrorInfo.reason`, with
//! [`Refusal::metadata`] as its metadata); the message is for people and may
//! change.

use std::path::PathBuf;

use crate::{
    ids::{SnapshotId, TransferId, VolumeId},
    transfer::phase::TransferPhase,
};

/// Why a call is refused. The caller has to change the state first (unpublish,
/// detach, wait for a transfer, ask an operator), then retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The volume's public device is present; `hint` says what to do.
    #[error("volume {volume} is published at {}; {hint}", device.display())]
    VolumePublished {
        volume: VolumeId,
        device: PathBuf,
        hint: &'static str,
    },

    /// Snapshots of the volume keep it (they share its blocks).
    #[error(
        "volume {volume} has {} snapshot(s) ({}); delete them first",
        snapshots.len(),
        joined(snapshots, ", ")
    )]
    VolumeHasSnapshots {
        volume: VolumeId,
        snapshots: Vec<SnapshotId>,
    },

    /// The volume is exported over NVMe/TCP to the host it moves to.
    #[error("volume {volume} is exported to {host_nqn} for a move; {hint}")]
    VolumeExported {
        volume: VolumeId,
        host_nqn: String,
        hint: &'static str,
    },

    /// A release asked by a host other than the one the volume moves to.
    #[error("volume {volume} is exported to {host_nqn}, not to {requester}; the copy stays")]
    VolumeExportedElsewhere {
        volume: VolumeId,
        host_nqn: String,
        requester: String,
    },

    /// An unexport without the release token of the move the export
    /// serves: that move's destination would lose its source.
    #[error(
        "volume {volume} is exported to {host_nqn} as the source of a move; give the export's \
         release token (the destination does after an abort), or force it if that move is over"
    )]
    ExportForTransfer { volume: VolumeId, host_nqn: String },

    /// A release of a copy that was not exported for a move: nobody was
    /// given a token that could release it.
    #[error("volume {volume} {why}, so no host may release it; the copy stays")]
    ExportNotForTransfer { volume: VolumeId, why: &'static str },

    /// The volume is still arriving here by a transfer (hydrating or about to).
    #[error("volume {volume} is still arriving by transfer {transfer}; {hint}")]
    VolumeArriving {
        volume: VolumeId,
        transfer: TransferId,
        hint: &'static str,
    },

    /// Moving a volume that is still arriving would make its chain of
    /// moves in flight longer than `transfer.max_chain_depth`.
    #[error(
        "moving volume {volume} on from here would make {depth} moves in flight along its chain \
         (transfer.max_chain_depth = {max}); move it once a host before this one holds every \
         byte (its transfer is done)"
    )]
    ChainTooDeep {
        volume: VolumeId,
        depth: usize,
        max: u32,
    },

    /// A device of the volume is open (an attached instance, a mount).
    #[error("volume {volume} is open at {device} ({open_count} users); {hint}")]
    VolumeInUse {
        volume: VolumeId,
        device: String,
        open_count: i32,
        hint: &'static str,
    },

    /// The kernel refused to remove a device that is open.
    #[error("device {device} is open ({open_count} users); close them and retry")]
    DeviceInUse { device: String, open_count: i32 },

    /// An NVMe namespace of a controller is held by other block devices.
    #[error(
        "controller {controller} for {subsystem_nqn} serves /dev/{disk}, which {} still use; \
         remove those devices before disconnecting",
        holders.join(", ")
    )]
    NamespaceInUse {
        controller: String,
        subsystem_nqn: String,
        disk: String,
        holders: Vec<String>,
    },

    /// The NVMe target does not let this host connect to the subsystem.
    #[error(
        "the target at {address} refused host {host_nqn} for {subsystem_nqn} (EIO): the \
         subsystem is not exported on that port or does not allow this host NQN; the kernel log \
         has the NVMe status"
    )]
    HostRejected {
        address: String,
        host_nqn: String,
        subsystem_nqn: String,
    },

    /// Store and kernel disagreed; the volume waits for an operator.
    #[error(
        "volume {volume} is quarantined ({why}); an operator must repair it before it can {action}"
    )]
    VolumeQuarantined {
        volume: VolumeId,
        why: String,
        action: &'static str,
    },

    /// The volume moved away; this host keeps only its warm copy.
    #[error(
        "volume {volume} moved to host {left_for}; this host keeps only a read-only copy of it for a move back, which cannot {action}; move the volume back here, or delete the copy"
    )]
    VolumeWarm {
        volume: VolumeId,
        left_for: String,
        action: &'static str,
    },

    /// A create of the volume has not finished.
    #[error("volume {volume} is still being created; repeat the create first")]
    VolumeBeingCreated { volume: VolumeId },

    /// A delete of the volume has not finished.
    #[error(
        "volume {volume} is being deleted, so it cannot {action}; repeat the delete to finish it"
    )]
    VolumeBeingDeleted {
        volume: VolumeId,
        action: &'static str,
    },

    /// A create or delete of the snapshot has not finished, or it is still
    /// travelling here with its volume.
    #[error(
        "snapshot {snapshot} is being created or deleted, or is still arriving with its volume \
         from its previous host"
    )]
    SnapshotPending { snapshot: SnapshotId },

    /// The transfer's phase does not allow the action.
    #[error("transfer {transfer} is {phase:?}; it cannot {action} now")]
    TransferWrongState {
        transfer: TransferId,
        phase: TransferPhase,
        action: &'static str,
    },

    /// A deferred transfer's destination was written: an abort would lose it.
    #[error(
        "transfer {transfer} of volume {volume} is deferred and its destination has written \
         {regions} regions since it was presented; an abort would lose those writes: commit \
         it once the source let go, or abort with force to drop them"
    )]
    DestinationWritten {
        transfer: TransferId,
        volume: VolumeId,
        regions: u64,
    },

    /// The volume has no dm-era: it does not track changed blocks.
    #[error(
        "volume {volume} does not track changed blocks (it was made while \
         volumes.change_tracking was off, or by an agent without it)"
    )]
    VolumeNotTracked { volume: VolumeId },

    /// The snapshot has no era: its volume did not track changes then.
    #[error(
        "snapshot {snapshot} was taken while volume {volume} did not track changes; read the whole \
         volume instead"
    )]
    SnapshotNotTracked {
        snapshot: SnapshotId,
        volume: VolumeId,
    },

    /// Changes since an era before the volume's known history (its content
    /// came from elsewhere). Eras are the public ones (history tag included).
    #[error(
        "volume {volume}'s changes are known from era {} on (its content came from a snapshot, a \
         clone, a revert or another host); changes since era {since_era} are not, so read the \
         whole volume",
        known_from_era.map_or_else(|| "<not yet started>".to_owned(), |era| era.to_string())
    )]
    EraBeforeHistory {
        volume: VolumeId,
        known_from_era: Option<u64>,
        since_era: u64,
    },

    /// An era of another history (before a move here or a revert, or of
    /// another volume).
    #[error(
        "era {era} is not from volume {volume}'s history on this host (it predates a move here, a \
         revert, or belongs to another volume); ask since a checkpoint or snapshot taken since, or \
         read the whole volume"
    )]
    EraOtherHistory { volume: VolumeId, era: u64 },

    /// The agent lacks a setting the call needs.
    #[error("{explanation}: set {setting}")]
    NotConfigured {
        setting: &'static str,
        explanation: String,
    },
}

impl Refusal {
    /// Every reason code, in the order of the variants (for documentation
    /// and tests).
    pub const REASONS: [&'static str; 24] = [
        "VOLUME_PUBLISHED",
        "VOLUME_HAS_SNAPSHOTS",
        "VOLUME_EXPORTED",
        "VOLUME_EXPORTED_ELSEWHERE",
        "EXPORT_FOR_TRANSFER",
        "EXPORT_NOT_FOR_TRANSFER",
        "VOLUME_ARRIVING",
        "CHAIN_TOO_DEEP",
        "VOLUME_IN_USE",
        "DEVICE_IN_USE",
        "NVME_NAMESPACE_IN_USE",
        "NVME_HOST_REJECTED",
        "VOLUME_QUARANTINED",
        "VOLUME_WARM",
        "VOLUME_BEING_CREATED",
        "VOLUME_BEING_DELETED",
        "SNAPSHOT_PENDING",
        "TRANSFER_WRONG_STATE",
        "DESTINATION_WRITTEN",
        "VOLUME_NOT_TRACKED",
        "SNAPSHOT_NOT_TRACKED",
        "ERA_BEFORE_HISTORY",
        "ERA_OTHER_HISTORY",
        "AGENT_NOT_CONFIGURED",
    ];

    /// The stable, machine-readable code of this refusal (`[A-Z0-9_]+`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::VolumePublished { .. } => "VOLUME_PUBLISHED",
            Refusal::VolumeHasSnapshots { .. } => "VOLUME_HAS_SNAPSHOTS",
            Refusal::VolumeExported { .. } => "VOLUME_EXPORTED",
            Refusal::VolumeExportedElsewhere { .. } => "VOLUME_EXPORTED_ELSEWHERE",
            Refusal::ExportForTransfer { .. } => "EXPORT_FOR_TRANSFER",
            Refusal::ExportNotForTransfer { .. } => "EXPORT_NOT_FOR_TRANSFER",
            Refusal::VolumeArriving { .. } => "VOLUME_ARRIVING",
            Refusal::ChainTooDeep { .. } => "CHAIN_TOO_DEEP",
            Refusal::VolumeInUse { .. } => "VOLUME_IN_USE",
            Refusal::DeviceInUse { .. } => "DEVICE_IN_USE",
            Refusal::NamespaceInUse { .. } => "NVME_NAMESPACE_IN_USE",
            Refusal::HostRejected { .. } => "NVME_HOST_REJECTED",
            Refusal::VolumeQuarantined { .. } => "VOLUME_QUARANTINED",
            Refusal::VolumeWarm { .. } => "VOLUME_WARM",
            Refusal::VolumeBeingCreated { .. } => "VOLUME_BEING_CREATED",
            Refusal::VolumeBeingDeleted { .. } => "VOLUME_BEING_DELETED",
            Refusal::SnapshotPending { .. } => "SNAPSHOT_PENDING",
            Refusal::TransferWrongState { .. } => "TRANSFER_WRONG_STATE",
            Refusal::DestinationWritten { .. } => "DESTINATION_WRITTEN",
            Refusal::VolumeNotTracked { .. } => "VOLUME_NOT_TRACKED",
            Refusal::SnapshotNotTracked { .. } => "SNAPSHOT_NOT_TRACKED",
            Refusal::EraBeforeHistory { .. } => "ERA_BEFORE_HISTORY",
            Refusal::EraOtherHistory { .. } => "ERA_OTHER_HISTORY",
            Refusal::NotConfigured { .. } => "AGENT_NOT_CONFIGURED",
        }
    }

    /// The ids (and a few facts) involved, as key/value pairs with stable
    /// keys: `volume_id`, `snapshot_id`, `snapshot_ids` (comma-separated),
    /// `transfer_id`, `host_nqn`, `device`, ...
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let volume = |id: &VolumeId| ("volume_id", id.to_string());
        match self {
            Refusal::VolumePublished {
                volume: id, device, ..
            } => {
                vec![volume(id), ("device", device.display().to_string())]
            }
            Refusal::VolumeHasSnapshots {
                volume: id,
                snapshots,
            } => vec![volume(id), ("snapshot_ids", joined(snapshots, ","))],
            Refusal::VolumeExported {
                volume: id,
                host_nqn,
                ..
            } => vec![volume(id), ("host_nqn", host_nqn.clone())],
            Refusal::VolumeExportedElsewhere {
                volume: id,
                host_nqn,
                requester,
            } => vec![
                volume(id),
                ("host_nqn", host_nqn.clone()),
                ("requester_nqn", requester.clone()),
            ],
            Refusal::ExportForTransfer {
                volume: id,
                host_nqn,
            } => {
                vec![volume(id), ("host_nqn", host_nqn.clone())]
            }
            Refusal::ExportNotForTransfer { volume: id, .. } => vec![volume(id)],
            Refusal::VolumeArriving {
                volume: id,
                transfer,
                ..
            } => vec![volume(id), ("transfer_id", transfer.to_string())],
            Refusal::ChainTooDeep {
                volume: id,
                depth,
                max,
            } => vec![
                volume(id),
                ("chain_depth", depth.to_string()),
                ("max_chain_depth", max.to_string()),
            ],
            Refusal::VolumeInUse {
                volume: id,
                device,
                open_count,
                ..
            } => vec![
                volume(id),
                ("device", device.clone()),
                ("open_count", open_count.to_string()),
            ],
            Refusal::DeviceInUse { device, open_count } => vec![
                ("device", device.clone()),
                ("open_count", open_count.to_string()),
            ],
            Refusal::NamespaceInUse {
                controller,
                subsystem_nqn,
                disk,
                holders,
            } => vec![
                ("controller", controller.clone()),
                ("subsystem_nqn", subsystem_nqn.clone()),
                ("device", disk.clone()),
                ("holders", holders.join(",")),
            ],
            Refusal::HostRejected {
                address,
                host_nqn,
                subsystem_nqn,
            } => vec![
                ("address", address.clone()),
                ("host_nqn", host_nqn.clone()),
                ("subsystem_nqn", subsystem_nqn.clone()),
            ],
            Refusal::VolumeQuarantined { volume: id, .. }
            | Refusal::VolumeWarm { volume: id, .. }
            | Refusal::VolumeBeingCreated { volume: id }
            | Refusal::VolumeBeingDeleted { volume: id, .. }
            | Refusal::VolumeNotTracked { volume: id } => vec![volume(id)],
            Refusal::SnapshotPending { snapshot } => {
                vec![("snapshot_id", snapshot.to_string())]
            }
            Refusal::TransferWrongState {
                transfer, phase, ..
            } => vec![
                ("transfer_id", transfer.to_string()),
                ("transfer_phase", phase.name().to_owned()),
            ],
            Refusal::DestinationWritten {
                transfer,
                volume: id,
                regions,
            } => vec![
                volume(id),
                ("transfer_id", transfer.to_string()),
                ("regions_written", regions.to_string()),
            ],
            Refusal::SnapshotNotTracked {
                snapshot,
                volume: id,
            } => vec![volume(id), ("snapshot_id", snapshot.to_string())],
            Refusal::EraBeforeHistory {
                volume: id,
                known_from_era,
                since_era,
            } => {
                let mut pairs = vec![volume(id), ("since_era", since_era.to_string())];
                if let Some(era) = known_from_era {
                    pairs.push(("known_from_era", era.to_string()));
                }
                pairs
            }
            Refusal::EraOtherHistory { volume: id, era } => {
                vec![volume(id), ("era", era.to_string())]
            }
            Refusal::NotConfigured { setting, .. } => vec![("setting", (*setting).to_owned())],
        }
    }
}

fn joined(ids: &[SnapshotId], separator: &str) -> String {
    ids.iter()
        .map(SnapshotId::as_str)
        .collect::<Vec<_>>()
        .join(separator)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VOLUME: &str = "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";
    const SNAPSHOT: &str = "1b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";

    fn volume() -> VolumeId {
        VolumeId::parse(VOLUME).unwrap()
    }

    fn transfer() -> TransferId {
        TransferId::parse("2b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap()
    }

    fn one_of_each() -> Vec<Refusal> {
        let snapshot = SnapshotId::parse(SNAPSHOT).unwrap();
        vec![
            Refusal::VolumePublished {
                volume: volume(),
                device: PathBuf::from("/dev/mapper/dmclone-x"),
                hint: "unpublish it before deleting it",
            },
            Refusal::VolumeHasSnapshots {
                volume: volume(),
                snapshots: vec![
                    snapshot.clone(),
                    SnapshotId::parse("3b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap(),
                ],
            },
            Refusal::VolumeExported {
                volume: volume(),
                host_nqn: "nqn.b".into(),
                hint: "extend it on its new host",
            },
            Refusal::VolumeExportedElsewhere {
                volume: volume(),
                host_nqn: "nqn.b".into(),
                requester: "nqn.c".into(),
            },
            Refusal::ExportForTransfer {
                volume: volume(),
                host_nqn: "nqn.b".into(),
            },
            Refusal::ExportNotForTransfer {
                volume: volume(),
                why: "is not exported",
            },
            Refusal::VolumeArriving {
                volume: volume(),
                transfer: transfer(),
                hint: "abort the transfer to remove it",
            },
            Refusal::ChainTooDeep {
                volume: volume(),
                depth: 4,
                max: 3,
            },
            Refusal::VolumeInUse {
                volume: volume(),
                device: "/dev/mapper/dmclone-x".into(),
                open_count: 2,
                hint: "detach it first",
            },
            Refusal::DeviceInUse {
                device: "dmclone-x".into(),
                open_count: 1,
            },
            Refusal::NamespaceInUse {
                controller: "nvme1".into(),
                subsystem_nqn: "nqn.s".into(),
                disk: "nvme1n2".into(),
                holders: vec!["dm-3".into()],
            },
            Refusal::HostRejected {
                address: "10.0.0.1:4420".into(),
                host_nqn: "nqn.h".into(),
                subsystem_nqn: "nqn.s".into(),
            },
            Refusal::VolumeQuarantined {
                volume: volume(),
                why: "table differs".into(),
                action: "extend",
            },
            Refusal::VolumeWarm {
                volume: volume(),
                left_for: "nqn.h".into(),
                action: "publish",
            },
            Refusal::VolumeBeingCreated { volume: volume() },
            Refusal::VolumeBeingDeleted {
                volume: volume(),
                action: "publish",
            },
            Refusal::SnapshotPending {
                snapshot: snapshot.clone(),
            },
            Refusal::TransferWrongState {
                transfer: transfer(),
                phase: TransferPhase::Done,
                action: "abort",
            },
            Refusal::DestinationWritten {
                transfer: transfer(),
                volume: volume(),
                regions: 3,
            },
            Refusal::VolumeNotTracked { volume: volume() },
            Refusal::SnapshotNotTracked {
                snapshot,
                volume: volume(),
            },
            Refusal::EraBeforeHistory {
                volume: volume(),
                known_from_era: Some(7 << 32 | 3),
                since_era: 7 << 32 | 2,
            },
            Refusal::EraOtherHistory {
                volume: volume(),
                era: 8 << 32 | 5,
            },
            Refusal::NotConfigured {
                setting: "nvme.export_address",
                explanation: "this agent exports nothing".into(),
            },
        ]
    }

    #[test]
    fn each_variant_has_its_own_listed_reason_code() {
        let reasons: Vec<&str> = one_of_each().iter().map(Refusal::reason).collect();
        assert_eq!(reasons, Refusal::REASONS);
        for reason in reasons {
            assert!(
                !reason.is_empty()
                    && reason.len() <= 63
                    && reason
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{reason} is not an ErrorInfo reason"
            );
        }
    }

    #[test]
    fn metadata_names_the_ids_with_valid_keys() {
        for refusal in one_of_each() {
            let metadata = refusal.metadata();
            assert!(!metadata.is_empty(), "{refusal:?}");
            for (key, value) in &metadata {
                assert!(
                    key.bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                    "{key}"
                );
                assert!(!value.is_empty(), "{key} of {refusal:?}");
            }
            let message = refusal.to_string();
            if let Some((_, id)) = metadata.iter().find(|(key, _)| *key == "volume_id") {
                assert!(message.contains(id.as_str()), "{message}");
            }
        }
    }

    #[test]
    fn messages_keep_the_words_callers_look_for() {
        let all = one_of_each();
        let message = |reason: &str| {
            all.iter()
                .find(|r| r.reason() == reason)
                .map(ToString::to_string)
                .unwrap()
        };
        assert!(message("VOLUME_PUBLISHED").contains("unpublish it"));
        assert!(message("VOLUME_HAS_SNAPSHOTS").contains(SNAPSHOT));
        assert!(message("VOLUME_ARRIVING").contains("still arriving"));
        assert!(message("CHAIN_TOO_DEEP").contains("transfer.max_chain_depth = 3"));
        assert!(message("VOLUME_IN_USE").contains("detach it first"));
        assert!(message("NVME_NAMESPACE_IN_USE").contains("/dev/nvme1n2, which dm-3 still use"));
        assert!(message("NVME_HOST_REJECTED").contains("nqn.h"));
        assert!(message("VOLUME_NOT_TRACKED").contains("does not track changed blocks"));
        assert!(message("DESTINATION_WRITTEN").contains("commit it once the source let go"));
        assert!(
            message("ERA_BEFORE_HISTORY").contains(&format!("known from era {}", 7u64 << 32 | 3))
        );
        assert!(message("ERA_OTHER_HISTORY").contains("not from volume"));
        assert_eq!(
            message("AGENT_NOT_CONFIGURED"),
            "this agent exports nothing: set nvme.export_address"
        );
        assert_eq!(
            message("TRANSFER_WRONG_STATE"),
            "transfer 2b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11 is Done; it cannot abort now"
        );
    }
}
