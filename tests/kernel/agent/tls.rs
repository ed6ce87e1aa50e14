//! The TCP API speaks mutual TLS only; the Unix socket is private. Health and
//! reflection answer on both.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
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

#[tokio::test(flavor = "multi_thread")]
async fn tcp_admits_only_clients_certified_by_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = ca("dmclone test CA");
    let other = ca("someone else's CA");
    let server = leaf(
        &trusted,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf(
        &trusted,
        &["cinder-volume"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let rogue = leaf(
        &other,
        &["cinder-volume"],
        ExtendedKeyUsagePurpose::ClientAuth,
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
    let agent = AgentProcess::start_with(
        "dmcttls",
        &[
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
        ],
        &[],
    )
    .await;

    let tls = |pem: Option<&Pem>| ClientTls {
        ca_pem: trusted.pem().into_bytes(),
        cert_pem: pem.map(|p| p.cert.clone().into_bytes()),
        key_pem: pem.map(|p| p.key.clone().into_bytes()),
        server_name: "localhost".into(),
    };
    let admitted = connect_tls(&address, &tls(Some(&client))).await.unwrap();
    assert!(!node_info_over(admitted.clone()).await.unwrap().is_empty());
    assert_health_and_reflection(admitted).await;

    for (who, pem) in [
        ("a client without a certificate", None),
        ("a client certified by another CA", Some(&rogue)),
    ] {
        // With TLS 1.3 the server checks the client's certificate after the
        // handshake, so the refusal may surface at connect or at the first call.
        let refused = match connect_tls(&address, &tls(pem)).await {
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
    agent.destroy().await;
}
