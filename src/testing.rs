//! A host for unit tests of the domain: an agent over the in-memory kernel,
//! its state directory and pool file in a temporary directory. Restarting
//! keeps the kernel and the directory, as a crash of the agent process does.

use std::{path::Path, sync::Arc};

use crate::{
    agent::{Agent, Surroundings},
    config::{Config, Settings},
    dm::{fake::FakeKernel, table::DevRef},
    error::AgentError,
    ids::VolumeId,
    nvme::fake::FakeFabric,
    pool::backing::Backing,
    transfer::release::{
        DeltaAsk, DeltaChunk, DeltaChunks, DeltaFuture, DeltaRequest, ReleaseFuture,
        ReleaseRequest, ReturnTripDelta, SourceAction, SourceAnswer, SourceReleaser,
        TravellingSnapshot,
    },
};

pub const MIB: u64 = 1 << 20;
const POOL_FILE_BYTES: u64 = 256 * MIB;

#[derive(Debug)]
pub struct TestHost {
    pub kernel: Arc<FakeKernel>,
    pub fabric: Arc<FakeFabric>,
    /// What the agent asked source agents to release.
    pub releases: Arc<SourceAgents>,
    pub dir: tempfile::TempDir,
    backing_dev: DevRef,
    settings: Settings,
}

impl TestHost {
    pub fn new() -> Self {
        Self::with_config("")
    }

    /// A host whose config has `extra` TOML after the test's own lines.
    pub fn with_config(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let text = format!(
            "state_dir = {:?}\ndm_prefix = \"dmt\"\n{extra}\n[pool]\nfile_size = \"256MiB\"\n[nvme]\nhost_id = \"4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f\"\nhost_nqn = \"nqn.2014-08.org.nvmexpress:uuid:4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f\"\n",
            dir.path()
        );
        let settings = Config::from_toml(&text, Path::new("test.toml"))
            .and_then(|config| config.validate())
            .expect("valid test settings");
        let kernel = Arc::new(FakeKernel::new());
        let backing_dev = kernel.add_block_device(POOL_FILE_BYTES / 512);
        Self {
            fabric: Arc::new(FakeFabric::new(kernel.clone())),
            releases: Arc::new(SourceAgents::default()),
            kernel,
            dir,
            backing_dev,
            settings,
        }
    }

    /// The host's exports follow `policy` (nvme.auth).
    pub fn with_auth(mut self, policy: crate::nvme::auth::AuthPolicy) -> Self {
        self.settings.nvme.auth = policy;
        self
    }

    /// The pool promises up to `ratio` times its data
    /// (pool.max_oversubscription_ratio).
    pub fn with_oversubscription(mut self, ratio: f64) -> Self {
        self.settings.pool.max_oversubscription_ratio = ratio;
        self
    }

    /// Exports for a move wait this long for their claim
    /// (nvme.unclaimed_export_seconds).
    pub fn with_unclaimed_export_seconds(mut self, seconds: u64) -> Self {
        self.settings.nvme.unclaimed_export_seconds = seconds;
        self
    }

