//! NVMe/TCP over loopback: nvmet exports a loop device, the kernel host
//! connects to 127.0.0.1, and the namespace is read, cloned with dm-clone,
//! lost and recovered. Each test owns its NQNs (`…test:<tag>:…`), port id and
//! TCP port, so the tests run in parallel; each checks that nvmet's configfs
//! tree ends as it found it.

use dmclone::units::Sectors;
use std::{
    fs::{self, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::{
    dm::{
        events::EventMonitor,
        status::CloneStatus,
        table::{CloneParams, Target as DmTarget},
    },
    error::{AgentError, Refusal},
    ids::VolumeId,
    nvme::{
        ConnectOptions, ConnectRequest, ConnectTimeouts, Connection, Controller, ExportRequest,
        Host, HostId, Nqn, PortSpec, Target, TcpAddress, auth::DhchapKeys, namespace_ids,
        nqn::MAX_NQN_BYTES, subsystem_nqn, target::NVMET_CONFIGFS,
    },
};
use nix::errno::Errno;

use crate::support::*;

const TEST_NQN_BASE: &str = "nqn.2014-08.io.dmclone.test";
/// configfs port ids and TCP ports of these tests: base + the test's index.
const PORT_ID_BASE: u16 = 7000;
const TRSVCID_BASE: u16 = 14400;
const TEST_PORTS: u16 = 100;
/// Namespaces appear from the host's scan work; the emulated guest is slow.
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(30);

fn target() -> Target {
    Target::open().unwrap_or_else(|err| {
        panic!(
            "this real-kernel test needs the NVMe target (nvmet, nvmet-tcp) and configfs ({err}). \
             Run it through tests/run-all, which boots a guest kernel with them loaded"
        )
    })
}

fn host() -> Host {
    Host::open().unwrap_or_else(|err| {
        panic!(
            "this real-kernel test needs the NVMe/TCP host (nvme-tcp, nvme-fabrics) ({err}). \
             Run it through tests/run-all, which boots a guest kernel with them loaded"
        )
    })
}

/// The names one test owns.
struct TestNames {
    tag: &'static str,
    index: u16,
    volume: VolumeId,
    subsystem: Nqn,
    host: Nqn,
    host_id: HostId,
    other_host: Nqn,
    other_host_id: HostId,
}

impl TestNames {
    fn new(tag: &'static str, index: u16) -> Self {
        assert!(index < TEST_PORTS);
        let volume = VolumeId::parse(&format!("00000000-0000-4000-8000-{index:012x}")).unwrap();
        let nqn =
            |name: &str| Nqn::parse("test", &format!("{TEST_NQN_BASE}:{tag}:{name}")).unwrap();
        let host_id = |n: u16| HostId::parse(&format!("00000000-0000-4000-9000-{n:012x}")).unwrap();
        Self {
            tag,
            index,
            subsystem: subsystem_nqn(&format!("{TEST_NQN_BASE}:{tag}:node-a"), &volume).unwrap(),
            volume,
            host: nqn("host-b"),
            host_id: host_id(index),
            other_host: nqn("host-c"),
            other_host_id: host_id(1000 + index),
        }
    }

    fn port(&self) -> PortSpec {
        PortSpec {
            id: PORT_ID_BASE + self.index,
            address: TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), TRSVCID_BASE + self.index),
        }
    }

    fn export_request(&self, device: &Path) -> ExportRequest {
        ExportRequest {
            subsystem_nqn: self.subsystem.clone(),
            device_path: device.to_path_buf(),
            namespace: namespace_ids(&self.volume),
            host_nqn: self.host.clone(),
            port: self.port(),
            auth: None,
        }
    }

    fn connect_request(&self) -> ConnectRequest {
        ConnectRequest {
            options: ConnectOptions {
                address: self.port().address,
                subsystem_nqn: self.subsystem.clone(),
                host_nqn: self.host.clone(),
                host_id: self.host_id.clone(),
                timeouts: ConnectTimeouts::default(),
                auth: None,
            },
            expected_namespace: vec![namespace_ids(&self.volume)],
            namespace_timeout: NAMESPACE_TIMEOUT,
        }
    }

    /// This test's subsystem and host entry (with any secrets) are gone.
    fn assert_subsystem_and_host_gone(&self) {
        let root = Path::new(NVMET_CONFIGFS);
        let subsystem = root.join("subsystems").join(self.subsystem.as_str());
        assert!(!subsystem.exists(), "{} is left", subsystem.display());
        let host = root.join("hosts").join(self.host.as_str());
        assert!(!host.exists(), "{} is left", host.display());
    }

    /// nvmet's configfs tree without the objects of the other tests of this
    /// module, which may run concurrently: what this test must leave as found.
    fn nvmet_listing(&self) -> Vec<String> {
        let root = Path::new(NVMET_CONFIGFS);
        let mut lines = Vec::new();
        for kind in ["subsystems", "hosts", "ports"] {
            for name in sorted_entries(&root.join(kind)) {
                if !self.belongs_to_another_test(kind, &name) {
                    walk(root, &root.join(kind).join(&name), &mut lines);
                }
            }
        }
        lines
    }

    fn belongs_to_another_test(&self, kind: &str, name: &str) -> bool {
        if kind == "ports" {
            let ours = PORT_ID_BASE + self.index;
            return name.parse::<u16>().is_ok_and(|id| {
                (PORT_ID_BASE..PORT_ID_BASE + TEST_PORTS).contains(&id) && id != ours
            });
        }
        name.starts_with(&format!("{TEST_NQN_BASE}:"))
            && !name.starts_with(&format!("{TEST_NQN_BASE}:{}:", self.tag))
    }
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("list {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every path under `path` relative to `root`, symlinks with their targets.
fn walk(root: &Path, path: &Path, lines: &mut Vec<String>) {
    let relative = path.strip_prefix(root).unwrap().display().to_string();
    let meta = fs::symlink_metadata(path).unwrap();
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).unwrap();
        lines.push(format!("{relative} -> {}", target.display()));
    } else if meta.is_dir() {
        lines.push(format!("{relative}/"));
        for name in sorted_entries(path) {
            walk(root, &path.join(name), lines);
        }
    } else {
        lines.push(relative);
    }
}

