//! The agent's configuration: a TOML file whose every option a command-line
//! flag may override, validated as a whole before anything touches the host.
//!
//! `dmclone-agent --state-dir DIR` alone is a working agent (the embedded
//! default): a sparse pool file under DIR on a loop device, the state store and
//! the API socket in DIR. A production host names a block device instead.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

use crate::error::AgentError;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

/// The file the agent reads when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dmclone/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/dmclone";
pub const DEFAULT_DM_PREFIX: &str = "dmclone";
const SOCKET_NAME: &str = "agent.sock";
/// sun_path holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const MAX_PREFIX_LEN: usize = 24;

/// The whole configuration, as read from TOML (every field optional there).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This agent's identity; generated once and kept in the store if unset.
    pub node_id: Option<String>,
    /// Durable state: the store, the embedded pool file, the socket.
    pub state_dir: Option<PathBuf>,
    /// The Unix socket of the API (mode 0600). Default: `<state_dir>/agent.sock`.
    pub socket: Option<PathBuf>,
    /// A group (name or number) whose members may call the socket as
    /// `reader`s: the socket becomes 0660 with that group. It must then live
    /// outside `state_dir` (0700), e.g. `/run/dmclone/agent.sock`.
    pub socket_readers: Option<String>,
    /// First word of every device-mapper name the agent owns. Only change it
    /// to run several agents on one host (tests do).
    pub dm_prefix: Option<String>,
    pub pool: PoolConfig,
    pub volumes: VolumeConfig,
    pub transfer: TransferConfig,
    pub nvme: NvmeConfig,
    pub peers: PeersConfig,
    pub tcp: TcpConfig,
    pub limits: LimitsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

/// What one caller, or all of them, may hold of the agent at once.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls served at once over all connections; more are refused with
    /// RESOURCE_EXHAUSTED rather than queued.
    pub max_calls: Option<usize>,
    /// Calls (HTTP/2 streams) open at once on one connection.
    pub max_calls_per_connection: Option<u32>,
    /// Seconds a client may take to finish its TLS handshake.
    pub tls_handshake_seconds: Option<u64>,
    /// Seconds after which an unanswered call is answered
    /// DEADLINE_EXCEEDED (its work still finishes, as when a client leaves).
    pub call_timeout_seconds: Option<u64>,
    /// WatchTransfers streams one caller may keep open.
    pub max_watches_per_caller: Option<usize>,
}

/// [`LimitsConfig`] checked, with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_calls: usize,
    pub max_calls_per_connection: u32,
    pub tls_handshake: std::time::Duration,
    pub call_timeout: std::time::Duration,
    pub max_watches_per_caller: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_calls: 256,
            max_calls_per_connection: 64,
            tls_handshake: std::time::Duration::from_secs(10),
            // Longer than any call's own wait (a transfer's start waits up
            // to 30 s for its source's namespace).
            call_timeout: std::time::Duration::from_secs(300),
            max_watches_per_caller: 64,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<Limits, AgentError> {
        let defaults = Limits::default();
        let at_least_one = |option: &str, value: Option<u64>| match value {
            Some(0) => Err(invalid(option, "must be at least 1")),
            _ => Ok(()),
        };
        at_least_one("limits.max_calls", self.max_calls.map(|v| v as u64))?;
        at_least_one(
            "limits.max_calls_per_connection",
            self.max_calls_per_connection.map(u64::from),
        )?;
        at_least_one("limits.tls_handshake_seconds", self.tls_handshake_seconds)?;
        at_least_one("limits.call_timeout_seconds", self.call_timeout_seconds)?;
        at_least_one(
            "limits.max_watches_per_caller",
            self.max_watches_per_caller.map(|v| v as u64),
        )?;
        Ok(Limits {
            max_calls: self.max_calls.unwrap_or(defaults.max_calls),
            max_calls_per_connection: self
                .max_calls_per_connection
                .unwrap_or(defaults.max_calls_per_connection),
            tls_handshake: self
                .tls_handshake_seconds
                .map_or(defaults.tls_handshake, std::time::Duration::from_secs),
            call_timeout: self
                .call_timeout_seconds
                .map_or(defaults.call_timeout, std::time::Duration::from_secs),
            max_watches_per_caller: self
                .max_watches_per_caller
                .unwrap_or(defaults.max_watches_per_caller),
        })
    }
}

