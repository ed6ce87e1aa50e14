//! Source side: exporting a block device over NVMe/TCP through the kernel
//! target's configfs tree (`/sys/kernel/config/nvmet`), with plain file-system
//! calls. No nvmetcli process.
//!
//! One export is one subsystem named by the volume's NQN, with namespace 1 on
//! the device, exactly one allowed host (never `attr_allow_any_host`), linked
//! to one TCP port. Export converges: each step checks what is there first,
//! so a repeated export is a no-op and an interrupted one is completed by the
//! next call. Unexport removes the same objects in the reverse order and
//! leaves a host entry or a port in place while anything else uses it.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt, symlink},
    path::{Path, PathBuf},
};

use nix::errno::Errno;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{
    error::AgentError,
    nvme::{
        auth::{DH_GROUP, DhchapKeys, HASH},
        fabrics::{NamespaceIds, TcpAddress},
        kfs::{
            blocking, entry_names, errno_of, exists, fs_error, join, read_attr,
            read_attr_if_present, write_attr,
        },
        nqn::Nqn,
    },
};

/// Where nvmet's configfs tree lives.
pub const NVMET_CONFIGFS: &str = "/sys/kernel/config/nvmet";

/// The namespace id every export uses.
pub const EXPORT_NSID: u32 = 1;

/// What to look at when configfs refuses a change without a specific cause.
const KERNEL_LOG: &str = "nvmet logs the reason in the kernel log (dmesg)";

/// nvmet state is global to the host. Operations of this process run one at a
/// time so that "is this port or host entry still used?" cannot interleave
/// with another export creating a user of it.
static CONFIGFS_LOCK: Mutex<()> = Mutex::const_new(());

/// A configfs port: its id and the TCP address it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The directory name under `ports/` (`addr_portid`) used when no port
    /// with this address exists yet.
    pub id: u16,
    pub address: TcpAddress,
}

/// What to export, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub subsystem_nqn: Nqn,
    /// A block device (e.g. `/dev/mapper/dmclone-<volume>`).
    pub device_path: PathBuf,
    pub namespace: NamespaceIds,
    /// The only host allowed to connect.
    pub host_nqn: Nqn,
    pub port: PortSpec,
    /// DH-HMAC-CHAP secrets for the host entry; `None`: no authentication.
    pub auth: Option<DhchapKeys>,
}

/// An export as configfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub subsystem_nqn: String,
    pub allow_any_host: bool,
    /// Sorted host NQNs.
    pub allowed_hosts: Vec<String>,
    /// Sorted by nsid.
    pub namespaces: Vec<ExportedNamespace>,
    /// The ports the subsystem is linked to, sorted by id.
    pub ports: Vec<Port>,
}

impl Export {
    /// The device behind namespace [`EXPORT_NSID`].
    pub fn device_path(&self) -> Option<&Path> {
        self.namespaces
            .iter()
            .find(|ns| ns.nsid == EXPORT_NSID)
            .and_then(|ns| ns.device_path.as_deref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedNamespace {
    pub nsid: u32,
    /// `None` while configfs holds no path (a namespace being set up).
    pub device_path: Option<PathBuf>,
    pub uuid: String,
    pub nguid: String,
    pub enabled: bool,
}

/// A configfs port's address attributes, verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub id: u16,
    pub trtype: String,
    pub adrfam: String,
    pub traddr: String,
    pub trsvcid: String,
}

impl Port {
    /// The address, if this is a TCP port with a parseable one.
    pub fn tcp_address(&self) -> Option<TcpAddress> {
        let address = TcpAddress::from_parts(&self.traddr, &self.trsvcid)?;
        (self.trtype == "tcp" && self.adrfam == address.adrfam()).then_some(address)
    }

    /// A port directory whose address was never written, as an interrupted
    /// export leaves it.
    fn is_unconfigured(&self) -> bool {
        self.trtype.is_empty() && self.traddr.is_empty()
    }
}

/// Handle on nvmet's configfs tree. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Target {
    root: PathBuf,
}

impl Target {
    /// Checks that nvmet's configfs tree is there.
    pub fn open() -> Result<Self, AgentError> {
        Self::at(NVMET_CONFIGFS)
    }

