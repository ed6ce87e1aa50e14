//! The agent: owns the kernel handle, the store, the pool and the locks; the
//! one facade the API layer and the tests call. Knows nothing of gRPC.

use std::{path::Path, sync::Arc, time::Instant};

use tracing::{info, warn};

use crate::{
    config::Settings,
    dm::{Kernel, LiveKernel, kernel::TargetVersion, missing_targets, names::Naming},
    error::AgentError,
    failpoint,
    locks::Locks,
    metrics::Metrics,
    nvme::{HostId, Nqn},
    pool::{Pool, PoolUsage, backing::Backing},
    reconcile::ReconcileReport,
    store::{Store, TransferRecord},
    transfer::{Registry, release::SourceReleaser},
};

/// Who this agent is and what its kernel offers.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: String,
    pub hostname: String,
    pub agent_version: &'static str,
    pub api_version: &'static str,
    pub kernel_release: String,
    pub dm_ioctl_version: (u32, u32, u32),
    pub targets: Vec<TargetVersion>,
    pub pool: PoolUsage,
    pub host_nqn: String,
    /// Sum of the sizes of every volume and snapshot.
    pub provisioned_bytes: u64,
    pub volume_count: usize,
}

#[derive(Debug)]
pub struct Agent {
    pub(crate) dm: Arc<dyn Kernel>,
    pub(crate) store: Store,
    pub(crate) pool: Pool,
    pub(crate) naming: Naming,
    pub(crate) locks: Locks,
    pub(crate) settings: Settings,
    pub(crate) node_id: String,
    pub(crate) reconcile: ReconcileReport,
    pub(crate) transfers: Registry,
    pub(crate) nvme: NvmeIdentity,
    pub(crate) metrics: Metrics,
    /// Asks source agents to drop their copies once a move here is done.
    pub(crate) source_releaser: Arc<dyn SourceReleaser>,
    pub(crate) background: Background,
}

/// The agent's own tasks (transfer monitors, source releases, the pool
/// watcher), kept so that stopping the agent stops them.
#[derive(Debug, Default)]
pub(crate) struct Background(std::sync::Mutex<Vec<tokio::task::AbortHandle>>);

