//! Moving a volume onto this host from a source block device: presented at
//! once, hydrated in the background while written, finalized on the kernel's
//! event; deferred start with commit or abort; pause, resume and throttle;
//! extend while hydrating; crashes and a failing source along the way.

use dmclone::units::Sectors;
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::{
    api::proto::v1::{
        AbortTransferRequest, HydrationKnobs, StartTransferRequest, ThrottleTransferRequest,
        Transfer, TransferRef, TransferState, WatchTransfersRequest,
        get_changed_blocks_request::Since, start_transfer_request::Source,
        transfers_client::TransfersClient,
    },
    dm::table::{Linear, Target},
};
use tonic::{Code, transport::Channel};

use super::{
    api::{delete, extend, get, pool_used, publish, unpublish},
    changes::{BLOCK, changed, checkpoint},
    fixture::AgentProcess,
};
use crate::support::*;

const TRANSFER: &str = "6b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01";
const VOLUME: &str = "7b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d02";
const SNAPSHOT: &str = "8b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d03";
const COPY: &str = "9b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d04";

fn knobs(region: u32, threshold: u32, batch: u32) -> Option<HydrationKnobs> {
    Some(HydrationKnobs {
        region_bytes: region,
        hydration_threshold: threshold,
        hydration_batch_size: batch,
        max_bytes_per_second: 0,
    })
}

async fn start(
    client: &mut TransfersClient<Channel>,
    source: &Path,
    size: u64,
    deferred: bool,
    knobs: Option<HydrationKnobs>,
) -> Result<Transfer, tonic::Status> {
    start_as(client, TRANSFER, source, size, deferred, knobs).await
}

async fn start_as(
    client: &mut TransfersClient<Channel>,
    transfer: &str,
    source: &Path,
    size: u64,
    deferred: bool,
    knobs: Option<HydrationKnobs>,
) -> Result<Transfer, tonic::Status> {
    client
        .start_transfer(StartTransferRequest {
            transfer_id: transfer.into(),
            volume_id: VOLUME.into(),
            size_bytes: size,
            source: Some(Source::DevicePath(source.display().to_string())),
            deferred,
            knobs,
            leave_snapshots: false,
        })
        .await
        .map(|r| r.into_inner())
}

fn reference() -> TransferRef {
    TransferRef {
        transfer_id: TRANSFER.into(),
    }
}

/// An abort of this file's transfer, without force.
fn abort_request() -> AbortTransferRequest {
    AbortTransferRequest {
        transfer_id: TRANSFER.into(),
        force: false,
    }
}

async fn transfer(client: &mut TransfersClient<Channel>) -> Transfer {
    client.get_transfer(reference()).await.unwrap().into_inner()
}