    /// A tree mounted somewhere else than [`NVMET_CONFIGFS`].
    pub fn at(root: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let root = root.into();
        if !root.join("subsystems").is_dir() {
            return Err(AgentError::Unavailable {
                reason: format!(
                    "the NVMe target's configfs tree {} is missing; load the nvmet and \
                     nvmet-tcp modules (modprobe nvmet-tcp) and mount configfs \
                     (mount -t configfs none /sys/kernel/config)",
                    root.display()
                ),
            });
        }
        Ok(Self { root })
    }

    /// Exports `request.device_path` as described, or completes an earlier
    /// export of the same request. Returns the export as configfs reads back.
    ///
    /// An existing subsystem that allows another host, serves another device
    /// or namespace identity, or listens elsewhere is an `AlreadyExists` error
    /// naming what is there; it is left untouched.
    pub async fn export(&self, request: &ExportRequest) -> Result<Export, AgentError> {
        let _serial = CONFIGFS_LOCK.lock().await;
        let tree = self.clone();
        let request = request.clone();
        blocking("nvmet export", move || tree.export_blocking(&request)).await
    }

    /// Removes the export of `subsystem_nqn`; an absent export is fine.
    pub async fn unexport(&self, subsystem_nqn: &Nqn) -> Result<(), AgentError> {
        let _serial = CONFIGFS_LOCK.lock().await;
        let tree = self.clone();
        let nqn = subsystem_nqn.clone();
        blocking("nvmet unexport", move || tree.unexport_blocking(&nqn)).await
    }

    /// Whether this kernel's target can authenticate hosts: a host entry
    /// has DH-HMAC-CHAP attributes only with CONFIG_NVME_TARGET_AUTH. A
    /// probe entry is made and removed to look.
    pub async fn authenticates_hosts(&self) -> Result<bool, AgentError> {
        let _serial = CONFIGFS_LOCK.lock().await;
        let probe = join(
            &self.root,
            &[
                "hosts",
                &format!("nqn.2014-08.io.dmclone:auth-probe-{}", std::process::id()),
            ],
        );
        blocking("nvmet auth probe", move || {
            make_dir(&probe, KERNEL_LOG)?;
            let found = exists(&probe.join("dhchap_key"));
            remove_dir(&probe, KERNEL_LOG)?;
            Ok(found)
        })
        .await
    }

    /// Every subsystem in configfs, ours or not, for reconciliation.
    pub async fn list_exports(&self) -> Result<Vec<Export>, AgentError> {
        let _serial = CONFIGFS_LOCK.lock().await;
        let tree = self.clone();
        blocking("nvmet listing", move || {
            let ports = tree.read_ports()?;
            let mut exports = Vec::new();
            for nqn in entry_names(&tree.root.join("subsystems"))? {
                if let Some(export) = tree.read_export(&nqn, &ports)? {
                    exports.push(export);
                }
            }
            Ok(exports)
        })
        .await
    }

    /// The export of one subsystem, if configfs has it.
    pub async fn find_export(&self, subsystem_nqn: &Nqn) -> Result<Option<Export>, AgentError> {
        let _serial = CONFIGFS_LOCK.lock().await;
        let tree = self.clone();
        let nqn = subsystem_nqn.clone();
        blocking("nvmet lookup", move || {
            let ports = tree.read_ports()?;
            tree.read_export(nqn.as_str(), &ports)
        })
        .await
    }

    fn export_blocking(&self, request: &ExportRequest) -> Result<Export, AgentError> {
        let nqn = request.subsystem_nqn.as_str();
        check_block_device(&request.device_path)?;
        let ports = self.read_ports()?;
        if let Some(existing) = self.read_export(nqn, &ports)? {
            check_compatible(&existing, request)?;
        }
        let port_plan = plan_port(&ports, &request.port)?;
        self.ensure_subsystem(nqn)
            .and_then(|()| self.ensure_namespace(request))
            .and_then(|()| self.ensure_host_entry(request))
            .and_then(|()| self.ensure_allowed_host(nqn, request.host_nqn.as_str()))
            .and_then(|()| self.ensure_port_link(nqn, port_plan, &request.port.address))
            .map_err(|err| {
                with_hint(
                    err,
                    "the export is incomplete: exporting again completes it, unexporting removes it",
                )
            })?;
        let export = self.read_export(nqn, &self.read_ports()?)?.ok_or_else(|| {
            AgentError::Internal(format!("subsystem {nqn} vanished while being exported"))
        })?;
        info!(subsystem = nqn, device = %request.device_path.display(), host = %request.host_nqn,
              address = %request.port.address, "exported over NVMe/TCP");
        Ok(export)
    }

