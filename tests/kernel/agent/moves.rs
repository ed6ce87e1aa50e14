//! Two agents in one guest, each with its own state, pool and prefix: a
//! volume moves from A to B over NVMe/TCP loopback, while written, and A's
//! copy is released; live migration's deferred start with commit and with
//! abort; a source agent killed mid-move; an export other hosts cannot use.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::{
    api::proto::v1::{
        AbortTransferRequest, Export, ExportVolumeRequest, GetNodeInfoRequest, HydrationKnobs,
        NvmeTcpSource, StartTransferRequest, Transfer, TransferRef, TransferState,
        UnexportVolumeRequest, VolumeState, get_changed_blocks_request::Since,
        start_transfer_request::Source, transfers_client::TransfersClient,
    },
    ids::VolumeId,
    nvme::{
        ConnectOptions, ConnectRequest, ConnectTimeouts, Host, HostId, Nqn, TcpAddress,
        auth::{DhchapKeys, DhchapSecret},
        namespace_ids,
    },
};
use tonic::{Code, transport::Channel};

use super::{
    api::{create, get, publish, unpublish},
    changes::{BLOCK, changed, checkpoint},
    fixture::AgentProcess,
};
use crate::support::*;

/// The volume and transfer one test moves. Every test has its own: these
/// tests run side by side in one kernel, and its NVMe host ignores a
/// namespace whose UUID (the volume id) another connected subsystem shows.
#[derive(Clone, Copy)]
pub(super) struct Ids {
    pub volume: &'static str,
    pub transfer: &'static str,
}

pub(super) const fn ids(volume: &'static str, transfer: &'static str) -> Ids {
    Ids { volume, transfer }
}

/// An agent that exports on 127.0.0.1:`port` (configfs port id = port).
pub(super) async fn agent(prefix: &str, port: u16, host_uuid: &str) -> AgentProcess {
    agent_with(prefix, port, host_uuid, &[]).await
}

/// [`agent`] with more arguments.
pub(super) async fn agent_with(
    prefix: &str,
    port: u16,
    host_uuid: &str,
    more: &[&str],
) -> AgentProcess {
    let args = agent_args(port, host_uuid, more);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    AgentProcess::start_with(prefix, &args, &[]).await
}

/// The arguments of an agent that exports on 127.0.0.1:`port`, with its own
/// host NQN and id: a 1 GiB pool file and a 3 s stall limit, then `more`.
pub(super) fn agent_args(port: u16, host_uuid: &str, more: &[&str]) -> Vec<String> {
    let port_text = port.to_string();
    let nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{host_uuid}");
    let auth = if more.contains(&"--nvme-auth") {
        Vec::new()
    } else {
        vec!["--nvme-auth", nvme_auth_policy()]
    };
    let mut args = auth;
    args.extend_from_slice(&[
        "--pool-file-size",
        "1G",
        "--nvme-export-address",
        "127.0.0.1",
        "--nvme-export-port",
        &port_text,
        "--nvme-export-port-id",
        &port_text,
        "--nvme-host-nqn",
        &nqn,
        "--nvme-host-id",
        host_uuid,
        "--transfer-stall-seconds",
        "3",
    ]);
    args.extend_from_slice(more);
    args.into_iter().map(str::to_owned).collect()
}

pub(super) async fn host_nqn(agent: &AgentProcess) -> String {
    agent
        .node()
        .await
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .host_nqn
}

pub(super) async fn transfers(agent: &AgentProcess) -> TransfersClient<Channel> {
    TransfersClient::new(agent.channel().await)
}

pub(super) async fn export(
    ids: Ids,
    source: &AgentProcess,
    to: &AgentProcess,
) -> Result<Export, tonic::Status> {
    transfers(source)
        .await
        .export_volume(ExportVolumeRequest {
            volume_id: ids.volume.into(),
            host_nqn: host_nqn(to).await,
            for_transfer: true,
        })
        .await
        .map(|r| r.into_inner())
}

