//! Callers that give up mid-call, for the calls `cancel.rs` does not make:
//! create, delete and revert of volumes, start, commit, pause, resume and
//! abort of transfers, export and unexport. Each call is cut by a deadline
//! from 1 ms to 2 s (log-uniform: as many below 45 ms as above, where most
//! of these calls end) and then made again without one; the retry must
//! succeed, no device may stay suspended, a reader of a published volume
//! must never stall, and what is left is what the store says, also after
//! a kill -9 and a start.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::api::proto::v1::{
    AbortTransferRequest, CreateSnapshotRequest, CreateVolumeRequest, DeleteVolumeRequest,
    ExportVolumeRequest, HydrationKnobs, RevertVolumeRequest, StartTransferRequest, TransferRef,
    TransferState, UnexportVolumeRequest, snapshots_client::SnapshotsClient,
    start_transfer_request::Source, transfers_client::TransfersClient,
    volumes_client::VolumesClient,
};
use tonic::{Code, Request, transport::Channel};

use super::{
    api::{create, get, publish},
    cancel::{Reader, left_suspended},
    fixture::AgentProcess,
};
use crate::support::*;

const PREFIX: &str = "dmctcanmv";
const PORT: &str = "4448";
const CYCLES: u64 = 10;
const STEPS: u64 = 10;
/// Published and read throughout.
const READ: &str = "5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d30";
/// Exported and unexported.
const EXPORTED: &str = "5b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d31";
/// Reverted to its snapshot.
const REVERTED: &str = "5c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d32";
const REVERT_TO: &str = "5d9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d33";
const EXPORT_TO: &str = "nqn.2014-08.org.nvmexpress:uuid:0c000000-0000-4000-8000-000000000030";

/// The volume a cycle's transfer brings in.
fn arriving(cycle: u64) -> String {
    format!("6a9d1c3e-5f1a-4f7e-9a57-{cycle:012}")
}

fn transfer(cycle: u64) -> String {
    format!("6b9d1c3e-5f1a-4f7e-9a57-{cycle:012}")
}

/// The volume a cycle creates and deletes.
fn created(cycle: u64) -> String {
    format!("6c9d1c3e-5f1a-4f7e-9a57-{cycle:012}")
}

/// 1 ms to 2 s, log-uniform over `n`.
fn deadline(n: u64) -> Duration {
    let u = (n.wrapping_mul(2_654_435_761) >> 7) % 1000;
    Duration::from_micros((1000.0 * 2000f64.powf(u as f64 / 1000.0)) as u64)
}

/// Call `n` of the run, cut short by a deadline or not.
async fn call(channel: &Channel, source: &Path, n: u64, cut: bool) -> Result<(), tonic::Status> {
    let mut volumes = VolumesClient::new(channel.clone());
    let mut snapshots = SnapshotsClient::new(channel.clone());
    let mut transfers = TransfersClient::new(channel.clone());
    macro_rules! send {
        ($client:expr, $method:ident, $message:expr) => {{
            let message = $message;
            let mut request = Request::new(message);
            if cut {
                request.set_timeout(deadline(n));
            }
            $client.$method(request).await.map(drop)
        }};
    }
    let cycle = n / STEPS;
    let this_transfer = || TransferRef {
        transfer_id: transfer(cycle),
    };
    match n % STEPS {
        0 => send!(
            transfers,
            start_transfer,
            StartTransferRequest {
                transfer_id: transfer(cycle),
                volume_id: arriving(cycle),
                size_bytes: 16 * MIB,
                source: Some(Source::DevicePath(source.display().to_string())),
                deferred: true,
                // Slow, one 4 KiB region at a time (a burst between two
                // looks of the rate limiter stays small): the transfer is
                // still copying when it is aborted.
                knobs: Some(HydrationKnobs {
                    region_bytes: 4096,
                    hydration_threshold: 1,
                    hydration_batch_size: 1,
                    max_bytes_per_second: 256 * 1024,
                }),
                leave_snapshots: false,
            }
        ),
        1 => send!(transfers, commit_transfer, this_transfer()),
        2 => send!(transfers, pause_transfer, this_transfer()),
        3 => send!(transfers, resume_transfer, this_transfer()),
        4 => send!(
            transfers,
            export_volume,
            ExportVolumeRequest {
                volume_id: EXPORTED.into(),
                host_nqn: EXPORT_TO.into(),
                for_transfer: false,
            }
        ),
        5 => send!(
            transfers,
            unexport_volume,
            UnexportVolumeRequest {
                volume_id: EXPORTED.into(),
                ..UnexportVolumeRequest::default()
            }
        ),
        6 => send!(
            transfers,
            abort_transfer,
            AbortTransferRequest {
                transfer_id: transfer(cycle),
                force: false,
            }
        ),
        7 => send!(
            volumes,
            create_volume,
            CreateVolumeRequest {
                volume_id: created(cycle),
                size_bytes: 8 * MIB,
                ..Default::default()
            }
        ),
        8 => send!(
            snapshots,
            revert_volume,
            RevertVolumeRequest {
                volume_id: REVERTED.into(),
                snapshot_id: REVERT_TO.into(),
            }
        ),
        _ => send!(
            volumes,
            delete_volume,
            DeleteVolumeRequest {
                volume_id: created(cycle),
            }
        ),
    }
}