    fn unexport_blocking(&self, nqn: &Nqn) -> Result<(), AgentError> {
        let nqn = nqn.as_str();
        let Some(export) = self.read_export(nqn, &self.read_ports()?)? else {
            return Ok(());
        };
        self.tear_down(&export).map_err(|err| {
            with_hint(
                err,
                "the unexport is incomplete: unexporting again continues it",
            )
        })?;
        info!(subsystem = nqn, "unexported");
        Ok(())
    }

    /// The reverse of an export, in the order configfs demands: a link's
    /// target cannot go before the link (EBUSY).
    fn tear_down(&self, export: &Export) -> Result<(), AgentError> {
        let nqn = export.subsystem_nqn.as_str();
        // Unlinking first deletes the controllers of connected hosts and stops
        // the listener if this was the port's last subsystem.
        for port in &export.ports {
            remove_link(&self.port_dir(port.id).join("subsystems").join(nqn))?;
        }
        for ns in &export.namespaces {
            let dir = self.namespace_dir(nqn, ns.nsid);
            if ns.enabled {
                write_attr(&dir.join("enable"), "0", KERNEL_LOG)?;
            }
            remove_dir(&dir, KERNEL_LOG)?;
        }
        for host in &export.allowed_hosts {
            remove_link(&self.subsystem_dir(nqn).join("allowed_hosts").join(host))?;
        }
        remove_dir(&self.subsystem_dir(nqn), "a port or host still links to it")?;
        for host in &export.allowed_hosts {
            self.remove_host_if_unused(host)?;
        }
        for port in &export.ports {
            self.remove_port_if_unused(port.id)?;
        }
        Ok(())
    }

    fn ensure_subsystem(&self, nqn: &str) -> Result<(), AgentError> {
        let dir = self.subsystem_dir(nqn);
        make_dir(
            &dir,
            "the kernel refused this subsystem NQN; see the kernel log",
        )?;
        // The default is 0, but an export must never be open to any host.
        ensure_attr(&dir.join("attr_allow_any_host"), "0")
    }

    fn ensure_namespace(&self, request: &ExportRequest) -> Result<(), AgentError> {
        let dir = self.namespace_dir(request.subsystem_nqn.as_str(), EXPORT_NSID);
        make_dir(&dir, KERNEL_LOG)?;
        if read_attr(&dir.join("enable"))? == "1" {
            // Already serving; check_compatible made sure it is this device.
            return Ok(());
        }
        // configfs refuses these with EBUSY once the namespace is enabled.
        let path = request.device_path.to_string_lossy();
        ensure_attr(&dir.join("device_path"), &path)?;
        ensure_attr(&dir.join("device_uuid"), &request.namespace.uuid)?;
        ensure_attr(&dir.join("device_nguid"), &request.namespace.nguid)?;
        write_attr(
            &dir.join("enable"),
            "1",
            "the target could not open the device; check that it exists and is not \
             held exclusively (the kernel log has the reason)",
        )
    }

    /// The host's entry, with its DH-HMAC-CHAP secrets when the export has
    /// them. Written before the host is admitted to the subsystem, so no
    /// connect can slip in unauthenticated.
    fn ensure_host_entry(&self, request: &ExportRequest) -> Result<(), AgentError> {
        let host_dir = join(&self.root, &["hosts", request.host_nqn.as_str()]);
        make_dir(&host_dir, KERNEL_LOG)?;
        let Some(keys) = &request.auth else {
            return Ok(());
        };
        if !exists(&host_dir.join("dhchap_key")) {
            // Leave no host entry behind that nothing links.
            self.remove_host_if_unused(request.host_nqn.as_str())?;
            return Err(super::auth::unsupported());
        }
        ensure_attr(&host_dir.join("dhchap_hash"), HASH)?;
        ensure_attr(&host_dir.join("dhchap_dhgroup"), DH_GROUP)?;
        ensure_secret(&host_dir.join("dhchap_key"), keys.host.expose())?;
        ensure_secret(&host_dir.join("dhchap_ctrl_key"), keys.ctrl.expose())
    }

