//! Who may call what (README, "Security"). One tower layer in front of every
//! service decides from the connection alone: over TCP by the identity of
//! the client's certificate, mapped to a role by `tcp.client`; over the
//! Unix socket by the caller's uid (root, or the agent's own user, is a
//! driver). Anyone else gets PERMISSION_DENIED before any handler runs.
//!
//! The decision rides along with the request: as a [`Caller`] in its
//! extensions (the release handler binds a peer to its host NQN) and in the
//! [`CALLER_HEADER`] the layer sets, dropping any value a client sent, so
//! every call's log lines and audit line name the caller.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    Status,
    body::Body,
    codegen::http::{HeaderValue, Request, Response},
    transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo},
};
use tower::{Layer, Service};
use tracing::warn;

use crate::config::{ClientConfig, Role};

/// The header through which handlers learn who calls: `role identity`.
pub const CALLER_HEADER: &str = "x-dmclone-caller";

/// Calls that change nothing; a `reader` may make them.
const READS: &[&str] = &[
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

/// What another agent needs: who this host is, and, for an export to it
/// for a move, to claim it once connected, release the copy after the move
/// or withdraw the export after an abort (the handlers check the export is
/// to the peer's host, and its token).
const PEER_CALLS: &[&str] = &[
    "GetNodeInfo",
    "ClaimExport",
    "ReadSnapshotDelta",
    "ReleaseVolume",
    "UnexportVolume",
];

/// The project's own services; anything else served (health, reflection)
/// is open to every admitted caller.
const OWN_SERVICES: &str = "/dmclone.v1.";

/// Who the layer said makes this call (`role identity`), or "" where no
/// layer ran.
pub fn caller_of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get(CALLER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Whether a call to `method` (its name, such as `GetVolume`) changes nothing.
pub fn is_read(method: &str) -> bool {
    READS.contains(&method)
}

/// Whether `role` may call `path`.
pub fn may_call(role: Role, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(OWN_SERVICES) else {
        return true;
    };
    let method = rest.rsplit('/').next().unwrap_or_default();
    match role {
        Role::Driver => true,
        Role::Reader => is_read(method),
        Role::Peer => PEER_CALLS.contains(&method),
    }
}

/// Who made a call, as the layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: String,
    pub role: Role,
    /// A peer's host: the only host whose copies it may release.
    pub host_nqn: Option<String>,
    /// Whether the call came over the Unix socket (from this host).
    pub on_socket: bool,
}

impl Caller {
    fn header(&self) -> String {
        format!("{} {}", self.role.name(), self.identity)
    }
}

/// What a move's destination does with its source's export.
#[derive(Debug, Clone, Copy)]
pub enum DestinationAct {
    Release,
    Claim,
    ReadSnapshot,
}

impl DestinationAct {
    fn object(self) -> &'static str {
        match self {
            Self::Release => "copies",
            Self::Claim => "exports",
            Self::ReadSnapshot => "snapshots of volumes",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Claim => "claim",
            Self::ReadSnapshot => "read",
        }
    }
}

/// A release or claim comes from the destination the volume was exported
/// to: over TCP only a peer, and the host NQN it names must be the one its
/// identity is bound to. On the Unix socket root may name any host (an
/// agent on this host calls that way).
pub fn bind_peer(
    caller: Option<&Caller>,
    host_nqn: &str,
    act: DestinationAct,
) -> Result<(), Status> {
    let (verb, object) = (act.verb(), act.object());
    match caller {
        Some(Caller {
            role: Role::Peer,
            identity,
            host_nqn: Some(bound),
            ..
        }) if bound != host_nqn => Err(denied(format!(
            "peer {identity} may {verb} only {object} exported to its own host {bound}, not to \
             {host_nqn:?}"
        ))),
        Some(Caller {
            role,
            identity,
            on_socket: false,
            ..
        }) if *role != Role::Peer => Err(denied(format!(
            "a {} ({identity}) may not {verb} {object} over TCP: only the agent the volume was \
             exported to does, as a peer",
            role.name()
        ))),
        _ => Ok(()),
    }
}

/// A peer's own host, for calls that act only on what was exported to it.
pub fn peer_host(caller: Option<&Caller>) -> Option<String> {
    caller
        .filter(|caller| caller.role == Role::Peer)
        .and_then(|caller| caller.host_nqn.clone())
}

/// Forcing is for operators and the driver, never for a peer.
pub fn no_force_by_peer(caller: Option<&Caller>, force: bool) -> Result<(), Status> {
    match caller {
        Some(caller) if force && caller.role == Role::Peer => Err(denied(format!(
            "peer {} may not force an unexport; it withdraws an export with its release token",
            caller.identity
        ))),
        _ => Ok(()),
    }
}

