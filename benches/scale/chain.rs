//! A chained move against a single move of the same volume.
//!
//! Three agents on this host, A and B exporting over NVMe/TCP loopback. A
//! sample of the single move: a volume of `--chain-mib` (256 MiB), written
//! in full on A, moves A→B; the clock runs from `StartTransfer` to B's
//! transfer done (finalized). A sample of the chain: another such volume
//! moves A→B and, as soon as B has started, on to C (B exports what it has
//! and reads the rest through from A); the clock runs from A→B's
//! `StartTransfer` to C's transfer done. Both use the agent's default knobs;
//! samples alternate, single first. The ratio of the medians is the
//! verdict: C holds every byte of a volume that was still arriving on B
//! within 1.2x the time one move takes.
//!
//! The three "hosts" share the guest's CPUs, so each sample also records
//! the guest's CPU time (from /proc/stat) and which share of all CPUs was
//! busy: B's forwarding (its NVMe host and target) costs the CPUs C copies
//! with, where separate hosts would each bring their own.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use dmclone::{
    api::proto::v1::{
        DeleteVolumeRequest, TransferRef, TransferState, UnpublishVolumeRequest,
        transfers_client::TransfersClient,
    },
    dm::kernel::DeviceMapper,
};
use serde_json::{Value, json};

use super::{
    Agent, Params,
    common::{self, BenchResult, stats_json},
    preflight, summary,
    usable::{Route, create, host_flags, source_flags, start},
};

const A_PREFIX: &str = "dmbenchca";
const B_PREFIX: &str = "dmbenchcb";
const C_PREFIX: &str = "dmbenchcc";
const A_PORT: &str = "14941";
const B_PORT: &str = "14942";
const A_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000005";
const A_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000005";
const B_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000006";
const B_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000006";
const C_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-000000000007";
const C_HOST_ID: &str = "5ab1e000-0000-4000-8000-000000000007";
const MIB: u64 = 1 << 20;
/// The chain's time against one move's.
const TARGET: f64 = 1.2;
const POLL: Duration = Duration::from_millis(20);
const MOVE_TIMEOUT: Duration = Duration::from_secs(300);

pub(crate) async fn measure(params: &Params) -> BenchResult<(Value, String)> {
    let dm = preflight(params)?;
    for prefix in [A_PREFIX, B_PREFIX, C_PREFIX] {
        common::remove_devices_with_prefix(&dm, prefix).await?;
    }
    let size = params.chain_mib * MIB;
    // Every sample's volume is written on A before it moves; B and C hold
    // one at a time (a moved volume is deleted before the next sample).
    let a_pool = format!("{}M", 2 * params.chain_reps as u64 * params.chain_mib + 512);
    let pool = format!("{}M", 2 * params.chain_mib + 512);
    let a = start_source(params, &a_pool, A_PREFIX, [A_PORT, A_NQN, A_HOST_ID]).await?;
    let b = start_source(params, &pool, B_PREFIX, [B_PORT, B_NQN, B_HOST_ID]).await?;
    let c = start_logged(params, &pool, C_PREFIX, host_flags(C_NQN, C_HOST_ID)).await?;
    let measured = measure_moves(params, size, [&a, &b, &c]).await;
    wind_up("chain", params, &dm, vec![a, b, c], measured).await
}

/// An agent of a part with several, logging at `--agent-log-level`.
pub(super) async fn start_logged(
    params: &Params,
    pool: &str,
    prefix: &'static str,
    mut flags: Vec<String>,
) -> BenchResult<Agent> {
    flags.extend(["--log-level".to_owned(), params.agent_log_level.clone()]);
    Agent::start_as(&params.agent, pool, prefix, flags).await
}

/// An agent of a part with several that exports over NVMe/TCP loopback
/// on `port`, with its own host NQN and id.
pub(super) async fn start_source(
    params: &Params,
    pool: &str,
    prefix: &'static str,
    [port, nqn, host_id]: [&str; 3],
) -> BenchResult<Agent> {
    start_logged(params, pool, prefix, source_flags(port, nqn, host_id)).await
}

/// Keeps the agents' logs beside the results, then removes them, the last
/// started first; a failed measurement says why before what its end left
/// behind.
pub(super) async fn wind_up<T>(
    part: &str,
    params: &Params,
    dm: &DeviceMapper,
    agents: Vec<Agent>,
    measured: BenchResult<T>,
) -> BenchResult<T> {
    for agent in &agents {
        if let Err(err) = agent.keep_log(&params.results) {
            eprintln!("{part}: the agent's log was not kept: {err}");
        }
    }
    let mut removed = Vec::new();
    for agent in agents.into_iter().rev() {
        removed.push(agent.remove(dm).await);
    }
    let report = measured?;
    removed.into_iter().collect::<BenchResult<Vec<()>>>()?;
    Ok(report)
}

fn volume_of(sample: usize) -> String {
    format!("5ab1e000-0000-4000-d000-{sample:012x}")
}