    fn ensure_allowed_host(&self, nqn: &str, host: &str) -> Result<(), AgentError> {
        let host_dir = join(&self.root, &["hosts", host]);
        let link = join(&self.subsystem_dir(nqn), &["allowed_hosts", host]);
        make_link(&host_dir, &link, "")
    }

    fn ensure_port_link(
        &self,
        nqn: &str,
        plan: PortPlan,
        address: &TcpAddress,
    ) -> Result<(), AgentError> {
        let (id, created) = match plan {
            PortPlan::Reuse(id) => (id, false),
            PortPlan::Configure(id) => (id, false),
            PortPlan::Create(id) => {
                make_dir(&self.port_dir(id), KERNEL_LOG)?;
                (id, true)
            }
        };
        if !matches!(plan, PortPlan::Reuse(_)) {
            self.configure_port(id, address)
                .inspect_err(|_| self.discard_new_port(id, created))?;
        }
        let link = join(&self.port_dir(id), &["subsystems", nqn]);
        let hint = format!(
            "the listener on {address} could not start: EADDRINUSE means another program \
             listens there, EADDRNOTAVAIL that the address is not on this host, EINVAL that \
             nvmet-tcp is not loaded"
        );
        make_link(&self.subsystem_dir(nqn), &link, &hint)
            .inspect_err(|_| self.discard_new_port(id, created))
    }

    /// Writes a new port's address; the port is not listening yet, so configfs
    /// accepts the writes (an enabled port refuses them with EACCES).
    fn configure_port(&self, id: u16, address: &TcpAddress) -> Result<(), AgentError> {
        let dir = self.port_dir(id);
        let hint = "EACCES means the port listens already (another program configured it)";
        write_attr(&dir.join("addr_trtype"), "tcp", hint)?;
        write_attr(&dir.join("addr_adrfam"), address.adrfam(), hint)?;
        write_attr(&dir.join("addr_traddr"), &address.traddr(), hint)?;
        write_attr(&dir.join("addr_trsvcid"), &address.trsvcid(), hint)
    }

    /// Undoes the port directory this export made when a later step failed.
    fn discard_new_port(&self, id: u16, created: bool) {
        if created && let Err(err) = self.remove_port_if_unused(id) {
            warn!(port = id, error = %err, "could not remove the port this failed export created");
        }
    }

    fn remove_host_if_unused(&self, host: &str) -> Result<(), AgentError> {
        for nqn in entry_names(&self.root.join("subsystems"))? {
            if exists(&join(&self.subsystem_dir(&nqn), &["allowed_hosts", host])) {
                return Ok(());
            }
        }
        remove_dir(&join(&self.root, &["hosts", host]), KERNEL_LOG)
    }

    fn remove_port_if_unused(&self, id: u16) -> Result<(), AgentError> {
        let dir = self.port_dir(id);
        let in_use = !entry_names(&dir.join("subsystems"))?.is_empty()
            || !entry_names(&dir.join("referrals"))?.is_empty();
        if in_use {
            return Ok(());
        }
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(err) if errno_of(&err) == Some(Errno::ENOENT) => Ok(()),
            // An operator's ANA group keeps the port; it listens on nothing.
            Err(err) if errno_of(&err) == Some(Errno::ENOTEMPTY) => {
                warn!(
                    port = id,
                    "idle nvmet port kept: it has ANA groups of its own"
                );
                Ok(())
            }
            Err(err) => Err(fs_error("removing", &dir, err, KERNEL_LOG)),
        }
    }

