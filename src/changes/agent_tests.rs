//! Checkpoints and the questions changed-block tracking refuses, through
//! the agent over the in-memory kernel. (The answers themselves read dm-era's
//! metadata from its device: the real-kernel tier proves those.)

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use super::*;
use crate::{
    ids::TransferId,
    testing::{MIB, TestHost, refusal, volume_id},
    transfer::{KnobRequest, Source, StartRequest},
};

fn history_of(era: u64) -> u64 {
    era >> 32
}

#[tokio::test]
async fn checkpoints_of_a_published_volume_are_new_eras_of_one_history() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let first = agent.changes.mark_checkpoint(&id).await.unwrap();
    let second = agent.changes.mark_checkpoint(&id).await.unwrap();
    assert_eq!(second, first + 1);
    assert_eq!(history_of(first), history_of(second));
    assert_ne!(history_of(first), 0, "eras carry a nonzero history tag");
    let checkpoints = host
        .kernel
        .journal()
        .iter()
        .filter(|e| **e == format!("message dmt-{id} checkpoint"))
        .count();
    assert_eq!(checkpoints, 2);
}

#[tokio::test]
async fn an_unpublished_volume_is_asked_through_a_probe_that_goes_again() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    let first = agent.changes.mark_checkpoint(&id).await.unwrap();
    let second = agent.changes.mark_checkpoint(&id).await.unwrap();
    assert!(second > first, "each probe's activation begins an era");
    let probe = format!("dmt-era-{id}");
    assert!(host.kernel.journal().contains(&format!("create {probe}")));
    assert!(!host.devices().contains(&probe));
}

#[tokio::test]
async fn a_probe_left_by_a_crash_is_removed_at_start() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    host.kernel.add_foreign_device(&format!("dmt-era-{id}"));
    let agent = host.restart(agent).await.unwrap();
    assert!(!host.devices().contains(&format!("dmt-era-{id}")));
    assert!(agent.reconcile_report().unknown_devices.is_empty());
}

#[tokio::test]
async fn with_tracking_off_a_volume_is_linear_and_refuses_checkpoints() {
    let host = TestHost::with_config("[volumes]\nchange_tracking = false");
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let (volume, _) = agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    assert!(!volume.change_tracking);
    agent.volumes.publish_volume(&id).await.unwrap();
    let table = host.kernel.table_text(&format!("dmt-{id}")).unwrap();
    assert!(table.contains(" linear "), "{table}");
    let refused = agent.changes.mark_checkpoint(&id).await;
    assert_eq!(refusal(&refused), Some("VOLUME_NOT_TRACKED"), "{refused:?}");
    assert_eq!(host.kernel.thin_ids("dmt-pool").len(), 1, "no era metadata");
}

/// dm-era sits above an arriving volume's clone from presentation on:
/// checkpoints work while it arrives (changed blocks: the kernel tests). Without change
/// tracking it is still refused, as it is for a local volume.
#[tokio::test]
async fn an_arriving_volume_tracks_changes_from_presentation_on() {
    for tracked in [true, false] {
        let host = if tracked {
            TestHost::new()
        } else {
            TestHost::with_config("[volumes]\nchange_tracking = false")
        };
        let source = PathBuf::from("/dev/fake-source");
        host.kernel.add_block_device_at(&source, 8 * MIB / 512);
        let agent = host.start().await.unwrap();
        let id = volume_id(1);
        let request = StartRequest {
            transfer: TransferId::parse("20000000-0000-4000-8000-000000000001").unwrap(),
            volume: id.clone(),
            size_bytes: 8 * MIB,
            source: Source::Device(source),
            deferred: true,
            knobs: KnobRequest::default(),
            leave_snapshots: false,
        };
        agent.transfers.start_transfer(request).await.unwrap();
        let checkpoint = agent.changes.mark_checkpoint(&id).await;
        if !tracked {
            assert_eq!(
                refusal(&checkpoint),
                Some("VOLUME_NOT_TRACKED"),
                "{checkpoint:?}"
            );
            continue;
        }
        let era = checkpoint.unwrap();
        let again = agent.changes.mark_checkpoint(&id).await.unwrap();
        assert!(again > era, "{again} after {era}");
        let table = host.kernel.table_text(&format!("dmt-{id}")).unwrap();
        assert!(table.starts_with("0 16384 era "), "{table}");
    }
}

