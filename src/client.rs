//! Connecting to an agent: over its Unix socket (operators, local tools) or
//! over TCP with mutual TLS (the Cinder driver, other agents).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::error::AgentError;

/// How long reaching an agent may take (TCP, TLS): an address that drops
/// packets fails in seconds instead of hanging the caller.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long any one call may take to be answered, unless the call sets a
/// shorter deadline. Streams count only until their first answer.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A channel to the agent listening on `socket`.
pub async fn connect_unix(socket: &Path) -> Result<Channel, AgentError> {
    let socket: PathBuf = socket.to_owned();
    let shown = socket.display().to_string();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://agent.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|err| AgentError::Unavailable {
            reason: format!("cannot reach the agent at {shown}: {}", with_causes(&err)),
        })
}

/// An error and what caused it, outermost first: a transport error alone
/// ("transport error") does not say that the socket refused permission.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        // Some errors repeat their source in their own message.
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        cause = inner.source();
    }
    text
}

/// Client side of mutual TLS: the CA that signed the agent's certificate, and
/// this client's own certificate and key.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
    /// The name the agent's certificate is checked against.
    pub server_name: String,
}

/// A channel to the agent at `address` (host:port) over TLS.
pub async fn connect_tls(address: &str, tls: &ClientTls) -> Result<Channel, AgentError> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .domain_name(tls.server_name.clone());
    if let (Some(cert), Some(key)) = (&tls.cert_pem, &tls.key_pem) {
        config = config.identity(Identity::from_pem(cert, key));
    }
    let unreachable = |err: tonic::transport::Error| AgentError::Unavailable {
        reason: format!(
            "cannot reach the agent at {address} over TLS: {}",
            with_causes(&err)
        ),
    };
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|err| AgentError::InvalidArgument {
            field: "address",
            reason: format!("{address:?}: {err}"),
        })?
        .tls_config(config)
        .map_err(unreachable)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    // The endpoint's own connect timeout covers TCP only, not the handshake.
    tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| AgentError::Unavailable {
            reason: format!(
                "the agent at {address} did not complete a TLS handshake within {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
        })?
        .map_err(unreachable)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A peer that accepts the connection and never answers the TLS
    /// handshake (a hung or hostile agent) costs the caller the connect
    /// timeout, not forever.
    #[tokio::test]
    async fn an_agent_that_never_answers_is_given_up_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let tls = ClientTls {
            ca_pem: Vec::new(),
            cert_pem: None,
            key_pem: None,
            server_name: "localhost".into(),
        };
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(CONNECT_TIMEOUT * 3, connect_tls(&address, &tls))
            .await
            .expect("the connect gives up by itself");
        let err = outcome.expect_err("nothing answered");
        assert!(matches!(err, AgentError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains(&address), "{err}");
        assert!(
            started.elapsed() < CONNECT_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }

    /// The reason a socket cannot be reached is in the message, not only
    /// "transport error".
    #[tokio::test]
    async fn an_unreachable_socket_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_unix(&dir.path().join("absent.sock"))
            .await
            .expect_err("nothing listens");
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
    }
}