/// The Prometheus endpoint: plain HTTP, off unless `listen` is set; keep it
/// on localhost or a management network.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<String>,
}

/// NVMe/TCP: where this agent exports volumes that move away, and who it is
/// when it connects to other agents' exports.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmeConfig {
    /// The address other hosts reach this one's exports at (the storage
    /// network). Unset: ExportVolume is refused.
    pub export_address: Option<String>,
    pub export_port: Option<u16>,
    /// The nvmet configfs port id to create when none listens on the address.
    pub export_port_id: Option<u16>,
    /// This host's NQN. Default: /etc/nvme/hostnqn, else one made from host_id.
    pub host_nqn: Option<String>,
    /// This host's NVMe host id (a UUID). Default: /etc/nvme/hostid, else one
    /// made once and kept in the store.
    pub host_id: Option<String>,
    /// Seconds without a connection to a source before the kernel gives up
    /// on it: reads of regions not yet copied fail from then on, and the
    /// agent reconnects by itself once the source answers again.
    pub ctrl_loss_timeout_seconds: Option<u32>,
    /// Seconds after which I/O to an unreachable source fails instead of
    /// waiting. Unset: it waits until `ctrl_loss_timeout_seconds`.
    pub fast_io_fail_timeout_seconds: Option<u32>,
    /// "required" (default): every export authenticates its host and itself
    /// with DH-HMAC-CHAP, and a kernel without NVMe in-band authentication
    /// exports nothing. "none": exports admit the allowed host NQN alone.
    pub auth: Option<crate::nvme::auth::AuthPolicy>,
    /// Seconds an export for a move waits for its destination to connect
    /// and claim it; unclaimed by then, it is withdrawn.
    pub unclaimed_export_seconds: Option<u64>,
}

/// How this agent calls other agents (to release a source after a move):
/// mutual TLS with this client identity.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA bundle the other agents' server certificates chain to.
    pub ca: Option<PathBuf>,
}

/// Defaults of the dm-clone knobs for moves to this host; a transfer may
/// override each.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferConfig {
    #[serde(deserialize_with = "de_opt_size")]
    pub region_size: Option<u64>,
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
    /// A hydrating transfer whose count does not move for this long is
    /// reported degraded (the source may be gone).
    pub stall_seconds: Option<u64>,
    /// What all moves to this host may copy per second together: one
    /// budget those copying spend from, in equal turns; a transfer's own
    /// limit still applies when lower. Unset: no budget.
    #[serde(deserialize_with = "de_opt_size")]
    pub max_bytes_per_second: Option<u64>,
    /// Finished transfers are forgotten this long after they finished...
    pub keep_finished_seconds: Option<u64>,
    /// ...or when this many newer ones finished.
    pub keep_finished: Option<u32>,
    /// How many moves may be in flight along one chain of hosts (A→B→C is
    /// two): a volume still arriving here is exported onward only while
    /// the chain stays within this.
    pub max_chain_depth: Option<u32>,
    /// A volume that moved away leaves its copy here, read-only, for this
    /// long (a warm copy for a move back). 0 or unset: released copies go.
    pub keep_source_copy_seconds: Option<u64>,
}

