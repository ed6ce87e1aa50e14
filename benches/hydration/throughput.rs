//! Section 1: hydration throughput.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use dmclone::dm::status::CloneStatus;
use serde_json::{Value, json};

use crate::{
    MB, MIB, WRITE_SAMPLE,
    blockdev::WriteWatcher,
    common::{BenchResult, Stats, fio, stats, stats_json},
    params::{Knobs, Params, size_label},
    report::{Report, ms},
    rig::{Rig, Swap},
    tools::{SEQ_READ, SEQ_WRITE, dd_copy},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Physical,
    Baseline,
    KernelDefaults,
    Candidate,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    FioRead,
    FioWrite,
    Dd,
    Clone(Knobs),
}

#[derive(Debug, Clone)]
pub(crate) struct CloneRun {
    /// Last sampled destination write → completion event received.
    pub(crate) commit_lag: Option<Duration>,
    /// Completion event received → resume of the swap returned.
    pub(crate) done_to_final: Duration,
    /// Last sampled destination write → resume returned.
    pub(crate) copied_to_final: Option<Duration>,
    pub(crate) swap: Swap,
    pub(crate) via_event: bool,
    /// The event followed the end-of-copy flush.
    pub(crate) flushed: bool,
    pub(crate) other_events: u32,
    pub(crate) status: CloneStatus,
}

#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Start -> end as the contender defines it (dd and fio: the process;
    /// clone: creation -> completion event received).
    pub(crate) secs: f64,
    pub(crate) mbps: f64,
    /// Start -> last write to the destination, as sampled (dd and clones).
    pub(crate) copy_secs: Option<f64>,
    pub(crate) clone: Option<CloneRun>,
}

#[derive(Debug)]
pub(crate) struct Contender {
    pub(crate) label: String,
    pub(crate) kind: Kind,
    pub(crate) role: Role,
    pub(crate) samples: Vec<Sample>,
    pub(crate) verified: Option<bool>,
}

impl Contender {
    pub(crate) fn new(label: impl Into<String>, kind: Kind, role: Role) -> Self {
        Self {
            label: label.into(),
            kind,
            role,
            samples: Vec::new(),
            verified: None,
        }
    }

    pub(crate) fn mbps(&self) -> Option<Stats> {
        stats(&self.samples.iter().map(|s| s.mbps).collect::<Vec<_>>())
    }

    pub(crate) fn clone_runs(&self) -> impl Iterator<Item = &CloneRun> {
        self.samples.iter().filter_map(|s| s.clone.as_ref())
    }

    pub(crate) fn metric_values(&self, metric: Metric, size: u64) -> Vec<f64> {
        match metric {
            Metric::Event => self.samples.iter().map(|s| s.mbps).collect(),
            Metric::Copy => self
                .samples
                .iter()
                .filter_map(|s| s.copy_secs)
                .map(|secs| size as f64 / secs / MB)
                .collect(),
        }
    }

    pub(crate) fn metric(&self, metric: Metric, size: u64) -> Option<Stats> {
        stats(&self.metric_values(metric, size))
    }

    pub(crate) fn commit_lag_ms(&self) -> Option<Stats> {
        stats(
            &self
                .clone_runs()
                .filter_map(|c| c.commit_lag.map(ms))
                .collect::<Vec<_>>(),
        )
    }

    pub(crate) fn done_to_final_ms(&self) -> Option<Stats> {
        stats(
            &self
                .clone_runs()
                .map(|c| ms(c.done_to_final))
                .collect::<Vec<_>>(),
        )
    }

    pub(crate) fn knobs(&self) -> Option<Knobs> {
        match self.kind {
            Kind::Clone(knobs) => Some(knobs),
            _ => None,
        }
    }
}

