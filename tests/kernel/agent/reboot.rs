//! A host reboot: the state directory and the pool live on two virtio disks
//! that outlive the guest, and a third disk is the source of a volume moving
//! here. The first boot creates volumes, writes them, starts the move and is
//! cut off mid-hydration (no clean stop, devices still active); the second
//! boot, on the same disks, must find every volume, rebuild every device,
//! resume the move where the clone's metadata says and read the same data.
//!
//! `tests/run-all` runs the two halves in two guests with
//! `DMCLONE_REBOOT_STATE_DISK`, `DMCLONE_REBOOT_POOL_DISK` and
//! `DMCLONE_REBOOT_SOURCE_DISK` set; the normal run skips this module.
//! Without those variables both tests fail.

use std::path::{Path, PathBuf};

use dmclone::api::proto::v1::{
    HydrationKnobs, StartTransferRequest, TransferRef, TransferState,
    start_transfer_request::Source, transfers_client::TransfersClient,
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

fn args(pool: &Path) -> Vec<String> {
    vec!["--pool-device".into(), pool.display().to_string()]
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
    // A volume moving here from the third disk, slowly, cut off half-way.
    let source = disk("DMCLONE_REBOOT_SOURCE_DISK");
    fill(&source, MOVING_SEED, MOVING_MIB * MIB);
    let mut transfers = TransfersClient::new(agent.channel().await);
    transfers
        .start_transfer(StartTransferRequest {
            transfer_id: TRANSFER.into(),
            volume_id: MOVING.into(),
            size_bytes: MOVING_MIB * MIB,
            source: Some(Source::DevicePath(source.display().to_string())),
            deferred: false,
            knobs: Some(HydrationKnobs {
                region_bytes: 64 * 1024,
                hydration_threshold: 1,
                hydration_batch_size: 1,
                max_bytes_per_second: 16 * MIB,
            }),
        })
        .await
        .unwrap();
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
    // Three thin devices and two public devices, and the moving volume's
    // clone stack, were rebuilt.
    assert!(log.contains("rebuilt=6"), "{log}");
    assert!(log.contains("quarantined=0"), "{log}");

    // The move resumes from the clone's metadata, not from zero.
    let before: u64 = std::fs::read_to_string(dir.join("hydrated-before-reboot"))
        .unwrap()
        .parse()
        .unwrap();
    let mut transfers = TransfersClient::new(agent.channel().await);
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
    transfers
        .throttle_transfer(dmclone::api::proto::v1::ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                hydration_threshold: 64,
                hydration_batch_size: 16,
                max_bytes_per_second: u64::MAX,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let now = transfers
            .get_transfer(TransferRef {
                transfer_id: TRANSFER.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if now.state() == TransferState::Done {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let moving = Path::new("/dev/mapper").join(format!("{PREFIX}-{MOVING}"));
    for offset in (0..MOVING_MIB * MIB).step_by(MIB as usize) {
        assert_eq!(
            read_at(&moving, offset, MIB as usize),
            pattern(MOVING_SEED, offset, MIB as usize),
            "moved volume at {offset}"
        );
    }

    let mut volumes = agent.volumes().await;
    assert_eq!(list(&mut volumes).await.len(), VOLUMES.len() + 1);
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
}
