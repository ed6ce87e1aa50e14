//! Snapshots travel with their volume: a volume with three snapshots, each
//! taken after known writes, moves A -> B while B writes to it; once it
//! has arrived its snapshots follow, each made on B from the next newer one
//! (the newest from the volume) with only the blocks where they differ
//! sent, through a kill -9 of A and then of B in the middle of the first
//! one. B's pool holds about what A's held, and A keeps nothing. Then the
//! volume moves on, back to A, after a write on B: B compares each
//! snapshot that arrived only where it may differ from the volume (its
//! record of what was written to make it, and B's dm-era), not
//! everywhere. Every snapshot reads back on A as it was at first (sha256
//! of a volume made from it, and of a revert to one).

use std::path::Path;

use dmclone::api::proto::v1::{
    ListSnapshotsRequest, SnapshotState, snapshots_client::SnapshotsClient,
};

use super::{
    api::{create, delete, get, pool_used, publish, unpublish},
    fixture::AgentProcess,
    moves::{Ids, agent, export, fill, ids, public, start_move_with, wait_released},
    snapshots::{from_snapshot, revert, snapshot},
};
use crate::support::*;

const VOLUME: &str = "5d7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f";
const MOVE: Ids = ids(VOLUME, "6d7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
const BACK: Ids = ids(VOLUME, "6d7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e30");
const SNAPSHOTS: [&str; 3] = [
    "5e7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e01",
    "5e7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e02",
    "5e7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e03",
];
/// Volumes made on B from each snapshot, to read it.
const READERS: [&str; 3] = [
    "5f7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e01",
    "5f7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e02",
    "5f7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e03",
];
const SIZE: u64 = 64 * MIB;
/// Whole MiBs written after each snapshot: what differs between it and the
/// next newer one (the last: between the newest snapshot and the volume).
const WRITTEN_AFTER: [&[u64]; 3] = [&[4, 20], &[8], &[40, 41]];
/// Written on B while the volume arrives.
const WRITTEN_ON_B: u64 = 50 * MIB + 8192;
/// The MiB written on B before the volume moves on.
const WRITTEN_BEFORE_BACK: u64 = 30;

/// The bytes a source compared to send snapshot deltas, from its log.
fn compared_bytes(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("sending a snapshot's delta"))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("candidate_bytes="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no candidate_bytes in {l}"))
        })
        .sum()
}