    /// The host exports volumes at `address` (nvme.export_address).
    pub fn with_export_address(mut self, address: &str) -> Self {
        self.settings.nvme.export = Some(address.parse().expect("an address"));
        self
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts an agent, reconciling what the kernel and the store hold.
    pub async fn start(&self) -> Result<Arc<Agent>, AgentError> {
        let backing = Backing::plain_file(
            &self.dir.path().join("pool.img"),
            POOL_FILE_BYTES,
            self.backing_dev,
        )?;
        let surroundings = Surroundings {
            dm: self.kernel.clone(),
            fabric: self.fabric.clone(),
            backing,
            source_releaser: self.releases.clone(),
        };
        Agent::start_on(self.settings.clone(), surroundings).await
    }

    /// Stops `agent` as a crash would (nothing is cleaned up) and starts a
    /// new one on the same kernel and state.
    pub async fn restart(&self, agent: Arc<Agent>) -> Result<Arc<Agent>, AgentError> {
        agent.stop_background();
        wait_until_dropped(agent).await;
        self.start().await
    }

    pub fn devices(&self) -> Vec<String> {
        self.kernel.device_names()
    }
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

/// Source agents as the host tests see them: every release asked for is
/// noted; they answer once a test lets them.
#[derive(Debug, Default)]
pub struct SourceAgents {
    asked: std::sync::Mutex<Vec<ReleaseRequest>>,
    answering: std::sync::atomic::AtomicBool,
    /// What a claim is answered with: where the volume comes from, the
    /// history tag there, and what a return trip asked.
    upstream: std::sync::Mutex<Vec<String>>,
    history: std::sync::Mutex<Option<u32>>,
    return_trip: std::sync::Mutex<Option<ReturnTripDelta>>,
    /// The snapshots claims list, and what a delta of each sends.
    snapshots: std::sync::Mutex<Vec<TravellingSnapshot>>,
    deltas: std::sync::Mutex<std::collections::BTreeMap<String, Vec<DeltaChunk>>>,
    delta_asks: std::sync::Mutex<Vec<DeltaAsk>>,
    deltas_held: std::sync::atomic::AtomicBool,
}

impl SourceAgents {
    /// Claims are answered with this chain (the source first) from now on.
    pub fn answer_claims_with(&self, upstream: &[&str]) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) =
            upstream.iter().map(|host| (*host).to_owned()).collect();
    }

    /// Claims say the volume has history tag `history` at the source.
    pub fn answer_history(&self, history: u32) {
        *self.history.lock().unwrap_or_else(|p| p.into_inner()) = Some(history);
    }

    /// Claims that ask for a return trip are answered with `delta`.
    pub fn answer_return_trips_with(&self, delta: ReturnTripDelta) {
        *self.return_trip.lock().unwrap_or_else(|p| p.into_inner()) = Some(delta);
    }

    /// Claims list `snapshots`; a delta of each sends its chunks (a
    /// snapshot without chunks is gone from the source: NOT_FOUND).
    pub fn offer_snapshots(&self, snapshots: Vec<(TravellingSnapshot, Vec<DeltaChunk>)>) {
        let mut deltas = self.deltas.lock().unwrap_or_else(|p| p.into_inner());
        let mut offered = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        for (snapshot, chunks) in snapshots {
            deltas.insert(snapshot.id.to_string(), chunks);
            offered.push(snapshot);
        }
    }

