//! Chained moves against the in-memory kernel and fabric, from the middle
//! host's side (A→B→C, this agent is B): an arriving volume moves on only
//! for a move, once its source told where it comes from and within the
//! chain's depth; its export serves the clone beneath dm-era; the release by
//! C drops B's partial copy and releases A, also across a crash.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::{
    TransferState,
    move_tests::{
        HOST_A, HOST_B, arriving_over_nvme, subsystem_of, the_token, thresholds_told,
        wait_for_record, wait_source_released, wait_until,
    },
};
use crate::{
    agent::Agent,
    error::AgentError,
    ids::TransferId,
    testing::{TestHost, crash, refusal, transfer_reaches},
    transfer::{export::UnexportRequest, release::SourceAction},
};

fn middle_host() -> TestHost {
    TestHost::new().with_export_address("192.0.2.1:4420")
}

/// Waits until the transfer's source answered its claim.
async fn knows_its_upstream(agent: &Agent, transfer: &TransferId) {
    wait_for_record(agent, transfer, |t| t.upstream.is_some()).await;
}

#[tokio::test]
async fn an_arriving_volume_moves_on_once_it_knows_its_chain() {
    let host = middle_host();
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    // The source does not answer: the export onward cannot know the
    // chain's depth (it asks the source itself, in vain).
    let early = agent.exports.export_volume(&id, HOST_B, true).await;
    assert!(
        matches!(early, Err(AgentError::Unavailable { .. })),
        "its source has not answered the claim: {early:?}"
    );
    assert!(
        host.fabric.exports().is_empty(),
        "a refusal changes nothing"
    );
    host.releases.answer_claims_with(&["node-a"]);
    host.releases.answer();
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!(
        view.source,
        "nvme-tcp 192.0.2.7:4420 nqn.2014-08.io.dmclone:node-src:00000000-0000-4000-8000-000000000001"
    );

    let attach = agent.exports.export_volume(&id, HOST_B, false).await;
    assert_eq!(refusal(&attach), Some("VOLUME_ARRIVING"), "{attach:?}");
    let onward = agent
        .exports
        .export_volume(&id, HOST_B, true)
        .await
        .unwrap();
    let recorded = agent.ctx.transfer_record(&transfer).await.unwrap().unwrap();
    assert_eq!(recorded.upstream, Some(vec!["node-a".to_owned()]));
    assert_eq!(
        agent
            .transfers
            .get_transfer(&transfer)
            .await
            .unwrap()
            .upstream,
        ["node-a"]
    );
    let subsystem = subsystem_of(&agent, &id).await;
    assert_eq!(
        host.fabric.exports()[&subsystem],
        (HOST_B.to_owned(), format!("/dev/mapper/dmt-lower-{id}")),
        "the export serves the clone beneath dm-era"
    );
    let token = onward.release_token.unwrap();
    let chain = agent
        .exports
        .claim_export(&id, HOST_B, Some(&token), None)
        .await
        .unwrap()
        .upstream;
    assert_eq!(chain, [agent.ctx.node_id.clone(), "node-a".to_owned()]);
    // Claimed: the host it moves on to copies through this one, whose own
    // copy waits (it is dropped once that host holds every byte).
    let lower = format!("dmt-lower-{id}");
    wait_until(async || {
        thresholds_told(&host, &lower)
            .last()
            .is_some_and(|t| t == "0")
    })
    .await;
    let waiting = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!(waiting.state, TransferState::Hydrating);
    assert!(waiting.message.starts_with("moving on: "), "{waiting:?}");
    let other = agent.exports.export_volume(&id, HOST_A, true).await;
    assert!(
        matches!(other, Err(AgentError::AlreadyExists { .. })),
        "{other:?}"
    );
    let abort = agent.transfers.abort_transfer(&transfer, true).await;
    assert_eq!(refusal(&abort), Some("VOLUME_EXPORTED"), "{abort:?}");
    // A restart restores the export onto the clone, which still hydrates.
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(
        host.fabric.exports()[&subsystem].1,
        format!("/dev/mapper/dmt-lower-{id}")
    );
    assert_eq!(
        agent.transfers.get_transfer(&transfer).await.unwrap().state,
        TransferState::Hydrating
    );
    // That move aborted (its destination withdraws the export): this copy
    // goes on.
    let withdraw = UnexportRequest {
        token: Some(token),
        ..UnexportRequest::default()
    };
    agent.exports.unexport_volume(&id, &withdraw).await.unwrap();
    wait_until(async || {
        thresholds_told(&host, &lower)
            .last()
            .is_some_and(|t| t != "0")
    })
    .await;
    let copying = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert!(!copying.message.starts_with("moving on"), "{copying:?}");
}

