//! Snapshots travelling with their volume, on the in-memory kernel: the
//! source sends only blocks that differ from what the destination holds,
//! the destination makes each snapshot from the next newer one (the
//! newest from the volume) and writes only what differs, and the source
//! drops exactly the snapshots that arrived. (That the real pool shares
//! blocks as the source did, and the sha256 of every snapshot, the
//! real-kernel tier proves.)

#![allow(clippy::unwrap_used, clippy::single_range_in_vec_init)]

use std::collections::BTreeMap;

use super::{
    TransferState,
    move_tests::{HOST_A, arriving_over_nvme, wait_source_released, wait_until},
    release::{DeltaAsk, DeltaChunk, TravellingSnapshot},
    warm_tests::exported_for_move,
};
use crate::{
    agent::Agent,
    dm::names::DeviceName,
    error::AgentError,
    ids::{SnapshotId, TransferId, VolumeId},
    snapshot::SnapshotState,
    store::{ArrivedFrom, Change, SnapshotRecord},
    testing::{MIB, TestHost, refusal, transfer_reaches, volume_id},
};

const BLOCK: usize = 64 * 1024;

fn snapshot_id(n: u32) -> SnapshotId {
    SnapshotId::parse(volume_id(100 + n).as_ref()).unwrap()
}

fn block_of(byte: u8) -> Vec<u8> {
    vec![byte; BLOCK]
}

async fn write(agent: &Agent, device: &str, offset: u64, byte: u8) {
    agent
        .ctx
        .dm
        .write_at(&DeviceName::new(device).unwrap(), offset, block_of(byte))
        .await
        .unwrap();
}

/// Every chunk of a delta, joined.
async fn delta(
    agent: &Agent,
    id: &VolumeId,
    token: &super::token::ReleaseToken,
    ask: DeltaAsk,
) -> Result<Vec<DeltaChunk>, AgentError> {
    let mut chunks = agent
        .exports
        .read_snapshot_delta(id, HOST_A, Some(token), ask)
        .await?;
    let mut all = Vec::new();
    while let Some(chunk) = chunks.recv().await {
        all.push(chunk?);
    }
    Ok(all)
}

fn ask(snapshot: u32, against: Option<u32>) -> DeltaAsk {
    DeltaAsk {
        snapshot: snapshot_id(snapshot),
        against: against.map(snapshot_id),
        block_bytes: BLOCK as u64,
        also: Vec::new(),
        everything: false,
    }
}

/// Volume 1 with snapshot 1 (block 0 'a', block 16 'b'), then snapshot 2
/// (block 0 'A', block 32 'c'), then block 48 'd' written; exported for a
/// move to HOST_A.
async fn source_with_two_snapshots(
    host: &TestHost,
) -> (std::sync::Arc<Agent>, VolumeId, super::token::ReleaseToken) {
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    let thin = format!("dmt-thin-{id}");
    write(&agent, &thin, 0, b'a').await;
    write(&agent, &thin, MIB, b'b').await;
    agent
        .snapshots
        .create_snapshot(&snapshot_id(1), &id)
        .await
        .unwrap();
    write(&agent, &thin, 0, b'A').await;
    write(&agent, &thin, 2 * MIB, b'c').await;
    agent
        .snapshots
        .create_snapshot(&snapshot_id(2), &id)
        .await
        .unwrap();
    write(&agent, &thin, 3 * MIB, b'd').await;
    let token = exported_for_move(&agent, &id, HOST_A).await;
    (agent, id, token)
}

