//! dmclone-agent: the per-hypervisor storage daemon.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use dmclone::{
    agent::Agent,
    api,
    config::{
        ClientConfig, Config, DEFAULT_CONFIG_PATH, LogFormat, Settings, parse_client, parse_size,
    },
    dm::{kernel::DeviceMapper, missing_targets},
    error::AgentError,
    nvme::auth::AuthPolicy,
};
use tracing::error;

/// Serves node-local volumes to OpenStack Cinder through device-mapper.
///
/// dm-thin holds the volumes, dm-clone brings a volume from another host,
/// dm-era tracks changed blocks. Every option overrides the same option of
/// the config file (see the sample dmclone-agent.toml).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The TOML config file [default: /etc/dmclone/agent.toml if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Durable state: store, embedded pool file, socket [config: state_dir].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The API's Unix socket [config: socket].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A group whose members may call the socket as readers (the socket
    /// becomes 0660 with that group) [config: socket_readers].
    #[arg(long, value_name = "GROUP")]
    socket_readers: Option<String>,
    /// This agent's identity [config: node_id].
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// First word of the agent's device-mapper names [config: dm_prefix].
    #[arg(long, value_name = "PREFIX")]
    dm_prefix: Option<String>,
    /// A block device for the pool, instead of the file [config: pool.device].
    #[arg(long, value_name = "DEVICE", conflicts_with = "pool_file_size")]
    pool_device: Option<PathBuf>,
    /// Size of the embedded pool file [config: pool.file_size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pool_file_size: Option<u64>,
    /// Thin-pool block size of a new pool [config: pool.block_size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pool_block_size: Option<u64>,
    /// Thin-pool metadata size of a new pool [config: pool.metadata_size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pool_metadata_size: Option<u64>,
    /// Refuse allocations from this pool use on [config: pool.low_space_percent].
    #[arg(long, value_name = "PERCENT")]
    low_space_percent: Option<u8>,
    /// Volume bytes per pool byte [config: pool.max_oversubscription_ratio].
    #[arg(long, value_name = "RATIO")]
    max_oversubscription_ratio: Option<f64>,
    /// Largest volume [config: volumes.max_size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_volume_size: Option<u64>,
    /// dm-era in new volumes' stacks: true or false [config: volumes.change_tracking].
    #[arg(long, value_name = "BOOL")]
    change_tracking: Option<bool>,
    /// Granularity of changed extents [config: volumes.change_block_size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    change_block_size: Option<u64>,
    /// dm-clone region size of moves to this host [config: transfer.region_size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    transfer_region_size: Option<u64>,
    /// Regions copied concurrently [config: transfer.hydration_threshold].
    #[arg(long, value_name = "N")]
    transfer_hydration_threshold: Option<u32>,
    /// Adjacent regions per copy [config: transfer.hydration_batch_size].
    #[arg(long, value_name = "N")]
    transfer_hydration_batch_size: Option<u32>,
    /// Seconds without progress before a transfer is degraded [config: transfer.stall_seconds].
    #[arg(long, value_name = "SECONDS")]
    transfer_stall_seconds: Option<u64>,
    /// Bytes per second all moves to this host may copy together [config: transfer.max_bytes_per_second].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    transfer_max_bytes_per_second: Option<u64>,
    /// Moves in flight along one chain of hosts, at most [config: transfer.max_chain_depth].
    #[arg(long, value_name = "N")]
    transfer_max_chain_depth: Option<u32>,
    /// Seconds a volume that moved away leaves its copy here, read-only, for a move back; 0: not at all [config: transfer.keep_source_copy_seconds].
    #[arg(long, value_name = "SECONDS")]
    transfer_keep_source_copy_seconds: Option<u64>,
    /// Address other hosts reach this one's NVMe/TCP exports at [config: nvme.export_address].
    #[arg(long, value_name = "IP")]
    nvme_export_address: Option<String>,
    /// TCP port of the exports [config: nvme.export_port].
    #[arg(long, value_name = "PORT")]
    nvme_export_port: Option<u16>,
    /// nvmet configfs port id [config: nvme.export_port_id].
    #[arg(long, value_name = "ID")]
    nvme_export_port_id: Option<u16>,
    /// This host's NVMe host NQN [config: nvme.host_nqn].
    #[arg(long, value_name = "NQN")]
    nvme_host_nqn: Option<String>,
    /// This host's NVMe host id, a UUID [config: nvme.host_id].
    #[arg(long, value_name = "UUID")]
    nvme_host_id: Option<String>,
    /// Seconds before the kernel gives up on an unreachable source [config: nvme.ctrl_loss_timeout_seconds].
    #[arg(long, value_name = "SECONDS")]
    nvme_ctrl_loss_timeout_seconds: Option<u32>,
    /// Seconds before I/O to an unreachable source fails [config: nvme.fast_io_fail_timeout_seconds].
    #[arg(long, value_name = "SECONDS")]
    nvme_fast_io_fail_timeout_seconds: Option<u32>,
    /// DH-HMAC-CHAP on exports: required (default; a kernel without NVMe
    /// in-band authentication then exports nothing) or none [config: nvme.auth].
    #[arg(long, value_name = "POLICY", value_parser = ["required", "none"])]
    nvme_auth: Option<String>,
    /// Seconds an export for a move waits to be claimed by its destination
    /// before it is withdrawn [config: nvme.unclaimed_export_seconds].
    #[arg(long, value_name = "SECONDS")]
    nvme_unclaimed_export_seconds: Option<u64>,
    /// Serve the API over TCP with mutual TLS here [config: tcp.listen].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// PEM certificate chain of the TCP API [config: tcp.tls_cert].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM key of the TCP API [config: tcp.tls_key].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle client certificates must chain to [config: tcp.client_ca].
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// A client of the TCP API and its role: IDENTITY=driver, IDENTITY=reader or
    /// IDENTITY=peer@HOST_NQN; repeatable, added to [config: tcp.client].
    #[arg(long, value_name = "IDENTITY=ROLE", value_parser = parse_client)]
    tcp_client: Vec<ClientConfig>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [config: metrics.listen].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
    /// Tracing filter, e.g. info or dmclone=debug [config: log.level].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// human or json [config: log.format].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Print the kernel's device-mapper interface and target versions, and exit
    /// non-zero if a target the agent needs is missing.
    #[arg(long)]
    check_kernel: bool,
    /// Validate the configuration, print the settings in effect, and exit.
    #[arg(long)]
    check_config: bool,
    /// Print this manual page (roff) and exit.
    #[arg(long, hide = true)]
    man_page: bool,
}