async fn throttle(client: &mut TransfersClient<Channel>, threshold: u32, batch: u32, limit: u64) {
    client
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                hydration_threshold: threshold,
                hydration_batch_size: batch,
                max_bytes_per_second: limit,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// The agent's last start brought every transfer's devices back.
fn nothing_degraded_at_start(agent: &AgentProcess) {
    let log = agent.log();
    let reconciled = log
        .lines()
        .rfind(|line| line.contains("reconciled the kernel with the store"))
        .unwrap_or_default();
    assert!(reconciled.contains("degraded=0"), "{reconciled}");
}

/// Follows the watch stream to the end (it ends at the final state) and
/// returns every state seen, in order, without repeats.
async fn watch_to_the_end(agent: &AgentProcess) -> (Vec<TransferState>, Transfer) {
    watch_to_the_end_of(agent, TRANSFER).await
}

async fn watch_to_the_end_of(
    agent: &AgentProcess,
    transfer: &str,
) -> (Vec<TransferState>, Transfer) {
    let mut stream = TransfersClient::new(agent.channel().await)
        .watch_transfers(WatchTransfersRequest {
            transfer_id: transfer.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while let Some(update) = tokio::time::timeout_at(deadline.into(), stream.message())
        .await
        .expect("the transfer did not finish in 600 s")
        .unwrap()
    {
        if states.last() != Some(&update.state()) {
            states.push(update.state());
        }
        last = Some(update);
    }
    (states, last.expect("at least one update"))
}

fn public_path(agent: &AgentProcess) -> PathBuf {
    PathBuf::from(format!("/dev/mapper/{}-{VOLUME}", agent.prefix))
}

/// The volume's public device maps dm-era.
async fn assert_public_is_era(agent: &AgentProcess, why: &str) {
    let table = kernel().table(&name(&agent.prefix, VOLUME)).await.unwrap();
    assert!(
        matches!(table.segments()[0].target, Target::Era(_)),
        "{why}: {table}"
    );
}

async fn our_devices_named(prefix: &str, role: &str) -> Vec<String> {
    kernel()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n.starts_with(&format!("{prefix}-{role}")))
        .collect()
}

/// The expected content after writes: the source pattern, overlaid.
struct Expected {
    seed: u64,
    size: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Expected {
    fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for offset in (0..self.size).step_by(MIB as usize) {
            let mut chunk = pattern(self.seed, offset, MIB as usize);
            for (at, data) in &self.writes {
                for (i, byte) in data.iter().enumerate() {
                    let position = at + i as u64;
                    if (offset..offset + MIB).contains(&position) {
                        chunk[(position - offset) as usize] = *byte;
                    }
                }
            }
            hasher.update(&chunk);
        }
        hex(&hasher.finalize())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_is_presented_at_once_hydrated_under_writes_and_finalized() {
    let size = 96 * MIB;
    let source = LoopDisk::with_pattern(size, 41);
    let source_sha = sha256_of(source.path(), size);
    let agent = AgentProcess::start("dmctxfer").await;
    let mut client = TransfersClient::new(agent.channel().await);
    // Slow enough that the writes below land while hydrating.
    let started = start(
        &mut client,
        source.path(),
        size,
        false,
        knobs(64 * 1024, 2, 1),
    )
    .await
    .unwrap();
    assert_eq!(started.regions_total, size / (64 * 1024));
    let public = public_path(&agent);
    assert_eq!(started.device_path, public.display().to_string());
    // Usable the moment the call returns: reads come from the source.
    assert_eq!(
        read_at(&public, 50 * MIB, 4096),
        pattern(41, 50 * MIB, 4096)
    );
    let volume = get(&mut agent.volumes().await, VOLUME).await.unwrap();
    assert_eq!(
        volume.state(),
        dmclone::api::proto::v1::VolumeState::Hydrating
    );

    let watcher = tokio::spawn({
        let socket = agent.socket();
        async move {
            let mut stream =
                TransfersClient::new(dmclone::client::connect_unix(&socket).await.unwrap())
                    .watch_transfers(WatchTransfersRequest {
                        transfer_id: TRANSFER.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
            let mut states = Vec::new();
            let mut last = None;
            while let Some(update) = stream.message().await.unwrap() {
                if states.last() != Some(&update.state()) {
                    states.push(update.state());
                }
                last = Some(update);
            }
            (states, last.unwrap())
        }
    });
    let mut expected = Expected {
        seed: 41,
        size,
        writes: Vec::new(),
    };
    for (i, offset) in [3 * MIB + 512, 40 * MIB, 95 * MIB].into_iter().enumerate() {
        let data = pattern(900 + i as u64, 0, 64 * 1024);
        let aligned = offset / 4096 * 4096;
        write_at(&public, aligned, &data);
        expected.writes.push((aligned, data));
    }
    let (states, last) = tokio::time::timeout(Duration::from_secs(600), watcher)
        .await
        .expect("finished in time")
        .unwrap();
    assert_eq!(states.last(), Some(&TransferState::Done), "{states:?}");
    assert!(states.contains(&TransferState::Hydrating), "{states:?}");
    assert_eq!(last.regions_hydrated, last.regions_total);
    assert_eq!(last.bytes_hydrated, size);
    assert!(last.finalize_pause_micros > 0, "{last:?}");

    assert_eq!(
        sha256_of(&public, size),
        expected.sha256(),
        "the volume holds the source plus the writes"
    );
    assert_eq!(
        sha256_of(source.path(), size),
        source_sha,
        "the source is untouched"
    );
    let volume = get(&mut agent.volumes().await, VOLUME).await.unwrap();
    assert_eq!(
        volume.state(),
        dmclone::api::proto::v1::VolumeState::Available
    );
    assert!(volume.published && volume.size_bytes == size);
    assert!(
        our_devices_named(&agent.prefix, "cmeta-").await.is_empty(),
        "clone metadata left behind"
    );
    assert_public_is_era(&agent, "finished, with change tracking on by default").await;
    // A finished volume is an ordinary one.
    unpublish(&mut agent.volumes().await, VOLUME).await.unwrap();
    delete(&mut agent.volumes().await, VOLUME).await.unwrap();
    assert_eq!(transfer(&mut client).await.state(), TransferState::Done);
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deferred_transfers_wait_for_commit_and_abort_leaves_the_source_alone() {
    let size = 32 * MIB;
    let source = LoopDisk::with_pattern(size, 43);
    let agent = AgentProcess::start("dmctdefer").await;
    let mut client = TransfersClient::new(agent.channel().await);
    let used_before = pool_used(&agent).await.0;

    let deferred = start(&mut client, source.path(), size, true, None)
        .await
        .unwrap();
    assert_eq!(deferred.state(), TransferState::Deferred);
    // Repeating the start returns the same transfer.
    assert_eq!(
        start(&mut client, source.path(), size, true, None)
            .await
            .unwrap()
            .state(),
        TransferState::Deferred
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        transfer(&mut client).await.regions_hydrated,
        0,
        "nothing copies before commit"
    );
    assert_eq!(read_at(&public_path(&agent), 0, 4096), pattern(43, 0, 4096));
    let refused = client.pause_transfer(reference()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let aborted = client
        .abort_transfer(abort_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aborted.state(), TransferState::Aborted);
    assert_eq!(
        get(&mut agent.volumes().await, VOLUME)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(!public_path(&agent).exists());
    assert_eq!(pool_used(&agent).await.0, used_before);
    assert_eq!(sha256_of(source.path(), size), {
        let copy = LoopDisk::with_pattern(size, 43);
        sha256_of(copy.path(), size)
    });
    assert_eq!(
        client
            .abort_transfer(abort_request())
            .await
            .unwrap()
            .into_inner()
            .state(),
        TransferState::Aborted
    );
    agent.destroy().await;

    // Deferred, then committed: hydration starts and finishes.
    let agent = AgentProcess::start("dmctcommit").await;
    let mut client = TransfersClient::new(agent.channel().await);
    start(&mut client, source.path(), size, true, None)
        .await
        .unwrap();
    let committed = client
        .commit_transfer(reference())
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            committed.state(),
            TransferState::Hydrating | TransferState::Done
        ),
        "{committed:?}"
    );
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done));
    assert_eq!(
        sha256_of(&public_path(&agent), size),
        sha256_of(source.path(), size)
    );
    let refused = client.abort_transfer(abort_request()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::FailedPrecondition,
        "a finished transfer cannot be aborted"
    );
    assert_eq!(
        refusal_reason(&refused).as_deref(),
        Some("TRANSFER_WRONG_STATE")
    );
    agent.destroy().await;

    // The destination rewrites the whole volume before the commit (a guest
    // after the switch-over): every region is hydrated, yet the move waits
    // for its commit, past dm-clone's 1 s metadata commit, and then ends
    // with what the destination wrote.
    let agent = AgentProcess::start("dmctwritten").await;
    let mut client = TransfersClient::new(agent.channel().await);
    start(&mut client, source.path(), size, true, None)
        .await
        .unwrap();
    for offset in (0..size).step_by(MIB as usize) {
        write_at(
            &public_path(&agent),
            offset,
            &pattern(44, offset, MIB as usize),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = transfer(&mut client).await;
    assert_eq!(waiting.state(), TransferState::Deferred, "{waiting:?}");
    assert_eq!(waiting.regions_hydrated, waiting.regions_total);
    client.commit_transfer(reference()).await.unwrap();
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done));
    for offset in (0..size).step_by(MIB as usize) {
        assert_eq!(
            read_at(&public_path(&agent), offset, MIB as usize),
            pattern(44, offset, MIB as usize),
            "at {offset}"
        );
    }
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_throttle_change_the_rate() {
    let size = 128 * MIB;
    let source = LoopDisk::with_pattern(size, 47);
    let agent = AgentProcess::start("dmctthrottle").await;
    let mut client = TransfersClient::new(agent.channel().await);
    start(
        &mut client,
        source.path(),
        size,
        false,
        knobs(64 * 1024, 1, 1),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let paused = client
        .pause_transfer(reference())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), TransferState::Paused);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = transfer(&mut client).await.regions_hydrated;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = transfer(&mut client).await.regions_hydrated;
    assert_eq!(a, b, "paused: nothing is copied");
    assert!(
        b < size / (64 * 1024),
        "finished before the pause could be seen"
    );

    // A byte budget: 2 MiB/s over one-second windows.
    let limited = client
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                max_bytes_per_second: 2 * MIB,
                hydration_threshold: 2,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limited.knobs.unwrap().hydration_threshold, 2);
    client.resume_transfer(reference()).await.unwrap();
    // Eight seconds: a late look overdraws the budget by what was copied
    // meanwhile, repaid after it; over a longer window that evens out.
    let from = transfer(&mut client).await.bytes_hydrated;
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let copied = transfer(&mut client).await.bytes_hydrated - from;
    let limited_rate = copied as f64 / since.elapsed().as_secs_f64();
    assert!(limited_rate > 0.0, "resumed: copying again");
    assert!(
        limited_rate < 3.0 * MIB as f64,
        "2 MiB/s limit, measured {limited_rate:.0} B/s"
    );
    let region_change = client
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                region_bytes: 1 << 20,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(region_change.code(), Code::InvalidArgument);

    // Lift the limit and open the throttle: the rest goes faster.
    client
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                hydration_threshold: 256,
                hydration_batch_size: 16,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut limit_lifted = client.get_transfer(reference()).await.unwrap().into_inner();
    assert_eq!(
        limit_lifted.knobs.take().unwrap().max_bytes_per_second,
        2 * MIB,
        "0 keeps the limit"
    );
    client
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                max_bytes_per_second: u64::MAX,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let (states, last) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done), "{states:?}");
    assert_eq!(last.bytes_hydrated, size);
    println!(
        "MEASURED throttled at 2 MiB/s: {:.2} MiB/s",
        limited_rate / MIB as f64
    );
    assert_eq!(
        sha256_of(&public_path(&agent), size),
        sha256_of(source.path(), size)
    );
    agent.destroy().await;
}

/// The host's byte budget (transfer.max_bytes_per_second) holds for all
/// moves to it together, shared so that each of them copies.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_byte_budget_holds_for_all_transfers_together() {
    let size = 64 * MIB;
    let moves = [
        (
            "6b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11",
            "7b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d12",
            61,
        ),
        (
            "6b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d21",
            "7b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d22",
            62,
        ),
    ];
    let sources: Vec<LoopDisk> = moves
        .iter()
        .map(|(_, _, seed)| LoopDisk::with_pattern(size, *seed))
        .collect();
    let agent = AgentProcess::start_with(
        "dmctbudget",
        &["--transfer-max-bytes-per-second", "2M"],
        &[],
    )
    .await;
    let mut client = TransfersClient::new(agent.channel().await);
    for ((transfer, volume, _), source) in moves.iter().zip(&sources) {
        client
            .start_transfer(StartTransferRequest {
                transfer_id: (*transfer).into(),
                volume_id: (*volume).into(),
                size_bytes: size,
                source: Some(Source::DevicePath(source.path().display().to_string())),
                deferred: false,
                knobs: knobs(64 * 1024, 1, 1),
                leave_snapshots: false,
            })
            .await
            .unwrap();
    }
    let hydrated = |client: &mut TransfersClient<Channel>| {
        let mut client = client.clone();
        async move {
            let mut bytes = Vec::new();
            for (transfer, _, _) in &moves {
                let view = client
                    .get_transfer(TransferRef {
                        transfer_id: (*transfer).into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(view.state(), TransferState::Hydrating, "{view:?}");
                bytes.push(view.bytes_hydrated);
            }
            bytes
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = hydrated(&mut client).await;
    let since = Instant::now();
    // Eight seconds, as for one transfer's own limit: a late look overdraws
    // a share, repaid after it; over a longer window that evens out.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let to = hydrated(&mut client).await;
    let seconds = since.elapsed().as_secs_f64();
    let rates: Vec<f64> = from
        .iter()
        .zip(&to)
        .map(|(a, b)| (b - a) as f64 / seconds)
        .collect();
    let together: f64 = rates.iter().sum();
    println!(
        "MEASURED under a 2 MiB/s host budget: {:.2} MiB/s together, {:?} B/s each",
        together / MIB as f64,
        rates.iter().map(|r| *r as u64).collect::<Vec<_>>()
    );
    assert!(
        together < 3.0 * MIB as f64,
        "2 MiB/s for the host, measured {together:.0} B/s"
    );
    assert!(
        rates.iter().all(|rate| *rate > 0.25 * MIB as f64),
        "each transfer copies its share: {rates:?}"
    );
    for (transfer, _, _) in &moves {
        client
            .abort_transfer(AbortTransferRequest {
                transfer_id: (*transfer).into(),
                force: false,
            })
            .await
            .unwrap();
    }
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn extending_while_hydrating_maps_the_new_range_locally() {
    let size = 32 * MIB;
    let source = LoopDisk::with_pattern(size, 53);
    let agent = AgentProcess::start("dmctgrow").await;
    let mut client = TransfersClient::new(agent.channel().await);
    start(&mut client, source.path(), size, true, None)
        .await
        .unwrap();
    let grown = extend(&mut agent.volumes().await, VOLUME, 48 * MIB)
        .await
        .unwrap();
    assert_eq!(grown.size_bytes, 48 * MIB);
    let public = public_path(&agent);
    assert_eq!(super::api::device_size(&public), 48 * MIB);
    let tail = pattern(59, 0, 2 * MIB as usize);
    write_at(&public, 46 * MIB, &tail);
    assert_eq!(read_at(&public, 46 * MIB, tail.len()), tail);
    assert_eq!(
        read_at(&public, 31 * MIB, 4096),
        pattern(53, 31 * MIB, 4096)
    );
    client.commit_transfer(reference()).await.unwrap();
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done));
    assert_eq!(sha256_of(&public, size), sha256_of(source.path(), size));
    assert_eq!(
        read_at(&public, 46 * MIB, tail.len()),
        tail,
        "the extended range survives finalize"
    );
    assert_eq!(super::api::device_size(&public), 48 * MIB);
    agent.destroy().await;
}

/// dm-era sits above the clone from presentation on: a checkpoint taken at
/// arrival answers exactly the blocks written here while the volume arrives
/// (deferred, then hydrating) and after it finalized, across a kill -9 of
/// the agent mid-hydration; hydration's own copies are not changes.
/// Finalize swaps only the layer beneath dm-era, and the next publish puts
/// dm-era straight over the thin device with the same history.
#[tokio::test(flavor = "multi_thread")]
async fn an_arriving_volume_tracks_changes_from_presentation_on() {
    let size = 32 * MIB;
    let source = LoopDisk::with_pattern(size, 67);
    let mut agent = AgentProcess::start("dmctarrcbt").await;
    let mut client = TransfersClient::new(agent.channel().await);
    let mut slow = knobs(64 * 1024, 1, 1);
    slow.as_mut().unwrap().max_bytes_per_second = 2 * MIB;
    start(&mut client, source.path(), size, true, slow)
        .await
        .unwrap();
    let public = public_path(&agent);
    let era = checkpoint(&agent, VOLUME).await.unwrap();
    let before_arrival = changed(&agent, VOLUME, Since::Era(0)).await.unwrap_err();
    assert_eq!(
        before_arrival.code(),
        Code::FailedPrecondition,
        "{before_arrival:?}"
    );
    let mut expected = Expected {
        seed: 67,
        size,
        writes: Vec::new(),
    };
    let mut write = |offset: u64, len: usize, byte: u8| {
        let data = vec![byte; len];
        write_at(&public, offset, &data);
        expected.writes.push((offset, data));
    };
    write(3 * BLOCK + 4096, 4096, 0x5A);
    write(17 * BLOCK - 4096, 8192, 0x5B);
    assert_eq!(
        changed(&agent, VOLUME, Since::Era(era)).await.unwrap(),
        [3, 16, 17].into(),
        "while deferred"
    );
    client.commit_transfer(reference()).await.unwrap();
    write(100 * BLOCK, 4096, 0x5C);
    write(511 * BLOCK, BLOCK as usize, 0x5D);
    // Paused, so that the kernel does not finish the copy while no agent
    // holds it to its byte limit (between the kill and the restart).
    client.pause_transfer(reference()).await.unwrap();
    agent.kill9().await;
    agent.restart().await;
    nothing_degraded_at_start(&agent);
    let mut client = TransfersClient::new(agent.channel().await);
    write(300 * BLOCK + 4096, 4096, 0x5E);
    let hydrating = transfer(&mut client).await;
    assert_eq!(
        changed(&agent, VOLUME, Since::Era(era)).await.unwrap(),
        [3, 16, 17, 100, 300, 511].into(),
        "mid-hydration, across a kill -9: exactly the blocks written here, none that \
         hydration copied"
    );
    assert!(
        hydrating.regions_hydrated < hydrating.regions_total,
        "still hydrating when asked: {hydrating:?}"
    );
    client.resume_transfer(reference()).await.unwrap();
    throttle(&mut client, 64, 16, 1 << 40).await;
    let (states, last) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done), "{states:?}");
    assert_eq!(
        changed(&agent, VOLUME, Since::Era(era)).await.unwrap(),
        [3, 16, 17, 100, 300, 511].into(),
        "the finalize changes nothing in the history"
    );
    write(200 * BLOCK, 4096, 0x5F);
    assert_eq!(
        changed(&agent, VOLUME, Since::Era(era)).await.unwrap(),
        [3, 16, 17, 100, 200, 300, 511].into(),
        "after finalize, the same history"
    );
    assert_eq!(sha256_of(&public, size), expected.sha256());
    // A snapshot holds the thin id's second activation beneath dm-era too:
    // a volume made from it has the same content.
    super::snapshots::snapshot(&agent, SNAPSHOT, VOLUME)
        .await
        .unwrap();
    let mut volumes = agent.volumes().await;
    super::snapshots::from_snapshot(&mut volumes, COPY, size, SNAPSHOT)
        .await
        .unwrap();
    let copy = publish(&mut volumes, COPY).await.unwrap();
    assert_eq!(sha256_of(Path::new(&copy), size), expected.sha256());
    unpublish(&mut volumes, COPY).await.unwrap();
    delete(&mut volumes, COPY).await.unwrap();
    assert_public_is_era(&agent, "dm-era stays through the finalize").await;
    println!(
        "MEASURED finalize pause with dm-era above the clone: {} us; {} of {} regions copied \
         when asked mid-hydration",
        last.finalize_pause_micros, hydrating.regions_hydrated, hydrating.regions_total
    );
    unpublish(&mut volumes, VOLUME).await.unwrap();
    assert!(
        our_devices_named(&agent.prefix, "lower-").await.is_empty(),
        "the layer beneath dm-era goes with the public device"
    );
    let path = publish(&mut volumes, VOLUME).await.unwrap();
    assert_eq!(sha256_of(Path::new(&path), size), expected.sha256());
    assert_eq!(
        changed(&agent, VOLUME, Since::Era(era)).await.unwrap(),
        [3, 16, 17, 100, 200, 300, 511].into(),
        "dm-era made again straight over the thin device keeps the history"
    );
    unpublish(&mut volumes, VOLUME).await.unwrap();
    dmclone::api::proto::v1::snapshots_client::SnapshotsClient::new(agent.channel().await)
        .delete_snapshot(dmclone::api::proto::v1::DeleteSnapshotRequest {
            snapshot_id: SNAPSHOT.into(),
        })
        .await
        .unwrap();
    delete(&mut volumes, VOLUME).await.unwrap();
    agent.destroy().await;
}

/// A volume moved without an attachment (Cinder's migrate) is unpublished
/// while it arrives: the device hydration runs through stays until the
/// transfer finishes, then goes, and the volume can be deleted.
#[tokio::test(flavor = "multi_thread")]
async fn an_arriving_volume_unpublished_loses_its_device_when_finished() {
    let size = 32 * MIB;
    let source = LoopDisk::with_pattern(size, 61);
    let agent = AgentProcess::start("dmctarrive").await;
    let mut client = TransfersClient::new(agent.channel().await);
    let mut volumes = agent.volumes().await;
    start(&mut client, source.path(), size, true, None)
        .await
        .unwrap();
    let public = public_path(&agent);
    let holder = std::fs::File::open(&public).unwrap();
    let busy = unpublish(&mut volumes, VOLUME).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains("detach it first"), "{busy:?}");
    assert_eq!(refusal_reason(&busy).as_deref(), Some("VOLUME_IN_USE"));
    drop(holder);

    unpublish(&mut volumes, VOLUME).await.unwrap();
    assert!(!get(&mut volumes, VOLUME).await.unwrap().published);
    assert_eq!(
        read_at(&public, 20 * MIB, 4096),
        pattern(61, 20 * MIB, 4096),
        "the device stays while the volume arrives"
    );
    publish(&mut volumes, VOLUME).await.unwrap();
    assert!(get(&mut volumes, VOLUME).await.unwrap().published);
    unpublish(&mut volumes, VOLUME).await.unwrap();

    client.commit_transfer(reference()).await.unwrap();
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done));
    let deadline = Instant::now() + Duration::from_secs(10);
    while public.exists() {
        assert!(
            Instant::now() < deadline,
            "{} still there",
            public.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!get(&mut volumes, VOLUME).await.unwrap().published);
    let path = publish(&mut volumes, VOLUME).await.unwrap();
    assert_eq!(
        sha256_of(Path::new(&path), size),
        sha256_of(source.path(), size)
    );
    unpublish(&mut volumes, VOLUME).await.unwrap();
    delete(&mut volumes, VOLUME).await.unwrap();
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_hydration_resumes_from_the_clone_metadata() {
    let size = 128 * MIB;
    let source = LoopDisk::with_pattern(size, 61);
    let mut agent = AgentProcess::start("dmctxkill").await;
    let mut client = TransfersClient::new(agent.channel().await);
    start(
        &mut client,
        source.path(),
        size,
        false,
        knobs(64 * 1024, 1, 1),
    )
    .await
    .unwrap();
    // Told another threshold than it was built with, as the kernel reads
    // its table back: still the transfer's own clone at each start.
    throttle(&mut client, 2, 1, 0).await;
    let mut seen = Vec::new();
    for round in 0..5u64 {
        tokio::time::sleep(Duration::from_millis(300 + round * 170)).await;
        agent.kill9().await;
        agent.restart().await;
        nothing_degraded_at_start(&agent);
        let now = TransfersClient::new(agent.channel().await)
            .get_transfer(reference())
            .await
            .unwrap()
            .into_inner();
        seen.push((now.state(), now.regions_hydrated));
        if now.state() == TransferState::Done {
            break;
        }
    }
    let hydrated: Vec<u64> = seen.iter().map(|(_, r)| *r).collect();
    assert!(
        hydrated.windows(2).all(|w| w[0] <= w[1]),
        "progress survives each crash: {seen:?}"
    );
    client = TransfersClient::new(agent.channel().await);
    client
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: TRANSFER.into(),
            knobs: Some(HydrationKnobs {
                hydration_threshold: 64,
                hydration_batch_size: 16,
                ..Default::default()
            }),
        })
        .await
        .ok();
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done), "{states:?}");
    assert_eq!(
        sha256_of(&public_path(&agent), size),
        sha256_of(source.path(), size)
    );
    println!("MEASURED transfer state after each kill -9: {seen:?}");
    agent.destroy().await;
}

