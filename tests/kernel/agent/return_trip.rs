//! Return trips: a volume that moves back onto a host keeping its warm copy
//! copies only the regions written while it was away (measured in sectors
//! read from the other host's copy), also through a kill -9 of both agents
//! mid-copy; after a revert on the other host, whose
//! history then no longer reaches back to the copy, it copies everything
//! and says why.

use std::path::Path;

use dmclone::api::proto::v1::{HydrationKnobs, TransferState, VolumeState};

use super::{
    api::{create, get, publish, unpublish},
    fixture::AgentProcess,
    moves::{
        Ids, agent, agent_with, export, fill, get_transfer, ids, public, start_move_with,
        wait_released,
    },
    snapshots::{delete_snapshot, revert, snapshot},
    warm::move_between,
};
use crate::support::*;

const VOLUME: &str = "5b7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f";
const SNAPSHOT: &str = "5c7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f";
const SIZE: u64 = 64 * MIB;
const KIB: u64 = 1024;
/// The return trip's clone region: 256 of them in the volume.
const REGION: u64 = 256 * KIB;
/// Where the volume is written while away: 3 of its 256 regions (about
/// 1 %), spread, one write straddling nothing, one mid-region.
const WRITTEN_AWAY: [u64; 3] = [5 * MIB, 30 * MIB + 100 * KIB, 60 * MIB + 252 * KIB];

/// Polls the transfer on `destination` until it is finalized (its source
/// may still hold its copy).
async fn wait_finalized(ids: Ids, destination: &AgentProcess) {
    for _ in 0..2400 {
        let now = get_transfer(ids, destination).await;
        if now.state() == TransferState::Done {
            return;
        }
        assert!(
            !matches!(now.state(), TransferState::Failed | TransferState::Aborted),
            "{now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    panic!("not finalized in time");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_return_trip_copies_only_what_changed_while_away() {
    let away = ids(VOLUME, "6b7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
    let back = ids(VOLUME, "7b7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
    let again = ids(VOLUME, "8b7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
    let back_whole = ids(VOLUME, "9b7e0c1d-2b3c-4d5e-8f60-7a8b9c0d1e2f");
    let mut a = agent_with(
        "dmctrta",
        4493,
        "0a000000-0000-4000-8000-000000000093",
        &["--transfer-keep-source-copy-seconds", "3600"],
    )
    .await;
    let mut b = agent("dmctrtb", 4494, "0b000000-0000-4000-8000-000000000094").await;
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, VOLUME, SIZE).await.unwrap();
    let path = publish(&mut volumes_a, VOLUME).await.unwrap();
    fill(Path::new(&path), 93, SIZE);
    unpublish(&mut volumes_a, VOLUME).await.unwrap();
    let thin_a = format!("/dev/mapper/{}-thin-{VOLUME}", a.prefix);
    let read_before = sectors_read(Path::new(&thin_a));
    move_between(away, &a, &b).await;
    let first_trip = (sectors_read(Path::new(&thin_a)) - read_before) * 512;
    assert!(
        first_trip >= SIZE,
        "the first move copies all: {first_trip}"
    );

    // Away: written on B. B stays published, so that its copy (and the
    // counters of its thin device) outlive the copy back until looked at.
    let on_b = public(away, &b);
    for offset in WRITTEN_AWAY {
        write_at(&on_b, offset, &pattern(94, offset, 4096));
    }
    let written = sha256_of(&on_b, SIZE);
    let thin_b = format!("/dev/mapper/{}-thin-{VOLUME}", b.prefix);
    let read_before = sectors_read(Path::new(&thin_b));
    let exported = export(back, &b, &a).await.unwrap();
    let knobs = HydrationKnobs {
        region_bytes: REGION as u32,
        // Slow enough that the agent is killed mid-copy.
        max_bytes_per_second: REGION,
        ..Default::default()
    };
    let started = start_move_with(back, &b, &exported, &a, false, Some(knobs))
        .await
        .unwrap();
    let changed = WRITTEN_AWAY.len() as u64 * REGION;
    assert_eq!(
        (started.bytes_skipped, started.bytes_total),
        (SIZE - changed, changed),
        "{started:?}"
    );
    assert!(started.message.contains("return trip"), "{started:?}");
    // Both agents killed mid-copy: the kernel's clone and export go on,
    // and the restarted agents take up where they were.
    a.kill9().await;
    b.kill9().await;
    a.restart().await;
    b.restart().await;
    wait_finalized(back, &a).await;
    let copied = (sectors_read(Path::new(&thin_b)) - read_before) * 512;
    println!(
        "return trip of {SIZE} bytes, {changed} written away: {copied} bytes read from the \
         other host (the first trip: {first_trip})"
    );
    assert!(
        copied <= changed + REGION,
        "only the changed regions cross: {copied} bytes read for {changed} changed"
    );
    unpublish(&mut b.volumes().await, VOLUME).await.unwrap();
    let done = wait_released(back, &a).await;
    assert_eq!(done.bytes_skipped, SIZE - changed, "{done:?}");
    assert_eq!(sha256_of(&public(back, &a), SIZE), written);

    // Away again; reverted there: the history no longer reaches back to
    // the copy kept here, so the next trip back copies everything.
    unpublish(&mut a.volumes().await, VOLUME).await.unwrap();
    move_between(again, &a, &b).await;
    let mut volumes_b = b.volumes().await;
    snapshot(&b, SNAPSHOT, VOLUME).await.unwrap();
    write_at(&public(again, &b), 0, &pattern(95, 0, 4096));
    unpublish(&mut volumes_b, VOLUME).await.unwrap();
    revert(&b, VOLUME, SNAPSHOT).await.unwrap();
    delete_snapshot(&b, SNAPSHOT).await.unwrap();
    let path = publish(&mut volumes_b, VOLUME).await.unwrap();
    let reverted = sha256_of(Path::new(&path), SIZE);
    assert_eq!(reverted, written, "the revert undid the last write");
    unpublish(&mut volumes_b, VOLUME).await.unwrap();
    move_between(back_whole, &b, &a).await;
    let done = get_transfer(back_whole, &a).await;
    assert_eq!(
        (done.bytes_skipped, done.bytes_total),
        (0, SIZE),
        "{done:?}"
    );
    assert!(
        done.message.contains("full copy") && done.message.contains("does not begin"),
        "{done:?}"
    );
    let volume = get(&mut a.volumes().await, VOLUME).await.unwrap();
    assert_eq!(volume.state(), VolumeState::Available, "{volume:?}");
    assert_eq!(sha256_of(&public(back_whole, &a), SIZE), reverted);
    b.destroy().await;
    a.destroy().await;
}