async fn start_move(
    ids: Ids,
    source: &AgentProcess,
    export: &Export,
    destination: &AgentProcess,
    deferred: bool,
) -> Result<Transfer, tonic::Status> {
    start_move_with(ids, source, export, destination, deferred, None).await
}

/// [`start_move`] with the transfer's knobs.
pub(super) async fn start_move_with(
    ids: Ids,
    source: &AgentProcess,
    export: &Export,
    destination: &AgentProcess,
    deferred: bool,
    knobs: Option<HydrationKnobs>,
) -> Result<Transfer, tonic::Status> {
    transfers(destination)
        .await
        .start_transfer(StartTransferRequest {
            transfer_id: ids.transfer.into(),
            volume_id: ids.volume.into(),
            size_bytes: 64 * MIB,
            source: Some(Source::NvmeTcp(NvmeTcpSource {
                subsystem_nqn: export.subsystem_nqn.clone(),
                transport_address: export.transport_address.clone(),
                transport_service_id: export.transport_service_id,
                source_agent_endpoint: format!("unix:{}", source.socket().display()),
                release_token: export.release_token.clone(),
                dhchap_host_secret: export.dhchap_host_secret.clone(),
                dhchap_ctrl_secret: export.dhchap_ctrl_secret.clone(),
            })),
            deferred,
            knobs,
            leave_snapshots: false,
        })
        .await
        .map(|r| r.into_inner())
}