/// The start and finalize of a transfer survive a crash between their steps.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_inside_start_finalize_and_abort() {
    let size = 16 * MIB;
    let source = LoopDisk::with_pattern(size, 67);
    let mut agent = AgentProcess::start("dmctxfp").await;
    let used = pool_used(&agent).await.0;
    for point in ["transfer.after_record", "transfer.after_metadata"] {
        crash(&mut agent, point, |mut c| {
            let path = source.path().to_owned();
            async move { assert!(start(&mut c, &path, size, false, None).await.is_err()) }
        })
        .await;
        let mut client = TransfersClient::new(agent.channel().await);
        assert_eq!(
            client.get_transfer(reference()).await.unwrap_err().code(),
            Code::NotFound,
            "{point}"
        );
        assert_eq!(
            get(&mut agent.volumes().await, VOLUME)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound,
            "{point}"
        );
        assert_eq!(pool_used(&agent).await.0, used, "{point}");
        assert!(
            our_devices_named(&agent.prefix, "")
                .await
                .iter()
                .all(|n| !n.contains(VOLUME)),
            "{point}"
        );
    }
    for (point, id) in [
        (
            "finalize.after_record",
            "6b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d0a",
        ),
        (
            "finalize.after_resume",
            "6b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d0c",
        ),
        (
            "finalize.after_swap",
            "6b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d0b",
        ),
    ] {
        crash(&mut agent, point, |mut c| {
            let path = source.path().to_owned();
            async move {
                // A move this small may reach the finalize's crash point
                // before the start's answer is sent: the connection then
                // breaks, and the start is recorded all the same.
                if let Err(status) = start_as(&mut c, id, &path, size, false, None).await {
                    assert!(
                        matches!(status.code(), Code::Unknown | Code::Unavailable)
                            && status.message().contains("transport error"),
                        "{point}: {status:?}"
                    );
                }
            }
        })
        .await;
        let (states, _) = watch_to_the_end_of(&agent, id).await;
        assert_eq!(
            states.last(),
            Some(&TransferState::Done),
            "{point}: {states:?}"
        );
        assert_eq!(
            sha256_of(&public_path(&agent), size),
            sha256_of(source.path(), size),
            "{point}"
        );
        assert!(
            our_devices_named(&agent.prefix, "cmeta-").await.is_empty(),
            "{point}"
        );
        unpublish(&mut agent.volumes().await, VOLUME).await.unwrap();
        delete(&mut agent.volumes().await, VOLUME).await.unwrap();
    }
    let mut client = TransfersClient::new(agent.channel().await);
    start(&mut client, source.path(), size, true, None)
        .await
        .unwrap();
    crash(&mut agent, "abort.after_record", |mut c| async move {
        assert!(c.abort_transfer(abort_request()).await.is_err());
    })
    .await;
    assert_eq!(
        transfer(&mut TransfersClient::new(agent.channel().await))
            .await
            .state(),
        TransferState::Aborted
    );
    assert_eq!(
        get(&mut agent.volumes().await, VOLUME)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(pool_used(&agent).await.0, used);
    agent.destroy().await;
}

