//! Section 4: done → finalized.

use serde_json::{Value, json};

use crate::{
    POC_POLL,
    common::{stats, stats_json},
    report::{Report, ms},
    throughput::{CloneRun, Contender},
};

pub(crate) fn section_done_to_finalized(contenders: &[Contender], report: &mut Report) -> Value {
    let runs: Vec<&CloneRun> = contenders.iter().flat_map(Contender::clone_runs).collect();
    let done: Vec<f64> = runs.iter().map(|r| ms(r.done_to_final)).collect();
    let copied: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.copied_to_final.map(ms))
        .collect();
    let swaps: Vec<f64> = runs.iter().map(|r| ms(r.swap.total())).collect();
    let poc_expected = ms(POC_POLL) / 2.0;
    out!(report);
    out!(
        report,
        "4. done→finalized over the {} clone runs of section 1 (event received -> the swap's resume returned; no reader)",
        runs.len()
    );
    let mut json = json!({"poc_poll_interval_ms": ms(POC_POLL), "poc_expected_ms": poc_expected, "poc_worst_ms": ms(POC_POLL)});
    if let Some(s) = stats(&done) {
        out!(
            report,
            "   event -> finalized:        min {:8.2} ms  median {:8.2} ms  max {:8.2} ms",
            s.min,
            s.median,
            s.max
        );
        json["event_to_finalized_ms"] = stats_json(&done);
        json["poc_expected_over_median"] = json!(poc_expected / s.median);
        if let Some(c) = stats(&copied) {
            out!(
                report,
                "   last copy -> finalized:    min {:8.2} ms  median {:8.2} ms  max {:8.2} ms (includes the kernel's commit lag)",
                c.min,
                c.median,
                c.max
            );
            json["last_copy_to_finalized_ms"] = stats_json(&copied);
        }
        if let Some(w) = stats(&swaps) {
            out!(
                report,
                "   of which the swap itself:  min {:8.2} ms  median {:8.2} ms  max {:8.2} ms",
                w.min,
                w.median,
                w.max
            );
            json["swap_ms"] = stats_json(&swaps);
        }
        out!(
            report,
            "   baseline, the proof of concept polling every {} s: expected {:.0} ms after done (uniform 0..{} s), worst {} ms; event-driven median is {:.0}× sooner",
            POC_POLL.as_secs(),
            poc_expected,
            POC_POLL.as_secs(),
            ms(POC_POLL),
            poc_expected / s.median
        );
    }
    json
}