impl Args {
    /// The config file's options with every flag applied on top.
    fn config(&self) -> Result<Config, AgentError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::load(std::path::Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Config::default(),
        };
        set(&mut config.state_dir, &self.state_dir);
        set(&mut config.socket, &self.socket);
        set(&mut config.socket_readers, &self.socket_readers);
        set(&mut config.node_id, &self.node_id);
        set(&mut config.dm_prefix, &self.dm_prefix);
        if self.pool_device.is_some() {
            config.pool.file_size = None;
            set(&mut config.pool.device, &self.pool_device);
        }
        if self.pool_file_size.is_some() {
            config.pool.device = None;
            set(&mut config.pool.file_size, &self.pool_file_size);
        }
        set(&mut config.pool.block_size, &self.pool_block_size);
        set(&mut config.pool.metadata_size, &self.pool_metadata_size);
        set(&mut config.pool.low_space_percent, &self.low_space_percent);
        set(
            &mut config.pool.max_oversubscription_ratio,
            &self.max_oversubscription_ratio,
        );
        set(&mut config.volumes.max_size, &self.max_volume_size);
        set(&mut config.volumes.change_tracking, &self.change_tracking);
        set(
            &mut config.volumes.change_block_size,
            &self.change_block_size,
        );
        set(&mut config.transfer.region_size, &self.transfer_region_size);
        set(
            &mut config.transfer.hydration_threshold,
            &self.transfer_hydration_threshold,
        );
        set(
            &mut config.transfer.hydration_batch_size,
            &self.transfer_hydration_batch_size,
        );
        set(
            &mut config.transfer.stall_seconds,
            &self.transfer_stall_seconds,
        );
        set(
            &mut config.transfer.max_bytes_per_second,
            &self.transfer_max_bytes_per_second,
        );
        set(
            &mut config.transfer.keep_source_copy_seconds,
            &self.transfer_keep_source_copy_seconds,
        );
        set(
            &mut config.transfer.max_chain_depth,
            &self.transfer_max_chain_depth,
        );
        set(&mut config.nvme.export_address, &self.nvme_export_address);
        set(&mut config.nvme.export_port, &self.nvme_export_port);
        set(&mut config.nvme.export_port_id, &self.nvme_export_port_id);
        set(&mut config.nvme.host_nqn, &self.nvme_host_nqn);
        set(&mut config.nvme.host_id, &self.nvme_host_id);
        set(
            &mut config.nvme.ctrl_loss_timeout_seconds,
            &self.nvme_ctrl_loss_timeout_seconds,
        );
        set(
            &mut config.nvme.fast_io_fail_timeout_seconds,
            &self.nvme_fast_io_fail_timeout_seconds,
        );
        set(
            &mut config.nvme.unclaimed_export_seconds,
            &self.nvme_unclaimed_export_seconds,
        );
        if let Some(policy) = &self.nvme_auth {
            config.nvme.auth = AuthPolicy::from_name(policy);
        }
        set(&mut config.tcp.listen, &self.listen);
        set(&mut config.tcp.tls_cert, &self.tls_cert);
        set(&mut config.tcp.tls_key, &self.tls_key);
        set(&mut config.tcp.client_ca, &self.client_ca);
        config.tcp.client.extend(self.tcp_client.iter().cloned());
        set(&mut config.metrics.listen, &self.metrics_listen);
        set(&mut config.log.level, &self.log_level);
        set(&mut config.log.format, &self.log_format);
        Ok(config)
    }
}

