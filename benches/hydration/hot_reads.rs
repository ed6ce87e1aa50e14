//! Part of section 2: what a guest's read of a region not yet copied costs
//! during hydration, against a read of a region already copied.
//!
//! This decides whether steering the copy toward the regions a guest reads
//! ("hot regions first") is worth building. dm-clone copies in region
//! order from the start of the device and offers no message that moves a
//! given region ahead (`hydration_threshold`, `hydration_batch_size`,
//! `enable_hydration` and `disable_hydration` only); it already holds its
//! background copy back while guest I/O is in flight. The only way to copy
//! a region out of order is a write to it, and a userspace read-then-write
//! races with the guest's own writes. So the measurement is the bound on
//! what any steering could save: the latency of a read served through to
//! the source against one served locally, while the copy runs at the
//! agent's default knobs and while it is paused.

use std::{
    os::unix::fs::FileExt,
    path::Path,
    time::{Duration, Instant},
};

use dmclone::{
    aligned::AlignedBuf,
    config::{DEFAULT_HYDRATION_BATCH_SIZE, DEFAULT_HYDRATION_THRESHOLD, DEFAULT_REGION_BYTES},
};
use serde_json::{Value, json};

use crate::{
    blockdev::splitmix,
    common::{BenchResult, open_direct, stats, stats_json},
    params::Knobs,
    rig::Rig,
};

/// Reads of each kind per phase, alternating.
const PAIRS: usize = 128;
/// Copied reads land in the first eighth, reads of regions not yet copied
/// in the last quarter; the probe starts once a quarter is in.
const COPIED_END: f64 = 0.125;
const NOT_COPIED_START: f64 = 0.75;
const START_AT: f64 = 0.25;
const READ_BYTES: usize = 4096;

const AGENT_KNOBS: Knobs = Knobs {
    region_bytes: DEFAULT_REGION_BYTES,
    threshold: Some(DEFAULT_HYDRATION_THRESHOLD),
    batch: Some(DEFAULT_HYDRATION_BATCH_SIZE),
};

/// Latencies in milliseconds of one phase's reads.
#[derive(Default)]
pub(crate) struct Phase {
    pub(crate) copied: Vec<f64>,
    pub(crate) not_copied: Vec<f64>,
}

impl Phase {
    fn json(&self) -> Value {
        json!({
            "copied_ms": stats_json(&self.copied),
            "not_copied_ms": stats_json(&self.not_copied),
            "not_copied_vs_copied": self.ratio(),
        })
    }

    /// Median read latency of regions not yet copied over copied ones.
    pub(crate) fn ratio(&self) -> Option<f64> {
        Some(stats(&self.not_copied)?.median / stats(&self.copied)?.median)
    }

    pub(crate) fn line(&self) -> String {
        let fmt = |v: &[f64]| match stats(v) {
            Some(s) => format!("{:.2} / {:.2} / {:.2} ms", s.min, s.median, s.max),
            None => "none".to_owned(),
        };
        format!(
            "not yet copied {} vs copied {} (min / median / max): {}",
            fmt(&self.not_copied),
            fmt(&self.copied),
            self.ratio()
                .map_or("n/a".to_owned(), |r| format!("{r:.2}x"))
        )
    }
}

/// What the probe measured over every rep.
#[derive(Default)]
pub(crate) struct HotReads {
    pub(crate) copying: Phase,
    pub(crate) paused: Phase,
    /// Hydrated share before and after each rep's copying probe.
    progress: Vec<(f64, f64)>,
}

impl HotReads {
    pub(crate) fn json(&self) -> Value {
        json!({
            "knobs": AGENT_KNOBS.json(),
            "read_bytes": READ_BYTES,
            "pairs_per_phase": PAIRS,
            "copying": self.copying.json(),
            "paused": self.paused.json(),
            "hydrated_fraction_before_after": self.progress,
        })
    }

