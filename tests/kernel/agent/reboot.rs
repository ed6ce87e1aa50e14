//! A host reboot: the state directory and the pool live on two virtio disks
//! that outlive the guest, and a third disk is the source of a volume moving
//! here. The first boot creates volumes, writes them, starts the move and is
//! cut off mid-hydration (no clean stop, devices still active); the second
//! boot, on the same disks, must find every volume, rebuild every device,
//! resume the move where the clone's metadata says and read the same data.
//! A second move copies from a device-mapper device that the reboot takes
//! away: that transfer comes back DEGRADED while everything else is served,
//! and finishes with equal data once its source is there again. Beside
//! them, a chain of three more agents (A→B→C, C copying through B while B
//! copies from A) is cut off mid-copy and converges after the reboot.
//!
//! `tests/run-all` runs the two halves in two guests with
//! `DMCLONE_REBOOT_STATE_DISK`, `DMCLONE_REBOOT_POOL_DISK` and
//! `DMCLONE_REBOOT_SOURCE_DISK` set; the normal run skips this module.
//! Without those variables both tests fail.

use std::path::{Path, PathBuf};

use dmclone::{
    api::proto::v1::{
        HydrationKnobs, StartTransferRequest, TransferRef, TransferState,
        start_transfer_request::Source, transfers_client::TransfersClient,
    },
    dm::{
        names::DeviceName,
        table::{DevRef, Linear, Target},
    },
    units::Sectors,
};

use super::{
    api::{create, get, list, publish, unpublish},
    fixture::AgentProcess,
};
use crate::support::*;

const MOVING: &str = "5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d04";
const TRANSFER: &str = "5b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d05";
const MOVING_MIB: u64 = 96;
const MOVING_SEED: u64 = 77;

/// The move whose source the reboot takes away: a linear device over the
/// source disk's last 32 MiB, with a name outside the agent's prefix.
const LOST: &str = "5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d06";
const LOST_TRANSFER: &str = "5b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d07";
const LOST_MIB: u64 = 32;
const LOST_SEED: u64 = 78;
const LOST_SOURCE: &str = "dmctrsrc-lost";

const PREFIX: &str = "dmctreboot";
const MOUNT: &str = "/tmp/reboot-state";
const VOLUMES: [(&str, u64, bool); 3] = [
    ("5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01", 48, true),
    ("5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d02", 24, true),
    ("5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d03", 16, false),
];

fn disk(variable: &str) -> PathBuf {
    let path = std::env::var(variable).unwrap_or_else(|_| {
        panic!(
            "{variable} is not set: the reboot tests need two virtio disks; tests/run-all runs them"
        )
    });
    assert!(
        Path::new(&path).exists(),
        "{variable}={path} does not exist"
    );
    PathBuf::from(path)
}

#[allow(clippy::disallowed_types)] // formatting a disk is test setup
fn mkfs(device: &Path) {
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(device)
        .status()
        .expect("run mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 {} failed", device.display());
}

fn mount_state(device: &Path) -> PathBuf {
    std::fs::create_dir_all(MOUNT).unwrap();
    nix::mount::mount(
        Some(device),
        MOUNT,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|err| panic!("mount {} on {MOUNT}: {err}", device.display()));
    Path::new(MOUNT).join("agent")
}

/// A chain A→B→C of three agents beside the main one, each with its state
/// and a pool file under the state disk: cut off while B and C both copy
/// (C through B), so that every host of the chain reboots mid-copy.
mod chain {
    use std::path::Path;

    use dmclone::api::proto::v1::{HydrationKnobs, TransferState};

    use super::super::{
        api::{create, get, publish, unpublish},
        fixture::AgentProcess,
        moves::{
            Ids, agent_args, export, fill, get_transfer, public, start_move_with, transfers,
            wait_released,
        },
    };
    use crate::support::*;

    const IDS_AB: Ids = Ids {
        volume: "5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d08",
        transfer: "5b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d08",
    };
    const IDS_BC: Ids = Ids {
        volume: IDS_AB.volume,
        transfer: "5b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d09",
    };
    // What `start_move_with` moves.
    const SIZE: u64 = 64 * MIB;
    const SEED: u64 = 79;
    /// Written on B while the volume arrives there.
    const ON_B: (u64, u64) = (9 * MIB + 4096, 80);
    const HOSTS: [(&str, u16, &str); 3] = [
        ("dmctrcha", 4481, "0d000000-0000-4000-8000-000000000481"),
        ("dmctrchb", 4482, "0d000000-0000-4000-8000-000000000482"),
        ("dmctrchc", 4483, "0d000000-0000-4000-8000-000000000483"),
    ];

