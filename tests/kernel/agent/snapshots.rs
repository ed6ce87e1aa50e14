//! Thin snapshots, volumes made from them, clones and revert, against the
//! kernel: content equality by pattern, independence of both sides, what
//! blocks what, idempotency, crashes between the steps.

use std::path::Path;

use dmclone::api::proto::v1::{
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, GetSnapshotRequest,
    HydrationKnobs, ListSnapshotsRequest, RevertVolumeRequest, Snapshot, StartTransferRequest,
    TransferRef, Volume, snapshots_client::SnapshotsClient, start_transfer_request::Source,
    transfers_client::TransfersClient, volumes_client::VolumesClient,
};
use tonic::{Code, transport::Channel};

use super::{
    api::{VOL_A, VOL_B, create, delete, device_size, extend, get, pool_used, publish, unpublish},
    fixture::AgentProcess,
};
use crate::support::*;

const SNAP: &str = "6a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01";
const SNAP2: &str = "6a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d02";
const VOL_C: &str = "6c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d03";
const VOL_D: &str = "6d9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d04";
const SIZE: u64 = 32 * MIB;

pub async fn snapshot(
    agent: &AgentProcess,
    id: &str,
    volume: &str,
) -> Result<Snapshot, tonic::Status> {
    SnapshotsClient::new(agent.channel().await)
        .create_snapshot(CreateSnapshotRequest {
            snapshot_id: id.into(),
            volume_id: volume.into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn from_snapshot(
    client: &mut VolumesClient<Channel>,
    id: &str,
    size: u64,
    snap: &str,
) -> Result<Volume, tonic::Status> {
    client
        .create_volume(CreateVolumeRequest {
            volume_id: id.into(),
            size_bytes: size,
            source_snapshot_id: snap.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn clone_of(
    client: &mut VolumesClient<Channel>,
    id: &str,
    size: u64,
    source: &str,
) -> Result<Volume, tonic::Status> {
    client
        .create_volume(CreateVolumeRequest {
            volume_id: id.into(),
            size_bytes: size,
            source_volume_id: source.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn revert(agent: &AgentProcess, volume: &str, snap: &str) -> Result<(), tonic::Status> {
    SnapshotsClient::new(agent.channel().await)
        .revert_volume(RevertVolumeRequest {
            volume_id: volume.into(),
            snapshot_id: snap.into(),
        })
        .await
        .map(drop)
}

pub async fn delete_snapshot(agent: &AgentProcess, id: &str) -> Result<(), tonic::Status> {
    SnapshotsClient::new(agent.channel().await)
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.into(),
        })
        .await
        .map(drop)
}

fn fill(path: &Path, seed: u64, size: u64) {
    for offset in (0..size).step_by(MIB as usize) {
        write_at(path, offset, &pattern(seed, offset, MIB as usize));
    }
}

fn holds(path: &Path, seed: u64, size: u64) -> bool {
    (0..size)
        .step_by(MIB as usize)
        .all(|offset| read_at(path, offset, MIB as usize) == pattern(seed, offset, MIB as usize))
}

/// Publishes, checks the content, unpublishes.
async fn volume_holds(client: &mut VolumesClient<Channel>, id: &str, seed: u64, size: u64) -> bool {
    let path = publish(client, id).await.unwrap();
    let holds = holds(Path::new(&path), seed, size);
    unpublish(client, id).await.unwrap();
    holds
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_clones_and_revert_keep_their_content() {
    let agent = AgentProcess::start("dmctsnap").await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, SIZE).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    fill(Path::new(&path), 1, SIZE);

    // A snapshot of a published volume in use; then the volume changes.
    let taken = snapshot(&agent, SNAP, VOL_A).await.unwrap();
    assert_eq!((taken.size_bytes, taken.volume_id.as_str()), (SIZE, VOL_A));
    assert_eq!(
        taken.allocated_bytes, SIZE,
        "the snapshot maps every block the volume had"
    );
    assert_eq!(
        snapshot(&agent, SNAP, VOL_A).await.unwrap().snapshot_id,
        SNAP,
        "repeated: the same snapshot"
    );
    fill(Path::new(&path), 2, SIZE);

    // A volume from the snapshot, larger than it: the snapshot's content,
    // then zeros.
    let made = from_snapshot(&mut volumes, VOL_B, SIZE + 8 * MIB, SNAP)
        .await
        .unwrap();
    assert_eq!(made.source_snapshot_id, SNAP);
    assert!(
        volume_holds(&mut volumes, VOL_B, 1, SIZE).await,
        "volume from snapshot equals the snapshot"
    );
    let b = publish(&mut volumes, VOL_B).await.unwrap();
    assert_eq!(device_size(Path::new(&b)), SIZE + 8 * MIB);
    assert_eq!(read_at(Path::new(&b), SIZE + MIB, 4096), vec![0u8; 4096]);
    unpublish(&mut volumes, VOL_B).await.unwrap();
    assert_eq!(
        from_snapshot(&mut volumes, VOL_B, SIZE + 8 * MIB, SNAP)
            .await
            .unwrap()
            .volume_id,
        VOL_B,
        "repeated: the same volume"
    );
    let smaller = from_snapshot(&mut volumes, VOL_D, SIZE - MIB, SNAP)
        .await
        .unwrap_err();
    assert_eq!(smaller.code(), Code::InvalidArgument, "{smaller:?}");

    // A clone of the volume as it is now; both sides stay independent.
    let cloned = clone_of(&mut volumes, VOL_C, SIZE, VOL_A).await.unwrap();
    assert_eq!(cloned.source_volume_id, VOL_A);
    write_at(Path::new(&path), 0, &pattern(3, 0, MIB as usize));
    let c = publish(&mut volumes, VOL_C).await.unwrap();
    assert!(
        holds(Path::new(&c), 2, SIZE),
        "the clone does not see later writes to its source"
    );
    write_at(Path::new(&c), MIB, &pattern(4, 0, MIB as usize));
    unpublish(&mut volumes, VOL_C).await.unwrap();
    assert_eq!(
        read_at(Path::new(&path), MIB, MIB as usize),
        pattern(2, MIB, MIB as usize),
        "the source does not see the clone's writes"
    );

    // The snapshot is unchanged by all of it.
    let snap = SnapshotsClient::new(agent.channel().await)
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: SNAP.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.size_bytes, SIZE);

    // Revert: refused while published, then the volume equals the snapshot.
    let refused = revert(&agent, VOL_A, SNAP).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("unpublish it"), "{refused:?}");
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("VOLUME_PUBLISHED")
    );
    unpublish(&mut volumes, VOL_A).await.unwrap();
    extend(&mut volumes, VOL_A, SIZE + 4 * MIB).await.unwrap();
    revert(&agent, VOL_A, SNAP).await.unwrap();
    assert_eq!(
        get(&mut volumes, VOL_A).await.unwrap().size_bytes,
        SIZE + 4 * MIB,
        "revert keeps the size"
    );
    assert!(
        volume_holds(&mut volumes, VOL_A, 1, SIZE).await,
        "reverted to the snapshot"
    );
    let wrong = revert(&agent, VOL_C, SNAP).await.unwrap_err();
    assert_eq!(
        wrong.code(),
        Code::InvalidArgument,
        "a snapshot of another volume: {wrong:?}"
    );

    // Snapshots block deleting their volume; clones and volumes made from
    // snapshots are independent of their sources.
    let blocked = delete(&mut volumes, VOL_A).await.unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    assert!(blocked.message().contains(SNAP), "{blocked:?}");
    assert_eq!(
        refusal_reason(&blocked).as_deref(),
        Some("VOLUME_HAS_SNAPSHOTS")
    );
    let other = snapshot(&agent, SNAP, VOL_C).await.unwrap_err();
    assert_eq!(
        other.code(),
        Code::AlreadyExists,
        "the id names a snapshot of another volume"
    );
    let listed = SnapshotsClient::new(agent.channel().await)
        .list_snapshots(ListSnapshotsRequest {
            volume_id: VOL_A.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(listed.len(), 1);
    delete_snapshot(&agent, SNAP).await.unwrap();
    delete(&mut volumes, VOL_A).await.unwrap();
    assert!(
        volume_holds(&mut volumes, VOL_B, 1, SIZE).await,
        "made from a deleted snapshot of a deleted volume"
    );
    let c = publish(&mut volumes, VOL_C).await.unwrap();
    assert_eq!(
        read_at(Path::new(&c), 2 * MIB, MIB as usize),
        pattern(2, 2 * MIB, MIB as usize)
    );
    unpublish(&mut volumes, VOL_C).await.unwrap();
    for id in [VOL_B, VOL_C] {
        delete(&mut volumes, id).await.unwrap();
    }
    assert_eq!(
        super::api::pool_used(&agent).await.0,
        0,
        "every block is freed"
    );
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_inside_snapshot_clone_and_revert() {
    let mut agent = AgentProcess::start("dmctsnapkill").await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, SIZE).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    fill(Path::new(&path), 11, SIZE);

    // Cut before and after the pool's message, before the record says it
    // is done: rolled back either way, the origin not left suspended.
    for point in ["snapshot.after_record", "snapshot.after_message"] {
        agent
            .crash_inside(point, async |agent| {
                assert!(snapshot(agent, SNAP, VOL_A).await.is_err());
            })
            .await;
        let gone = SnapshotsClient::new(agent.channel().await)
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: SNAP.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(gone.code(), Code::NotFound, "{point}: {gone:?}");
        write_at(Path::new(&path), 0, &pattern(11, 0, MIB as usize));
    }
    snapshot(&agent, SNAP, VOL_A).await.unwrap();

    agent
        .crash_inside("clone.after_record", async |agent| {
            assert!(
                clone_of(&mut agent.volumes().await, VOL_C, SIZE, VOL_A)
                    .await
                    .is_err()
            );
        })
        .await;
    assert_eq!(
        get(&mut agent.volumes().await, VOL_C)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    fill(Path::new(&path), 12, SIZE);
    unpublish(&mut agent.volumes().await, VOL_A).await.unwrap();
    agent
        .crash_inside("revert.after_record", async |agent| {
            assert!(revert(agent, VOL_A, SNAP).await.is_err());
        })
        .await;
    assert!(
        volume_holds(&mut agent.volumes().await, VOL_A, 11, SIZE).await,
        "the interrupted revert is finished"
    );

    agent
        .crash_inside("snapshot.delete_after_record", async |agent| {
            let deleted = SnapshotsClient::new(agent.channel().await)
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: SNAP.into(),
                })
                .await;
            assert!(deleted.is_err());
        })
        .await;
    delete(&mut agent.volumes().await, VOL_A)
        .await
        .expect("the snapshot delete was finished, so the volume can go");
    assert_eq!(super::api::pool_used(&agent).await.0, 0);
    agent.destroy().await;
}

/// A snapshot of a volume that is still arriving waits for its hydration
/// (deferred ones are refused: nothing would ever finish).
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_of_an_arriving_volume_waits_for_hydration() {
    let size = 48 * MIB;
    let source = LoopDisk::with_pattern(size, 21);
    let agent = AgentProcess::start("dmctsnapxfer").await;
    let mut transfers = TransfersClient::new(agent.channel().await);
    let start = |deferred: bool| StartTransferRequest {
        transfer_id: SNAP2.into(),
        volume_id: VOL_D.into(),
        size_bytes: size,
        source: Some(Source::DevicePath(source.path().display().to_string())),
        deferred,
        knobs: Some(HydrationKnobs {
            region_bytes: 64 * 1024,
            hydration_threshold: 1,
            hydration_batch_size: 1,
            max_bytes_per_second: 16 * MIB,
        }),
        leave_snapshots: false,
    };
    transfers.start_transfer(start(true)).await.unwrap();
    let refused = snapshot(&agent, SNAP, VOL_D).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refusal_reason(&refused).as_deref(), Some("VOLUME_ARRIVING"));
    transfers
        .commit_transfer(TransferRef {
            transfer_id: SNAP2.into(),
        })
        .await
        .unwrap();
    let taken = snapshot(&agent, SNAP, VOL_D).await.unwrap();
    let transfer = transfers
        .get_transfer(TransferRef {
            transfer_id: SNAP2.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        transfer.state(),
        dmclone::api::proto::v1::TransferState::Done,
        "taken after the move finished"
    );
    assert_eq!(taken.size_bytes, size);
    let mut volumes = agent.volumes().await;
    from_snapshot(&mut volumes, VOL_C, size, SNAP)
        .await
        .unwrap();
    assert!(
        volume_holds(&mut volumes, VOL_C, 21, size).await,
        "the snapshot holds the moved data"
    );
    agent.destroy().await;
}

/// A snapshot of a 1 GiB volume shares every block: taking it allocates no
/// data (at most a block of dm-era metadata, whose era it records), and
/// space is spent only when one side is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_costs_no_data_until_written() {
    const GIB: u64 = 1024 * MIB;
    let agent = AgentProcess::start_with("dmctsnapspace", &["--pool-file-size", "3G"], &[]).await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, GIB).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    fill(Path::new(&path), 9, 4 * MIB);
    let (before, _) = pool_used(&agent).await;
    let taken = snapshot(&agent, SNAP, VOL_A).await.unwrap();
    let (after, _) = pool_used(&agent).await;
    println!(
        "1 GiB volume with 4 MiB written: the snapshot maps {} bytes; pool data {before} -> {after} bytes",
        taken.allocated_bytes
    );
    assert_eq!(taken.allocated_bytes, 4 * MIB, "shares the volume's blocks");
    assert!(
        after - before <= 64 * 1024,
        "a snapshot allocates no data: {before} -> {after}"
    );
    // Overwriting a shared block copies it; a new block is just written.
    write_at(Path::new(&path), 0, &pattern(10, 0, MIB as usize));
    write_at(Path::new(&path), 512 * MIB, &pattern(10, 0, MIB as usize));
    let (written, _) = pool_used(&agent).await;
    assert!(
        written - after >= 2 * MIB,
        "2 MiB written after the snapshot take 2 MiB: {after} -> {written}"
    );
    unpublish(&mut volumes, VOL_A).await.unwrap();
    agent.destroy().await;
}
