//! Section 3: the I/O pause of the finalize swap.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dmclone::aligned::AlignedBuf;
use serde_json::{Value, json};

use crate::{
    PAUSE_TARGET,
    common::{BenchResult, open_direct, stats, stats_json},
    params::{Knobs, Params},
    report::{Report, ms},
    rig::Rig,
};

/// Step durations for progress lines.
#[derive(Debug)]
pub(crate) struct Steps {
    pub(crate) last: Instant,
    pub(crate) text: String,
}

impl Default for Steps {
    fn default() -> Self {
        Self {
            last: Instant::now(),
            text: String::new(),
        }
    }
}

impl Steps {
    pub(crate) fn mark(&mut self, what: &str) {
        let now = Instant::now();
        if !self.text.is_empty() {
            self.text.push_str(", ");
        }
        let _ = write!(self.text, "{what} {:.1} s", (now - self.last).as_secs_f64());
        self.last = now;
    }
}

/// Reads 4 KiB with O_DIRECT back to back and records each read's latency.
pub(crate) struct Reader {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: thread::JoinHandle<BenchResult<Vec<(Instant, Duration)>>>,
}

impl Reader {
    pub(crate) fn start(path: &Path, size: u64) -> BenchResult<Self> {
        use std::os::unix::fs::FileExt;
        let file = open_direct(path, false)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("pause-reader".into())
            .spawn(move || {
                let mut buf = AlignedBuf::new(4096);
                let mut reads = Vec::with_capacity(1 << 16);
                let mut offset = 0;
                while !flag.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    file.read_exact_at(buf.as_mut_slice(), offset)
                        .map_err(|err| format!("read at {offset}: {err}"))?;
                    reads.push((at, at.elapsed()));
                    offset = (offset + 4096) % size;
                }
                Ok(reads)
            })?;
        Ok(Self { stop, handle })
    }

    pub(crate) fn finish(self) -> BenchResult<Vec<(Instant, Duration)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "the reader thread panicked")?
    }
}

/// How the finalize swap is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SwapOrder {
    /// What the agent does for a tracked volume: dm-era above the clone
    /// from the start, and only the layer beneath swapped (clone to the
    /// thin device, loaded beside it; suspend (flush), status check, resume).
    Agent,
    /// The agent's order where the clone is the public device: the local
    /// table (dm-era) loaded beside the live clone, then suspend (flush),
    /// status check, resume.
    Beside,
    /// The load inside the pause: suspend (flush), status check, load,
    /// resume; dm-era's constructor then runs while I/O waits.
    LoadInPause,
}

impl SwapOrder {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SwapOrder::Agent => "agent",
            SwapOrder::Beside => "beside",
            SwapOrder::LoadInPause => "in-pause",
        }
    }
}

