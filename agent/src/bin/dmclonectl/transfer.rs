//! `dmclonectl transfer ...`: moves arriving at this agent, and the
//! `volume export`/`unexport` of moves leaving it.

use std::{collections::HashMap, io::IsTerminal, path::PathBuf, time::Instant};

use clap::{Args, Subcommand};
use dmclone::{
    api::proto::v1::{
        AbortTransferRequest, ExportVolumeRequest, HydrationKnobs, ListTransfersRequest,
        NvmeTcpSource, StartTransferRequest, ThrottleTransferRequest, Transfer, TransferRef,
        TransferState, UnexportVolumeRequest, WatchTransfersRequest,
        start_transfer_request::Source, transfers_client::TransfersClient,
    },
    api::transfer_state_name,
    config::parse_size,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use tonic::transport::Channel;

use crate::{Failure, output};

#[derive(Debug, Subcommand)]
pub enum TransferCommand {
    /// Transfers with their state and progress (finished ones for as long as
    /// the agent keeps them).
    List {
        /// Only the transfers of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only transfers in this state (hydrating, done, ...); repeatable.
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<TransferState>,
    },
    /// One transfer.
    Show {
        id: String,
    },
    /// Live progress of one transfer (until it ends) or of all.
    Watch {
        id: Option<String>,
    },
    /// Start moving a volume here (prints the transfer).
    Start(Box<StartArgs>),
    /// Live migration: the source let go; start hydrating.
    Commit {
        id: String,
    },
    /// Stop background copying (writes still copy what they touch).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Change copy knobs of a running transfer.
    Throttle {
        id: String,
        /// Regions copied concurrently.
        #[arg(long)]
        threshold: Option<u32>,
        /// Adjacent regions per copy.
        #[arg(long)]
        batch: Option<u32>,
        /// Bytes per second, e.g. 50M; 0 lifts the limit.
        #[arg(long, value_parser = parse_size)]
        max_rate: Option<u64>,
    },
    /// Tear the destination down; the source is untouched. A deferred
    /// transfer whose destination was written is refused (those writes
    /// exist only there) unless --force.
    Abort {
        id: String,
        /// Drop what the destination of a deferred transfer wrote.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The volume's id (the same on both hosts).
    #[arg(long)]
    volume: String,
    /// The volume's size, e.g. 10G.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// A transfer id (UUID) [default: a new one].
    #[arg(long)]
    id: Option<String>,
    /// Copy from a block device on this host...
    #[arg(long, value_name = "PATH", conflicts_with_all = ["nqn", "address", "port"])]
    device: Option<PathBuf>,
    /// ...or from another agent's export (its subsystem NQN, address, port).
    #[arg(long, requires_all = ["address", "port"])]
    nqn: Option<String>,
    #[arg(long)]
    address: Option<String>,
    #[arg(long)]
    port: Option<u32>,
    /// The source agent to tell to release its copy: host:port or unix:/path.
    #[arg(long, value_name = "ENDPOINT")]
    source_agent: Option<String>,
    /// The release token the source's `volume export --for-transfer`
    /// printed; without it the source keeps its copy after the move.
    #[arg(long, env = "DMCLONE_RELEASE_TOKEN", hide_env_values = true)]
    release_token: Option<String>,
    /// The DH-HMAC-CHAP secrets the source's export printed (nvme.auth =
    /// required there): the host's...
    #[arg(long, env = "DMCLONE_DHCHAP_HOST_SECRET", hide_env_values = true)]
    dhchap_host_secret: Option<String>,
    /// ...and the controller's.
    #[arg(long, env = "DMCLONE_DHCHAP_CTRL_SECRET", hide_env_values = true)]
    dhchap_ctrl_secret: Option<String>,
    /// Present now, hydrate after `transfer commit` (live migration).
    #[arg(long)]
    deferred: bool,
    /// Leave the volume's snapshots on the source (by default they follow
    /// it once it has arrived).
    #[arg(long)]
    leave_snapshots: bool,
    #[arg(long, value_parser = parse_size)]
    region: Option<u64>,
    #[arg(long)]
    threshold: Option<u32>,
    #[arg(long)]
    batch: Option<u32>,
}

/// Every transfer the filters admit, page after page.
async fn list_every_page(
    client: &mut TransfersClient<Channel>,
    volume: Option<String>,
    states: Vec<TransferState>,
) -> Result<Vec<Transfer>, Failure> {
    let mut request = ListTransfersRequest {
        volume_id: volume.unwrap_or_default(),
        states: states.into_iter().map(i32::from).collect(),
        ..ListTransfersRequest::default()
    };
    let mut transfers = Vec::new();
    loop {
        let page = client.list_transfers(request.clone()).await?.into_inner();
        transfers.extend(page.transfers);
        if page.next_page_token.is_empty() {
            return Ok(transfers);
        }
        request.page_token = page.next_page_token;
    }
}

/// A state as `transfer list` prints it, back to the wire.
fn parse_state(name: &str) -> Result<TransferState, String> {
    (1..)
        .map_while(|n| TransferState::try_from(n).ok())
        .find(|state| transfer_state_name(*state) == name)
        .ok_or_else(|| format!("{name:?} is not a transfer state (hydrating, done, failed, ...)"))
}

pub async fn run(channel: Channel, command: TransferCommand, as_json: bool) -> Result<(), Failure> {
    let mut client = TransfersClient::new(channel);
    let reference = |id: String| TransferRef { transfer_id: id };
    let transfer = match command {
        TransferCommand::List { volume, states } => {
            let transfers = list_every_page(&mut client, volume, states).await?;
            show(&transfers, as_json);
            return Ok(());
        }
        TransferCommand::Watch { id } => return watch(client, id, as_json).await,
        TransferCommand::Show { id } => client.get_transfer(reference(id)).await?,
        TransferCommand::Start(args) => client.start_transfer(start_request(*args)?).await?,
        TransferCommand::Commit { id } => client.commit_transfer(reference(id)).await?,
        TransferCommand::Pause { id } => client.pause_transfer(reference(id)).await?,
        TransferCommand::Resume { id } => client.resume_transfer(reference(id)).await?,
        TransferCommand::Abort { id, force } => {
            client
                .abort_transfer(AbortTransferRequest {
                    transfer_id: id,
                    force,
                })
                .await?
        }
        TransferCommand::Throttle {
            id,
            threshold,
            batch,
            max_rate,
        } => {
            let knobs = HydrationKnobs {
                region_bytes: 0,
                hydration_threshold: threshold.unwrap_or(0),
                hydration_batch_size: batch.unwrap_or(0),
                // The API reads 0 as "keep"; "no limit" is the largest value.
                max_bytes_per_second: match max_rate {
                    Some(0) => u64::MAX,
                    Some(rate) => rate,
                    None => 0,
                },
            };
            client
                .throttle_transfer(ThrottleTransferRequest {
                    transfer_id: id,
                    knobs: Some(knobs),
                })
                .await?
        }
    };
    let transfer = transfer.into_inner();
    show(std::slice::from_ref(&transfer), as_json);
    if !as_json {
        print!("{}", provenance(&transfer));
    }
    Ok(())
}

fn start_request(args: StartArgs) -> Result<StartTransferRequest, Failure> {
    let source = match (args.device, args.nqn) {
        (Some(path), None) => Source::DevicePath(path.display().to_string()),
        (None, Some(nqn)) => Source::NvmeTcp(NvmeTcpSource {
            subsystem_nqn: nqn,
            transport_address: args.address.unwrap_or_default(),
            transport_service_id: args.port.unwrap_or_default(),
            source_agent_endpoint: args.source_agent.unwrap_or_default(),
            release_token: args.release_token.unwrap_or_default(),
            dhchap_host_secret: args.dhchap_host_secret.unwrap_or_default(),
            dhchap_ctrl_secret: args.dhchap_ctrl_secret.unwrap_or_default(),
        }),
        _ => {
            return Err(Failure::Usage(
                "name the source: --device PATH, or --nqn with --address and --port".into(),
            ));
        }
    };
    let id = match args.id {
        Some(id) => id,
        None => std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map(|s| s.trim().to_owned())
            .map_err(|err| {
                Failure::Usage(format!("cannot make a transfer id ({err}); pass --id"))
            })?,
    };
    let region = args
        .region
        .map(|r| u32::try_from(r).map_err(|_| Failure::Usage("--region is at most 1G".into())))
        .transpose()?;
    Ok(StartTransferRequest {
        transfer_id: id,
        volume_id: args.volume,
        size_bytes: args.size,
        source: Some(source),
        deferred: args.deferred,
        knobs: Some(HydrationKnobs {
            region_bytes: region.unwrap_or(0),
            hydration_threshold: args.threshold.unwrap_or(0),
            hydration_batch_size: args.batch.unwrap_or(0),
            max_bytes_per_second: 0,
        }),
        leave_snapshots: args.leave_snapshots,
    })
}

pub async fn export(
    channel: Channel,
    request: ExportVolumeRequest,
    as_json: bool,
) -> Result<(), Failure> {
    let export = TransfersClient::new(channel)
        .export_volume(request)
        .await?
        .into_inner();
    let value = json!({
        "volume_id": export.volume_id,
        "subsystem_nqn": export.subsystem_nqn,
        "address": export.transport_address,
        "port": export.transport_service_id,
        "allowed_host_nqn": export.allowed_host_nqn,
        "release_token": export.release_token,
        "dhchap_host_secret": export.dhchap_host_secret,
        "dhchap_ctrl_secret": export.dhchap_ctrl_secret,
        "claim_deadline_unix": export.claim_deadline_unix,
    });
    if as_json {
        output::json(&value);
    } else {
        println!(
            "exported {} as {} on {}:{} to {}",
            export.volume_id,
            export.subsystem_nqn,
            export.transport_address,
            export.transport_service_id,
            export.allowed_host_nqn
        );
        if !export.release_token.is_empty() {
            println!("release token: {}", export.release_token);
        }
        if export.claim_deadline_unix > 0 {
            let wait = export.claim_deadline_unix - unix_now();
            println!(
                "withdrawn in {wait} s unless the destination agent connects and claims it \
                 (nvme.unclaimed_export_seconds)"
            );
        }
        if !export.dhchap_host_secret.is_empty() {
            println!("DH-HMAC-CHAP host secret: {}", export.dhchap_host_secret);
            println!(
                "DH-HMAC-CHAP controller secret: {}",
                export.dhchap_ctrl_secret
            );
        }
    }
    Ok(())
}

pub async fn unexport(
    channel: Channel,
    request: UnexportVolumeRequest,
    as_json: bool,
) -> Result<(), Failure> {
    let id = request.volume_id.clone();
    TransfersClient::new(channel)
        .unexport_volume(request)
        .await?;
    if as_json {
        output::json(&json!({ "volume_id": id, "result": "unexported" }));
    } else {
        println!("unexported {id}");
    }
    Ok(())
}

/// Progress bars on a terminal; otherwise one plain line per update (JSON
/// objects with --json), so logs and scripts read it cleanly.
async fn watch(
    mut client: TransfersClient<Channel>,
    id: Option<String>,
    as_json: bool,
) -> Result<(), Failure> {
    let mut stream = client
        .watch_transfers(WatchTransfersRequest {
            transfer_id: id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let bars = (std::io::stdout().is_terminal() && !as_json).then(Bars::default);
    let mut last_line: HashMap<String, (TransferState, Instant)> = HashMap::new();
    while let Some(update) = stream.message().await? {
        if let Some(bars) = &bars {
            bars.show(&update);
            continue;
        }
        // Without a terminal: every state change, and at most one progress
        // line per second per transfer.
        let (state, at) = (update.state(), Instant::now());
        let quiet = last_line
            .get(&update.transfer_id)
            .is_some_and(|(last, when)| *last == state && at.duration_since(*when).as_secs() < 1);
        if quiet {
            continue;
        }
        last_line.insert(update.transfer_id.clone(), (state, at));
        if as_json {
            println!("{}", to_json(&update));
        } else {
            println!("{}", one_line(&update));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: std::sync::Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn show(&self, update: &Transfer) {
        let mut bars = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bar = bars.entry(update.transfer_id.clone()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(update.bytes_total.max(1)));
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(short(&update.volume_id));
            bar
        });
        bar.set_length(update.bytes_total.max(1));
        bar.set_position(update.bytes_hydrated);
        let message = format!(
            "{} {}",
            transfer_state_name(update.state()),
            rate_and_eta(update)
        );
        if is_final(update.state()) {
            bar.finish_with_message(message);
        } else {
            bar.set_message(message);
        }
    }
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

fn is_final(state: TransferState) -> bool {
    matches!(
        state,
        TransferState::Done | TransferState::Failed | TransferState::Aborted
    )
}

fn rate_and_eta(t: &Transfer) -> String {
    let mut text = format!("{}/s", output::size(t.bytes_per_second as u64));
    if t.eta_seconds > 0 {
        text.push_str(&format!(" ETA {}s", t.eta_seconds));
    }
    if !t.message.is_empty() && t.state() == TransferState::Degraded {
        text.push_str(&format!(" ({})", t.message));
    }
    text
}

fn one_line(t: &Transfer) -> String {
    format!(
        "{} {} {:<10} {} {}/{} ({}) {}",
        short(&t.transfer_id),
        short(&t.volume_id),
        transfer_state_name(t.state()),
        text_bar(t.bytes_hydrated, t.bytes_total),
        output::size(t.bytes_hydrated),
        output::size(t.bytes_total),
        output::percent(t.bytes_hydrated, t.bytes_total),
        rate_and_eta(t)
    )
}

/// `[=========>          ]`: a bar that survives logs and serial consoles.
fn text_bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(0) as usize;
    let mut bar = "=".repeat(filled);
    if filled < WIDTH as usize {
        bar.push('>');
    }
    format!("[{bar:<width$}]", width = WIDTH as usize)
}

fn show(transfers: &[Transfer], as_json: bool) {
    if as_json {
        output::json(&json!({ "transfers": transfers.iter().map(to_json).collect::<Vec<_>>() }));
        return;
    }
    let rows: Vec<Vec<String>> = transfers
        .iter()
        .map(|t| {
            vec![
                t.transfer_id.clone(),
                t.volume_id.clone(),
                transfer_state_name(t.state()).to_owned(),
                output::percent(t.bytes_hydrated, t.bytes_total),
                format!(
                    "{}/{}",
                    output::size(t.bytes_hydrated),
                    output::size(t.bytes_total)
                ),
                format!("{}/s", output::size(t.bytes_per_second as u64)),
                if t.eta_seconds > 0 {
                    format!("{}s", t.eta_seconds)
                } else {
                    "-".into()
                },
                t.message.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "TRANSFER", "VOLUME", "STATE", "DONE", "BYTES", "RATE", "ETA", "MESSAGE",
        ],
        &rows,
    );
}

/// Where one transfer's copy comes from, under its table row: the source,
/// the chain of hosts it comes through, and where it went on to.
fn provenance(t: &Transfer) -> String {
    let mut text = format!("source: {}\n", t.source);
    if !t.upstream.is_empty() {
        text.push_str(&format!(
            "upstream: {} ({} in flight)\n",
            t.upstream.join(" <- "),
            moves(t.upstream.len())
        ));
    }
    if !t.passed_on_to.is_empty() {
        text.push_str(&format!("passed on to: {}\n", t.passed_on_to));
    }
    if t.bytes_skipped > 0 {
        text.push_str(&format!(
            "return trip: {} unchanged here, not copied\n",
            output::size(t.bytes_skipped)
        ));
    }
    if t.snapshots_total > 0 {
        text.push_str(&format!(
            "snapshots: {} of {} arrived, {} received\n",
            t.snapshots_arrived,
            t.snapshots_total,
            output::size(t.snapshot_bytes_received)
        ));
    }
    text
}

fn moves(n: usize) -> String {
    if n == 1 {
        "1 move".into()
    } else {
        format!("{n} moves")
    }
}

/// The documented, stable JSON shape of one transfer.
pub fn to_json(t: &Transfer) -> serde_json::Value {
    let knobs = t.knobs.unwrap_or_default();
    json!({
        "transfer_id": t.transfer_id,
        "volume_id": t.volume_id,
        "state": transfer_state_name(t.state()),
        "deferred": t.deferred,
        "regions_hydrated": t.regions_hydrated,
        "regions_total": t.regions_total,
        "bytes_hydrated": t.bytes_hydrated,
        "bytes_total": t.bytes_total,
        "bytes_per_second": t.bytes_per_second,
        "eta_seconds": t.eta_seconds,
        "region_bytes": knobs.region_bytes,
        "hydration_threshold": knobs.hydration_threshold,
        "hydration_batch_size": knobs.hydration_batch_size,
        "max_bytes_per_second": knobs.max_bytes_per_second,
        "device_path": t.device_path,
        "message": t.message,
        "finalize_pause_micros": t.finalize_pause_micros,
        "done_to_finalized_micros": t.done_to_finalized_micros,
        "source_released": t.source_released,
        "source": t.source,
        "upstream": t.upstream,
        "passed_on_to": t.passed_on_to,
        "bytes_skipped": t.bytes_skipped,
        "snapshots_total": t.snapshots_total,
        "snapshots_arrived": t.snapshots_arrived,
        "snapshot_bytes_received": t.snapshot_bytes_received,
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_bar_fills_with_progress() {
        assert_eq!(text_bar(0, 100), "[>                   ]");
        assert_eq!(text_bar(50, 100), "[==========>         ]");
        assert_eq!(text_bar(100, 100), "[====================]");
        assert_eq!(text_bar(5, 0), "[>                   ]");
    }

    #[test]
    fn provenance_shows_the_chain_nearest_first() {
        let chained = Transfer {
            source: "nvme-tcp 10.0.0.2:4420 nqn.b".into(),
            upstream: vec!["node-b".into(), "node-a".into()],
            ..Transfer::default()
        };
        assert_eq!(
            provenance(&chained),
            "source: nvme-tcp 10.0.0.2:4420 nqn.b\nupstream: node-b <- node-a (2 moves in flight)\n"
        );
        let passed = Transfer {
            source: "device /dev/sdb".into(),
            passed_on_to: "nqn.c".into(),
            ..Transfer::default()
        };
        assert_eq!(
            provenance(&passed),
            "source: device /dev/sdb\npassed on to: nqn.c\n"
        );
        let returned = Transfer {
            source: "device /dev/sdb".into(),
            bytes_skipped: 63 << 20,
            ..Transfer::default()
        };
        assert_eq!(
            provenance(&returned),
            "source: device /dev/sdb\nreturn trip: 63.0MiB unchanged here, not copied\n"
        );
        let with_snapshots = Transfer {
            source: "device /dev/sdb".into(),
            snapshots_total: 3,
            snapshots_arrived: 2,
            snapshot_bytes_received: 5 << 20,
            ..Transfer::default()
        };
        assert_eq!(
            provenance(&with_snapshots),
            "source: device /dev/sdb\nsnapshots: 2 of 3 arrived, 5.0MiB received\n"
        );
    }
}