    /// Every port with the subsystems linked to it.
    fn read_ports(&self) -> Result<Vec<PortState>, AgentError> {
        let mut ports = Vec::new();
        for name in entry_names(&self.root.join("ports"))? {
            let Ok(id) = name.parse::<u16>() else {
                continue;
            };
            let dir = self.port_dir(id);
            let attr = |name: &str| -> Result<String, AgentError> {
                Ok(read_attr_if_present(&dir.join(name))?.unwrap_or_default())
            };
            ports.push(PortState {
                port: Port {
                    id,
                    trtype: attr("addr_trtype")?,
                    adrfam: attr("addr_adrfam")?,
                    traddr: attr("addr_traddr")?,
                    trsvcid: attr("addr_trsvcid")?,
                },
                subsystems: entry_names(&dir.join("subsystems"))?,
            });
        }
        Ok(ports)
    }

    fn read_export(&self, nqn: &str, ports: &[PortState]) -> Result<Option<Export>, AgentError> {
        let dir = self.subsystem_dir(nqn);
        let Some(allow_any_host) = read_attr_if_present(&dir.join("attr_allow_any_host"))? else {
            return Ok(None);
        };
        let mut namespaces = Vec::new();
        for name in entry_names(&dir.join("namespaces"))? {
            let Ok(nsid) = name.parse::<u32>() else {
                continue;
            };
            namespaces.extend(self.read_namespace(nqn, nsid)?);
        }
        namespaces.sort_by_key(|ns| ns.nsid);
        Ok(Some(Export {
            subsystem_nqn: nqn.to_owned(),
            allow_any_host: allow_any_host == "1",
            allowed_hosts: entry_names(&dir.join("allowed_hosts"))?,
            namespaces,
            ports: ports
                .iter()
                .filter(|state| state.subsystems.iter().any(|s| s == nqn))
                .map(|state| state.port.clone())
                .collect(),
        }))
    }

    /// `None` when the namespace went away after its directory was listed:
    /// whoever else writes configfs (an operator, another agent's teardown)
    /// must not stop this agent from reading the rest.
    fn read_namespace(
        &self,
        nqn: &str,
        nsid: u32,
    ) -> Result<Option<ExportedNamespace>, AgentError> {
        let dir = self.namespace_dir(nqn, nsid);
        let attr = |name: &str| read_attr_if_present(&dir.join(name));
        let (Some(device_path), Some(uuid), Some(nguid), Some(enable)) = (
            attr("device_path")?,
            attr("device_uuid")?,
            attr("device_nguid")?,
            attr("enable")?,
        ) else {
            return Ok(None);
        };
        Ok(Some(ExportedNamespace {
            nsid,
            device_path: (!device_path.is_empty()).then(|| PathBuf::from(device_path)),
            uuid,
            nguid,
            enabled: enable == "1",
        }))
    }

    fn subsystem_dir(&self, nqn: &str) -> PathBuf {
        join(&self.root, &["subsystems", nqn])
    }

    fn namespace_dir(&self, nqn: &str, nsid: u32) -> PathBuf {
        join(&self.subsystem_dir(nqn), &["namespaces", &nsid.to_string()])
    }

    fn port_dir(&self, id: u16) -> PathBuf {
        join(&self.root, &["ports", &id.to_string()])
    }
}

#[derive(Debug, Clone)]
struct PortState {
    port: Port,
    subsystems: Vec<String>,
}

/// Which port an export links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPlan {
    /// A port with this address exists (whatever its id): share it.
    Reuse(u16),
    /// The requested id exists but was never configured: finish it.
    Configure(u16),
    /// Nothing there: make the requested id.
    Create(u16),
}

fn plan_port(ports: &[PortState], spec: &PortSpec) -> Result<PortPlan, AgentError> {
    if let Some(same) = ports
        .iter()
        .find(|state| state.port.tcp_address() == Some(spec.address))
    {
        return Ok(PortPlan::Reuse(same.port.id));
    }
    let Some(taken) = ports.iter().find(|state| state.port.id == spec.id) else {
        return Ok(PortPlan::Create(spec.id));
    };
    if taken.port.is_unconfigured() && taken.subsystems.is_empty() {
        return Ok(PortPlan::Configure(spec.id));
    }
    let port = &taken.port;
    Err(AgentError::AlreadyExists {
        what: "nvmet port",
        id: spec.id.to_string(),
        detail: format!(
            "with address {} {} {}:{}, not {}; configure another port id for {}",
            port.trtype, port.adrfam, port.traddr, port.trsvcid, spec.address, spec.address
        ),
    })
}

