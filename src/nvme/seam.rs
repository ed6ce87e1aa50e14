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
    /// How this host's connection to a subsystem stands.
    async fn link(&self, subsystem: &Nqn) -> Result<Link, AgentError>;
    /// Whether the target can authenticate hosts (DH-HMAC-CHAP);
    /// `Unavailable` without nvmet.
    async fn authenticates_hosts(&self) -> Result<bool, AgentError>;
}

/// This host's connection to a subsystem, as the kernel's NVMe host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Connected: I/O flows.
    Live,
    /// The connection broke and the kernel is reconnecting; `state` is the
    /// controller's (`connecting`, `resetting`).
    Interrupted { state: String },
    /// No controller: the kernel gave up after `ctrl_loss_tmo`, or there
    /// never was one. Nothing reconnects unless the agent connects again.
    Lost,
}

impl Link {
    fn of(controller: Option<&super::Controller>) -> Self {
        match controller {
            None => Self::Lost,
            Some(c) if c.state == "live" => Self::Live,
            Some(c) => Self::Interrupted {
                state: c.state.clone(),
            },
        }
    }
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

    async fn link(&self, subsystem: &Nqn) -> Result<Link, AgentError> {
        let controller = Host::open()?.find_connection(subsystem).await?;
        Ok(Link::of(controller.as_ref()))
    }

    async fn authenticates_hosts(&self) -> Result<bool, AgentError> {
        Target::open()?.authenticates_hosts().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn controller(state: &str) -> super::super::Controller {
        super::super::Controller {
            name: "nvme3".into(),
            instance: 3,
            cntlid: 1,
            subsystem_nqn: "nqn.2014-08.io.dmclone:a:v".into(),
            host_nqn: "nqn.2014-08.io.dmclone:b".into(),
            address: None,
            transport: "tcp".into(),
            state: state.into(),
        }
    }

    #[test]
    fn a_link_is_live_only_while_its_controller_is() {
        assert_eq!(Link::of(Some(&controller("live"))), Link::Live);
        assert_eq!(
            Link::of(Some(&controller("connecting"))),
            Link::Interrupted {
                state: "connecting".into()
            }
        );
        assert_eq!(Link::of(None), Link::Lost);
    }
}
