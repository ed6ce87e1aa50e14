//! Callers that give up mid-call. tonic drops a handler when its client's
//! deadline passes; the agent runs every call in a task of its own, so the
//! work finishes (no device stays suspended, no intent half done) and a
//! retry converges, while a reader of a published volume never stalls.

use std::{
    fs::OpenOptions,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dmclone::api::proto::v1::{
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, ExtendVolumeRequest,
    ListSnapshotsRequest, MarkCheckpointRequest, PublishVolumeRequest, UnpublishVolumeRequest,
    VolumeState, snapshots_client::SnapshotsClient, volumes_client::VolumesClient,
};
use tonic::{Code, Request, transport::Channel};

use super::{
    api::{VOL_A, VOL_B, create, get, publish},
    fixture::AgentProcess,
};
use crate::support::*;

const PREFIX: &str = "dmctcancel";
const CALLS: u64 = 36;

/// Reads 4 KiB with O_DIRECT in a loop until told to stop; returns the
/// slowest read and how many it made.
pub(super) struct Reader {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(Duration, u64)>,
}

impl Reader {
    pub(super) fn start(path: PathBuf, blocks: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(&path)
                .expect("open the published volume");
            let mut buf = AlignedBuf::new(4096);
            let (mut slowest, mut reads) = (Duration::ZERO, 0u64);
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                file.seek(SeekFrom::Start((reads * 7919 % blocks) * 4096))
                    .expect("seek");
                file.read_exact(buf.as_mut_slice()).expect("read");
                slowest = slowest.max(started.elapsed());
                reads += 1;
                thread::sleep(Duration::from_millis(2));
            }
            (slowest, reads)
        });
        Self { stop, handle }
    }

    pub(super) fn finish(self) -> (Duration, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("reader thread")
    }
}

/// A deadline from 1 ms to about 2 s, most of them short: the short ones cut
/// calls between their kernel steps.
fn deadline(n: u64) -> Duration {
    let spread = (n.wrapping_mul(2_654_435_761) >> 7) % 1000;
    Duration::from_micros(1000 + spread * spread * 2)
}

fn with_deadline<T>(message: T, n: u64) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline(n));
    request
}

/// Snapshots of the mixed phase (ids below 1000); the cut phase's are
/// above and may or may not have been taken.
fn expected_ids_only(id: &str) -> bool {
    id < snapshot_id(1000).as_str()
}

fn snapshot_id(n: u64) -> String {
    format!("7a9d1c3e-5f1a-4f7e-9a57-{n:012}")
}

/// Every other snapshot is deleted five calls after it was taken.
fn deletes_its_snapshot(n: u64) -> bool {
    n % 6 == 5 && (n / 6).is_multiple_of(2)
}

/// One mutating call chosen by `n`, with or without a deadline.
async fn call(channel: &Channel, n: u64, cut: bool) -> Result<(), tonic::Status> {
    let mut volumes = VolumesClient::new(channel.clone());
    let mut snapshots = SnapshotsClient::new(channel.clone());
    macro_rules! send {
        ($client:expr, $method:ident, $message:expr) => {{
            let message = $message;
            let request = if cut {
                with_deadline(message, n)
            } else {
                Request::new(message)
            };
            $client.$method(request).await.map(drop)
        }};
    }
    match n % 6 {
        0 => send!(
            snapshots,
            create_snapshot,
            CreateSnapshotRequest {
                snapshot_id: snapshot_id(n),
                volume_id: VOL_A.into(),
            }
        ),
        1 => send!(
            snapshots,
            mark_checkpoint,
            MarkCheckpointRequest {
                volume_id: VOL_A.into(),
            }
        ),
        2 => send!(
            volumes,
            publish_volume,
            PublishVolumeRequest {
                volume_id: VOL_B.into(),
            }
        ),
        3 => send!(
            volumes,
            unpublish_volume,
            UnpublishVolumeRequest {
                volume_id: VOL_B.into(),
            }
        ),
        4 => send!(
            volumes,
            extend_volume,
            ExtendVolumeRequest {
                volume_id: VOL_B.into(),
                new_size_bytes: (16 + n) * MIB,
            }
        ),
        _ if deletes_its_snapshot(n) => send!(
            snapshots,
            delete_snapshot,
            DeleteSnapshotRequest {
                snapshot_id: snapshot_id(n - 5),
            }
        ),
        _ => send!(
            snapshots,
            mark_checkpoint,
            MarkCheckpointRequest {
                volume_id: VOL_A.into(),
            }
        ),
    }
}

async fn listed_snapshots(agent: &AgentProcess) -> Vec<String> {
    let mut ids: Vec<String> = SnapshotsClient::new(agent.channel().await)
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    ids.sort();
    ids
}

