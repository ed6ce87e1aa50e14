//! Snapshots travelling with their volume: what crosses the network and
//! what the destination's pool holds, against the source.
//!
//! Two agents on this host, both exporting over NVMe/TCP loopback. A
//! sample: a volume of `--travel-mib` (256 MiB), written in full on A, gets
//! three snapshots; after each, 4 KiB lands in every tenth region, each
//! round in its own pool block of the region. The volume then moves A→B
//! with its snapshots. Figures: the bytes of snapshots B received against
//! the deltas (the pool blocks written after each snapshot, which is what
//! differs between one snapshot and the next, or the volume), B's pool data
//! once A let go against A's before the move (the volume and its snapshots
//! on both), and the time until the volume is done against the time until
//! its snapshots arrived too (both from `StartTransfer`). Each written
//! block is read back from every snapshot on B (through a volume made from
//! it): a snapshot that differs fails the bench. Verdicts: bytes received
//! at most 1.1x the deltas, B's pool at most 1.1x A's.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dmclone::{
    aligned::AlignedBuf,
    api::proto::v1::{
        CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, GetNodeInfoRequest,
        PublishVolumeRequest, node_client::NodeClient, snapshots_client::SnapshotsClient,
    },
    config::{DEFAULT_BLOCK_SIZE, DEFAULT_REGION_BYTES},
};
use serde_json::{Value, json};

use super::{
    Agent, Params,
    chain::{delete_volume, released, start_source, state_of, unpublish, wait_done, wind_up},
    common::{self, BenchResult, open_direct, stats_json},
    preflight, summary,
    usable::{Route, create, start},
};

const A_PREFIX: &str = "dmbenchta";
const B_PREFIX: &str = "dmbenchtb";
const A_PORT: &str = "14961";
const B_PORT: &str = "14962";
const A_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-00000000000a";
const A_HOST_ID: &str = "5ab1e000-0000-4000-8000-00000000000a";
const B_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ab1e000-0000-4000-8000-00000000000b";
const B_HOST_ID: &str = "5ab1e000-0000-4000-8000-00000000000b";
const MIB: u64 = 1 << 20;
const SNAPSHOTS: usize = 3;
/// A write lands in every this-many-th region after each snapshot.
const REGION_STRIDE: u64 = 10;
const WRITE_BYTES: usize = 4096;
/// Bytes received against the deltas, and B's pool against A's.
const TARGET: f64 = 1.1;
const POLL: Duration = Duration::from_millis(20);
const TRAVEL_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) async fn measure(params: &Params) -> BenchResult<(Value, String)> {
    let dm = preflight(params)?;
    for prefix in [A_PREFIX, B_PREFIX] {
        common::remove_devices_with_prefix(&dm, prefix).await?;
    }
    let size = params.travel_mib * MIB;
    // One volume and its snapshots at a time, on either side; each
    // snapshot, and on B the volume read from one, is promised the
    // volume's size (the pool files are sparse).
    let pool = format!("{}M", (SNAPSHOTS as u64 + 3) * params.travel_mib + 512);
    let a = start_source(params, &pool, A_PREFIX, [A_PORT, A_NQN, A_HOST_ID]).await?;
    let b = start_source(params, &pool, B_PREFIX, [B_PORT, B_NQN, B_HOST_ID]).await?;
    let measured = measure_samples(params, size, [&a, &b]).await;
    wind_up("travel", params, &dm, vec![a, b], measured).await
}

/// One sample's figures.
struct Travel {
    volume_s: f64,
    snapshots_s: f64,
    received: u64,
    deltas: u64,
    pool_a: u64,
    pool_b: u64,
}

async fn measure_samples(
    params: &Params,
    size: u64,
    agents: [&Agent; 2],
) -> BenchResult<(Value, String)> {
    let mut samples = Vec::new();
    for sample in 0..params.travel_reps {
        let travel = one_travel(size, sample, agents).await?;
        eprintln!(
            "travel: rep {sample}: volume done in {:.2} s, snapshots in {:.2} s; {} bytes of \
             snapshots received for {} of deltas; pool data {} bytes on A, {} on B",
            travel.volume_s,
            travel.snapshots_s,
            travel.received,
            travel.deltas,
            travel.pool_a,
            travel.pool_b
        );
        samples.push(travel);
    }
    report(params, &samples)
}

