//! Snapshots, clones, volumes from snapshots and revert against the
//! in-memory kernel: what each does to the pool and the stack, the order
//! of suspend and snapshot, refusals, and crashes at their failpoints.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::*;
use crate::agent::Agent;
use crate::{
    ids::VolumeId,
    testing::{MIB, TestHost, crash, refusal, volume_id},
};

fn snapshot_id(n: u32) -> SnapshotId {
    SnapshotId::parse(&format!("10000000-0000-4000-8000-{n:012}")).unwrap()
}

fn thin_ids(host: &TestHost) -> Vec<u32> {
    host.kernel.thin_ids("dmt-pool")
}

async fn published_volume(host: &TestHost) -> (Arc<Agent>, VolumeId) {
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    (agent, id)
}

#[tokio::test]
async fn a_snapshot_is_taken_with_its_origin_suspended_and_starts_an_era() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    let before = host.kernel.journal().len();
    let snapshot = agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    assert!(
        snapshot.era.is_some(),
        "a tracked volume's snapshot records its era"
    );
    let journal = host.kernel.journal()[before..].to_vec();
    let at = |what: &str| journal.iter().position(|e| e == what).unwrap();
    let snap = journal
        .iter()
        .position(|e| e.starts_with("message dmt-pool create_snap"))
        .unwrap();
    assert!(at(&format!("suspend dmt-{id}")) < at(&format!("suspend dmt-thin-{id}")));
    assert!(at(&format!("suspend dmt-thin-{id}")) < snap);
    assert!(snap < at(&format!("resume dmt-thin-{id}")));
    assert!(at(&format!("resume dmt-thin-{id}")) < at(&format!("resume dmt-{id}")));
    assert_eq!(host.kernel.is_suspended(&format!("dmt-{id}")), Some(false));
    assert_eq!(thin_ids(&host).len(), 3);
    let again = agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    assert_eq!(
        again.era, snapshot.era,
        "a retried create returns the same snapshot"
    );
    assert_eq!(thin_ids(&host).len(), 3);
}

/// The pool refuses the snapshot while the origin and its dm-era are held:
/// both resume in the same kernel step, the call fails, nothing is left.
#[tokio::test]
async fn a_refused_snapshot_leaves_its_origin_running() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    host.kernel
        .fail_next("message", "dmt-pool", nix::errno::Errno::ENOSPC);
    let refused = agent.snapshots.create_snapshot(&snapshot_id(1), &id).await;
    assert!(refused.is_err(), "{refused:?}");
    for device in [format!("dmt-{id}"), format!("dmt-thin-{id}")] {
        assert_eq!(host.kernel.is_suspended(&device), Some(false), "{device}");
    }
    assert!(
        agent
            .snapshots
            .list_snapshots(None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(thin_ids(&host).len(), 2, "the volume's and its era's");
}

#[tokio::test]
async fn a_volume_with_snapshots_is_not_deleted_until_they_are() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    agent.volumes.unpublish_volume(&id).await.unwrap();
    let refused = agent.volumes.delete_volume(&id).await;
    assert_eq!(
        refusal(&refused),
        Some("VOLUME_HAS_SNAPSHOTS"),
        "{refused:?}"
    );
    agent
        .snapshots
        .delete_snapshot(&snapshot_id(1))
        .await
        .unwrap();
    agent
        .snapshots
        .delete_snapshot(&snapshot_id(1))
        .await
        .unwrap();
    agent.volumes.delete_volume(&id).await.unwrap();
    assert!(thin_ids(&host).is_empty());
}

