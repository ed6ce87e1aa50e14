//! Return trips: a volume that moves back onto a host keeping its warm copy
//! lands on that copy, and only what the source says changed is copied.
//! (That the kernel then copies exactly those regions, and what the
//! source's dm-era answers, the real-kernel tier proves.)

#![allow(clippy::unwrap_used, clippy::single_range_in_vec_init)]

use super::{
    StartRequest,
    move_tests::{HOST_A, SOURCE_SUBSYSTEM, nvme_request, start_arriving, wait_until},
    release::{ReturnTripAsk, ReturnTripDelta},
    warm_tests::{exported_for_move, keeping_host, released},
};
use crate::{
    ids::VolumeId,
    store::HistoryOrigin,
    testing::{MIB, TestHost},
};

fn journal_position(host: &TestHost, entry: &str) -> usize {
    host.kernel
        .journal()
        .iter()
        .position(|e| e.starts_with(entry))
        .unwrap_or_else(|| panic!("no {entry:?} in {:#?}", host.kernel.journal()))
}

/// A host keeping volume 1's warm copy, whose source answers return trips
/// with `delta`.
async fn returning_to(
    delta: ReturnTripDelta,
) -> (TestHost, std::sync::Arc<crate::agent::Agent>, VolumeId) {
    let host = keeping_host();
    let (agent, id) = released(&host).await;
    host.releases.answer();
    host.releases.answer_return_trips_with(delta);
    (host, agent, id)
}

/// Whether the source was asked what changed.
fn asked_what_changed(host: &TestHost) -> bool {
    host.releases
        .claims()
        .iter()
        .any(|c| c.return_trip.is_some())
}

/// How many discards the clone was sent.
fn discards(host: &TestHost) -> usize {
    host.kernel
        .journal()
        .iter()
        .filter(|e| e.starts_with("discard "))
        .count()
}

#[tokio::test]
async fn a_move_back_lands_on_the_warm_copy_and_discards_every_unchanged_region() {
    let (host, agent, id) = returning_to(ReturnTripDelta::Changed(vec![
        MIB..2 * MIB,
        5 * MIB..6 * MIB,
    ]))
    .await;
    let copy = agent.ctx.record(&id).await.unwrap().unwrap();
    let history = copy.tracking.as_ref().unwrap().history;
    let thin_ids = host.kernel.thin_ids("dmt-pool").len();

    let (_, transfer) = start_arriving(&host, &agent).await.unwrap();

    let claims = host.releases.claims();
    let asked = claims.iter().find_map(|c| c.return_trip.clone()).unwrap();
    assert_eq!(
        asked,
        ReturnTripAsk {
            origin: HistoryOrigin {
                node_id: agent.ctx.node_id.clone(),
                history,
            },
            region_bytes: MIB,
        },
        "the source is asked about this host's copy"
    );
    let lower = format!("dmt-lower-{id}");
    let discard = format!(
        "discard {lower} 0..{},{}..{},{}..{}",
        MIB,
        2 * MIB,
        5 * MIB,
        6 * MIB,
        8 * MIB
    );
    assert!(
        journal_position(&host, &discard)
            < journal_position(&host, &format!("message {lower} enable_hydration")),
        "regions are discarded before hydration starts"
    );
    assert!(
        host.kernel
            .table_text(&lower)
            .unwrap()
            .contains("no_discard_passdown"),
        "discards must not reach the copy"
    );
    assert!(
        host.kernel
            .journal()
            .contains(&format!("zero dmt-emeta-{id}")),
        "the copy's era metadata starts afresh"
    );
    let arrived = agent.ctx.record(&id).await.unwrap().unwrap();
    assert_eq!(arrived.thin_id, copy.thin_id, "the clone lands on the copy");
    assert_eq!(arrived.warm, None);
    assert_ne!(arrived.tracking.as_ref().unwrap().history, history);
    assert_eq!(
        host.kernel.thin_ids("dmt-pool").len(),
        thin_ids + 1,
        "only the clone's metadata is new"
    );
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!(view.bytes_skipped, 6 * MIB);
    assert_eq!(view.bytes_total, 2 * MIB);
    assert!(view.message.contains("return trip"), "{}", view.message);

    // A pause and a resume copy on: nothing is asked or discarded again.
    agent.transfers.pause_transfer(&transfer).await.unwrap();
    agent.transfers.resume_transfer(&transfer).await.unwrap();
    assert_eq!(discards(&host), 1);
}