/// S of the `nvme-subsys<S>` that links to `controller`.
fn subsystem_instance_of(controller: &str) -> u32 {
    let class = Path::new("/sys/class/nvme-subsystem");
    sorted_entries(class)
        .into_iter()
        .find(|subsystem| class.join(subsystem).join(controller).exists())
        .and_then(|subsystem| subsystem.strip_prefix("nvme-subsys")?.parse().ok())
        .unwrap_or_else(|| panic!("no nvme-subsystem links to {controller}"))
}

/// The kernel log so far (every record /dev/kmsg still holds).
fn kernel_log() -> String {
    let mut kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .unwrap();
    let mut log = String::new();
    let mut record = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => return log,
            Ok(n) => log.push_str(&String::from_utf8_lossy(&record[..n])),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return log,
            // Records overwritten while reading: carry on with the next.
            Err(err) if err.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(err) => panic!("read /dev/kmsg: {err}"),
        }
    }
}

/// One write(2), as configfs attributes take it; the errno if refused.
fn write_errno(path: &Path, value: &str) -> Option<Errno> {
    let result = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write(value.as_bytes()));
    result
        .err()
        .and_then(|err| err.raw_os_error())
        .map(Errno::from_raw)
}

fn rmdir_errno(path: &Path) -> Option<Errno> {
    fs::remove_dir(path)
        .err()
        .and_then(|err| err.raw_os_error())
        .map(Errno::from_raw)
}

fn fast_failing_timeouts() -> ConnectTimeouts {
    ConnectTimeouts {
        ctrl_loss_tmo_secs: 8,
        reconnect_delay_secs: 1,
        fast_io_fail_tmo_secs: Some(2),
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T>(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One O_DIRECT 4 KiB read, off the runtime.
async fn read_block(path: PathBuf, offset: u64) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&path)?;
        let mut buf = AlignedBuf::new(4096);
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buf.as_mut_slice())?;
        Ok(buf.as_mut_slice().to_vec())
    })
    .await
    .unwrap()
}

async fn state_of(host: &Host, controller: &Controller) -> Option<String> {
    host.refresh(controller).await.unwrap().map(|c| c.state)
}

