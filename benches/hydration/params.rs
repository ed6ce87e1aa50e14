//! Command-line parameters: which sections run, sizes and the dm-clone knob candidates.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::Parser;
use serde_json::{Value, json};

use crate::{
    DEFAULT_CANDIDATES, KIB, MIB,
    common::{self, BenchResult},
};

/// dm-clone knobs; `None` leaves the kernel default (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Knobs {
    pub(crate) region_bytes: u64,
    pub(crate) threshold: Option<u32>,
    pub(crate) batch: Option<u32>,
}

impl Knobs {
    pub(crate) const KERNEL_DEFAULTS: Knobs = Knobs {
        region_bytes: 4 * KIB,
        threshold: None,
        batch: None,
    };

    pub(crate) fn threshold(&self) -> u32 {
        self.threshold.unwrap_or(1)
    }

    pub(crate) fn batch(&self) -> u32 {
        self.batch.unwrap_or(1)
    }

    pub(crate) fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            size_label(self.region_bytes),
            self.threshold(),
            self.batch()
        )
    }

    /// `REGION/THRESHOLD/BATCH`, region with an optional K/M/G suffix.
    pub(crate) fn parse(spec: &str) -> BenchResult<Self> {
        let parts: Vec<&str> = spec.trim().split('/').collect();
        let [region, threshold, batch] = parts.as_slice() else {
            return Err(format!("candidate {spec:?}: expected REGION/THRESHOLD/BATCH").into());
        };
        let region_bytes = parse_size(region)?;
        if !region_bytes.is_power_of_two() || !(4 * KIB..=1024 * MIB).contains(&region_bytes) {
            return Err(format!(
                "candidate {spec:?}: the region must be a power of two from 4K to 1G"
            )
            .into());
        }
        let number = |what: &str, text: &str| -> BenchResult<u32> {
            let value: u32 = text
                .parse()
                .map_err(|_| format!("candidate {spec:?}: {what} {text:?} is not a number"))?;
            if value == 0 {
                return Err(format!("candidate {spec:?}: {what} must be positive").into());
            }
            Ok(value)
        };
        Ok(Knobs {
            region_bytes,
            threshold: Some(number("threshold", threshold)?),
            batch: Some(number("batch", batch)?),
        })
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "region_bytes": self.region_bytes,
            "hydration_threshold": self.threshold(),
            "hydration_batch_size": self.batch(),
        })
    }
}

pub(crate) fn parse_size(text: &str) -> BenchResult<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} is not a number"))?;
    let unit = match unit.to_ascii_uppercase().trim_end_matches("IB") {
        "" => 1,
        "K" => KIB,
        "M" => MIB,
        "G" => 1024 * MIB,
        other => return Err(format!("size {text:?}: unknown unit {other:?}").into()),
    };
    Ok(value * unit)
}