#[tokio::test]
async fn the_source_sends_only_the_blocks_where_a_snapshot_differs() {
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let (agent, id, token) = source_with_two_snapshots(&host).await;

    let answer = agent
        .exports
        .claim_export(&id, HOST_A, Some(&token), None)
        .await
        .unwrap();
    let offered: Vec<SnapshotId> = answer.snapshots.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        offered,
        vec![snapshot_id(1), snapshot_id(2)],
        "oldest first"
    );

    // The newest against the volume as exported: only block 48 differs.
    let newest = delta(&agent, &id, &token, ask(2, None)).await.unwrap();
    assert_eq!(
        newest,
        vec![DeltaChunk {
            offset: 3 * MIB,
            data: vec![0; BLOCK]
        }]
    );
    // The older against the newer: blocks 0 and 32.
    let older = delta(&agent, &id, &token, ask(1, Some(2))).await.unwrap();
    assert_eq!(
        older,
        vec![
            DeltaChunk {
                offset: 0,
                data: block_of(b'a')
            },
            DeltaChunk {
                offset: 2 * MIB,
                data: vec![0; BLOCK]
            },
        ]
    );
    // Blocks asked for go whatever they hold; `everything` sends it all.
    let also = DeltaAsk {
        also: vec![MIB..MIB + 4096],
        ..ask(2, None)
    };
    let offsets: Vec<u64> = delta(&agent, &id, &token, also)
        .await
        .unwrap()
        .iter()
        .map(|c| c.offset)
        .collect();
    assert_eq!(offsets, vec![MIB, 3 * MIB]);
    let everything = DeltaAsk {
        everything: true,
        ..ask(1, None)
    };
    let sent: usize = delta(&agent, &id, &token, everything)
        .await
        .unwrap()
        .iter()
        .map(|c| c.data.len())
        .sum();
    assert_eq!(sent as u64, 8 * MIB);
    assert!(
        !host.devices().iter().any(|d| d.contains("sread-")),
        "the snapshots are deactivated after reading: {:?}",
        host.devices()
    );
}

async fn record_of(agent: &Agent, snapshot: u32) -> SnapshotRecord {
    agent
        .ctx
        .snapshot_record(&snapshot_id(snapshot))
        .await
        .unwrap()
        .unwrap()
}

async fn put_record(agent: &Agent, record: SnapshotRecord) {
    agent
        .ctx
        .store_call(move |store| store.commit(vec![Change::put(&record)?]))
        .await
        .unwrap();
}

fn offsets(chunks: &[DeltaChunk]) -> Vec<u64> {
    chunks.iter().map(|c| c.offset).collect()
}

/// A snapshot whose record does not bound where it differs from the
/// volume (made here by travel in another history, or before such records
/// were kept) is compared everywhere, and only what differs goes.
#[tokio::test]
async fn a_snapshot_that_arrived_without_bounds_is_compared_everywhere() {
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let (agent, id, token) = source_with_two_snapshots(&host).await;
    let since_two = record_of(&agent, 2)
        .await
        .era
        .expect("a tracked volume's snapshot has an era");
    put_record(
        &agent,
        SnapshotRecord {
            era: None,
            arrived_from: Some(ArrivedFrom {
                era: since_two ^ (1 << 32),
                differs: Vec::new(),
            }),
            ..record_of(&agent, 1).await
        },
    )
    .await;
    let elsewhere = delta(&agent, &id, &token, ask(1, Some(2))).await.unwrap();
    assert_eq!(offsets(&elsewhere), vec![0, 2 * MIB]);
    put_record(
        &agent,
        SnapshotRecord {
            arrived_from: None,
            ..record_of(&agent, 1).await
        },
    )
    .await;
    let unknown = delta(&agent, &id, &token, ask(1, None)).await.unwrap();
    assert_eq!(offsets(&unknown), vec![0, 2 * MIB, 3 * MIB]);
}

#[tokio::test]
async fn a_delta_is_refused_to_any_other_host_without_the_token_or_for_another_volume() {
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let (agent, id, token) = source_with_two_snapshots(&host).await;
    let other = volume_id(2);
    agent.volumes.create_volume(&other, 8 * MIB).await.unwrap();
    agent
        .snapshots
        .create_snapshot(&snapshot_id(9), &other)
        .await
        .unwrap();

    let elsewhere = agent
        .exports
        .read_snapshot_delta(&id, super::move_tests::HOST_B, Some(&token), ask(1, None))
        .await;
    assert_eq!(refusal(&elsewhere), Some("VOLUME_EXPORTED_ELSEWHERE"));
    let tokenless = agent
        .exports
        .read_snapshot_delta(&id, HOST_A, None, ask(1, None))
        .await;
    assert!(matches!(
        tokenless,
        Err(AgentError::PermissionDenied { .. })
    ));
    let foreign = delta(&agent, &id, &token, ask(9, None)).await;
    assert!(matches!(
        foreign,
        Err(AgentError::InvalidArgument {
            field: "snapshot_id",
            ..
        })
    ));
    let unknown = delta(&agent, &id, &token, ask(5, None)).await;
    assert!(matches!(unknown, Err(AgentError::NotFound { .. })));
    let odd = DeltaAsk {
        block_bytes: 1000,
        ..ask(1, None)
    };
    assert!(matches!(
        delta(&agent, &id, &token, odd).await,
        Err(AgentError::InvalidArgument {
            field: "block_bytes",
            ..
        })
    ));
}