#[tokio::test]
async fn questions_the_history_cannot_answer_are_refused_before_any_reading() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let now = agent.changes.mark_checkpoint(&id).await.unwrap();

    let not_begun = agent
        .changes
        .changed_blocks(&id, &Since::Era(now + 5))
        .await;
    assert!(
        matches!(
            not_begun,
            Err(AgentError::InvalidArgument { field: "era", .. })
        ),
        "{not_begun:?}"
    );
    let other_history = agent
        .changes
        .changed_blocks(&id, &Since::Era((history_of(now) ^ 1) << 32 | 1))
        .await;
    assert_eq!(
        refusal(&other_history),
        Some("ERA_OTHER_HISTORY"),
        "{other_history:?}"
    );

    // A clone's history starts when it is made: nothing before is known.
    let clone = volume_id(2);
    agent
        .snapshots
        .clone_volume(&clone, 4 * MIB, &id)
        .await
        .unwrap();
    agent.volumes.publish_volume(&clone).await.unwrap();
    let before = agent.changes.changed_blocks(&clone, &Since::Era(0)).await;
    assert_eq!(refusal(&before), Some("ERA_BEFORE_HISTORY"), "{before:?}");

    let snapshot = SnapshotId::parse("10000000-0000-4000-8000-000000000001").unwrap();
    agent
        .snapshots
        .create_snapshot(&snapshot, &id)
        .await
        .unwrap();
    let wrong_volume = agent
        .changes
        .changed_blocks(&clone, &Since::Snapshot(snapshot))
        .await;
    assert!(
        matches!(
            wrong_volume,
            Err(AgentError::InvalidArgument {
                field: "snapshot_id",
                ..
            })
        ),
        "{wrong_volume:?}"
    );
    assert!(
        !host
            .kernel
            .journal()
            .iter()
            .any(|e| e.ends_with("take_metadata_snap")),
        "no refused question took a metadata snapshot"
    );
}

/// A snapshot recorded without an era (taken by an agent that did not track
/// changes yet) cannot anchor a changed-block question.
#[tokio::test]
async fn a_snapshot_without_an_era_is_refused_as_a_starting_point() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let snapshot = SnapshotId::parse("10000000-0000-4000-8000-000000000001").unwrap();
    agent
        .snapshots
        .create_snapshot(&snapshot, &id)
        .await
        .unwrap();
    let mut record = agent.ctx.snapshot_record(&snapshot).await.unwrap().unwrap();
    record.era = None;
    agent
        .ctx
        .store_call(move |store| store.commit(vec![crate::store::Change::put(&record)?]))
        .await
        .unwrap();
    let refused = agent
        .changes
        .changed_blocks(&id, &Since::Snapshot(snapshot))
        .await;
    assert_eq!(
        refusal(&refused),
        Some("SNAPSHOT_NOT_TRACKED"),
        "{refused:?}"
    );
}

/// An export serves the thin device below dm-era, so what the other host
/// writes is never tracked: the history ends when the export opens, no
/// question is answered while it lasts, and after it closes a new history
/// begins with a fresh era.
#[tokio::test]
async fn an_export_ends_the_history_it_would_make_wrong() {
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001";
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let before = agent.changes.mark_checkpoint(&id).await.unwrap();
    agent.exports.export_volume(&id, HOST, false).await.unwrap();

    let checkpoint = agent.changes.mark_checkpoint(&id).await;
    assert_eq!(
        refusal(&checkpoint),
        Some("VOLUME_EXPORTED"),
        "{checkpoint:?}"
    );
    let asked = agent.changes.changed_blocks(&id, &Since::Era(before)).await;
    assert_eq!(refusal(&asked), Some("VOLUME_EXPORTED"), "{asked:?}");
    let snapshot = crate::ids::SnapshotId::parse("50000000-0000-4000-8000-000000000001").unwrap();
    let taken = agent
        .snapshots
        .create_snapshot(&snapshot, &id)
        .await
        .unwrap();
    assert_eq!(
        taken.era, None,
        "a snapshot taken while exported has no era"
    );

    agent
        .exports
        .unexport_volume(&id, &Default::default())
        .await
        .unwrap();
    let unexported = host.kernel.journal().len();
    let asked = agent.changes.changed_blocks(&id, &Since::Era(before)).await;
    assert_eq!(refusal(&asked), Some("ERA_OTHER_HISTORY"), "{asked:?}");
    let since_snapshot = agent
        .changes
        .changed_blocks(&id, &Since::Snapshot(snapshot))
        .await;
    assert_eq!(
        refusal(&since_snapshot),
        Some("SNAPSHOT_NOT_TRACKED"),
        "{since_snapshot:?}"
    );
    let after = agent.changes.mark_checkpoint(&id).await.unwrap();
    assert_ne!(history_of(after), history_of(before));
    let checkpoints = host.kernel.journal()[unexported..]
        .iter()
        .filter(|e| **e == format!("message dmt-{id} checkpoint"))
        .count();
    assert_eq!(
        checkpoints, 2,
        "one begins the new history, one is asked for"
    );
}
