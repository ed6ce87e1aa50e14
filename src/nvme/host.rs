//! Destination side: connecting to an export with the kernel's NVMe/TCP host
//! (`/dev/nvme-fabrics`), finding the namespace's block device in sysfs, and
//! disconnecting. No nvme-cli process.
//!
//! A connect first looks for a controller that already serves the same
//! subsystem for the same host at the same address and adopts it: after an
//! agent restart the kernel still holds the connection, and the kernel itself
//! refuses a duplicate with EALREADY.

use std::{
    fs::{self, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::LazyLock,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::stat::{major, minor},
};
use tracing::{info, warn};

use crate::{
    dm::table::DevRef,
    error::AgentError,
    locks::Locks,
    nvme::{
        fabrics::{
            ConnectOptions, ConnectReply, NamespaceIds, TcpAddress, instance_of, is_namespace_disk,
            parse_sysfs_address,
        },
        kfs::{blocking, entry_names, errno_name, errno_of, fs_error, join, read_attr_if_present},
        nqn::Nqn,
        target::EXPORT_NSID,
    },
    refusal::Refusal,
};

pub const FABRICS_DEVICE: &str = "/dev/nvme-fabrics";

/// How often [`Host::wait_for_namespace`] looks at sysfs. The namespace
/// appears from the kernel's scan work shortly after the connect returns.
const NAMESPACE_POLL: Duration = Duration::from_millis(50);

/// Connects to one subsystem run one at a time in this process, so that "is
/// there a controller to adopt?" and the connect that follows cannot
/// interleave; connects to different subsystems do not wait for each other
/// (a connect to an unreachable address takes seconds).
static CONNECT_LOCKS: LazyLock<Locks> = LazyLock::new(Locks::default);

/// What to connect to, and what to expect behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub options: ConnectOptions,
    /// The identities namespace [`EXPORT_NSID`] may report; empty accepts
    /// any.
    pub expected_namespace: Vec<NamespaceIds>,
    /// How long to wait for the namespace's block device after the connect.
    pub namespace_timeout: Duration,
}

/// A fabrics controller as sysfs (`/sys/class/nvme/nvme<N>`) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// `nvme<N>`.
    pub name: String,
    pub instance: u32,
    pub cntlid: u16,
    pub subsystem_nqn: String,
    pub host_nqn: String,
    /// `None` when the address is not a TCP one.
    pub address: Option<TcpAddress>,
    pub transport: String,
    /// `live`, `connecting`, `resetting`, `deleting`, ...
    pub state: String,
}

impl Controller {
    /// Whether the kernel is tearing this controller down.
    pub fn is_going_away(&self) -> bool {
        self.state.starts_with("deleting") || self.state == "dead"
    }
}

/// The block device of a connected namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceDevice {
    /// `nvme<S>n<H>`: S is the subsystem instance with native multipath (the
    /// default), the controller instance without; H is not the nsid.
    pub name: String,
    /// `/dev/<name>`.
    pub path: PathBuf,
    pub device: DevRef,
    pub nsid: u32,
    /// `None` when the namespace reports neither UUID nor NGUID.
    pub uuid: Option<String>,
    pub size_bytes: u64,
}

/// A controller and the namespace the agent reads through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub controller: Controller,
    pub namespace: NamespaceDevice,
    /// The controller existed before this connect.
    pub adopted: bool,
}

/// Handle on the kernel's NVMe host. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Host {
    sys: PathBuf,
    dev: PathBuf,
}

impl Host {
    /// Checks that the fabrics device exists (nvme-fabrics and nvme-tcp).
    pub fn open() -> Result<Self, AgentError> {
        let host = Self::at("/sys", "/dev");
        if !host.fabrics_device().exists() {
            return Err(AgentError::Unavailable {
                reason: format!(
                    "{FABRICS_DEVICE} is missing; load the NVMe/TCP host modules \
                     (modprobe nvme-tcp)"
                ),
            });
        }
        Ok(host)
    }