    /// Deltas are answered UNAVAILABLE while `held` (claims go on).
    pub fn hold_deltas(&self, held: bool) {
        self.deltas_held
            .store(held, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every delta asked for, in order.
    pub fn delta_asks(&self) -> Vec<DeltaAsk> {
        self.delta_asks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Source agents answer UNAVAILABLE from now on.
    pub fn stop_answering(&self) {
        self.answering
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Source agents answer from now on.
    pub fn answer(&self) {
        self.answering
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The volumes whose release (or withdrawal) was asked for, in order,
    /// repeats included.
    pub fn asked(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.volume_id).collect()
    }

    /// Every release and withdrawal asked for, in order.
    pub fn requests(&self) -> Vec<ReleaseRequest> {
        self.all()
            .into_iter()
            .filter(|r| r.action != SourceAction::Claim)
            .collect()
    }

    /// Every claim of an export made, in order.
    pub fn claims(&self) -> Vec<ReleaseRequest> {
        self.all()
            .into_iter()
            .filter(|r| r.action == SourceAction::Claim)
            .collect()
    }

    fn all(&self) -> Vec<ReleaseRequest> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl SourceReleaser for SourceAgents {
    fn snapshot_delta<'a>(&'a self, request: &'a DeltaRequest) -> DeltaFuture<'a> {
        let delta = self.delta(request);
        Box::pin(async move { delta })
    }

    fn release<'a>(&'a self, request: &'a ReleaseRequest) -> ReleaseFuture<'a> {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.clone());
        let answering = self.answering.load(std::sync::atomic::Ordering::SeqCst);
        let volume = request.volume_id.clone();
        let answer = match request.action {
            SourceAction::Claim => SourceAnswer {
                upstream: self
                    .upstream
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                history: *self.history.lock().unwrap_or_else(|p| p.into_inner()),
                return_trip: request.return_trip.as_ref().and_then(|_| {
                    self.return_trip
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                }),
                snapshots: self
                    .snapshots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            },
            _ => SourceAnswer::default(),
        };
        Box::pin(async move {
            if answering {
                return Ok(answer);
            }
            Err(AgentError::Unavailable {
                reason: format!("the source agent does not answer yet (release of {volume})"),
            })
        })
    }
}

impl SourceAgents {
    fn delta(&self, request: &DeltaRequest) -> Result<DeltaChunks, AgentError> {
        self.delta_asks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.ask.clone());
        if !self.answering.load(std::sync::atomic::Ordering::SeqCst)
            || self.deltas_held.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(AgentError::Unavailable {
                reason: "the source agent does not answer yet".into(),
            });
        }
        let chunks = self
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(request.ask.snapshot.as_str())
            .filter(|chunks| !chunks.is_empty())
            .cloned()
            .ok_or_else(|| AgentError::NotFound {
                what: "snapshot on the source",
                id: request.ask.snapshot.to_string(),
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for chunk in chunks {
            let _ = tx.try_send(Ok(chunk));
        }
        Ok(rx)
    }
}

/// Drops the agent and waits until its context, which holds the store, is
/// gone (the services and the background tasks being aborted hold it too),
/// and until the store opens again: a store call cut off by the stop may
/// still be closing the database on a blocking thread.
async fn wait_until_dropped(agent: Arc<Agent>) {
    let weak = Arc::downgrade(&agent.ctx);
    let state_dir = agent.ctx.settings.state_dir.clone();
    drop(agent);
    for _ in 0..200 {
        if weak.strong_count() == 0 && crate::store::Store::open(&state_dir).is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("the agent is still referenced: its store cannot be opened again");
}

/// A volume id made from a small number, readable in failures.
pub fn volume_id(n: u32) -> VolumeId {
    VolumeId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("a valid id")
}

/// The reason code of a refusal, or `None` for success or another error.
pub fn refusal<T>(result: &Result<T, AgentError>) -> Option<&'static str> {
    match result {
        Err(AgentError::Refused(refusal)) => Some(refusal.reason()),
        _ => None,
    }
}

/// Runs `call` with the failpoint `point` armed; the call must die there,
/// as the agent process would under `kill -9`.
pub async fn crash<F, T>(point: &'static str, call: F)
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let died = tokio::spawn(crate::failpoint::crash_at(point, call)).await;
    assert!(
        died.is_err_and(|err| err.is_panic()),
        "{point} was not reached"
    );
}

/// Waits (at most 4 s) until the transfer reaches `state`.
pub async fn transfer_reaches(
    agent: &Agent,
    id: &crate::ids::TransferId,
    state: crate::transfer::TransferState,
) -> crate::transfer::TransferView {
    for _ in 0..400 {
        let view = agent
            .transfers
            .get_transfer(id)
            .await
            .expect("the transfer exists");
        if view.state == state {
            return view;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "transfer {id} did not reach {state:?}: {:?}",
        agent.transfers.get_transfer(id).await
    );
}

/// An agent on `host` whose one transfer (of volume 1, from an 8 MiB device)
/// is done.
pub async fn finished_transfer(host: &TestHost) -> (Arc<Agent>, crate::ids::TransferId) {
    use crate::transfer::{KnobRequest, Source, StartRequest, TransferState};
    let source = Path::new("/dev/finished-source");
    host.kernel.add_block_device_at(source, 8 * MIB / 512);
    let agent = host.start().await.expect("the agent starts");
    let volume = volume_id(1);
    let transfer = crate::ids::TransferId::parse("20000000-0000-4000-8000-0000000000ff")
        .expect("a transfer id");
    agent
        .transfers
        .start_transfer(StartRequest {
            transfer: transfer.clone(),
            volume: volume.clone(),
            size_bytes: 8 * MIB,
            source: Source::Device(source.to_owned()),
            deferred: false,
            knobs: KnobRequest::default(),
            leave_snapshots: false,
        })
        .await
        .expect("the transfer starts");
    host.kernel.hydrate(&format!("dmt-lower-{volume}"));
    transfer_reaches(&agent, &transfer, TransferState::Done).await;
    (agent, transfer)
}