#[tokio::test(flavor = "multi_thread")]
async fn export_serves_the_allowed_host_and_unexport_leaves_configfs_as_found() {
    let (target, host) = (target(), host());
    let names = TestNames::new("roundtrip", 1);
    let before = names.nvmet_listing();
    let size = 32 * MIB;
    let disk = LoopDisk::with_pattern(size, 0x4E56);
    let request = names.export_request(disk.path());

    let export = target.export(&request).await.unwrap();
    assert_eq!(export.subsystem_nqn, names.subsystem.as_str());
    assert!(!export.allow_any_host);
    assert_eq!(export.allowed_hosts, vec![names.host.to_string()]);
    assert_eq!(export.device_path(), Some(disk.path()));
    let namespace = &export.namespaces[0];
    assert!(namespace.enabled, "{export:?}");
    assert_eq!(namespace.uuid, names.volume.as_str());
    assert_eq!(namespace.nguid, names.volume.as_str());
    assert_eq!(export.ports.len(), 1);
    assert_eq!(export.ports[0].id, names.port().id);
    assert_eq!(export.ports[0].tcp_address(), Some(names.port().address));
    assert_ne!(
        names.nvmet_listing(),
        before,
        "the listing must see the export"
    );

    // Idempotent: the same request changes nothing and describes the same.
    let listing = names.nvmet_listing();
    assert_eq!(target.export(&request).await.unwrap(), export);
    assert_eq!(names.nvmet_listing(), listing);
    assert!(target.list_exports().await.unwrap().contains(&export));
    assert_eq!(
        target.find_export(&names.subsystem).await.unwrap(),
        Some(export.clone())
    );

    // Another host is a conflict naming the one that is allowed.
    let mut elsewhere = request.clone();
    elsewhere.host_nqn = names.other_host.clone();
    let err = target.export(&elsewhere).await.unwrap_err();
    assert!(matches!(err, AgentError::AlreadyExists { .. }), "{err:?}");
    assert!(err.to_string().contains(names.host.as_str()), "{err}");
    assert_eq!(
        names.nvmet_listing(),
        listing,
        "a refused export changes nothing"
    );

    let started = Instant::now();
    let connection = host.connect(&names.connect_request()).await.unwrap();
    let connect_took = started.elapsed();
    assert!(!connection.adopted);
    assert_eq!(connection.controller.state, "live");
    assert_eq!(
        connection.controller.subsystem_nqn,
        names.subsystem.as_str()
    );
    let device = &connection.namespace;
    assert_eq!(device.size_bytes, size);
    assert_eq!(device.nsid, 1);
    assert_eq!(device.uuid.as_deref(), Some(names.volume.as_str()));
    assert_eq!(device.path, Path::new("/dev").join(&device.name));
    // Native multipath: the disk is named after the subsystem instance and
    // sits under it; the controller holds only a hidden per-path disk.
    let controller = &connection.controller.name;
    let subsystem = subsystem_instance_of(controller);
    assert_eq!(device.name, format!("nvme{subsystem}n1"));
    let per_path = format!("nvme{subsystem}c{}n1", connection.controller.instance);
    assert!(
        Path::new("/sys/class/nvme")
            .join(controller)
            .join(&per_path)
            .exists(),
        "{controller} has no per-path disk {per_path}"
    );

    let started = Instant::now();
    assert_eq!(sha256_of(&device.path, size), sha256_of(disk.path(), size));
    let read_took = started.elapsed();

    // A second connect adopts the controller instead of connecting twice.
    let again = host.connect(&names.connect_request()).await.unwrap();
    assert!(again.adopted);
    assert_eq!(again.controller.name, connection.controller.name);
    assert_eq!(again.namespace, connection.namespace);
    let found = host.find_connection(&names.subsystem).await.unwrap();
    assert_eq!(
        found.map(|c| c.name),
        Some(connection.controller.name.clone())
    );

    host.disconnect(&connection.controller).await.unwrap();
    host.disconnect(&connection.controller).await.unwrap();
    assert_eq!(host.find_connection(&names.subsystem).await.unwrap(), None);
    assert!(
        !Path::new("/sys/block").join(&device.name).exists(),
        "{} must go with its only controller",
        device.name
    );

    target.unexport(&names.subsystem).await.unwrap();
    target.unexport(&names.subsystem).await.unwrap();
    assert_eq!(target.find_export(&names.subsystem).await.unwrap(), None);
    assert_eq!(names.nvmet_listing(), before);
    eprintln!(
        "nvme roundtrip: controller {controller} of nvme-subsys{subsystem} gave {}; connect and \
         namespace {connect_took:?}, {} MiB read over loopback in {read_took:?}",
        device.name,
        size / MIB
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_is_not_allowed_is_refused_and_nothing_stays_connected() {
    let (target, host) = (target(), host());
    let names = TestNames::new("refused", 2);
    let before = names.nvmet_listing();
    let disk = LoopDisk::with_pattern(4 * MIB, 0x4E57);
    target
        .export(&names.export_request(disk.path()))
        .await
        .unwrap();

    let mut stranger = names.connect_request();
    stranger.options.host_nqn = names.other_host.clone();
    stranger.options.host_id = names.other_host_id.clone();
    let err = host.connect(&stranger).await.unwrap_err();
    eprintln!("connect as a host that is not allowed: {err}");
    assert!(err.to_string().contains(names.other_host.as_str()), "{err}");
    let AgentError::Refused(refusal) = &err else {
        panic!("not a refusal: {err:?}");
    };
    assert_eq!(refusal.reason(), "NVME_HOST_REJECTED", "{err:?}");
    assert_eq!(host.find_connection(&names.subsystem).await.unwrap(), None);

    target.unexport(&names.subsystem).await.unwrap();
    assert_eq!(names.nvmet_listing(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_where_nothing_listens_is_unavailable() {
    let host = host();
    let names = TestNames::new("nolistener", 3);
    let err = host.connect(&names.connect_request()).await.unwrap_err();
    eprintln!("connect where nothing listens: {err}");
    assert!(matches!(err, AgentError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("ECONNREFUSED"), "{err}");
    assert_eq!(host.find_connection(&names.subsystem).await.unwrap(), None);
}

/// What the destination sees when the source unexports under it: I/O fails
/// once fast_io_fail_tmo expires, a re-export within ctrl_loss_tmo is picked
/// up by the host's reconnect, and after ctrl_loss_tmo the kernel deletes the
/// controller by itself.
#[tokio::test(flavor = "multi_thread")]
async fn unexport_under_a_connected_host_fails_io_until_exported_again() {
    let (target, host) = (target(), host());
    let names = TestNames::new("unexported", 4);
    let before = names.nvmet_listing();
    let seed = 0x4E58;
    let disk = LoopDisk::with_pattern(4 * MIB, seed);
    let request = names.export_request(disk.path());
    target.export(&request).await.unwrap();
    let mut connect = names.connect_request();
    connect.options.timeouts = fast_failing_timeouts();
    let Connection {
        controller,
        namespace,
        ..
    } = host.connect(&connect).await.unwrap();
    let offset = MIB;
    assert_eq!(
        read_block(namespace.path.clone(), offset).await.unwrap(),
        pattern(seed, offset, 4096)
    );

    // Unexport succeeds while connected: unlinking the port deletes the
    // target's controllers first.
    let started = Instant::now();
    target.unexport(&names.subsystem).await.unwrap();
    let unexport_took = started.elapsed();
    assert_eq!(names.nvmet_listing(), before);
    let lost_state = wait_for(Duration::from_secs(10), "host notices", async || {
        state_of(&host, &controller).await.filter(|s| s != "live")
    })
    .await;

    let started = Instant::now();
    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        read_block(namespace.path.clone(), offset),
    )
    .await
    .expect("a read must fail, not hang, once fast_io_fail_tmo expired");
    let io_failed_after = started.elapsed();
    let err = failed.expect_err("no data without a source");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");

    // Exported again before ctrl_loss_tmo: the host reconnects by itself.
    let started = Instant::now();
    target.export(&request).await.unwrap();
    wait_for(Duration::from_secs(20), "reconnect", async || {
        state_of(&host, &controller).await.filter(|s| s == "live")
    })
    .await;
    let reconnect_took = started.elapsed();
    assert_eq!(
        read_block(namespace.path.clone(), offset).await.unwrap(),
        pattern(seed, offset, 4096)
    );

    // Gone for longer than ctrl_loss_tmo: the kernel deletes the controller.
    target.unexport(&names.subsystem).await.unwrap();
    let started = Instant::now();
    wait_for(
        Duration::from_secs(40),
        "controller deleted after ctrl_loss_tmo",
        async || state_of(&host, &controller).await.is_none().then_some(()),
    )
    .await;
    let deleted_after = started.elapsed();
    assert!(
        !namespace.path.exists(),
        "{} must be gone",
        namespace.path.display()
    );
    host.disconnect(&controller).await.unwrap();
    assert_eq!(names.nvmet_listing(), before);
    eprintln!(
        "unexport under a host: unexport {unexport_took:?}; host state {lost_state:?}; \
         read failed with EIO after {io_failed_after:?} (fast_io_fail_tmo 2 s); re-export \
         reconnected in {reconnect_took:?} (reconnect_delay 1 s); controller deleted \
         {deleted_after:?} after the second unexport (ctrl_loss_tmo 8 s)"
    );
}

/// The end-to-end path: dm-clone hydrates a local disk from the namespace.
#[tokio::test(flavor = "multi_thread")]
async fn dm_clone_hydrates_from_an_nvme_namespace() {
    let (target, host, dm) = (target(), host(), kernel());
    let names = TestNames::new("clone", 5);
    let prefix = "dmct-nvmeclone";
    remove_all_with_prefix(&dm, prefix).await;
    let before = names.nvmet_listing();
    let size = 16 * MIB;
    let source = LoopDisk::with_pattern(size, 0x4E59);
    target
        .export(&names.export_request(source.path()))
        .await
        .unwrap();
    let connection = host.connect(&names.connect_request()).await.unwrap();

    let events = EventMonitor::start().unwrap();
    let dest = LoopDisk::new(size);
    let meta = LoopDisk::metadata(8 * MIB);
    let clone = name(prefix, "clone");
    let params = CloneParams {
        metadata: meta.dev,
        destination: dest.dev,
        source: connection.namespace.device,
        region_sectors: Sectors(8),
        hydration: true,
        discard_passdown: true,
        hydration_threshold: Some(1024),
        hydration_batch_size: Some(256),
    };
    let started = Instant::now();
    let state = dm
        .create(&clone, None, &table(size / SECTOR, DmTarget::Clone(params)))
        .await
        .unwrap();
    let status: CloneStatus = dm.status_of(&clone, 0).await.unwrap();
    if !status.is_fully_hydrated() {
        tokio::time::timeout(
            Duration::from_secs(300),
            events.wait_for_event(&clone, state.event_nr),
        )
        .await
        .expect("hydration-complete event within 300 s")
        .unwrap();
    }
    let hydrated_in = started.elapsed();
    let status: CloneStatus = dm.status_of(&clone, 0).await.unwrap();
    assert!(status.is_fully_hydrated(), "{status:?}");

    let expected = sha256_of(source.path(), size);
    assert_eq!(
        sha256_of(dest.path(), size),
        expected,
        "destination holds the source"
    );
    assert_eq!(sha256_of(&clone.mapper_path(), size), expected);

    // The clone holds the namespace: disconnecting now would break it.
    let err = host.disconnect(&connection.controller).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Refused(Refusal::NamespaceInUse { .. })),
        "{err:?}"
    );
    let holder = format!("dm-{}", state.device.minor);
    assert!(err.to_string().contains(&holder), "{err}");

    remove_all_with_prefix(&dm, prefix).await;
    host.disconnect(&connection.controller).await.unwrap();
    target.unexport(&names.subsystem).await.unwrap();
    assert_eq!(names.nvmet_listing(), before);
    eprintln!(
        "dm-clone over NVMe/TCP: {} MiB hydrated in {hydrated_in:?}",
        size / MIB
    );
}

/// The namespace identity is the volume's, so the Linux host refuses a
/// second subsystem exporting the same volume while the first is connected
/// ("ignoring nsid 1 because of duplicate IDs"); the connect that created the
/// useless controller deletes it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_cannot_connect_two_exports_of_one_volume() {
    let (target, host) = (target(), host());
    let names = TestNames::new("duplicate", 6);
    let before = names.nvmet_listing();
    let first_disk = LoopDisk::with_pattern(4 * MIB, 1);
    let second_disk = LoopDisk::with_pattern(4 * MIB, 2);
    target
        .export(&names.export_request(first_disk.path()))
        .await
        .unwrap();
    let first = host.connect(&names.connect_request()).await.unwrap();

    // The same volume exported by "another node", on another port.
    let second_nqn =
        subsystem_nqn(&format!("{TEST_NQN_BASE}:duplicate:node-z"), &names.volume).unwrap();
    let mut second_export = names.export_request(second_disk.path());
    second_export.subsystem_nqn = second_nqn.clone();
    second_export.port = PortSpec {
        id: PORT_ID_BASE + 7,
        address: TcpAddress::new(IpAddr::V4(Ipv4Addr::LOCALHOST), TRSVCID_BASE + 7),
    };
    target.export(&second_export).await.unwrap();
    let mut second_connect = names.connect_request();
    second_connect.options.subsystem_nqn = second_nqn.clone();
    second_connect.options.address = second_export.port.address;
    second_connect.namespace_timeout = Duration::from_secs(5);
    let err = host.connect(&second_connect).await.unwrap_err();
    eprintln!("second export of one volume: {err}");
    assert!(matches!(err, AgentError::Unavailable { .. }), "{err:?}");
    let refused = err
        .to_string()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let reason = format!("{refused}: ignoring nsid 1 because of duplicate IDs");
    assert!(
        kernel_log().contains(&reason),
        "the kernel log lacks {reason:?}"
    );
    assert_eq!(host.find_connection(&second_nqn).await.unwrap(), None);

    host.disconnect(&first.controller).await.unwrap();
    target.unexport(&second_nqn).await.unwrap();
    target.unexport(&names.subsystem).await.unwrap();
    assert_eq!(names.nvmet_listing(), before);
    assert!(
        !Path::new(NVMET_CONFIGFS)
            .join(format!("ports/{}", PORT_ID_BASE + 7))
            .exists(),
        "the second port must be removed with its last subsystem"
    );
}

/// The configfs rules the export and unexport order rely on (dm-facts.md
/// section 6), checked with raw calls against a live export, plus the
/// defaults of fresh objects. Nothing here may change the export.
#[tokio::test(flavor = "multi_thread")]
async fn configfs_refuses_changes_to_live_objects_and_out_of_order_teardown() {
    let target = target();
    let names = TestNames::new("facts", 8);
    let before = names.nvmet_listing();
    let disk = LoopDisk::new(MIB);
    let export = target
        .export(&names.export_request(disk.path()))
        .await
        .unwrap();
    let root = Path::new(NVMET_CONFIGFS);
    let subsystem = root.join("subsystems").join(names.subsystem.as_str());
    let namespace = subsystem.join("namespaces/1");
    let port = root.join(format!("ports/{}", export.ports[0].id));
    let host = root.join("hosts").join(names.host.as_str());
    let other_uuid = "11111111-2222-4333-8444-555555555555";

    // An enabled namespace keeps its device and identity.
    assert_eq!(
        write_errno(&namespace.join("device_path"), "/dev/null"),
        Some(Errno::EBUSY)
    );
    assert_eq!(
        write_errno(&namespace.join("device_uuid"), other_uuid),
        Some(Errno::EBUSY)
    );
    assert_eq!(
        write_errno(&namespace.join("device_nguid"), other_uuid),
        Some(Errno::EBUSY)
    );
    // A listening port keeps its address.
    assert_eq!(
        write_errno(&port.join("addr_trsvcid"), "4420"),
        Some(Errno::EACCES)
    );
    // A subsystem with allowed hosts cannot be opened to any host.
    assert_eq!(
        write_errno(&subsystem.join("attr_allow_any_host"), "1"),
        Some(Errno::EINVAL)
    );
    // Link targets cannot be removed before their links.
    assert_eq!(rmdir_errno(&subsystem), Some(Errno::EBUSY));
    assert_eq!(rmdir_errno(&host), Some(Errno::EBUSY));
    let port_rmdir = rmdir_errno(&port);
    assert!(
        port_rmdir.is_some(),
        "a port with a linked subsystem must stay"
    );
    assert_eq!(
        target.find_export(&names.subsystem).await.unwrap(),
        Some(export)
    );

    // Fresh objects: closed to any host, no port address.
    let bare = root
        .join("subsystems")
        .join(format!("{TEST_NQN_BASE}:facts:bare"));
    fs::create_dir(&bare).unwrap();
    let allow_any_host = fs::read_to_string(bare.join("attr_allow_any_host")).unwrap();
    fs::create_dir(bare.join("namespaces/1")).unwrap();
    let bare_ns = |attr: &str| fs::read_to_string(bare.join("namespaces/1").join(attr)).unwrap();
    let (ns_uuid, ns_nguid, ns_enable) = (
        bare_ns("device_uuid"),
        bare_ns("device_nguid"),
        bare_ns("enable"),
    );
    fs::remove_dir(bare.join("namespaces/1")).unwrap();
    fs::remove_dir(&bare).unwrap();
    let bare_port = root.join(format!("ports/{}", PORT_ID_BASE + 9));
    fs::create_dir(&bare_port).unwrap();
    let port_attr = |attr: &str| fs::read_to_string(bare_port.join(attr)).unwrap();
    let port_defaults = [
        port_attr("addr_trtype"),
        port_attr("addr_adrfam"),
        port_attr("addr_traddr"),
        port_attr("addr_trsvcid"),
    ];
    fs::remove_dir(&bare_port).unwrap();
    assert_eq!(allow_any_host, "0\n");
    assert_eq!(ns_enable, "0\n");
    assert_eq!(port_defaults, ["\n", "\n", "\n", "\n"].map(String::from));

    target.unexport(&names.subsystem).await.unwrap();
    assert_eq!(names.nvmet_listing(), before);
    eprintln!(
        "configfs facts: rmdir of a linked port: {port_rmdir:?}; a fresh namespace has uuid \
         {:?} and nguid {:?}",
        ns_uuid.trim(),
        ns_nguid.trim()
    );
}

/// Export and unexport converge: an export interrupted half-way (an agent
/// crash) is completed by the next export, an interrupted unexport by the
/// next unexport.
#[tokio::test(flavor = "multi_thread")]
async fn interrupted_export_and_unexport_are_completed_by_the_next_call() {
    let (target, host) = (target(), host());
    let names = TestNames::new("interrupted", 10);
    let before = names.nvmet_listing();
    let size = 4 * MIB;
    let disk = LoopDisk::with_pattern(size, 0x4E5A);
    let request = names.export_request(disk.path());
    let root = Path::new(NVMET_CONFIGFS);
    let subsystem = root.join("subsystems").join(names.subsystem.as_str());
    let port = root.join(format!("ports/{}", request.port.id));

    // Stopped after the namespace's device path and an empty port directory.
    fs::create_dir(&subsystem).unwrap();
    fs::create_dir(subsystem.join("namespaces/1")).unwrap();
    assert_eq!(
        write_errno(
            &subsystem.join("namespaces/1/device_path"),
            &disk.path().display().to_string()
        ),
        None
    );
    fs::create_dir(&port).unwrap();
    let export = target.export(&request).await.unwrap();
    assert!(export.namespaces[0].enabled, "{export:?}");
    assert_eq!(export.allowed_hosts, vec![names.host.to_string()]);
    assert_eq!(export.ports[0].tcp_address(), Some(request.port.address));
    let connection = host.connect(&names.connect_request()).await.unwrap();
    assert_eq!(
        sha256_of(&connection.namespace.path, size),
        sha256_of(disk.path(), size)
    );
    host.disconnect(&connection.controller).await.unwrap();

    // Stopped after unlinking the port and disabling the namespace.
    fs::remove_file(port.join("subsystems").join(names.subsystem.as_str())).unwrap();
    assert_eq!(
        write_errno(&subsystem.join("namespaces/1/enable"), "0"),
        None
    );
    target.unexport(&names.subsystem).await.unwrap();
    // The port lost its last subsystem before the unexport saw it: it stays,
    // idle, until an export reuses it (it has the same address).
    assert!(port.exists());
    let again = target.export(&request).await.unwrap();
    assert_eq!(again.ports, export.ports);
    target.unexport(&names.subsystem).await.unwrap();
    assert_eq!(names.nvmet_listing(), before);
}

/// The NVMe specification allows 223-byte NQNs; the 6.1 host driver does not
/// (`strlen >= NVMF_NQN_SIZE`), which is why `Nqn` stops at 222 bytes. A
/// 222-byte NQN passes the option parser and fails only at the TCP connect.
#[test]
fn the_host_driver_takes_222_byte_nqns_but_not_223() {
    // A read without a write lists the accepted tokens behind dummy ids.
    let mut listing = String::new();
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/nvme-fabrics")
        .and_then(|mut fabrics| fabrics.read_to_string(&mut listing))
        .unwrap_or_else(|err| panic!("this test needs /dev/nvme-fabrics (nvme-tcp): {err}"));
    assert!(listing.starts_with("instance=-1,cntlid=-1,"), "{listing}");
    assert!(listing.contains(",fast_io_fail_tmo=%d"), "{listing}");

    let head = format!("{TEST_NQN_BASE}:long:");
    for (len, errno) in [
        (MAX_NQN_BYTES, nix::libc::ECONNREFUSED),
        (MAX_NQN_BYTES + 1, nix::libc::EINVAL),
    ] {
        let nqn = format!("{head}{}", "x".repeat(len - head.len()));
        let options = format!(
            "transport=tcp,traddr=127.0.0.1,trsvcid={},nqn={nqn}",
            TRSVCID_BASE + TEST_PORTS - 1
        );
        let mut fabrics = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/nvme-fabrics")
            .unwrap_or_else(|err| panic!("this test needs /dev/nvme-fabrics (nvme-tcp): {err}"));
        let err = fabrics
            .write(options.as_bytes())
            .expect_err("nothing listens there");
        assert_eq!(err.raw_os_error(), Some(errno), "{len} bytes: {err}");
    }
}

/// DH-HMAC-CHAP on kernels whose target authenticates hosts (6.12 here):
/// the allowed host with the export's secrets reads the namespace; the
/// same host NQN without secrets, with a wrong host secret or a wrong
/// controller secret gets nothing and leaves no controller. On a kernel
/// without (Debian 12's 6.1) an export with secrets is refused, naming
/// nvme.auth, and leaves configfs as it found it.
#[tokio::test(flavor = "multi_thread")]
async fn an_authenticated_export_admits_only_the_host_holding_its_secrets() {
    let (target, host) = (target(), host());
    let names = TestNames::new("dhchap", 11);
    let seed = 0x4E5A;
    let disk = LoopDisk::with_pattern(4 * MIB, seed);
    let keys = DhchapKeys::generate().unwrap();
    let request = ExportRequest {
        auth: Some(keys.clone()),
        ..names.export_request(disk.path())
    };
    let authenticates = target.authenticates_hosts().await.unwrap();
    assert_eq!(
        authenticates,
        crate::support::nvme_auth_policy() == "required"
    );
    if !authenticates {
        let err = target.export(&request).await.unwrap_err();
        eprintln!("an authenticated export on this kernel: {err}");
        assert!(err.to_string().contains("nvme.auth"), "{err}");
        target.unexport(&names.subsystem).await.unwrap();
        names.assert_subsystem_and_host_gone();
        return;
    }
    target.export(&request).await.unwrap();
    let host_entry = Path::new(NVMET_CONFIGFS)
        .join("hosts")
        .join(names.host.as_str());
    assert_eq!(
        std::fs::read_to_string(host_entry.join("dhchap_hash"))
            .unwrap()
            .trim(),
        "hmac(sha256)"
    );

    let other = DhchapKeys::generate().unwrap();
    for (case, auth) in [
        ("no secrets", None),
        (
            "a wrong host secret",
            Some(DhchapKeys {
                host: other.host.clone(),
                ctrl: keys.ctrl.clone(),
            }),
        ),
        (
            "a wrong controller secret",
            Some(DhchapKeys {
                host: keys.host.clone(),
                ctrl: other.ctrl.clone(),
            }),
        ),
    ] {
        let mut connect = names.connect_request();
        connect.options.auth = auth;
        let err = host.connect(&connect).await.unwrap_err();
        eprintln!("connect with {case}: {err}");
        for secret in [&keys.host, &keys.ctrl, &other.host, &other.ctrl] {
            assert!(
                !err.to_string().contains(secret.expose()),
                "{case}: a secret in {err}"
            );
        }
        assert_eq!(
            host.find_connection(&names.subsystem).await.unwrap(),
            None,
            "{case}: nothing stays connected"
        );
    }

    let mut connect = names.connect_request();
    connect.options.auth = Some(keys);
    let Connection {
        controller,
        namespace,
        ..
    } = host.connect(&connect).await.unwrap();
    assert_eq!(
        read_block(namespace.path.clone(), MIB).await.unwrap(),
        pattern(seed, MIB, 4096)
    );
    host.disconnect(&controller).await.unwrap();
    target.unexport(&names.subsystem).await.unwrap();
    // Agents of other tests may export meanwhile: look at ours only.
    names.assert_subsystem_and_host_gone();
}