#[tokio::test]
async fn a_release_drops_the_snapshots_that_arrived_and_keeps_the_rest_with_the_copy() {
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let (agent, id, token) = source_with_two_snapshots(&host).await;
    agent
        .exports
        .release_volume_and_snapshots(&id, HOST_A, Some(&token), &[snapshot_id(2)])
        .await
        .unwrap();
    assert_eq!(
        listed(&agent, Some(&id)).await,
        vec![snapshot_id(1)],
        "only the one that arrived goes"
    );
    let copy = agent.ctx.record(&id).await.unwrap().unwrap();
    assert!(
        copy.warm.is_some(),
        "the copy stays, warm, for its snapshot"
    );
    agent
        .snapshots
        .delete_snapshot(&snapshot_id(1))
        .await
        .unwrap();
    assert!(
        agent.ctx.record(&id).await.unwrap().is_none(),
        "the copy goes with its last snapshot"
    );

    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let (agent, id, token) = source_with_two_snapshots(&host).await;
    agent
        .exports
        .release_volume_and_snapshots(&id, HOST_A, Some(&token), &[snapshot_id(1), snapshot_id(2)])
        .await
        .unwrap();
    assert!(
        agent.ctx.record(&id).await.unwrap().is_none(),
        "all arrived: the copy goes"
    );
    assert!(listed(&agent, Some(&id)).await.is_empty());
}

/// The ids of the snapshots `agent` lists (of `volume`, or all).
async fn listed(agent: &Agent, volume: Option<&VolumeId>) -> Vec<SnapshotId> {
    let views = agent.snapshots.list_snapshots(volume).await.unwrap();
    views.into_iter().map(|s| s.id).collect()
}

fn offered(n: u32) -> TravellingSnapshot {
    TravellingSnapshot {
        id: snapshot_id(n),
        size_bytes: 8 * MIB,
        created_unix: 1_700_000_000 + i64::from(n),
    }
}

/// What the snapshot's thin device holds, by 4 KiB page.
async fn pages(host: &TestHost, agent: &Agent, snapshot: u32) -> BTreeMap<u64, Vec<u8>> {
    let record = agent
        .ctx
        .snapshot_record(&snapshot_id(snapshot))
        .await
        .unwrap()
        .unwrap();
    host.kernel.thin_pages("dmt-pool", record.thin_id.0)
}

