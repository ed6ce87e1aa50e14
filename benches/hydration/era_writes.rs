//! Section 5: 4 KiB random writes with dm-era in the stack.

use dmclone::units::sectors;
use std::collections::BTreeMap;

use dmclone::dm::{
    names::DeviceName,
    status::EraStatus,
    table::{Era, Table, Target as DmTarget},
};
use serde_json::{Value, json};

use crate::{
    common::{BenchResult, fio, stats, stats_json},
    params::{Params, size_label},
    pause::Steps,
    report::Report,
    rig::{Rig, dm_name, era_metadata_device},
    tools::{SEQ_WRITE, random_4k},
};

/// The era block of a change-tracking volume (the agent's default).
pub(crate) const ERA_BLOCK_BYTES: u64 = dmclone::config::DEFAULT_CHANGE_BLOCK_BYTES;
/// The thin id of dm-era's metadata in the rig's pool (the destination is 1).
pub(crate) const ERA_META_THIN_ID: u32 = 2;
pub(crate) const LOCAL_ERA_META_THIN_ID: u32 = 3;
/// The target for era steady-state IOPS over linear.
pub(crate) const ERA_TARGET: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteRun {
    /// linear over the thin device, as an untracked volume's public device.
    Linear,
    /// dm-era over the thin device, every era block already written in the
    /// current era.
    EraSteady,
    /// dm-era right after a `checkpoint` message: a new era, so each first
    /// write to a block waits for a metadata commit.
    EraAfterCheckpoint,
}

impl WriteRun {
    pub(crate) const ALL: [WriteRun; 3] = [
        WriteRun::Linear,
        WriteRun::EraAfterCheckpoint,
        WriteRun::EraSteady,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            WriteRun::Linear => "linear over thin (baseline)",
            WriteRun::EraSteady => "era over thin, steady within one era",
            WriteRun::EraAfterCheckpoint => "era over thin, right after a checkpoint",
        }
    }
}

/// The devices of section 5, all over the rig's destination thin device.
pub(crate) struct EraRig {
    pub(crate) linear: DeviceName,
    pub(crate) era: DeviceName,
}

impl EraRig {
    /// dm-era's metadata on a new thin device of the rig's pool, sized and
    /// formatted as the agent does it (a fresh thin device reads as zeros,
    /// so dm-era formats it), then era(meta, dest) and linear(dest) side by
    /// side: both map the same provisioned blocks.
    pub(crate) async fn build(rig: &Rig) -> BenchResult<Self> {
        let meta = era_metadata_device(&rig.dm, rig.pool_dev, ERA_META_THIN_ID, "era-meta").await?;
        let era = dm_name("era")?;
        let era_table = Table::single(
            sectors(rig.size),
            DmTarget::Era(Era {
                metadata: meta,
                origin: rig.dest_dev,
                block_sectors: sectors(ERA_BLOCK_BYTES),
            }),
        )?;
        rig.dm.create(&era, None, &era_table).await?;
        let linear = dm_name("linear")?;
        rig.dm.create(&linear, None, &rig.linear_table()?).await?;
        Ok(Self { linear, era })
    }

    pub(crate) async fn era_status(&self, rig: &Rig) -> BenchResult<EraStatus> {
        Ok(rig.dm.status_of::<EraStatus>(&self.era, 0).await?)
    }

    /// One timed run of `kind`, the checkpoint run after a `checkpoint`
    /// message. Linear keeps no state: every block of the thin device was
    /// provisioned at setup. Returns the IOPS.
    pub(crate) async fn run(&self, rig: &Rig, kind: WriteRun, seconds: u64) -> BenchResult<f64> {
        let path = match kind {
            WriteRun::Linear => self.linear.mapper_path(),
            WriteRun::EraSteady | WriteRun::EraAfterCheckpoint => self.era.mapper_path(),
        };
        if kind == WriteRun::EraAfterCheckpoint {
            rig.dm.message(&self.era, 0, "checkpoint").await?;
        }
        let (_, iops) = fio(&path, random_4k("randwrite", seconds), rig.size)?;
        Ok(iops)
    }

    /// Writes the whole range once through dm-era, untimed (1 MiB
    /// sequential): every era block is then marked in the current era. Slow
    /// where it marks blocks: each first write to an era block waits for a
    /// dm-era commit, which flushes its metadata thin device, which commits
    /// the pool's metadata.
    pub(crate) fn mark_all(&self, rig: &Rig) -> BenchResult<()> {
        fio(&self.era.mapper_path(), SEQ_WRITE, rig.size)?;
        Ok(())
    }

    /// Removes the devices; the thin id goes with the pool at teardown.
    pub(crate) async fn remove(self, rig: &Rig) -> BenchResult<()> {
        rig.dm.remove(&self.era).await?;
        rig.dm.remove(&self.linear).await?;
        rig.dm.remove(&dm_name("era-meta")?).await?;
        Ok(())
    }
}