    fn at(sys: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> Self {
        Self {
            sys: sys.into(),
            dev: dev.into(),
        }
    }

    /// Connects (or adopts the controller already connected for the same
    /// subsystem, host and address) and waits for the namespace's block device.
    ///
    /// A controller this call created is deleted again when its namespace does
    /// not show up, so a failed connect leaves nothing behind.
    pub async fn connect(&self, request: &ConnectRequest) -> Result<Connection, AgentError> {
        let options = request.options.render()?;
        let (controller, adopted) = {
            let _serial = CONNECT_LOCKS
                .lock(request.options.subsystem_nqn.as_str())
                .await;
            let host = self.clone();
            let request = request.clone();
            blocking("nvme connect", move || {
                host.adopt_or_connect(&request.options, &options)
            })
            .await?
        };
        let waited = self
            .wait_for_namespace(
                &controller,
                &request.expected_namespace,
                request.namespace_timeout,
            )
            .await;
        match waited {
            Ok(namespace) => Ok(Connection {
                controller,
                namespace,
                adopted,
            }),
            Err(err) => {
                if !adopted && let Err(cleanup) = self.disconnect(&controller).await {
                    warn!(controller = %controller.name, error = %cleanup,
                          "could not delete the controller of a failed connect");
                }
                Err(err)
            }
        }
    }

    /// The controller connected to `subsystem_nqn`, if any (one that is being
    /// deleted does not count).
    pub async fn find_connection(
        &self,
        subsystem_nqn: &Nqn,
    ) -> Result<Option<Controller>, AgentError> {
        let host = self.clone();
        let nqn = subsystem_nqn.clone();
        blocking("nvme lookup", move || {
            Ok(host
                .controllers_of(nqn.as_str())?
                .into_iter()
                .find(|c| !c.is_going_away()))
        })
        .await
    }

    /// The controller as sysfs reports it now; `None` once it is gone (or its
    /// instance number was reused for another subsystem).
    pub async fn refresh(&self, controller: &Controller) -> Result<Option<Controller>, AgentError> {
        let host = self.clone();
        let known = controller.clone();
        blocking("nvme lookup", move || host.current(&known)).await
    }

    /// Waits until namespace [`EXPORT_NSID`] of `controller` has a block
    /// device, and checks its identity against `expected`.
    pub async fn wait_for_namespace(
        &self,
        controller: &Controller,
        expected: &[NamespaceIds],
        timeout: Duration,
    ) -> Result<NamespaceDevice, AgentError> {
        let started = Instant::now();
        loop {
            let host = self.clone();
            let known = controller.clone();
            let lookup = blocking("nvme namespace lookup", move || {
                host.look_for_namespace(&known)
            })
            .await?;
            match lookup {
                NamespaceLookup::Ready(namespace) => {
                    return check_identity(namespace, controller, expected);
                }
                NamespaceLookup::ControllerGone => {
                    return Err(AgentError::Unavailable {
                        reason: format!(
                            "controller {} for {} went away before namespace {EXPORT_NSID} \
                             appeared; the connection was lost (see the kernel log)",
                            controller.name, controller.subsystem_nqn
                        ),
                    });
                }
                NamespaceLookup::Pending if started.elapsed() >= timeout => {
                    return Err(namespace_timeout(controller, timeout));
                }
                NamespaceLookup::Pending => tokio::time::sleep(NAMESPACE_POLL).await,
            }
        }
    }

    /// Deletes the controller; one that is already gone is fine. Refused while
    /// a device (e.g. a dm-clone) sits on its namespace.
    pub async fn disconnect(&self, controller: &Controller) -> Result<(), AgentError> {
        let host = self.clone();
        let known = controller.clone();
        blocking("nvme disconnect", move || host.disconnect_blocking(&known)).await
    }

    fn adopt_or_connect(
        &self,
        options: &ConnectOptions,
        text: &str,
    ) -> Result<(Controller, bool), AgentError> {
        if let Some(existing) = self.adoptable(options)? {
            info!(controller = %existing.name, subsystem = %options.subsystem_nqn,
                  "adopting the connected NVMe controller");
            return Ok((existing, true));
        }
        match self.write_connect(text) {
            Ok(reply) => {
                let controller = self.connected_controller(&reply, options)?;
                info!(controller = %controller.name, subsystem = %options.subsystem_nqn,
                      address = %options.address, "connected over NVMe/TCP");
                Ok((controller, false))
            }
            // Connected meanwhile by someone else (another process): adopt.
            Err(err) if errno_of(&err) == Some(Errno::EALREADY) => self
                .adoptable(options)?
                .map(|existing| (existing, true))
                .ok_or_else(|| connect_error(err, options)),
            Err(err) => Err(connect_error(err, options)),
        }
    }

    /// The controller a successful connect created, from sysfs.
    fn connected_controller(
        &self,
        reply: &ConnectReply,
        options: &ConnectOptions,
    ) -> Result<Controller, AgentError> {
        let name = reply.controller_name();
        self.read_controller(&name)?
            .ok_or_else(|| AgentError::Unavailable {
                reason: format!(
                    "controller {name} for {} vanished right after connecting; the connection \
                     was lost (see the kernel log)",
                    options.subsystem_nqn
                ),
            })
    }

    fn look_for_namespace(&self, known: &Controller) -> Result<NamespaceLookup, AgentError> {
        if self.current(known)?.is_none() {
            return Ok(NamespaceLookup::ControllerGone);
        }
        Ok(match self.find_namespace(&known.name, EXPORT_NSID)? {
            Some(namespace) => NamespaceLookup::Ready(namespace),
            None => NamespaceLookup::Pending,
        })
    }

    /// A live-or-recovering controller for the same subsystem, host and
    /// address; one for the same subsystem with another host or address is a
    /// conflict the caller must resolve.
    fn adoptable(&self, options: &ConnectOptions) -> Result<Option<Controller>, AgentError> {
        let nqn = options.subsystem_nqn.as_str();
        for controller in self.controllers_of(nqn)? {
            if controller.is_going_away() {
                continue;
            }
            if controller.transport == "tcp"
                && controller.host_nqn == options.host_nqn.as_str()
                && controller.address == Some(options.address)
            {
                return Ok(Some(controller));
            }
            return Err(AgentError::AlreadyExists {
                what: "NVMe connection to",
                id: nqn.to_owned(),
                detail: format!(
                    "as controller {} (host {}, address {}); disconnect it first",
                    controller.name,
                    controller.host_nqn,
                    controller
                        .address
                        .map_or_else(|| "not TCP".to_owned(), |a| a.to_string())
                ),
            });
        }
        Ok(None)
    }

    /// One write() of the whole option string, then the reply from the same fd.
    fn write_connect(&self, text: &str) -> io::Result<ConnectReply> {
        let mut fabrics = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.fabrics_device())?;
        let written = fabrics.write(text.as_bytes())?;
        if written != text.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the kernel took {written} of {} bytes", text.len()),
            ));
        }
        let mut reply = String::new();
        fabrics.read_to_string(&mut reply)?;
        ConnectReply::parse(&reply).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
    }

    fn disconnect_blocking(&self, known: &Controller) -> Result<(), AgentError> {
        let Some(current) = self.current(known)? else {
            return Ok(());
        };
        self.refuse_if_held(&current)?;
        let attr = join(&self.class_nvme(), &[&known.name, "delete_controller"]);
        let result = OpenOptions::new()
            .write(true)
            .open(&attr)
            .and_then(|mut file| file.write(b"1"));
        match result {
            Ok(_) => {
                info!(controller = %known.name, subsystem = %known.subsystem_nqn, "disconnected");
                Ok(())
            }
            Err(err) if matches!(errno_of(&err), Some(Errno::ENOENT | Errno::ENODEV)) => Ok(()),
            Err(err) => Err(fs_error(
                "writing \"1\" to",
                &attr,
                err,
                "EBUSY means the controller never went live; it is deleted on its own \
                 after ctrl_loss_tmo",
            )),
        }
    }

    /// `known` re-read, unless it is gone or its name now belongs to a
    /// controller of another subsystem.
    fn current(&self, known: &Controller) -> Result<Option<Controller>, AgentError> {
        Ok(self
            .read_controller(&known.name)?
            .filter(|c| c.subsystem_nqn == known.subsystem_nqn))
    }

    fn controllers_of(&self, subsystem_nqn: &str) -> Result<Vec<Controller>, AgentError> {
        let mut found = Vec::new();
        for name in entry_names(&self.class_nvme())? {
            if instance_of(&name, "nvme").is_none() {
                continue;
            }
            // One attribute tells another subsystem's controller apart.
            let nqn = read_attr_if_present(&self.class_nvme().join(&name).join("subsysnqn"))?;
            if nqn.as_deref() != Some(subsystem_nqn) {
                continue;
            }
            if let Some(controller) = self.read_controller(&name)?
                && controller.subsystem_nqn == subsystem_nqn
            {
                found.push(controller);
            }
        }
        Ok(found)
    }

    /// `None` when the controller is gone (its attributes vanish with it).
    fn read_controller(&self, name: &str) -> Result<Option<Controller>, AgentError> {
        let dir = self.class_nvme().join(name);
        let attr = |attr: &str| read_attr_if_present(&dir.join(attr));
        let (
            Some(subsystem_nqn),
            Some(host_nqn),
            Some(address),
            Some(transport),
            Some(state),
            Some(cntlid),
        ) = (
            attr("subsysnqn")?,
            attr("hostnqn")?,
            attr("address")?,
            attr("transport")?,
            attr("state")?,
            attr("cntlid")?,
        )
        else {
            return Ok(None);
        };
        let bad = |what: &str, text: &str| {
            AgentError::Internal(format!(
                "{}: {what} {text:?} is not a number",
                dir.display()
            ))
        };
        Ok(Some(Controller {
            name: name.to_owned(),
            instance: instance_of(name, "nvme").ok_or_else(|| bad("name", name))?,
            cntlid: cntlid.parse().map_err(|_| bad("cntlid", &cntlid))?,
            subsystem_nqn,
            host_nqn,
            address: parse_sysfs_address(&address),
            transport,
            state,
        }))
    }

    /// Namespace `nsid` of `controller`, once its disk and /dev node exist.
    fn find_namespace(
        &self,
        controller: &str,
        nsid: u32,
    ) -> Result<Option<NamespaceDevice>, AgentError> {
        let Some(disk) = self.find_disk(controller, nsid)? else {
            return Ok(None);
        };
        let path = self.dev.join(&disk.name);
        // devtmpfs creates the node when the disk is added; until then, wait.
        match fs::metadata(&path) {
            Ok(meta)
                if meta.file_type().is_block_device()
                    && DevRef::from((major(meta.rdev()) as u32, minor(meta.rdev()) as u32))
                        == disk.device =>
            {
                Ok(Some(NamespaceDevice { path, ..disk }))
            }
            Ok(_) => Ok(None),
            Err(err) if errno_of(&err) == Some(Errno::ENOENT) => Ok(None),
            Err(err) => Err(fs_error("checking", &path, err, "")),
        }
    }

    /// The disk of namespace `nsid` in sysfs. With native multipath it sits
    /// under the subsystem (`nvme-subsys<S>/nvme<S>n<H>`, beside a link to
    /// each of its controllers); without, under the controller
    /// (`nvme<N>/nvme<N>n<H>`). H is an index, so the nsid attribute decides.
    fn find_disk(
        &self,
        controller: &str,
        nsid: u32,
    ) -> Result<Option<NamespaceDevice>, AgentError> {
        for (dir, name) in self.namespace_disks(controller)? {
            if let Some(disk) = read_disk(&dir, &name)?
                && disk.nsid == nsid
                && disk.size_bytes > 0
            {
                return Ok(Some(disk));
            }
        }
        Ok(None)
    }

    /// The sysfs directory and name of every namespace disk of `controller`.
    fn namespace_disks(&self, controller: &str) -> Result<Vec<(PathBuf, String)>, AgentError> {
        let mut parents = vec![self.class_nvme().join(controller)];
        let subsystems = self.sys.join("class/nvme-subsystem");
        for subsystem in entry_names(&subsystems)? {
            let dir = subsystems.join(&subsystem);
            if dir.join(controller).exists() {
                parents.push(dir);
            }
        }
        let mut disks = Vec::new();
        for parent in parents {
            for name in entry_names(&parent)? {
                if is_namespace_disk(&name) {
                    disks.push((parent.join(&name), name));
                }
            }
        }
        Ok(disks)
    }

    /// Deleting a controller under a device-mapper device (the clone reading
    /// from it) would fail every read of a region not yet copied.
    fn refuse_if_held(&self, controller: &Controller) -> Result<(), AgentError> {
        for (dir, name) in self.namespace_disks(&controller.name)? {
            let holders = entry_names(&dir.join("holders"))?;
            if !holders.is_empty() {
                return Err(Refusal::NamespaceInUse {
                    controller: controller.name.clone(),
                    subsystem_nqn: controller.subsystem_nqn.to_string(),
                    disk: name,
                    holders,
                }
                .into());
            }
        }
        Ok(())
    }

    fn class_nvme(&self) -> PathBuf {
        self.sys.join("class/nvme")
    }

    fn fabrics_device(&self) -> PathBuf {
        self.dev.join("nvme-fabrics")
    }
}