/// Where the thin pool lives and how full it may get.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// A block device given whole to the pool. Unset: the embedded file.
    pub device: Option<PathBuf>,
    /// Size of the embedded sparse pool file `<state_dir>/pool.img`.
    #[serde(deserialize_with = "de_opt_size")]
    pub file_size: Option<u64>,
    /// Thin-pool data block size.
    #[serde(deserialize_with = "de_opt_size")]
    pub block_size: Option<u64>,
    /// Thin-pool metadata size; derived from the data size when unset.
    #[serde(deserialize_with = "de_opt_size")]
    pub metadata_size: Option<u64>,
    /// New allocations are refused once data or metadata use reaches this.
    pub low_space_percent: Option<u8>,
    /// Sum of volume sizes allowed per byte of pool data space.
    pub max_oversubscription_ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeConfig {
    /// The largest volume the agent creates or extends to.
    #[serde(deserialize_with = "de_opt_size")]
    pub max_size: Option<u64>,
    /// Whether new volumes get dm-era in their stack (changed-block tracking).
    pub change_tracking: Option<bool>,
    /// dm-era's block: the granularity of changed extents.
    #[serde(deserialize_with = "de_opt_size")]
    pub change_block_size: Option<u64>,
}

/// The remote API: TCP with mutual TLS, off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    pub listen: Option<String>,
    /// PEM certificate chain and key the agent presents.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Who may call: each client certificate identity and its role. A
    /// certificate that chains to `client_ca` but is not listed may call
    /// nothing.
    pub client: Vec<ClientConfig>,
}

/// One client of the TCP API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// A DNS or URI subject alternative name, or the subject's common name,
    /// of the client's certificate.
    pub identity: String,
    pub role: Role,
    /// For a `peer`: the NVMe host NQN of that agent's host. It may release
    /// only copies exported to this NQN.
    pub host_nqn: Option<String>,
}

/// What a caller may do (README, "Security").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every call: the Cinder driver, operators' tools.
    Driver,
    /// Another agent: node info, and the release of a copy exported to its
    /// own host.
    Peer,
    /// Calls that change nothing: monitoring, backup readers.
    Reader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Peer => "peer",
            Self::Reader => "reader",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "driver" => Ok(Self::Driver),
            "peer" => Ok(Self::Peer),
            "reader" => Ok(Self::Reader),
            other => Err(format!("{other:?} is not a role: driver, peer or reader")),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `dmclone=debug,info`.
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (human or json)")),
        }
    }
}

/// The validated configuration the agent runs with: every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub node_id: Option<String>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The group id of `socket_readers`.
    pub socket_readers: Option<u32>,
    pub dm_prefix: String,
    pub pool: PoolSettings,
    pub max_volume_size: u64,
    /// dm-era's block size for new volumes; `None` when tracking is off.
    pub change_block_bytes: Option<u64>,
    pub transfer: TransferSettings,
    pub nvme: NvmeSettings,
    pub peers: Option<PeerTls>,
    pub tcp: Option<TcpSettings>,
    pub limits: Limits,
    pub metrics_listen: Option<SocketAddr>,
    pub log_level: String,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub backing: PoolBacking,
    pub block_size: u64,
    pub metadata_size: Option<u64>,
    pub low_space_percent: u8,
    pub max_oversubscription_ratio: f64,
}