fn set<T: Clone>(option: &mut Option<T>, flag: &Option<T>) {
    if flag.is_some() {
        option.clone_from(flag);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.man_page {
        return print_man_page();
    }
    if args.check_kernel {
        init_tracing("warn", LogFormat::Human);
        return check_kernel().await;
    }
    let settings = match args.config().and_then(|config| config.validate()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("dmclone-agent: {err}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{settings:#?}");
        return ExitCode::SUCCESS;
    }
    init_tracing(&settings.log_level, settings.log_format);
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, "dmclone-agent stopped");
            eprintln!("dmclone-agent: {err}");
            ExitCode::FAILURE
        }
    }
}

fn print_man_page() -> ExitCode {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(Args::command()).section("8");
    match man.render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dmclone-agent: cannot write the manual page: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> Result<(), AgentError> {
    let agent = Agent::start(settings, Arc::new(api::GrpcSourceReleaser)).await?;
    api::serve(agent, shutdown_signal(), || notify_systemd("READY=1")).await?;
    notify_systemd("STOPPING=1");
    Ok(())
}

/// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, when
/// systemd set one (Type=notify). Abstract sockets start with '@'.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(err) => return error!(error = %err, "cannot notify systemd"),
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::{linux::net::SocketAddrExt, unix::net::SocketAddr};
            SocketAddr::from_abstract_name(name)
                .and_then(|address| socket.send_to_addr(state.as_bytes(), &address))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(err) = sent {
        error!(error = %err, "cannot notify systemd");
    }
}

/// SIGTERM (systemd, kill) or SIGINT (a terminal) ends the agent cleanly.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot listen for SIGTERM/SIGINT; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_tracing(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

async fn check_kernel() -> ExitCode {
    let result = async {
        let dm = DeviceMapper::open()?;
        let version = dm.version().await?;
        let targets = dm.target_versions().await?;
        Ok::<_, dmclone::Error>((version, targets))
    }
    .await;
    let ((major, minor, patch), mut targets) = match result {
        Ok(found) => found,
        Err(err) => {
            eprintln!("dmclone-agent: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("device-mapper ioctl interface {major}.{minor}.{patch}");
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    for target in &targets {
        let (a, b, c) = target.version;
        println!("  target {:<12} v{a}.{b}.{c}", target.name);
    }
    let missing = missing_targets(targets.iter().map(|t| t.name.as_str()));
    if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "dmclone-agent: missing device-mapper targets: {} (load dm-clone, dm-era, dm-thin-pool)",
            missing.join(", ")
        );
        ExitCode::FAILURE
    }
}
