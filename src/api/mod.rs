//! The gRPC face of the agent: one tonic service per resource over the same
//! [`Agent`], served on the Unix socket and, when configured, on TCP with
//! mutual TLS. Health (`grpc.health.v1`) and server reflection are served on
//! both so that generic tools (grpcurl, grpc_health_probe) work.
//!
//! Handlers are thin: decode and validate the request, call the agent, encode
//! the answer. Every call runs in a span carrying the method, the object id
//! and the caller's `x-request-id`, so one id links a Cinder log line to ours.

pub mod access;
mod convert;
mod node;
pub mod proto;
mod release;
mod snapshot;
pub mod status;
mod tls;
mod transfer;
mod volume;
mod watch;

/// What clients print for the states they receive: the domain's names.
pub use convert::{snapshot_state_name, transfer_state_name, volume_state_name};
pub use release::GrpcSourceReleaser;

use std::{
    future::Future,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::Instant,
};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status, metadata::MetadataMap, service::Routes, transport::Server};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    agent::Agent,
    api::proto::{
        FILE_DESCRIPTOR_SET,
        v1::{
            node_server::NodeServer, snapshots_server::SnapshotsServer,
            transfers_server::TransfersServer, volumes_server::VolumesServer,
        },
    },
    config::TcpSettings,
    error::AgentError,
};

/// The metadata key callers put their request id in.
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// Serves the API until `shutdown` completes. `ready` runs once every
/// listener is bound and health says SERVING (the daemon tells systemd).
pub async fn serve(
    agent: Arc<Agent>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<(), AgentError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    let routes = routes(&agent, health_service)?;
    // Every listener is bound before any serves: a caller that reached the
    // socket may count on TCP and metrics being there too.
    let unix = bind_unix(&agent.settings().socket, agent.settings().socket_readers)?;
    let tcp = match &agent.settings().tcp {
        Some(tcp) => Some((
            tcp,
            Arc::new(tls::ReloadableTls::load(tcp)?),
            bind_tcp(tcp).await?,
        )),
        None => None,
    };
    let metrics = match agent.settings().metrics_listen {
        Some(address) => Some((bind_metrics(address).await?, address)),
        None => None,
    };
    let mut servers = tokio::task::JoinSet::new();
    // Root alone drives over the socket; TCP clients are whom tcp.client
    // lists. Both share one gate on calls served at once.
    let limits = agent.settings().limits;
    let gate = access::CallGate::new(limits.max_calls);
    let socket_server = limited(&limits)
        .layer(
            access::AccessLayer::new(Vec::new(), gate.clone())
                .with_socket_readers(agent.settings().socket_readers),
        )
        .add_routes(routes.clone())
        .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stopped(stop_rx.clone()));
    servers.spawn(async move { socket_server.await.map_err(|err| err.to_string()) });
    info!(socket = %agent.settings().socket.display(), "serving the API on the Unix socket");
    let mut reloadable = None;
    if let Some((tcp, tls, listener)) = tcp {
        let address = bound_address(&listener, tcp.listen);
        let tcp_server = limited(&limits)
            .layer(access::AccessLayer::new(tcp.clients.clone(), gate))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                Arc::clone(&tls).incoming(listener, limits.tls_handshake),
                stopped(stop_rx.clone()),
            );
        servers.spawn(async move { tcp_server.await.map_err(|err| err.to_string()) });
        info!(address = %address, "serving the API over TCP with mutual TLS");
        reloadable = Some(tls);
    }
    tls::reload_on_hangup(reloadable)?;
    if let Some((listener, wanted)) = metrics {
        let address = bound_address(&listener, wanted);
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics_page))
            .with_state(agent.clone());
        let stop = stopped(stop_rx.clone());
        servers.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
                .map_err(|err| err.to_string())
        });
        info!(%address, "serving Prometheus metrics at /metrics");
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    for service in [
        "dmclone.v1.Node",
        "dmclone.v1.Volumes",
        "dmclone.v1.Snapshots",
        "dmclone.v1.Transfers",
    ] {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    ready();
    tokio::select! {
        () = shutdown => info!("shutting down"),
        finished = servers.join_next() => warn!(?finished, "a server stopped on its own"),
    }
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(true);
    while let Some(result) = servers.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "server ended with an error"),
            Err(err) => warn!(error = %err, "server task failed"),
        }
    }
    let _ = std::fs::remove_file(&agent.settings().socket);
    Ok(())
}