/// PERMISSION_DENIED for `reason`, written to the audit log as the layer's
/// refusals are.
fn denied(reason: String) -> Status {
    warn!(target: "dmclone::audit", %reason, "permission denied");
    Status::permission_denied(reason)
}

/// Some requests may only come from this host: a `device_path` source
/// names a device of this host, which no remote caller has any business
/// choosing (it could name another tenant's disk).
pub fn from_this_host(caller: Option<&Caller>, what: &str) -> Result<(), Status> {
    match caller {
        Some(caller) if !caller.on_socket => Err(denied(format!(
            "{what} is accepted only on the agent's Unix socket, not from {} over TCP",
            caller.identity
        ))),
        _ => Ok(()),
    }
}

/// The names a certificate answers to, in the order they are matched: DNS
/// and URI subject alternative names, then common names; and its subject
/// for messages.
pub fn certificate_names(der: &[u8]) -> Option<(Vec<String>, String)> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::URI(uri) => names.push((*uri).to_owned()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(text) = cn.as_str() {
            names.push(text.to_owned());
        }
    }
    Some((names, cert.subject().to_string()))
}

/// How many calls the agent serves at once, over every connection and
/// both listeners: past that a call is refused at once with
/// RESOURCE_EXHAUSTED (a client retries later) rather than queued, so a
/// flood cannot pile up work or memory.
#[derive(Debug, Clone)]
pub struct CallGate {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl CallGate {
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
        }
    }

    fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the agent is serving {} calls, the most it takes at once (limits.max_calls); \
                 retry in a moment",
                self.max
            ))
        })
    }
}

/// The role table, the rule for the Unix socket, and the call gate.
#[derive(Debug, Clone)]
pub struct AccessLayer {
    clients: Arc<Vec<ClientConfig>>,
    gate: CallGate,
    socket_readers: Option<u32>,
}

impl AccessLayer {
    pub fn new(clients: Vec<ClientConfig>, gate: CallGate) -> Self {
        Self {
            clients: Arc::new(clients),
            gate,
            socket_readers: None,
        }
    }

    /// Members of group `gid` may call the socket as readers.
    pub fn with_socket_readers(mut self, gid: Option<u32>) -> Self {
        self.socket_readers = gid;
        self
    }

    /// Who calls over this connection, or why nobody may.
    fn caller<B>(&self, request: &Request<B>) -> Result<Caller, String> {
        let extensions = request.extensions();
        if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
            return self.certified(tls);
        }
        if let Some(unix) = extensions.get::<UdsConnectInfo>() {
            return socket_caller(unix, self.socket_readers);
        }
        Err("the connection is neither mutual TLS nor the Unix socket".into())
    }

    fn certified(&self, tls: &TlsConnectInfo<TcpConnectInfo>) -> Result<Caller, String> {
        let certs = tls.peer_certs().unwrap_or_default();
        let Some(cert) = certs.first() else {
            return Err("the client presented no certificate".into());
        };
        let (names, subject) = certificate_names(cert.as_ref())
            .ok_or_else(|| "the client's certificate cannot be parsed".to_owned())?;
        let client = names
            .iter()
            .find_map(|name| self.clients.iter().find(|client| &client.identity == name));
        match client {
            Some(client) => Ok(Caller {
                identity: client.identity.clone(),
                role: client.role,
                host_nqn: client.host_nqn.clone(),
                on_socket: false,
            }),
            None => Err(format!(
                "the client certificate (subject \"{subject}\", names {names:?}) is not listed in \
                 the agent's tcp.client"
            )),
        }
    }
}

/// Root, or the user the agent runs as, drives; a process in the readers'
/// group (primary or supplementary) reads; nobody else may call. The
/// socket's mode (0600, or 0660 with the readers' group) already keeps
/// others out; this holds if it changes.
fn socket_caller(unix: &UdsConnectInfo, readers: Option<u32>) -> Result<Caller, String> {
    let Some(cred) = unix.peer_cred else {
        return Err("the kernel did not say who is on the Unix socket".into());
    };
    let uid = cred.uid();
    let caller = |role| Caller {
        identity: format!("uid {uid} on the Unix socket"),
        role,
        host_nqn: None,
        on_socket: true,
    };
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return Ok(caller(Role::Driver));
    }
    if let Some(gid) = readers
        && (cred.gid() == gid || cred.pid().is_some_and(|pid| in_group(pid, gid)))
    {
        return Ok(caller(Role::Reader));
    }
    let group = match readers {
        Some(gid) => format!(", or a member of group {gid} as a reader"),
        None => String::new(),
    };
    Err(format!(
        "uid {uid} may not call on the Unix socket: only root may{group}"
    ))
}