/// What the pool sits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolBacking {
    /// A sparse file of this size under the state dir, on a loop device.
    File { path: PathBuf, size: u64 },
    /// A block device given whole to the pool.
    Device(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeSettings {
    pub export: Option<std::net::SocketAddr>,
    pub export_port_id: u16,
    pub host_nqn: Option<String>,
    pub host_id: Option<String>,
    pub ctrl_loss_timeout_seconds: u32,
    /// `None`: I/O waits for the whole `ctrl_loss_timeout_seconds`.
    pub fast_io_fail_timeout_seconds: Option<u32>,
    pub auth: crate::nvme::auth::AuthPolicy,
    pub unclaimed_export_seconds: u64,
}

pub const DEFAULT_NVME_PORT: u16 = 4420;
pub const DEFAULT_NVME_PORT_ID: u16 = 1;
/// How long a guest's reads of regions not yet copied wait for a source
/// that went away before they fail (README, "Source outages").
pub const DEFAULT_CTRL_LOSS_SECONDS: u32 = 120;
/// A destination connects within seconds of the export; ten minutes leave
/// room for a live migration whose preparation is slow, and bound how long
/// an export nobody uses stays open.
pub const DEFAULT_UNCLAIMED_EXPORT_SECONDS: u64 = 600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferSettings {
    pub region_bytes: u64,
    pub hydration_threshold: u32,
    pub hydration_batch_size: u32,
    pub stall_seconds: u64,
    /// The host's budget for all incoming copies; 0: none.
    pub max_bytes_per_second: u64,
    pub keep_finished_seconds: u64,
    pub keep_finished: u32,
    /// Moves in flight along one chain of hosts, at most.
    pub max_chain_depth: u32,
    /// How long a released copy stays as a warm copy; 0: not at all.
    pub keep_source_copy_seconds: u64,
}

/// Measured by benches/run in the guest, 256 MiB over NVMe/TCP loopback, side
/// by side with a raw dd copy and the kernel's defaults (4 KiB, 1, 1): every
/// tuned set copied 12-24x faster than the kernel defaults and 0.6-1.5x as
/// fast as dd; no tuned set beat the others beyond run-to-run noise in three
/// runs, and 1 MiB / 16 / 8 was in the leading group in all of them (copy
/// phase 1.43x dd and 15.2x the kernel defaults in the last). 1 MiB also
/// bounds how long a write to a region not yet copied waits.
pub const DEFAULT_REGION_BYTES: u64 = MIB;
pub const DEFAULT_HYDRATION_THRESHOLD: u32 = 16;
pub const DEFAULT_HYDRATION_BATCH_SIZE: u32 = 8;
pub const DEFAULT_STALL_SECONDS: u64 = 30;
/// A week of finished transfers, and no more than a page of them: enough
/// for an operator to look back, bounded for the store and for listings.
pub const DEFAULT_KEEP_FINISHED_SECONDS: u64 = 7 * 24 * 3600;
pub const DEFAULT_KEEP_FINISHED: u32 = 1000;

/// A→B→C→D: every host of a chain reads through the ones before it, so each
/// hop adds a network round trip to a read not copied yet, and a host that
/// fails stalls every one after it.
pub const DEFAULT_MAX_CHAIN_DEPTH: u32 = 3;
/// Beyond this a chain is a misconfiguration, not a plan.
pub const MAX_CHAIN_DEPTH_LIMIT: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSettings {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    pub clients: Vec<ClientConfig>,
}

pub const DEFAULT_POOL_FILE_SIZE: u64 = 8 * GIB;
pub const MIN_POOL_FILE_SIZE: u64 = 64 * MIB;
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * KIB;
pub const DEFAULT_LOW_SPACE_PERCENT: u8 = 90;
/// No over-commit by default: a volume that moves here hydrates in full.
pub const DEFAULT_OVERSUBSCRIPTION: f64 = 1.0;
pub const DEFAULT_MAX_VOLUME_SIZE: u64 = 64 * TIB;
pub const DEFAULT_CHANGE_BLOCK_BYTES: u64 = 64 * KIB;
const THIN_POOL_MAX_BLOCK: u64 = GIB;
/// The kernel uses at most this much thin-pool metadata.
pub const MAX_METADATA_SIZE: u64 = 16 * GIB;

impl Config {
    /// Parses TOML text; the error names the file, line and option.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, AgentError> {
        toml::from_str(text).map_err(|err| AgentError::Config {
            option: origin.display().to_string(),
            reason: err.to_string(),
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|err| AgentError::Config {
            option: path.display().to_string(),
            reason: format!("cannot read the config file: {err}"),
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks every option and fills in the defaults.
    pub fn validate(&self) -> Result<Settings, AgentError> {
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        require_absolute("state_dir", &state_dir)?;
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| state_dir.join(SOCKET_NAME));
        validate_socket(&socket)?;
        let socket_readers = self
            .socket_readers
            .as_deref()
            .map(|group| socket_readers(group, &socket, &state_dir))
            .transpose()?;
        let dm_prefix = self
            .dm_prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_DM_PREFIX.to_owned());
        validate_prefix(&dm_prefix)?;
        if let Some(node_id) = &self.node_id {
            validate_node_id(node_id)?;
        }
        let max_volume_size = self.volumes.max_size.unwrap_or(DEFAULT_MAX_VOLUME_SIZE);
        if max_volume_size < MIB {
            return Err(invalid("volumes.max_size", "must be at least 1 MiB"));
        }
        let change_block_bytes = self.volumes.change_block()?;
        let log_level = self.log.level.clone().unwrap_or_else(|| "info".to_owned());
        if log_level.trim().is_empty() {
            return Err(invalid("log.level", "is empty"));
        }
        Ok(Settings {
            node_id: self.node_id.clone(),
            pool: self.pool.validate(&state_dir)?,
            transfer: self.transfer.validate()?,
            nvme: self.nvme.validate()?,
            peers: self.peers.validate()?,
            tcp: self.tcp.validate()?,
            limits: self.limits.validate()?,
            metrics_listen: self
                .metrics
                .listen
                .as_deref()
                .map(|listen| {
                    listen.parse().map_err(|_| {
                        invalid(
                            "metrics.listen",
                            format!("{listen:?} is not an address:port such as 127.0.0.1:9477"),
                        )
                    })
                })
                .transpose()?,
            state_dir,
            socket,
            socket_readers,
            dm_prefix,
            max_volume_size,
            change_block_bytes,
            log_level,
            log_format: self.log.format.unwrap_or_default(),
        })
    }
}

impl PoolConfig {
    fn validate(&self, state_dir: &Path) -> Result<PoolSettings, AgentError> {
        let backing = match (&self.device, self.file_size) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "pool.device",
                    "pool.device and pool.file_size exclude each other: a device is used whole",
                ));
            }
            (Some(device), None) => {
                require_absolute("pool.device", device)?;
                PoolBacking::Device(device.clone())
            }
            (None, size) => {
                let size = size.unwrap_or(DEFAULT_POOL_FILE_SIZE);
                if size < MIN_POOL_FILE_SIZE {
                    return Err(invalid(
                        "pool.file_size",
                        format!("{} is below the minimum of 64 MiB", Size(size)),
                    ));
                }
                PoolBacking::File {
                    path: state_dir.join("pool.img"),
                    size,
                }
            }
        };
        let block_size = self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !(DEFAULT_BLOCK_SIZE..=THIN_POOL_MAX_BLOCK).contains(&block_size)
            || !block_size.is_multiple_of(DEFAULT_BLOCK_SIZE)
        {
            return Err(invalid(
                "pool.block_size",
                format!(
                    "{} is not a multiple of 64 KiB between 64 KiB and 1 GiB",
                    Size(block_size)
                ),
            ));
        }
        if let Some(size) = self.metadata_size
            && !(2 * MIB..=MAX_METADATA_SIZE).contains(&size)
        {
            return Err(invalid(
                "pool.metadata_size",
                format!("{} is outside 2 MiB..16 GiB", Size(size)),
            ));
        }
        let low_space_percent = self.low_space_percent.unwrap_or(DEFAULT_LOW_SPACE_PERCENT);
        if !(1..=99).contains(&low_space_percent) {
            return Err(invalid(
                "pool.low_space_percent",
                format!("{low_space_percent} is outside 1..=99"),
            ));
        }
        let ratio = self
            .max_oversubscription_ratio
            .unwrap_or(DEFAULT_OVERSUBSCRIPTION);
        if !ratio.is_finite() || !(0.1..=100.0).contains(&ratio) {
            return Err(invalid(
                "pool.max_oversubscription_ratio",
                format!("{ratio} is outside 0.1..=100"),
            ));
        }
        Ok(PoolSettings {
            backing,
            block_size,
            metadata_size: self.metadata_size,
            low_space_percent,
            max_oversubscription_ratio: ratio,
        })
    }
}

