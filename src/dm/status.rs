//! INFO status lines of the targets we drive, parsed into structs and
//! rendered back exactly (the rendering exists so that property tests can
//! round-trip). Pure code: no I/O. Parsers never panic and reject any line that
//! lacks a documented field or has one of the wrong shape, quoting it. Words
//! after the documented fields are ignored: newer kernels append fields to
//! status lines (thin-pool gained its metadata low watermark that way), and an
//! agent must keep working on them.
//!
//! linear and flakey report an empty INFO status on 6.1, so they have no type.

use std::{fmt, str::FromStr};

use crate::{error::ParseError, units::Sectors};

/// Metadata space in 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub total: u64,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.used, self.total)
    }
}

/// Fields of one status line, with errors that quote the whole line.
struct Fields<'a> {
    what: &'static str,
    line: &'a str,
    words: std::str::SplitWhitespace<'a>,
}

impl<'a> Fields<'a> {
    fn new(what: &'static str, line: &'a str) -> Self {
        Self {
            what,
            line,
            words: line.split_whitespace(),
        }
    }

    fn error(&self, reason: impl Into<String>) -> ParseError {
        ParseError::new(self.what, self.line, reason)
    }

    fn word(&mut self, name: &str) -> Result<&'a str, ParseError> {
        self.words
            .next()
            .ok_or_else(|| self.error(format!("missing {name}")))
    }

    fn number<T: FromStr>(&mut self, name: &str) -> Result<T, ParseError> {
        let word = self.word(name)?;
        word.parse()
            .map_err(|_| self.error(format!("{name} {word:?} is not a valid number")))
    }

    fn keyword(&mut self, expected: &str) -> Result<(), ParseError> {
        let word = self.word(expected)?;
        if word.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            Err(self.error(format!("expected {expected:?}, found {word:?}")))
        }
    }

    /// `<used>/<total>` with used <= total.
    fn usage(&mut self, name: &str) -> Result<Usage, ParseError> {
        let word = self.word(name)?;
        let parsed = word
            .split_once('/')
            .and_then(|(u, t)| Some((u.parse().ok()?, t.parse().ok()?)));
        let Some((used, total)) = parsed else {
            return Err(self.error(format!("{name} {word:?} is not <used>/<total>")));
        };
        if used > total {
            return Err(self.error(format!("{name} {word:?} uses more than the total")));
        }
        Ok(Usage { used, total })
    }

    /// A number or `-`.
    fn optional_number<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, ParseError> {
        match self.word(name)? {
            "-" => Ok(None),
            word => word
                .parse()
                .map(Some)
                .map_err(|_| self.error(format!("{name} {word:?} is neither a number nor '-'"))),
        }
    }

    fn next_word(&mut self) -> Option<&'a str> {
        self.words.next()
    }

    /// Skips whatever a newer kernel appended after the fields we know.
    fn ignore_newer_fields(self) {}
}

/// A status line that may instead be one of the single words the kernel
/// prints when a target's metadata has failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health<T> {
    Running(T),
    /// The target failed permanently.
    Fail,
    /// Reading the status itself failed.
    Error,
}

impl<T: FromStr<Err = ParseError>> FromStr for Health<T> {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        match line.trim() {
            "Fail" => Ok(Health::Fail),
            "Error" => Ok(Health::Error),
            _ => line.parse().map(Health::Running),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Health<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Running(status) => status.fmt(f),
            Health::Fail => f.write_str("Fail"),
            Health::Error => f.write_str("Error"),
        }
    }
}

/// Metadata mode of a clone: writes need `rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMode {
    ReadWrite,
    ReadOnly,
}

/// `8 <used>/<total> <region> <hydrated>/<regions> <hydrating> <#feat> [feat...]
/// 4 hydration_threshold <N> hydration_batch_size <N> <rw|ro>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneStatus {
    /// Metadata block size in sectors; always 8.
    pub metadata_block_sectors: Sectors,
    pub metadata: Usage,
    pub region_sectors: Sectors,
    pub hydrated_regions: u64,
    pub total_regions: u64,
    /// Region copies in flight.
    pub hydrating_regions: u64,
    pub features: CloneFeatures,
    pub hydration_threshold: u32,
    pub hydration_batch_size: u32,
    pub mode: CloneMode,
}

/// The feature flags a clone reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloneFeatures {
    pub no_hydration: bool,
    pub no_discard_passdown: bool,
}

impl CloneStatus {
    pub fn is_fully_hydrated(&self) -> bool {
        self.hydrated_regions == self.total_regions
    }

    /// Hydrated share in [0, 1].
    pub fn hydrated_fraction(&self) -> f64 {
        if self.total_regions == 0 {
            return 1.0;
        }
        self.hydrated_regions as f64 / self.total_regions as f64
    }
}

/// A clone's whole status: running, `Fail` (metadata failed permanently,
/// every bio is killed) or `Error` (the metadata query failed).
pub type CloneHealth = Health<CloneStatus>;