/// One look at sysfs while waiting for a namespace.
enum NamespaceLookup {
    Ready(NamespaceDevice),
    /// The controller is there, the disk (or its /dev node) not yet.
    Pending,
    ControllerGone,
}

/// A namespace disk's sysfs attributes; `None` when it vanished meanwhile.
fn read_disk(dir: &Path, name: &str) -> Result<Option<NamespaceDevice>, AgentError> {
    let attr = |attr: &str| read_attr_if_present(&dir.join(attr));
    let (Some(nsid), Some(dev), Some(sectors)) = (attr("nsid")?, attr("dev")?, attr("size")?)
    else {
        return Ok(None);
    };
    let bad = |what: &str, text: &str| {
        AgentError::Internal(format!("{}/{what} reads {text:?}", dir.display()))
    };
    let sectors: u64 = sectors.parse().map_err(|_| bad("size", &sectors))?;
    Ok(Some(NamespaceDevice {
        name: name.to_owned(),
        path: PathBuf::from("/dev").join(name),
        device: dev.parse().map_err(|_| bad("dev", &dev))?,
        nsid: nsid.parse().map_err(|_| bad("nsid", &nsid))?,
        // Absent when the namespace has neither UUID nor NGUID.
        uuid: attr("uuid")?,
        size_bytes: sectors * 512,
    }))
}