impl TransferConfig {
    fn validate(&self) -> Result<TransferSettings, AgentError> {
        let region_bytes = self.region_size.unwrap_or(DEFAULT_REGION_BYTES);
        validate_region("transfer.region_size", region_bytes)?;
        let positive = |option: &str, value: u32| {
            if value == 0 {
                Err(invalid(option, "must be at least 1"))
            } else {
                Ok(value)
            }
        };
        let stall_seconds = self.stall_seconds.unwrap_or(DEFAULT_STALL_SECONDS);
        if stall_seconds == 0 {
            return Err(invalid("transfer.stall_seconds", "must be at least 1"));
        }
        let max_chain_depth = self.max_chain_depth.unwrap_or(DEFAULT_MAX_CHAIN_DEPTH);
        if !(1..=MAX_CHAIN_DEPTH_LIMIT).contains(&max_chain_depth) {
            return Err(invalid(
                "transfer.max_chain_depth",
                format!("{max_chain_depth} is outside 1..={MAX_CHAIN_DEPTH_LIMIT}"),
            ));
        }
        Ok(TransferSettings {
            region_bytes,
            hydration_threshold: positive(
                "transfer.hydration_threshold",
                self.hydration_threshold
                    .unwrap_or(DEFAULT_HYDRATION_THRESHOLD),
            )?,
            hydration_batch_size: positive(
                "transfer.hydration_batch_size",
                self.hydration_batch_size
                    .unwrap_or(DEFAULT_HYDRATION_BATCH_SIZE),
            )?,
            stall_seconds,
            max_bytes_per_second: self.max_bytes_per_second.unwrap_or(0),
            keep_finished_seconds: self
                .keep_finished_seconds
                .unwrap_or(DEFAULT_KEEP_FINISHED_SECONDS),
            keep_finished: self.keep_finished.unwrap_or(DEFAULT_KEEP_FINISHED),
            max_chain_depth,
            keep_source_copy_seconds: self.keep_source_copy_seconds.unwrap_or(0),
        })
    }
}

