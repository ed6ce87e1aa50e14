//! The TCP listener's mutual TLS, reloadable: the server certificate, its
//! key and the client CA are read at start and again on SIGHUP. A reload
//! changes what new handshakes use; established connections keep the
//! session they have. A file that does not load leaves the previous
//! settings in place.
//!
//! The handshakes run here rather than in the server so that the settings
//! can change under a running listener: each accepted connection gets its
//! own task and a deadline, and only finished handshakes reach the server.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use crate::{config::TcpSettings, error::AgentError};

/// Finished handshakes waiting for the server to take them.
const HANDED_OVER: usize = 64;

/// The TLS settings new handshakes use, and where they come from.
#[derive(Debug)]
pub struct ReloadableTls {
    tcp: TcpSettings,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableTls {
    /// Reads the certificate, key and client CA `tcp` names.
    pub fn load(tcp: &TcpSettings) -> Result<Self, AgentError> {
        Ok(Self {
            tcp: tcp.clone(),
            current: RwLock::new(Arc::new(server_config(tcp)?)),
        })
    }

    /// Reads the files again. On error the settings in use stay, and the
    /// error says which file is wrong.
    pub fn reload(&self) -> Result<(), AgentError> {
        let fresh = Arc::new(server_config(&self.tcp)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = self.current.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// The connections `listener` accepts, once their handshake under the
    /// settings of that moment has finished within `deadline`. A client
    /// that stalls or fails its handshake holds up nobody else.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        deadline: Duration,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (ready, incoming) = tokio::sync::mpsc::channel(HANDED_OVER);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = ready.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors and the like: the next accept
                        // may work, and a tight loop would not help.
                        debug!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (self.acceptor(), ready.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send(Ok(tls)).await;
                        }
                        Ok(Err(err)) => debug!(%peer, error = %err, "TLS handshake failed"),
                        Err(_) => debug!(%peer, ?deadline, "TLS handshake not finished in time"),
                    }
                });
            }
        });
        ReceiverStream::new(incoming)
    }
}

/// Mutual TLS from the files `tcp` names: the server's certificate chain
/// and key, and the CA a client's certificate must chain to. HTTP/2 only.
fn server_config(tcp: &TcpSettings) -> Result<ServerConfig, AgentError> {
    let chain = certificates("tcp.tls_cert", &tcp.tls_cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("tcp.tls_key", &tcp.tls_key)?)
        .map_err(|err| invalid("tcp.tls_key", &tcp.tls_key, err))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates("tcp.client_ca", &tcp.client_ca)? {
        roots
            .add(ca)
            .map_err(|err| invalid("tcp.client_ca", &tcp.client_ca, err))?;
    }
    let verifier = WebPkiClientVerifier::builder(roots.into())
        .build()
        .map_err(|err| invalid("tcp.client_ca", &tcp.client_ca, err))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|err| invalid("tcp.tls_cert", &tcp.tls_cert, err))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read(option: &str, path: &Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|err| AgentError::Config {
        option: option.to_owned(),
        reason: format!("cannot read {}: {err}", path.display()),
    })
}

/// Every certificate in the PEM file; none at all is an error.
fn certificates(option: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let pem = read(option, path)?;
    let found = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(option, path, err))?;
    if found.is_empty() {
        return Err(invalid(option, path, "no PEM certificate in it"));
    }
    Ok(found)
}

fn invalid(option: &str, path: &Path, err: impl std::fmt::Display) -> AgentError {
    AgentError::Config {
        option: option.to_owned(),
        reason: format!("{} is not usable: {err}", path.display()),
    }
}

/// Reloads `tls` whenever the process gets SIGHUP (systemd's
/// `ExecReload`), for as long as the agent runs. Without TCP there is
/// nothing to reload, and SIGHUP is only logged (never the default: exit).
pub fn reload_on_hangup(tls: Option<Arc<ReloadableTls>>) -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).map_err(|source| AgentError::Io {
        context: "cannot listen for SIGHUP".into(),
        source,
    })?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(tls) = &tls else {
                info!("SIGHUP: no TCP listener, nothing to reload");
                continue;
            };
            match tls.reload() {
                Ok(()) => info!(
                    cert = %tls.tcp.tls_cert.display(),
                    client_ca = %tls.tcp.client_ca.display(),
                    "SIGHUP: reloaded the TLS certificate, key and client CA; new connections use them"
                ),
                Err(err) => tracing::error!(error = %err, "SIGHUP: kept the TLS settings in use"),
            }
        }
    });
    Ok(())
}
