//! A host drain: many volumes moving at once from one agent to another.
//!
//! Two agents on this host, the source exporting over NVMe/TCP loopback.
//! `--drain-volumes` volumes of `--drain-mib` each (16 of 256 MiB), written
//! in full on the source, are exported and started on the destination all at
//! once with the agent's default knobs. Each transfer is watched until done
//! (finalized): its rate is its size over the time from the drain's start to
//! its end; the aggregate is every byte over the time from the first
//! StartTransfer's answer (before it the host has nothing to copy) to the
//! last end.
//! Sampled meanwhile every 100 ms: the destination agent's RSS; before and
//! after: its CPU time (user + system), per GiB moved.
//!
//! Baseline, in the same run: the physical limit of the path, the lower of
//! fio 1 MiB sequential at queue depth 32 reading a source namespace over
//! NVMe/TCP (a deferred move, so nothing else reads it) and writing a fresh
//! volume on the destination.
//!
//! Then the host budget: the destination agent is started again with
//! `--transfer-max-bytes-per-second` at half the aggregate just measured,
//! and the same number of volumes (sparse, a quarter of the size: the
//! budget, not the source, sets the pace, and the guest's memory holds the
//! pools) moves at once; their aggregate must stay within 5 % of the
//! budget.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use dmclone::api::proto::v1::{
    DeleteVolumeRequest, ListTransfersRequest, PublishVolumeRequest, TransferState,
    UnpublishVolumeRequest, transfers_client::TransfersClient,
};
use serde_json::{Value, json};

use super::{
    Agent, Params,
    common::{self, BenchResult, FioJob, fio, stats_json},
    preflight, summary,
    usable::{Route, abort, create, host_flags, source_flags, source_namespace, start},
};

const SOURCE_PREFIX: &str = "dmbenchdsrc";
const DESTINATION_PREFIX: &str = "dmbenchddst";
const EXPORT_PORT: &str = "14931";
const SOURCE_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000003";
const SOURCE_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000003";
const DESTINATION_NQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000004";
const DESTINATION_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000004";
const MIB: u64 = 1 << 20;
const GIB_F: f64 = (1u64 << 30) as f64;
/// The aggregate copy rate's target, against the physical limit.
const AGGREGATE_TARGET: f64 = 0.8;
/// No transfer starved: the slowest's rate against the median's.
const FAIRNESS_TARGET: f64 = 0.5;
const RSS_TARGET_MIB: f64 = 64.0;
/// How far the budgeted aggregate may stray from the budget.
const BUDGET_TOLERANCE: f64 = 0.05;
const POLL: Duration = Duration::from_millis(100);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) async fn measure(params: &Params) -> BenchResult<(Value, String)> {
    let dm = preflight(params)?;
    for prefix in [SOURCE_PREFIX, DESTINATION_PREFIX] {
        common::remove_devices_with_prefix(&dm, prefix).await?;
    }
    let size = params.drain_mib * MIB;
    let pool = format!(
        "{}M",
        2 * params.drain_volumes as u64 * params.drain_mib + 1024
    );
    let source = Agent::start_as(
        &params.agent,
        &pool,
        SOURCE_PREFIX,
        source_flags(EXPORT_PORT, SOURCE_NQN, SOURCE_HOST_ID),
    )
    .await?;
    let mut destination = Agent::start_as(
        &params.agent,
        &pool,
        DESTINATION_PREFIX,
        host_flags(DESTINATION_NQN, DESTINATION_HOST_ID),
    )
    .await?;
    let measured = measure_drains(params, size, &source, &mut destination).await;
    let removed = destination.remove(&dm).await;
    let report = measured?;
    removed?;
    source.remove(&dm).await?;
    Ok(report)
}

fn volume_of(batch: u64, i: usize) -> String {
    format!("5ab1e000-0000-4000-b{batch:03x}-{i:012x}")
}

fn transfer_of(batch: u64, i: usize) -> String {
    format!("5ab1e000-0000-4000-c{batch:03x}-{i:012x}")
}

