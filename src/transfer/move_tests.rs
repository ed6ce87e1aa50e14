//! Both ends of a move against the in-memory kernel and NVMe/TCP fabric:
//! the source's exports (one host each), its release of the copy, its
//! restart with exports lost or left over; the destination's connect to
//! the source, its disconnect once the volume is local, and its request
//! that the source let go.

#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use super::*;
use crate::{
    error::AgentError,
    ids::{TransferId, VolumeId},
    nvme::{Fabric, Nqn, PortSpec, TcpAddress, namespace_ids, subsystem_nqn},
    testing::{MIB, TestHost, refusal, transfer_reaches, volume_id},
    transfer::{export::UnexportRequest, release::SourceAction, token::ReleaseToken},
};

pub(super) const HOST_A: &str =
    "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001";
pub(super) const HOST_B: &str =
    "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-000000000002";
pub(super) const SOURCE_SUBSYSTEM: &str =
    "nqn.2014-08.io.dmclone:node-src:00000000-0000-4000-8000-000000000001";

fn exporting_host() -> TestHost {
    TestHost::new().with_export_address("192.0.2.1:4420")
}

pub(super) async fn subsystem_of(agent: &crate::agent::Agent, id: &VolumeId) -> String {
    let node = agent.node_info().await.unwrap().node_id;
    subsystem_nqn(&format!("nqn.2014-08.io.dmclone:{node}"), id)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn an_export_admits_one_host_and_unexport_leaves_nothing() {
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    let view = agent
        .exports
        .export_volume(&id, HOST_A, false)
        .await
        .unwrap();
    assert_eq!(view.release_token, None, "an attachment's export has none");
    let subsystem = subsystem_of(&agent, &id).await;
    assert_eq!(view.subsystem_nqn, subsystem);
    assert_eq!((view.address.as_str(), view.port), ("192.0.2.1", 4420));
    let exported = host.fabric.exports();
    assert_eq!(
        exported[&subsystem],
        (HOST_A.to_owned(), format!("/dev/mapper/dmt-thin-{id}"))
    );
    // A retry is the same export; another host is a conflict.
    assert_eq!(
        agent
            .exports
            .export_volume(&id, HOST_A, false)
            .await
            .unwrap(),
        view
    );
    let other = agent.exports.export_volume(&id, HOST_B, false).await;
    assert!(
        matches!(other, Err(AgentError::AlreadyExists { .. })),
        "{other:?}"
    );
    assert_eq!(host.fabric.exports(), exported, "a refusal changes nothing");
    let delete = agent.volumes.delete_volume(&id).await;
    assert_eq!(refusal(&delete), Some("VOLUME_EXPORTED"), "{delete:?}");
    let extend = agent.volumes.extend_volume(&id, 16 * MIB).await;
    assert_eq!(refusal(&extend), Some("VOLUME_EXPORTED"), "{extend:?}");

    let released = agent.exports.release_volume(&id, HOST_A, None).await;
    assert_eq!(
        refusal(&released),
        Some("EXPORT_NOT_FOR_TRANSFER"),
        "{released:?}"
    );
    let anyone = UnexportRequest::default();
    agent.exports.unexport_volume(&id, &anyone).await.unwrap();
    agent.exports.unexport_volume(&id, &anyone).await.unwrap();
    assert!(host.fabric.exports().is_empty());
    let released = agent.exports.release_volume(&id, HOST_A, None).await;
    assert_eq!(
        refusal(&released),
        Some("EXPORT_NOT_FOR_TRANSFER"),
        "{released:?}"
    );
    agent.volumes.delete_volume(&id).await.unwrap();
}

/// An export for a move answers with a fresh token each time, keeps only
/// digests, and is withdrawn only with one of its tokens or by force; a
/// peer withdraws only what was exported to its own host.
#[tokio::test]
async fn a_moves_export_is_withdrawn_only_with_its_token_or_by_force() {
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    let first = agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap();
    let second = agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap();
    let (first, second) = (first.release_token.unwrap(), second.release_token.unwrap());
    assert_ne!(first, second);
    let stored = serde_json::to_string(&agent.ctx.record(&id).await.unwrap().unwrap()).unwrap();
    assert!(
        !stored.contains(first.expose()) && !stored.contains(second.expose()),
        "only digests are stored"
    );
    let restored = agent
        .exports
        .export_volume(&id, HOST_A, false)
        .await
        .unwrap();
    assert_eq!(restored.release_token, None);

    let without = agent
        .exports
        .unexport_volume(&id, &UnexportRequest::default())
        .await;
    assert_eq!(
        refusal(&without),
        Some("EXPORT_FOR_TRANSFER"),
        "{without:?}"
    );
    let wrong = UnexportRequest {
        token: ReleaseToken::presented("0123"),
        ..UnexportRequest::default()
    };
    let refused = agent.exports.unexport_volume(&id, &wrong).await;
    assert!(
        matches!(refused, Err(AgentError::PermissionDenied { .. })),
        "{refused:?}"
    );
    let other_peer = UnexportRequest {
        token: Some(first.clone()),
        peer_host: Some(HOST_B.into()),
        ..UnexportRequest::default()
    };
    let refused = agent.exports.unexport_volume(&id, &other_peer).await;
    assert_eq!(
        refusal(&refused),
        Some("VOLUME_EXPORTED_ELSEWHERE"),
        "{refused:?}"
    );
    assert_eq!(host.fabric.exports().len(), 1, "refusals change nothing");

    let peer = UnexportRequest {
        token: Some(first),
        peer_host: Some(HOST_A.into()),
        ..UnexportRequest::default()
    };
    agent.exports.unexport_volume(&id, &peer).await.unwrap();
    assert!(host.fabric.exports().is_empty());
    agent.exports.unexport_volume(&id, &peer).await.unwrap();

    agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap();
    let forced = UnexportRequest {
        force: true,
        ..UnexportRequest::default()
    };
    agent.exports.unexport_volume(&id, &forced).await.unwrap();
    assert!(host.fabric.exports().is_empty());
    agent.volumes.delete_volume(&id).await.unwrap();
}

/// nvme.auth = required: every export carries DH-HMAC-CHAP secrets, one
/// pair per destination host (nvmet shares the host entry), which the
/// destination presents when it connects; a target that cannot
/// authenticate exports nothing; nvme.auth = none exports without secrets.
#[tokio::test]
async fn exports_authenticate_their_host_unless_the_operator_says_none() {
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let (one, two, three) = (volume_id(1), volume_id(2), volume_id(3));
    for id in [&one, &two, &three] {
        agent.volumes.create_volume(id, 8 * MIB).await.unwrap();
    }
    let first = agent
        .exports
        .export_volume(&one, HOST_A, true)
        .await
        .unwrap();
    let keys = first
        .auth
        .clone()
        .expect("secrets under nvme.auth = required");
    assert_ne!(keys.host, keys.ctrl);
    let subsystem = subsystem_of(&agent, &one).await;
    assert_eq!(host.fabric.secrets_of(&subsystem), Some(keys.clone()));
    let same_host = agent
        .exports
        .export_volume(&two, HOST_A, false)
        .await
        .unwrap();
    assert_eq!(
        same_host.auth,
        Some(keys.clone()),
        "one host entry, one pair"
    );
    let again = agent
        .exports
        .export_volume(&one, HOST_A, true)
        .await
        .unwrap();
    assert_eq!(again.auth, Some(keys.clone()), "a repeat keeps them");
    let other_host = agent
        .exports
        .export_volume(&three, HOST_B, true)
        .await
        .unwrap();
    assert!(other_host.auth.is_some() && other_host.auth != Some(keys.clone()));
    // Two exports to a host that has no secrets yet, at once: one pair.
    let (five, six) = (volume_id(5), volume_id(6));
    for id in [&five, &six] {
        agent.volumes.create_volume(id, 8 * MIB).await.unwrap();
    }
    let third_host = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-4000-8000-000000000003";
    let (a, b) = tokio::join!(
        agent.exports.export_volume(&five, third_host, true),
        agent.exports.export_volume(&six, third_host, true)
    );
    assert_eq!(
        a.unwrap().auth,
        b.unwrap().auth,
        "concurrent exports share one pair"
    );
    let stored = serde_json::to_string(&agent.ctx.record(&one).await.unwrap().unwrap()).unwrap();
    assert!(
        stored.contains(keys.host.expose()),
        "kept to restore the export"
    );

    host.fabric.remove_auth();
    let agent = host.restart(agent).await.unwrap();
    agent
        .volumes
        .create_volume(&volume_id(4), 8 * MIB)
        .await
        .unwrap();
    let refused = agent
        .exports
        .export_volume(&volume_id(4), HOST_A, true)
        .await;
    assert_eq!(
        refusal(&refused),
        Some("AGENT_NOT_CONFIGURED"),
        "{refused:?}"
    );
    assert!(format!("{refused:?}").contains("nvme.auth"), "{refused:?}");
    let untouched = agent.ctx.record(&volume_id(4)).await.unwrap().unwrap();
    assert_eq!(untouched.export, None, "a refusal records nothing");

    let host = exporting_host().with_auth(crate::nvme::auth::AuthPolicy::None);
    host.fabric.remove_auth();
    let agent = host.start().await.unwrap();
    agent.volumes.create_volume(&one, 8 * MIB).await.unwrap();
    let plain = agent
        .exports
        .export_volume(&one, HOST_A, true)
        .await
        .unwrap();
    assert_eq!(plain.auth, None);
}

/// The destination connects with the secrets the start request carried,
/// and again with them after a restart.
#[tokio::test]
async fn the_destination_presents_the_exports_secrets() {
    let host = TestHost::new();
    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    let agent = host.start().await.unwrap();
    let keys = crate::nvme::auth::DhchapKeys::generate().unwrap();
    let mut request = nvme_request(1, &volume_id(1), "");
    let Source::NvmeTcp { auth, .. } = &mut request.source else {
        unreachable!()
    };
    *auth = Some(keys.clone());
    agent.transfers.start_transfer(request).await.unwrap();
    assert_eq!(host.fabric.presented(SOURCE_SUBSYSTEM), Some(keys.clone()));
    host.kernel.reboot();
    host.fabric.reboot();
    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    let _agent = host.restart(agent).await.unwrap();
    assert_eq!(host.fabric.presented(SOURCE_SUBSYSTEM), Some(keys));
}

#[tokio::test]
async fn an_agent_without_an_export_address_exports_nothing() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    let refused = agent.exports.export_volume(&id, HOST_A, true).await;
    assert_eq!(
        refusal(&refused),
        Some("AGENT_NOT_CONFIGURED"),
        "{refused:?}"
    );
    assert!(host.fabric.exports().is_empty());
    agent.volumes.delete_volume(&id).await.unwrap();
}