#[tokio::test]
async fn snapshots_arrive_newest_first_each_from_the_next_and_the_source_learns_which() {
    let host = TestHost::new();
    host.releases.answer();
    host.releases.offer_snapshots(vec![
        (
            offered(1),
            vec![DeltaChunk {
                offset: 0,
                data: block_of(b'a'),
            }],
        ),
        (
            offered(2),
            vec![DeltaChunk {
                offset: 2 * MIB,
                data: block_of(b'c'),
            }],
        ),
        // Gone from the source by the time it is asked for.
        (offered(3), Vec::new()),
        // A size no volume here has: not believed, it stays there.
        (
            TravellingSnapshot {
                size_bytes: 8 * MIB + 512,
                ..offered(4)
            },
            vec![DeltaChunk {
                offset: 0,
                data: block_of(b'x'),
            }],
        ),
    ]);
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    wait_until(async || listed(&agent, Some(&id)).await.len() == 3).await;
    let listed = agent.snapshots.list_snapshots(Some(&id)).await.unwrap();
    assert!(
        listed.iter().all(|s| s.state == SnapshotState::Arriving),
        "{listed:?}"
    );
    assert!(!listed.iter().any(|s| s.id == snapshot_id(4)), "{listed:?}");
    let early = agent.snapshots.delete_snapshot(&snapshot_id(1)).await;
    assert_eq!(refusal(&early), Some("SNAPSHOT_PENDING"));
    let early = agent
        .snapshots
        .create_volume_from_snapshot(&volume_id(7), 8 * MIB, &snapshot_id(1))
        .await;
    assert_eq!(refusal(&early), Some("SNAPSHOT_PENDING"));

    // What this host holds of the volume when it arrives: block 16 'v'.
    write(&agent, &format!("dmt-thin-{id}"), MIB, b'v').await;
    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    wait_source_released(&agent, &transfer).await;

    let asks = host.releases.delta_asks();
    let order: Vec<(SnapshotId, Option<SnapshotId>)> = asks
        .iter()
        .map(|a| (a.snapshot.clone(), a.against.clone()))
        .collect();
    assert_eq!(
        order[..2],
        [(snapshot_id(3), None), (snapshot_id(2), None),],
        "the newest first, from the volume (3 is gone, so 2 is made from the volume too)"
    );
    assert_eq!(order[2], (snapshot_id(1), Some(snapshot_id(2))));
    // Snapshot 2: the volume's block 16 shared, block 32 written from the delta.
    let two = pages(&host, &agent, 2).await;
    assert_eq!(two.get(&(MIB / 4096)), Some(&vec![b'v'; 4096]));
    assert_eq!(two.get(&(2 * MIB / 4096)), Some(&vec![b'c'; 4096]));
    // Snapshot 1: made from 2, block 0 from its delta.
    let one = pages(&host, &agent, 1).await;
    assert_eq!(one.get(&0), Some(&vec![b'a'; 4096]));
    assert_eq!(one.get(&(2 * MIB / 4096)), Some(&vec![b'c'; 4096]));

    // Each keeps where it may differ from the volume: 2 where its delta
    // was written, 1 there and where its own was; both from the era the
    // volume was snapshotted at, and neither has an era of its own.
    let two = record_of(&agent, 2).await;
    let one = record_of(&agent, 1).await;
    let (Some(two_from), Some(one_from)) = (&two.arrived_from, &one.arrived_from) else {
        panic!("arrived snapshots keep where they differ: {two:?} {one:?}");
    };
    assert_eq!(two_from.differs, vec![2 * MIB..2 * MIB + BLOCK as u64]);
    assert_eq!(
        one_from.differs,
        vec![0..BLOCK as u64, 2 * MIB..2 * MIB + BLOCK as u64]
    );
    assert_eq!(one_from.era, two_from.era);
    assert_eq!((one.era, two.era), (None, None));

    let listed = agent.snapshots.list_snapshots(Some(&id)).await.unwrap();
    let ids: Vec<&SnapshotId> = listed.iter().map(|s| &s.id).collect();
    assert_eq!(
        ids.len(),
        2,
        "the one gone from the source is gone here: {listed:?}"
    );
    assert!(listed.iter().all(|s| s.state == SnapshotState::Available));
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!((view.snapshots_total, view.snapshots_arrived), (3, 2));
    assert_eq!(view.snapshot_bytes_received, 2 * BLOCK as u64);
    let release = host
        .releases
        .requests()
        .into_iter()
        .find(|r| r.action == super::release::SourceAction::Release)
        .unwrap();
    assert_eq!(
        release.snapshots_moved,
        vec![snapshot_id(2), snapshot_id(1)],
        "the source drops exactly those that arrived"
    );
    assert!(
        !host.devices().iter().any(|d| d.contains("snap-")),
        "no snapshot stays active: {:?}",
        host.devices()
    );
}