    /// The three agents, on their state under `root` (made on first use).
    async fn start(root: &Path) -> Vec<AgentProcess> {
        let mut agents = Vec::new();
        for (prefix, port, uuid) in HOSTS {
            let args = agent_args(port, uuid, &[]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agents.push(AgentProcess::start_in(&root.join(prefix), prefix, &args).await);
        }
        agents
    }

    fn slow() -> Option<HydrationKnobs> {
        Some(HydrationKnobs {
            max_bytes_per_second: MIB,
            ..HydrationKnobs::default()
        })
    }

    /// First boot: A→B (slow), written on B, B→C (slow) while B copies.
    /// The caller kills the agents when the guest goes down.
    pub(super) async fn leave_mid_copy(root: &Path) -> Vec<AgentProcess> {
        let agents = start(root).await;
        let (a, b, c) = (&agents[0], &agents[1], &agents[2]);
        let mut volumes_a = a.volumes().await;
        create(&mut volumes_a, IDS_AB.volume, SIZE).await.unwrap();
        let path = publish(&mut volumes_a, IDS_AB.volume).await.unwrap();
        fill(Path::new(&path), SEED, SIZE);
        unpublish(&mut volumes_a, IDS_AB.volume).await.unwrap();
        let to_b = export(IDS_AB, a, b).await.unwrap();
        start_move_with(IDS_AB, a, &to_b, b, false, slow())
            .await
            .unwrap();
        write_at(&public(IDS_AB, b), ON_B.0, &pattern(ON_B.1, 0, 64 * 1024));
        unpublish(&mut b.volumes().await, IDS_AB.volume)
            .await
            .unwrap();
        let to_c = export(IDS_BC, b, c).await.unwrap();
        start_move_with(IDS_BC, b, &to_c, c, false, slow())
            .await
            .unwrap();
        while get_transfer(IDS_BC, c).await.bytes_hydrated < 4 * MIB {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let (b_now, c_now) = (get_transfer(IDS_AB, b).await, get_transfer(IDS_BC, c).await);
        assert_eq!(b_now.state(), TransferState::Hydrating, "{b_now:?}");
        assert!(c_now.bytes_hydrated < SIZE, "{c_now:?}");
        agents
    }

    /// Second boot: the three agents start again from their disks; the
    /// chain resumes (B's clone comes back once A exports again, and C's
    /// connection once B does), C ends with every byte, B passes on and A
    /// is released.
    pub(super) async fn finish(root: &Path) {
        let agents = start(root).await;
        let (a, b, c) = (&agents[0], &agents[1], &agents[2]);
        transfers(c)
            .await
            .throttle_transfer(dmclone::api::proto::v1::ThrottleTransferRequest {
                transfer_id: IDS_BC.transfer.into(),
                knobs: Some(HydrationKnobs {
                    max_bytes_per_second: 1 << 40,
                    ..HydrationKnobs::default()
                }),
            })
            .await
            .unwrap();
        wait_released(IDS_BC, c).await;
        let mut expected = pattern(SEED, 0, SIZE as usize);
        let at = ON_B.0 as usize;
        expected[at..at + 64 * 1024].copy_from_slice(&pattern(ON_B.1, 0, 64 * 1024));
        assert_eq!(
            sha256_of(&public(IDS_BC, c), SIZE),
            hex(&<sha2::Sha256 as sha2::Digest>::digest(&expected))
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let passed = get_transfer(IDS_AB, b).await;
            if passed.source_released {
                assert!(!passed.passed_on_to.is_empty(), "{passed:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{passed:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        for holder in [a, b] {
            let gone = get(&mut holder.volumes().await, IDS_AB.volume).await;
            assert_eq!(gone.unwrap_err().code(), tonic::Code::NotFound);
        }
        for agent in agents {
            agent.destroy().await;
        }
    }
}

fn args(pool: &Path) -> Vec<String> {
    vec!["--pool-device".into(), pool.display().to_string()]
}

/// The lost move's source: the source disk's last `LOST_MIB` MiB, mapped
/// again on each boot at the same place.
async fn map_lost_source() -> PathBuf {
    let disk = disk("DMCLONE_REBOOT_SOURCE_DISK");
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&disk).unwrap());
    let device = DevRef::from((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ));
    let target = Target::Linear(Linear {
        device,
        offset: Sectors(MOVING_MIB * MIB / 512),
    });
    let name = DeviceName::new(LOST_SOURCE).unwrap();
    kernel()
        .create(&name, None, &table(LOST_MIB * MIB / 512, target))
        .await
        .unwrap();
    name.mapper_path()
}

async fn start_slow_move(
    transfers: &mut TransfersClient<tonic::transport::Channel>,
    (transfer, volume, mib): (&str, &str, u64),
    source: &Path,
    rate: u64,
) {
    transfers
        .start_transfer(StartTransferRequest {
            transfer_id: transfer.into(),
            volume_id: volume.into(),
            size_bytes: mib * MIB,
            source: Some(Source::DevicePath(source.display().to_string())),
            deferred: false,
            knobs: Some(HydrationKnobs {
                region_bytes: 64 * 1024,
                hydration_threshold: 1,
                hydration_batch_size: 1,
                max_bytes_per_second: rate,
            }),
            leave_snapshots: false,
        })
        .await
        .unwrap();
}

async fn transfer_now(
    transfers: &mut TransfersClient<tonic::transport::Channel>,
    id: &str,
) -> dmclone::api::proto::v1::Transfer {
    transfers
        .get_transfer(TransferRef {
            transfer_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Lifts a slow move's limits, so it ends soon.
async fn copy_at_full_speed(transfers: &mut TransfersClient<tonic::transport::Channel>, id: &str) {
    transfers
        .throttle_transfer(dmclone::api::proto::v1::ThrottleTransferRequest {
            transfer_id: id.into(),
            knobs: Some(HydrationKnobs {
                hydration_threshold: 64,
                hydration_batch_size: 16,
                max_bytes_per_second: u64::MAX,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

async fn wait_done(transfers: &mut TransfersClient<tonic::transport::Channel>, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let now = transfer_now(transfers, id).await;
        if now.state() == TransferState::Done {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn assert_moved(volume: &str, seed: u64, mib: u64) {
    let path = Path::new("/dev/mapper").join(format!("{PREFIX}-{volume}"));
    for offset in (0..mib * MIB).step_by(MIB as usize) {
        assert_eq!(
            read_at(&path, offset, MIB as usize),
            pattern(seed, offset, MIB as usize),
            "moved volume {volume} at {offset}"
        );
    }
}

fn fill(path: &Path, seed: u64, size: u64) {
    for offset in (0..size).step_by(MIB as usize) {
        write_at(path, offset, &pattern(seed, offset, MIB as usize));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn first_boot_leaves_volumes_on_the_disks() {
    let (state, pool) = (
        disk("DMCLONE_REBOOT_STATE_DISK"),
        disk("DMCLONE_REBOOT_POOL_DISK"),
    );
    mkfs(&state);
    let dir = mount_state(&state);
    let args = args(&pool);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = AgentProcess::start_in(&dir, PREFIX, &args).await;
    let mut volumes = agent.volumes().await;
    for (seed, (id, mib, stays_published)) in VOLUMES.iter().enumerate() {
        create(&mut volumes, id, mib * MIB).await.unwrap();
        let path = publish(&mut volumes, id).await.unwrap();
        fill(Path::new(&path), seed as u64, mib * MIB);
        if !stays_published {
            unpublish(&mut volumes, id).await.unwrap();
        }
    }
    let chain = chain::leave_mid_copy(Path::new(MOUNT)).await;
    // A volume moving here from the third disk, slowly, cut off half-way.
    let source = disk("DMCLONE_REBOOT_SOURCE_DISK");
    fill(&source, MOVING_SEED, MOVING_MIB * MIB);
    let mut transfers = TransfersClient::new(agent.channel().await);
    let lost_source = map_lost_source().await;
    fill(&lost_source, LOST_SEED, LOST_MIB * MIB);
    start_slow_move(
        &mut transfers,
        (LOST_TRANSFER, LOST, LOST_MIB),
        &lost_source,
        MIB,
    )
    .await;
    start_slow_move(
        &mut transfers,
        (TRANSFER, MOVING, MOVING_MIB),
        &source,
        16 * MIB,
    )
    .await;
    let hydrated = loop {
        let now = transfers
            .get_transfer(TransferRef {
                transfer_id: TRANSFER.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(now.state(), TransferState::Hydrating, "{now:?}");
        if now.regions_hydrated * 5 >= now.regions_total * 2 {
            break now.regions_hydrated;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // Cut off: no clean stop, devices stay active until the guest powers off.
    agent.kill9().await;
    for mut chained in chain {
        chained.kill9().await;
    }
    std::fs::write(dir.join("hydrated-before-reboot"), hydrated.to_string()).unwrap();
    nix::unistd::sync();
}

#[tokio::test(flavor = "multi_thread")]
async fn second_boot_rebuilds_every_volume_with_its_data() {
    let (state, pool) = (
        disk("DMCLONE_REBOOT_STATE_DISK"),
        disk("DMCLONE_REBOOT_POOL_DISK"),
    );
    let dir = mount_state(&state);
    assert!(
        kernel()
            .list()
            .await
            .unwrap()
            .iter()
            .all(|d| !d.name.starts_with(PREFIX)),
        "a fresh boot has no devices"
    );
    let args = args(&pool);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start_in(&dir, PREFIX, &args).await;
    let log = agent.log();
    // Three thin devices and two public devices, the moving volume's clone
    // stack, and the lost move's public device (counted as it was tried)
    // were rebuilt; the lost move, whose source is gone, is degraded.
    assert!(log.contains("rebuilt=7"), "{log}");
    assert!(log.contains("quarantined=0"), "{log}");
    assert!(log.contains("degraded=1"), "{log}");

    // The move resumes from the clone's metadata, not from zero.
    let before: u64 = std::fs::read_to_string(dir.join("hydrated-before-reboot"))
        .unwrap()
        .parse()
        .unwrap();
    let mut transfers = TransfersClient::new(agent.channel().await);
    let lost = transfer_now(&mut transfers, LOST_TRANSFER).await;
    assert_eq!(lost.state(), TransferState::Degraded, "{lost:?}");
    assert!(lost.message.contains(LOST_SOURCE), "{lost:?}");
    let resumed = transfers
        .get_transfer(TransferRef {
            transfer_id: TRANSFER.into(),
        })
        .await
        .unwrap()
        .into_inner();
    // At most the last second of copies was uncommitted when the power went.
    assert!(
        resumed.regions_hydrated + 300 >= before && resumed.regions_hydrated > 0,
        "{resumed:?} vs {before} before the reboot"
    );
    copy_at_full_speed(&mut transfers, TRANSFER).await;
    wait_done(&mut transfers, TRANSFER).await;
    assert_moved(MOVING, MOVING_SEED, MOVING_MIB);

    // While its devices are not back, steering it says so and changes
    // nothing.
    let unavailable = transfers
        .pause_transfer(TransferRef {
            transfer_id: LOST_TRANSFER.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        unavailable.code(),
        tonic::Code::Unavailable,
        "{unavailable:?}"
    );
    // The lost move's source is back: its monitor rebuilds the stack (it
    // looks at most every 5 s), the copy resumes and ends with the source's
    // data.
    map_lost_source().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = transfer_now(&mut transfers, LOST_TRANSFER).await;
        if now.state() != TransferState::Degraded {
            assert_eq!(now.state(), TransferState::Hydrating, "{now:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never rebuilt: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    copy_at_full_speed(&mut transfers, LOST_TRANSFER).await;
    wait_done(&mut transfers, LOST_TRANSFER).await;
    assert_moved(LOST, LOST_SEED, LOST_MIB);

    let mut volumes = agent.volumes().await;
    assert_eq!(list(&mut volumes).await.len(), VOLUMES.len() + 2);
    for (seed, (id, mib, published)) in VOLUMES.iter().enumerate() {
        let volume = get(&mut volumes, id).await.unwrap();
        assert_eq!(
            (volume.size_bytes, volume.published),
            (mib * MIB, *published),
            "{id}"
        );
        let path = publish(&mut volumes, id).await.unwrap();
        for offset in (0..mib * MIB).step_by(MIB as usize) {
            assert_eq!(
                read_at(Path::new(&path), offset, MIB as usize),
                pattern(seed as u64, offset, MIB as usize),
                "{id} at {offset}"
            );
        }
    }
    agent.destroy().await;
    let _ = kernel()
        .remove(&DeviceName::new(LOST_SOURCE).unwrap())
        .await;
    chain::finish(Path::new(MOUNT)).await;
}
