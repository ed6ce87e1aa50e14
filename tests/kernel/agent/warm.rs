//! Warm copies: a source agent configured to keep the copy of a volume that
//! moved away (transfer.keep_source_copy_seconds) keeps it, read-only and
//! hidden from plain listings, through a kill -9 and restart; a move back
//! replaces it.

use std::path::Path;

use dmclone::api::proto::v1::{Export, ListVolumesRequest, VolumeState};
use tonic::Code;

use super::{
    api::{create, get, publish, unpublish},
    fixture::AgentProcess,
    moves::{
        Ids, agent, agent_with, configfs_has, export, fill, host_nqn, ids, public, start_move_with,
        wait_released,
    },
};
use crate::support::*;

/// Moves the volume from `from` to `to` and waits until `from` let go;
/// returns `from`'s export.
pub(super) async fn move_between(ids: Ids, from: &AgentProcess, to: &AgentProcess) -> Export {
    let exported = export(ids, from, to).await.unwrap();
    start_move_with(ids, from, &exported, to, false, None)
        .await
        .unwrap();
    wait_released(ids, to).await;
    exported
}

const VOLUME: &str = "5a7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f";

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_that_moved_away_leaves_a_warm_copy_until_it_moves_back() {
    let away = ids(VOLUME, "6a7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
    let back = ids(VOLUME, "7a7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
    let mut a = agent_with(
        "dmctwarma",
        4491,
        "0a000000-0000-4000-8000-000000000091",
        &["--transfer-keep-source-copy-seconds", "3600"],
    )
    .await;
    let b = agent("dmctwarmb", 4492, "0b000000-0000-4000-8000-000000000092").await;
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, VOLUME, 64 * MIB).await.unwrap();
    let path = publish(&mut volumes_a, VOLUME).await.unwrap();
    fill(Path::new(&path), 91, 64 * MIB);
    let left_behind = sha256_of(Path::new(&path), 64 * MIB);
    unpublish(&mut volumes_a, VOLUME).await.unwrap();

    let exported = move_between(away, &a, &b).await;

    let b_nqn = host_nqn(&b).await;
    let check_warm = async |a: &AgentProcess| {
        let mut volumes = a.volumes().await;
        let copy = get(&mut volumes, VOLUME).await.unwrap();
        assert_eq!(copy.state(), VolumeState::Warm, "{copy:?}");
        assert!(copy.state_reason.contains(&b_nqn), "{copy:?}");
        let listed = |include_warm| {
            let mut volumes = volumes.clone();
            async move {
                volumes
                    .list_volumes(ListVolumesRequest { include_warm })
                    .await
                    .unwrap()
                    .into_inner()
                    .volumes
                    .len()
            }
        };
        assert_eq!((listed(false).await, listed(true).await), (0, 1));
        let refused = publish(&mut volumes, VOLUME).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("read-only copy"), "{refused:?}");
        // The copy's blocks are all still in the pool.
        let thin = format!("/dev/mapper/{}-thin-{VOLUME}", a.prefix);
        assert_eq!(sha256_of(Path::new(&thin), 64 * MIB), left_behind);
    };
    assert!(!configfs_has(&exported.subsystem_nqn), "the export is gone");
    check_warm(&a).await;
    a.kill9().await;
    a.restart().await;
    check_warm(&a).await;

    // The volume is written on B, then comes back: the warm copy makes way.
    let on_b = public(away, &b);
    write_at(&on_b, 5 * MIB, &pattern(92, 5 * MIB, MIB as usize));
    let moved_back = sha256_of(&on_b, 64 * MIB);
    let mut volumes_b = b.volumes().await;
    unpublish(&mut volumes_b, VOLUME).await.unwrap();
    move_between(back, &b, &a).await;
    let volume = get(&mut a.volumes().await, VOLUME).await.unwrap();
    assert_eq!(volume.state(), VolumeState::Available, "{volume:?}");
    assert_eq!(sha256_of(&public(back, &a), 64 * MIB), moved_back);
    assert_eq!(
        get(&mut volumes_b, VOLUME).await.unwrap_err().code(),
        Code::NotFound,
        "B keeps no copy: it was not told to"
    );
    b.destroy().await;
    a.destroy().await;
}
