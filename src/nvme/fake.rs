//! An in-memory NVMe/TCP target and host for host tests: exports as
//! requested, remote subsystems a test offers, and connections whose
//! namespaces are block devices of a [`FakeKernel`] (so dm-clone tables over
//! them load). It checks what the kernel would: an export's device exists,
//! a connect reaches an offered subsystem. No bytes move.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use async_trait::async_trait;

use super::{
    ConnectRequest, Connection, Controller, EXPORT_NSID, ExportRequest, Fabric, Link,
    NamespaceDevice, Nqn,
};
use crate::{dm::fake::FakeKernel, error::AgentError};

#[derive(Debug)]
pub struct FakeFabric {
    kernel: Arc<FakeKernel>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Whether nvmet is loaded.
    target_missing: bool,
    exports: BTreeMap<String, ExportRequest>,
    /// Subsystems of other hosts a connect reaches, with their size.
    offered: BTreeMap<String, u64>,
    /// Connected subsystems and their namespaces.
    connections: BTreeMap<String, NamespaceDevice>,
    /// Connected subsystems whose connection is broken (reconnecting).
    interrupted: std::collections::BTreeSet<String>,
    next_controller: u32,
    /// The target cannot authenticate hosts.
    without_auth: bool,
    /// The secrets each subsystem's last connect presented.
    presented: BTreeMap<String, Option<super::auth::DhchapKeys>>,
}