impl FromStr for CloneStatus {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        let mut fields = Fields::new("clone status", line);
        let metadata_block_sectors = fields.number("metadata block size")?;
        let metadata = fields.usage("metadata usage")?;
        let region_sectors = fields.number("region size")?;
        let regions = fields.usage("hydrated regions")?;
        let hydrating_regions = fields.number("hydrating regions")?;
        let features = parse_clone_features(&mut fields)?;
        fields.keyword("4")?;
        fields.keyword("hydration_threshold")?;
        let hydration_threshold = fields.number("hydration threshold")?;
        fields.keyword("hydration_batch_size")?;
        let hydration_batch_size = fields.number("hydration batch size")?;
        let mode = match fields.word("metadata mode")? {
            "rw" => CloneMode::ReadWrite,
            "ro" => CloneMode::ReadOnly,
            other => return Err(fields.error(format!("unknown metadata mode {other:?}"))),
        };
        fields.ignore_newer_fields();
        Ok(CloneStatus {
            metadata_block_sectors,
            metadata,
            region_sectors,
            hydrated_regions: regions.used,
            total_regions: regions.total,
            hydrating_regions,
            features,
            hydration_threshold,
            hydration_batch_size,
            mode,
        })
    }
}

fn parse_clone_features(fields: &mut Fields<'_>) -> Result<CloneFeatures, ParseError> {
    let count: usize = fields.number("feature count")?;
    if count > 2 {
        return Err(fields.error(format!("{count} features, clone has at most 2")));
    }
    let mut features = CloneFeatures::default();
    for _ in 0..count {
        let word = fields.word("feature")?;
        let flag = match word {
            "no_hydration" => &mut features.no_hydration,
            "no_discard_passdown" => &mut features.no_discard_passdown,
            other => return Err(fields.error(format!("unknown clone feature {other:?}"))),
        };
        if std::mem::replace(flag, true) {
            return Err(fields.error(format!("feature {word:?} listed twice")));
        }
    }
    Ok(features)
}

impl fmt::Display for CloneStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let features: Vec<&str> = [
            (self.features.no_hydration, "no_hydration"),
            (self.features.no_discard_passdown, "no_discard_passdown"),
        ]
        .into_iter()
        .filter_map(|(on, word)| on.then_some(word))
        .collect();
        write!(
            f,
            "{} {} {} {}/{} {} {}",
            self.metadata_block_sectors,
            self.metadata,
            self.region_sectors,
            self.hydrated_regions,
            self.total_regions,
            self.hydrating_regions,
            features.len()
        )?;
        for feature in features {
            write!(f, " {feature}")?;
        }
        let mode = match self.mode {
            CloneMode::ReadWrite => "rw",
            CloneMode::ReadOnly => "ro",
        };
        write!(
            f,
            " 4 hydration_threshold {} hydration_batch_size {} {mode}",
            self.hydration_threshold, self.hydration_batch_size
        )
    }
}

/// `8 <used>/<total> <current_era> <held_root|->`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EraStatus {
    pub metadata_block_sectors: Sectors,
    pub metadata: Usage,
    pub current_era: u32,
    /// Metadata block of the held metadata snapshot, if one is held.
    pub held_root: Option<u64>,
}

impl FromStr for EraStatus {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        let mut fields = Fields::new("era status", line);
        let status = EraStatus {
            metadata_block_sectors: fields.number("metadata block size")?,
            metadata: fields.usage("metadata usage")?,
            current_era: fields.number("current era")?,
            held_root: fields.optional_number("held root")?,
        };
        fields.ignore_newer_fields();
        Ok(status)
    }
}

impl fmt::Display for EraStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.metadata_block_sectors,
            self.metadata,
            self.current_era,
            dash_or(self.held_root)
        )
    }
}

