//! The agent: starts the context (kernel handle, store, pool, locks), runs
//! the reconciliation, and holds the services the API layer and the tests
//! call. Knows nothing of gRPC.

use std::{path::Path, sync::Arc, time::Instant};

use tracing::{info, warn};

use crate::{
    changes::Changes,
    config::Settings,
    context::{Background, Context, NvmeIdentity, blocking},
    dm::{Kernel, LiveKernel, kernel::TargetVersion, missing_targets, names::Naming},
    error::AgentError,
    failpoint,
    locks::Locks,
    metrics::Metrics,
    nvme::{Fabric, HostId, LiveFabric, Nqn},
    pool::{Pool, PoolUsage, backing::Backing},
    reconcile::{ReconcileReport, Reconciler},
    snapshot::Snapshots,
    store::{Store, TransferRecord},
    transfer::{Exports, Registry, Transfers, release::SourceReleaser},
    volume::Volumes,
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

/// The agent: one context and the services over it, in the order they may
/// call each other (a service names only those above it in this list).
#[derive(Debug)]
pub struct Agent {
    pub(crate) ctx: Arc<Context>,
    pub volumes: Volumes,
    pub snapshots: Snapshots,
    pub changes: Changes,
    pub transfers: Transfers,
    pub exports: Exports,
    reconcile: ReconcileReport,
}

/// What an agent works through besides its state directory.
#[derive(Debug)]
pub struct Surroundings {
    /// Device-mapper.
    pub dm: Arc<dyn Kernel>,
    /// The kernel's NVMe/TCP target and host.
    pub fabric: Arc<dyn Fabric>,
    /// The pool's device.
    pub backing: Backing,
    /// Reaches source agents once a move here is done (the API layer's).
    pub source_releaser: Arc<dyn SourceReleaser>,
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
        // The embedded pool file lives in the state directory.
        prepare_state_dir(&settings.state_dir)?;
        let backing = Backing::open(&settings.pool.backing).await?;
        let surroundings = Surroundings {
            dm,
            fabric: Arc::new(LiveFabric),
            backing,
            source_releaser,
        };
        Self::assemble(settings, surroundings).await
    }

    /// Starts in `surroundings`: the whole start but for opening the host's
    /// kernel and the configured device (tests hand in in-memory ones).
    pub async fn start_on(
        settings: Settings,
        surroundings: Surroundings,
    ) -> Result<Arc<Self>, AgentError> {
        check_targets(surroundings.dm.as_ref()).await?;
        Self::assemble(settings, surroundings).await
    }

    /// The start after the kernel's targets were checked.
    async fn assemble(
        settings: Settings,
        surroundings: Surroundings,
    ) -> Result<Arc<Self>, AgentError> {
        let Surroundings {
            dm,
            fabric,
            backing,
            source_releaser,
        } = surroundings;
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
        let ctx = Arc::new(Context {
            dm,
            store,
            pool,
            naming,
            locks: Locks::default(),
            settings,
            node_id,
            registry: Registry::default(),
            nvme,
            fabric,
            metrics: Metrics::new(),
            source_releaser,
            background: Background::default(),
            unsettled: Default::default(),
            given_up: Default::default(),
        });
        let volumes = Volumes::new(ctx.clone());
        let transfers = Transfers::new(ctx.clone());
        let exports = Exports::new(ctx.clone(), volumes.clone(), transfers.clone());
        let mut agent = Self {
            volumes,
            snapshots: Snapshots::new(ctx.clone()),
            changes: Changes::new(ctx.clone()),
            exports,
            reconcile: ReconcileReport::default(),
            transfers,
            ctx,
        };
        let started = Instant::now();
        let reconciler = Reconciler::new(
            agent.ctx.clone(),
            agent.snapshots.clone(),
            agent.transfers.clone(),
            agent.exports.clone(),
        );
        agent.reconcile = reconciler.reconcile_all().await?;
        reconciler.spawn_unsettled_retries();
        agent.reconcile.duration = started.elapsed();
        agent
            .ctx
            .metrics
            .reconciled(agent.reconcile.duration.as_secs_f64());
        info!(
            node_id = %agent.ctx.node_id,
            volumes = agent.reconcile.volumes,
            rebuilt = agent.reconcile.rebuilt,
            finished = agent.reconcile.finished,
            rolled_back = agent.reconcile.rolled_back,
            quarantined = agent.reconcile.quarantined,
            degraded = agent.reconcile.degraded,
            unsettled = agent.reconcile.unsettled,
            unknown_devices = agent.reconcile.unknown_devices.len(),
            millis = agent.reconcile.duration.as_millis() as u64,
            "reconciled the kernel with the store"
        );
        watch_pool_events(&agent.ctx);
        agent.transfers.spawn_forgetting();
        agent.exports.spawn_expiry();
        let transfers = agent
            .ctx
            .store_call(|store| store.all::<TransferRecord>())
            .await?;
        agent.transfers.resume_monitors(&transfers);
        Ok(Arc::new(agent))
    }

    /// Stops the agent's background work (monitors, releases, watchers)
    /// where it stands; every piece of it resumes from the store at the next
    /// start, as after a crash.
    pub fn stop_background(&self) {
        self.ctx.background.stop();
    }

    pub fn settings(&self) -> &Settings {
        &self.ctx.settings
    }

    /// What the last start-up reconciliation did.
    pub fn reconcile_report(&self) -> &ReconcileReport {
        &self.reconcile
    }

    pub async fn node_info(&self) -> Result<NodeInfo, AgentError> {
        let (major, minor, patch) = self.ctx.dm.version().await?;
        let mut targets = self.ctx.dm.target_versions().await?;
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        let volumes = self.ctx.store_call(|store| store.volumes()).await?;
        Ok(NodeInfo {
            node_id: self.ctx.node_id.clone(),
            hostname: read_proc("/proc/sys/kernel/hostname"),
            agent_version: env!("CARGO_PKG_VERSION"),
            api_version: "dmclone.v1",
            kernel_release: read_proc("/proc/sys/kernel/osrelease"),
            dm_ioctl_version: (major, minor, patch),
            targets,
            pool: self.ctx.pool.usage().await?,
            host_nqn: self.ctx.nvme.host_nqn.to_string(),
            provisioned_bytes: self.ctx.provisioned_bytes().await?,
            volume_count: volumes.len(),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    /// The exposition text with the agent's current state.
    pub async fn render_metrics(&self) -> Result<String, AgentError> {
        use crate::metrics::{Snapshot, TransferFigures};
        let usage = self.ctx.pool.usage().await?;
        let volumes = self.ctx.store_call(|store| store.volumes()).await?;
        let mut volume_states: std::collections::BTreeMap<&'static str, u64> = Default::default();
        for record in &volumes {
            let state = self.ctx.volume_state(record).as_str();
            *volume_states.entry(state).or_default() += 1;
        }
        let transfers = self.ctx.list_transfers().await?;
        let mut transfer_states: std::collections::BTreeMap<&'static str, u64> = Default::default();
        for view in &transfers {
            *transfer_states.entry(view.state.as_str()).or_default() += 1;
        }
        Ok(self.ctx.metrics.render(&Snapshot {
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
}

/// Logs the pool's low-water and mode-change events as they happen; the
/// allocation checks read the pool's status themselves.
fn watch_pool_events(ctx: &Arc<Context>) {
    // Holds the kernel, not the context, while it waits: the agent may go.
    let weak = Arc::downgrade(ctx);
    let dm = Arc::clone(&ctx.dm);
    let name = ctx.pool.name.clone();
    ctx.background.spawn(async move {
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
                let Some(ctx) = weak.upgrade() else { return };
                match ctx.pool.usage().await {
                    Ok(usage) if usage.low_space => {
                        warn!(
                            pool = %name,
                            health = usage.health.as_str(),
                            data_used = usage.data_used_bytes,
                            data_total = usage.data_total_bytes,
                            metadata_used = usage.metadata_used_bytes,
                            metadata_total = usage.metadata_total_bytes,
                            "the thin pool reached its low-space mark: new allocations are refused"
                        );
                        let volumes = crate::volume::Volumes::new(Arc::clone(&ctx));
                        if let Err(err) = volumes.drop_warm_copies_while_low().await {
                            warn!(pool = %name, error = %err, "cannot drop warm copies for room");
                        }
                    }
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

fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