#[tokio::test]
async fn volumes_from_a_snapshot_and_clones_are_thin_snapshots_in_the_pool() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    host.kernel.write(&format!("dmt-thin-{id}"), 2048);
    agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    let (from_snapshot, _) = agent
        .snapshots
        .create_volume_from_snapshot(&volume_id(2), 8 * MIB, &snapshot_id(1))
        .await
        .unwrap();
    assert_eq!(from_snapshot.source_snapshot, Some(snapshot_id(1)));
    assert_eq!(
        from_snapshot.allocated_bytes,
        Some(2048 * 512),
        "shares the snapshot's blocks"
    );
    let (cloned, _) = agent
        .snapshots
        .clone_volume(&volume_id(3), 4 * MIB, &id)
        .await
        .unwrap();
    assert_eq!(cloned.allocated_bytes, Some(2048 * 512));
    let smaller = agent
        .snapshots
        .clone_volume(&volume_id(4), 2 * MIB, &id)
        .await;
    assert!(
        matches!(smaller, Err(AgentError::InvalidArgument { .. })),
        "{smaller:?}"
    );
    let missing = agent
        .snapshots
        .create_volume_from_snapshot(&volume_id(5), 4 * MIB, &snapshot_id(9))
        .await;
    assert!(
        matches!(missing, Err(AgentError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn revert_is_refused_while_published_and_swaps_the_thin_device_after() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    let refused = agent.snapshots.revert_volume(&id, &snapshot_id(1)).await;
    assert_eq!(refusal(&refused), Some("VOLUME_PUBLISHED"), "{refused:?}");
    agent.volumes.unpublish_volume(&id).await.unwrap();
    let ids_before = thin_ids(&host);
    agent
        .snapshots
        .revert_volume(&id, &snapshot_id(1))
        .await
        .unwrap();
    let ids_after = thin_ids(&host);
    assert_eq!(
        ids_before.len(),
        ids_after.len(),
        "the old thin id is freed"
    );
    assert_ne!(ids_before, ids_after);
    let other = agent
        .snapshots
        .revert_volume(&volume_id(2), &snapshot_id(1))
        .await;
    assert!(other.is_err());
}

#[tokio::test]
async fn a_snapshot_cut_after_its_record_is_rolled_back_and_a_delete_finished() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    cut_first_snapshot(&agent, &id).await;
    let agent = host.restart(agent).await.unwrap();
    assert_no_snapshots_left(&agent, &host).await;

    agent
        .snapshots
        .create_snapshot(&snapshot_id(2), &id)
        .await
        .unwrap();
    let caller = Arc::clone(&agent);
    crash("snapshot.delete_after_record", async move {
        caller.snapshots.delete_snapshot(&snapshot_id(2)).await
    })
    .await;
    let agent = host.restart(agent).await.unwrap();
    assert_no_snapshots_left(&agent, &host).await;
}

/// A caller that gave up half-way retries: the retry answers with a
/// snapshot that exists in truth, one the next start keeps.
#[tokio::test]
async fn a_retried_create_finishes_what_a_cut_one_began() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    cut_first_snapshot(&agent, &id).await;
    let half_made = agent.snapshots.get_snapshot(&snapshot_id(1)).await.unwrap();
    assert_eq!(half_made.state, SnapshotState::Creating, "{half_made:?}");
    let taken = agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    assert_eq!(
        (&taken.id, taken.state),
        (&snapshot_id(1), SnapshotState::Available)
    );
    assert_eq!(thin_ids(&host).len(), 3, "one thin id for the snapshot");
    let agent = host.restart(agent).await.unwrap();
    let listed = agent.snapshots.list_snapshots(None).await.unwrap();
    assert_eq!(listed, [taken], "the next start keeps it");
}

#[tokio::test]
async fn a_revert_cut_after_its_record_is_finished_at_the_next_start() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    agent.volumes.unpublish_volume(&id).await.unwrap();
    let caller = Arc::clone(&agent);
    let volume = id.clone();
    crash("revert.after_record", async move {
        caller
            .snapshots
            .revert_volume(&volume, &snapshot_id(1))
            .await
    })
    .await;
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(agent.reconcile_report().finished, 1);
    assert_eq!(
        agent.volumes.get_volume(&id).await.unwrap().state,
        crate::volume::VolumeState::Available
    );
    assert_eq!(
        thin_ids(&host).len(),
        3,
        "volume, its era metadata, the snapshot"
    );
}

/// No snapshot is listed, and the pool holds only the volume's thin ids.
async fn assert_no_snapshots_left(agent: &Agent, host: &TestHost) {
    let listed = agent.snapshots.list_snapshots(None).await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(thin_ids(host).len(), 2);
}

#[tokio::test]
async fn a_snapshot_being_deleted_is_not_taken_again_until_the_delete_ends() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    let caller = Arc::clone(&agent);
    crash("snapshot.delete_after_record", async move {
        caller.snapshots.delete_snapshot(&snapshot_id(1)).await
    })
    .await;
    let listed = agent.snapshots.list_snapshots(Some(&id)).await.unwrap();
    assert_eq!(listed[0].state, SnapshotState::Deleting, "{listed:?}");
    let refused = agent.snapshots.create_snapshot(&snapshot_id(1), &id).await;
    assert_eq!(refusal(&refused), Some("SNAPSHOT_PENDING"), "{refused:?}");
    agent
        .snapshots
        .delete_snapshot(&snapshot_id(1))
        .await
        .unwrap();
    assert_no_snapshots_left(&agent, &host).await;
}

/// Snapshot 1 of `volume`, its call cut right after its record.
async fn cut_first_snapshot(agent: &Arc<Agent>, volume: &VolumeId) {
    let (caller, volume) = (Arc::clone(agent), volume.clone());
    crash("snapshot.after_record", async move {
        caller
            .snapshots
            .create_snapshot(&snapshot_id(1), &volume)
            .await
    })
    .await;
}

/// Cut after the pool made the snapshot but before its record says so: the
/// next start rolls it back (its caller never heard of it), thin id and all.
#[tokio::test]
async fn a_snapshot_cut_after_the_pool_made_it_is_rolled_back() {
    let host = TestHost::new();
    let (agent, id) = published_volume(&host).await;
    let (caller, volume) = (Arc::clone(&agent), id.clone());
    crash("snapshot.after_message", async move {
        caller
            .snapshots
            .create_snapshot(&snapshot_id(1), &volume)
            .await
    })
    .await;
    assert_eq!(thin_ids(&host).len(), 3, "the pool made it");
    let agent = host.restart(agent).await.unwrap();
    assert_no_snapshots_left(&agent, &host).await;
    for device in [format!("dmt-{id}"), format!("dmt-thin-{id}")] {
        assert_eq!(host.kernel.is_suspended(&device), Some(false), "{device}");
    }
}