/// A namespace with another identity than expected is another volume.
fn check_identity(
    namespace: NamespaceDevice,
    controller: &Controller,
    expected: &[NamespaceIds],
) -> Result<NamespaceDevice, AgentError> {
    if expected.is_empty() {
        return Ok(namespace);
    }
    let matches = namespace.uuid.as_deref().is_some_and(|uuid| {
        expected
            .iter()
            .any(|ids| uuid.eq_ignore_ascii_case(&ids.uuid))
    });
    if matches {
        return Ok(namespace);
    }
    let wanted: Vec<&str> = expected.iter().map(|ids| ids.uuid.as_str()).collect();
    Err(AgentError::Conflict(format!(
        "namespace {} of {} ({}) has uuid {}, expected {}: the subsystem exports another \
         volume; disconnect controller {} and check the source",
        namespace.nsid,
        controller.subsystem_nqn,
        namespace.path.display(),
        namespace.uuid.as_deref().unwrap_or("(none)"),
        wanted.join(" or "),
        controller.name
    )))
}

fn namespace_timeout(controller: &Controller, timeout: Duration) -> AgentError {
    AgentError::Unavailable {
        reason: format!(
            "controller {} for {} is {} but namespace {EXPORT_NSID} has no block device after \
             {timeout:?}; check that the export's namespace is enabled. If the kernel log says \
             \"ignoring nsid {EXPORT_NSID} because of duplicate IDs\", another connected \
             subsystem exports the same volume: disconnect it first",
            controller.name, controller.subsystem_nqn, controller.state
        ),
    }
}