pub(super) async fn get_transfer(ids: Ids, agent: &AgentProcess) -> Transfer {
    transfers(agent)
        .await
        .get_transfer(TransferRef {
            transfer_id: ids.transfer.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits (event-driven on the agent's side; the test only looks) until the
/// transfer is done and the source has released its copy.
pub(super) async fn wait_released(ids: Ids, destination: &AgentProcess) -> Transfer {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let now = get_transfer(ids, destination).await;
        if now.state() == TransferState::Done && now.source_released {
            return now;
        }
        assert!(
            !matches!(now.state(), TransferState::Failed | TransferState::Aborted),
            "{now:?}"
        );
        assert!(
            Instant::now() < deadline,
            "not done and released in time: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The DH-HMAC-CHAP secrets an export answered, if any.
pub(super) fn secrets_of(export: &Export) -> Option<DhchapKeys> {
    let parse = |text: &str| DhchapSecret::parse("secret", text).unwrap();
    Some(DhchapKeys {
        host: parse(&export.dhchap_host_secret)?,
        ctrl: parse(&export.dhchap_ctrl_secret)?,
    })
}

/// Polls `done` every 100 ms for up to 60 s.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "not in 60 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) fn public(ids: Ids, agent: &AgentProcess) -> PathBuf {
    PathBuf::from(format!("/dev/mapper/{}-{}", agent.prefix, ids.volume))
}

pub(super) fn configfs_has(subsystem: &str) -> bool {
    Path::new("/sys/kernel/config/nvmet/subsystems")
        .join(subsystem)
        .exists()
}

pub(super) fn nvme_controller_for(subsystem: &str) -> Option<String> {
    std::fs::read_dir("/sys/class/nvme")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let nqn = std::fs::read_to_string(entry.path().join("subsysnqn")).ok()?;
            (nqn.trim() == subsystem).then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

pub(super) fn fill(path: &Path, seed: u64, size: u64) {
    for offset in (0..size).step_by(MIB as usize) {
        write_at(path, offset, &pattern(seed, offset, MIB as usize));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_moves_between_agents_and_the_source_copy_is_released() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d10",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d10",
    );
    let a = agent("dmctmova", 4431, "0a000000-0000-4000-8000-000000000001").await;
    let b = agent("dmctmovb", 4432, "0b000000-0000-4000-8000-000000000002").await;
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, ids.volume, 64 * MIB).await.unwrap();
    let path_a = publish(&mut volumes_a, ids.volume).await.unwrap();
    fill(Path::new(&path_a), 81, 64 * MIB);
    let source_sha = sha256_of(Path::new(&path_a), 64 * MIB);
    unpublish(&mut volumes_a, ids.volume).await.unwrap();

    let exported = export(ids, &a, &b).await.unwrap();
    assert_eq!(exported.allowed_host_nqn, host_nqn(&b).await);
    assert_eq!(
        (
            exported.transport_address.as_str(),
            exported.transport_service_id
        ),
        ("127.0.0.1", 4431)
    );
    assert!(configfs_has(&exported.subsystem_nqn));
    // Exporting again changes nothing but hands out another token (the
    // move below presents the first one, which stays valid) and gives the
    // unclaimed export a fresh wait.
    let again = export(ids, &a, &b).await.unwrap();
    assert_ne!(again.release_token, exported.release_token);
    assert!(again.claim_deadline_unix >= exported.claim_deadline_unix);
    assert_eq!(
        Export {
            release_token: exported.release_token.clone(),
            claim_deadline_unix: exported.claim_deadline_unix,
            ..again
        },
        exported,
        "exporting again is a no-op"
    );
    // Exported for a move: no new writer may appear at the source.
    assert_eq!(
        publish(&mut volumes_a, ids.volume)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    let started = start_move(ids, &a, &exported, &b, false).await.unwrap();
    assert_eq!(started.device_path, public(ids, &b).display().to_string());
    assert_eq!(
        read_at(&public(ids, &b), 10 * MIB, 4096),
        pattern(81, 10 * MIB, 4096),
        "presented at once"
    );
    // A writer keeps writing through the destination until the move is
    // finalized and released: hydration, the finalize swap and the release
    // all happen under its I/O, which must never fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (path, stop) = (public(ids, &b), stop.clone());
        move || {
            let mut last_seed = std::collections::BTreeMap::new();
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // 64 KiB into a different MiB each time, seeds that differ per round.
                let chunk = (round * 7) % 64;
                let seed = 1000 + round;
                write_at(
                    &path,
                    chunk * MIB + 128 * 1024,
                    &pattern(seed, 0, 64 * 1024),
                );
                last_seed.insert(chunk, seed);
                round += 1;
            }
            (round, last_seed)
        }
    });

    let done = wait_released(ids, &b).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (writes, last_seed) = writer.join().expect("the writer never saw an I/O error");
    assert!(
        writes > 10,
        "the writer ran through the move: {writes} writes"
    );
    assert_eq!(done.bytes_hydrated, 64 * MIB);
    println!(
        "MEASURED move over NVMe/TCP loopback under {writes} writes: finalize I/O pause {} us, done->finalized {} us",
        done.finalize_pause_micros, done.done_to_finalized_micros
    );
    for chunk in 0..64u64 {
        let mut expected = pattern(81, chunk * MIB, MIB as usize);
        if let Some(seed) = last_seed.get(&chunk) {
            expected[128 * 1024..192 * 1024].copy_from_slice(&pattern(*seed, 0, 64 * 1024));
        }
        assert_eq!(
            read_at(&public(ids, &b), chunk * MIB, MIB as usize),
            expected,
            "MiB {chunk}"
        );
    }
    assert_ne!(
        sha256_of(&public(ids, &b), 64 * MIB),
        source_sha,
        "the write is there"
    );
    assert_eq!(
        get(&mut b.volumes().await, ids.volume)
            .await
            .unwrap()
            .state(),
        VolumeState::Available
    );
    // The source let go: no copy, no export, no connection.
    assert_eq!(
        get(&mut volumes_a, ids.volume).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(!configfs_has(&exported.subsystem_nqn), "the export is gone");
    assert_eq!(
        nvme_controller_for(&exported.subsystem_nqn),
        None,
        "the destination disconnected"
    );
    // With nvme.auth = required (kernels that authenticate: 6.12) the move
    // ran over DH-HMAC-CHAP; no secret and no token is in either log.
    assert_eq!(
        exported.dhchap_host_secret.is_empty(),
        nvme_auth_policy() == "none"
    );
    for secret in [
        &exported.release_token,
        &exported.dhchap_host_secret,
        &exported.dhchap_ctrl_secret,
    ] {
        let shown = |agent: &AgentProcess| !secret.is_empty() && agent.log().contains(secret);
        assert!(!shown(&a) && !shown(&b), "a secret is in a log");
    }
    b.destroy().await;
    a.destroy().await;
}

/// Live migration: the destination is prepared while the source is still
/// attached and written; commit starts hydration; the result holds every
/// write the source made before it let go.
#[tokio::test(flavor = "multi_thread")]
async fn live_migration_prepare_then_commit_or_abort() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11",
    );
    let a = agent("dmctlma", 4433, "0a000000-0000-4000-8000-000000000003").await;
    let b = agent("dmctlmb", 4434, "0b000000-0000-4000-8000-000000000004").await;
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, ids.volume, 64 * MIB).await.unwrap();
    let path_a = PathBuf::from(publish(&mut volumes_a, ids.volume).await.unwrap());
    fill(&path_a, 91, 64 * MIB);

    // Abort first: B is torn down, A is untouched and can be unexported.
    let exported = export(ids, &a, &b).await.unwrap();
    start_move(ids, &a, &exported, &b, true).await.unwrap();
    let prepared = get_transfer(ids, &b).await;
    assert_eq!(prepared.state(), TransferState::Deferred);
    assert!(prepared.deferred, "{prepared:?}");
    let aborted = transfers(&b)
        .await
        .abort_transfer(AbortTransferRequest {
            transfer_id: ids.transfer.into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aborted.state(), TransferState::Aborted);
    assert!(!public(ids, &b).exists());
    assert_eq!(nvme_controller_for(&exported.subsystem_nqn), None);
    // B tells A, with the release token, to withdraw the export.
    wait_until("A withdraws its export", || {
        !configfs_has(&exported.subsystem_nqn)
    })
    .await;
    let a_log = a.log();
    assert!(
        !a_log.contains(&exported.release_token) && !b.log().contains(&exported.release_token),
        "the token is in no log"
    );
    assert_eq!(
        read_at(&path_a, 0, 4096),
        pattern(91, 0, 4096),
        "the source is untouched"
    );
    b.destroy().await;

    // Then a migration that commits (a fresh destination: the aborted
    // transfer keeps its id there).
    let b = agent("dmctlmc", 4435, "0b000000-0000-4000-8000-000000000005").await;
    let exported = export(ids, &a, &b).await.unwrap();
    start_move(ids, &a, &exported, &b, true).await.unwrap();
    // The source instance keeps writing; the destination sees it through.
    let late = pattern(92, 0, MIB as usize);
    write_at(&path_a, 5 * MIB, &late);
    assert_eq!(read_at(&public(ids, &b), 5 * MIB, MIB as usize), late);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        get_transfer(ids, &b).await.regions_hydrated,
        0,
        "deferred: nothing copied yet"
    );
    // The destination writes too (the guest ran there): an abort would
    // lose that, so it is refused, and the transfer stays as it was.
    let on_b = pattern(94, 0, MIB as usize);
    write_at(&public(ids, &b), 9 * MIB, &on_b);
    let refused = transfers(&b)
        .await
        .abort_transfer(AbortTransferRequest {
            transfer_id: ids.transfer.into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("DESTINATION_WRITTEN"),
        "{refused:?}"
    );
    assert!(get_transfer(ids, &b).await.deferred);
    // The source lets go, then the destination commits.
    unpublish(&mut volumes_a, ids.volume).await.unwrap();
    let committed = transfers(&b)
        .await
        .commit_transfer(TransferRef {
            transfer_id: ids.transfer.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        committed.state(),
        TransferState::Hydrating | TransferState::Done
    ));
    assert!(!committed.deferred, "{committed:?}");
    wait_released(ids, &b).await;
    assert_eq!(read_at(&public(ids, &b), 5 * MIB, MIB as usize), late);
    assert_eq!(read_at(&public(ids, &b), 9 * MIB, MIB as usize), on_b);
    assert_eq!(
        read_at(&public(ids, &b), 40 * MIB, MIB as usize),
        pattern(91, 40 * MIB, MIB as usize)
    );
    assert_eq!(
        get(&mut volumes_a, ids.volume).await.unwrap_err().code(),
        Code::NotFound
    );
    b.destroy().await;
    a.destroy().await;
}

/// The source agent dies mid-move: the kernel's export keeps serving, the
/// destination finishes, and the release waits for the source to come back.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_agent_killed_mid_move_releases_when_it_returns() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d12",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d12",
    );
    let mut a = agent("dmctska", 4436, "0a000000-0000-4000-8000-000000000006").await;
    let mut b = agent("dmctskb", 4437, "0b000000-0000-4000-8000-000000000007").await;
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, ids.volume, 64 * MIB).await.unwrap();
    let path_a = publish(&mut volumes_a, ids.volume).await.unwrap();
    fill(Path::new(&path_a), 95, 64 * MIB);
    unpublish(&mut volumes_a, ids.volume).await.unwrap();
    let exported = export(ids, &a, &b).await.unwrap();
    a.kill9().await;
    start_move(ids, &a, &exported, &b, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while get_transfer(ids, &b).await.state() != TransferState::Done {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            get_transfer(ids, &b).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !get_transfer(ids, &b).await.source_released,
        "the source is down: nobody acknowledged"
    );
    // The destination, stopped while the source restarts, cannot release the
    // volume under the check that the restart kept the export.
    b.kill9().await;
    a.restart().await;
    assert!(
        configfs_has(&exported.subsystem_nqn),
        "the source's restart tore down an export its destination still reads"
    );
    get(&mut a.volumes().await, ids.volume).await.unwrap();
    b.restart().await;
    wait_released(ids, &b).await;
    assert_eq!(
        get(&mut a.volumes().await, ids.volume)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    for offset in [0, 33 * MIB, 63 * MIB] {
        assert_eq!(
            read_at(&public(ids, &b), offset, MIB as usize),
            pattern(95, offset, MIB as usize)
        );
    }
    b.destroy().await;
    a.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_admits_only_the_host_it_names() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d13",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d13",
    );
    let a = agent("dmctonea", 4438, "0a000000-0000-4000-8000-000000000008").await;
    let b = agent("dmctoneb", 4439, "0b000000-0000-4000-8000-000000000009").await;
    let c = agent("dmctonec", 4440, "0c000000-0000-4000-8000-00000000000a").await;
    create(&mut a.volumes().await, ids.volume, 64 * MIB)
        .await
        .unwrap();
    let exported = export(ids, &a, &b).await.unwrap();
    let other = export(ids, &a, &c).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    let refused = start_move(ids, &a, &exported, &c, false).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        get(&mut c.volumes().await, ids.volume)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "nothing left on C"
    );
    // A deferred arrival does not move on: its source may still be written.
    start_move(ids, &a, &exported, &b, true).await.unwrap();
    let chained = transfers(&b)
        .await
        .export_volume(ExportVolumeRequest {
            volume_id: ids.volume.into(),
            host_nqn: host_nqn(&c).await,
            for_transfer: true,
        })
        .await
        .unwrap_err();
    assert_eq!(chained.code(), Code::FailedPrecondition, "{chained:?}");
    assert!(
        chained.message().contains("still arriving") && chained.message().contains("commit it"),
        "{chained:?}"
    );
    assert_eq!(refusal_reason(&chained).as_deref(), Some("VOLUME_ARRIVING"));
    transfers(&b)
        .await
        .abort_transfer(AbortTransferRequest {
            transfer_id: ids.transfer.into(),
            force: false,
        })
        .await
        .unwrap();
    // Whether B's withdrawal came first or not, the token withdraws it.
    transfers(&a)
        .await
        .unexport_volume(UnexportVolumeRequest {
            volume_id: ids.volume.into(),
            release_token: exported.release_token.clone(),
            force: false,
        })
        .await
        .unwrap();
    c.destroy().await;
    b.destroy().await;
    a.destroy().await;
}

