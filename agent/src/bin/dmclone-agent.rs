//! dmclone-agent: the per-hypervisor storage daemon.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use dmclone::dm::{kernel::DeviceMapper, missing_targets};

/// Serves node-local volumes to OpenStack Cinder through device-mapper
/// (dm-thin, dm-clone, dm-era).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory for durable state, the embedded pool file and the API socket.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/dmclone")]
    state_dir: PathBuf,

    /// Print the kernel's device-mapper interface and target versions, and exit
    /// non-zero if a target the agent needs is missing.
    #[arg(long)]
    check_kernel: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.check_kernel {
        return check_kernel().await;
    }
    eprintln!(
        "dmclone-agent: the API server is not part of this build yet; \
         only --check-kernel is available (state dir would be {})",
        args.state_dir.display()
    );
    ExitCode::from(2)
}

async fn check_kernel() -> ExitCode {
    let result = async {
        let dm = DeviceMapper::open()?;
        let (major, minor, patch) = dm.version().await?;
        let targets = dm.target_versions().await?;
        Ok::<_, dmclone::Error>(((major, minor, patch), targets))
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
