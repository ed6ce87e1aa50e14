//! Volume RPCs end to end: round trips, idempotency, bad input, concurrency.

use std::{collections::BTreeMap, os::unix::fs::FileTypeExt, path::Path, sync::Arc};

use dmclone::api::proto::v1::{
    CreateSnapshotRequest, CreateVolumeRequest, DeleteVolumeRequest, ExtendVolumeRequest,
    GetChangedBlocksRequest, GetNodeInfoRequest, GetVolumeRequest, ListVolumesRequest,
    MarkCheckpointRequest, PublishVolumeRequest, StartTransferRequest, UnpublishVolumeRequest,
    Volume, VolumeState, snapshots_client::SnapshotsClient, transfers_client::TransfersClient,
    volumes_client::VolumesClient,
};
use tonic::{Code, transport::Channel};

use super::fixture::AgentProcess;
use crate::support::*;

pub const VOL_A: &str = "0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11";
pub const VOL_B: &str = "1c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d12";

pub async fn create(
    client: &mut VolumesClient<Channel>,
    id: &str,
    size: u64,
) -> Result<Volume, tonic::Status> {
    client
        .create_volume(CreateVolumeRequest {
            volume_id: id.into(),
            size_bytes: size,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get(client: &mut VolumesClient<Channel>, id: &str) -> Result<Volume, tonic::Status> {
    client
        .get_volume(GetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn publish(
    client: &mut VolumesClient<Channel>,
    id: &str,
) -> Result<String, tonic::Status> {
    client
        .publish_volume(PublishVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().device_path)
}

pub async fn unpublish(client: &mut VolumesClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    client
        .unpublish_volume(UnpublishVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .map(|_| ())
}

pub async fn extend(
    client: &mut VolumesClient<Channel>,
    id: &str,
    size: u64,
) -> Result<Volume, tonic::Status> {
    client
        .extend_volume(ExtendVolumeRequest {
            volume_id: id.into(),
            new_size_bytes: size,
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn delete(client: &mut VolumesClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    client
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .map(|_| ())
}

pub async fn list(client: &mut VolumesClient<Channel>) -> BTreeMap<String, Volume> {
    client
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("list volumes")
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| (v.volume_id.clone(), v))
        .collect()
}

/// Data and metadata bytes the pool has allocated.
pub async fn pool_used(agent: &AgentProcess) -> (u64, u64) {
    let info = agent
        .node()
        .await
        .get_node_info(GetNodeInfoRequest {})
        .await
        .expect("node info")
        .into_inner();
    let pool = info.pool.expect("pool usage");
    (pool.data_used_bytes, pool.metadata_used_bytes)
}

pub fn device_size(path: &Path) -> u64 {
    use std::io::Seek;
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .unwrap_or_else(|err| panic!("size of {}: {err}", path.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_volume_rpc_round_trips_against_the_kernel() {
    let agent = AgentProcess::start("dmctapi").await;
    let mut volumes = agent.volumes().await;

    let info = agent
        .node()
        .await
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        !info.node_id.is_empty() && !info.kernel_release.is_empty(),
        "{info:?}"
    );
    assert_eq!(info.api_version, "dmclone.v1");
    for target in ["clone", "era", "thin-pool", "thin"] {
        assert!(
            info.targets.iter().any(|t| t.name == target),
            "{target} missing: {info:?}"
        );
    }
    let pool = info.pool.unwrap();
    assert!(
        pool.data_total_bytes > 900 * MIB && pool.data_total_bytes < 1024 * MIB,
        "{pool:?}"
    );
    assert!(pool.metadata_total_bytes >= 16 * MIB, "{pool:?}");
    assert_eq!(pool.health, "healthy");

    // A size that is not a whole MiB is rounded up (the documented unit).
    let created = create(&mut volumes, VOL_A, 64 * MIB + 1).await.unwrap();
    assert_eq!(created.size_bytes, 65 * MIB);
    assert_eq!(created.state(), VolumeState::Available);
    assert!(!created.published && created.device_path.is_empty());
    assert_eq!(created.allocated_bytes, 0);
    assert_eq!(get(&mut volumes, VOL_A).await.unwrap(), created);
    assert_eq!(list(&mut volumes).await.len(), 1);

    let path = publish(&mut volumes, VOL_A).await.unwrap();
    assert_eq!(path, format!("/dev/mapper/dmctapi-{VOL_A}"));
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(device_size(Path::new(&path)), 65 * MIB);
    let data = pattern(11, 0, 4 * MIB as usize);
    write_at(Path::new(&path), 60 * MIB, &data);
    let published = get(&mut volumes, VOL_A).await.unwrap();
    assert!(published.published && published.device_path == path);
    assert_eq!(published.allocated_bytes, 4 * MIB, "{published:?}");

    // Extend while published: the device grows in place, data stays.
    let extended = extend(&mut volumes, VOL_A, 128 * MIB).await.unwrap();
    assert_eq!(extended.size_bytes, 128 * MIB);
    assert_eq!(device_size(Path::new(&path)), 128 * MIB);
    assert_eq!(read_at(Path::new(&path), 60 * MIB, data.len()), data);
    write_at(Path::new(&path), 127 * MIB, &data[..MIB as usize]);

    let refused = delete(&mut volumes, VOL_A).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("unpublish it"), "{refused:?}");
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("VOLUME_PUBLISHED")
    );

    unpublish(&mut volumes, VOL_A).await.unwrap();
    assert!(!Path::new(&path).exists());
    // Extend while unpublished, then publish again: everything is there.
    extend(&mut volumes, VOL_A, 192 * MIB).await.unwrap();
    let again = publish(&mut volumes, VOL_A).await.unwrap();
    assert_eq!(again, path);
    assert_eq!(device_size(Path::new(&path)), 192 * MIB);
    assert_eq!(read_at(Path::new(&path), 60 * MIB, data.len()), data);
    assert_eq!(
        read_at(Path::new(&path), 127 * MIB, MIB as usize),
        data[..MIB as usize]
    );
    unpublish(&mut volumes, VOL_A).await.unwrap();

    let used_before = pool_used(&agent).await.0;
    assert!(used_before >= 5 * MIB, "{used_before}");
    delete(&mut volumes, VOL_A).await.unwrap();
    assert_eq!(
        get(&mut volumes, VOL_A).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(list(&mut volumes).await.is_empty());
    assert_eq!(
        pool_used(&agent).await.0,
        0,
        "deleting the volume frees its blocks"
    );
    let dm = kernel();
    let ours: Vec<String> = dm
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n.starts_with("dmctapi-") && n.contains(VOL_A))
        .collect();
    assert!(ours.is_empty(), "devices left behind: {ours:?}");
    let mut agent = agent;
    let status = agent.stop().await;
    assert!(
        status.success(),
        "SIGTERM is a clean stop: {status}\n{}",
        agent.log()
    );
    assert!(
        !agent.socket().exists(),
        "the socket is removed on a clean stop"
    );
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_calls_are_idempotent() {
    let agent = AgentProcess::start("dmctidem").await;
    let mut volumes = agent.volumes().await;
    let first = create(&mut volumes, VOL_A, 32 * MIB).await.unwrap();
    let upper = VOL_A.to_uppercase();
    assert_eq!(
        create(&mut volumes, &upper, 32 * MIB).await.unwrap(),
        first,
        "same id in upper case"
    );
    assert_eq!(
        create(&mut volumes, VOL_A, 32 * MIB - 5).await.unwrap(),
        first,
        "same size after rounding"
    );
    let conflict = create(&mut volumes, VOL_A, 64 * MIB).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");
    assert!(conflict.message().contains("33554432"), "{conflict:?}");
    assert_eq!(get(&mut volumes, VOL_A).await.unwrap().size_bytes, 32 * MIB);

    let path = publish(&mut volumes, VOL_A).await.unwrap();
    assert_eq!(publish(&mut volumes, VOL_A).await.unwrap(), path);
    assert_eq!(
        extend(&mut volumes, VOL_A, 32 * MIB)
            .await
            .unwrap()
            .size_bytes,
        32 * MIB
    );
    unpublish(&mut volumes, VOL_A).await.unwrap();
    unpublish(&mut volumes, VOL_A).await.unwrap();
    delete(&mut volumes, VOL_A).await.unwrap();
    delete(&mut volumes, VOL_A).await.unwrap();
    assert!(list(&mut volumes).await.is_empty());
    agent.destroy().await;
}

/// A process forked while a device was open keeps it open until it execs
/// or exits, after the opener closed it (a udev probe does the same): the
/// agent waits for such an opener instead of refusing the unpublish.
#[tokio::test(flavor = "multi_thread")]
async fn unpublish_outwaits_a_process_that_inherited_the_device() {
    let agent = AgentProcess::start("dmctbrief").await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, 16 * MIB).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    let device = std::fs::File::open(&path).unwrap();
    // The child inherits the descriptor, as one forked by a busy host would.
    nix::fcntl::fcntl(
        &device,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    #[allow(clippy::disallowed_types)] // the brief opener is a process
    let mut child = std::process::Command::new("sleep")
        .arg("1")
        .spawn()
        .unwrap();
    drop(device);
    let held = kernel()
        .info(&name("dmctbrief", VOL_A))
        .await
        .unwrap()
        .unwrap()
        .open_count;
    assert_eq!(
        held, 1,
        "the child holds the device after the parent closed it"
    );
    let started = std::time::Instant::now();
    unpublish(&mut volumes, VOL_A).await.unwrap();
    println!(
        "MEASURED unpublish waited {:?} for the brief opener",
        started.elapsed()
    );
    assert!(child.try_wait().unwrap().is_some(), "the child had let go");
    assert!(!Path::new(&path).exists());
    delete(&mut volumes, VOL_A).await.unwrap();
    agent.destroy().await;
}

/// Each malformed or impossible call gets its documented code and leaves the
/// volume list and the pool exactly as they were.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_precise_code_and_changes_nothing() {
    let agent = AgentProcess::start("dmctbad").await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, 64 * MIB).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    write_at(Path::new(&path), 0, &pattern(3, 0, MIB as usize));
    let before = (list(&mut volumes).await, pool_used(&agent).await);
    let huge = "x".repeat(1 << 20);
    let unknown = "2f9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d13";

    let cases: Vec<(&str, Result<(), tonic::Status>, Code)> = vec![
        (
            "empty id",
            create(&mut volumes, "", MIB).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "non-UUID id",
            create(&mut volumes, "volume-1", MIB).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "1 MiB id",
            create(&mut volumes, &huge, MIB).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "zero size",
            create(&mut volumes, VOL_B, 0).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "negative size (wraps to u64::MAX)",
            create(&mut volumes, VOL_B, u64::MAX).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "larger than the pool",
            create(&mut volumes, VOL_B, 4 * 1024 * MIB).await.map(drop),
            Code::ResourceExhausted,
        ),
        (
            "shrink",
            extend(&mut volumes, VOL_A, 32 * MIB).await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "extend beyond the pool",
            extend(&mut volumes, VOL_A, 4 * 1024 * MIB).await.map(drop),
            Code::ResourceExhausted,
        ),
        (
            "extend unknown",
            extend(&mut volumes, unknown, 128 * MIB).await.map(drop),
            Code::NotFound,
        ),
        (
            "get unknown",
            get(&mut volumes, unknown).await.map(drop),
            Code::NotFound,
        ),
        (
            "publish unknown",
            publish(&mut volumes, unknown).await.map(drop),
            Code::NotFound,
        ),
        (
            "unpublish unknown",
            unpublish(&mut volumes, unknown).await,
            Code::NotFound,
        ),
        (
            "get malformed",
            get(&mut volumes, "../../etc").await.map(drop),
            Code::InvalidArgument,
        ),
        (
            "delete malformed",
            delete(&mut volumes, &huge).await,
            Code::InvalidArgument,
        ),
        (
            "delete published",
            delete(&mut volumes, VOL_A).await,
            Code::FailedPrecondition,
        ),
        (
            "create from a snapshot",
            volumes
                .create_volume(CreateVolumeRequest {
                    volume_id: VOL_B.into(),
                    size_bytes: MIB,
                    source_snapshot_id: unknown.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "snapshot of an unknown volume",
            SnapshotsClient::new(agent.channel().await)
                .create_snapshot(CreateSnapshotRequest {
                    snapshot_id: unknown.into(),
                    volume_id: unknown.into(),
                })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "both sources",
            volumes
                .create_volume(CreateVolumeRequest {
                    volume_id: VOL_B.into(),
                    size_bytes: MIB,
                    source_snapshot_id: unknown.into(),
                    source_volume_id: VOL_A.into(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "checkpoint of an unknown volume",
            SnapshotsClient::new(agent.channel().await)
                .mark_checkpoint(MarkCheckpointRequest {
                    volume_id: unknown.into(),
                })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "changed blocks since nothing",
            SnapshotsClient::new(agent.channel().await)
                .get_changed_blocks(GetChangedBlocksRequest {
                    volume_id: VOL_A.into(),
                    since: None,
                })
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "transfer without a source",
            TransfersClient::new(agent.channel().await)
                .start_transfer(StartTransferRequest::default())
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
    ];
    for (what, result, code) in cases {
        let status = result.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            !status.message().is_empty() && status.message().len() < 1000,
            "{what}: {}",
            status.message()
        );
    }
    // Open the device: unpublish is refused while something holds it.
    let holder = std::fs::File::open(&path).unwrap();
    let busy = unpublish(&mut volumes, VOL_A).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains("open"), "{busy:?}");
    assert_eq!(refusal_reason(&busy).as_deref(), Some("VOLUME_IN_USE"));
    drop(holder);

    let after = (list(&mut volumes).await, pool_used(&agent).await);
    assert_eq!(before, after, "a refused call changed something");
    assert!(Path::new(&path).exists());
    agent.destroy().await;
}

/// 100 mutating calls on one volume at once, beside creates and deletes of
/// other volumes: no deadlock, and store and kernel agree afterwards (also
/// across a restart, whose reconciliation must find nothing to repair).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_serialize_per_volume_and_leave_a_consistent_state() {
    let mut agent = AgentProcess::start("dmctconc").await;
    let channel = agent.channel().await;
    create(&mut VolumesClient::new(channel.clone()), VOL_A, 16 * MIB)
        .await
        .unwrap();
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u64 {
        let mut client = VolumesClient::new(channel.clone());
        let sizes = sizes.clone();
        tasks.spawn(async move {
            match i % 5 {
                0 => create(&mut client, VOL_A, 16 * MIB).await.map(drop),
                1 => {
                    let size = (16 + i) * MIB;
                    let result = extend(&mut client, VOL_A, size).await;
                    if result.is_ok() {
                        sizes.lock().unwrap().push(size);
                    }
                    result.map(drop)
                }
                2 => publish(&mut client, VOL_A).await.map(drop),
                3 => unpublish(&mut client, VOL_A).await,
                _ => get(&mut client, VOL_A).await.map(drop),
            }
        });
    }
    for i in 0..10u64 {
        let mut client = VolumesClient::new(channel.clone());
        tasks.spawn(async move {
            let id = format!("3f9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d{i:02}");
            create(&mut client, &id, 8 * MIB).await?;
            publish(&mut client, &id).await?;
            unpublish(&mut client, &id).await?;
            if i % 2 == 0 {
                delete(&mut client, &id).await
            } else {
                Ok(())
            }
        });
    }
    let outcomes = tokio::time::timeout(std::time::Duration::from_secs(600), async {
        let mut outcomes = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            outcomes.push(joined.unwrap());
        }
        outcomes
    })
    .await
    .expect("the calls deadlocked");
    for outcome in &outcomes {
        if let Err(status) = outcome {
            // The only refusals: an extend smaller than one that won the race,
            // and a create (of the original size) after an extend.
            let expected = match status.code() {
                Code::InvalidArgument => "never shrink",
                Code::AlreadyExists => "not the 16777216 bytes asked for",
                _ => panic!("unexpected refusal {status:?}"),
            };
            assert!(status.message().contains(expected), "{status:?}");
        }
    }
    let mut client = VolumesClient::new(channel.clone());
    let volume = get(&mut client, VOL_A).await.unwrap();
    let largest = sizes.lock().unwrap().iter().copied().max().unwrap();
    assert_eq!(volume.size_bytes, largest);
    assert_kernel_matches(&agent, &volume).await;
    let state = list(&mut client).await;
    assert_eq!(state.len(), 6, "{:?}", state.keys());

    agent.kill9().await;
    agent.restart().await;
    let mut client = agent.volumes().await;
    assert_eq!(list(&mut client).await, state);
    assert!(
        agent.log().contains("rebuilt=0"),
        "nothing should need rebuilding:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("quarantined=0"));
    agent.destroy().await;
}

/// The public device exists exactly when published, at the record's size.
pub async fn assert_kernel_matches(agent: &AgentProcess, volume: &Volume) {
    let public = format!("/dev/mapper/{}-{}", agent.prefix, volume.volume_id);
    let thin = format!("/dev/mapper/{}-thin-{}", agent.prefix, volume.volume_id);
    assert_eq!(
        device_size(Path::new(&thin)),
        volume.size_bytes,
        "thin device size"
    );
    if volume.published {
        assert_eq!(
            device_size(Path::new(&public)),
            volume.size_bytes,
            "public device size"
        );
    } else {
        assert!(
            !Path::new(&public).exists(),
            "unpublished but {public} exists"
        );
    }
}

/// Before the pool fills, new allocations are refused and the node reports
/// low space; the pool's low-water event is logged when it fires.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_at_its_low_space_mark_refuses_new_allocations() {
    let agent = AgentProcess::start_with(
        "dmctlow",
        &[
            "--pool-file-size",
            "256M",
            "--low-space-percent",
            "50",
            "--max-oversubscription-ratio",
            "4",
        ],
        &[],
    )
    .await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, 200 * MIB).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    for offset in (0..150 * MIB).step_by(MIB as usize) {
        write_at(Path::new(&path), offset, &pattern(5, offset, MIB as usize));
    }
    let info = agent
        .node()
        .await
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let pool = info.pool.unwrap();
    assert!(pool.low_space, "{pool:?}");
    let refused = create(&mut volumes, VOL_B, 16 * MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("low-space mark of 50%"),
        "{refused:?}"
    );
    let refused = extend(&mut volumes, VOL_A, 300 * MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Writes to existing volumes still work: the mark keeps room for them.
    write_at(Path::new(&path), 160 * MIB, &pattern(6, 0, MIB as usize));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !agent.log().contains("reached its low-space mark") {
        assert!(
            std::time::Instant::now() < deadline,
            "the low-water event was not logged:\n{}",
            agent.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    agent.destroy().await;
}