/// A host without an agent attaches a volume over NVMe/TCP and writes it:
/// those writes never pass dm-era, so the agent answers no changed-blocks
/// question that would leave them out. While exported it refuses; after,
/// the old history is gone and a new one reports exactly what follows.
#[tokio::test(flavor = "multi_thread")]
async fn writes_over_an_export_are_never_missing_from_an_answer() {
    let volume = "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d14";
    let a = agent("dmctexwa", 4441, "0a000000-0000-4000-8000-00000000000b").await;
    create(&mut a.volumes().await, volume, 64 * MIB)
        .await
        .unwrap();
    let before = checkpoint(&a, volume).await.unwrap();
    let initiator_uuid = "0d000000-0000-4000-8000-00000000000c";
    let initiator = format!("nqn.2014-08.org.nvmexpress:uuid:{initiator_uuid}");
    let exported = transfers(&a)
        .await
        .export_volume(ExportVolumeRequest {
            volume_id: volume.into(),
            host_nqn: initiator.clone(),
            for_transfer: false,
        })
        .await
        .unwrap()
        .into_inner();

    let nvme = Host::open().unwrap();
    let connection = nvme
        .connect(&ConnectRequest {
            options: ConnectOptions {
                address: TcpAddress::new("127.0.0.1".parse().unwrap(), 4441),
                subsystem_nqn: Nqn::parse("subsystem_nqn", &exported.subsystem_nqn).unwrap(),
                host_nqn: Nqn::parse("host_nqn", &initiator).unwrap(),
                host_id: HostId::parse(initiator_uuid).unwrap(),
                timeouts: ConnectTimeouts::default(),
                auth: secrets_of(&exported),
            },
            expected_namespace: vec![namespace_ids(&VolumeId::parse(volume).unwrap())],
            namespace_timeout: Duration::from_secs(30),
        })
        .await
        .unwrap();
    for block in [3, 10] {
        write_at(
            &connection.namespace.path,
            block * BLOCK,
            &pattern(7, block, 4096),
        );
    }
    let refused = checkpoint(&a, volume).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refusal_reason(&refused).as_deref(), Some("VOLUME_EXPORTED"));
    let refused = changed(&a, volume, Since::Era(before)).await.unwrap_err();
    assert_eq!(refusal_reason(&refused).as_deref(), Some("VOLUME_EXPORTED"));
    nvme.disconnect(&connection.controller).await.unwrap();
    transfers(&a)
        .await
        .unexport_volume(UnexportVolumeRequest {
            volume_id: volume.into(),
            ..UnexportVolumeRequest::default()
        })
        .await
        .unwrap();

    // The history that missed the remote writes is over.
    let refused = changed(&a, volume, Since::Era(before)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("ERA_OTHER_HISTORY")
    );
    // The remote writes are on the volume; a new history reports exactly
    // what is written after it begins.
    let device = publish(&mut a.volumes().await, volume).await.unwrap();
    assert_eq!(
        read_at(Path::new(&device), 3 * BLOCK, 4096),
        pattern(7, 3, 4096)
    );
    let after = checkpoint(&a, volume).await.unwrap();
    write_at(Path::new(&device), 5 * BLOCK, &pattern(8, 5, 4096));
    let written = changed(&a, volume, Since::Era(after)).await.unwrap();
    assert_eq!(written, [5].into_iter().collect());
    unpublish(&mut a.volumes().await, volume).await.unwrap();
    a.destroy().await;
}