#[tokio::test]
async fn a_return_trip_asks_what_changed_before_it_makes_its_devices() {
    let (host, agent, id) = returning_to(ReturnTripDelta::Changed(vec![0..MIB])).await;
    // The first device the start makes: had the question waited for the
    // stack, it would never be asked.
    host.kernel.fail_next(
        "create",
        &format!("dmt-cmeta-{id}"),
        nix::errno::Errno::ENOSPC,
    );

    assert!(start_arriving(&host, &agent).await.is_err());

    assert!(
        asked_what_changed(&host),
        "the source is asked while the stack is made"
    );
    assert_eq!(discards(&host), 0, "nothing is discarded without a clone");
    assert!(agent.transfers.list_transfers().await.unwrap().is_empty());
    let left: Vec<_> = host
        .devices()
        .into_iter()
        .filter(|d| d.contains(id.as_str()))
        .collect();
    assert!(left.is_empty(), "the start took back its devices: {left:?}");
}

#[tokio::test]
async fn a_source_that_cannot_tell_what_changed_makes_a_full_copy_that_says_why() {
    let (host, agent, id) =
        returning_to(ReturnTripDelta::WholeCopy("it was reverted".into())).await;
    let (_, transfer) = start_arriving(&host, &agent).await.unwrap();
    assert_eq!(discards(&host), 0, "nothing is marked held");
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!((view.bytes_skipped, view.bytes_total), (0, 8 * MIB));
    assert_eq!(view.message, "full copy: it was reverted");
    assert!(agent.ctx.record(&id).await.unwrap().unwrap().warm.is_none());
}

#[tokio::test]
async fn a_deferred_return_trip_asks_what_changed_at_its_commit() {
    let (host, agent, id) = returning_to(ReturnTripDelta::Changed(vec![0..MIB])).await;
    let request = nvme_request(1, &id, "unix:/run/source-agent.sock");
    let transfer = request.transfer.clone();
    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    agent
        .transfers
        .start_transfer(StartRequest {
            deferred: true,
            ..request
        })
        .await
        .unwrap();
    assert!(
        !asked_what_changed(&host),
        "not asked while the source may still be written"
    );
    agent.transfers.commit_transfer(&transfer).await.unwrap();
    assert!(asked_what_changed(&host));
    let discard = format!("discard dmt-lower-{id} {}..{}", MIB, 8 * MIB);
    assert!(
        host.kernel.journal().contains(&discard),
        "{:#?}",
        host.kernel.journal()
    );
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!(view.bytes_skipped, 7 * MIB);
}

#[tokio::test]
async fn an_arriving_volume_records_where_its_history_began_and_a_source_checks_it() {
    let host = TestHost::new().with_export_address("192.0.2.1:4420");
    let agent = host.start().await.unwrap();
    host.releases.answer_claims_with(&["node-a"]);
    host.releases.answer_history(77);
    host.releases.answer();
    let (id, _) = start_arriving(&host, &agent).await.unwrap();
    let wanted = HistoryOrigin {
        node_id: "node-a".into(),
        history: 77,
    };
    wait_until(async || {
        let record = agent.ctx.record(&id).await.unwrap().unwrap();
        record.tracking.unwrap().origin == Some(wanted.clone())
    })
    .await;

    // Exported onward (to HOST_A, the origin's host here): a return trip
    // from another copy is told to copy everything, and why.
    let token = exported_for_move(&agent, &id, HOST_A).await;
    let elsewhere = ReturnTripAsk {
        origin: HistoryOrigin {
            node_id: "node-b".into(),
            history: 77,
        },
        region_bytes: MIB,
    };
    let answer = agent
        .exports
        .claim_export(&id, HOST_A, Some(&token), Some(&elsewhere))
        .await
        .unwrap();
    match answer.return_trip {
        Some(ReturnTripDelta::WholeCopy(reason)) => {
            assert!(reason.contains("node-b"), "{reason}")
        }
        other => panic!("a copy elsewhere gets a whole copy, not {other:?}"),
    }
    assert_eq!(answer.upstream[0], agent.ctx.node_id);
    assert!(answer.history.is_some());
}