fn report(params: &Params, samples: &[Travel]) -> BenchResult<(Value, String)> {
    let of = |figure: fn(&Travel) -> f64| samples.iter().map(figure).collect::<Vec<f64>>();
    let bytes_ratios = of(|t| t.received as f64 / t.deltas.max(1) as f64);
    let pool_ratios = of(|t| t.pool_b as f64 / t.pool_a.max(1) as f64);
    let (volume_s, snapshots_s) = (of(|t| t.volume_s), of(|t| t.snapshots_s));
    let (bytes, pool) = (summary(&bytes_ratios)?, summary(&pool_ratios)?);
    let (volume, arrived) = (summary(&volume_s)?, summary(&snapshots_s)?);
    let deltas = samples.first().map_or(0, |t| t.deltas);
    let verdict = |worst: f64| if worst <= TARGET { "pass" } else { "MISSED" };
    let mut text = String::new();
    writeln!(
        text,
        "snapshot travel: a {} MiB volume with {SNAPSHOTS} snapshots moved: {:.3}x the deltas' \
         {deltas} bytes received (worst of {}; target <= {TARGET}x) {}; the destination's pool \
         {:.3}x the source's (worst; target <= {TARGET}x) {}; volume done in {:.2} s, its \
         snapshots arrived {:.2} s after the start (medians)",
        params.travel_mib,
        bytes.max,
        samples.len(),
        verdict(bytes.max),
        pool.max,
        verdict(pool.max),
        volume.median,
        arrived.median,
    )?;
    let report = json!({
        "volume_mib": params.travel_mib,
        "reps": samples.len(),
        "snapshots": SNAPSHOTS,
        "deltas_bytes": deltas,
        "received_bytes": stats_json(&of(|t| t.received as f64)),
        "bytes_ratio": stats_json(&bytes_ratios),
        "pool_a_bytes": stats_json(&of(|t| t.pool_a as f64)),
        "pool_b_bytes": stats_json(&of(|t| t.pool_b as f64)),
        "pool_ratio": stats_json(&pool_ratios),
        "volume_s": stats_json(&volume_s),
        "snapshots_s": stats_json(&snapshots_s),
        "target": TARGET,
    });
    Ok((report, text))
}

fn volume_of(sample: usize) -> String {
    format!("5ab1e000-0000-4000-d200-{sample:012x}")
}

fn snapshot_of(sample: usize, round: usize) -> String {
    format!("5ab1e000-0000-4000-d3{round:02x}-{sample:012x}")
}

fn reader_of(sample: usize, round: usize) -> String {
    format!("5ab1e000-0000-4000-d4{round:02x}-{sample:012x}")
}

fn transfer_of(sample: usize) -> String {
    format!("5ab1e000-0000-4000-e200-{sample:012x}")
}

/// A block written after a snapshot: where, and what it held before.
struct Written {
    round: usize,
    offset: u64,
    before: AlignedBuf,
}

/// The volume and its snapshots on A, moved to B; checked and deleted there.
async fn one_travel(size: u64, sample: usize, [a, b]: [&Agent; 2]) -> BenchResult<Travel> {
    let volume = volume_of(sample);
    create(a, &volume, size, true).await?;
    let device = publish(a, &volume).await?;
    let mut written = Vec::new();
    for round in 0..SNAPSHOTS {
        snapshot(a, &snapshot_of(sample, round), &volume).await?;
        written.extend(write_round(&device, size, round, sample)?);
    }
    unpublish(a, &volume).await?;
    let pool_a = pool_data(a).await?;

    let transfer = transfer_of(sample);
    let began = Instant::now();
    start(&Route::new(a, b, B_NQN), &transfer, &volume, size, false).await?;
    wait_done(b, &transfer).await?;
    let volume_s = began.elapsed().as_secs_f64();
    let arrived = snapshots_arrived(b, &transfer).await?;
    let snapshots_s = began.elapsed().as_secs_f64();
    let done = released(b, &transfer).await?;
    let pool_b = pool_data(b).await?;
    if arrived != SNAPSHOTS as u32 {
        return Err(format!("{arrived} of {SNAPSHOTS} snapshots arrived: {done:?}").into());
    }
    for round in 0..SNAPSHOTS {
        check_snapshot(b, sample, round, size, &written).await?;
    }
    unpublish(b, &volume).await?;
    for round in 0..SNAPSHOTS {
        delete_snapshot(b, &snapshot_of(sample, round)).await?;
    }
    delete_volume(b, &volume).await?;
    Ok(Travel {
        volume_s,
        snapshots_s,
        received: done.snapshot_bytes_received,
        deltas: delta_bytes(&written),
        pool_a,
        pool_b,
    })
}

async fn publish(agent: &Agent, volume: &str) -> BenchResult<PathBuf> {
    let path = agent
        .client()
        .await?
        .publish_volume(PublishVolumeRequest {
            volume_id: volume.into(),
        })
        .await?
        .into_inner()
        .device_path;
    Ok(PathBuf::from(path))
}

async fn snapshot(agent: &Agent, snapshot: &str, volume: &str) -> BenchResult<()> {
    SnapshotsClient::new(agent.channel().await?)
        .create_snapshot(CreateSnapshotRequest {
            snapshot_id: snapshot.into(),
            volume_id: volume.into(),
        })
        .await?;
    Ok(())
}

async fn delete_snapshot(agent: &Agent, snapshot: &str) -> BenchResult<()> {
    SnapshotsClient::new(agent.channel().await?)
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot.into(),
        })
        .await?;
    Ok(())
}

async fn pool_data(agent: &Agent) -> BenchResult<u64> {
    NodeClient::new(agent.channel().await?)
        .get_node_info(GetNodeInfoRequest {})
        .await?
        .into_inner()
        .pool
        .map(|pool| pool.data_used_bytes)
        .ok_or_else(|| "the agent reports no pool".into())
}