/// Whether process `pid` holds supplementary group `gid` (its status file
/// lists them; a process that is gone holds none).
fn in_group(pid: i32, gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .is_some_and(|groups| groups.split_whitespace().any(|g| g == gid.to_string()))
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            layer: self.clone(),
        }
    }
}

/// [`AccessLayer`] around one service.
#[derive(Debug, Clone)]
pub struct Access<S> {
    inner: S,
    layer: AccessLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<Request<B>> for Access<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.headers_mut().remove(CALLER_HEADER);
        let path = request.uri().path().to_owned();
        let refusal = match self.layer.caller(&request) {
            Ok(caller) if may_call(caller.role, &path) => {
                let permit = match self.layer.gate.enter() {
                    Ok(permit) => permit,
                    Err(status) => {
                        warn!(%path, caller = %caller.identity, "refused: too many calls at once");
                        return Box::pin(async move { Ok(status.into_http()) });
                    }
                };
                if let Ok(value) = HeaderValue::from_str(&caller.header()) {
                    request.headers_mut().insert(CALLER_HEADER, value);
                }
                request.extensions_mut().insert(caller);
                let call = self.inner.call(request);
                return Box::pin(async move {
                    let answer = call.await;
                    drop(permit);
                    answer
                });
            }
            Ok(caller) => format!(
                "{} is a {} and may not call {path}",
                caller.identity,
                caller.role.name()
            ),
            Err(reason) => reason,
        };
        warn!(target: "dmclone::audit", %path, reason = %refusal, "permission denied");
        let status = Status::permission_denied(refusal);
        Box::pin(async move { Ok(status.into_http()) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every RPC the API defines, from its descriptor: a new one must be
    /// classified here, or this test fails.
    fn every_rpc() -> Vec<String> {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(super::super::proto::FILE_DESCRIPTOR_SET)
            .unwrap();
        let mut paths = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        paths
    }

    #[test]
    fn each_role_may_call_exactly_its_share() {
        let paths = every_rpc();
        assert!(paths.len() >= 25, "{paths:?}");
        for path in &paths {
            let method = path.rsplit('/').next().unwrap();
            assert!(may_call(Role::Driver, path), "{path}");
            let read = method.starts_with("Get")
                || method.starts_with("List")
                || method.starts_with("Watch");
            assert_eq!(may_call(Role::Reader, path), read, "{path}");
            let peer = matches!(
                method,
                "GetNodeInfo"
                    | "ClaimExport"
                    | "ReadSnapshotDelta"
                    | "ReleaseVolume"
                    | "UnexportVolume"
            );
            assert_eq!(may_call(Role::Peer, path), peer, "{path}");
        }
        for open in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(may_call(Role::Peer, open) && may_call(Role::Reader, open));
        }
    }

    #[test]
    fn only_the_peer_bound_to_the_exported_host_releases_over_tcp() {
        let caller = |role, on_socket, host_nqn: Option<&str>| Caller {
            identity: "someone".into(),
            role,
            host_nqn: host_nqn.map(str::to_owned),
            on_socket,
        };
        let peer = caller(Role::Peer, false, Some("nqn.a"));
        assert!(bind_peer(Some(&peer), "nqn.a", DestinationAct::Release).is_ok());
        let other = bind_peer(Some(&peer), "nqn.b", DestinationAct::Release).unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        let driver = bind_peer(
            Some(&caller(Role::Driver, false, None)),
            "nqn.a",
            DestinationAct::Claim,
        )
        .unwrap_err();
        assert_eq!(driver.code(), tonic::Code::PermissionDenied);
        assert!(driver.message().contains("only the agent"), "{driver:?}");
        assert!(
            bind_peer(
                Some(&caller(Role::Driver, true, None)),
                "nqn.a",
                DestinationAct::Claim
            )
            .is_ok()
        );
        assert_eq!(peer_host(Some(&peer)).as_deref(), Some("nqn.a"));
        assert_eq!(peer_host(Some(&caller(Role::Driver, true, None))), None);
        assert!(no_force_by_peer(Some(&peer), true).is_err());
        assert!(no_force_by_peer(Some(&peer), false).is_ok());
        assert!(no_force_by_peer(Some(&caller(Role::Driver, false, None)), true).is_ok());
    }

    #[test]
    fn certificate_names_are_sans_then_common_name() {
        let mut params =
            rcgen::CertificateParams::new(vec!["cinder.example.org".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/cinder".try_into().unwrap(),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cinder-volume");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (names, subject) = certificate_names(cert.der()).unwrap();
        assert_eq!(
            names,
            [
                "cinder.example.org",
                "spiffe://example.org/cinder",
                "cinder-volume"
            ]
        );
        assert!(subject.contains("cinder-volume"), "{subject}");
        assert_eq!(certificate_names(b"not a certificate"), None);
    }
}
