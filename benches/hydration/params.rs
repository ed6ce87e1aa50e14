//! Command-line parameters: which sections run, sizes and the dm-clone knob candidates.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde_json::{Value, json};

use crate::{DEFAULT_CANDIDATES, KIB, MIB, common::BenchResult};

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

#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// `--bench` was given (cargo bench and benches/run pass it).
    pub(crate) measure: bool,
    pub(crate) size: u64,
    pub(crate) reps: usize,
    pub(crate) candidates: Vec<Knobs>,
    pub(crate) fio_seconds: u64,
    pub(crate) port: u16,
    pub(crate) json: PathBuf,
    pub(crate) results_dir: Option<PathBuf>,
    pub(crate) sections: Sections,
    pub(crate) hydration_timeout: Duration,
}

pub(crate) const USAGE: &str = "\
usage: hydration --bench [--size-mib N] [--reps N] [--candidates LIST] [--fio-seconds N]
                 [--port N] [--sections LIST] [--json PATH] [--results-dir DIR]
                 [--hydration-timeout SECONDS]
  --size-mib N        volume size (default 256; env DMCLONE_BENCH_SIZE_MIB)
  --reps N            repetitions of every contender (default 3; DMCLONE_BENCH_REPS)
  --candidates LIST   comma-separated REGION/THRESHOLD/BATCH, e.g. 1M/16/8
                      (default 64K/64/16,256K/32/8,1M/16/8,1M/4/2,4M/4/1,4K/1024/256;
                      DMCLONE_BENCH_CANDIDATES)
  --fio-seconds N     length of each 4 KiB random-read or -write run (default 4; DMCLONE_BENCH_FIO_SECONDS)
  --port N            NVMe/TCP port on 127.0.0.1 (default 14900; DMCLONE_BENCH_PORT)
  --sections LIST     any of hydration,iops,pause,era (default all; DMCLONE_BENCH_SECTIONS)
  --json PATH         JSON result (default /tmp/dmclone-hydration-bench.json, or
                      DIR/hydration.json with --results-dir; DMCLONE_BENCH_JSON)
  --results-dir DIR   also write hydration.json and hydration.txt there (DMCLONE_BENCH_RESULTS)
  --hydration-timeout SECONDS  fail if a clone does not complete in time (default 900)
Without --bench (as under `cargo test --benches`) nothing is measured.";

impl Params {
    pub(crate) fn parse(args: &[String]) -> BenchResult<Self> {
        let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        for (flag, var) in [
            ("size-mib", "DMCLONE_BENCH_SIZE_MIB"),
            ("reps", "DMCLONE_BENCH_REPS"),
            ("candidates", "DMCLONE_BENCH_CANDIDATES"),
            ("fio-seconds", "DMCLONE_BENCH_FIO_SECONDS"),
            ("port", "DMCLONE_BENCH_PORT"),
            ("sections", "DMCLONE_BENCH_SECTIONS"),
            ("json", "DMCLONE_BENCH_JSON"),
            ("results-dir", "DMCLONE_BENCH_RESULTS"),
            ("hydration-timeout", "DMCLONE_BENCH_HYDRATION_TIMEOUT"),
        ] {
            if let Some(value) = env(var) {
                values.insert(flag, value);
            }
        }
        let mut measure = false;
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if arg == "--bench" {
                measure = true;
                continue;
            }
            if arg == "-h" || arg == "--help" {
                return Err(USAGE.into());
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}\n{USAGE}").into());
            };
            let (flag, inline) = match flag.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (flag, None),
            };
            let key = [
                "size-mib",
                "reps",
                "candidates",
                "fio-seconds",
                "port",
                "sections",
                "json",
                "results-dir",
                "hydration-timeout",
            ]
            .into_iter()
            .find(|k| *k == flag)
            .ok_or_else(|| format!("unknown option --{flag}\n{USAGE}"))?;
            let value = match inline {
                Some(value) => value,
                None => iter
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("--{flag} needs a value"))?,
            };
            values.insert(key, value);
        }
        let number = |key: &str, default: u64| -> BenchResult<u64> {
            match values.get(key) {
                Some(text) => text
                    .parse()
                    .map_err(|_| format!("--{key} {text:?} is not a number").into()),
                None => Ok(default),
            }
        };
        let size_mib = number("size-mib", 256)?;
        if !(16..=64 * 1024).contains(&size_mib) || !size_mib.is_multiple_of(4) {
            return Err("--size-mib must be a multiple of 4 from 16 to 65536".into());
        }
        let reps = number("reps", 3)?;
        if !(1..=100).contains(&reps) {
            return Err("--reps must be from 1 to 100".into());
        }
        let candidates = values
            .get("candidates")
            .map_or(DEFAULT_CANDIDATES, String::as_str)
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Knobs::parse)
            .collect::<BenchResult<Vec<_>>>()?;
        if candidates.is_empty() {
            return Err("--candidates is empty".into());
        }
        let fio_seconds = number("fio-seconds", 4)?;
        if !(1..=600).contains(&fio_seconds) {
            return Err("--fio-seconds must be from 1 to 600".into());
        }
        let port = u16::try_from(number("port", 14900)?).map_err(|_| "--port must fit u16")?;
        let mut sections = Sections::ALL;
        if let Some(list) = values.get("sections") {
            sections = Sections::NONE;
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match name {
                    "hydration" => sections.hydration = true,
                    "iops" => sections.iops = true,
                    "pause" => sections.pause = true,
                    "era" => sections.era = true,
                    "all" => sections = Sections::ALL,
                    other => {
                        return Err(format!(
                            "--sections: unknown section {other:?} (hydration, iops, pause, era)"
                        )
                        .into());
                    }
                }
            }
            if sections == Sections::NONE {
                return Err("--sections names no section".into());
            }
        }
        let results_dir = values.get("results-dir").map(PathBuf::from);
        let json = match (values.get("json"), &results_dir) {
            (Some(path), _) => PathBuf::from(path),
            (None, Some(dir)) => dir.join("hydration.json"),
            (None, None) => PathBuf::from("/tmp/dmclone-hydration-bench.json"),
        };
        Ok(Params {
            measure,
            size: size_mib * MIB,
            reps: reps as usize,
            candidates,
            fio_seconds,
            port,
            json,
            results_dir,
            sections,
            hydration_timeout: Duration::from_secs(number("hydration-timeout", 900)?),
        })
    }
}