fn transfer_of(sample: usize, hop: u8) -> String {
    format!("5ab1e000-0000-4000-e{hop:03x}-{sample:012x}")
}

async fn measure_moves(
    params: &Params,
    size: u64,
    [a, b, c]: [&Agent; 3],
) -> BenchResult<(Value, String)> {
    let reps = params.chain_reps;
    for sample in 0..2 * reps {
        create(a, &volume_of(sample), size, true).await?;
    }
    let (to_b, b_to_c) = (Route::new(a, b, B_NQN), Route::new(b, c, C_NQN));
    let (mut single, mut chained, mut onward) = (Vec::new(), Vec::new(), Vec::new());
    let (mut single_cpu, mut chain_cpu) = (CpuUse::default(), CpuUse::default());
    for rep in 0..reps {
        let sample = 2 * rep;
        let began = Instant::now();
        let ticks = cpu_ticks()?;
        begin(&to_b, sample, 1, size).await?;
        wait_done(b, &transfer_of(sample, 1)).await?;
        single.push(began.elapsed().as_secs_f64());
        single_cpu.add(ticks, cpu_ticks()?, single[rep]);
        delete_when_released(b, &transfer_of(sample, 1), &volume_of(sample)).await?;

        let sample = 2 * rep + 1;
        let began = Instant::now();
        let ticks = cpu_ticks()?;
        begin(&to_b, sample, 1, size).await?;
        let onward_began = Instant::now();
        begin(&b_to_c, sample, 2, size).await?;
        onward.push(onward_began.elapsed().as_secs_f64());
        // Nothing is attached on B (arriving volumes start published): its
        // copy may be released once C is done.
        unpublish(b, &volume_of(sample)).await?;
        wait_done(c, &transfer_of(sample, 2)).await?;
        chained.push(began.elapsed().as_secs_f64());
        chain_cpu.add(ticks, cpu_ticks()?, chained[rep]);
        delete_when_released(c, &transfer_of(sample, 2), &volume_of(sample)).await?;
        // B let go of A too (it passed on, or finished first and released).
        let passed = released(b, &transfer_of(sample, 1)).await?;
        eprintln!(
            "chain: rep {rep}: single {:.2} s ({:.2} CPU-s, {:.0} % busy), chain {:.2} s ({:.2} CPU-s, {:.0} % busy) of which the start on C {:.2} s (B's own transfer {:?}{})",
            single[rep],
            single_cpu.seconds[rep],
            100.0 * single_cpu.busy[rep],
            chained[rep],
            chain_cpu.seconds[rep],
            100.0 * chain_cpu.busy[rep],
            onward[rep],
            passed.state(),
            if passed.passed_on_to.is_empty() {
                ", finished before C"
            } else {
                ", passed on"
            }
        );
    }
    let (single_s, chain_s, onward_s) = (summary(&single)?, summary(&chained)?, summary(&onward)?);
    let ratio = chain_s.median / single_s.median;
    let (single_work, chain_work) = (summary(&single_cpu.seconds)?, summary(&chain_cpu.seconds)?);
    let (single_busy, chain_busy) = (summary(&single_cpu.busy)?, summary(&chain_cpu.busy)?);
    let mut text = String::new();
    writeln!(
        text,
        "chain A->B->C: a {} MiB volume, written, moved on from B while B still copies it; \
         time until C is done {:.2} s against a single move's {:.2} s (medians of {reps}) = \
         {ratio:.2}x (target <= {TARGET}x) {}; the start on C (B's export, C's connect) took \
         {:.2} s of the chain's time; the guest's CPU time {:.2} s against {:.2} s = {:.2}x, \
         its {} CPUs {:.0} % and {:.0} % busy",
        params.chain_mib,
        chain_s.median,
        single_s.median,
        if ratio <= TARGET { "pass" } else { "MISSED" },
        onward_s.median,
        chain_work.median,
        single_work.median,
        chain_work.median / single_work.median,
        cpu_count(),
        100.0 * chain_busy.median,
        100.0 * single_busy.median,
    )?;
    let report = json!({
        "volume_mib": params.chain_mib,
        "reps": reps,
        "single_s": stats_json(&single),
        "chain_s": stats_json(&chained),
        "onward_start_s": stats_json(&onward),
        "chain_vs_single": ratio,
        "target": TARGET,
        "cpus": cpu_count(),
        "single_cpu_s": stats_json(&single_cpu.seconds),
        "chain_cpu_s": stats_json(&chain_cpu.seconds),
        "single_busy": stats_json(&single_cpu.busy),
        "chain_busy": stats_json(&chain_cpu.busy),
        "cpu_vs_single": chain_work.median / single_work.median,
    });
    Ok((report, text))
}

/// The guest's CPU time so far (the first line of /proc/stat).
fn cpu_ticks() -> BenchResult<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    Ok(parse_cpu_line(stat.lines().next().unwrap_or_default())?)
}

