//! A move's source going away mid-move. The destination reaches the source
//! through a TCP relay in this test, so cutting the relay is a network
//! outage that neither agent is told about: connections drop and new ones
//! are refused until it is restored. Two readers read the moving volume
//! with O_DIRECT meanwhile, one a range already copied, one a range not
//! yet copied (hydration is rate-limited so it stays that way).

use std::{
    fs::OpenOptions,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dmclone::{
    api::proto::v1::{
        HydrationKnobs, NvmeTcpSource, StartTransferRequest, Transfer, TransferState,
        start_transfer_request::Source,
    },
    dm::status::CloneStatus,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

use super::{
    api::{create, publish, unpublish},
    fixture::AgentProcess,
    moves::{Ids, agent_with, export, fill, get_transfer, ids, public, transfers},
};
use crate::support::*;

const SIZE: u64 = 64 * MIB;
/// Slow enough that the last MiBs stay uncopied through every outage.
const COPY_RATE: u64 = 2 * MIB;
const COPIED: u64 = 0;
const UNCOPIED: u64 = 56 * MIB;

/// A TCP relay from 127.0.0.1:`port` to the source's NVMe/TCP port.
pub(super) struct Relay {
    port: u16,
    upstream: u16,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    pub(super) fn port(&self) -> u16 {
        self.port
    }

    pub(super) async fn start(port: u16, upstream: u16) -> Self {
        let relay = Self {
            port,
            upstream,
            tasks: Arc::default(),
        };
        relay.restore().await;
        relay
    }

    /// Listens again; every connection is relayed byte for byte.
    pub(super) async fn restore(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the relay");
        let (upstream, tasks) = (self.upstream, Arc::clone(&self.tasks));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(relay.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Drops every relayed connection and stops listening (connects are
    /// refused): the network between the two hosts is gone.
    pub(super) fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// One read: when it started, how long it took, whether it failed.
#[derive(Debug, Clone, Copy)]
struct Read4k {
    at: Instant,
    took: Duration,
    failed: bool,
}

/// Reads 4 KiB with O_DIRECT from `[start, start + 8 MiB)` in a loop; a
/// failed read is recorded, not fatal.
struct Reader {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<Read4k>>,
}

impl Reader {
    fn start(path: PathBuf, start: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(&path)
                .expect("open the moving volume");
            let mut buf = AlignedBuf::new(4096);
            let mut reads = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let offset = start + (reads.len() as u64 * 7919 % 2048) * 4096;
                let at = Instant::now();
                let failed = file
                    .seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(buf.as_mut_slice()))
                    .is_err();
                reads.push(Read4k {
                    at,
                    took: at.elapsed(),
                    failed,
                });
                thread::sleep(Duration::from_millis(20));
            }
            reads
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<Read4k> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("reader thread")
    }
}

/// The longest read that started or was under way in `[from, to)`.
fn slowest_in(reads: &[Read4k], from: Instant, to: Instant) -> Duration {
    reads
        .iter()
        .filter(|r| r.at < to && r.at + r.took >= from)
        .map(|r| r.took)
        .max()
        .unwrap_or_default()
}

fn failures(reads: &[Read4k]) -> Vec<&Read4k> {
    reads.iter().filter(|r| r.failed).collect()
}

/// A volume of SIZE filled on `a`, exported to `b`, moving to `b` through
/// the relay at COPY_RATE; returns the source's sha256 once the first MiBs
/// are copied.
async fn moving(ids: Ids, a: &AgentProcess, b: &AgentProcess, relay: &Relay, seed: u64) -> String {
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, ids.volume, SIZE).await.unwrap();
    let path_a = publish(&mut volumes_a, ids.volume).await.unwrap();
    fill(Path::new(&path_a), seed, SIZE);
    let source_sha = sha256_of(Path::new(&path_a), SIZE);
    unpublish(&mut volumes_a, ids.volume).await.unwrap();
    let exported = export(ids, a, b).await.unwrap();
    transfers(b)
        .await
        .start_transfer(StartTransferRequest {
            transfer_id: ids.transfer.into(),
            volume_id: ids.volume.into(),
            size_bytes: SIZE,
            source: Some(Source::NvmeTcp(NvmeTcpSource {
                subsystem_nqn: exported.subsystem_nqn.clone(),
                transport_address: exported.transport_address.clone(),
                transport_service_id: u32::from(relay.port),
                source_agent_endpoint: format!("unix:{}", a.socket().display()),
                release_token: exported.release_token.clone(),
                dhchap_host_secret: exported.dhchap_host_secret.clone(),
                dhchap_ctrl_secret: exported.dhchap_ctrl_secret.clone(),
            })),
            deferred: false,
            knobs: Some(HydrationKnobs {
                max_bytes_per_second: COPY_RATE,
                ..HydrationKnobs::default()
            }),
            leave_snapshots: false,
        })
        .await
        .unwrap();
    // Under a byte limit regions are copied one at a time, in order: the
    // copied reader's 8 MiB are in once 8 MiB are.
    wait_for(ids, b, "8 MiB copied", |t| t.bytes_hydrated >= 8 * MIB).await;
    source_sha
}

async fn wait_for(
    ids: Ids,
    agent: &AgentProcess,
    what: &str,
    reached: impl Fn(&Transfer) -> bool,
) -> Transfer {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let now = get_transfer(ids, agent).await;
        if reached(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "never {what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Cuts the relay for `outage`, then restores it; returns the transfer as
/// first seen DEGRADED for the lost connection meanwhile, if it was.
async fn outage(
    ids: Ids,
    agent: &AgentProcess,
    relay: &Relay,
    outage: Duration,
) -> Option<Transfer> {
    relay.cut();
    let until = Instant::now() + outage;
    let mut degraded = None;
    while Instant::now() < until {
        let now = get_transfer(ids, agent).await;
        // Another reason may show first: a stall seen before the
        // connection's state changed.
        if degraded.is_none()
            && now.state() == TransferState::Degraded
            && now.message.contains("the connection to the source")
        {
            degraded = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    relay.restore().await;
    degraded
}

/// With the defaults (I/O waits until the kernel gives up on the source,
/// 120 s), outages of 5 s and 30 s cost a guest a pause and no error: reads
/// of copied regions go on, reads of regions not yet copied wait. The
/// transfer is DEGRADED while the source is away and ends equal.
#[tokio::test(flavor = "multi_thread")]
async fn outages_of_5_and_30_seconds_pause_uncopied_reads_and_fail_nothing() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d20",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d20",
    );
    let a = agent_with(
        "dmctouta",
        4444,
        "0a000000-0000-4000-8000-000000000020",
        &[],
    )
    .await;
    let b = agent_with(
        "dmctoutb",
        4445,
        "0b000000-0000-4000-8000-000000000021",
        &[],
    )
    .await;
    let relay = Relay::start(14444, 4444).await;
    let source_sha = moving(ids, &a, &b, &relay, 71).await;
    let copied = Reader::start(public(ids, &b), COPIED);
    let uncopied = Reader::start(public(ids, &b), UNCOPIED);

    let mut spans = Vec::new();
    for seconds in [5, 30] {
        let cut = Instant::now();
        let degraded = outage(ids, &b, &relay, Duration::from_secs(seconds)).await;
        let restored = Instant::now();
        let back = wait_for(ids, &b, "hydrating again", |t| {
            t.state() == TransferState::Hydrating && t.bytes_hydrated > 0
        })
        .await;
        spans.push((seconds, cut, restored, degraded, back.state()));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let done = wait_for(ids, &b, "done", |t| t.state() == TransferState::Done).await;
    let (copied, uncopied) = (copied.finish(), uncopied.finish());

    assert!(failures(&copied).is_empty(), "{:?}", failures(&copied));
    assert!(failures(&uncopied).is_empty(), "{:?}", failures(&uncopied));
    for (seconds, cut, restored, degraded, _) in &spans {
        let degraded = degraded
            .as_ref()
            .expect("DEGRADED while the source was away");
        assert!(
            degraded
                .message
                .contains("the connection to the source 127.0.0.1:14444 is")
                && degraded.message.contains("wait up to 120 s"),
            "{}",
            degraded.message
        );
        let copied_stall = slowest_in(&copied, *cut, *restored);
        let uncopied_stall = slowest_in(&uncopied, *cut, *restored + Duration::from_secs(3));
        println!(
            "MEASURED source outage {seconds} s: slowest read of a copied region {} ms, of an uncopied region {} ms, no errors",
            copied_stall.as_millis(),
            uncopied_stall.as_millis()
        );
        assert!(copied_stall < Duration::from_secs(2), "{copied_stall:?}");
        assert!(
            uncopied_stall >= Duration::from_secs(*seconds - 1)
                && uncopied_stall < Duration::from_secs(seconds + 15),
            "an uncopied read waits out the outage: {uncopied_stall:?}"
        );
    }
    assert_eq!(done.bytes_hydrated, SIZE);
    assert_eq!(sha256_of(&public(ids, &b), SIZE), source_sha);
    b.destroy().await;
    a.destroy().await;
}

/// With `fast_io_fail_timeout_seconds` 3 and `ctrl_loss_timeout_seconds` 8,
/// a 20 s outage fails reads of regions not yet copied after 3 s and never
/// those of regions copied; the kernel gives up on the connection, the
/// agent connects again once the source is back, and the move ends equal.
#[tokio::test(flavor = "multi_thread")]
async fn a_longer_outage_fails_only_uncopied_reads_and_the_move_resumes() {
    let ids = ids(
        "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d21",
        "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d21",
    );
    let timeouts = [
        "--nvme-fast-io-fail-timeout-seconds",
        "3",
        "--nvme-ctrl-loss-timeout-seconds",
        "8",
    ];
    let a = agent_with(
        "dmctoutc",
        4446,
        "0a000000-0000-4000-8000-000000000022",
        &[],
    )
    .await;
    let b = agent_with(
        "dmctoutd",
        4447,
        "0b000000-0000-4000-8000-000000000023",
        &timeouts,
    )
    .await;
    let relay = Relay::start(14446, 4446).await;
    let source_sha = moving(ids, &a, &b, &relay, 72).await;
    let copied = Reader::start(public(ids, &b), COPIED);
    let uncopied = Reader::start(public(ids, &b), UNCOPIED);

    let cut = Instant::now();
    relay.cut();
    let lost = wait_for(ids, &b, "told the kernel gave up", |t| {
        t.state() == TransferState::Degraded && t.message.contains("gave up")
    })
    .await;
    let lost_after = cut.elapsed();
    // The clone sits beneath the public device's dm-era.
    let clone: CloneStatus = kernel()
        .status_of(&name("dmctoutd", &format!("lower-{}", ids.volume)), 0)
        .await
        .unwrap();
    // The byte budget has long been repaid: only the outage holds copying.
    assert_eq!(clone.hydration_threshold, 0, "copying stopped: {clone:?}");
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed())).await;
    relay.restore().await;
    let restored = Instant::now();
    wait_for(ids, &b, "hydrating again", |t| {
        t.state() == TransferState::Hydrating
    })
    .await;
    let resumed_after = restored.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done = wait_for(ids, &b, "done", |t| t.state() == TransferState::Done).await;
    let (copied, uncopied) = (copied.finish(), uncopied.finish());

    assert!(failures(&copied).is_empty(), "{:?}", failures(&copied));
    let failed = failures(&uncopied);
    let first = failed.first().expect("reads of uncopied regions failed");
    let last = failed.last().unwrap();
    let first_after = (first.at + first.took).duration_since(cut);
    let last_after = (last.at + last.took).duration_since(cut);
    println!(
        "MEASURED 20 s outage, fast_io_fail 3 s, ctrl_loss 8 s: first failed uncopied read {} ms after the cut, last {} ms; \
         {} of {} uncopied reads failed, 0 of {} copied; slowest copied read {} ms; kernel gave up (seen) after {} ms; \
         hydrating again {} ms after the source returned",
        first_after.as_millis(),
        last_after.as_millis(),
        failed.len(),
        uncopied.len(),
        copied.len(),
        slowest_in(&copied, cut, Instant::now()).as_millis(),
        lost_after.as_millis(),
        resumed_after.as_millis()
    );
    assert!(
        first_after >= Duration::from_secs(2) && first_after < Duration::from_secs(12),
        "{first_after:?}"
    );
    assert!(
        last.at < restored + resumed_after + Duration::from_secs(2),
        "uncopied reads work again once the move resumed"
    );
    assert!(
        uncopied
            .iter()
            .any(|r| r.at > restored + resumed_after && !r.failed),
        "uncopied reads succeed after the source returned"
    );
    assert!(lost.message.contains("127.0.0.1:14446"), "{}", lost.message);
    assert_eq!(done.bytes_hydrated, SIZE);
    assert_eq!(sha256_of(&public(ids, &b), SIZE), source_sha);
    b.destroy().await;
    a.destroy().await;
}
