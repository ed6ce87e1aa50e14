//! dmclonectl: the operator's command line for a dmclone agent.
//!
//! Talks gRPC to the agent over its Unix socket (the default) or over TCP
//! with mutual TLS. Human tables by default, `--json` for scripts.

// A gRPC client through and through: tonic and the generated clients are
// its vocabulary (clippy.toml keeps them out of the library's domain).
#![allow(clippy::disallowed_types)]

mod changes;
mod node;
mod output;
mod snapshot;
mod transfer;
mod volume;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use dmclone::{
    api::status::reason_of,
    client::{ClientTls, connect_tls, connect_unix},
};
use tonic::{Code, Status, transport::Channel};

/// Inspect and steer a dmclone agent: node, volumes, transfers.
///
/// Exit status: 0 success; 2 usage error or a request the agent calls
/// invalid; 3 the named object does not exist; 4 the agent cannot be
/// reached; 1 any other error the agent reports.
///
/// Other gRPC clients on the socket must send a valid :authority such as
/// "localhost": grpcio derives one from the socket's path unless given the
/// channel option grpc.default_authority=localhost, and the agent refuses it
/// as malformed (INTERNAL, RST_STREAM); grpcurl takes -authority localhost.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The agent's Unix socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/dmclone/agent.sock",
        global = true
    )]
    socket: PathBuf,

    /// Talk to the agent's TCP API at HOST:PORT (mutual TLS) instead of the socket.
    #[arg(long, value_name = "HOST:PORT", global = true, requires_all = ["ca", "cert", "key"])]
    endpoint: Option<String>,

    /// PEM CA that signed the agent's certificate (with --endpoint).
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<PathBuf>,

    /// PEM client certificate (with --endpoint).
    #[arg(long, value_name = "FILE", global = true)]
    cert: Option<PathBuf>,

    /// PEM client key (with --endpoint).
    #[arg(long, value_name = "FILE", global = true)]
    key: Option<PathBuf>,

    /// Name to check the agent's certificate against [default: the endpoint's host].
    #[arg(long, value_name = "NAME", global = true)]
    server_name: Option<String>,

    /// Print JSON instead of tables (read commands).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The agent's identity, kernel, targets and pool usage.
    Node,
    /// Volumes of this agent.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Snapshots of volumes.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Moves of volumes to this agent.
    #[command(subcommand)]
    Transfer(transfer::TransferCommand),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff).
    #[command(hide = true)]
    ManPage,
}

/// Why a command failed, with the exit status that says so.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Unreachable(String),
    Rpc(Status),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 4,
            Failure::Rpc(status) => match status.code() {
                Code::InvalidArgument | Code::OutOfRange => 2,
                Code::NotFound => 3,
                Code::Unavailable => 4,
                _ => 1,
            },
        })
    }

    fn message(&self) -> String {
        match self {
            Failure::Usage(message) | Failure::Unreachable(message) => message.clone(),
            Failure::Rpc(status) => match reason_of(status) {
                // The reason code is what scripts match on; the message may change.
                Some(reason) => format!("{:?} [{reason}]: {}", status.code(), status.message()),
                None => format!("{:?}: {}", status.code(), status.message()),
            },
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Rpc(status)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("dmclonectl: {}", failure.message());
            failure.exit_code()
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    if let Command::Completions { shell } = &args.command {
        clap_complete::generate(
            *shell,
            &mut Args::command(),
            "dmclonectl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    if let Command::ManPage = &args.command {
        return clap_mangen::Man::new(Args::command().name("dmclonectl"))
            .render(&mut std::io::stdout())
            .map_err(|err| Failure::Usage(format!("cannot write the manual page: {err}")));
    }
    let channel = connect(&args).await?;
    match args.command {
        Command::Node => node::show(channel, args.json).await,
        Command::Volume(command) => volume::run(channel, command, args.json).await,
        Command::Transfer(command) => transfer::run(channel, command, args.json).await,
        Command::Snapshot(command) => snapshot::run(channel, command, args.json).await,
        Command::Completions { .. } | Command::ManPage => Ok(()),
    }
}

async fn connect(args: &Args) -> Result<Channel, Failure> {
    let Some(endpoint) = &args.endpoint else {
        return connect_unix(&args.socket)
            .await
            .map_err(|err| Failure::Unreachable(err.to_string()));
    };
    let read = |path: &Option<PathBuf>| -> Result<Vec<u8>, Failure> {
        let path = path
            .as_ref()
            .ok_or_else(|| Failure::Usage("--endpoint needs --ca, --cert and --key".into()))?;
        std::fs::read(path)
            .map_err(|err| Failure::Usage(format!("cannot read {}: {err}", path.display())))
    };
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint.as_str(), |(host, _)| host);
    let tls = ClientTls {
        ca_pem: read(&args.ca)?,
        cert_pem: Some(read(&args.cert)?),
        key_pem: Some(read(&args.key)?),
        server_name: args
            .server_name
            .clone()
            .unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned()),
    };
    connect_tls(endpoint, &tls)
        .await
        .map_err(|err| Failure::Unreachable(err.to_string()))
}

#[cfg(test)]
mod tests {
    use dmclone::{AgentError, Refusal, api::status::status_of, ids::VolumeId};

    use super::*;

    #[test]
    fn a_refusal_prints_its_reason_code() {
        let volume = VolumeId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").expect("a UUID");
        let refusal = Refusal::VolumePublished {
            volume,
            device: PathBuf::from("/dev/mapper/dmclone-0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11"),
            hint: "unpublish it before deleting it",
        };
        let failure = Failure::Rpc(status_of(&AgentError::from(refusal.clone())));
        assert_eq!(
            failure.message(),
            format!("FailedPrecondition [VOLUME_PUBLISHED]: {refusal}")
        );
        assert_eq!(failure.exit_code(), ExitCode::from(1));
    }

    #[test]
    fn a_status_without_reason_prints_code_and_message() {
        let failure = Failure::Rpc(Status::failed_precondition("older agent"));
        assert_eq!(failure.message(), "FailedPrecondition: older agent");
    }
}