impl VolumeConfig {
    /// dm-era blocks: a power of two from 4 KiB to 1 MiB, so that they divide
    /// every volume (sizes are whole MiB).
    fn change_block(&self) -> Result<Option<u64>, AgentError> {
        let bytes = self.change_block_size.unwrap_or(DEFAULT_CHANGE_BLOCK_BYTES);
        if !(bytes.is_power_of_two() && (4 * KIB..=MIB).contains(&bytes)) {
            return Err(invalid(
                "volumes.change_block_size",
                format!("{} is not a power of two from 4 KiB to 1 MiB", Size(bytes)),
            ));
        }
        Ok(self.change_tracking.unwrap_or(true).then_some(bytes))
    }
}

/// dm-clone regions: a power of two from 4 KiB to 1 GiB.
pub fn validate_region(option: &str, bytes: u64) -> Result<(), AgentError> {
    if bytes.is_power_of_two() && (4 * KIB..=GIB).contains(&bytes) {
        Ok(())
    } else {
        Err(invalid(
            option,
            format!("{} is not a power of two from 4 KiB to 1 GiB", Size(bytes)),
        ))
    }
}

impl NvmeConfig {
    fn validate(&self) -> Result<NvmeSettings, AgentError> {
        let port = self.export_port.unwrap_or(DEFAULT_NVME_PORT);
        if port == 0 {
            return Err(invalid("nvme.export_port", "must not be 0"));
        }
        let export = match &self.export_address {
            None => None,
            Some(address) => {
                let ip: std::net::IpAddr = address.parse().map_err(|_| {
                    invalid(
                        "nvme.export_address",
                        format!("{address:?} is not an IP address (the storage network address of this host)"),
                    )
                })?;
                if ip.is_unspecified() {
                    return Err(invalid(
                        "nvme.export_address",
                        "must be the address other hosts connect to, not 0.0.0.0 or ::",
                    ));
                }
                Some(std::net::SocketAddr::new(ip, port))
            }
        };
        let ctrl_loss = self
            .ctrl_loss_timeout_seconds
            .unwrap_or(DEFAULT_CTRL_LOSS_SECONDS);
        if ctrl_loss == 0 {
            return Err(invalid(
                "nvme.ctrl_loss_timeout_seconds",
                "must be at least 1 second",
            ));
        }
        let fast_fail = self.fast_io_fail_timeout_seconds;
        if let Some(seconds) = fast_fail
            && (seconds == 0 || seconds > ctrl_loss)
        {
            return Err(invalid(
                "nvme.fast_io_fail_timeout_seconds",
                format!(
                    "must be 1 to ctrl_loss_timeout_seconds ({ctrl_loss}): I/O fails then anyway; \
                     leave it unset to let I/O wait that long"
                ),
            ));
        }
        Ok(NvmeSettings {
            export,
            export_port_id: self.export_port_id.unwrap_or(DEFAULT_NVME_PORT_ID),
            host_nqn: self.host_nqn.clone(),
            host_id: self.host_id.clone(),
            ctrl_loss_timeout_seconds: ctrl_loss,
            fast_io_fail_timeout_seconds: fast_fail,
            auth: self.auth.unwrap_or_default(),
            unclaimed_export_seconds: match self.unclaimed_export_seconds {
                Some(0) => {
                    return Err(invalid(
                        "nvme.unclaimed_export_seconds",
                        "must be at least 1 second",
                    ));
                }
                seconds => seconds.unwrap_or(DEFAULT_UNCLAIMED_EXPORT_SECONDS),
            },
        })
    }
}

