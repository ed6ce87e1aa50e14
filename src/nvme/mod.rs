//! Moving a volume's bytes between hosts with the kernel's NVMe/TCP target and
//! host.
//!
//! The source exports the volume's block device through nvmet's configfs tree
//! ([`target`]); the destination connects with the kernel host and gets a
//! block device to put under dm-clone ([`host`]). Both sides use plain file
//! operations on configfs, sysfs and `/dev/nvme-fabrics`, each on tokio's
//! blocking pool. The text they exchange with the kernel is built and parsed
//! by pure, unit-tested code ([`nqn`], [`fabrics`]).

pub mod auth;
pub mod fabrics;
#[cfg(any(test, feature = "kernel-fake"))]
pub mod fake;
pub mod host;
mod kfs;
pub mod nqn;
pub mod seam;
pub mod target;

pub use fabrics::{
    ConnectOptions, ConnectReply, ConnectTimeouts, DEFAULT_TRSVCID, NamespaceIds, TcpAddress,
    namespace_ids, onward_namespace_ids,
};
pub use host::{ConnectRequest, Connection, Controller, Host, NamespaceDevice};
pub use nqn::{HostId, Nqn, subsystem_nqn, volume_of_subsystem};
pub use seam::{Fabric, Link, LiveFabric};
pub use target::{EXPORT_NSID, Export, ExportRequest, PortSpec, Target};