/// Busy and all clock ticks of all CPUs from /proc/stat's `cpu` line.
fn parse_cpu_line(line: &str) -> Result<CpuTicks, String> {
    let ticks = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|err| format!("/proc/stat's cpu line {line:?}: {err}"))?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        return Err(format!("/proc/stat's cpu line is short: {line:?}"));
    };
    let busy = user + nice + system + irq + softirq + steal;
    Ok(CpuTicks {
        busy,
        all: busy + idle + iowait,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTicks {
    busy: u64,
    all: u64,
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Per sample: the guest's busy CPU time in seconds and the busy share of
/// all its CPUs.
#[derive(Debug, Default)]
struct CpuUse {
    seconds: Vec<f64>,
    busy: Vec<f64>,
}

impl CpuUse {
    /// A sample of `elapsed` seconds between `before` and `after`: all
    /// CPUs' ticks over it stand for `elapsed` seconds of each CPU.
    fn add(&mut self, before: CpuTicks, after: CpuTicks, elapsed: f64) {
        let all = after.all.saturating_sub(before.all).max(1) as f64;
        let share = after.busy.saturating_sub(before.busy) as f64 / all;
        self.busy.push(share);
        self.seconds.push(share * elapsed * cpu_count() as f64);
    }
}

pub(super) async fn state_of(
    agent: &Agent,
    transfer: &str,
) -> BenchResult<dmclone::api::proto::v1::Transfer> {
    Ok(TransfersClient::new(agent.channel().await?)
        .get_transfer(TransferRef {
            transfer_id: transfer.into(),
        })
        .await?
        .into_inner())
}

pub(super) async fn wait_done(agent: &Agent, transfer: &str) -> BenchResult<()> {
    let began = Instant::now();
    loop {
        let now = state_of(agent, transfer).await?;
        match now.state() {
            TransferState::Done => return Ok(()),
            TransferState::Failed | TransferState::Aborted => {
                return Err(format!(
                    "transfer {transfer} ended {:?}: {}",
                    now.state(),
                    now.message
                )
                .into());
            }
            _ if began.elapsed() > MOVE_TIMEOUT => {
                return Err(format!("transfer {transfer} not done within {MOVE_TIMEOUT:?}").into());
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Once `transfer` is done and its source released, deletes the moved
/// volume on `agent`, so the next sample starts from the same pools.
pub(super) async fn delete_when_released(
    agent: &Agent,
    transfer: &str,
    volume: &str,
) -> BenchResult<()> {
    released(agent, transfer).await?;
    unpublish(agent, volume).await?;
    delete_volume(agent, volume).await
}

pub(super) async fn delete_volume(agent: &Agent, volume: &str) -> BenchResult<()> {
    agent
        .client()
        .await?
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume.into(),
        })
        .await?;
    Ok(())
}

pub(super) async fn unpublish(agent: &Agent, volume: &str) -> BenchResult<()> {
    agent
        .client()
        .await?
        .unpublish_volume(UnpublishVolumeRequest {
            volume_id: volume.into(),
        })
        .await?;
    Ok(())
}

/// Waits until `transfer`'s source confirmed it let go of its copy.
pub(super) async fn released(
    agent: &Agent,
    transfer: &str,
) -> BenchResult<dmclone::api::proto::v1::Transfer> {
    let began = Instant::now();
    loop {
        let now = state_of(agent, transfer).await?;
        if now.source_released {
            return Ok(now);
        }
        if began.elapsed() > MOVE_TIMEOUT {
            return Err(format!("the source of {transfer} did not let go: {now:?}").into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts hop `hop` (1: A->B, 2: B->C) of `sample`'s volume.
async fn begin(route: &Route, sample: usize, hop: u8, size: u64) -> BenchResult<()> {
    start(
        route,
        &transfer_of(sample, hop),
        &volume_of(sample),
        size,
        false,
    )
    .await?;
    Ok(())
}

/// The CPU accounting's arithmetic, checked without a kernel.
pub(super) fn self_check() -> Result<(), String> {
    // Guest (and guest_nice) come after steal and are counted in user.
    let ticks = parse_cpu_line("cpu  100 5 50 800 20 3 2 1 7 0")?;
    if ticks
        != (CpuTicks {
            busy: 161,
            all: 981,
        })
    {
        return Err(format!("/proc/stat parsed as {ticks:?}"));
    }
    if parse_cpu_line("cpu  1 2 3").is_ok() || parse_cpu_line("").is_ok() {
        return Err("a short /proc/stat cpu line was accepted".into());
    }
    let mut used = CpuUse::default();
    let before = CpuTicks { busy: 0, all: 0 };
    used.add(
        before,
        CpuTicks {
            busy: 150,
            all: 200,
        },
        2.0,
    );
    let cpus = cpu_count() as f64;
    if used.busy != [0.75] || (used.seconds[0] - 1.5 * cpus).abs() > 1e-9 {
        return Err(format!("CPU use of a sample: {used:?}"));
    }
    Ok(())
}