#[tokio::test]
async fn a_release_from_the_exported_host_deletes_the_source_copy() {
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let thin_ids_before = host.kernel.thin_ids("dmt-pool").len();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    // Published while the instance still runs here (a live migration).
    agent.volumes.publish_volume(&id).await.unwrap();
    let token = agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap()
        .release_token
        .unwrap();
    let again = agent.volumes.publish_volume(&id).await;
    assert!(again.is_ok(), "publishing stays idempotent: {again:?}");

    let elsewhere = agent
        .exports
        .release_volume(&id, HOST_B, Some(&token))
        .await;
    assert_eq!(
        refusal(&elsewhere),
        Some("VOLUME_EXPORTED_ELSEWHERE"),
        "{elsewhere:?}"
    );
    let wrong = ReleaseToken::generate().unwrap();
    for presented in [None, Some(&wrong)] {
        let denied = agent.exports.release_volume(&id, HOST_A, presented).await;
        assert!(
            matches!(denied, Err(AgentError::PermissionDenied { .. })),
            "{denied:?}"
        );
    }
    let published = agent
        .exports
        .release_volume(&id, HOST_A, Some(&token))
        .await;
    assert_eq!(
        refusal(&published),
        Some("VOLUME_PUBLISHED"),
        "{published:?}"
    );
    assert_eq!(host.fabric.exports().len(), 1, "refusals change nothing");
    agent.volumes.unpublish_volume(&id).await.unwrap();

    agent
        .exports
        .release_volume(&id, HOST_A, Some(&token))
        .await
        .unwrap();
    assert!(host.fabric.exports().is_empty());
    assert!(agent.volumes.get_volume(&id).await.is_err());
    assert!(!host.devices().iter().any(|d| d.contains(id.as_str())));
    assert_eq!(host.kernel.thin_ids("dmt-pool").len(), thin_ids_before);
    // The destination asks until it hears back: a second ask is fine.
    agent
        .exports
        .release_volume(&id, HOST_A, Some(&token))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_restart_restores_recorded_exports_and_removes_stray_ones() {
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let (kept, stray) = (volume_id(1), volume_id(2));
    agent.volumes.create_volume(&kept, 8 * MIB).await.unwrap();
    let token = agent
        .exports
        .export_volume(&kept, HOST_A, true)
        .await
        .unwrap()
        .release_token;
    let kept_subsystem = subsystem_of(&agent, &kept).await;
    let stray_subsystem = subsystem_of(&agent, &stray).await;
    // The recorded export is lost (a reboot); an unrecorded one of ours is
    // left over (an unexport cut short).
    host.fabric
        .unexport(&Nqn::parse("nqn", &kept_subsystem).unwrap())
        .await
        .unwrap();
    host.fabric
        .export(&crate::nvme::ExportRequest {
            subsystem_nqn: Nqn::parse("nqn", &stray_subsystem).unwrap(),
            device_path: format!("/dev/mapper/dmt-thin-{kept}").into(),
            namespace: namespace_ids(&stray),
            host_nqn: Nqn::parse("nqn", HOST_B).unwrap(),
            port: PortSpec {
                id: 1,
                address: TcpAddress::new("192.0.2.1".parse().unwrap(), 4420),
            },
            auth: None,
        })
        .await
        .unwrap();

    let agent = host.restart(agent).await.unwrap();
    let exported = host.fabric.exports();
    assert_eq!(exported.keys().collect::<Vec<_>>(), [&kept_subsystem]);
    assert_eq!(exported[&kept_subsystem].0, HOST_A);
    let without = agent
        .exports
        .unexport_volume(&kept, &UnexportRequest::default())
        .await;
    assert_eq!(
        refusal(&without),
        Some("EXPORT_FOR_TRANSFER"),
        "a restored export is still a move's source: {without:?}"
    );
    let with_token = UnexportRequest {
        token,
        ..UnexportRequest::default()
    };
    agent
        .exports
        .unexport_volume(&kept, &with_token)
        .await
        .unwrap();
    agent
        .exports
        .export_volume(&kept, HOST_A, false)
        .await
        .unwrap();

    // A kernel without the NVMe target: the agent starts, exports refuse.
    host.fabric.remove_target();
    let agent = host.restart(agent).await.unwrap();
    let unavailable = agent.exports.export_volume(&kept, HOST_A, false).await;
    assert!(
        matches!(unavailable, Err(AgentError::Unavailable { .. })),
        "{unavailable:?}"
    );
}

/// The release token the source handed out in these tests.
pub(super) fn the_token() -> ReleaseToken {
    ReleaseToken::presented("5eed70ce5eed70ce5eed70ce5eed70ce").unwrap()
}

pub(super) fn nvme_request(n: u32, volume: &VolumeId, endpoint: &str) -> StartRequest {
    StartRequest {
        transfer: TransferId::parse(&format!("30000000-0000-4000-8000-{n:012}")).unwrap(),
        volume: volume.clone(),
        size_bytes: 8 * MIB,
        source: Source::NvmeTcp {
            subsystem_nqn: SOURCE_SUBSYSTEM.into(),
            address: "192.0.2.7".into(),
            port: 4420,
            agent_endpoint: endpoint.into(),
            release_token: Some(the_token()),
            auth: None,
        },
        deferred: false,
        knobs: KnobRequest::default(),
        leave_snapshots: false,
    }
}

/// A destination with volume 1 arriving over NVMe/TCP from another agent.
pub(super) async fn arriving_over_nvme(
    host: &TestHost,
) -> (std::sync::Arc<crate::agent::Agent>, VolumeId, TransferId) {
    let agent = host.start().await.unwrap();
    let (id, transfer) = start_arriving(host, &agent).await.unwrap();
    (agent, id, transfer)
}

/// Volume 1 starts arriving on `agent` over NVMe/TCP from another agent.
pub(super) async fn start_arriving(
    host: &TestHost,
    agent: &crate::agent::Agent,
) -> Result<(VolumeId, TransferId), AgentError> {
    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    let id = volume_id(1);
    let request = nvme_request(1, &id, "unix:/run/source-agent.sock");
    let transfer = request.transfer.clone();
    agent.transfers.start_transfer(request).await?;
    Ok((id, transfer))
}

#[tokio::test]
async fn a_move_over_nvme_connects_then_lets_go_and_asks_the_source_to_release() {
    let host = TestHost::new();
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    assert_eq!(host.fabric.connections(), [SOURCE_SUBSYSTEM]);
    let table = host.kernel.table_text(&format!("dmt-lower-{id}")).unwrap();
    assert!(table.starts_with("0 16384 clone "), "{table}");

    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    assert!(host.fabric.connections().is_empty(), "the source is let go");
    // The source does not answer at first: its claim's answer (the list of
    // the volume's snapshots) is asked for again, and no release is asked
    // before it came.
    let claims = host.releases.claims().len();
    wait_until(async || host.releases.claims().len() > claims).await;
    assert!(host.releases.asked().is_empty(), "released before listed");
    host.releases.answer();
    wait_until(async || !host.releases.asked().is_empty()).await;
    assert!(host.releases.asked().iter().all(|v| v == id.as_str()));
    assert!(
        host.releases
            .requests()
            .iter()
            .all(|r| { r.action == SourceAction::Release && r.token == Some(the_token()) })
    );
    wait_source_released(&agent, &transfer).await;
}

/// After a reboot the source cannot be reached: the transfer degrades and
/// keeps trying while every other volume of the host comes back, and it
/// goes on once the source is back.
#[tokio::test]
async fn a_source_unreachable_after_a_reboot_degrades_only_its_transfer() {
    let host = TestHost::new();
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    let other = volume_id(2);
    agent.volumes.create_volume(&other, 8 * MIB).await.unwrap();
    agent.volumes.publish_volume(&other).await.unwrap();
    host.kernel.reboot();
    host.fabric.reboot();
    host.fabric.withdraw(SOURCE_SUBSYSTEM);

    let agent = host.restart(agent).await.unwrap();
    assert_eq!(agent.reconcile_report().degraded, 1);
    assert!(
        host.devices().contains(&format!("dmt-{other}")),
        "the other volume is back"
    );
    let view = agent.transfers.get_transfer(&transfer).await.unwrap();
    assert_eq!(view.state, TransferState::Degraded);
    assert!(view.message.contains("retrying"), "{}", view.message);

    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    wait_until(async || {
        let view = agent.transfers.get_transfer(&transfer).await.unwrap();
        view.state == TransferState::Hydrating
            && host
                .kernel
                .table_text(&format!("dmt-lower-{id}"))
                .is_some_and(|t| t.contains(" clone "))
    })
    .await;
    host.kernel.hydrate(&format!("dmt-lower-{id}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
}

/// The thresholds the clone on device `public` was told, in order.
pub(super) fn thresholds_told(host: &TestHost, public: &str) -> Vec<String> {
    let prefix = format!("message {public} hydration_threshold ");
    host.kernel
        .journal()
        .iter()
        .filter_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

async fn state_of(agent: &crate::agent::Agent, transfer: &TransferId) -> TransferView {
    agent.transfers.get_transfer(transfer).await.unwrap()
}

/// The source's connection breaks mid-move: the transfer degrades, naming
/// the source, and background copying stops while the kernel reconnects.
/// Once the kernel has given up on the connection, the agent connects
/// again itself and reloads the clone over the new namespace.
#[tokio::test]
async fn a_source_outage_stops_copying_and_a_lost_connection_is_made_again() {
    let host = TestHost::new();
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    let public = format!("dmt-lower-{id}");
    let first_table = host.kernel.table_text(&public).unwrap();

    host.fabric.interrupt(SOURCE_SUBSYSTEM);
    wait_until(async || state_of(&agent, &transfer).await.state == TransferState::Degraded).await;
    let message = state_of(&agent, &transfer).await.message;
    assert!(
        message.contains("192.0.2.7:4420 is connecting")
            && message.contains("wait up to 120 s, then fail"),
        "{message}"
    );
    assert_eq!(thresholds_told(&host, &public), ["0"], "copying stopped");

    host.fabric.reconnect(SOURCE_SUBSYSTEM);
    wait_until(async || state_of(&agent, &transfer).await.state == TransferState::Hydrating).await;
    let told = thresholds_told(&host, &public);
    assert_eq!(told.len(), 2, "{told:?}");
    assert_ne!(told[1], "0", "copying goes on");
    assert_eq!(host.kernel.table_text(&public).unwrap(), first_table);

    host.fabric.withdraw(SOURCE_SUBSYSTEM);
    host.fabric.give_up(SOURCE_SUBSYSTEM);
    wait_until(async || {
        state_of(&agent, &transfer)
            .await
            .message
            .contains("gave up")
    })
    .await;
    assert_eq!(
        state_of(&agent, &transfer).await.state,
        TransferState::Degraded
    );
    assert_eq!(thresholds_told(&host, &public).last().unwrap(), "0");

    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    wait_until(async || state_of(&agent, &transfer).await.state == TransferState::Hydrating).await;
    let reloaded = host.kernel.table_text(&public).unwrap();
    assert_ne!(reloaded, first_table, "the clone reads the new namespace");
    assert!(reloaded.starts_with("0 16384 clone "), "{reloaded}");
    assert_eq!(host.fabric.connections(), [SOURCE_SUBSYSTEM]);
    host.kernel.hydrate(&public);
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    assert!(host.fabric.connections().is_empty(), "the source is let go");
}

#[tokio::test]
async fn a_move_from_a_source_nobody_exports_leaves_nothing() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let failed = agent
        .transfers
        .start_transfer(nvme_request(1, &id, ""))
        .await;
    assert!(
        matches!(failed, Err(AgentError::Unavailable { .. })),
        "{failed:?}"
    );
    assert!(agent.volumes.get_volume(&id).await.is_err());
    assert!(!host.devices().iter().any(|d| d.contains(id.as_str())));
    assert!(host.fabric.connections().is_empty());
}

/// An abort tears the destination down and asks the source, with the
/// token, to withdraw its export (never to release its copy), until it
/// answers; a restart asks again if it had not.
#[tokio::test]
async fn an_aborted_move_disconnects_and_asks_the_source_to_withdraw_its_export() {
    let host = TestHost::new();
    let (agent, id, transfer) = arriving_over_nvme(&host).await;
    agent
        .transfers
        .abort_transfer(&transfer, false)
        .await
        .unwrap();
    assert!(host.fabric.connections().is_empty());
    assert!(!host.devices().iter().any(|d| d.contains(id.as_str())));
    wait_until(async || !host.releases.asked().is_empty()).await;
    let agent = host.restart(agent).await.unwrap();
    wait_until(async || host.releases.asked().len() >= 2).await;
    host.releases.answer();
    wait_until(async || {
        agent
            .ctx
            .transfer_record(&transfer)
            .await
            .unwrap()
            .is_some_and(|t| t.export_withdrawn && !t.source_released)
    })
    .await;
    assert!(
        host.releases
            .requests()
            .iter()
            .all(|r| { r.action == SourceAction::Withdraw && r.token == Some(the_token()) })
    );
}

/// A caller that gave up on StartTransfer (its deadline passed while the
/// source was connecting) aborts the id it named, and the abort may come
/// before the start has recorded anything: the start then stops at its
/// records and lets the source go. An abort after the records aborts as
/// always. Either way nothing is left that nobody would commit or abort.
#[tokio::test]
async fn an_abort_that_overtakes_its_start_stops_the_start() {
    let host = TestHost::new();
    host.fabric.offer(SOURCE_SUBSYSTEM, 8 * MIB);
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    for abort_first in [true, false] {
        let n = if abort_first { 1 } else { 2 };
        let request = nvme_request(n, &id, "unix:/run/source-agent.sock");
        let transfer = request.transfer.clone();
        // The lock a start takes between connecting and recording.
        let room = agent.ctx.locks.lock(hydrate::ROOM_FOR_MOVES).await;
        let abort = {
            let (agent, transfer) = (Arc::clone(&agent), transfer.clone());
            async move { agent.transfers.abort_transfer(&transfer, false).await }
        };
        let start = {
            let agent = Arc::clone(&agent);
            async move { agent.transfers.start_transfer(request).await }
        };
        let (aborting, starting) = if abort_first {
            let aborting = tokio::spawn(abort);
            tokio::time::sleep(Duration::from_millis(50)).await;
            (aborting, tokio::spawn(start))
        } else {
            let starting = tokio::spawn(start);
            wait_until(async || host.fabric.connections() == [SOURCE_SUBSYSTEM]).await;
            (tokio::spawn(abort), starting)
        };
        wait_until(async || host.fabric.connections() == [SOURCE_SUBSYSTEM]).await;
        drop(room);
        let (aborted, started) = (aborting.await.unwrap(), starting.await.unwrap());
        if abort_first {
            assert!(
                matches!(aborted, Err(AgentError::NotFound { .. })),
                "{aborted:?}"
            );
            assert!(
                matches!(started, Err(AgentError::AlreadyExists { .. })),
                "{started:?}"
            );
            assert!(
                agent
                    .ctx
                    .transfer_record(&transfer)
                    .await
                    .unwrap()
                    .is_none()
            );
        } else {
            assert!(started.is_ok(), "{started:?}");
            assert_eq!(aborted.unwrap().state, TransferState::Aborted);
        }
        assert!(host.fabric.connections().is_empty(), "the source is let go");
        assert!(agent.ctx.record(&id).await.unwrap().is_none());
        assert!(!host.devices().iter().any(|d| d.contains(id.as_str())));
    }
    // The volume can still move here, under a new transfer id.
    let request = nvme_request(3, &id, "unix:/run/source-agent.sock");
    agent.transfers.start_transfer(request).await.unwrap();
}

/// Waits until the source acknowledged releasing `transfer`'s copy.
pub(super) async fn wait_source_released(agent: &crate::agent::Agent, transfer: &TransferId) {
    wait_for_record(agent, transfer, |t| t.source_released).await;
}

/// Waits until `transfer`'s record satisfies `holds`.
pub(super) async fn wait_for_record(
    agent: &crate::agent::Agent,
    transfer: &TransferId,
    holds: impl Fn(&crate::store::TransferRecord) -> bool,
) {
    wait_until(async || {
        agent
            .ctx
            .transfer_record(transfer)
            .await
            .unwrap()
            .is_some_and(|t| holds(&t))
    })
    .await;
}

pub(super) async fn wait_until(done: impl AsyncFn() -> bool) {
    for _ in 0..500 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not reached in 5 s");
}

/// A kill between each kernel step of export, unexport and release and its
/// record: the next start restores what the record says, and a retry of the
/// call converges.
#[tokio::test]
async fn crashes_inside_export_unexport_and_release_converge() {
    use crate::testing::crash;
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    let subsystem = subsystem_of(&agent, &id).await;

    let caller = Arc::clone(&agent);
    let volume = id.clone();
    crash("export.after_record", async move {
        caller.exports.export_volume(&volume, HOST_A, true).await
    })
    .await;
    assert!(
        host.fabric.exports().is_empty(),
        "the kernel step never ran"
    );
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(host.fabric.exports()[&subsystem].0, HOST_A, "restored");
    let token = agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap()
        .release_token;

    let (caller, volume) = (Arc::clone(&agent), id.clone());
    let with_token = UnexportRequest {
        token,
        ..UnexportRequest::default()
    };
    let unexport = with_token.clone();
    crash("unexport.after_unexport", async move {
        caller.exports.unexport_volume(&volume, &unexport).await
    })
    .await;
    let agent = host.restart(agent).await.unwrap();
    agent
        .exports
        .unexport_volume(&id, &with_token)
        .await
        .unwrap();
    assert!(host.fabric.exports().is_empty());
    let token = agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap()
        .release_token
        .unwrap();

    let (caller, volume, held) = (Arc::clone(&agent), id.clone(), token.clone());
    crash("release.after_unexport", async move {
        caller
            .exports
            .release_volume(&volume, HOST_A, Some(&held))
            .await
    })
    .await;
    let agent = host.restart(agent).await.unwrap();
    agent
        .exports
        .release_volume(&id, HOST_A, Some(&token))
        .await
        .unwrap();
    assert!(host.fabric.exports().is_empty());
    assert!(agent.volumes.get_volume(&id).await.is_err(), "released");
    assert!(!host.devices().iter().any(|d| d.contains(id.as_str())));
}

/// The source's side of claims: an export for a move waits for its claim
/// until its deadline, only the host it is exported to claims it, with its
/// token, and an expired one is withdrawn with its tokens; an export for an
/// attachment never expires.
#[tokio::test]
async fn an_export_for_a_move_expires_unless_its_destination_claims_it() {
    let host = exporting_host();
    let agent = host.start().await.unwrap();
    let (claimed, unclaimed, attached) = (volume_id(1), volume_id(2), volume_id(3));
    for id in [&claimed, &unclaimed, &attached] {
        agent.volumes.create_volume(id, 8 * MIB).await.unwrap();
    }
    let before = crate::records::unix_now();
    let view = agent
        .exports
        .export_volume(&claimed, HOST_A, true)
        .await
        .unwrap();
    let deadline = view.claim_deadline_unix.expect("a move's export waits");
    assert!(
        (before + 600..=before + 601).contains(&deadline),
        "{deadline}"
    );
    let token = view.release_token.unwrap();
    agent
        .exports
        .export_volume(&unclaimed, HOST_A, true)
        .await
        .unwrap();
    let attachment = agent
        .exports
        .export_volume(&attached, HOST_A, false)
        .await
        .unwrap();
    assert_eq!(attachment.claim_deadline_unix, None);

    let wrong = ReleaseToken::presented(&"00".repeat(32)).unwrap();
    let denied = agent
        .exports
        .claim_export(&claimed, HOST_A, Some(&wrong), None)
        .await;
    assert!(
        matches!(denied, Err(AgentError::PermissionDenied { .. })),
        "{denied:?}"
    );
    let elsewhere = agent
        .exports
        .claim_export(&claimed, HOST_B, Some(&token), None)
        .await;
    assert_eq!(refusal(&elsewhere), Some("VOLUME_EXPORTED_ELSEWHERE"));
    let not_a_move = agent
        .exports
        .claim_export(&attached, HOST_A, Some(&token), None)
        .await;
    assert_eq!(refusal(&not_a_move), Some("EXPORT_NOT_FOR_TRANSFER"));
    for _repeat in 0..2 {
        agent
            .exports
            .claim_export(&claimed, HOST_A, Some(&token), None)
            .await
            .unwrap();
    }

    let expired = agent.exports.expire_unclaimed(deadline + 1).await.unwrap();
    assert_eq!(expired, 1);
    let exported = host.fabric.exports();
    assert!(exported.contains_key(&subsystem_of(&agent, &claimed).await));
    assert!(exported.contains_key(&subsystem_of(&agent, &attached).await));
    assert!(!exported.contains_key(&subsystem_of(&agent, &unclaimed).await));
    let record = agent.ctx.record(&unclaimed).await.unwrap().unwrap();
    assert_eq!(record.export, None, "the tokens went with it");
    // A repeat export for the claimed volume keeps it claimed.
    let again = agent
        .exports
        .export_volume(&claimed, HOST_A, true)
        .await
        .unwrap();
    assert_eq!(again.claim_deadline_unix, None);
}

/// An export whose wait ran out while the agent was down is not restored.
#[tokio::test]
async fn a_restart_does_not_restore_an_export_whose_wait_ran_out() {
    let host = exporting_host().with_unclaimed_export_seconds(1);
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 8 * MIB).await.unwrap();
    agent
        .exports
        .export_volume(&id, HOST_A, true)
        .await
        .unwrap();
    let subsystem = subsystem_of(&agent, &id).await;
    agent.stop_background();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        host.fabric.exports().contains_key(&subsystem),
        "the kernel keeps it"
    );
    let agent = host.restart(agent).await.unwrap();
    assert!(!host.fabric.exports().contains_key(&subsystem));
    let record = agent.ctx.record(&id).await.unwrap().unwrap();
    assert_eq!(record.export, None);
}

/// The destination claims its source's export once connected, with the
/// token, until the source acknowledges; acknowledged, it never asks again.
#[tokio::test]
async fn the_destination_claims_its_sources_export_until_acknowledged() {
    let host = TestHost::new();
    let (agent, _id, transfer) = arriving_over_nvme(&host).await;
    wait_until(async || !host.releases.claims().is_empty()).await;
    let claim = &host.releases.claims()[0];
    assert_eq!(claim.token, Some(the_token()));
    assert_eq!(claim.host_nqn, agent.ctx.nvme.host_nqn.to_string());
    host.releases.answer();
    wait_until(async || {
        agent
            .ctx
            .transfer_record(&transfer)
            .await
            .unwrap()
            .is_some_and(|t| t.export_claimed)
    })
    .await;
    let asked = host.releases.claims().len();
    let _agent = host.restart(agent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(host.releases.claims().len(), asked, "claimed once for all");
}