async fn snapshots_on(agent: &AgentProcess) -> Vec<dmclone::api::proto::v1::Snapshot> {
    SnapshotsClient::new(agent.channel().await)
        .list_snapshots(ListSnapshotsRequest {
            volume_id: VOLUME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots
}

/// The volume on A with its three snapshots; the sha256 of each snapshot
/// (the volume's content when it was taken) and of the volume at the end.
async fn volume_with_snapshots(a: &AgentProcess) -> (Vec<String>, String) {
    let mut volumes = a.volumes().await;
    create(&mut volumes, VOLUME, SIZE).await.unwrap();
    let path = publish(&mut volumes, VOLUME).await.unwrap();
    let path = Path::new(&path);
    fill(path, 71, SIZE);
    let mut taken = Vec::new();
    for (n, (id, after)) in SNAPSHOTS.iter().zip(WRITTEN_AFTER).enumerate() {
        taken.push(sha256_of(path, SIZE));
        snapshot(a, id, VOLUME).await.unwrap();
        for mib in after {
            write_at(
                path,
                mib * MIB,
                &pattern(72 + n as u64, mib * MIB, MIB as usize),
            );
        }
    }
    let last = sha256_of(path, SIZE);
    unpublish(&mut volumes, VOLUME).await.unwrap();
    (taken, last)
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_travel_with_their_volume_as_deltas() {
    let mut a = agent("dmcttrva", 4495, "0a000000-0000-4000-8000-000000000095").await;
    let mut b = agent("dmcttrvb", 4496, "0b000000-0000-4000-8000-000000000096").await;
    let (taken, _) = volume_with_snapshots(&a).await;
    let (used_a, _) = pool_used(&a).await;

    // Both die in the middle of the first snapshot's delta: A once it has
    // sent a block of it, then B once it has written one it got from A back
    // again; each starts that snapshot afresh. (B cannot finish a snapshot
    // without writing: the newest differs from the volume.)
    a.arm("travel.after_send").await;
    b.arm("travel.after_write").await;
    let exported = export(MOVE, &a, &b).await.unwrap();
    start_move_with(MOVE, &a, &exported, &b, false, None)
        .await
        .unwrap();
    write_at(
        &public(MOVE, &b),
        WRITTEN_ON_B,
        &pattern(79, WRITTEN_ON_B, 4096),
    );
    a.dies_at("travel.after_send").await;
    b.dies_at("travel.after_write").await;
    let done = wait_released(MOVE, &b).await;

    let arrived = snapshots_on(&b).await;
    assert_eq!(arrived.len(), 3, "{arrived:?}");
    assert!(
        arrived
            .iter()
            .all(|s| s.state() == SnapshotState::Available),
        "{arrived:?}"
    );
    assert_eq!(
        (done.snapshots_total, done.snapshots_arrived),
        (3, 3),
        "{done:?}"
    );
    let deltas: u64 = WRITTEN_AFTER.iter().map(|w| w.len() as u64 * MIB).sum();
    let (used_b, _) = pool_used(&b).await;
    println!(
        "MEASURED 3 snapshots travelled: {} bytes received for {deltas} bytes of deltas (plus \
         what B wrote while the volume arrived); pool data {used_a} bytes on A, {used_b} on B",
        done.snapshot_bytes_received
    );
    // What B wrote while arriving is sent again, in dm-era's blocks.
    assert!(
        (deltas..=deltas + MIB).contains(&done.snapshot_bytes_received),
        "only the deltas cross: {done:?}"
    );
    assert!(
        used_b.abs_diff(used_a) * 10 <= used_a,
        "B holds the volume and its snapshots in about A's space: {used_a} on A, {used_b} on B"
    );
    assert!(
        snapshots_on(&a).await.is_empty(),
        "A dropped the snapshots that arrived"
    );
    assert!(
        get(&mut a.volumes().await, VOLUME).await.is_err(),
        "A dropped its copy"
    );

    // On again, back to A, after a MiB written on B.
    write_at(
        &public(MOVE, &b),
        WRITTEN_BEFORE_BACK * MIB,
        &pattern(80, WRITTEN_BEFORE_BACK * MIB, MIB as usize),
    );
    let on_b = sha256_of(&public(MOVE, &b), SIZE);
    unpublish(&mut b.volumes().await, VOLUME).await.unwrap();
    let exported = export(BACK, &b, &a).await.unwrap();
    start_move_with(BACK, &b, &exported, &a, false, None)
        .await
        .unwrap();
    let back = wait_released(BACK, &a).await;
    assert_eq!((back.snapshots_total, back.snapshots_arrived), (3, 3));
    let compared = compared_bytes(&b.log());
    println!(
        "MEASURED the snapshots moved on B -> A: B compared {compared} bytes (everywhere: {}), \
         {} bytes received",
        3 * SIZE,
        back.snapshot_bytes_received
    );
    // Each snapshot's own deltas and those of the newer ones, what B wrote
    // while the volume arrived and before it moved on, in whole blocks.
    let bound: u64 = (0..SNAPSHOTS.len())
        .map(|n| {
            let deltas: u64 = WRITTEN_AFTER[n..].iter().map(|w| w.len() as u64).sum();
            (deltas + 3) * MIB
        })
        .sum();
    assert!(
        compared <= bound,
        "B compares only where the snapshots may differ: {compared} bytes, at most {bound}"
    );
    assert!(
        (deltas + MIB..=deltas + 2 * MIB).contains(&back.snapshot_bytes_received),
        "the deltas and the MiB written on B cross: {back:?}"
    );

    // Each snapshot reads on A as it was at first: through a volume made
    // from it.
    let mut volumes_a = a.volumes().await;
    for ((snapshot, reader), sha) in SNAPSHOTS.iter().zip(READERS).zip(&taken) {
        from_snapshot(&mut volumes_a, reader, SIZE, snapshot)
            .await
            .unwrap();
        let path = publish(&mut volumes_a, reader).await.unwrap();
        assert_eq!(
            &sha256_of(Path::new(&path), SIZE),
            sha,
            "snapshot {snapshot}"
        );
        unpublish(&mut volumes_a, reader).await.unwrap();
        delete(&mut volumes_a, reader).await.unwrap();
    }
    assert_eq!(sha256_of(&public(BACK, &a), SIZE), on_b);
    // A revert to a snapshot that travelled there and back.
    unpublish(&mut volumes_a, VOLUME).await.unwrap();
    revert(&a, VOLUME, SNAPSHOTS[1]).await.unwrap();
    let path = publish(&mut volumes_a, VOLUME).await.unwrap();
    assert_eq!(sha256_of(Path::new(&path), SIZE), taken[1]);
    assert_ne!(on_b, taken[1]);
    b.destroy().await;
    a.destroy().await;
}