    pub(crate) fn progress_text(&self) -> String {
        let parts: Vec<String> = self
            .progress
            .iter()
            .map(|(a, b)| format!("{:.1}%→{:.1}%", a * 100.0, b * 100.0))
            .collect();
        parts.join(", ")
    }
}

/// One rep: a clone at the agent's knobs with dm-era above it, probed
/// while it copies and again with its copy paused, then left to finish and
/// removed.
pub(crate) async fn probe(rig: &mut Rig, rep: u64, into: &mut HotReads) -> BenchResult<()> {
    let started = rig.start_clone(&AGENT_KNOBS, false, false).await?;
    let public = rig.era_above().await?;
    let path = public.mapper_path();
    let before = wait_for_share(rig, START_AT).await?;
    let limit = copied_regions_bound(rig.size);
    read_pairs(&path, rig.size, rep * 2, &mut into.copying)?;
    let after = rig.clone_status().await?;
    // Copies in flight are not counted as hydrated yet: the threshold and
    // one more batch may be on their way beyond the count.
    let reach = after.hydrated_regions
        + u64::from(after.hydration_threshold)
        + u64::from(after.hydration_batch_size);
    if reach > limit {
        return Err(format!(
            "the copy reached region {reach} of {} during the probe: reads meant for regions not yet copied may have found them copied",
            after.total_regions
        )
        .into());
    }
    into.progress
        .push((before.hydrated_fraction(), after.hydrated_fraction()));
    rig.dm
        .message(&rig.public, 0, "hydration_threshold 0")
        .await?;
    read_pairs(&path, rig.size, rep * 2 + 1, &mut into.paused)?;
    rig.dm
        .message(&rig.public, 0, "hydration_threshold 1024")
        .await?;
    rig.wait_hydrated(started.seen).await?;
    rig.remove_era_above().await?;
    rig.dm.remove(&rig.public).await?;
    Ok(())
}

/// The count of regions below the first one the probe reads as not copied.
fn copied_regions_bound(size: u64) -> u64 {
    (size as f64 * NOT_COPIED_START) as u64 / DEFAULT_REGION_BYTES
}

async fn wait_for_share(rig: &Rig, share: f64) -> BenchResult<dmclone::dm::status::CloneStatus> {
    let deadline = Instant::now() + rig.hydration_timeout;
    loop {
        let status = rig.clone_status().await?;
        if status.hydrated_fraction() >= share {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(format!("the clone did not reach {:.0} %", share * 100.0).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `PAIRS` 4 KiB O_DIRECT reads of each kind, alternating, at random
/// 4 KiB-aligned offsets of their part of the device.
fn read_pairs(path: &Path, size: u64, seed: u64, into: &mut Phase) -> BenchResult<()> {
    let file = open_direct(path, false)?;
    let mut buf = AlignedBuf::new(READ_BYTES);
    let blocks = size / READ_BYTES as u64;
    let copied = (blocks as f64 * COPIED_END) as u64;
    let not_copied_first = (blocks as f64 * NOT_COPIED_START) as u64;
    for i in 0..PAIRS as u64 {
        let draw = splitmix(seed.wrapping_mul(1 << 32) ^ i);
        let copied_at = (draw % copied) * READ_BYTES as u64;
        let far_at =
            (not_copied_first + (draw >> 20) % (blocks - not_copied_first)) * READ_BYTES as u64;
        into.copied.push(timed_read(&file, &mut buf, copied_at)?);
        into.not_copied.push(timed_read(&file, &mut buf, far_at)?);
    }
    Ok(())
}

fn timed_read(file: &std::fs::File, buf: &mut AlignedBuf, offset: u64) -> BenchResult<f64> {
    let at = Instant::now();
    file.read_exact_at(buf.as_mut_slice(), offset)
        .map_err(|err| format!("read at {offset}: {err}"))?;
    Ok(at.elapsed().as_secs_f64() * 1000.0)
}