#[tokio::test]
async fn a_chain_is_bounded_by_its_depth() {
    let host = middle_host();
    host.releases
        .answer_claims_with(&["node-c", "node-b", "node-a"]);
    host.releases.answer();
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    knows_its_upstream(&agent, &transfer).await;
    let deeper = agent.exports.export_volume(&id, HOST_B, true).await;
    assert_eq!(refusal(&deeper), Some("CHAIN_TOO_DEEP"), "{deeper:?}");
    assert!(
        host.fabric.exports().is_empty(),
        "a refusal changes nothing"
    );
    // Once this host holds every byte it is the start of a new chain.
    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    agent
        .exports
        .export_volume(&id, HOST_B, true)
        .await
        .unwrap();
}

/// C holds every byte and releases B: B's partial copy goes, with its
/// export, devices and connection to A, and A is asked to release. A crash
/// after the record, or after the teardown, is finished by the next start.
#[tokio::test]
async fn the_release_of_a_copy_still_arriving_passes_on_to_its_source() {
    for crash_at in [
        None,
        Some("release.after_pass_on_record"),
        Some("release.after_pass_on_teardown"),
    ] {
        let host = middle_host();
        host.releases.answer_claims_with(&["node-a"]);
        host.releases.answer();
        let (agent, id, transfer) = arriving_over_nvme(&host).await;
        knows_its_upstream(&agent, &transfer).await;
        let token = agent
            .exports
            .export_volume(&id, HOST_B, true)
            .await
            .unwrap()
            .release_token
            .unwrap();
        let published = agent
            .exports
            .release_volume(&id, HOST_B, Some(&token))
            .await;
        assert_eq!(
            refusal(&published),
            Some("VOLUME_PUBLISHED"),
            "{published:?}"
        );
        let wrong = agent
            .exports
            .release_volume(&id, HOST_A, Some(&token))
            .await;
        assert_eq!(
            refusal(&wrong),
            Some("VOLUME_EXPORTED_ELSEWHERE"),
            "{wrong:?}"
        );
        agent.volumes.unpublish_volume(&id).await.unwrap();
        let agent = if let Some(point) = crash_at {
            let (caller, volume, held) = (Arc::clone(&agent), id.clone(), token.clone());
            crash(point, async move {
                caller
                    .exports
                    .release_volume(&volume, HOST_B, Some(&held))
                    .await
            })
            .await;
            host.restart(agent).await.unwrap()
        } else {
            agent
                .exports
                .release_volume(&id, HOST_B, Some(&token))
                .await
                .unwrap();
            agent
        };
        assert!(agent.volumes.get_volume(&id).await.is_err(), "dropped");
        assert!(
            !host.devices().iter().any(|d| d.contains(id.as_str())),
            "{:?}",
            host.devices()
        );
        assert!(host.fabric.exports().is_empty());
        assert!(host.fabric.connections().is_empty(), "A is let go");
        let view = agent.transfers.get_transfer(&transfer).await.unwrap();
        assert_eq!(view.state, TransferState::Done);
        assert_eq!(view.passed_on_to.as_deref(), Some(HOST_B));
        wait_until(async || {
            host.releases
                .requests()
                .iter()
                .any(|r| r.action == SourceAction::Release && r.token == Some(the_token()))
        })
        .await;
        wait_source_released(&agent, &transfer).await;
        // C asking again (its acknowledgement lost) is answered as done.
        agent
            .exports
            .release_volume(&id, HOST_B, Some(&token))
            .await
            .unwrap();
    }
}
