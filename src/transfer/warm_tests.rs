//! Warm copies: a source that keeps its copy of a volume that moved away
//! (transfer.keep_source_copy_seconds), read-only and hidden, until its time
//! runs out, the pool runs low, or the volume moves back (see
//! `return_trip_tests`).

#![allow(clippy::unwrap_used)]

use super::move_tests::HOST_A;
use crate::{
    ids::{SnapshotId, VolumeId},
    records::{VolumeState, unix_now},
    testing::{MIB, TestHost, refusal, volume_id},
    transfer::token::ReleaseToken,
};

const KEEP_SECONDS: i64 = 3600;

pub(super) fn keeping_host() -> TestHost {
    TestHost::with_config(&format!(
        "[transfer]\nkeep_source_copy_seconds = {KEEP_SECONDS}"
    ))
    .with_export_address("192.0.2.1:4420")
}

/// Volume 1, created, exported for a move to HOST_A and released by it.
pub(super) async fn released(host: &TestHost) -> (std::sync::Arc<crate::agent::Agent>, VolumeId) {
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    release(&agent, &id).await;
    (agent, id)
}

/// Exports `id` for a move to `host`; returns the export's release token.
pub(super) async fn exported_for_move(
    agent: &crate::agent::Agent,
    id: &VolumeId,
    host: &str,
) -> ReleaseToken {
    agent
        .exports
        .export_volume(id, host, true)
        .await
        .unwrap()
        .release_token
        .unwrap()
}

/// Exports `id` for a move to HOST_A, which releases it, twice.
async fn release(agent: &crate::agent::Agent, id: &VolumeId) {
    let token = exported_for_move(agent, id, HOST_A).await;
    agent
        .exports
        .release_volume(id, HOST_A, Some(&token))
        .await
        .unwrap();
    // The destination asks until it hears back: a second ask is fine.
    agent
        .exports
        .release_volume(id, HOST_A, Some(&token))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_released_copy_stays_warm_hidden_and_read_only_until_its_time_runs_out() {
    let host = keeping_host();
    let (agent, id) = released(&host).await;
    let thin_ids = host.kernel.thin_ids("dmt-pool").len();
    assert!(host.fabric.exports().is_empty(), "the export is withdrawn");
    let copy = agent.volumes.get_volume(&id).await.unwrap();
    match &copy.state {
        VolumeState::Warm(reason) => assert!(reason.contains(HOST_A), "{reason}"),
        other => panic!("a released copy is warm, not {other:?}"),
    }
    assert!(agent.volumes.list_volumes(false).await.unwrap().is_empty());
    assert_eq!(agent.volumes.list_volumes(true).await.unwrap().len(), 1);

    let refusals = [
        refusal(&agent.volumes.publish_volume(&id).await),
        refusal(&agent.volumes.extend_volume(&id, 16 * MIB).await),
        refusal(&agent.exports.export_volume(&id, HOST_A, true).await),
        refusal(
            &agent
                .snapshots
                .create_snapshot(&SnapshotId::parse(volume_id(9).as_ref()).unwrap(), &id)
                .await,
        ),
        refusal(&agent.changes.mark_checkpoint(&id).await),
    ];
    assert_eq!(refusals, [Some("VOLUME_WARM"); 5]);

    let agent = host.restart(agent).await.unwrap();
    assert!(
        matches!(
            agent.volumes.get_volume(&id).await.unwrap().state,
            VolumeState::Warm(_)
        ),
        "a warm copy survives a restart"
    );
    let now = unix_now();
    assert_eq!(
        agent.volumes.drop_expired_warm_copies(now).await.unwrap(),
        0
    );
    assert_eq!(host.kernel.thin_ids("dmt-pool").len(), thin_ids);
    let later = now + KEEP_SECONDS + 1;
    assert_eq!(
        agent.volumes.drop_expired_warm_copies(later).await.unwrap(),
        1
    );
    assert!(agent.volumes.get_volume(&id).await.is_err());
    assert_eq!(
        host.kernel.thin_ids("dmt-pool").len(),
        thin_ids - 2,
        "its thin devices went"
    );
}

#[tokio::test]
async fn a_warm_copy_is_deleted_on_request() {
    let host = keeping_host();
    let (agent, id) = released(&host).await;
    agent.volumes.delete_volume(&id).await.unwrap();
    assert!(agent.volumes.get_volume(&id).await.is_err());
}

#[tokio::test]
async fn without_keeping_or_change_tracking_a_released_copy_goes() {
    for extra in [
        "",
        "[transfer]\nkeep_source_copy_seconds = 60\n[volumes]\nchange_tracking = false",
    ] {
        let host = TestHost::with_config(extra).with_export_address("192.0.2.1:4420");
        let (agent, id) = released(&host).await;
        assert!(agent.volumes.get_volume(&id).await.is_err(), "{extra:?}");
        assert!(agent.volumes.list_volumes(true).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn warm_copies_go_oldest_first_while_the_pool_is_low_on_space() {
    let host = keeping_host().with_oversubscription(4.0);
    let agent = host.start().await.unwrap();
    let (first, second, live) = (volume_id(1), volume_id(2), volume_id(3));
    for (id, written) in [(&first, 96 * MIB), (&second, 96 * MIB), (&live, 40 * MIB)] {
        agent.volumes.create_volume(id, 96 * MIB).await.unwrap();
        host.kernel.write(&format!("dmt-thin-{id}"), written / 512);
    }
    release(&agent, &first).await;
    release(&agent, &second).await;
    let usage = agent.ctx.pool.usage().await.unwrap();
    assert!(usage.low_space, "{usage:?}");

    assert_eq!(agent.volumes.drop_warm_copies_while_low().await.unwrap(), 1);
    assert!(
        agent.volumes.get_volume(&first).await.is_err(),
        "the oldest went"
    );
    let kept = agent.volumes.get_volume(&second).await.unwrap();
    assert!(matches!(kept.state, VolumeState::Warm(_)), "{kept:?}");
    assert!(!agent.ctx.pool.usage().await.unwrap().low_space);
    assert_eq!(agent.volumes.drop_warm_copies_while_low().await.unwrap(), 0);
    assert!(agent.volumes.get_volume(&live).await.is_ok());
}

#[tokio::test]
async fn a_warm_copy_with_snapshots_stays_as_long_as_they_do() {
    let host = keeping_host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let snapshot = SnapshotId::parse(volume_id(7).as_ref()).unwrap();
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    agent
        .snapshots
        .create_snapshot(&snapshot, &id)
        .await
        .unwrap();
    release(&agent, &id).await;
    let later = unix_now() + KEEP_SECONDS + 1;
    assert_eq!(
        agent.volumes.drop_expired_warm_copies(later).await.unwrap(),
        0
    );
    assert!(agent.volumes.get_volume(&id).await.is_ok());
    agent.snapshots.delete_snapshot(&snapshot).await.unwrap();
    assert_eq!(
        agent.volumes.drop_expired_warm_copies(later).await.unwrap(),
        1
    );
}