pub(crate) fn size_label(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}M", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{}K", bytes / KIB)
    } else {
        format!("{bytes}B")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sections {
    pub(crate) hydration: bool,
    pub(crate) iops: bool,
    pub(crate) pause: bool,
    pub(crate) era: bool,
}

impl Sections {
    pub(crate) const ALL: Sections = Sections {
        hydration: true,
        iops: true,
        pause: true,
        era: true,
    };
    pub(crate) const NONE: Sections = Sections {
        hydration: false,
        iops: false,
        pause: false,
        era: false,
    };
}

/// The hydration bench: decides the agent's default dm-clone knobs and
/// measures what a move costs the volume's user.
///
/// Without --bench (as under `cargo test --benches`) nothing is measured.
/// Every option also reads the DMCLONE_BENCH_* variable shown; the flag
/// wins, an empty variable counts as unset.
#[derive(Debug, Clone, Parser)]
// A repeated flag replaces the earlier one, as it always did, rather than
// being clap's error (benches/suite-job puts the caller's options after its own).
#[command(name = "hydration", bin_name = "hydration", args_override_self = true)]
pub(crate) struct Params {
    /// Measure (cargo bench and benches/run pass it)
    #[arg(long = "bench")]
    pub(crate) measure: bool,
    /// Volume size in MiB, a multiple of 4 from 16 to 65536
    // Held in bytes.
    #[arg(long = "size-mib", value_name = "N", default_value = "256", value_parser = size_mib)]
    #[arg(env = "DMCLONE_BENCH_SIZE_MIB")]
    pub(crate) size: u64,
    /// Repetitions of every contender, 1 to 100
    #[arg(long = "reps", value_name = "N", default_value = "3", value_parser = reps)]
    #[arg(env = "DMCLONE_BENCH_REPS")]
    pub(crate) reps: usize,
    /// Repetitions of the kernel defaults (4K/1/1), 1 to 100 [default: --reps]
    // They copy 4 KiB at a time: a large volume takes minutes per run.
    #[arg(long = "kernel-defaults-reps", value_name = "N", value_parser = reps)]
    #[arg(env = "DMCLONE_BENCH_KERNEL_DEFAULTS_REPS")]
    pub(crate) kernel_defaults_reps: Option<usize>,
    /// Comma-separated REGION/THRESHOLD/BATCH, e.g. 1M/16/8
    // The full path keeps clap from reading a Vec as a repeated flag: one
    // value holds the whole list.
    #[arg(long = "candidates", value_name = "LIST", value_parser = candidates)]
    #[arg(env = "DMCLONE_BENCH_CANDIDATES", default_value = DEFAULT_CANDIDATES)]
    pub(crate) candidates: ::std::vec::Vec<Knobs>,
    /// Length of each 4 KiB random-read or -write run in seconds, 1 to 600
    #[arg(long = "fio-seconds", value_name = "N", default_value = "4", value_parser = fio_seconds)]
    #[arg(env = "DMCLONE_BENCH_FIO_SECONDS")]
    pub(crate) fio_seconds: u64,
    /// NVMe/TCP port on 127.0.0.1
    #[arg(long = "port", value_name = "N", default_value = "14900", value_parser = port)]
    #[arg(env = "DMCLONE_BENCH_PORT")]
    pub(crate) port: u16,
    /// Any of hydration, iops, pause, era, or all
    #[arg(long = "sections", value_name = "LIST", default_value = "all", value_parser = sections)]
    #[arg(env = "DMCLONE_BENCH_SECTIONS")]
    pub(crate) sections: Sections,
    /// JSON result [default: DIR/hydration.json with --results-dir, else
    /// /tmp/dmclone-hydration-bench.json]
    #[arg(long = "json", value_name = "PATH")]
    #[arg(env = "DMCLONE_BENCH_JSON")]
    json_flag: Option<PathBuf>,
    /// Where the JSON result goes: `--json` or its default (see `parse_args`).
    #[arg(skip)]
    pub(crate) json: PathBuf,
    /// Also write hydration.json and hydration.txt there
    #[arg(long = "results-dir", value_name = "DIR")]
    #[arg(env = "DMCLONE_BENCH_RESULTS")]
    pub(crate) results_dir: Option<PathBuf>,
    /// Fail if a clone does not complete in time
    #[arg(long = "hydration-timeout", value_name = "SECONDS", value_parser = seconds)]
    #[arg(env = "DMCLONE_BENCH_HYDRATION_TIMEOUT", default_value = "900")]
    pub(crate) hydration_timeout: Duration,
}

impl Params {
    /// Parses `args` (the program name first), as `common::parse_options`.
    pub(crate) fn parse_args<I, T>(args: I, environment: bool) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut params: Self = common::parse_options(args, environment)?;
        // The default depends on another option, beyond what clap defaults.
        params.json = match (&params.json_flag, &params.results_dir) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join("hydration.json"),
            (None, None) => PathBuf::from("/tmp/dmclone-hydration-bench.json"),
        };
        Ok(params)
    }
}

fn number(text: &str) -> BenchResult<u64> {
    text.parse().map_err(|_| "not a number".into())
}

/// In bytes.
fn size_mib(text: &str) -> BenchResult<u64> {
    let mib = number(text)?;
    if !(16..=64 * 1024).contains(&mib) || !mib.is_multiple_of(4) {
        return Err("must be a multiple of 4 from 16 to 65536".into());
    }
    Ok(mib * MIB)
}

fn reps(text: &str) -> BenchResult<usize> {
    Ok(usize::try_from(common::within(number(text)?, 1..=100)?)?)
}

fn fio_seconds(text: &str) -> BenchResult<u64> {
    common::within(number(text)?, 1..=600)
}

fn port(text: &str) -> BenchResult<u16> {
    Ok(u16::try_from(common::within(
        number(text)?,
        0..=u16::MAX.into(),
    )?)?)
}

fn seconds(text: &str) -> BenchResult<Duration> {
    Ok(Duration::from_secs(number(text)?))
}

fn candidates(list: &str) -> BenchResult<Vec<Knobs>> {
    let candidates = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Knobs::parse)
        .collect::<BenchResult<Vec<_>>>()?;
    if candidates.is_empty() {
        return Err("names no candidate".into());
    }
    Ok(candidates)
}

fn sections(list: &str) -> BenchResult<Sections> {
    let mut sections = Sections::NONE;
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match name {
            "hydration" => sections.hydration = true,
            "iops" => sections.iops = true,
            "pause" => sections.pause = true,
            "era" => sections.era = true,
            "all" => sections = Sections::ALL,
            other => {
                return Err(
                    format!("unknown section {other:?} (hydration, iops, pause, era)").into(),
                );
            }
        }
    }
    if sections == Sections::NONE {
        return Err("names no section".into());
    }
    Ok(sections)
}