/// A failed connect write, classified by what the caller can do about it.
fn connect_error(err: io::Error, options: &ConnectOptions) -> AgentError {
    let address = options.address;
    let nqn = &options.subsystem_nqn;
    match errno_of(&err) {
        Some(Errno::ENOENT) => AgentError::Unavailable {
            reason: format!(
                "{FABRICS_DEVICE} is missing; load the NVMe/TCP host modules (modprobe nvme-tcp)"
            ),
        },
        Some(Errno::ECONNREFUSED) => AgentError::Unavailable {
            reason: format!(
                "nothing accepts NVMe/TCP connections at {address} (ECONNREFUSED); is {nqn} \
                 exported on that address?"
            ),
        },
        Some(Errno::ETIMEDOUT | Errno::EHOSTUNREACH | Errno::ENETUNREACH) => {
            AgentError::Unavailable {
                reason: format!(
                    "cannot reach {address} ({}); check the storage network",
                    errno_name(&err)
                ),
            }
        }
        Some(Errno::EIO) => Refusal::HostRejected {
            address: address.to_string(),
            host_nqn: options.host_nqn.to_string(),
            subsystem_nqn: nqn.to_string(),
        }
        .into(),
        // ENOKEY: the target demands authentication and we offered none.
        Some(
            Errno::EKEYREJECTED | Errno::ENOKEY | Errno::EKEYEXPIRED | Errno::EACCES | Errno::EPERM,
        ) => AgentError::PermissionDenied {
            reason: format!(
                "the target at {address} did not authenticate host {} for {nqn} ({}): the \
                     DH-HMAC-CHAP secrets are not the export's; export again and pass the secrets \
                     it answers",
                options.host_nqn,
                errno_name(&err)
            ),
        },
        _ => AgentError::Io {
            context: format!(
                "connecting with {:?} through {FABRICS_DEVICE} failed with {}; the kernel \
                 log names the rejected option",
                options.shown(),
                errno_name(&err)
            ),
            source: err,
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::symlink;

    use super::*;

    const NQN: &str = "nqn.2014-08.io.dmclone:node-a:vol";
    const UUID: &str = "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn controller(sys: &Path, name: &str, nqn: &str, state: &str) {
        let dir = sys.join("class/nvme").join(name);
        write(&dir.join("subsysnqn"), &format!("{nqn}\n"));
        write(&dir.join("hostnqn"), "nqn.2014-08.io.dmclone:host-b\n");
        write(&dir.join("address"), "traddr=127.0.0.1,trsvcid=4420\n");
        write(&dir.join("transport"), "tcp\n");
        write(&dir.join("state"), &format!("{state}\n"));
        write(&dir.join("cntlid"), "1\n");
    }

    fn disk(dir: &Path, nsid: u32, dev: &str, sectors: u64) {
        write(&dir.join("nsid"), &format!("{nsid}\n"));
        write(&dir.join("dev"), &format!("{dev}\n"));
        write(&dir.join("size"), &format!("{sectors}\n"));
        write(&dir.join("uuid"), &format!("{UUID}\n"));
    }

    #[test]
    fn multipath_disks_are_found_under_the_subsystem_by_nsid() {
        let sys = tempfile::tempdir().unwrap();
        let sys = sys.path();
        controller(sys, "nvme3", NQN, "live");
        let subsys = sys.join("class/nvme-subsystem/nvme-subsys1");
        fs::create_dir_all(&subsys).unwrap();
        symlink(sys.join("class/nvme/nvme3"), subsys.join("nvme3")).unwrap();
        // The hidden per-path disk must not be taken; nor nsid 2's head.
        disk(&sys.join("class/nvme/nvme3/nvme1c3n1"), 1, "259:9", 2048);
        disk(&subsys.join("nvme1n1"), 2, "259:1", 2048);
        disk(&subsys.join("nvme1n2"), 1, "259:2", 4096);
        // Another subsystem's disk with nsid 1.
        let other = sys.join("class/nvme-subsystem/nvme-subsys0");
        disk(&other.join("nvme0n1"), 1, "259:0", 2048);

        let host = Host::at(sys, "/nonexistent");
        let found = host.find_disk("nvme3", 1).unwrap().unwrap();
        assert_eq!(found.name, "nvme1n2");
        assert_eq!(found.device, DevRef::from((259, 2)));
        assert_eq!(found.size_bytes, 4096 * 512);
        assert_eq!(found.uuid.as_deref(), Some(UUID));
        // No /dev node yet: not ready.
        assert_eq!(host.find_namespace("nvme3", 1).unwrap(), None);

        let controller = host.read_controller("nvme3").unwrap().unwrap();
        host.refuse_if_held(&controller).unwrap();
        fs::create_dir_all(subsys.join("nvme1n2/holders/dm-3")).unwrap();
        let err = host.refuse_if_held(&controller).unwrap_err();
        assert!(
            matches!(err, AgentError::Refused(Refusal::NamespaceInUse { .. })),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("/dev/nvme1n2, which dm-3 still use"),
            "{err}"
        );
    }

    #[test]
    fn without_multipath_disks_sit_under_the_controller() {
        let sys = tempfile::tempdir().unwrap();
        let sys = sys.path();
        controller(sys, "nvme0", NQN, "live");
        disk(&sys.join("class/nvme/nvme0/nvme0n1"), 1, "259:0", 8);
        let host = Host::at(sys, "/nonexistent");
        assert_eq!(host.find_disk("nvme0", 1).unwrap().unwrap().name, "nvme0n1");
        assert_eq!(host.find_disk("nvme0", 2).unwrap(), None);
    }

    #[test]
    fn empty_disks_are_not_ready() {
        let sys = tempfile::tempdir().unwrap();
        let sys = sys.path();
        controller(sys, "nvme0", NQN, "live");
        disk(&sys.join("class/nvme/nvme0/nvme0n1"), 1, "259:0", 0);
        assert_eq!(Host::at(sys, "/x").find_disk("nvme0", 1).unwrap(), None);
    }

    #[test]
    fn controllers_are_matched_by_subsystem_and_state() {
        let sys = tempfile::tempdir().unwrap();
        let sys = sys.path();
        controller(sys, "nvme0", "nqn.2014-08.io.dmclone:other", "live");
        controller(sys, "nvme1", NQN, "deleting");
        controller(sys, "nvme2", NQN, "connecting");
        fs::create_dir_all(sys.join("class/nvme/nvme-fabrics")).unwrap();
        let host = Host::at(sys, "/x");
        let found = host.controllers_of(NQN).unwrap();
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["nvme1", "nvme2"]);
        assert!(found[0].is_going_away());
        assert!(!found[1].is_going_away());
        assert_eq!(found[1].instance, 2);
        assert_eq!(found[1].address.unwrap().to_string(), "127.0.0.1:4420");
        assert_eq!(host.read_controller("nvme9").unwrap(), None);
    }

    #[test]
    fn an_unexpected_namespace_identity_is_a_conflict() {
        let namespace = NamespaceDevice {
            name: "nvme1n1".into(),
            path: "/dev/nvme1n1".into(),
            device: DevRef::from((259, 1)),
            nsid: 1,
            uuid: Some(UUID.to_ascii_uppercase()),
            size_bytes: 512,
        };
        let controller = Controller {
            name: "nvme1".into(),
            instance: 1,
            cntlid: 1,
            subsystem_nqn: NQN.into(),
            host_nqn: "h".into(),
            address: None,
            transport: "tcp".into(),
            state: "live".into(),
        };
        let same = NamespaceIds {
            uuid: UUID.into(),
            nguid: UUID.into(),
        };
        assert!(check_identity(namespace.clone(), &controller, &[same]).is_ok());
        let other = NamespaceIds {
            uuid: "11111111-2222-3333-4444-555555555555".into(),
            nguid: String::new(),
        };
        let err = check_identity(namespace, &controller, &[other]).unwrap_err();
        assert!(matches!(err, AgentError::Conflict(_)), "{err:?}");
        assert!(err.to_string().contains("exports another volume"), "{err}");
    }
}