pub(crate) async fn section_era(
    rig: &mut Rig,
    params: &Params,
    report: &mut Report,
) -> BenchResult<Value> {
    let era_rig = EraRig::build(rig).await?;
    let measured = era_runs(rig, &era_rig, params).await;
    let removed = era_rig.remove(rig).await;
    let samples = measured?;
    removed?;
    let values = |kind: WriteRun| samples.iops[&(kind as usize)].clone();
    let ratios = |kind: WriteRun| samples.ratios[&(kind as usize)].clone();
    out!(report);
    out!(
        report,
        "5. 4 KiB random-write IOPS, dm-era (block {}) vs linear over the same pre-filled thin device (fio randwrite bs=4k",
        size_label(ERA_BLOCK_BYTES)
    );
    out!(
        report,
        "   iodepth=32 libaio direct gtod_reduce, {} s each, {} rounds). A round: a `checkpoint` message and the checkpoint",
        params.fio_seconds,
        params.reps
    );
    out!(
        report,
        "   run (all {} era blocks start unwritten in the new era); an untimed 1M sequential write of the whole range",
        rig.size / ERA_BLOCK_BYTES
    );
    out!(
        report,
        "   through dm-era (every block marked); then steady and linear runs back to back, A B B A, A and B swapped"
    );
    out!(
        report,
        "   every round. ×linear: each round's mean over the same round's linear mean, median over rounds (min, max)"
    );
    out!(
        report,
        "{:<48} {:>9} {:>9} {:>9} | {:>9} {:>15}",
        "device",
        "min",
        "median",
        "max",
        "×linear",
        "(min, max)"
    );
    for kind in WriteRun::ALL {
        let s = stats(&values(kind)).ok_or("no samples")?;
        let r = stats(&ratios(kind)).ok_or("no samples")?;
        out!(
            report,
            "{:<48} {:9.0} {:9.0} {:9.0} | {:9.2} {:>15}",
            kind.label(),
            s.min,
            s.median,
            s.max,
            r.median,
            format!("({:.2}, {:.2})", r.min, r.max)
        );
    }
    let median_ratio = |kind: WriteRun| stats(&ratios(kind)).map(|s| s.median);
    let steady = median_ratio(WriteRun::EraSteady).ok_or("no era samples")?;
    let after = median_ratio(WriteRun::EraAfterCheckpoint).ok_or("no era samples")?;
    out!(
        report,
        "era steady state / linear = {steady:.2}× (target >= {ERA_TARGET}×) {}; right after a checkpoint {after:.2}×",
        if steady >= ERA_TARGET {
            "pass"
        } else {
            "MISSED"
        },
    );
    Ok(json!({
        "fio": {"rw": "randwrite", "bs": 4096, "iodepth": 32, "ioengine": "libaio", "direct": true, "gtod_reduce": true, "seconds": params.fio_seconds},
        "era_block_bytes": ERA_BLOCK_BYTES,
        "era_blocks": rig.size / ERA_BLOCK_BYTES,
        "size_bytes": rig.size,
        "era_metadata": "a thin device of the same pool, sized as the agent sizes it",
        "linear_iops": stats_json(&values(WriteRun::Linear)),
        "era_steady_iops": stats_json(&values(WriteRun::EraSteady)),
        "era_after_checkpoint_iops": stats_json(&values(WriteRun::EraAfterCheckpoint)),
        "steady_vs_linear_per_round": stats_json(&ratios(WriteRun::EraSteady)),
        "after_checkpoint_vs_linear_per_round": stats_json(&ratios(WriteRun::EraAfterCheckpoint)),
        "steady_vs_linear": steady,
        "after_checkpoint_vs_linear": after,
        "ratio_basis": "each round's mean era IOPS over the same round's mean linear IOPS (two runs each, A B B A), median over rounds",
        "target": ERA_TARGET,
        "pass": steady >= ERA_TARGET,
        "era_status_per_round": samples.statuses,
    }))
}

/// Per `WriteRun` (as usize): IOPS of every run, and each round's mean over
/// that round's linear mean.
pub(crate) struct EraSamples {
    pub(crate) iops: BTreeMap<usize, Vec<f64>>,
    pub(crate) ratios: BTreeMap<usize, Vec<f64>>,
    pub(crate) statuses: Vec<String>,
}

pub(crate) async fn era_runs(
    rig: &Rig,
    era_rig: &EraRig,
    params: &Params,
) -> BenchResult<EraSamples> {
    // Warm-up (untimed): emulation translates code paths on first use.
    for path in [era_rig.linear.mapper_path(), era_rig.era.mapper_path()] {
        fio(&path, random_4k("randwrite", 1), rig.size)?;
    }
    let mut samples: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut statuses = Vec::new();
    for round in 0..params.reps {
        let mut steps = Steps::default();
        let after = era_rig
            .run(rig, WriteRun::EraAfterCheckpoint, params.fio_seconds)
            .await?;
        steps.mark(&format!("after checkpoint {after:.0} IOPS"));
        era_rig.mark_all(rig)?;
        steps.mark("marking every block");
        // The steady runs and their baseline back to back, A B B A with A
        // and B swapped every round, so that a drift of the machine's speed
        // within the round weighs on both alike (linear writes do not pass
        // through dm-era, so the era stays fully marked).
        let (a, b) = if round % 2 == 0 {
            (WriteRun::Linear, WriteRun::EraSteady)
        } else {
            (WriteRun::EraSteady, WriteRun::Linear)
        };
        let mut iops: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        iops.insert(WriteRun::EraAfterCheckpoint as usize, vec![after]);
        for kind in [a, b, b, a] {
            let value = era_rig.run(rig, kind, params.fio_seconds).await?;
            steps.mark(&format!("{kind:?} {value:.0} IOPS"));
            iops.entry(kind as usize).or_default().push(value);
        }
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let linear = mean(&iops[&(WriteRun::Linear as usize)]);
        for (kind, values) in iops {
            ratios.entry(kind).or_default().push(mean(&values) / linear);
            samples.entry(kind).or_default().extend(values);
        }
        let status = era_rig.era_status(rig).await?;
        eprintln!(
            "[bench] era run {}/{}: {}; era {} metadata {}/{}",
            round + 1,
            params.reps,
            steps.text,
            status.current_era,
            status.metadata.used,
            status.metadata.total
        );
        statuses.push(format!(
            "era {} metadata {}/{}",
            status.current_era, status.metadata.used, status.metadata.total
        ));
    }
    Ok(EraSamples {
        iops: samples,
        ratios,
        statuses,
    })
}