/// `kill -9` between each kernel step of export, unexport and release and
/// its record: after a restart the kernel's target holds what the record
/// says, and a retry of the call converges.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_inside_export_unexport_and_release() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d15",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d15",
    );
    let mut a = agent("dmctexka", 4442, "0a000000-0000-4000-8000-00000000000d").await;
    let b = agent("dmctexkb", 4443, "0b000000-0000-4000-8000-00000000000e").await;
    create(&mut a.volumes().await, ids.volume, 16 * MIB)
        .await
        .unwrap();

    a.crash_inside("export.after_record", async |a| {
        assert!(export(ids, a, &b).await.is_err());
    })
    .await;
    let export_answer = export(ids, &a, &b).await.unwrap();
    let (exported, token) = (export_answer.subsystem_nqn, export_answer.release_token);
    assert!(
        configfs_has(&exported),
        "restored at start, kept by the retry"
    );

    let refused = unexport(ids, &a, "").await.unwrap_err();
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("EXPORT_FOR_TRANSFER"),
        "{refused:?}"
    );
    a.crash_inside("unexport.after_unexport", async |a| {
        assert!(unexport(ids, a, &token).await.is_err());
    })
    .await;
    assert!(configfs_has(&exported), "the record still says exported");
    unexport(ids, &a, &token).await.unwrap();
    assert!(!configfs_has(&exported));

    let token = export(ids, &a, &b).await.unwrap().release_token;
    let to_b = host_nqn(&b).await;
    a.crash_inside("release.after_unexport", async |a| {
        assert!(release(ids, a, &to_b, &token).await.is_err());
    })
    .await;
    let denied = release(ids, &a, &to_b, "").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    release(ids, &a, &to_b, &token).await.unwrap();
    assert!(!configfs_has(&exported));
    assert_eq!(
        get(&mut a.volumes().await, ids.volume)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "released"
    );
    b.destroy().await;
    a.destroy().await;
}