pub(crate) async fn run_contender(
    rig: &mut Rig,
    contender: &Contender,
    verify: bool,
) -> BenchResult<Sample> {
    let size = rig.size;
    let throughput = |secs: f64| size as f64 / secs / MB;
    match contender.kind {
        Kind::FioRead => {
            let (bw, _) = fio(&rig.namespace.path, SEQ_READ, size)?;
            Ok(Sample {
                secs: size as f64 / bw,
                mbps: bw / MB,
                copy_secs: Some(size as f64 / bw),
                clone: None,
            })
        }
        Kind::FioWrite => {
            let (bw, _) = fio(&rig.dest_path(), SEQ_WRITE, size)?;
            Ok(Sample {
                secs: size as f64 / bw,
                mbps: bw / MB,
                copy_secs: Some(size as f64 / bw),
                clone: None,
            })
        }
        Kind::Dd => {
            if verify {
                rig.stale_dest()?;
            }
            let watcher = WriteWatcher::start(rig.dest_dev)?;
            let started = Instant::now();
            dd_copy(&rig.namespace.path, &rig.dest_path(), size)?;
            let secs = started.elapsed().as_secs_f64();
            let last_write = watcher.finish();
            Ok(Sample {
                secs,
                mbps: throughput(secs),
                copy_secs: last_write.map(|at| (at - started).as_secs_f64()),
                clone: None,
            })
        }
        Kind::Clone(knobs) => {
            let started = rig.start_clone(&knobs, verify, true).await?;
            let completion = rig.wait_hydrated(started.seen).await?;
            let last_write = started.watcher.and_then(WriteWatcher::finish);
            let secs = (completion.received - started.at).as_secs_f64();
            let status = &completion.status;
            if status.hydration_threshold != knobs.threshold()
                || status.hydration_batch_size != knobs.batch()
                || status.region_sectors.bytes() != knobs.region_bytes
            {
                return Err(format!(
                    "{}: the clone reports region {} sectors, threshold {}, batch {}",
                    contender.label,
                    status.region_sectors,
                    status.hydration_threshold,
                    status.hydration_batch_size
                )
                .into());
            }
            let swap = rig.finalize().await?;
            let run = CloneRun {
                commit_lag: last_write.map(|at| completion.received.saturating_duration_since(at)),
                done_to_final: swap.resumed - completion.received,
                copied_to_final: last_write.map(|at| swap.resumed - at),
                swap,
                via_event: completion.via_event,
                flushed: completion.flushed,
                other_events: completion.other_events,
                status: completion.status,
            };
            Ok(Sample {
                secs,
                mbps: throughput(secs),
                copy_secs: last_write.map(|at| (at - started.at).as_secs_f64()),
                clone: Some(run),
            })
        }
    }
}

/// Verifies the destination and removes the public device of a clone run.
pub(crate) async fn after_run(
    rig: &Rig,
    contender: &mut Contender,
    verify: bool,
) -> BenchResult<()> {
    if verify && !matches!(contender.kind, Kind::FioRead | Kind::FioWrite) {
        contender.verified = Some(rig.verify_dest()?);
    }
    if rig.dm.info(&rig.public).await?.is_some() {
        rig.dm.remove(&rig.public).await?;
    }
    Ok(())
}

pub(crate) struct HydrationResult {
    pub(crate) contenders: Vec<Contender>,
    pub(crate) winner: Option<usize>,
    pub(crate) json: Value,
}