/// Waits until the transfer's snapshots stopped arriving; returns how
/// many arrived.
async fn snapshots_arrived(agent: &Agent, transfer: &str) -> BenchResult<u32> {
    let began = Instant::now();
    loop {
        let now = state_of(agent, transfer).await?;
        if now.snapshots_total > 0 && now.snapshots_arrived == now.snapshots_total
            || now.source_released
        {
            return Ok(now.snapshots_arrived);
        }
        if began.elapsed() > TRAVEL_TIMEOUT {
            return Err(format!("the snapshots did not arrive in time: {now:?}").into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Where round `round` writes: 4 KiB in every tenth region, in a pool block
/// of its own (rounds never share one), at a place that varies by region.
fn round_offsets(size: u64, round: usize) -> Vec<u64> {
    let pages_per_block = DEFAULT_BLOCK_SIZE / WRITE_BYTES as u64;
    (0..size / DEFAULT_REGION_BYTES)
        .step_by(REGION_STRIDE as usize)
        .map(|region| {
            let block = (region % 4) * 4 + round as u64;
            let page = block * pages_per_block + region % pages_per_block;
            region * DEFAULT_REGION_BYTES + page * WRITE_BYTES as u64
        })
        .collect()
}

/// What round `round` of sample `sample` writes at `offset`.
fn block_of(offset: u64, round: usize, sample: usize) -> AlignedBuf {
    let mut block = AlignedBuf::new(WRITE_BYTES);
    let seed = (offset / WRITE_BYTES as u64) as u8 ^ (round as u8).wrapping_mul(29) ^ sample as u8;
    for (i, byte) in block.as_mut_slice().iter_mut().enumerate() {
        *byte = seed.wrapping_add(i as u8).wrapping_mul(3);
    }
    block
}

/// Writes a round's blocks through `path`, keeping what each held.
fn write_round(path: &Path, size: u64, round: usize, sample: usize) -> BenchResult<Vec<Written>> {
    let file = open_direct(path, true)?;
    let mut written = Vec::new();
    for offset in round_offsets(size, round) {
        let mut before = AlignedBuf::new(WRITE_BYTES);
        file.read_exact_at(before.as_mut_slice(), offset)?;
        file.write_all_at(block_of(offset, round, sample).as_slice(), offset)?;
        written.push(Written {
            round,
            offset,
            before,
        });
    }
    file.sync_all()?;
    Ok(written)
}

/// The pool blocks each round wrote: where each snapshot differs from the
/// next newer one (or the volume).
fn delta_bytes(written: &[Written]) -> u64 {
    let blocks: BTreeSet<(usize, u64)> = written
        .iter()
        .map(|w| (w.round, w.offset / DEFAULT_BLOCK_SIZE))
        .collect();
    blocks.len() as u64 * DEFAULT_BLOCK_SIZE
}

/// Snapshot `round` on B holds every block written before it and what the
/// later rounds overwrote.
async fn check_snapshot(
    b: &Agent,
    sample: usize,
    round: usize,
    size: u64,
    written: &[Written],
) -> BenchResult<()> {
    let reader = reader_of(sample, round);
    b.client()
        .await?
        .create_volume(CreateVolumeRequest {
            volume_id: reader.clone(),
            size_bytes: size,
            source_snapshot_id: snapshot_of(sample, round),
            ..Default::default()
        })
        .await?;
    let path = publish(b, &reader).await?;
    let file = open_direct(&path, false)?;
    let mut read = AlignedBuf::new(WRITE_BYTES);
    for block in written {
        file.read_exact_at(read.as_mut_slice(), block.offset)?;
        let same = if block.round < round {
            read.as_slice() == block_of(block.offset, block.round, sample).as_slice()
        } else {
            read.as_slice() == block.before.as_slice()
        };
        if !same {
            return Err(format!(
                "snapshot {round} differs on the destination at {}",
                block.offset
            )
            .into());
        }
    }
    drop(file);
    unpublish(b, &reader).await?;
    delete_volume(b, &reader).await
}

/// The workload's own arithmetic, checked without a kernel.
pub(super) fn self_check() -> Result<(), String> {
    let size = 256 * MIB;
    let rounds: Vec<Vec<u64>> = (0..SNAPSHOTS).map(|r| round_offsets(size, r)).collect();
    let blocks: BTreeSet<u64> = rounds
        .iter()
        .flatten()
        .map(|o| o / DEFAULT_BLOCK_SIZE)
        .collect();
    if rounds.iter().any(|r| r.len() != 26)
        || blocks.len() != 26 * SNAPSHOTS
        || rounds
            .iter()
            .flatten()
            .any(|o| o % WRITE_BYTES as u64 != 0 || o + WRITE_BYTES as u64 > size)
    {
        return Err(format!(
            "the travel's writes are wrong: {:?} offsets per round in {} pool blocks",
            rounds.iter().map(Vec::len).collect::<Vec<_>>(),
            blocks.len()
        ));
    }
    Ok(())
}