impl PeersConfig {
    fn validate(&self) -> Result<Option<PeerTls>, AgentError> {
        match (&self.tls_cert, &self.tls_key, &self.ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(PeerTls {
                tls_cert: cert.clone(),
                tls_key: key.clone(),
                ca: ca.clone(),
            })),
            _ => Err(invalid(
                "peers.tls_cert",
                "peers.tls_cert, peers.tls_key and peers.ca go together",
            )),
        }
    }
}

impl TcpConfig {
    fn validate(&self) -> Result<Option<TcpSettings>, AgentError> {
        let Some(listen) = &self.listen else {
            let stray = [
                ("tcp.tls_cert", self.tls_cert.is_some()),
                ("tcp.tls_key", self.tls_key.is_some()),
                ("tcp.client_ca", self.client_ca.is_some()),
                ("tcp.client", !self.client.is_empty()),
            ]
            .into_iter()
            .find(|(_, set)| *set);
            if let Some((option, _)) = stray {
                return Err(invalid(
                    option,
                    "is set but tcp.listen is not; set tcp.listen to serve the API over TCP",
                ));
            }
            return Ok(None);
        };
        let listen: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "tcp.listen",
                format!("{listen:?} is not an address:port such as 0.0.0.0:7443"),
            )
        })?;
        let file = |option: &'static str, value: &Option<PathBuf>| {
            value.clone().ok_or_else(|| {
                invalid(
                    option,
                    "is required with tcp.listen: the TCP API only speaks mutual TLS",
                )
            })
        };
        Ok(Some(TcpSettings {
            listen,
            tls_cert: file("tcp.tls_cert", &self.tls_cert)?,
            tls_key: file("tcp.tls_key", &self.tls_key)?,
            client_ca: file("tcp.client_ca", &self.client_ca)?,
            clients: validate_clients(&self.client)?,
        }))
    }
}

/// A client as the agent's `--tcp-client` flag names it:
/// `IDENTITY=driver`, `IDENTITY=reader` or `IDENTITY=peer@HOST_NQN`.
pub fn parse_client(text: &str) -> Result<ClientConfig, String> {
    let (identity, role) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("{text:?} is not IDENTITY=ROLE"))?;
    let (role, host_nqn) = match role.split_once('@') {
        Some((role, nqn)) => (role, Some(nqn.to_owned())),
        None => (role, None),
    };
    Ok(ClientConfig {
        identity: identity.to_owned(),
        role: role.parse()?,
        host_nqn,
    })
}