/// Refuses to touch an existing subsystem that differs from the request.
fn check_compatible(existing: &Export, request: &ExportRequest) -> Result<(), AgentError> {
    let conflict = |detail: String| AgentError::AlreadyExists {
        what: "NVMe export",
        id: existing.subsystem_nqn.clone(),
        detail,
    };
    if existing.allow_any_host {
        return Err(conflict(
            "and is open to any host (attr_allow_any_host=1); unexport it first".into(),
        ));
    }
    let host = request.host_nqn.as_str();
    let others: Vec<&str> = existing
        .allowed_hosts
        .iter()
        .map(String::as_str)
        .filter(|allowed| *allowed != host)
        .collect();
    if !others.is_empty() {
        return Err(conflict(format!(
            "for host {}, not {host}; unexport it before exporting to another host",
            others.join(", ")
        )));
    }
    for ns in &existing.namespaces {
        check_namespace(ns, request).map_err(conflict)?;
    }
    for port in &existing.ports {
        if port.tcp_address() != Some(request.port.address) {
            return Err(conflict(format!(
                "on port {} ({} {}:{}), not {}; unexport it first",
                port.id, port.trtype, port.traddr, port.trsvcid, request.port.address
            )));
        }
    }
    Ok(())
}

fn check_namespace(ns: &ExportedNamespace, request: &ExportRequest) -> Result<(), String> {
    if ns.nsid != EXPORT_NSID {
        return Err(format!(
            "with namespace {}, which exports never use",
            ns.nsid
        ));
    }
    if let Some(path) = &ns.device_path
        && *path != request.device_path
    {
        return Err(format!(
            "serving {}, not {}; unexport it first",
            path.display(),
            request.device_path.display()
        ));
    }
    let wanted = &request.namespace;
    if ns.enabled
        && (!ns.uuid.eq_ignore_ascii_case(&wanted.uuid)
            || !ns.nguid.eq_ignore_ascii_case(&wanted.nguid))
    {
        return Err(format!(
            "with namespace uuid {} / nguid {}, not {} / {}; unexport it first",
            ns.uuid, ns.nguid, wanted.uuid, wanted.nguid
        ));
    }
    Ok(())
}

fn check_block_device(path: &Path) -> Result<(), AgentError> {
    let meta = fs::metadata(path).map_err(|err| match errno_of(&err) {
        Some(Errno::ENOENT) => AgentError::NotFound {
            what: "block device",
            id: path.display().to_string(),
        },
        _ => fs_error("checking", path, err, ""),
    })?;
    if !meta.file_type().is_block_device() {
        return Err(AgentError::InvalidArgument {
            field: "device_path",
            reason: format!("{} is not a block device", path.display()),
        });
    }
    Ok(())
}

/// Appends what to do to an I/O error's message.
fn with_hint(err: AgentError, hint: &str) -> AgentError {
    match err {
        AgentError::Io { context, source } => AgentError::Io {
            context: format!("{context}; {hint}"),
            source,
        },
        other => other,
    }
}

/// Writes an attribute only when it differs (case aside, as the kernel prints
/// UUIDs in lower case), so a repeated export writes nothing.
fn ensure_attr(path: &Path, value: &str) -> Result<(), AgentError> {
    if read_attr(path)?.eq_ignore_ascii_case(value) {
        return Ok(());
    }
    write_attr(path, value, KERNEL_LOG)
}

/// [`ensure_attr`] for a secret: neither it nor what the kernel holds
/// appears in an error.
fn ensure_secret(path: &Path, secret: &str) -> Result<(), AgentError> {
    if read_attr(path)? == secret {
        return Ok(());
    }
    std::fs::write(path, secret)
        .map_err(|err| fs_error("writing a DH-HMAC-CHAP secret to", path, err, KERNEL_LOG))
}

/// mkdir that accepts an existing directory.
fn make_dir(path: &Path, hint: &str) -> Result<(), AgentError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(fs_error("creating", path, err, hint)),
    }
}

