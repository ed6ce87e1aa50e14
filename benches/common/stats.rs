//! The one summary every bench prints and records for repeated runs.

use serde_json::{Value, json};

/// Summary of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub min: f64,
    /// For an even count, the mean of the two middle values: the upper
    /// middle alone would bias every two-round figure towards its better
    /// (or worse) run.
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

/// `None` for no values.
pub fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Stats {
        min: sorted[0],
        median,
        max: sorted[n - 1],
        n,
    })
}

/// The summary with the values it was made from, as results record it;
/// `null` for no values.
pub fn stats_json(values: &[f64]) -> Value {
    match stats(values) {
        Some(s) => {
            json!({"min": s.min, "median": s.median, "max": s.max, "n": s.n, "samples": values})
        }
        None => Value::Null,
    }
}

/// Checks the summary (under `cargo test --benches`).
pub fn self_check() -> Result<(), String> {
    let expect = |min, median, max, n| {
        Some(Stats {
            min,
            median,
            max,
            n,
        })
    };
    let cases: [(&[f64], Option<Stats>); 4] = [
        (&[], None),
        (&[3.0, 1.0, 2.0], expect(1.0, 2.0, 3.0, 3)),
        (&[4.0, 1.0, 3.0, 2.0], expect(1.0, 2.5, 4.0, 4)),
        (&[5.0], expect(5.0, 5.0, 5.0, 1)),
    ];
    for (values, expected) in cases {
        if stats(values) != expected {
            return Err(format!(
                "stats of {values:?}: {:?}, expected {expected:?}",
                stats(values)
            ));
        }
    }
    if stats_json(&[2.0, 1.0])["median"] != json!(1.5) || !stats_json(&[]).is_null() {
        return Err("stats_json does not record the summary".into());
    }
    Ok(())
}