fn routes(
    agent: &Arc<Agent>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Routes, AgentError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| AgentError::Internal(format!("server reflection: {err}")))?;
    Ok(Routes::new(health)
        .add_service(reflection)
        .add_service(NodeServer::new(node::NodeApi::new(agent.clone())))
        .add_service(VolumesServer::new(volume::VolumesApi::new(agent.clone())))
        .add_service(SnapshotsServer::new(snapshot::SnapshotsApi::new(
            agent.clone(),
        )))
        .add_service(TransfersServer::new(transfer::TransfersApi::new(
            agent.clone(),
        ))))
}

/// A server that holds callers to `limits`: streams per connection, and a
/// deadline on every call (its work goes on in its own task).
fn limited(limits: &crate::config::Limits) -> Server {
    Server::builder()
        .max_concurrent_streams(limits.max_calls_per_connection)
        .timeout(limits.call_timeout)
}

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Binds the socket with mode 0600, or 0660 with the readers' group. A
/// stale socket file from a crashed agent is replaced; a live one (another
/// agent answers) is an error.
fn bind_unix(path: &Path, readers: Option<u32>) -> Result<UnixListener, AgentError> {
    let io = |context: &str, source| AgentError::Io {
        context: format!("{context} {}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(AgentError::Config {
                option: "socket".into(),
                reason: format!("{} exists and is not a socket", path.display()),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AgentError::Unavailable {
                reason: format!("another agent is serving on {}", path.display()),
            });
        }
        std::fs::remove_file(path).map_err(|e| io("cannot remove the stale socket", e))?;
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let made_parent = !parent.exists();
    std::fs::create_dir_all(parent).map_err(|e| io("cannot create the directory of", e))?;
    // Nobody else may connect in the moment between bind and chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| io("cannot listen on", e))?;
    let Some(gid) = readers else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("cannot restrict", e))?;
        return Ok(listener);
    };
    std::os::unix::fs::chown(path, None, Some(gid))
        .map_err(|e| io(&format!("cannot give group {gid}"), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| io("cannot open to its group", e))?;
    reachable_by_group(parent, gid, made_parent)?;
    Ok(listener)
}

/// The readers' group can reach a socket in `dir`: the directory lets its
/// group, or everyone, through. One the agent just `made` is opened to the
/// group (0750); an operator's own directory is only checked.
fn reachable_by_group(dir: &Path, gid: u32, made: bool) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|source| AgentError::Io {
        context: format!("cannot look at {}", dir.display()),
        source,
    })?;
    let traversable = meta.mode() & 0o001 != 0 || (meta.gid() == gid && meta.mode() & 0o010 != 0);
    if traversable {
        return Ok(());
    }
    if made {
        std::os::unix::fs::chown(dir, None, Some(gid)).map_err(|source| AgentError::Io {
            context: format!("cannot give {} to group {gid}", dir.display()),
            source,
        })?;
        return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(
            |source| AgentError::Io {
                context: format!("cannot open {} to group {gid}", dir.display()),
                source,
            },
        );
    }
    Err(AgentError::Config {
        option: "socket_readers".into(),
        reason: format!(
            "group {gid} cannot reach the socket: {} lets neither that group nor everyone \
             through (mode {:o}); give it to the group with mode 0750",
            dir.display(),
            meta.mode() & 0o7777
        ),
    })
}