/// The volume arrives before the source answered the claim (it was down):
/// the source is asked for its snapshots before it is released, and they
/// travel all the same.
#[tokio::test]
async fn snapshots_travel_even_when_the_volume_arrived_before_the_claim_answer() {
    let host = offering_one_snapshot();
    host.releases.answer_claims_with(&["node-a"]);
    host.releases.answer_history(7);
    host.releases.stop_answering();
    let agent = host.start().await.unwrap();
    let (id, transfer) = start_move(&host, &agent, |_| {}).await;
    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    assert!(listed(&agent, Some(&id)).await.is_empty());
    let claims = host.releases.claims().len();
    wait_until(async || host.releases.claims().len() > claims).await;
    assert!(
        host.releases.requests().is_empty(),
        "released before listed"
    );

    host.releases.answer();
    wait_source_released(&agent, &transfer).await;
    let release = &host.releases.requests()[0];
    assert_eq!(release.snapshots_moved, vec![snapshot_id(1)]);
    let one = pages(&host, &agent, 1).await;
    assert_eq!(one.get(&0), Some(&vec![b'a'; 4096]));
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!((view.snapshots_total, view.snapshots_arrived), (1, 1));
    // The late answer is recorded as a timely one would be: where the
    // volume came from. (That this host's history is then believed, so
    // only what it wrote is asked for, needs dm-era: the Cinder e2e's trip
    // back checks the bytes received.)
    assert_eq!(view.upstream, ["node-a"]);
}

/// A host whose source agents answer, offering snapshot 1 (block 0 'a').
fn offering_one_snapshot() -> TestHost {
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    host.releases.answer();
    host.releases.offer_snapshots(vec![(
        offered(1),
        vec![DeltaChunk {
            offset: 0,
            data: block_of(b'a'),
        }],
    )]);
    host
}

/// Starts moving volume 1 onto `agent` over NVMe/TCP, the request as
/// `adjust` leaves it.
async fn start_move(
    host: &TestHost,
    agent: &Agent,
    adjust: impl FnOnce(&mut super::StartRequest),
) -> (VolumeId, TransferId) {
    host.fabric
        .offer(super::move_tests::SOURCE_SUBSYSTEM, 8 * MIB);
    let id = volume_id(1);
    let mut request = super::move_tests::nvme_request(1, &id, "unix:/run/source-agent.sock");
    adjust(&mut request);
    let transfer = request.transfer.clone();
    agent.transfers.start_transfer(request).await.unwrap();
    (id, transfer)
}

#[tokio::test]
async fn a_move_that_leaves_the_snapshots_asks_for_none() {
    let host = offering_one_snapshot();
    let agent = host.start().await.unwrap();
    let (id, transfer) = start_move(&host, &agent, |r| r.leave_snapshots = true).await;
    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    wait_until(async || !host.releases.requests().is_empty()).await;
    assert!(host.releases.delta_asks().is_empty());
    assert!(listed(&agent, Some(&id)).await.is_empty());
    assert!(host.releases.requests()[0].snapshots_moved.is_empty());
}

#[tokio::test]
async fn a_volume_moves_on_only_once_its_snapshots_have_arrived() {
    let host = offering_one_snapshot();
    host.releases.hold_deltas(true);
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    // The claim's answer, which lists the snapshot, comes first.
    wait_until(async || listed(&agent, Some(&id)).await.len() == 1).await;
    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    wait_until(async || !host.releases.delta_asks().is_empty()).await;
    let onward = agent.exports.export_volume(&id, HOST_A, true).await;
    assert_eq!(refusal(&onward), Some("SNAPSHOT_PENDING"));
    agent.volumes.unpublish_volume(&id).await.unwrap();
    let revert = agent.snapshots.revert_volume(&id, &snapshot_id(1)).await;
    assert_eq!(refusal(&revert), Some("SNAPSHOT_PENDING"));
    assert!(
        host.releases.requests().is_empty(),
        "the source keeps its copies meanwhile"
    );

    host.releases.hold_deltas(false);
    // The next ask comes after the travel's backoff (1, 2, 4 s ...).
    for _ in 0..300 {
        if !host.releases.requests().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        host.releases.requests()[0].snapshots_moved,
        vec![snapshot_id(1)]
    );
    agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_aborted_move_leaves_no_arriving_snapshot_behind() {
    let host = offering_one_snapshot();
    let agent = host.start().await.unwrap();
    let (_, transfer) = start_move(&host, &agent, |r| r.deferred = true).await;
    wait_until(async || listed(&agent, None).await.len() == 1).await;
    agent
        .transfers
        .abort_transfer(&transfer, false)
        .await
        .unwrap();
    assert!(listed(&agent, None).await.is_empty());
    assert!(host.releases.delta_asks().is_empty());
}