async fn crash<F, Fut>(agent: &mut AgentProcess, point: &str, call: F)
where
    F: FnOnce(TransfersClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    agent
        .crash_inside(point, async move |agent| {
            call(TransfersClient::new(agent.channel().await)).await
        })
        .await;
}

/// The source fails mid-hydration: the transfer shows degraded, and resumes
/// by itself once the source answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_source_degrades_the_transfer_until_it_returns() {
    let size = 64 * MIB;
    let disk = LoopDisk::with_pattern(size, 71);
    let dm = kernel();
    remove_all_with_prefix(&dm, "dmctflaky").await;
    let source_name = name("dmctflaky", "source");
    let healthy = table(
        size / SECTOR,
        Target::Linear(Linear {
            device: disk.dev,
            offset: Sectors(0),
        }),
    );
    dm.create(&source_name, None, &healthy).await.unwrap();
    // Stall detection after 2 s instead of 30, for the test.
    let agent = AgentProcess::start_with(
        "dmctdegr",
        &["--pool-file-size", "1G", "--transfer-stall-seconds", "2"],
        &[],
    )
    .await;
    let mut client = TransfersClient::new(agent.channel().await);
    start(
        &mut client,
        &source_name.mapper_path(),
        size,
        false,
        knobs(64 * 1024, 1, 1),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    dm.swap_table(&source_name, &table(size / SECTOR, Target::Error))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let degraded = loop {
        let now = transfer(&mut client).await;
        if now.state() == TransferState::Degraded {
            break now;
        }
        assert!(
            now.state() != TransferState::Done,
            "finished before the outage: {now:?}"
        );
        assert!(
            Instant::now() < deadline,
            "never reported degraded: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(degraded.message.contains("source"), "{degraded:?}");
    dm.swap_table(&source_name, &healthy).await.unwrap();
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done), "{states:?}");
    assert_eq!(
        sha256_of(&public_path(&agent), size),
        sha256_of(disk.path(), size)
    );
    agent.destroy().await;
    remove_all_with_prefix(&dm, "dmctflaky").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_transfer_requests_get_precise_codes() {
    let source = LoopDisk::with_pattern(16 * MIB, 73);
    let agent = AgentProcess::start("dmctxbad").await;
    let mut client = TransfersClient::new(agent.channel().await);
    let request = |size: u64, path: &str| StartTransferRequest {
        transfer_id: TRANSFER.into(),
        volume_id: VOLUME.into(),
        size_bytes: size,
        source: Some(Source::DevicePath(path.into())),
        deferred: true,
        knobs: None,
        leave_snapshots: false,
    };
    let path = source.path().display().to_string();
    let cases = [
        (
            "larger than the source",
            request(32 * MIB, &path),
            Code::InvalidArgument,
        ),
        (
            "not a block device",
            request(MIB, "/etc/hostname"),
            Code::InvalidArgument,
        ),
        (
            "relative path",
            request(MIB, "dev/loop0"),
            Code::InvalidArgument,
        ),
        (
            "no source",
            StartTransferRequest {
                source: None,
                ..request(MIB, &path)
            },
            Code::InvalidArgument,
        ),
        (
            "bad region",
            StartTransferRequest {
                knobs: knobs(3000, 0, 0),
                ..request(MIB, &path)
            },
            Code::InvalidArgument,
        ),
        (
            "bad id",
            StartTransferRequest {
                transfer_id: "t1".into(),
                ..request(MIB, &path)
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, code) in cases {
        let status = client.start_transfer(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
    assert_eq!(
        client.get_transfer(reference()).await.unwrap_err().code(),
        Code::NotFound
    );
    super::api::create(&mut agent.volumes().await, VOLUME, 16 * MIB)
        .await
        .unwrap();
    let exists = client
        .start_transfer(request(16 * MIB, &path))
        .await
        .unwrap_err();
    assert_eq!(exists.code(), Code::AlreadyExists, "{exists:?}");
    assert!(super::api::list(&mut agent.volumes().await).await.len() == 1);
    agent.destroy().await;
}

/// The device numbers a device sits on, from sysfs.
fn slaves_of(dev: dmclone::dm::table::DevRef) -> Vec<String> {
    let dir = format!("/sys/dev/block/{}:{}/slaves", dev.major, dev.minor);
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| format!("/dev/{}", entry.file_name().to_string_lossy()))
        .collect()
}

/// Another tenant's volume, the pool, the devices under it, and a device
/// someone stacked on a volume are no source: each is refused with the
/// reason and leaves nothing; a loop device of the test's own is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_on_the_agents_own_storage_is_refused() {
    let prefix = "dmctownsrc";
    let agent = AgentProcess::start(prefix).await;
    let tenant = "8b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d50";
    let mut volumes = agent.volumes().await;
    super::api::create(&mut volumes, tenant, 8 * MIB)
        .await
        .unwrap();
    publish(&mut volumes, tenant).await.unwrap();
    let dm = kernel();
    let thin = name(prefix, &format!("thin-{tenant}"));
    let stacked = name("dmctstacked", "on-a-volume");
    remove_all_with_prefix(&dm, "dmctstacked").await;
    let thin_dev = dm.info(&thin).await.unwrap().unwrap().device;
    let over = table(
        8 * MIB / SECTOR,
        Target::Linear(Linear {
            device: thin_dev,
            offset: Sectors(0),
        }),
    );
    dm.create(&stacked, None, &over).await.unwrap();
    let pool_data = dm
        .info(&name(prefix, "pool-data"))
        .await
        .unwrap()
        .unwrap()
        .device;
    let mut candidates = vec![
        format!("/dev/mapper/{prefix}-{tenant}"),
        format!("/dev/mapper/{prefix}-thin-{tenant}"),
        format!("/dev/mapper/{prefix}-pool"),
        format!("/dev/mapper/{prefix}-pool-data"),
        format!("/dev/mapper/{prefix}-pool-meta"),
        format!("/dev/mapper/{}", stacked.as_str()),
    ];
    candidates.extend(slaves_of(pool_data));
    assert!(
        candidates.len() >= 7,
        "the pool's data sits on a device: {candidates:?}"
    );
    let mut client = TransfersClient::new(agent.channel().await);
    let listed = super::api::list(&mut volumes).await;
    for (n, path) in candidates.iter().enumerate() {
        let refused = start_as(
            &mut client,
            &format!("6b9d1c3e-5f1a-4f7e-9a57-{n:012}"),
            Path::new(path),
            4 * MIB,
            true,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{path}: {refused:?}");
        assert!(
            refused.message().contains("own storage"),
            "{path}: {refused:?}"
        );
    }
    assert_eq!(
        super::api::list(&mut volumes).await,
        listed,
        "nothing was made"
    );
    let own_disk = LoopDisk::with_pattern(4 * MIB, 5);
    let accepted = start_as(&mut client, TRANSFER, own_disk.path(), 4 * MIB, true, None)
        .await
        .unwrap();
    assert_eq!(accepted.state(), TransferState::Deferred);
    client.abort_transfer(abort_request()).await.unwrap();
    dm.remove(&stacked).await.unwrap();
    agent.destroy().await;
}

/// The source's path names another device when the agent comes back (as a
/// reboot may rename disks): the transfer is DEGRADED saying so and reads
/// nothing of that device; once the path names the source again, the move
/// finishes with the source's content.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_path_naming_another_device_is_never_copied() {
    let size = 8 * MIB;
    let (disk_a, disk_b) = (
        LoopDisk::with_pattern(size, 21),
        LoopDisk::with_pattern(size, 22),
    );
    let dm = kernel();
    remove_all_with_prefix(&dm, "dmctsrcid").await;
    let source_name = name("dmctsrcid", "source");
    let over = |disk: &LoopDisk| {
        table(
            size / SECTOR,
            Target::Linear(Linear {
                device: disk.dev,
                offset: Sectors(0),
            }),
        )
    };
    dm.create(&source_name, Some("DMCTEST-source-a"), &over(&disk_a))
        .await
        .unwrap();
    let prefix = "dmctsrcidag";
    let mut agent = AgentProcess::start(prefix).await;
    let mut client = TransfersClient::new(agent.channel().await);
    let mut slow = knobs(4096, 1, 1);
    slow.as_mut().unwrap().max_bytes_per_second = 256 * 1024;
    start(&mut client, &source_name.mapper_path(), size, false, slow)
        .await
        .unwrap();
    agent.kill9().await;
    // What a reboot does: the agent's devices are gone, and another disk
    // sits where the source was.
    let lower = name(prefix, &format!("lower-{VOLUME}"));
    dm.remove(&name(prefix, VOLUME)).await.unwrap();
    dm.remove(&lower).await.unwrap();
    dm.remove(&source_name).await.unwrap();
    dm.create(&source_name, Some("DMCTEST-source-b"), &over(&disk_b))
        .await
        .unwrap();
    let reads_before = block_stat(disk_b.dev)[0];
    agent.restart().await;
    let mut client = TransfersClient::new(agent.channel().await);
    let degraded = transfer(&mut client).await;
    assert_eq!(degraded.state(), TransferState::Degraded, "{degraded:?}");
    assert!(
        degraded.message.contains("is now another device"),
        "{degraded:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(dm.info(&lower).await.unwrap(), None, "no clone");
    assert_eq!(dm.info(&name(prefix, VOLUME)).await.unwrap(), None);
    assert_eq!(
        block_stat(disk_b.dev)[0],
        reads_before,
        "nothing read from the other disk"
    );

    dm.remove(&source_name).await.unwrap();
    dm.create(&source_name, Some("DMCTEST-source-a"), &over(&disk_a))
        .await
        .unwrap();
    let (states, _) = watch_to_the_end(&agent).await;
    assert_eq!(states.last(), Some(&TransferState::Done), "{states:?}");
    assert_eq!(
        sha256_of(&public_path(&agent), size),
        sha256_of(disk_a.path(), size)
    );
    agent.destroy().await;
    remove_all_with_prefix(&dm, "dmctsrcid").await;
}

/// A move hydrates every region it copies: one the pool could not write in
/// full below its low-space mark is refused before anything is made
/// (RESOURCE_EXHAUSTED, saying why), although the pool's promise limit
/// alone would have let it in.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_the_pool_cannot_write_in_full_is_refused() {
    let size = 920 * MIB;
    let source = LoopDisk::new(size);
    let agent = AgentProcess::start("dmctfill").await;
    let mut client = TransfersClient::new(agent.channel().await);
    let refused = start(&mut client, source.path(), size, false, None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("writes every region"),
        "{refused:?}"
    );
    let absent = get(&mut agent.volumes().await, VOLUME).await.unwrap_err();
    assert_eq!(absent.code(), Code::NotFound, "nothing recorded");
    assert!(!public_path(&agent).exists(), "nothing presented");
    agent.destroy().await;
}