pub(crate) async fn section_pause(
    rig: &mut Rig,
    params: &Params,
    knobs: Knobs,
    report: &mut Report,
) -> BenchResult<Value> {
    out!(report);
    out!(
        report,
        "3. I/O pause during the finalize swap, clone {} hydrated, then a reader issues 4 KiB O_DIRECT reads back to back",
        knobs.label()
    );
    out!(
        report,
        "   on the public device from 300 ms before to 300 ms after the swap. order agent (the agent's finalize): public = era(meta,"
    );
    out!(
        report,
        "   clone) from the start, only the clone swapped for thin(pool, id), loaded beside it, then suspend (flush), status check,"
    );
    out!(
        report,
        "   resume; beside: public = the clone, era(meta, thin) loaded beside it, suspend, check, resume; in-pause: suspend (flush), status check, load,"
    );
    out!(
        report,
        "   resume. pause = the longest read overlapping the swap; swap = suspend call -> resume returned."
    );
    out!(
        report,
        "{:<4} {:<8} {:>6} {:>8} {:>9} | {:>9} {:>8} | {:>7} {:>7} {:>6} {:>7} | {:>10}",
        "run",
        "order",
        "reads",
        "p50 µs",
        "pause ms",
        "swap ms",
        "preload",
        "suspend",
        "status",
        "load",
        "resume",
        "<20 ms p/s"
    );
    let mut runs = Vec::new();
    let mut pauses: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut swaps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let orders = [SwapOrder::Agent, SwapOrder::Beside, SwapOrder::LoadInPause];
    for rep in 0..params.reps {
        for k in 0..orders.len() {
            let order = orders[(k + rep) % orders.len()];
            let started = rig.start_clone(&knobs, false, false).await?;
            rig.wait_hydrated(started.seen).await?;
            let read_from = match order {
                SwapOrder::Agent => rig.era_above().await?,
                _ => rig.public.clone(),
            };
            let reader = Reader::start(&read_from.mapper_path(), rig.size)?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let swap = match order {
                SwapOrder::Agent => rig.finalize_beneath_era().await,
                SwapOrder::Beside => rig.finalize().await,
                SwapOrder::LoadInPause => rig.finalize_loading_in_pause().await,
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            let reads = reader.finish()?;
            let swap = swap?;
            if order == SwapOrder::Agent {
                rig.remove_era_above().await?;
            }
            rig.dm.remove(&rig.public).await?;

            let before: Vec<f64> = reads
                .iter()
                .filter(|(at, d)| *at + *d < swap.started)
                .map(|(_, d)| d.as_secs_f64() * 1e6)
                .collect();
            let overlapping: Vec<Duration> = reads
                .iter()
                .filter(|(at, d)| *at < swap.resumed && *at + *d > swap.started)
                .map(|(_, d)| *d)
                .collect();
            let pause = overlapping.iter().max().copied().unwrap_or_default();
            let base = stats(&before).ok_or("no reads before the swap")?;
            let verdict = |d: Duration| if d < PAUSE_TARGET { "yes" } else { "NO" };
            out!(
                report,
                "{:<4} {:<8} {:>6} {:>8.0} {:>9.2} | {:>9.2} {:>8} | {:>7.2} {:>7.2} {:>6} {:>7.2} | {:>10}",
                rep + 1,
                order.name(),
                reads.len(),
                base.median,
                ms(pause),
                ms(swap.total()),
                swap.preload
                    .map_or("-".to_owned(), |d| format!("{:.2}", ms(d))),
                ms(swap.suspend),
                ms(swap.status),
                swap.load
                    .map_or("-".to_owned(), |d| format!("{:.2}", ms(d))),
                ms(swap.resume),
                format!("{}/{}", verdict(pause), verdict(swap.total()))
            );
            pauses.entry(order.name()).or_default().push(ms(pause));
            swaps
                .entry(order.name())
                .or_default()
                .push(ms(swap.total()));
            runs.push(json!({
                "order": order.name(),
                "reads": reads.len(),
                "reads_overlapping_swap": overlapping.len(),
                "read_p50_before_us": base.median,
                "pause_ms": ms(pause),
                "swap": swap.json(),
                "pause_under_20ms": pause < PAUSE_TARGET,
                "swap_under_20ms": swap.total() < PAUSE_TARGET,
            }));
        }
    }
    let mut summary = serde_json::Map::new();
    for order in orders {
        let (Some(p), Some(s)) = (
            pauses.get(order.name()).and_then(|v| stats(v)),
            swaps.get(order.name()).and_then(|v| stats(v)),
        ) else {
            continue;
        };
        out!(
            report,
            "{:<8} pause median {:.2} ms (min {:.2}, max {:.2}); swap median {:.2} ms (min {:.2}, max {:.2}); target < {} ms: pause {}, swap {}",
            order.name(),
            p.median,
            p.min,
            p.max,
            s.median,
            s.min,
            s.max,
            PAUSE_TARGET.as_millis(),
            if p.max < ms(PAUSE_TARGET) {
                "met in every run"
            } else {
                "MISSED in at least one run"
            },
            if s.max < ms(PAUSE_TARGET) {
                "met in every run"
            } else {
                "MISSED in at least one run"
            }
        );
        summary.insert(
            order.name().to_owned(),
            json!({"pause_ms": stats_json(&pauses[order.name()]), "swap_ms": stats_json(&swaps[order.name()])}),
        );
    }
    Ok(json!({
        "knobs": knobs.json(),
        "runs": runs,
        "summary": summary,
        "target_ms": ms(PAUSE_TARGET),
    }))
}