fn dash_or<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// What a thin pool does with new writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    ReadWrite,
    /// Also shown when metadata space ran out.
    ReadOnly,
    OutOfDataSpace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardMode {
    Ignore,
    Passdown,
    NoPassdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSpacePolicy {
    Error,
    Queue,
}

/// `<trans_id> <used_meta>/<total_meta> <used_data>/<total_data> <held_root|->
/// <mode> <discards> <no_space> <needs_check|-> [<meta_low_watermark>] `
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinPoolStatus {
    pub transaction_id: u64,
    /// In 4 KiB metadata blocks.
    pub metadata: Usage,
    /// In data blocks of the pool's block size.
    pub data: Usage,
    pub held_root: Option<u64>,
    pub mode: PoolMode,
    pub discards: DiscardMode,
    pub no_space: NoSpacePolicy,
    pub needs_check: bool,
    /// Absent on kernels older than 4.19.
    pub metadata_low_watermark: Option<u64>,
}

/// A pool's whole status: running, `Fail` or `Error`.
pub type ThinPoolHealth = Health<ThinPoolStatus>;

impl ThinPoolHealth {
    /// Used data blocks, when the pool is running.
    pub fn used_data_blocks(&self) -> Option<u64> {
        match self {
            Health::Running(status) => Some(status.data.used),
            _ => None,
        }
    }
}

impl FromStr for ThinPoolStatus {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        let mut fields = Fields::new("thin-pool status", line);
        let transaction_id = fields.number("transaction id")?;
        let metadata = fields.usage("metadata usage")?;
        let data = fields.usage("data usage")?;
        let held_root = fields.optional_number("held root")?;
        let mode = match fields.word("mode")? {
            "rw" => PoolMode::ReadWrite,
            "ro" => PoolMode::ReadOnly,
            "out_of_data_space" => PoolMode::OutOfDataSpace,
            other => return Err(fields.error(format!("unknown pool mode {other:?}"))),
        };
        let discards = match fields.word("discard mode")? {
            "ignore_discard" => DiscardMode::Ignore,
            "discard_passdown" => DiscardMode::Passdown,
            "no_discard_passdown" => DiscardMode::NoPassdown,
            other => return Err(fields.error(format!("unknown discard mode {other:?}"))),
        };
        let no_space = match fields.word("no-space policy")? {
            "error_if_no_space" => NoSpacePolicy::Error,
            "queue_if_no_space" => NoSpacePolicy::Queue,
            other => return Err(fields.error(format!("unknown no-space policy {other:?}"))),
        };
        let needs_check = match fields.word("needs_check flag")? {
            "needs_check" => true,
            "-" => false,
            other => return Err(fields.error(format!("unknown needs_check flag {other:?}"))),
        };
        let metadata_low_watermark = match fields.next_word() {
            None => None,
            Some(word) => Some(word.parse().map_err(|_| {
                fields.error(format!("metadata low watermark {word:?} is not a number"))
            })?),
        };
        fields.ignore_newer_fields();
        Ok(ThinPoolStatus {
            transaction_id,
            metadata,
            data,
            held_root,
            mode,
            discards,
            no_space,
            needs_check,
            metadata_low_watermark,
        })
    }
}

impl fmt::Display for ThinPoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            PoolMode::ReadWrite => "rw",
            PoolMode::ReadOnly => "ro",
            PoolMode::OutOfDataSpace => "out_of_data_space",
        };
        let discards = match self.discards {
            DiscardMode::Ignore => "ignore_discard",
            DiscardMode::Passdown => "discard_passdown",
            DiscardMode::NoPassdown => "no_discard_passdown",
        };
        let no_space = match self.no_space {
            NoSpacePolicy::Error => "error_if_no_space",
            NoSpacePolicy::Queue => "queue_if_no_space",
        };
        write!(
            f,
            "{} {} {} {} {mode} {discards} {no_space} {}",
            self.transaction_id,
            self.metadata,
            self.data,
            dash_or(self.held_root),
            if self.needs_check { "needs_check" } else { "-" },
        )?;
        // The kernel ends the line with a space.
        match self.metadata_low_watermark {
            Some(mark) => write!(f, " {mark} "),
            None => f.write_str(" "),
        }
    }
}

/// `<mapped_sectors> <highest_mapped_sector|->`, or `-` (not open), or `Fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinStatus {
    Active {
        mapped_sectors: Sectors,
        highest_mapped_sector: Option<Sectors>,
    },
    NotOpen,
    Fail,
}

impl ThinStatus {
    pub fn mapped_sectors(&self) -> Option<Sectors> {
        match self {
            ThinStatus::Active { mapped_sectors, .. } => Some(*mapped_sectors),
            _ => None,
        }
    }
}

impl FromStr for ThinStatus {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        match line.trim() {
            "Fail" => return Ok(ThinStatus::Fail),
            "-" => return Ok(ThinStatus::NotOpen),
            _ => {}
        }
        let mut fields = Fields::new("thin status", line);
        let status = ThinStatus::Active {
            mapped_sectors: fields.number("mapped sectors")?,
            highest_mapped_sector: fields.optional_number("highest mapped sector")?,
        };
        fields.ignore_newer_fields();
        Ok(status)
    }
}

impl fmt::Display for ThinStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThinStatus::Active {
                mapped_sectors,
                highest_mapped_sector,
            } => write!(f, "{mapped_sectors} {}", dash_or(*highest_mapped_sector)),
            ThinStatus::NotOpen => f.write_str("-"),
            ThinStatus::Fail => f.write_str("Fail"),
        }
    }
}

/// Bios the delay target currently holds: `<reads> <writes> [<flushes>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayStatus {
    pub reads: u64,
    pub writes: u64,
    /// Absent on kernels whose delay target reports two fields.
    pub flushes: Option<u64>,
}

impl FromStr for DelayStatus {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        let mut fields = Fields::new("delay status", line);
        let reads = fields.number("held reads")?;
        let writes = fields.number("held writes")?;
        let flushes = match fields.next_word() {
            None => None,
            Some(word) => Some(
                word.parse()
                    .map_err(|_| fields.error(format!("held flushes {word:?} is not a number")))?,
            ),
        };
        fields.ignore_newer_fields();
        Ok(DelayStatus {
            reads,
            writes,
            flushes,
        })
    }
}

impl fmt::Display for DelayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.reads, self.writes)?;
        if let Some(flushes) = self.flushes {
            write!(f, " {flushes}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