async fn bind_tcp(tcp: &TcpSettings) -> Result<TcpListener, AgentError> {
    TcpListener::bind(tcp.listen)
        .await
        .map_err(|source| AgentError::Io {
            context: format!("cannot listen on {} (tcp.listen)", tcp.listen),
            source,
        })
}

/// Where `listener` really listens (port 0 asks for any), for the log.
fn bound_address(listener: &TcpListener, wanted: std::net::SocketAddr) -> std::net::SocketAddr {
    listener.local_addr().unwrap_or(wanted)
}

async fn bind_metrics(address: std::net::SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AgentError::Io {
            context: format!("cannot listen on {address} (metrics.listen)"),
            source,
        })
}

/// Runs one RPC in a span with its method, object id and request id, logs
/// its outcome and maps errors to statuses.
///
/// The call runs in a task of its own: tonic drops a handler when its
/// client gives up (a deadline, a closed connection), and a call dropped
/// between two kernel steps would leave them half done (a device left
/// suspended, a transfer without its monitor). The task finishes what it
/// began, logs how it ended, and a retry finds the result.
pub(crate) async fn handle<T, C, F>(
    agent: &Arc<Agent>,
    method: &'static str,
    metadata: &MetadataMap,
    object_id: impl AsRef<str>,
    call: C,
) -> Result<Response<T>, Status>
where
    T: Send + 'static,
    C: FnOnce(Arc<Agent>) -> F,
    F: Future<Output = Result<T, AgentError>> + Send + 'static,
{
    let request_id = metadata
        .get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let caller = access::caller_of(metadata);
    let span = info_span!("rpc", method, id = object_id.as_ref(), request_id, caller);
    let audited = !access::is_read(method);
    let call = call(Arc::clone(agent));
    let agent = Arc::clone(agent);
    let work = async move {
        let started = Instant::now();
        let result = call.await;
        let millis = started.elapsed().as_millis() as u64;
        let seconds = started.elapsed().as_secs_f64();
        if audited {
            let outcome = match &result {
                Ok(_) => "ok".to_owned(),
                Err(err) => format!(
                    "{}: {err}",
                    status::code_label(status::status_of(err).code())
                ),
            };
            info!(target: "dmclone::audit", %caller, method, %outcome, "mutating call");
        }
        match result {
            Ok(reply) => {
                info!(millis, "ok");
                agent
                    .metrics()
                    .rpc(method, status::code_label(tonic::Code::Ok), seconds);
                Ok(Response::new(reply))
            }
            Err(err) => {
                let status = status::status_of(&err);
                warn!(millis, code = ?status.code(), error = %err, "failed");
                agent
                    .metrics()
                    .rpc(method, status::code_label(status.code()), seconds);
                Err(status)
            }
        }
    }
    .instrument(span);
    tokio::spawn(work).await.unwrap_or_else(|err| {
        Err(Status::internal(format!(
            "the agent's task for {method} ended abnormally: {err}"
        )))
    })
}

/// The object id a request names, for the span, cut short if a caller sent
/// something huge.
pub(crate) fn span_id(raw: &str) -> String {
    match raw.char_indices().nth(64) {
        Some((end, _)) => raw[..end].to_owned(),
        None => raw.to_owned(),
    }
}

/// Splits a request into metadata and message.
pub(crate) fn parts<T>(request: Request<T>) -> (MetadataMap, T) {
    let (metadata, _, message) = request.into_parts();
    (metadata, message)
}

async fn metrics_page(
    axum::extract::State(agent): axum::extract::State<Arc<Agent>>,
) -> (
    axum::http::StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
) {
    let content_type = axum::http::header::CONTENT_TYPE;
    match agent.render_metrics().await {
        Ok(text) => (
            axum::http::StatusCode::OK,
            [(
                content_type,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(err) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(content_type, "text/plain; charset=utf-8")],
            format!("cannot read the agent's state: {err}\n"),
        ),
    }
}