async fn unexport(ids: Ids, source: &AgentProcess, token: &str) -> Result<(), tonic::Status> {
    transfers(source)
        .await
        .unexport_volume(UnexportVolumeRequest {
            volume_id: ids.volume.into(),
            release_token: token.into(),
            force: false,
        })
        .await
        .map(drop)
}

async fn release(
    ids: Ids,
    source: &AgentProcess,
    host_nqn: &str,
    token: &str,
) -> Result<(), tonic::Status> {
    transfers(source)
        .await
        .release_volume(dmclone::api::proto::v1::ReleaseVolumeRequest {
            volume_id: ids.volume.into(),
            host_nqn: host_nqn.into(),
            release_token: token.into(),
            snapshots_moved: Vec::new(),
        })
        .await
        .map(drop)
}

/// `nvme.auth`: `required` (the default) exports with DH-HMAC-CHAP secrets
/// where the kernel authenticates hosts, and where it cannot (Debian 12's
/// 6.1) refuses every export with the reason, recording nothing; the
/// start says which. `none` exports without secrets and warns at start.
#[tokio::test(flavor = "multi_thread")]
async fn exports_follow_the_nvme_auth_policy_of_the_kernel() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d16",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d16",
    );
    let peer = "nqn.2014-08.org.nvmexpress:uuid:0b000000-0000-4000-8000-0000000000f1";
    let export_to_peer = async |agent: &AgentProcess| {
        transfers(agent)
            .await
            .export_volume(ExportVolumeRequest {
                volume_id: ids.volume.into(),
                host_nqn: peer.into(),
                for_transfer: true,
            })
            .await
            .map(|r| r.into_inner())
    };
    let kernel_authenticates = nvme_auth_policy() == "required";
    let required = agent_with(
        "dmctauthr",
        4451,
        "0a000000-0000-4000-8000-0000000000f2",
        &["--nvme-auth", "required"],
    )
    .await;
    create(&mut required.volumes().await, ids.volume, 8 * MIB)
        .await
        .unwrap();
    let answer = export_to_peer(&required).await;
    let withdraw = async |agent: &AgentProcess, export: &Export| {
        transfers(agent)
            .await
            .unexport_volume(UnexportVolumeRequest {
                volume_id: ids.volume.into(),
                release_token: export.release_token.clone(),
                force: false,
            })
            .await
            .unwrap();
    };
    if kernel_authenticates {
        let export = answer.unwrap();
        assert!(secrets_of(&export).is_some(), "{:?}", export.subsystem_nqn);
        withdraw(&required, &export).await;
        assert!(
            required
                .log()
                .contains("authenticate host and target with DH-HMAC-CHAP")
        );
    } else {
        let refused = answer.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(
            refusal_reason(&refused).as_deref(),
            Some("AGENT_NOT_CONFIGURED")
        );
        assert!(refused.message().contains("nvme.auth"), "{refused:?}");
        assert!(
            required
                .log()
                .contains("every export is refused until nvme.auth")
        );
        // Not recorded as exported: it may be published (attached) here.
        publish(&mut required.volumes().await, ids.volume)
            .await
            .unwrap();
    }
    required.destroy().await;

    let none = agent_with(
        "dmctauthn",
        4452,
        "0a000000-0000-4000-8000-0000000000f3",
        &["--nvme-auth", "none"],
    )
    .await;
    create(&mut none.volumes().await, ids.volume, 8 * MIB)
        .await
        .unwrap();
    let export = export_to_peer(&none).await.unwrap();
    assert_eq!(secrets_of(&export), None);
    assert!(configfs_has(&export.subsystem_nqn));
    assert!(none.log().contains("nvme.auth = none"));
    withdraw(&none, &export).await;
    none.destroy().await;
}