impl Background {
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        let mut tasks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle);
    }

    fn stop(&self) {
        let mut tasks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl Agent {
    /// Opens device-mapper, the store and the pool, then reconciles the kernel
    /// with the store. The agent serves requests only after this returns.
    /// `source_releaser` reaches other agents (the API layer provides it).
    pub async fn start(
        settings: Settings,
        source_releaser: Arc<dyn SourceReleaser>,
    ) -> Result<Arc<Self>, AgentError> {
        failpoint::check_configured().map_err(|reason| AgentError::Config {
            option: failpoint::ENV.to_owned(),
            reason,
        })?;
        let dm: Arc<dyn Kernel> = Arc::new(LiveKernel::open()?);
        // Before the pool's device is touched (a loop device attached).
        check_targets(dm.as_ref()).await?;
        let backing = Backing::open(&settings.pool.backing).await?;
        Self::assemble(settings, dm, backing, source_releaser).await
    }

    /// Starts over `dm` with the pool on `backing`: the whole start but for
    /// opening the host's kernel and the configured device (tests hand in an
    /// in-memory kernel).
    pub async fn start_on(
        settings: Settings,
        dm: Arc<dyn Kernel>,
        backing: Backing,
        source_releaser: Arc<dyn SourceReleaser>,
    ) -> Result<Arc<Self>, AgentError> {
        check_targets(dm.as_ref()).await?;
        Self::assemble(settings, dm, backing, source_releaser).await
    }

    /// The start after the kernel's targets were checked.
    async fn assemble(
        settings: Settings,
        dm: Arc<dyn Kernel>,
        backing: Backing,
        source_releaser: Arc<dyn SourceReleaser>,
    ) -> Result<Arc<Self>, AgentError> {
        prepare_state_dir(&settings.state_dir)?;
        let store = {
            let dir = settings.state_dir.clone();
            blocking(move || Store::open(&dir)).await?
        };
        let node_id = match &settings.node_id {
            Some(id) => id.clone(),
            None => {
                let store = store.clone();
                blocking(move || store.node_id(generate_node_id)).await?
            }
        };
        let naming = Naming::new(&settings.dm_prefix)?;
        let nvme = nvme_identity(&settings, &store).await?;
        let pool = Pool::open(&dm, &naming, &settings.pool, backing).await?;
        let mut agent = Self {
            dm,
            store,
            pool,
            naming,
            locks: Locks::default(),
            settings,
            node_id,
            reconcile: ReconcileReport::default(),
            transfers: Registry::default(),
            nvme,
            metrics: Metrics::new(),
            source_releaser,
            background: Background::default(),
        };
        let started = Instant::now();
        agent.reconcile = agent.reconcile_all().await?;
        agent.reconcile.duration = started.elapsed();
        agent
            .metrics
            .reconciled(agent.reconcile.duration.as_secs_f64());
        info!(
            node_id = %agent.node_id,
            volumes = agent.reconcile.volumes,
            rebuilt = agent.reconcile.rebuilt,
            finished = agent.reconcile.finished,
            rolled_back = agent.reconcile.rolled_back,
            quarantined = agent.reconcile.quarantined,
            unknown_devices = agent.reconcile.unknown_devices.len(),
            millis = agent.reconcile.duration.as_millis() as u64,
            "reconciled the kernel with the store"
        );
        let agent = Arc::new(agent);
        agent.watch_pool_events();
        let transfers = agent
            .store_call(|store| store.all::<TransferRecord>())
            .await?;
        agent.resume_monitors(&transfers);
        Ok(agent)
    }

    /// Stops the agent's background work (monitors, releases, watchers)
    /// where it stands; every piece of it resumes from the store at the next
    /// start, as after a crash.
    pub fn stop_background(&self) {
        self.background.stop();
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What the last start-up reconciliation did.
    pub fn reconcile_report(&self) -> &ReconcileReport {
        &self.reconcile
    }

    pub async fn node_info(&self) -> Result<NodeInfo, AgentError> {
        let (major, minor, patch) = self.dm.version().await?;
        let mut targets = self.dm.target_versions().await?;
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        let volumes = self.store_call(|store| store.volumes()).await?;
        Ok(NodeInfo {
            node_id: self.node_id.clone(),
            hostname: read_proc("/proc/sys/kernel/hostname"),
            agent_version: env!("CARGO_PKG_VERSION"),
            api_version: "dmclone.v1",
            kernel_release: read_proc("/proc/sys/kernel/osrelease"),
            dm_ioctl_version: (major, minor, patch),
            targets,
            pool: self.pool.usage().await?,
            host_nqn: self.nvme.host_nqn.to_string(),
            provisioned_bytes: self.provisioned_bytes().await?,
            volume_count: volumes.len(),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The exposition text with the agent's current state.
    pub async fn render_metrics(&self) -> Result<String, AgentError> {
        use crate::metrics::{Snapshot, TransferFigures};
        let usage = self.pool.usage().await?;
        let volumes = self.store_call(|store| store.volumes()).await?;
        let mut volume_states: std::collections::BTreeMap<&'static str, u64> = Default::default();
        for record in &volumes {
            let state = self.volume_state(record).as_str();
            *volume_states.entry(state).or_default() += 1;
        }
        let transfers = self.list_transfers().await?;
        let mut transfer_states: std::collections::BTreeMap<&'static str, u64> = Default::default();
        for view in &transfers {
            *transfer_states.entry(view.state.as_str()).or_default() += 1;
        }
        Ok(self.metrics.render(&Snapshot {
            pool_data_size: usage.data_total_bytes,
            pool_data_used: usage.data_used_bytes,
            pool_metadata_size: usage.metadata_total_bytes,
            pool_metadata_used: usage.metadata_used_bytes,
            pool_low_space: usage.low_space,
            volumes_by_state: volume_states.into_iter().collect(),
            transfers_by_state: transfer_states.into_iter().collect(),
            transfers: transfers
                .iter()
                .map(|v| TransferFigures {
                    transfer: v.id.to_string(),
                    volume: v.volume_id.to_string(),
                    hydrated_bytes: v.bytes_hydrated,
                    size_bytes: v.bytes_total,
                    hydrated_regions: v.regions_hydrated,
                    regions: v.regions_total,
                    bytes_per_second: v.bytes_per_second,
                })
                .collect(),
        }))
    }

    /// Runs a store call on the blocking pool (commits fsync).
    pub(crate) async fn store_call<T, F>(&self, call: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, AgentError> + Send + 'static,
    {
        let store = self.store.clone();
        blocking(move || call(&store)).await
    }

    /// Logs the pool's low-water and mode-change events as they happen; the
    /// allocation checks read the pool's status themselves.
    fn watch_pool_events(self: &Arc<Self>) {
        // Holds the kernel, not the agent, while it waits: the agent may go.
        let weak = Arc::downgrade(self);
        let dm = Arc::clone(&self.dm);
        let name = self.pool.name.clone();
        self.background.spawn(async move {
            let Some(mut seen) = dm.event_counter(&name) else {
                return;
            };
            loop {
                match dm.wait_for_event(&name, seen).await {
                    Ok(now) => seen = now,
                    Err(err) => {
                        warn!(pool = %name, error = %err, "stopped watching the pool's events");
                        return;
                    }
                }
                let Some(agent) = weak.upgrade() else { return };
                match agent.pool.usage().await {
                    Ok(usage) if usage.low_space => warn!(
                        pool = %name,
                        health = usage.health.as_str(),
                        data_used = usage.data_used_bytes,
                        data_total = usage.data_total_bytes,
                        metadata_used = usage.metadata_used_bytes,
                        metadata_total = usage.metadata_total_bytes,
                        "the thin pool reached its low-space mark: new allocations are refused"
                    ),
                    Ok(usage) => {
                        info!(pool = %name, health = usage.health.as_str(), "thin pool event")
                    }
                    Err(err) => {
                        warn!(pool = %name, error = %err, "cannot read the pool's status after an event")
                    }
                }
            }
        });
    }
}

async fn check_targets(dm: &dyn Kernel) -> Result<(), AgentError> {
    let targets = dm.target_versions().await?;
    let missing = missing_targets(targets.iter().map(|t| t.name.as_str()));
    if missing.is_empty() {
        return Ok(());
    }
    Err(AgentError::Unavailable {
        reason: format!(
            "the kernel lacks the device-mapper targets {}; load their modules (modprobe dm_clone dm_era dm_thin_pool)",
            missing.join(", ")
        ),
    })
}

fn prepare_state_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
        context: format!("cannot create the state directory {}", dir.display()),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        AgentError::Io {
            context: format!("cannot restrict the state directory {}", dir.display()),
            source,
        }
    })
}

/// A random UUID (v4) from the kernel's generator.
fn generate_node_id() -> String {
    read_proc("/proc/sys/kernel/random/uuid")
}

/// NVMe host NQN in the UUID form the spec reserves for hosts without one.
/// Who this host is on NVMe/TCP: the configured values, else the host's
/// /etc/nvme files (so the agent matches nvme-cli), else a host id made once
/// and kept in the store with the NQN the spec reserves for it.
async fn nvme_identity(settings: &Settings, store: &Store) -> Result<NvmeIdentity, AgentError> {
    let from_file = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let host_id = match settings
        .nvme
        .host_id
        .clone()
        .or_else(|| from_file("/etc/nvme/hostid"))
    {
        Some(id) => id,
        None => {
            let store = store.clone();
            blocking(move || store.host_id(generate_node_id)).await?
        }
    };
    let host_id = HostId::parse(&host_id)?;
    let host_nqn = settings
        .nvme
        .host_nqn
        .clone()
        .or_else(|| from_file("/etc/nvme/hostnqn"))
        .unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", host_id.as_str()));
    Ok(NvmeIdentity {
        host_nqn: Nqn::parse("nvme.host_nqn", &host_nqn)?,
        host_id,
    })
}

/// This agent on NVMe/TCP.
#[derive(Debug, Clone)]
pub struct NvmeIdentity {
    pub host_nqn: Nqn,
    pub host_id: HostId,
}

fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub(crate) async fn blocking<T, F>(call: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| AgentError::Internal(format!("a blocking task failed: {err}")))?
}