fn validate_clients(clients: &[ClientConfig]) -> Result<Vec<ClientConfig>, AgentError> {
    if clients.is_empty() {
        return Err(invalid(
            "tcp.client",
            "no client may call the TCP API: list each client certificate's identity with its \
             role (driver, peer or reader), e.g. [[tcp.client]] identity = \"cinder-volume\" \
             role = \"driver\"",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for client in clients {
        if client.identity.trim().is_empty() {
            return Err(invalid("tcp.client", "an identity is empty"));
        }
        if !seen.insert(client.identity.as_str()) {
            return Err(invalid(
                "tcp.client",
                format!("{:?} is listed twice", client.identity),
            ));
        }
        match (client.role, &client.host_nqn) {
            (Role::Peer, None) => {
                return Err(invalid(
                    "tcp.client",
                    format!(
                        "peer {:?} needs host_nqn: the NVMe host NQN of its host, the only one whose copies it may release",
                        client.identity
                    ),
                ));
            }
            (Role::Peer, Some(nqn)) => {
                crate::nvme::Nqn::parse("tcp.client.host_nqn", nqn)?;
            }
            (role, Some(_)) => {
                return Err(invalid(
                    "tcp.client",
                    format!(
                        "{:?} is a {}: host_nqn is for peers only",
                        client.identity,
                        role.name()
                    ),
                ));
            }
            (_, None) => {}
        }
    }
    Ok(clients.to_vec())
}

fn invalid(option: &str, reason: impl Into<String>) -> AgentError {
    AgentError::Config {
        option: option.to_owned(),
        reason: reason.into(),
    }
}

fn require_absolute(option: &str, path: &Path) -> Result<(), AgentError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(
            option,
            format!("{} is not an absolute path", path.display()),
        ))
    }
}

fn validate_socket(socket: &Path) -> Result<(), AgentError> {
    require_absolute("socket", socket)?;
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(invalid(
            "socket",
            format!(
                "{} is {len} bytes; a Unix socket path has at most {MAX_SOCKET_PATH}",
                socket.display()
            ),
        ));
    }
    Ok(())
}

/// The gid of the readers' group, named or numbered; their socket must be
/// reachable, so not inside the private state directory.
fn socket_readers(group: &str, socket: &Path, state_dir: &Path) -> Result<u32, AgentError> {
    if socket.starts_with(state_dir) {
        return Err(invalid(
            "socket_readers",
            format!(
                "the socket {} is inside state_dir {} (mode 0700), where no group member can reach \
                 it; set socket to a path outside it, such as /run/dmclone/agent.sock",
                socket.display(),
                state_dir.display()
            ),
        ));
    }
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid.as_raw()),
        Ok(None) => Err(invalid(
            "socket_readers",
            format!("there is no group {group:?} on this host"),
        )),
        Err(err) => Err(invalid(
            "socket_readers",
            format!("cannot look up group {group:?}: {err}"),
        )),
    }
}

fn validate_prefix(prefix: &str) -> Result<(), AgentError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "dm_prefix",
            format!(
                "{prefix:?} must be 1 to {MAX_PREFIX_LEN} lower-case letters and digits, starting with a letter"
            ),
        ))
    }
}

fn validate_node_id(node_id: &str) -> Result<(), AgentError> {
    let ok = !node_id.is_empty()
        && node_id.len() <= 64
        && node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "node_id",
            format!("{node_id:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"),
        ))
    }
}

/// A byte count as operators write it: `4096`, `64K`, `8G`, `1.5T` (binary
/// units; a trailing `B`/`iB` is accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let number_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(number_end);
    if number.is_empty() {
        return Err(format!("{text:?} is not a size such as 512M or 8G"));
    }
    let multiplier = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use K, M, G or T)"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512M or 8G"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(format!(
            "{text:?} is not a whole number of bytes that fits 64 bits"
        ));
    }
    Ok(bytes as u64)
}

fn de_opt_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Raw::Bytes(bytes)) => Ok(Some(bytes)),
        Some(Raw::Text(text)) => parse_size(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Formats a byte count with a binary unit, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
        for (name, unit) in units {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        for (name, unit) in units {
            if self.0 >= unit {
                return write!(
                    f,
                    "{:.1} {name} ({} bytes)",
                    self.0 as f64 / unit as f64,
                    self.0
                );
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests;