pub(crate) async fn section_hydration(
    rig: &mut Rig,
    params: &Params,
    report: &mut Report,
) -> BenchResult<HydrationResult> {
    let mut contenders = vec![
        Contender::new("fio read namespace 1M qd32", Kind::FioRead, Role::Physical),
        Contender::new("fio write dest 1M qd32", Kind::FioWrite, Role::Physical),
        Contender::new("dd bs=1M direct (baseline)", Kind::Dd, Role::Baseline),
        Contender::new(
            "clone 4K/1/1 kernel defaults",
            Kind::Clone(Knobs::KERNEL_DEFAULTS),
            Role::KernelDefaults,
        ),
    ];
    for knobs in &params.candidates {
        contenders.push(Contender::new(
            format!("clone {}", knobs.label()),
            Kind::Clone(*knobs),
            Role::Candidate,
        ));
    }
    let n = contenders.len();
    for round in 0..params.reps {
        for k in 0..n {
            let index = (k + round) % n;
            if contenders[index].role == Role::KernelDefaults
                && round >= params.kernel_defaults_reps.unwrap_or(params.reps)
            {
                continue;
            }
            let verify = contenders[index].verified.is_none();
            let sample = run_contender(rig, &contenders[index], verify).await?;
            after_run(rig, &mut contenders[index], verify).await?;
            let contender = &mut contenders[index];
            let copy = sample.copy_secs.map_or(String::new(), |s| {
                format!(", copy phase {:.1} MB/s", rig.size as f64 / s / MB)
            });
            let detail = match &sample.clone {
                Some(c) => format!(
                    ", event {}, done→finalized {:.1} ms",
                    if c.via_event {
                        "received"
                    } else {
                        "none: complete at first status"
                    },
                    ms(c.done_to_final)
                ),
                None => String::new(),
            };
            eprintln!(
                "[bench] round {}/{} {:<32} {:8.1} MB/s ({:.2} s){copy}{detail}{}",
                round + 1,
                params.reps,
                contender.label,
                sample.mbps,
                sample.secs,
                match (verify, contender.verified) {
                    (true, Some(true)) => ", sha256 ok",
                    (true, Some(false)) => ", SHA256 MISMATCH",
                    _ => "",
                }
            );
            contender.samples.push(sample);
        }
    }

    let size = rig.size;
    let median_of = |role: Role, metric: Metric| {
        contenders
            .iter()
            .find(|c| c.role == role)
            .and_then(|c| c.metric(metric, size))
            .map(|s| s.median)
    };
    let physical = contenders
        .iter()
        .filter(|c| c.role == Role::Physical)
        .filter_map(|c| c.mbps().map(|s| s.median))
        .reduce(f64::min);
    let bases = |metric: Metric| Bases {
        dd: median_of(Role::Baseline, metric),
        kdef: median_of(Role::KernelDefaults, metric),
        physical,
    };
    let (event_bases, copy_bases) = (bases(Metric::Event), bases(Metric::Copy));
    let fmt_ratio = |r: Option<f64>| r.map_or("     -".to_owned(), |r| format!("{r:6.2}"));
    let fmt_opt = |v: Option<f64>, width: usize, prec: usize| {
        v.map_or(format!("{:>width$}", "-"), |v| format!("{v:>width$.prec$}"))
    };

    out!(report);
    out!(
        report,
        "1. Hydration throughput: {} MiB over NVMe/TCP loopback into a pre-filled thin device ({} runs per contender,",
        size / MIB,
        params.reps
    );
    out!(
        report,
        "   round-robin, order rotated each round; MB/s = 10^6 B/s over the whole volume)"
    );
    out!(
        report,
        "   to event: clone creation -> completion event received (dd: process start -> exit; fio: its own rate)"
    );
    out!(
        report,
        "   copy:     start -> last write to the destination, sampled every {} ms from /sys/dev/block/<dest>/stat",
        WRITE_SAMPLE.as_millis()
    );
    out!(
        report,
        "   lag:      that last write -> completion event (dm-clone commits, and signals, on a 1 s tick unless the end-of-copy flush makes it commit at once)"
    );
    out!(
        report,
        "   ratios:   medians against dd, the kernel defaults and the physical limit, for each metric"
    );
    out!(
        report,
        "{:<29}|{:^23}|{:^23}|{:>6} |{:^19}|{:^19}|{:>8} |{:>7}",
        "",
        "to event MB/s",
        "copy MB/s",
        "lag",
        "to-event ratios",
        "copy ratios",
        "done→fin",
        ""
    );
    out!(
        report,
        "{:<29}|{:>7}{:>8}{:>7} |{:>7}{:>8}{:>7} |{:>6} | {:>6}{:>6}{:>6}| {:>6}{:>6}{:>6}|{:>8} |{:>7}",
        "contender",
        "min",
        "median",
        "max",
        "min",
        "median",
        "max",
        "ms",
        "×dd",
        "×kdef",
        "×phys",
        "×dd",
        "×kdef",
        "×phys",
        "ms",
        "sha256"
    );
    for c in &contenders {
        let Some(e) = c.mbps() else { continue };
        let copy = c.metric(Metric::Copy, size);
        let verified = match c.verified {
            Some(true) => "ok",
            Some(false) => "DIFFERS",
            None => "-",
        };
        let ratios = |bases: &Bases, value: Option<f64>| {
            let [a, b, p] = bases.ratios(value);
            format!("{}{}{}", fmt_ratio(a), fmt_ratio(b), fmt_ratio(p))
        };
        out!(
            report,
            "{:<29}|{:7.1}{:8.1}{:7.1} |{}{}{} |{} | {}| {}|{} |{:>7}",
            c.label,
            e.min,
            e.median,
            e.max,
            fmt_opt(copy.map(|s| s.min), 7, 1),
            fmt_opt(copy.map(|s| s.median), 8, 1),
            fmt_opt(copy.map(|s| s.max), 7, 1),
            fmt_opt(c.commit_lag_ms().map(|s| s.median), 6, 0),
            ratios(&event_bases, Some(e.median)),
            ratios(&copy_bases, copy.map(|s| s.median)),
            fmt_opt(c.done_to_final_ms().map(|s| s.median), 8, 1),
            verified
        );
    }
    if let Some(physical) = physical {
        out!(
            report,
            "physical limit = min(fio read of the namespace, fio write of the destination) = {physical:.1} MB/s"
        );
    }
    let clone_runs: Vec<&CloneRun> = contenders.iter().flat_map(Contender::clone_runs).collect();
    let no_event = clone_runs.iter().filter(|c| !c.via_event).count();
    let flushed = clone_runs.iter().filter(|c| c.flushed).count();
    let other_events: u32 = clone_runs.iter().map(|c| c.other_events).sum();
    out!(
        report,
        "completion: {} of {} clone runs ended on the clone's completion event ({flushed} of them raised by the end-of-copy flush, the rest on the clone's own tick); {no_event} were complete at the first status read; {other_events} other events",
        clone_runs.len() - no_event,
        clone_runs.len()
    );
    let event_secs: Vec<String> = contenders
        .iter()
        .filter(|c| c.role == Role::Candidate)
        .flat_map(|c| c.samples.iter().map(|s| format!("{:.2}", s.secs)))
        .collect();
    out!(
        report,
        "candidate times to the event (s): {}",
        event_secs.join(" ")
    );

    // The winner among the candidates, ranked by the copy phase: the event
    // adds the end-game lag (independent of the knobs; up to the kernel's
    // 2 s commit tick when a look misses the end), which would decide a
    // ranking by chance.
    let rank = |metric: Metric| {
        let mut ranked: Vec<usize> = (0..n)
            .filter(|&i| {
                contenders[i].role == Role::Candidate
                    && contenders[i].verified != Some(false)
                    && contenders[i].metric(metric, size).is_some()
            })
            .collect();
        let m = |i: usize| contenders[i].metric(metric, size).map_or(0.0, |s| s.median);
        ranked.sort_by(|&a, &b| m(b).total_cmp(&m(a)));
        ranked
    };
    let ranked = rank(Metric::Copy);
    let by_event = rank(Metric::Event);
    // A check against load that drifts between rounds: each candidate's copy
    // rate over the median candidate of the same round, median over rounds.
    let mut relative: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for round in 0..params.reps {
        let rates: Vec<(usize, f64)> = ranked
            .iter()
            .filter_map(|&i| {
                let secs = contenders[i].samples.get(round)?.copy_secs?;
                Some((i, size as f64 / secs / MB))
            })
            .collect();
        let Some(mid) = stats(&rates.iter().map(|(_, r)| *r).collect::<Vec<_>>()) else {
            continue;
        };
        for (i, rate) in rates {
            relative.entry(i).or_default().push(rate / mid.median);
        }
    }
    let mut by_round: Vec<(usize, f64)> = relative
        .iter()
        .filter_map(|(&i, v)| Some((i, stats(v)?.median)))
        .collect();
    by_round.sort_by(|a, b| b.1.total_cmp(&a.1));
    let winner = ranked.first().copied();
    let mut defaults_json = Value::Null;
    let mut winner_json = Value::Null;
    if let Some(w) = winner {
        let c = &contenders[w];
        let copy = c
            .metric(Metric::Copy, size)
            .ok_or("winner without samples")?;
        let event = c.mbps().ok_or("winner without samples")?;
        let knobs = c.knobs().ok_or("winner is not a clone")?;
        let [cd, ck, cp] = copy_bases.ratios(Some(copy.median));
        let [ed, ek, ep] = event_bases.ratios(Some(event.median));
        let r = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        out!(report);
        out!(
            report,
            "WINNER: region {} hydration_threshold {} hydration_batch_size {} ({}), ranked by copy phase:",
            size_label(knobs.region_bytes),
            knobs.threshold(),
            knobs.batch(),
            knobs.label()
        );
        out!(
            report,
            "  copy phase median {:.1} MB/s (min {:.1}, max {:.1}) = {}× dd, {}× kernel defaults, {}× physical limit",
            copy.median,
            copy.min,
            copy.max,
            r(cd),
            r(ck),
            r(cp)
        );
        out!(
            report,
            "  to the completion event median {:.1} MB/s (min {:.1}, max {:.1}) = {}× dd, {}× kernel defaults, {}× physical limit",
            event.median,
            event.min,
            event.max,
            r(ed),
            r(ek),
            r(ep)
        );
        if let Some(&second) = ranked.get(1) {
            let other = &contenders[second];
            if let Some(os) = other.metric(Metric::Copy, size) {
                let noise = if os.n < 3 || copy.n < 3 {
                    "; too few runs to judge run-to-run noise"
                } else if os.max >= copy.min {
                    "; its range overlaps the winner's: within run-to-run noise"
                } else {
                    "; the ranges do not overlap"
                };
                out!(
                    report,
                    "  runner-up {}: copy phase median {:.1} MB/s ({:+.1} %){noise}",
                    other.knobs().map_or(other.label.clone(), |k| k.label()),
                    os.median,
                    (os.median / copy.median - 1.0) * 100.0,
                );
            }
        }
        let within: Vec<String> = by_round
            .iter()
            .map(|&(i, r)| {
                let c = &contenders[i];
                format!(
                    "{} {r:.2}",
                    c.knobs().map_or(c.label.clone(), |k| k.label())
                )
            })
            .collect();
        out!(
            report,
            "  within-round check (copy rate / the round's median candidate, median over rounds): {}{}",
            within.join(", "),
            match by_round.first() {
                Some(&(i, _)) if i != w => " (a different leader: the ranking is not settled)",
                Some(_) => " (same leader)",
                None => "",
            }
        );
        if let Some(&first) = by_event.first()
            && first != w
        {
            let other = &contenders[first];
            out!(
                report,
                "  ranked by time to the event instead, {} would win ({:.1} MB/s median)",
                other.knobs().map_or(other.label.clone(), |k| k.label()),
                other.mbps().map_or(0.0, |s| s.median)
            );
        }
        winner_json = json!({
            "knobs": knobs.json(),
            "label": knobs.label(),
            "ranked_by": "copy phase median (creation -> last destination write)",
            "copy_mbps": stats_json(&c.metric_values(Metric::Copy, size)),
            "event_mbps": stats_json(&c.metric_values(Metric::Event, size)),
            "copy_vs_dd": cd, "copy_vs_kernel_defaults": ck, "copy_vs_physical_limit": cp,
            "event_vs_dd": ed, "event_vs_kernel_defaults": ek, "event_vs_physical_limit": ep,
            "winner_by_event": by_event.first().map(|&i| contenders[i].label.clone()),
            "within_round_relative_copy": by_round.iter().map(|&(i, r)| json!({"candidate": contenders[i].label, "median_relative": r})).collect::<Vec<_>>(),
        });

        // The measurement behind each default.
        out!(report);
        out!(
            report,
            "Defaults for the agent and the measurement behind each (copy-phase median MB/s; to-event median in brackets):"
        );
        let mut by_region: BTreeMap<u64, (f64, f64, String)> = BTreeMap::new();
        for c in contenders.iter().filter(|c| c.role == Role::Candidate) {
            if let (Some(k), Some(s), Some(e)) = (c.knobs(), c.metric(Metric::Copy, size), c.mbps())
                && by_region
                    .get(&k.region_bytes)
                    .is_none_or(|(best, _, _)| s.median > *best)
            {
                by_region.insert(k.region_bytes, (s.median, e.median, k.label()));
            }
        }
        let regions: Vec<String> = by_region
            .iter()
            .map(|(region, (m, e, label))| {
                format!("{}: {m:.1} [{e:.1}] ({label})", size_label(*region))
            })
            .collect();
        out!(
            report,
            "  transfer.region_size = {}: best candidate per region size: {}",
            size_label(knobs.region_bytes),
            regions.join(", ")
        );
        let same_region: Vec<String> = contenders
            .iter()
            .filter(|c| c.role == Role::Candidate)
            .filter_map(|c| Some((c.knobs()?, c.metric(Metric::Copy, size)?, c.mbps()?)))
            .filter(|(k, _, _)| k.region_bytes == knobs.region_bytes)
            .map(|(k, s, e)| {
                format!(
                    "{}/{}: {:.1} [{:.1}]",
                    k.threshold(),
                    k.batch(),
                    s.median,
                    e.median
                )
            })
            .collect();
        out!(
            report,
            "  transfer.hydration_threshold = {}, transfer.hydration_batch_size = {}: threshold/batch at region {}: {}",
            knobs.threshold(),
            knobs.batch(),
            size_label(knobs.region_bytes),
            same_region.join(", ")
        );
        out!(
            report,
            "  against: kernel defaults 4K/1/1 (the proof of concept's) {} [{}]; dd {} [{}]; physical limit {}",
            fmt_opt(copy_bases.kdef, 0, 1),
            fmt_opt(event_bases.kdef, 0, 1),
            fmt_opt(copy_bases.dd, 0, 1),
            fmt_opt(event_bases.dd, 0, 1),
            fmt_opt(physical, 0, 1)
        );
        defaults_json = json!({
            "region_bytes": {"value": knobs.region_bytes, "best_per_region": by_region.iter().map(|(r, (m, e, l))| json!({"region_bytes": r, "copy_median_mbps": m, "event_median_mbps": e, "candidate": l})).collect::<Vec<_>>()},
            "hydration_threshold": {"value": knobs.threshold()},
            "hydration_batch_size": {"value": knobs.batch()},
            "same_region_candidates": same_region,
            "basis": "highest copy-phase median throughput among the candidates (creation -> last destination write); the to-event figures are listed beside it",
        });
    }

    let json = json!({
        "size_bytes": size,
        "physical_limit_mbps": physical,
        "dd_median_mbps": {"event": event_bases.dd, "copy": copy_bases.dd},
        "kernel_defaults_median_mbps": {"event": event_bases.kdef, "copy": copy_bases.kdef},
        "contenders": contenders.iter().map(|c| contender_json(c, size, &event_bases, &copy_bases)).collect::<Vec<_>>(),
        "winner": winner_json,
        "defaults": defaults_json,
        "completion": {"clone_runs": clone_runs.len(), "ended_on_event": clone_runs.len() - no_event, "complete_at_first_status": no_event, "after_flush": flushed, "other_events": other_events},
    });
    Ok(HydrationResult {
        contenders,
        winner,
        json,
    })
}

