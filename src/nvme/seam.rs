//! The seam between the agent's logic and the kernel's NVMe/TCP target and
//! host: what the export and transfer services need, as one narrow trait.
//! [`LiveFabric`] works on configfs, sysfs and `/dev/nvme-fabrics` through
//! [`Target`] and [`Host`]; the in-memory fake in [`super::fake`] lets host
//! tests drive exports, releases and moves. The real-kernel tests stay the
//! proof.

use std::fmt;

use async_trait::async_trait;

use super::{ConnectRequest, Connection, ExportRequest, Host, Nqn, Target};
use crate::error::AgentError;

/// Everything the agent asks of the kernel's NVMe/TCP target and host.
#[async_trait]
pub trait Fabric: Send + Sync + fmt::Debug {
    /// Exports as [`Target::export`] does; `Unavailable` without nvmet.
    async fn export(&self, request: &ExportRequest) -> Result<(), AgentError>;
    /// Removes an export; an absent one is fine, and so is a kernel without
    /// nvmet (nothing can be exported there).
    async fn unexport(&self, subsystem: &Nqn) -> Result<(), AgentError>;
    /// The subsystem NQN of every export, ours or not; `Unavailable`
    /// without nvmet.
    async fn exported_subsystems(&self) -> Result<Vec<String>, AgentError>;
    /// Connects to a subsystem, or adopts the connection already there.
    async fn connect(&self, request: &ConnectRequest) -> Result<Connection, AgentError>;
    /// Disconnects from a subsystem; returns the controller it deleted.
    async fn disconnect(&self, subsystem: &Nqn) -> Result<Option<String>, AgentError>;
}

/// The host's NVMe/TCP target and host, found at their usual places on
/// every call (the modules may be loaded after the agent started).
#[derive(Debug, Default)]
pub struct LiveFabric;

#[async_trait]
impl Fabric for LiveFabric {
    async fn export(&self, request: &ExportRequest) -> Result<(), AgentError> {
        Target::open()?.export(request).await.map(drop)
    }

    async fn unexport(&self, subsystem: &Nqn) -> Result<(), AgentError> {
        match Target::open() {
            Ok(target) => target.unexport(subsystem).await,
            Err(AgentError::Unavailable { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn exported_subsystems(&self) -> Result<Vec<String>, AgentError> {
        let exports = Target::open()?.list_exports().await?;
        Ok(exports.into_iter().map(|e| e.subsystem_nqn).collect())
    }

    async fn connect(&self, request: &ConnectRequest) -> Result<Connection, AgentError> {
        Host::open()?.connect(request).await
    }

    async fn disconnect(&self, subsystem: &Nqn) -> Result<Option<String>, AgentError> {
        let host = Host::open()?;
        let Some(controller) = host.find_connection(subsystem).await? else {
            return Ok(None);
        };
        host.disconnect(&controller).await?;
        Ok(Some(controller.name))
    }
}