/// A configfs link to `target` at `link`, unless it is there already.
fn make_link(target: &Path, link: &Path, hint: &str) -> Result<(), AgentError> {
    if exists(link) {
        return Ok(());
    }
    symlink(target, link)
        .map_err(|err| fs_error(&format!("linking {} as", target.display()), link, err, hint))
}

fn remove_link(link: &Path) -> Result<(), AgentError> {
    match fs::remove_file(link) {
        Ok(()) => Ok(()),
        Err(err) if errno_of(&err) == Some(Errno::ENOENT) => Ok(()),
        Err(err) => Err(fs_error("unlinking", link, err, KERNEL_LOG)),
    }
}

fn remove_dir(dir: &Path, hint: &str) -> Result<(), AgentError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if errno_of(&err) == Some(Errno::ENOENT) => Ok(()),
        Err(err) => Err(fs_error("removing", dir, err, hint)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn port(id: u16, trtype: &str, traddr: &str, trsvcid: &str) -> Port {
        Port {
            id,
            trtype: trtype.into(),
            adrfam: if trtype.is_empty() { "" } else { "ipv4" }.into(),
            traddr: traddr.into(),
            trsvcid: trsvcid.into(),
        }
    }

    fn state(port: Port, subsystems: &[&str]) -> PortState {
        PortState {
            port,
            subsystems: subsystems.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn spec(id: u16, trsvcid: u16) -> PortSpec {
        PortSpec {
            id,
            address: TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), trsvcid),
        }
    }

    #[test]
    fn a_port_with_the_same_address_is_shared_whatever_its_id() {
        let ports = [state(port(7, "tcp", "127.0.0.1", "4420"), &["a"])];
        assert_eq!(
            plan_port(&ports, &spec(1, 4420)).unwrap(),
            PortPlan::Reuse(7)
        );
        assert_eq!(
            plan_port(&ports, &spec(1, 4421)).unwrap(),
            PortPlan::Create(1)
        );
    }

    #[test]
    fn a_port_id_in_use_elsewhere_is_a_conflict_naming_its_address() {
        let ports = [state(port(1, "tcp", "127.0.0.1", "4420"), &[])];
        let err = plan_port(&ports, &spec(1, 4421)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nvmet port 1 already exists"), "{text}");
        assert!(text.contains("127.0.0.1:4420"), "{text}");
    }

    #[test]
    fn an_unconfigured_idle_port_is_finished() {
        let ports = [state(port(3, "", "", ""), &[])];
        assert_eq!(
            plan_port(&ports, &spec(3, 4420)).unwrap(),
            PortPlan::Configure(3)
        );
        let busy = [state(port(3, "", "", ""), &["x"])];
        assert!(plan_port(&busy, &spec(3, 4420)).is_err());
    }

    #[test]
    fn ports_of_other_transports_or_families_do_not_match() {
        let mut rdma = port(2, "rdma", "127.0.0.1", "4420");
        assert_eq!(rdma.tcp_address(), None);
        rdma.trtype = "tcp".into();
        rdma.adrfam = "ipv6".into();
        assert_eq!(rdma.tcp_address(), None);
    }

    fn request(host: &str) -> ExportRequest {
        ExportRequest {
            subsystem_nqn: Nqn::parse("nqn", "nqn.2014-08.io.dmclone:n:v").unwrap(),
            device_path: "/dev/loop0".into(),
            namespace: NamespaceIds {
                uuid: "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11".into(),
                nguid: "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11".into(),
            },
            host_nqn: Nqn::parse("nqn", host).unwrap(),
            port: spec(1, 4420),
            auth: None,
        }
    }

    fn existing(hosts: &[&str], device: &str) -> Export {
        Export {
            subsystem_nqn: "nqn.2014-08.io.dmclone:n:v".into(),
            allow_any_host: false,
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            namespaces: vec![ExportedNamespace {
                nsid: 1,
                device_path: Some(device.into()),
                uuid: "0B9D1C3E-5F1A-4F7E-9A57-3F0C2B8F6D11".into(),
                nguid: "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11".into(),
                enabled: true,
            }],
            ports: vec![port(1, "tcp", "127.0.0.1", "4420")],
        }
    }

    #[test]
    fn the_same_request_is_compatible() {
        let host = "nqn.2014-08.io.dmclone:host-a";
        check_compatible(&existing(&[host], "/dev/loop0"), &request(host)).unwrap();
        check_compatible(&existing(&[], "/dev/loop0"), &request(host)).unwrap();
    }

    #[test]
    fn another_host_device_or_port_is_a_conflict_naming_what_is_there() {
        let host = "nqn.2014-08.io.dmclone:host-a";
        let other = "nqn.2014-08.io.dmclone:host-b";
        let text = check_compatible(&existing(&[other], "/dev/loop0"), &request(host))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains(&format!("for host {other}, not {host}")),
            "{text}"
        );

        let text = check_compatible(&existing(&[host], "/dev/loop9"), &request(host))
            .unwrap_err()
            .to_string();
        assert!(text.contains("serving /dev/loop9"), "{text}");

        let mut moved = request(host);
        moved.port = spec(1, 4421);
        let text = check_compatible(&existing(&[host], "/dev/loop0"), &moved)
            .unwrap_err()
            .to_string();
        assert!(text.contains("on port 1"), "{text}");

        let mut open = existing(&[], "/dev/loop0");
        open.allow_any_host = true;
        assert!(check_compatible(&open, &request(host)).is_err());
    }

    #[test]
    fn a_missing_tree_is_unavailable_with_instructions() {
        let dir = tempfile::tempdir().unwrap();
        let err = Target::at(dir.path()).unwrap_err();
        assert!(matches!(err, AgentError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("modprobe nvmet-tcp"), "{err}");
    }

    #[tokio::test]
    async fn list_exports_reads_a_tree_back_and_skips_what_vanished() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let nqn = "nqn.2014-08.io.dmclone:n:v";
        let host = "nqn.2014-08.io.dmclone:host-a";
        let subsystem = join(root, &["subsystems", nqn]);
        let ns = join(&subsystem, &["namespaces", "1"]);
        fs::create_dir_all(&ns).unwrap();
        fs::create_dir_all(subsystem.join("allowed_hosts")).unwrap();
        fs::create_dir_all(join(root, &["hosts", host])).unwrap();
        fs::write(subsystem.join("attr_allow_any_host"), "0\n").unwrap();
        for (attr, value) in [
            ("device_path", "/dev/loop0\n"),
            ("device_uuid", "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11\n"),
            ("device_nguid", "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11\n"),
            ("enable", "1\n"),
        ] {
            fs::write(ns.join(attr), value).unwrap();
        }
        symlink(
            join(root, &["hosts", host]),
            join(&subsystem, &["allowed_hosts", host]),
        )
        .unwrap();
        let port = join(root, &["ports", "7"]);
        fs::create_dir_all(port.join("subsystems")).unwrap();
        for (attr, value) in [
            ("addr_trtype", "tcp\n"),
            ("addr_adrfam", "ipv4\n"),
            ("addr_traddr", "127.0.0.1\n"),
            ("addr_trsvcid", "4420\n"),
        ] {
            fs::write(port.join(attr), value).unwrap();
        }
        symlink(&subsystem, join(&port, &["subsystems", nqn])).unwrap();
        // Listed, then removed by someone else before its attributes were read.
        fs::create_dir_all(join(&subsystem, &["namespaces", "2"])).unwrap();
        fs::create_dir_all(join(root, &["subsystems", "nqn.2014-08.io.gone:x"])).unwrap();

        let exports = Target::at(root).unwrap().list_exports().await.unwrap();
        assert_eq!(exports.len(), 1, "{exports:?}");
        let export = &exports[0];
        assert_eq!(export.namespaces.len(), 1, "{:?}", export.namespaces);
        assert_eq!(export.subsystem_nqn, nqn);
        assert!(!export.allow_any_host);
        assert_eq!(export.allowed_hosts, vec![host]);
        assert_eq!(export.device_path(), Some(Path::new("/dev/loop0")));
        assert!(export.namespaces[0].enabled);
        assert_eq!(
            export.ports[0].tcp_address(),
            Some(TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4420))
        );
        assert_eq!(export.ports[0].id, 7);
    }
}
