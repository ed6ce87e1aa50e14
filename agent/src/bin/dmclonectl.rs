//! dmclonectl: the operator's command line for dmclone agents.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Inspect and steer a dmclone agent: volumes, transfers, hydration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The agent's Unix socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/dmclone/agent.sock"
    )]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this client's version.
    Version,
}

fn main() {
    let args = Args::parse();
    match args.command {
        Command::Version => println!("dmclonectl {}", env!("CARGO_PKG_VERSION")),
    }
}
