//! Section 2: random-read IOPS during hydration and after finalize.

use serde_json::{Value, json};

use crate::{
    common::{BenchResult, fio, fio_in_turn, stats, stats_json},
    hot_reads::{self, HotReads},
    params::{Knobs, Params},
    pause::Steps,
    report::Report,
    rig::Rig,
    tools::random_4k,
};

/// Runs after finalize per rep, each between two runs of the raw thin
/// device (the one after a run is the one before the next), all in one fio
/// process: with one pair per rep, each its own fio process, the per-run
/// ratios spread more than the gap being measured.
const AFTER_ROUNDS: usize = 6;

pub(crate) async fn section_iops(
    rig: &mut Rig,
    params: &Params,
    report: &mut Report,
) -> BenchResult<Value> {
    let job = random_4k("randread", params.fio_seconds);
    let size = rig.size;
    let mut raw_thin = Vec::new();
    let mut raw_ns = Vec::new();
    let mut during = Vec::new();
    let mut after = Vec::new();
    let mut collapsed = Vec::new();
    let mut hydrated = Vec::new();
    // After finalize against the raw thin device read just before and just
    // after it, per run: the baseline drifts between runs (the emulated
    // guest's speed moves more than the gap being measured).
    let mut paired = Vec::new();
    // Warm-up (untimed): emulation translates code paths on first use.
    fio(&rig.dest_path(), random_4k("randread", 1), size)?;
    for rep in 0..params.reps {
        let mut steps = Steps::default();
        let (_, thin_first) = fio(&rig.dest_path(), job, size)?;
        raw_thin.push(thin_first);
        steps.mark("fio thin");
        let (_, iops) = fio(&rig.namespace.path, job, size)?;
        raw_ns.push(iops);
        steps.mark("fio namespace");

        let started = rig
            .start_clone(&Knobs::KERNEL_DEFAULTS, false, false)
            .await?;
        // The agent's public device: dm-era above the clone.
        let public = rig.era_above().await?;
        let before = rig.clone_status().await?;
        steps.mark("clone");
        let (_, iops) = fio(&public.mapper_path(), job, size)?;
        let later = rig.clone_status().await?;
        during.push(iops);
        hydrated.push((before.hydrated_fraction(), later.hydrated_fraction()));
        steps.mark("fio during");

        // Finish quickly, then finalize as the agent does.
        rig.dm
            .message(&rig.public, 0, "hydration_threshold 1024")
            .await?;
        rig.dm
            .message(&rig.public, 0, "hydration_batch_size 256")
            .await?;
        rig.wait_hydrated(started.seen).await?;
        steps.mark("rest of hydration");
        rig.finalize_beneath_era().await?;
        let rep_pairs = paired.len();
        let (thin_path, public_path) = (rig.dest_path(), public.mapper_path());
        let mut order = vec![thin_path.as_path()];
        for _ in 0..AFTER_ROUNDS {
            order.extend([public_path.as_path(), thin_path.as_path()]);
        }
        let runs: Vec<f64> = fio_in_turn(&order, job, size)?
            .into_iter()
            .map(|(_, iops)| iops)
            .collect();
        raw_thin.extend(runs.iter().step_by(2));
        for around in runs.windows(3).step_by(2) {
            after.push(around[1]);
            paired.push(around[1] * 2.0 / (around[0] + around[2]));
        }
        steps.mark("finalize + fio thin, then after and thin in turn");
        // What the next publish makes: dm-era straight over the thin device.
        rig.remove_era_above().await?;
        rig.dm.remove(&rig.public).await?;
        let table = crate::rig::local_table(size, rig.local_meta, rig.dest_dev)?;
        rig.dm.create(&rig.public, None, &table).await?;
        let (_, iops) = fio(&rig.public.mapper_path(), job, size)?;
        collapsed.push(iops);
        rig.dm.remove(&rig.public).await?;
        steps.mark("fio era over thin");
        let (_, iops) = fio(&rig.dest_path(), job, size)?;
        raw_thin.push(iops);
        steps.mark("fio thin");
        eprintln!(
            "[bench] iops run {}/{}: raw thin {:.0}, namespace {:.0}, era over clone during hydration {:.0} (hydrated {:.1}% -> {:.1}%), era over the thin id beneath after finalize {} ({}x the raw thin device around each), era over thin {:.0}; {}",
            rep + 1,
            params.reps,
            thin_first,
            raw_ns[rep],
            during[rep],
            before.hydrated_fraction() * 100.0,
            later.hydrated_fraction() * 100.0,
            joined(&after[rep_pairs..], 0),
            joined(&paired[rep_pairs..], 3),
            collapsed[rep],
            steps.text
        );
    }
    let mut hot = HotReads::default();
    for rep in 0..params.reps {
        hot_reads::probe(rig, rep as u64, &mut hot).await?;
    }
    let thin = stats(&raw_thin).ok_or("no raw thin samples")?;
    out!(report);
    out!(
        report,
        "2. 4 KiB random-read IOPS through the public device (fio randread bs=4k iodepth=32 libaio direct gtod_reduce, {} s each, {} runs)",
        params.fio_seconds,
        params.reps
    );
    out!(
        report,
        "{:<48} {:>9} {:>9} {:>9} | {:>9}",
        "device",
        "min",
        "median",
        "max",
        "×raw thin"
    );
    let rows: [(&str, &Vec<f64>); 5] = [
        ("raw thin device (destination)", &raw_thin),
        ("raw namespace (NVMe/TCP source)", &raw_ns),
        ("public = era over clone, hydrating (4K/1/1)", &during),
        ("public = era over thin (2nd activation), finalized", &after),
        ("public = era over thin, made again", &collapsed),
    ];
    for (label, values) in rows {
        let s = stats(values).ok_or("no samples")?;
        out!(
            report,
            "{label:<48} {:9.0} {:9.0} {:9.0} | {:9.2}",
            s.min,
            s.median,
            s.max,
            s.median / thin.median
        );
    }
    let fractions: Vec<String> = hydrated
        .iter()
        .map(|(a, b)| format!("{:.1}%→{:.1}%", a * 100.0, b * 100.0))
        .collect();
    let finished_during = hydrated.iter().filter(|(_, b)| *b >= 1.0).count();
    out!(
        report,
        "hydrated share before→after each during-hydration fio run: {}{}",
        fractions.join(", "),
        if finished_during > 0 {
            format!("; WARNING: {finished_during} run(s) finished hydrating during fio")
        } else {
            "; hydration still running at the end of every run".to_owned()
        }
    );
    let pairs = stats(&paired).ok_or("no paired samples")?;
    out!(
        report,
        "after finalize / the raw thin device read just before and after it, per run: {:.3} / {:.3} / {:.3} (min / median / max); raw thin spread over all runs {:.0}-{:.0} IOPS ({:+.1} % / {:+.1} % of its median)",
        pairs.min,
        pairs.median,
        pairs.max,
        thin.min,
        thin.max,
        (thin.min / thin.median - 1.0) * 100.0,
        (thin.max / thin.median - 1.0) * 100.0
    );
    out!(
        report,
        "4 KiB O_DIRECT reads one at a time during hydration (agent's knobs, dm-era above the clone), a region not yet copied against one copied: while copying {}; copy paused {}; hydrated share before→after each copying probe: {}",
        hot.copying.line(),
        hot.paused.line(),
        hot.progress_text()
    );
    let ratio = |v: &[f64]| stats(v).map(|s| s.median / thin.median);
    Ok(json!({
        "fio": {"rw": "randread", "bs": 4096, "iodepth": 32, "ioengine": "libaio", "direct": true, "gtod_reduce": true, "seconds": params.fio_seconds},
        "raw_thin_iops": stats_json(&raw_thin),
        "raw_namespace_iops": stats_json(&raw_ns),
        "clone_during_hydration_iops": stats_json(&during),
        "era_over_lower_thin_after_finalize_iops": stats_json(&after),
        "era_over_thin_iops": stats_json(&collapsed),
        "era_over_thin_vs_raw_thin": ratio(&collapsed),
        "during_vs_raw_thin": ratio(&during),
        "after_vs_raw_thin": ratio(&after),
        "after_vs_raw_thin_paired": stats_json(&paired),
        "namespace_vs_raw_thin": ratio(&raw_ns),
        "hydrated_fraction_before_after": hydrated,
        "slow_knobs": Knobs::KERNEL_DEFAULTS.json(),
        "reads_by_region_during_hydration": hot.json(),
    }))
}

fn joined(values: &[f64], decimals: usize) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    parts.join("/")
}