async fn measure_drains(
    params: &Params,
    size: u64,
    source: &Agent,
    destination: &mut Agent,
) -> BenchResult<(Value, String)> {
    let count = params.drain_volumes;
    let mut text = String::new();
    for i in 0..count {
        create(source, &volume_of(1, i), size, true).await?;
    }
    let physical = physical_limit(source, destination, &volume_of(1, 0), size).await?;
    writeln!(
        text,
        "host drain: {count} volumes of {} MiB written in full, moved at once over NVMe/TCP loopback (default knobs)",
        params.drain_mib
    )?;
    writeln!(
        text,
        "physical limit: fio 1 MiB qd32 read of a source namespace {:.1} MiB/s, write of a destination volume {:.1} MiB/s: {:.1} MiB/s",
        physical.read / MIB as f64,
        physical.write / MIB as f64,
        physical.limit() / MIB as f64
    )?;
    let drained = drain(source, destination, 1, count, size).await?;
    let rates: Vec<f64> = drained.seconds.iter().map(|s| size as f64 / s).collect();
    let rate = summary(&rates)?;
    let aggregate_ratio = drained.aggregate / physical.limit();
    let fairness = rate.min / rate.median;
    writeln!(
        text,
        "aggregate {:.1} MiB/s = {aggregate_ratio:.2}x the physical limit (target >= {AGGREGATE_TARGET}x) {} \
         (the starts answered {:.1}-{:.1} s after the calls); \
         per transfer {:.1} / {:.1} / {:.1} MiB/s (min / median / max), slowest {fairness:.2}x the median (target >= {FAIRNESS_TARGET}x) {}",
        drained.aggregate / MIB as f64,
        verdict(aggregate_ratio >= AGGREGATE_TARGET),
        drained.starts.0,
        drained.starts.1,
        rate.min / MIB as f64,
        rate.median / MIB as f64,
        rate.max / MIB as f64,
        verdict(fairness >= FAIRNESS_TARGET),
    )?;
    writeln!(
        text,
        "destination agent: {:.2} s of CPU per GiB moved; RSS at most {:.1} MiB during the drain (target < {RSS_TARGET_MIB} MiB) {}",
        drained.cpu_seconds_per_gib,
        drained.rss_max_mib,
        verdict(drained.rss_max_mib < RSS_TARGET_MIB),
    )?;
    remove_moved(destination, 1, count).await?;

    let budget = (drained.aggregate / 2.0).floor();
    destination.kill9();
    destination.extra.extend([
        "--transfer-max-bytes-per-second".to_owned(),
        format!("{budget:.0}"),
    ]);
    destination.spawn().await?;
    let sparse = size / 4;
    for i in 0..count {
        create(source, &volume_of(2, i), sparse, false).await?;
    }
    let budgeted = drain(source, destination, 2, count, sparse).await?;
    let budget_ratio = budgeted.aggregate / budget;
    let steady_ratio = budgeted.steady.map(|rate| rate / budget);
    let within = (budget_ratio - 1.0).abs() <= BUDGET_TOLERANCE;
    writeln!(
        text,
        "host budget {:.1} MiB/s (half the aggregate): {count} sparse volumes of {} MiB moved at once at {:.1} MiB/s together = {budget_ratio:.3}x the budget (target within {:.0} %) {}; \
         the starts answered {:.1}-{:.1} s after the calls, the last end came at {:.1} s; \
         while all {count} copied (after the last start, before the first end): {}; \
         destination agent: {:.2} s of CPU per GiB, {:.0} % of a CPU, slowest ListTransfers {:.2} s",
        budget / MIB as f64,
        sparse / MIB,
        budgeted.aggregate / MIB as f64,
        BUDGET_TOLERANCE * 100.0,
        verdict(within),
        budgeted.starts.0,
        budgeted.starts.1,
        budgeted.seconds.iter().copied().fold(0.0, f64::max),
        steady_ratio.map_or(
            "not seen (a transfer ended before every start returned)".to_owned(),
            |r| format!("{r:.3}x")
        ),
        budgeted.cpu_seconds_per_gib,
        budgeted.cpu_share * 100.0,
        budgeted.slowest_list,
    )?;
    remove_moved(destination, 2, count).await?;
    let report = json!({
        "volumes": count,
        "volume_mib": params.drain_mib,
        "physical": {
            "read_mib_s": physical.read / MIB as f64,
            "write_mib_s": physical.write / MIB as f64,
            "limit_mib_s": physical.limit() / MIB as f64,
        },
        "aggregate_mib_s": drained.aggregate / MIB as f64,
        "aggregate_vs_physical": aggregate_ratio,
        "transfer_mib_s": stats_json(&rates.iter().map(|r| r / MIB as f64).collect::<Vec<_>>()),
        "slowest_vs_median": fairness,
        "cpu_seconds_per_gib": drained.cpu_seconds_per_gib,
        "cpu_share": drained.cpu_share,
        "slowest_list_s": drained.slowest_list,
        "rss_max_mib": drained.rss_max_mib,
        "budget": {
            "volumes": count,
            "volume_mib": sparse / MIB,
            "budget_mib_s": budget / MIB as f64,
            "aggregate_mib_s": budgeted.aggregate / MIB as f64,
            "aggregate_vs_budget": budget_ratio,
            "steady_vs_budget": steady_ratio,
            "starts_answered_s": [budgeted.starts.0, budgeted.starts.1],
            "mib_per_second": budgeted.per_second,
            "cpu_seconds_per_gib": budgeted.cpu_seconds_per_gib,
            "cpu_share": budgeted.cpu_share,
            "slowest_list_s": budgeted.slowest_list,
            "transfer_end_s": stats_json(&budgeted.seconds),
            "within": within,
        },
        "targets": {
            "aggregate_vs_physical": AGGREGATE_TARGET,
            "slowest_vs_median": FAIRNESS_TARGET,
            "rss_mib": RSS_TARGET_MIB,
            "budget_tolerance": BUDGET_TOLERANCE,
        },
    });
    Ok((report, text))
}