/// Which figure of a run: up to the completion event (dd: the process; fio:
/// its rate), or up to the last write to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metric {
    Event,
    Copy,
}

/// The medians the ratios divide by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bases {
    pub(crate) dd: Option<f64>,
    pub(crate) kdef: Option<f64>,
    pub(crate) physical: Option<f64>,
}

impl Bases {
    pub(crate) fn ratios(&self, value: Option<f64>) -> [Option<f64>; 3] {
        let ratio = |base: Option<f64>| Some(value? / base?);
        [ratio(self.dd), ratio(self.kdef), ratio(self.physical)]
    }
}

pub(crate) fn contender_json(c: &Contender, size: u64, event: &Bases, copy: &Bases) -> Value {
    let median = |metric| c.metric(metric, size).map(|s| s.median);
    let [ed, ek, ep] = event.ratios(median(Metric::Event));
    let [cd, ck, cp] = copy.ratios(median(Metric::Copy));
    json!({
        "label": c.label,
        "role": format!("{:?}", c.role),
        "knobs": c.knobs().map(|k| k.json()),
        "event_mbps": stats_json(&c.metric_values(Metric::Event, size)),
        "event_seconds": stats_json(&c.samples.iter().map(|s| s.secs).collect::<Vec<_>>()),
        "copy_mbps": stats_json(&c.metric_values(Metric::Copy, size)),
        "commit_lag_ms": stats_json(&c.clone_runs().filter_map(|r| r.commit_lag.map(ms)).collect::<Vec<_>>()),
        "done_to_finalized_ms": stats_json(&c.clone_runs().map(|r| ms(r.done_to_final)).collect::<Vec<_>>()),
        "swaps": c.clone_runs().map(|r| r.swap.json()).collect::<Vec<_>>(),
        "completion_via_event": c.clone_runs().map(|r| r.via_event).collect::<Vec<_>>(),
        "final_status": c.clone_runs().last().map(|r| r.status.to_string()),
        "event_vs_dd": ed, "event_vs_kernel_defaults": ek, "event_vs_physical_limit": ep,
        "copy_vs_dd": cd, "copy_vs_kernel_defaults": ck, "copy_vs_physical_limit": cp,
        "sha256_verified": c.verified,
    })
}