impl FakeFabric {
    pub fn new(kernel: Arc<FakeKernel>) -> Self {
        Self {
            kernel,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// This kernel's target cannot authenticate hosts (Debian 12's 6.1).
    pub fn remove_auth(&self) {
        self.state().without_auth = true;
    }

    /// The DH-HMAC-CHAP secrets an export's host entry holds.
    pub fn secrets_of(&self, subsystem: &str) -> Option<super::auth::DhchapKeys> {
        self.state()
            .exports
            .get(subsystem)
            .and_then(|request| request.auth.clone())
    }

    /// The secrets the last connect to `subsystem` presented.
    pub fn presented(&self, subsystem: &str) -> Option<super::auth::DhchapKeys> {
        self.state().presented.get(subsystem).cloned().flatten()
    }

    /// This kernel has no nvmet (exports are unavailable).
    pub fn remove_target(&self) {
        self.state().target_missing = true;
    }

    /// Another host exports `subsystem` with `size_bytes`.
    pub fn offer(&self, subsystem: &str, size_bytes: u64) {
        self.state()
            .offered
            .insert(subsystem.to_owned(), size_bytes);
    }

    /// Another host stops exporting `subsystem` (or cannot be reached).
    pub fn withdraw(&self, subsystem: &str) {
        self.state().offered.remove(subsystem);
    }

    /// The network to `subsystem` breaks: its connection stays, reconnecting,
    /// until [`Self::reconnect`] or [`Self::give_up`].
    pub fn interrupt(&self, subsystem: &str) {
        self.state().interrupted.insert(subsystem.to_owned());
    }

    /// The connection to `subsystem` works again.
    pub fn reconnect(&self, subsystem: &str) {
        self.state().interrupted.remove(subsystem);
    }

    /// The kernel gave up on `subsystem` (ctrl_loss_tmo): the connection is
    /// gone, its namespace device stays behind, dead, while it is held.
    pub fn give_up(&self, subsystem: &str) {
        let mut state = self.state();
        state.interrupted.remove(subsystem);
        state.connections.remove(subsystem);
    }

    /// The host rebooted: no export and no connection survives.
    pub fn reboot(&self) {
        let mut state = self.state();
        state.exports.clear();
        state.connections.clear();
    }

    /// Exports by subsystem NQN: (allowed host, exported device path).
    pub fn exports(&self) -> BTreeMap<String, (String, String)> {
        self.state()
            .exports
            .iter()
            .map(|(nqn, request)| {
                let device = request.device_path.display().to_string();
                (nqn.clone(), (request.host_nqn.to_string(), device))
            })
            .collect()
    }

    /// Subsystems this host is connected to.
    pub fn connections(&self) -> Vec<String> {
        self.state().connections.keys().cloned().collect()
    }

    fn target_loaded(&self) -> Result<(), AgentError> {
        if self.state().target_missing {
            return Err(AgentError::Unavailable {
                reason: "the fake NVMe target is not loaded".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Fabric for FakeFabric {
    async fn export(&self, request: &ExportRequest) -> Result<(), AgentError> {
        self.target_loaded()?;
        let device = request
            .device_path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !self.kernel.device_names().contains(&device) {
            return Err(AgentError::NotFound {
                what: "block device",
                id: request.device_path.display().to_string(),
            });
        }
        let mut state = self.state();
        if request.auth.is_some() && state.without_auth {
            return Err(super::auth::unsupported());
        }
        let nqn = request.subsystem_nqn.to_string();
        if let Some(existing) = state.exports.get(&nqn)
            && existing != request
        {
            return Err(AgentError::AlreadyExists {
                what: "NVMe subsystem",
                id: nqn,
                detail: format!("allowing {}", existing.host_nqn),
            });
        }
        state.exports.insert(nqn, request.clone());
        Ok(())
    }

    async fn unexport(&self, subsystem: &Nqn) -> Result<(), AgentError> {
        let mut state = self.state();
        if !state.target_missing {
            state.exports.remove(subsystem.as_str());
        }
        Ok(())
    }

    async fn authenticates_hosts(&self) -> Result<bool, AgentError> {
        self.target_loaded()?;
        Ok(!self.state().without_auth)
    }

    async fn exported_subsystems(&self) -> Result<Vec<String>, AgentError> {
        self.target_loaded()?;
        Ok(self.state().exports.keys().cloned().collect())
    }

    async fn connect(&self, request: &ConnectRequest) -> Result<Connection, AgentError> {
        let nqn = request.options.subsystem_nqn.to_string();
        let (size, adopted) = {
            let state = self.state();
            let Some(&size) = state.offered.get(&nqn) else {
                return Err(AgentError::Unavailable {
                    reason: format!("nothing exports {nqn} (fake fabric)"),
                });
            };
            (size, state.connections.get(&nqn).cloned())
        };
        let mut state = self.state();
        state
            .presented
            .insert(nqn.clone(), request.options.auth.clone());
        state.next_controller += 1;
        let instance = state.next_controller;
        let namespace = match adopted.clone() {
            Some(namespace) => namespace,
            None => {
                let device = self.kernel.add_block_device(size / 512);
                NamespaceDevice {
                    name: format!("nvme{instance}n1"),
                    path: format!("/dev/nvme{instance}n1").into(),
                    device,
                    nsid: EXPORT_NSID,
                    uuid: request
                        .expected_namespace
                        .first()
                        .map(|ids| ids.uuid.clone()),
                    size_bytes: size,
                }
            }
        };
        state.connections.insert(nqn.clone(), namespace.clone());
        Ok(Connection {
            controller: Controller {
                name: format!("nvme{instance}"),
                instance,
                cntlid: 1,
                subsystem_nqn: nqn,
                host_nqn: request.options.host_nqn.to_string(),
                address: Some(request.options.address),
                transport: "tcp".into(),
                state: "live".into(),
            },
            namespace,
            adopted: adopted.is_some(),
        })
    }

    async fn disconnect(&self, subsystem: &Nqn) -> Result<Option<String>, AgentError> {
        let removed = self.state().connections.remove(subsystem.as_str());
        Ok(removed.map(|namespace| namespace.name))
    }

    async fn link(&self, subsystem: &Nqn) -> Result<Link, AgentError> {
        let state = self.state();
        Ok(if !state.connections.contains_key(subsystem.as_str()) {
            Link::Lost
        } else if state.interrupted.contains(subsystem.as_str()) {
            Link::Interrupted {
                state: "connecting".into(),
            }
        } else {
            Link::Live
        })
    }
}