fn verdict(met: bool) -> &'static str {
    if met { "pass" } else { "MISSED" }
}

struct Physical {
    read: f64,
    write: f64,
}

impl Physical {
    fn limit(&self) -> f64 {
        self.read.min(self.write)
    }
}

/// fio 1 MiB qd32 over the path a move takes: reading the source's
/// namespace (a deferred move's connection) and writing a fresh volume on
/// the destination, in bytes/s.
async fn physical_limit(
    source: &Agent,
    destination: &Agent,
    volume: &str,
    size: u64,
) -> BenchResult<Physical> {
    let job = |rw| FioJob {
        rw,
        block_bytes: MIB,
        seconds: None,
    };
    let id = transfer_of(0, 0);
    let route = Route::new(source, destination, DESTINATION_NQN);
    let started = start(&route, &id, volume, size, true).await?;
    let read = match source_namespace(DESTINATION_PREFIX, volume).await {
        Ok(path) => fio(&path, job("read"), size).map(|(bw, _)| bw),
        Err(err) => Err(err),
    };
    abort(destination, &id, &started).await?;
    let scratch = volume_of(0, 0);
    let mut volumes = destination.client().await?;
    volumes
        .create_volume(dmclone::api::proto::v1::CreateVolumeRequest {
            volume_id: scratch.clone(),
            size_bytes: size,
            ..Default::default()
        })
        .await?;
    let path = volumes
        .publish_volume(PublishVolumeRequest {
            volume_id: scratch.clone(),
        })
        .await?
        .into_inner()
        .device_path;
    let write = fio(&PathBuf::from(path), job("write"), size).map(|(bw, _)| bw);
    volumes
        .unpublish_volume(UnpublishVolumeRequest {
            volume_id: scratch.clone(),
        })
        .await?;
    volumes
        .delete_volume(DeleteVolumeRequest { volume_id: scratch })
        .await?;
    Ok(Physical {
        read: read?,
        write: write?,
    })
}

struct Drain {
    /// Each transfer's time from the drain's start to its end.
    seconds: Vec<f64>,
    /// Bytes/s of all together from the first look after every start
    /// returned to the first end: no transfer starting or finishing.
    steady: Option<f64>,
    /// Every byte over the time from the first start's answer to the last
    /// end, in bytes/s.
    aggregate: f64,
    /// When the first and the last StartTransfer answered, in seconds
    /// since the calls.
    starts: (f64, f64),
    /// MiB copied by all in each whole second since the calls.
    per_second: Vec<f64>,
    /// The slowest ListTransfers answer while watching, in seconds.
    slowest_list: f64,
    /// The destination agent's CPU time over the drain's wall time.
    cpu_share: f64,
    cpu_seconds_per_gib: f64,
    rss_max_mib: f64,
}

