//! Connecting to an agent: over its Unix socket (operators, local tools) or
//! over TCP with mutual TLS (the Cinder driver, other agents).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::error::AgentError;

/// A channel to the agent listening on `socket`.
pub async fn connect_unix(socket: &Path) -> Result<Channel, AgentError> {
    let socket: PathBuf = socket.to_owned();
    let shown = socket.display().to_string();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|err| AgentError::Unavailable {
            reason: format!("cannot reach the agent at {shown}: {err}"),
        })
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
        reason: format!("cannot reach the agent at {address} over TLS: {err}"),
    };
    Endpoint::from_shared(format!("https://{address}"))
        .map_err(|err| AgentError::InvalidArgument {
            field: "address",
            reason: format!("{address:?}: {err}"),
        })?
        .tls_config(config)
        .map_err(unreachable)?
        .connect()
        .await
        .map_err(unreachable)
}