/// An export for a move waits `nvme.unclaimed_export_seconds` for its
/// destination. One nobody claims is withdrawn with its release token, and
/// one whose wait ran out while the agent was down does not come back at
/// start; one whose destination connected is claimed, outlives the wait,
/// and the move releases through it.
#[tokio::test(flavor = "multi_thread")]
async fn exports_nobody_claims_expire_and_claimed_ones_stay() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d17",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d17",
    );
    let mut a = agent_with(
        "dmctclma",
        4453,
        "0a000000-0000-4000-8000-0000000000d1",
        &["--nvme-unclaimed-export-seconds", "2"],
    )
    .await;
    let b = agent("dmctclmb", 4454, "0b000000-0000-4000-8000-0000000000d2").await;
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, ids.volume, 64 * MIB).await.unwrap();
    let path_a = PathBuf::from(publish(&mut volumes_a, ids.volume).await.unwrap());
    fill(&path_a, 93, 64 * MIB);

    let unclaimed = export(ids, &a, &b).await.unwrap();
    assert!(unclaimed.claim_deadline_unix > 0, "{unclaimed:?}");
    wait_until("the unclaimed export is withdrawn", || {
        !configfs_has(&unclaimed.subsystem_nqn)
    })
    .await;
    let void = release(ids, &a, &host_nqn(&b).await, &unclaimed.release_token)
        .await
        .unwrap_err();
    assert_eq!(
        refusal_reason(&void).as_deref(),
        Some("EXPORT_NOT_FOR_TRANSFER"),
        "its token went with it: {void:?}"
    );
    assert!(a.log().contains("did not claim"), "audited");

    let before_crash = export(ids, &a, &b).await.unwrap();
    a.kill9().await;
    assert!(
        configfs_has(&before_crash.subsystem_nqn),
        "the kernel keeps it"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.restart().await;
    assert!(
        !configfs_has(&before_crash.subsystem_nqn),
        "expired while the agent was down: not restored"
    );

    let mut volumes_a = a.volumes().await;
    let exported = export(ids, &a, &b).await.unwrap();
    start_move(ids, &a, &exported, &b, true).await.unwrap();
    wait_until("B's claim is acknowledged", || {
        b.log().contains("the source knows its export is claimed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        configfs_has(&exported.subsystem_nqn),
        "claimed: exported past the wait"
    );
    unpublish(&mut volumes_a, ids.volume).await.unwrap();
    transfers(&b)
        .await
        .commit_transfer(TransferRef {
            transfer_id: ids.transfer.into(),
        })
        .await
        .unwrap();
    wait_released(ids, &b).await;
    assert_eq!(
        read_at(&public(ids, &b), 40 * MIB, MIB as usize),
        pattern(93, 40 * MIB, MIB as usize)
    );
    b.destroy().await;
    a.destroy().await;
}