/// Starts `count` moves of batch `batch` at once and watches them to the end.
async fn drain(
    source: &Agent,
    destination: &Agent,
    batch: u64,
    count: usize,
    size: u64,
) -> BenchResult<Drain> {
    let cpu_before = destination.cpu_seconds()?;
    let began = Instant::now();
    let route = Route::new(source, destination, DESTINATION_NQN);
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..count {
        let route = route.clone();
        starts.spawn(async move {
            start(
                &route,
                &transfer_of(batch, i),
                &volume_of(batch, i),
                size,
                false,
            )
            .await
            .map(|_| began.elapsed().as_secs_f64())
            .map_err(|err| err.to_string())
        });
    }
    let mut answered = Vec::with_capacity(count);
    while let Some(started) = starts.join_next().await {
        answered.push(started??);
    }
    // Before the first answer the host has nothing to copy: the rate is
    // the agent's from then on, not the callers' start-up.
    let first_start = answered.iter().copied().fold(f64::INFINITY, f64::min);
    let last_start = answered.iter().copied().fold(0.0, f64::max);
    let mut ended: Vec<Option<f64>> = vec![None; count];
    // (seconds since the drain began, bytes copied by all) at each round.
    let mut copied: Vec<(f64, u64)> = Vec::new();
    let mut rss_max_mib = destination.rss_mib()?;
    let mut transfers = TransfersClient::new(destination.channel().await?);
    let mut slowest_list = 0.0f64;
    while ended.iter().any(Option::is_none) {
        if began.elapsed() > DRAIN_TIMEOUT {
            return Err(format!("the drain did not end within {DRAIN_TIMEOUT:?}").into());
        }
        tokio::time::sleep(POLL).await;
        rss_max_mib = rss_max_mib.max(destination.rss_mib()?);
        // One list per look, not one call per transfer: the watcher must
        // not be what loads the host it measures.
        let asked = Instant::now();
        let listed = transfers
            .list_transfers(ListTransfersRequest::default())
            .await?
            .into_inner()
            .transfers;
        slowest_list = slowest_list.max(asked.elapsed().as_secs_f64());
        let mut total = 0;
        for (i, end) in ended.iter_mut().enumerate() {
            if end.is_some() {
                total += size;
                continue;
            }
            let id = transfer_of(batch, i);
            let transfer = listed
                .iter()
                .find(|t| t.transfer_id == id)
                .ok_or_else(|| format!("transfer {id} is not listed"))?;
            total += transfer.bytes_hydrated;
            match transfer.state() {
                TransferState::Done => *end = Some(began.elapsed().as_secs_f64()),
                TransferState::Failed | TransferState::Aborted => {
                    return Err(format!(
                        "transfer {} ended {:?}",
                        transfer.transfer_id,
                        transfer.state()
                    )
                    .into());
                }
                _ => {}
            }
        }
        copied.push((began.elapsed().as_secs_f64(), total));
    }
    let seconds: Vec<f64> = ended.into_iter().flatten().collect();
    let first_end = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    let last = seconds.iter().copied().fold(0.0, f64::max);
    let moved = count as f64 * size as f64;
    let cpu = destination.cpu_seconds()? - cpu_before;
    Ok(Drain {
        aggregate: moved / (last - first_start),
        starts: (first_start, last_start),
        steady: steady_rate(&copied, first_end),
        per_second: per_second(&copied),
        slowest_list,
        cpu_share: cpu / began.elapsed().as_secs_f64(),
        cpu_seconds_per_gib: cpu / (moved / GIB_F),
        rss_max_mib,
        seconds,
    })
}

/// MiB copied in each whole second, from samples of (seconds, bytes so far).
fn per_second(copied: &[(f64, u64)]) -> Vec<f64> {
    let end = copied.last().map_or(0, |(t, _)| t.ceil() as u64);
    let mut last = 0u64;
    (1..=end)
        .map(|second| {
            let bytes = copied
                .iter()
                .rev()
                .find(|(t, _)| *t < second as f64)
                .map_or(0, |(_, b)| *b);
            let mib = bytes.saturating_sub(last) as f64 / MIB as f64;
            last = bytes;
            mib
        })
        .collect()
}

/// The rate between the first sample and the last one before `until`.
fn steady_rate(copied: &[(f64, u64)], until: f64) -> Option<f64> {
    let (t0, b0) = *copied.first()?;
    let (t1, b1) = *copied.iter().rev().find(|(t, _)| *t < until)?;
    (t1 > t0).then(|| (b1 - b0) as f64 / (t1 - t0))
}

/// Deletes what a drain moved on the destination, so the next batch reuses
/// the pool's blocks.
async fn remove_moved(destination: &Agent, batch: u64, count: usize) -> BenchResult<()> {
    let mut volumes = destination.client().await?;
    for i in 0..count {
        let volume_id = volume_of(batch, i);
        volumes
            .unpublish_volume(UnpublishVolumeRequest {
                volume_id: volume_id.clone(),
            })
            .await?;
        volumes
            .delete_volume(DeleteVolumeRequest { volume_id })
            .await?;
    }
    Ok(())
}
