//! The TCP API speaks mutual TLS only; the Unix socket is private. Health and
//! reflection answer on both.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    time::{Duration, Instant},
};

use dmclone::{
    api::proto::v1::{GetNodeInfoRequest, node_client::NodeClient},
    client::{ClientTls, connect_tls},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::support::free_port;

use super::fixture::AgentProcess;

struct Pem {
    cert: String,
    key: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Pem {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

async fn node_info_over(channel: Channel) -> Result<String, tonic::Status> {
    NodeClient::new(channel)
        .get_node_info(GetNodeInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
}

async fn assert_health_and_reflection(channel: Channel) {
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "dmclone.v1.Volumes", "dmclone.v1.Node"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies
        .message()
        .await
        .unwrap()
        .expect("a reflection reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "dmclone.v1.Node",
        "dmclone.v1.Volumes",
        "dmclone.v1.Snapshots",
        "dmclone.v1.Transfers",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} not in {names:?}"
        );
    }
}

/// An agent serving TCP with mutual TLS under a CA of the test's own, and
/// what a client needs to reach it.
struct TlsAgent {
    agent: AgentProcess,
    trusted: CertifiedIssuer<'static, KeyPair>,
    address: String,
    _dir: tempfile::TempDir,
}

impl TlsAgent {
    /// Starts one with these `--tcp-client` entries.
    async fn start(prefix: &str, clients: &[&str]) -> Self {
        Self::start_with(prefix, clients, &[]).await
    }

    /// Starts one with these `--tcp-client` entries and more arguments.
    async fn start_with(prefix: &str, clients: &[&str], more: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trusted = ca("dmclone test CA");
        let server = leaf(
            &trusted,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (cert, key, client_ca) = (
            write("agent.pem", &server.cert),
            write("agent.key", &server.key),
            write("ca.pem", &trusted.pem()),
        );
        let address = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "--pool-file-size",
            "256M",
            "--listen",
            &address,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &client_ca,
        ];
        for client in clients {
            args.extend(["--tcp-client", client]);
        }
        args.extend_from_slice(more);
        let agent = AgentProcess::start_with(prefix, &args, &[]).await;
        Self {
            agent,
            trusted,
            address,
            _dir: dir,
        }
    }

    /// Client settings with `pem` as the client's identity, if any.
    fn tls(&self, pem: Option<&Pem>) -> ClientTls {
        ClientTls {
            ca_pem: self.trusted.pem().into_bytes(),
            cert_pem: pem.map(|p| p.cert.clone().into_bytes()),
            key_pem: pem.map(|p| p.key.clone().into_bytes()),
            server_name: "localhost".into(),
        }
    }

    /// Where the agent's certificate, key and client CA are.
    fn file(&self, name: &str) -> std::path::PathBuf {
        self._dir.path().join(name)
    }

    /// A channel as the client certified for `name` by the agent's CA.
    async fn channel_as(&self, name: &str) -> Channel {
        let pem = leaf(&self.trusted, &[name], ExtendedKeyUsagePurpose::ClientAuth);
        connect_tls(&self.address, &self.tls(Some(&pem)))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_admits_only_clients_certified_by_the_configured_ca() {
    let bed = TlsAgent::start("dmcttls", &["cinder-volume=driver"]).await;
    let other = ca("someone else's CA");
    let client = leaf(
        &bed.trusted,
        &["cinder-volume"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let rogue = leaf(
        &other,
        &["cinder-volume"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (address, agent) = (&bed.address, &bed.agent);
    let tls = |pem: Option<&Pem>| bed.tls(pem);
    let admitted = connect_tls(address, &tls(Some(&client))).await.unwrap();
    assert!(!node_info_over(admitted.clone()).await.unwrap().is_empty());
    assert_health_and_reflection(admitted).await;

    for (who, pem) in [
        ("a client without a certificate", None),
        ("a client certified by another CA", Some(&rogue)),
    ] {
        // With TLS 1.3 the server checks the client's certificate after the
        // handshake, so the refusal may surface at connect or at the first call.
        let refused = match connect_tls(address, &tls(pem)).await {
            Err(err) => err.to_string(),
            Ok(channel) => node_info_over(channel).await.expect_err(who).to_string(),
        };
        assert!(!refused.is_empty(), "{who} was admitted");
    }

    let socket = agent.socket();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw(), "socket owner");
    assert_eq!(
        std::fs::metadata(agent.state_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_health_and_reflection(agent.channel().await).await;
    assert!(Path::new(&socket).exists());
    bed.agent.destroy().await;
}

/// Calls every RPC of the API with an empty request; returns each call's
/// name and whether the agent refused it with PERMISSION_DENIED (an empty
/// request changes nothing: it fails validation if it gets that far).
async fn denied_calls(channel: Channel) -> Vec<(&'static str, bool)> {
    use dmclone::api::proto::v1::{
        self as pb, snapshots_client::SnapshotsClient, transfers_client::TransfersClient,
        volumes_client::VolumesClient,
    };
    let mut node = NodeClient::new(channel.clone());
    let mut volumes = VolumesClient::new(channel.clone());
    let mut snapshots = SnapshotsClient::new(channel.clone());
    let mut transfers = TransfersClient::new(channel);
    let mut seen = Vec::new();
    macro_rules! call {
        ($($client:ident . $method:ident ($request:ident) => $name:literal),* $(,)?) => {$(
            let outcome = $client.$method(pb::$request::default()).await.map(drop);
            let denied = matches!(&outcome, Err(s) if s.code() == tonic::Code::PermissionDenied);
            seen.push(($name, denied));
        )*};
    }
    call!(
        node.get_node_info(GetNodeInfoRequest) => "GetNodeInfo",
        volumes.create_volume(CreateVolumeRequest) => "CreateVolume",
        volumes.delete_volume(DeleteVolumeRequest) => "DeleteVolume",
        volumes.extend_volume(ExtendVolumeRequest) => "ExtendVolume",
        volumes.get_volume(GetVolumeRequest) => "GetVolume",
        volumes.list_volumes(ListVolumesRequest) => "ListVolumes",
        volumes.publish_volume(PublishVolumeRequest) => "PublishVolume",
        volumes.unpublish_volume(UnpublishVolumeRequest) => "UnpublishVolume",
        snapshots.create_snapshot(CreateSnapshotRequest) => "CreateSnapshot",
        snapshots.delete_snapshot(DeleteSnapshotRequest) => "DeleteSnapshot",
        snapshots.get_snapshot(GetSnapshotRequest) => "GetSnapshot",
        snapshots.list_snapshots(ListSnapshotsRequest) => "ListSnapshots",
        snapshots.revert_volume(RevertVolumeRequest) => "RevertVolume",
        snapshots.mark_checkpoint(MarkCheckpointRequest) => "MarkCheckpoint",
        snapshots.get_changed_blocks(GetChangedBlocksRequest) => "GetChangedBlocks",
        transfers.export_volume(ExportVolumeRequest) => "ExportVolume",
        transfers.unexport_volume(UnexportVolumeRequest) => "UnexportVolume",
        transfers.release_volume(ReleaseVolumeRequest) => "ReleaseVolume",
        transfers.claim_export(ClaimExportRequest) => "ClaimExport",
        transfers.read_snapshot_delta(ReadSnapshotDeltaRequest) => "ReadSnapshotDelta",
        transfers.start_transfer(StartTransferRequest) => "StartTransfer",
        transfers.commit_transfer(TransferRef) => "CommitTransfer",
        transfers.abort_transfer(AbortTransferRequest) => "AbortTransfer",
        transfers.pause_transfer(TransferRef) => "PauseTransfer",
        transfers.resume_transfer(TransferRef) => "ResumeTransfer",
        transfers.throttle_transfer(ThrottleTransferRequest) => "ThrottleTransfer",
        transfers.get_transfer(TransferRef) => "GetTransfer",
        transfers.list_transfers(ListTransfersRequest) => "ListTransfers",
        transfers.watch_transfers(WatchTransfersRequest) => "WatchTransfers",
    );
    seen
}

const PEER_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0b000000-0000-4000-8000-0000000000a2";

/// Roles over TCP with real certificates: a driver may call everything, a
/// reader only what changes nothing, a peer node info and the release of a
/// copy exported to its own host, a certificate not listed nothing; every
/// refusal and every mutating call is in the audit log with its caller.
#[tokio::test(flavor = "multi_thread")]
async fn each_role_may_call_exactly_its_share() {
    let peer_flag = format!("agent-hv2=peer@{PEER_NQN}");
    let bed = TlsAgent::start(
        "dmctroles",
        &["cinder-volume=driver", "prometheus=reader", &peer_flag],
    )
    .await;
    let channel_for = async |name: &str| bed.channel_as(name).await;
    let reads = [
        "GetNodeInfo",
        "GetVolume",
        "ListVolumes",
        "GetSnapshot",
        "ListSnapshots",
        "GetChangedBlocks",
        "GetTransfer",
        "ListTransfers",
        "WatchTransfers",
    ];
    for (identity, allowed) in [
        // Everything but ReleaseVolume, ClaimExport and ReadSnapshotDelta:
        // over TCP only a peer releases, claims or reads a snapshot's delta.
        ("cinder-volume", None),
        ("prometheus", Some(&reads[..])),
        // ReleaseVolume, ClaimExport or ReadSnapshotDelta naming no host is
        // not its own host's: refused too (the peer's own host is tried
        // below).
        ("agent-hv2", Some(&["GetNodeInfo", "UnexportVolume"][..])),
        ("stranger", Some(&[][..])),
    ] {
        let calls = denied_calls(channel_for(identity).await).await;
        assert_eq!(calls.len(), 29);
        for (method, denied) in calls {
            let may = match allowed {
                None => !matches!(
                    method,
                    "ReleaseVolume" | "ClaimExport" | "ReadSnapshotDelta"
                ),
                Some(list) => list.contains(&method),
            };
            assert_eq!(denied, !may, "{identity} calling {method}");
        }
    }

    // A device of this host is named only from this host.
    let local_source = dmclone::api::proto::v1::transfers_client::TransfersClient::new(
        channel_for("cinder-volume").await,
    )
    .start_transfer(dmclone::api::proto::v1::StartTransferRequest {
        transfer_id: "0d9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d41".into(),
        volume_id: "0c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d41".into(),
        size_bytes: 4 << 20,
        source: Some(
            dmclone::api::proto::v1::start_transfer_request::Source::DevicePath(
                "/dev/loop0".into(),
            ),
        ),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(
        local_source.code(),
        tonic::Code::PermissionDenied,
        "{local_source:?}"
    );
    assert!(
        local_source.message().contains("Unix socket"),
        "{local_source:?}"
    );

    // A peer releases only what was exported to its own host.
    let mut transfers = dmclone::api::proto::v1::transfers_client::TransfersClient::new(
        channel_for("agent-hv2").await,
    );
    let release = |host_nqn: &str| dmclone::api::proto::v1::ReleaseVolumeRequest {
        volume_id: "0c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d40".into(),
        host_nqn: host_nqn.into(),
        release_token: String::new(),
        snapshots_moved: Vec::new(),
    };
    let elsewhere = transfers
        .release_volume(release(
            "nqn.2014-08.org.nvmexpress:uuid:0b000000-0000-4000-8000-0000000000a3",
        ))
        .await
        .unwrap_err();
    assert_eq!(
        elsewhere.code(),
        tonic::Code::PermissionDenied,
        "{elsewhere:?}"
    );
    // Its own host passes: a copy that is not there counts as released.
    transfers.release_volume(release(PEER_NQN)).await.unwrap();

    let log = bed.agent.log();
    assert!(
        log.lines().any(|l| l.contains("dmclone::audit")
            && l.contains("permission denied")
            && l.contains("stranger")),
        "the refusal of an unlisted certificate names it"
    );
    assert!(
        log.lines().any(|l| l.contains("dmclone::audit")
            && l.contains("CreateVolume")
            && l.contains("driver cinder-volume")),
        "a mutating call is audited with its caller"
    );
    assert!(
        log.lines().any(|l| l.contains("dmclone::audit")
            && l.contains("permission denied")
            && l.contains("may release only copies exported to its own host")),
        "a refusal inside a handler is audited too"
    );
    bed.agent.destroy().await;
}

/// Callers cannot exhaust the agent: 500 connections that never finish
/// their TLS handshake do not keep a well-behaved client out, and one
/// caller's WatchTransfers streams are capped (the rest are refused with
/// RESOURCE_EXHAUSTED, and a closed stream frees its place).
#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_and_watch_floods_are_bounded() {
    use dmclone::api::proto::v1::{WatchTransfersRequest, transfers_client::TransfersClient};
    let bed = TlsAgent::start("dmctlimits", &["cinder-volume=driver"]).await;
    let (address, agent) = (&bed.address, &bed.agent);
    let mut stalled = Vec::new();
    for _ in 0..500 {
        stalled.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    // The client's certificate is made before the clock starts: what is
    // timed is the agent admitting and answering it.
    let pem = leaf(
        &bed.trusted,
        &["cinder-volume"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let started = Instant::now();
    let channel = connect_tls(address, &bed.tls(Some(&pem))).await.unwrap();
    node_info_over(channel).await.unwrap();
    let admitted_in = started.elapsed();
    println!(
        "MEASURED with 500 stalled handshakes open, a client connected and was answered in {} ms",
        admitted_in.as_millis()
    );
    assert!(admitted_in < Duration::from_secs(1), "{admitted_in:?}");
    drop(stalled);

    // Watches over the socket, 16 connections of up to 64 streams each.
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(agent.channel().await);
    }
    let attempts = 10_000usize;
    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(attempts);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..attempts {
        if calls.len() >= 64 {
            outcomes.push(calls.join_next().await.unwrap().unwrap());
        }
        let channel = channels[i % channels.len()].clone();
        calls.spawn(async move {
            TransfersClient::new(channel)
                .watch_transfers(WatchTransfersRequest::default())
                .await
        });
    }
    while let Some(outcome) = calls.join_next().await {
        outcomes.push(outcome.unwrap());
    }
    let (mut open, mut refused) = (Vec::new(), 0usize);
    for outcome in outcomes {
        match outcome {
            Ok(stream) => open.push(stream),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    println!(
        "MEASURED {attempts} WatchTransfers calls from one caller in {} ms: {} open, {refused} refused",
        started.elapsed().as_millis(),
        open.len()
    );
    assert_eq!(
        open.len(),
        64,
        "the per-caller cap (limits.max_watches_per_caller)"
    );
    open.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = TransfersClient::new(channels[0].clone())
            .watch_transfers(WatchTransfersRequest::default())
            .await;
        if let Ok(stream) = again {
            open.push(stream);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream never freed its place"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(open);
    bed.agent.destroy().await;
}

const OTHER_PEER_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0b000000-0000-4000-8000-0000000000a3";

/// A move's source copy goes only to the destination it was exported to,
/// with the release token of that export: no token, a wrong token, the
/// driver's certificate or another peer's all leave the copy and its
/// export exactly as they were (same sha256), and so does an unexport
/// without the token; the token and the right peer release it.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_is_released_only_by_its_destination_with_the_token() {
    use dmclone::api::proto::v1::{
        ClaimExportRequest, ExportVolumeRequest, GetVolumeRequest, ReleaseVolumeRequest,
        UnexportVolumeRequest, transfers_client::TransfersClient, volumes_client::VolumesClient,
    };
    const VOLUME: &str = "0c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d50";
    const SIZE: u64 = 16 << 20;
    let port = free_port().to_string();
    let (peer, other_peer) = (
        format!("agent-hv2=peer@{PEER_NQN}"),
        format!("agent-hv3=peer@{OTHER_PEER_NQN}"),
    );
    let bed = TlsAgent::start_with(
        "dmctrel",
        &["cinder-volume=driver", &peer, &other_peer],
        &[
            "--nvme-auth",
            crate::support::nvme_auth_policy(),
            "--nvme-export-address",
            "127.0.0.1",
            "--nvme-export-port",
            &port,
            "--nvme-export-port-id",
            &port,
        ],
    )
    .await;
    let mut volumes = bed.agent.volumes().await;
    super::api::create(&mut volumes, VOLUME, SIZE)
        .await
        .unwrap();
    let device = super::api::publish(&mut volumes, VOLUME).await.unwrap();
    super::moves::fill(Path::new(&device), 50, SIZE);
    super::api::unpublish(&mut volumes, VOLUME).await.unwrap();

    let as_client = async |name: &str| TransfersClient::new(bed.channel_as(name).await);
    let export = as_client("cinder-volume")
        .await
        .export_volume(ExportVolumeRequest {
            volume_id: VOLUME.into(),
            host_nqn: PEER_NQN.into(),
            for_transfer: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(export.release_token.len(), 64, "256 bits in hex");
    assert!(export.claim_deadline_unix > 0, "unclaimed, it expires");
    let exported_copy = format!("/dev/mapper/dmctrel-thin-{VOLUME}");
    let before = crate::support::sha256_of(Path::new(&exported_copy), SIZE);
    let release = |host_nqn: &str, token: &str| ReleaseVolumeRequest {
        volume_id: VOLUME.into(),
        host_nqn: host_nqn.into(),
        release_token: token.into(),
        snapshots_moved: Vec::new(),
    };
    let wrong = "00".repeat(32);
    for (who, request, code) in [
        (
            "agent-hv2",
            release(PEER_NQN, ""),
            tonic::Code::PermissionDenied,
        ),
        (
            "agent-hv2",
            release(PEER_NQN, &wrong),
            tonic::Code::PermissionDenied,
        ),
        (
            "cinder-volume",
            release(PEER_NQN, &export.release_token),
            tonic::Code::PermissionDenied,
        ),
        (
            "agent-hv3",
            release(PEER_NQN, &export.release_token),
            tonic::Code::PermissionDenied,
        ),
        (
            "agent-hv3",
            release(OTHER_PEER_NQN, &export.release_token),
            tonic::Code::FailedPrecondition,
        ),
    ] {
        let refused = as_client(who)
            .await
            .release_volume(request)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "{who}: {refused:?}");
    }
    let unexport = |token: &str, force: bool| UnexportVolumeRequest {
        volume_id: VOLUME.into(),
        release_token: token.into(),
        force,
    };
    for (who, request) in [
        ("cinder-volume", unexport("", false)),
        ("agent-hv2", unexport("", false)),
        ("agent-hv2", unexport("", true)),
        ("agent-hv2", unexport(&wrong, false)),
        ("agent-hv3", unexport(&export.release_token, false)),
    ] {
        let refused = as_client(who)
            .await
            .unexport_volume(request)
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused.code(),
                tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition
            ),
            "{who}: {refused:?}"
        );
    }
    // The claim a destination makes once connected: the same share.
    let claim = |host_nqn: &str, token: &str| ClaimExportRequest {
        volume_id: VOLUME.into(),
        host_nqn: host_nqn.into(),
        release_token: token.into(),
        return_trip: None,
    };
    for (who, request, code) in [
        (
            "agent-hv2",
            claim(PEER_NQN, ""),
            tonic::Code::PermissionDenied,
        ),
        (
            "agent-hv2",
            claim(PEER_NQN, &wrong),
            tonic::Code::PermissionDenied,
        ),
        (
            "cinder-volume",
            claim(PEER_NQN, &export.release_token),
            tonic::Code::PermissionDenied,
        ),
        (
            "agent-hv3",
            claim(PEER_NQN, &export.release_token),
            tonic::Code::PermissionDenied,
        ),
        (
            "agent-hv3",
            claim(OTHER_PEER_NQN, &export.release_token),
            tonic::Code::FailedPrecondition,
        ),
    ] {
        let refused = as_client(who)
            .await
            .claim_export(request)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "claim by {who}: {refused:?}");
    }
    for _repeat in 0..2 {
        as_client("agent-hv2")
            .await
            .claim_export(claim(PEER_NQN, &export.release_token))
            .await
            .unwrap();
    }
    assert!(
        Path::new("/sys/kernel/config/nvmet/subsystems")
            .join(&export.subsystem_nqn)
            .exists(),
        "still exported"
    );
    assert_eq!(
        crate::support::sha256_of(Path::new(&exported_copy), SIZE),
        before,
        "the copy is untouched"
    );

    as_client("agent-hv2")
        .await
        .release_volume(release(PEER_NQN, &export.release_token))
        .await
        .unwrap();
    let gone = VolumesClient::new(bed.agent.channel().await)
        .get_volume(GetVolumeRequest {
            volume_id: VOLUME.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "released");
    assert!(
        !Path::new("/sys/kernel/config/nvmet/subsystems")
            .join(&export.subsystem_nqn)
            .exists()
    );
    let log = bed.agent.log();
    assert!(!log.contains(&export.release_token), "no token in the log");
    assert!(
        log.lines().any(|l| l.contains("dmclone::audit")
            && l.contains("ReleaseVolume")
            && l.contains("peer agent-hv2")
            && l.contains("release token does not match")),
        "a wrong token is audited with its caller"
    );
    bed.agent.destroy().await;
}

/// Rotation: new server certificate, key and client CA written in place,
/// SIGHUP, and new clients must use the new CA while an established
/// connection goes on; a file that does not load keeps the settings in use.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_on_sighup_without_dropping_connections() {
    let bed = TlsAgent::start("dmctrot", &["cinder-volume=driver"]).await;
    let established = bed.channel_as("cinder-volume").await;
    node_info_over(established.clone()).await.unwrap();

    let rotated = ca("dmclone rotated CA");
    let server = leaf(
        &rotated,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    std::fs::write(bed.file("agent.pem"), &server.cert).unwrap();
    std::fs::write(bed.file("agent.key"), &server.key).unwrap();
    std::fs::write(bed.file("ca.pem"), rotated.pem()).unwrap();
    let hangup = |agent: &AgentProcess| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    };
    let log_has = async |agent: &AgentProcess, text: &str, times: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.log().matches(text).count() < times {
            assert!(Instant::now() < deadline, "no {text:?} in the log");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    hangup(&bed.agent);
    log_has(&bed.agent, "reloaded the TLS certificate", 1).await;

    let client_of = |issuer: &CertifiedIssuer<'static, KeyPair>| {
        let pem = leaf(
            issuer,
            &["cinder-volume"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        ClientTls {
            ca_pem: issuer.pem().into_bytes(),
            cert_pem: Some(pem.cert.into_bytes()),
            key_pem: Some(pem.key.into_bytes()),
            server_name: "localhost".into(),
        }
    };
    let new_client = client_of(&rotated);
    let channel = connect_tls(&bed.address, &new_client).await.unwrap();
    node_info_over(channel).await.unwrap();
    let old_client = client_of(&bed.trusted);
    let refused = match connect_tls(&bed.address, &old_client).await {
        Err(err) => err.to_string(),
        Ok(channel) => node_info_over(channel)
            .await
            .expect_err("the old CA is no longer trusted")
            .to_string(),
    };
    assert!(!refused.is_empty());
    node_info_over(established.clone())
        .await
        .expect("an established connection survives the reload");

    // A broken file: the rotated settings stay in use.
    std::fs::write(bed.file("agent.pem"), "not a certificate").unwrap();
    hangup(&bed.agent);
    log_has(&bed.agent, "kept the TLS settings in use", 1).await;
    assert!(
        bed.agent.log().contains("agent.pem"),
        "the log names the file that did not load"
    );
    let channel = connect_tls(&bed.address, &new_client).await.unwrap();
    node_info_over(channel).await.unwrap();
    bed.agent.destroy().await;
}
