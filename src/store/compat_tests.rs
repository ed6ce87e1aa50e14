//! A store written by release 0.1.0 (before records held typed ids) opens,
//! reconciles and serves. The fixture holds: volume ...01 (4 MiB, published,
//! tracked) with snapshot 10000000-...01, volume ...02 (8 MiB), and volume
//! ...03 arriving by deferred transfer 20000000-...01 from a local device;
//! thin ids 1-8 in the pool. Its transfer predates dm-era above the clone:
//! it keeps the clone as its public device until it finishes.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use crate::{
    ids::{SnapshotId, TransferId},
    testing::{MIB, TestHost, transfer_reaches, volume_id},
    transfer::TransferState,
};

const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/store-0.1.0.redb");

#[tokio::test]
async fn a_store_from_release_0_1_0_opens_reconciles_and_serves() {
    let host = TestHost::new();
    std::fs::write(host.dir.path().join("state.redb"), FIXTURE).unwrap();
    host.kernel.restore_thin_ids("dmt-pool", 1..=8);
    host.kernel
        .add_block_device_at(Path::new("/dev/fake-source"), 8 * MIB / 512);
    let agent = host.start().await.unwrap();

    let report = agent.reconcile_report();
    assert_eq!(report.volumes, 3);
    assert!(report.unknown_devices.is_empty());
    let published = agent.volumes.get_volume(&volume_id(1)).await.unwrap();
    assert!(published.published && published.change_tracking);
    assert_eq!(published.size_bytes, 4 * MIB);
    assert_eq!(
        agent
            .volumes
            .get_volume(&volume_id(2))
            .await
            .unwrap()
            .size_bytes,
        8 * MIB
    );
    let snapshot = SnapshotId::parse("10000000-0000-4000-8000-000000000001").unwrap();
    assert_eq!(
        agent
            .snapshots
            .get_snapshot(&snapshot)
            .await
            .unwrap()
            .volume_id,
        volume_id(1).to_string()
    );
    let transfer = TransferId::parse("20000000-0000-4000-8000-000000000001").unwrap();
    assert_eq!(
        agent.transfers.get_transfer(&transfer).await.unwrap().state,
        TransferState::Deferred
    );
    let table = host
        .kernel
        .table_text(&format!("dmt-{}", volume_id(3)))
        .unwrap();
    assert!(
        table.contains(" clone ") && table.contains("no_hydration"),
        "{table}"
    );

    // It serves: the transfer finishes, a snapshot and a volume go, one is made.
    agent.transfers.commit_transfer(&transfer).await.unwrap();
    host.kernel.hydrate(&format!("dmt-{}", volume_id(3)));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    agent.snapshots.delete_snapshot(&snapshot).await.unwrap();
    agent.volumes.delete_volume(&volume_id(2)).await.unwrap();
    let (made, _) = agent
        .volumes
        .create_volume(&volume_id(4), 4 * MIB)
        .await
        .unwrap();
    assert_eq!(made.size_bytes, 4 * MIB);
    assert!(
        !host.kernel.thin_ids("dmt-pool").contains(&4),
        "volume 2's thin id is freed"
    );
    assert!(
        host.kernel.thin_ids("dmt-pool").contains(&9),
        "ids continue after the store's"
    );
}