async fn suspended_devices(prefix: &str) -> Vec<String> {
    let dm = kernel();
    let mut suspended = Vec::new();
    for device in dm.list().await.unwrap() {
        if !device.name.starts_with(prefix) {
            continue;
        }
        let name = dmclone::dm::names::DeviceName::new(&device.name).unwrap();
        if dm
            .info(&name)
            .await
            .unwrap()
            .is_some_and(|state| state.suspended)
        {
            suspended.push(device.name);
        }
    }
    suspended
}

/// Waits up to 3 s for no device of the agent to be suspended (a call cut
/// short may still be finishing); returns those still suspended.
pub(super) async fn left_suspended(prefix: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let suspended = suspended_devices(prefix).await;
        if suspended.is_empty() || Instant::now() > deadline {
            return suspended;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes a snapshot, or a checkpoint, cut at `deadline`: both suspend the
/// volume's device around a kernel step.
async fn cut_suspending_call(channel: &Channel, n: u64, deadline: Duration) -> bool {
    let mut snapshots = SnapshotsClient::new(channel.clone());
    let result = if n.is_multiple_of(2) {
        let mut request = Request::new(CreateSnapshotRequest {
            snapshot_id: snapshot_id(1000 + n),
            volume_id: VOL_A.into(),
        });
        request.set_timeout(deadline);
        snapshots.create_snapshot(request).await.map(drop)
    } else {
        let mut request = Request::new(MarkCheckpointRequest {
            volume_id: VOL_A.into(),
        });
        request.set_timeout(deadline);
        snapshots.mark_checkpoint(request).await.map(drop)
    };
    match result {
        Ok(()) => false,
        Err(status) => {
            assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                "call {n}: {status:?}"
            );
            true
        }
    }
}

/// Cuts snapshot and checkpoint calls at deadlines spread over how long
/// one takes, so that some are cut while the volume is suspended.
async fn cut_inside_suspends(channel: &Channel) -> (usize, Duration) {
    let started = Instant::now();
    assert!(!cut_suspending_call(channel, 0, Duration::from_secs(60)).await);
    let whole = started.elapsed();
    let mut cut = 0;
    for step in 1..=40u64 {
        let deadline = whole * step as u32 / 40;
        if cut_suspending_call(channel, step, deadline).await {
            cut += 1;
        }
        assert_eq!(
            left_suspended(PREFIX).await,
            Vec::<String>::new(),
            "call {step} cut at {deadline:?}"
        );
    }
    (cut, whole)
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_whose_callers_give_up_finish_and_a_retry_converges() {
    let agent = AgentProcess::start(PREFIX).await;
    let mut volumes = agent.volumes().await;
    create(&mut volumes, VOL_A, 32 * MIB).await.unwrap();
    let path = publish(&mut volumes, VOL_A).await.unwrap();
    volumes
        .create_volume(CreateVolumeRequest {
            volume_id: VOL_B.into(),
            size_bytes: 16 * MIB,
            ..Default::default()
        })
        .await
        .unwrap();
    let reader = Reader::start(PathBuf::from(&path), 32 * MIB / 4096);
    let channel = agent.channel().await;
    let (cut_in_suspends, whole) = cut_inside_suspends(&channel).await;
    println!(
        "MEASURED snapshot/checkpoint calls take {whole:?} uncut; {cut_in_suspends} of 40 cut short by deadlines spread over that time"
    );
    let mut cut_short = 0;
    for n in 0..CALLS {
        match call(&channel, n, true).await {
            Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                cut_short += 1;
            }
            _ => {}
        }
        // The retry waits for the cut call's task (the volume's lock) and
        // must give the answer an uncut call gives.
        call(&channel, n, false)
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
        "MEASURED {CALLS} calls, {cut_short} cut short by their deadline; reader: {reads} reads, slowest {slowest:?}"
    );
    assert!(
        cut_short > 0,
        "no call was cut short: the test proved nothing"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a read stalled {slowest:?}"
    );

    // What the calls left is what the store says, and it survives a crash.
    let expected: Vec<String> = (0..CALLS)
        .filter(|n| n % 6 == 0 && !deletes_its_snapshot(n + 5))
        .map(snapshot_id)
        .collect();
    assert!(!expected.is_empty());
    let mixed = |ids: Vec<String>| -> Vec<String> {
        ids.into_iter().filter(|id| expected_ids_only(id)).collect()
    };
    assert_eq!(mixed(listed_snapshots(&agent).await), expected);
    let mut agent = agent;
    agent.kill9().await;
    agent.restart().await;
    assert_eq!(
        mixed(listed_snapshots(&agent).await),
        expected,
        "after kill -9 and a start"
    );
    let b = get(&mut agent.volumes().await, VOL_B).await.unwrap();
    let last_extend = (0..CALLS).filter(|n| n % 6 == 4).max().unwrap();
    assert_eq!(b.size_bytes, (16 + last_extend) * MIB, "the last extend");
    for id in [VOL_A, VOL_B] {
        let volume = get(&mut agent.volumes().await, id).await.unwrap();
        assert_eq!(volume.state(), VolumeState::Available, "{id}");
    }
    agent.destroy().await;
}