/// Devices of the agent that belong to none of the volumes that stay.
async fn stray_devices() -> Vec<String> {
    kernel()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|device| device.name)
        .filter(|name| name.starts_with(PREFIX) && !name.ends_with("-pool"))
        .filter(|name| {
            ![READ, EXPORTED, REVERTED, REVERT_TO]
                .iter()
                .any(|id| name.contains(id))
        })
        .filter(|name| !name.contains("-pool-"))
        .collect()
}

/// What the run must leave, asked of the agent and of the kernel.
async fn assert_converged(agent: &AgentProcess, when: &str) {
    let mut transfers = TransfersClient::new(agent.channel().await);
    let mut volumes = agent.volumes().await;
    for cycle in 0..CYCLES {
        let aborted = transfers
            .get_transfer(TransferRef {
                transfer_id: transfer(cycle),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            aborted.state(),
            TransferState::Aborted,
            "{when}: {aborted:?}"
        );
        for gone in [arriving(cycle), created(cycle)] {
            let status = get(&mut volumes, &gone).await.unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{when}: {gone}");
        }
    }
    for kept in [READ, EXPORTED, REVERTED] {
        get(&mut volumes, kept).await.unwrap();
    }
    assert_eq!(stray_devices().await, Vec::<String>::new(), "{when}");
    let exported = std::fs::read_dir("/sys/kernel/config/nvmet/subsystems")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().contains(EXPORTED));
    assert!(!exported, "{when}: the last call unexported the volume");
}

#[tokio::test(flavor = "multi_thread")]
async fn transfer_export_and_volume_calls_whose_callers_give_up_converge() {
    let agent = AgentProcess::start_with(
        PREFIX,
        &[
            "--nvme-auth",
            crate::support::nvme_auth_policy(),
            "--nvme-export-address",
            "127.0.0.1",
            "--nvme-export-port",
            PORT,
            "--nvme-export-port-id",
            PORT,
        ],
        &[],
    )
    .await;
    let source = LoopDisk::with_pattern(16 * MIB, 83);
    let mut volumes = agent.volumes().await;
    create(&mut volumes, READ, 16 * MIB).await.unwrap();
    let path = publish(&mut volumes, READ).await.unwrap();
    create(&mut volumes, EXPORTED, 8 * MIB).await.unwrap();
    create(&mut volumes, REVERTED, 8 * MIB).await.unwrap();
    SnapshotsClient::new(agent.channel().await)
        .create_snapshot(CreateSnapshotRequest {
            snapshot_id: REVERT_TO.into(),
            volume_id: REVERTED.into(),
        })
        .await
        .unwrap();
    let reader = Reader::start(PathBuf::from(&path), 16 * MIB / 4096);
    let channel = agent.channel().await;
    let mut cut_short = [0u32; STEPS as usize];
    let started = Instant::now();
    for n in 0..CYCLES * STEPS {
        match call(&channel, source.path(), n, true).await {
            Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                cut_short[(n % STEPS) as usize] += 1;
            }
            _ => {}
        }
        call(&channel, source.path(), n, false)
            .await
            .unwrap_or_else(|status| panic!("retry of call {n}: {status:?}"));
        assert_eq!(
            left_suspended(PREFIX).await,
            Vec::<String>::new(),
            "after call {n}"
        );
    }
    let (slowest, reads) = reader.finish();
    println!(
        "MEASURED {} calls in {:?}, cut short per step (start, commit, pause, resume, export, unexport, abort, create, revert, delete): {cut_short:?}; reader: {reads} reads, slowest {slowest:?}",
        CYCLES * STEPS,
        started.elapsed()
    );
    assert!(
        cut_short.iter().sum::<u32>() > 0,
        "no call was cut short: the test proved nothing"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a read stalled {slowest:?}"
    );
    assert_converged(&agent, "after the calls").await;
    let mut agent = agent;
    agent.kill9().await;
    agent.restart().await;
    assert_converged(&agent, "after kill -9 and a start").await;
    agent.destroy().await;
}
