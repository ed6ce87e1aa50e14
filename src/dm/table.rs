//! Typed device-mapper tables: rendered into the exact lines the kernel's
//! target constructors take, and parsed back from what `DM_TABLE_STATUS` with
//! the table flag echoes. Pure code: no I/O.
//!
//! Devices are always written as `MAJ:MIN`, which needs no `/dev` node and is
//! what the kernel echoes back, so a rendered table round-trips exactly.

use std::{fmt, str::FromStr};

use crate::{
    error::{Error, ParseError},
    units::Sectors,
};

/// A block device by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevRef {
    pub major: u32,
    pub minor: u32,
}

impl From<(u32, u32)> for DevRef {
    fn from((major, minor): (u32, u32)) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for DevRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DevRef {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new("device number", s, reason);
        let (major, minor) = s.split_once(':').ok_or_else(|| bad("expected MAJ:MIN"))?;
        Ok(Self {
            major: major.parse().map_err(|_| bad("major is not a number"))?,
            minor: minor.parse().map_err(|_| bad("minor is not a number"))?,
        })
    }
}

/// `linear <dev> <offset>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linear {
    pub device: DevRef,
    pub offset: Sectors,
}

/// Features of a thin pool; the kernel accepts at most four on one line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThinPoolFeatures {
    pub skip_block_zeroing: bool,
    pub ignore_discard: bool,
    pub no_discard_passdown: bool,
    pub read_only: bool,
    pub error_if_no_space: bool,
}

/// `thin-pool <meta> <data> <block> <low_water> [<#feat> <feat>...]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPool {
    pub metadata: DevRef,
    pub data: DevRef,
    /// 128..=2,097,152 sectors, a multiple of 128.
    pub data_block_sectors: Sectors,
    /// In data blocks; crossing it raises a dm event.
    pub low_water_blocks: u64,
    pub features: ThinPoolFeatures,
}

/// `thin <pool> <dev_id> [<external_origin>]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thin {
    pub pool: DevRef,
    /// At most 2^24 - 1.
    pub device_id: u32,
    pub external_origin: Option<DevRef>,
}

/// `clone <meta> <dest> <source> <region> [<#feat> <feat>...] [<#core> <key> <value>...]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneParams {
    pub metadata: DevRef,
    pub destination: DevRef,
    pub source: DevRef,
    /// A power of two in 8..=2,097,152 sectors.
    pub region_sectors: Sectors,
    /// Background hydration; `false` renders `no_hydration` (deferred start).
    pub hydration: bool,
    /// `false` renders `no_discard_passdown`.
    pub discard_passdown: bool,
    /// Regions copied concurrently; `None` keeps the kernel default (1).
    pub hydration_threshold: Option<u32>,
    /// Adjacent regions merged into one copy; `None` keeps the default (1).
    pub hydration_batch_size: Option<u32>,
}

/// `era <meta> <origin> <block>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Era {
    pub metadata: DevRef,
    pub origin: DevRef,
    /// Positive and a multiple of 8 sectors.
    pub block_sectors: Sectors,
}

/// Direction selector of flakey's `corrupt_bio_byte`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BioDirection {
    Read,
    Write,
}

/// Behaviour of a flakey device during its down interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlakeyFeature {
    DropWrites,
    ErrorWrites,
    /// Kernel 6.4 and later.
    ErrorReads,
    CorruptBioByte {
        /// 1-based byte index within the bio.
        nth: u32,
        direction: BioDirection,
        value: u8,
        flags: u32,
    },
}

/// `flakey <dev> <offset> <up> <down> [<#words> <words>...]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flakey {
    pub device: DevRef,
    pub offset: Sectors,
    pub up_seconds: u32,
    pub down_seconds: u32,
    pub features: Vec<FlakeyFeature>,
}

/// One `<dev> <offset> <ms>` triple of the delay target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayLeg {
    pub device: DevRef,
    pub offset: Sectors,
    pub delay_ms: u32,
}

/// `delay <read leg> [<write leg> [<flush leg>]]`: one leg delays everything,
/// two split reads from writes and flushes, three split flushes too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delay {
    pub read: DelayLeg,
    pub write: Option<DelayLeg>,
    pub flush: Option<DelayLeg>,
}

/// A target with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Linear(Linear),
    ThinPool(ThinPool),
    Thin(Thin),
    Clone(CloneParams),
    Era(Era),
    Flakey(Flakey),
    Delay(Delay),
    /// Fails every I/O; a placeholder mapping.
    Error,
}

impl Target {
    /// The kernel's name for the target type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Target::Linear(_) => "linear",
            Target::ThinPool(_) => "thin-pool",
            Target::Thin(_) => "thin",
            Target::Clone(_) => "clone",
            Target::Era(_) => "era",
            Target::Flakey(_) => "flakey",
            Target::Delay(_) => "delay",
            Target::Error => "error",
        }
    }

    /// The parameter text of the table line, without the type.
    pub fn params(&self) -> String {
        match self {
            Target::Linear(t) => format!("{} {}", t.device, t.offset),
            Target::ThinPool(t) => render_thin_pool(t),
            Target::Thin(t) => match t.external_origin {
                Some(origin) => format!("{} {} {origin}", t.pool, t.device_id),
                None => format!("{} {}", t.pool, t.device_id),
            },
            Target::Clone(t) => render_clone(t),
            Target::Era(t) => format!("{} {} {}", t.metadata, t.origin, t.block_sectors),
            Target::Flakey(t) => render_flakey(t),
            Target::Delay(t) => render_delay(t),
            Target::Error => String::new(),
        }
    }

    /// Parses the parameter text of a target of type `type_name`.
    pub fn parse(type_name: &str, params: &str) -> Result<Target, ParseError> {
        let mut words = Words::new(type_name, params);
        let target = match type_name {
            "linear" => Target::Linear(Linear {
                device: words.dev()?,
                offset: words.number()?,
            }),
            "thin-pool" => Target::ThinPool(parse_thin_pool(&mut words)?),
            "thin" => Target::Thin(parse_thin(&mut words)?),
            "clone" => Target::Clone(parse_clone(&mut words)?),
            "era" => Target::Era(parse_era(&mut words)?),
            "flakey" => Target::Flakey(parse_flakey(&mut words)?),
            "delay" => Target::Delay(parse_delay(&mut words)?),
            "error" => Target::Error,
            other => {
                return Err(ParseError::new(
                    "table line",
                    &format!("{other} {params}"),
                    format!("unknown target type {other:?}"),
                ));
            }
        };
        words.end()?;
        Ok(target)
    }
}

/// Whitespace-separated words of one target's parameters, with errors that
/// quote the whole parameter text.
struct Words<'a> {
    what: &'static str,
    input: &'a str,
    words: std::iter::Peekable<std::str::SplitWhitespace<'a>>,
}

impl<'a> Words<'a> {
    fn new(type_name: &str, input: &'a str) -> Self {
        let what = match type_name {
            "linear" => "linear table",
            "thin-pool" => "thin-pool table",
            "thin" => "thin table",
            "clone" => "clone table",
            "era" => "era table",
            "flakey" => "flakey table",
            "delay" => "delay table",
            _ => "table",
        };
        Self {
            what,
            input,
            words: input.split_whitespace().peekable(),
        }
    }

    fn error(&self, reason: impl Into<String>) -> ParseError {
        ParseError::new(self.what, self.input, reason)
    }

    fn word(&mut self) -> Result<&'a str, ParseError> {
        self.words
            .next()
            .ok_or_else(|| self.error("too few arguments"))
    }

    fn number<T: FromStr>(&mut self) -> Result<T, ParseError> {
        let word = self.word()?;
        word.parse()
            .map_err(|_| self.error(format!("{word:?} is not a valid number")))
    }

    fn dev(&mut self) -> Result<DevRef, ParseError> {
        let word = self.word()?;
        word.parse()
            .map_err(|_| self.error(format!("{word:?} is not a MAJ:MIN device")))
    }

    fn has_more(&mut self) -> bool {
        self.words.peek().is_some()
    }

    fn end(&mut self) -> Result<(), ParseError> {
        match self.words.next() {
            None => Ok(()),
            Some(extra) => Err(self.error(format!("unexpected extra argument {extra:?}"))),
        }
    }
}

const THIN_POOL_MAX_FEATURES: usize = 4;
const THIN_DEVICE_ID_MAX: u32 = (1 << 24) - 1;

fn render_thin_pool(t: &ThinPool) -> String {
    let f = t.features;
    let words: Vec<&str> = [
        (f.skip_block_zeroing, "skip_block_zeroing"),
        (f.ignore_discard, "ignore_discard"),
        (f.no_discard_passdown, "no_discard_passdown"),
        (f.read_only, "read_only"),
        (f.error_if_no_space, "error_if_no_space"),
    ]
    .into_iter()
    .filter_map(|(on, word)| on.then_some(word))
    .collect();
    let mut line = format!(
        "{} {} {} {}",
        t.metadata, t.data, t.data_block_sectors, t.low_water_blocks
    );
    push_counted(&mut line, &words);
    line
}

/// Appends ` <count> <words...>` unless there are no words.
fn push_counted(line: &mut String, words: &[&str]) {
    if !words.is_empty() {
        line.push_str(&format!(" {} {}", words.len(), words.join(" ")));
    }
}

fn parse_thin_pool(words: &mut Words<'_>) -> Result<ThinPool, ParseError> {
    let metadata = words.dev()?;
    let data = words.dev()?;
    let data_block_sectors: Sectors = words.number()?;
    if !(128..=2_097_152).contains(&data_block_sectors.0)
        || !data_block_sectors.0.is_multiple_of(128)
    {
        return Err(words.error(format!(
            "data block size {data_block_sectors} is not a multiple of 128 in 128..=2097152 sectors"
        )));
    }
    let low_water_blocks = words.number()?;
    let mut features = ThinPoolFeatures::default();
    if words.has_more() {
        let count: usize = words.number()?;
        if count > THIN_POOL_MAX_FEATURES {
            return Err(words.error(format!("{count} features, the kernel takes at most 4")));
        }
        for _ in 0..count {
            let word = words.word()?;
            let flag = match word.to_ascii_lowercase().as_str() {
                "skip_block_zeroing" => &mut features.skip_block_zeroing,
                "ignore_discard" => &mut features.ignore_discard,
                "no_discard_passdown" => &mut features.no_discard_passdown,
                "read_only" => &mut features.read_only,
                "error_if_no_space" => &mut features.error_if_no_space,
                _ => return Err(words.error(format!("unknown thin-pool feature {word:?}"))),
            };
            if std::mem::replace(flag, true) {
                return Err(words.error(format!("feature {word:?} given twice")));
            }
        }
    }
    Ok(ThinPool {
        metadata,
        data,
        data_block_sectors,
        low_water_blocks,
        features,
    })
}

fn parse_thin(words: &mut Words<'_>) -> Result<Thin, ParseError> {
    let pool = words.dev()?;
    let device_id: u32 = words.number()?;
    if device_id > THIN_DEVICE_ID_MAX {
        return Err(words.error(format!("thin device id {device_id} exceeds 2^24-1")));
    }
    let external_origin = if words.has_more() {
        Some(words.dev()?)
    } else {
        None
    };
    Ok(Thin {
        pool,
        device_id,
        external_origin,
    })
}

fn render_clone(t: &CloneParams) -> String {
    let mut line = format!(
        "{} {} {} {}",
        t.metadata, t.destination, t.source, t.region_sectors
    );
    let mut features = Vec::new();
    if !t.hydration {
        features.push("no_hydration");
    }
    if !t.discard_passdown {
        features.push("no_discard_passdown");
    }
    let mut core = Vec::new();
    if let Some(n) = t.hydration_threshold {
        core.push(format!("hydration_threshold {n}"));
    }
    if let Some(n) = t.hydration_batch_size {
        core.push(format!("hydration_batch_size {n}"));
    }
    if features.is_empty() && core.is_empty() {
        return line;
    }
    // Core arguments come after the feature group, so its count is needed
    // even when it is zero.
    line.push_str(&format!(" {}", features.len()));
    for feature in features {
        line.push(' ');
        line.push_str(feature);
    }
    if !core.is_empty() {
        line.push_str(&format!(" {} {}", core.len() * 2, core.join(" ")));
    }
    line
}

fn parse_clone(words: &mut Words<'_>) -> Result<CloneParams, ParseError> {
    let metadata = words.dev()?;
    let destination = words.dev()?;
    let source = words.dev()?;
    let region_sectors: Sectors = words.number()?;
    if !region_sectors.0.is_power_of_two() || !(8..=2_097_152).contains(&region_sectors.0) {
        return Err(words.error(format!(
            "region size {region_sectors} is not a power of two in 8..=2097152 sectors"
        )));
    }
    let mut clone = CloneParams {
        metadata,
        destination,
        source,
        region_sectors,
        hydration: true,
        discard_passdown: true,
        hydration_threshold: None,
        hydration_batch_size: None,
    };
    if words.has_more() {
        parse_clone_features(words, &mut clone)?;
    }
    if words.has_more() {
        parse_clone_core_args(words, &mut clone)?;
    }
    Ok(clone)
}

fn parse_clone_features(words: &mut Words<'_>, clone: &mut CloneParams) -> Result<(), ParseError> {
    let count: usize = words.number()?;
    if count > 2 {
        return Err(words.error(format!("{count} features, clone takes at most 2")));
    }
    for _ in 0..count {
        let word = words.word()?;
        let flag = match word.to_ascii_lowercase().as_str() {
            "no_hydration" => &mut clone.hydration,
            "no_discard_passdown" => &mut clone.discard_passdown,
            _ => return Err(words.error(format!("unknown clone feature {word:?}"))),
        };
        if !std::mem::replace(flag, false) {
            return Err(words.error(format!("feature {word:?} given twice")));
        }
    }
    Ok(())
}

fn parse_clone_core_args(words: &mut Words<'_>, clone: &mut CloneParams) -> Result<(), ParseError> {
    let count: usize = words.number()?;
    if count > 4 || !count.is_multiple_of(2) {
        return Err(words.error(format!(
            "{count} core argument words; clone takes 0, 2 or 4 (key value pairs)"
        )));
    }
    for _ in 0..count / 2 {
        let key = words.word()?;
        let value: u32 = words.number()?;
        let slot = match key.to_ascii_lowercase().as_str() {
            "hydration_threshold" => &mut clone.hydration_threshold,
            "hydration_batch_size" => &mut clone.hydration_batch_size,
            _ => return Err(words.error(format!("unknown clone core argument {key:?}"))),
        };
        if slot.replace(value).is_some() {
            return Err(words.error(format!("core argument {key:?} given twice")));
        }
    }
    Ok(())
}

fn parse_era(words: &mut Words<'_>) -> Result<Era, ParseError> {
    let metadata = words.dev()?;
    let origin = words.dev()?;
    let block_sectors: Sectors = words.number()?;
    if block_sectors == Sectors::ZERO || !block_sectors.0.is_multiple_of(8) {
        return Err(words.error(format!(
            "era block size {block_sectors} is not a positive multiple of 8 sectors"
        )));
    }
    Ok(Era {
        metadata,
        origin,
        block_sectors,
    })
}

fn render_flakey(t: &Flakey) -> String {
    let mut line = format!(
        "{} {} {} {}",
        t.device, t.offset, t.up_seconds, t.down_seconds
    );
    let words: Vec<String> = t.features.iter().flat_map(flakey_feature_words).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    push_counted(&mut line, &words);
    line
}

fn flakey_feature_words(feature: &FlakeyFeature) -> Vec<String> {
    match feature {
        FlakeyFeature::DropWrites => vec!["drop_writes".into()],
        FlakeyFeature::ErrorWrites => vec!["error_writes".into()],
        FlakeyFeature::ErrorReads => vec!["error_reads".into()],
        FlakeyFeature::CorruptBioByte {
            nth,
            direction,
            value,
            flags,
        } => vec![
            "corrupt_bio_byte".into(),
            nth.to_string(),
            match direction {
                BioDirection::Read => "r".into(),
                BioDirection::Write => "w".into(),
            },
            value.to_string(),
            flags.to_string(),
        ],
    }
}

fn parse_flakey(words: &mut Words<'_>) -> Result<Flakey, ParseError> {
    let device = words.dev()?;
    let offset = words.number()?;
    let up_seconds: u32 = words.number()?;
    let down_seconds: u32 = words.number()?;
    if up_seconds == 0 && down_seconds == 0 {
        return Err(words.error("up and down intervals are both zero"));
    }
    let mut features = Vec::new();
    if words.has_more() {
        let count: usize = words.number()?;
        let mut used = 0;
        while used < count {
            let (feature, taken) = parse_flakey_feature(words)?;
            features.push(feature);
            used += taken;
        }
        if used != count {
            return Err(words.error(format!(
                "feature word count {count} does not match the features given"
            )));
        }
    }
    Ok(Flakey {
        device,
        offset,
        up_seconds,
        down_seconds,
        features,
    })
}

/// One flakey feature and the number of words it took.
fn parse_flakey_feature(words: &mut Words<'_>) -> Result<(FlakeyFeature, usize), ParseError> {
    let word = words.word()?;
    let feature = match word.to_ascii_lowercase().as_str() {
        "drop_writes" => return Ok((FlakeyFeature::DropWrites, 1)),
        "error_writes" => return Ok((FlakeyFeature::ErrorWrites, 1)),
        "error_reads" => return Ok((FlakeyFeature::ErrorReads, 1)),
        "corrupt_bio_byte" => {
            let nth: u32 = words.number()?;
            if nth == 0 {
                return Err(words.error("corrupt_bio_byte counts bytes from 1"));
            }
            let direction = match words.word()? {
                "r" => BioDirection::Read,
                "w" => BioDirection::Write,
                other => {
                    return Err(words.error(format!("corrupt_bio_byte direction {other:?}")));
                }
            };
            FlakeyFeature::CorruptBioByte {
                nth,
                direction,
                value: words.number()?,
                flags: words.number()?,
            }
        }
        _ => return Err(words.error(format!("unknown flakey feature {word:?}"))),
    };
    Ok((feature, 5))
}

fn render_delay(t: &Delay) -> String {
    let leg = |l: &DelayLeg| format!("{} {} {}", l.device, l.offset, l.delay_ms);
    let mut line = leg(&t.read);
    for extra in [&t.write, &t.flush].into_iter().flatten() {
        line.push(' ');
        line.push_str(&leg(extra));
    }
    line
}

fn parse_delay(words: &mut Words<'_>) -> Result<Delay, ParseError> {
    let leg = |words: &mut Words<'_>| -> Result<DelayLeg, ParseError> {
        Ok(DelayLeg {
            device: words.dev()?,
            offset: words.number()?,
            delay_ms: words.number()?,
        })
    };
    let read = leg(words)?;
    let write = if words.has_more() {
        Some(leg(words)?)
    } else {
        None
    };
    let flush = if words.has_more() {
        Some(leg(words)?)
    } else {
        None
    };
    Ok(Delay { read, write, flush })
}

/// One segment of a table: `len` sectors from `start`, mapped by `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub start: Sectors,
    pub len: Sectors,
    pub target: Target,
}

/// A whole table: non-empty, contiguous segments starting at sector 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    segments: Vec<Segment>,
}

impl Table {
    pub fn new(segments: Vec<Segment>) -> Result<Self, Error> {
        if segments.is_empty() {
            return Err(Error::InvalidTable(
                "a table needs at least one segment".into(),
            ));
        }
        let mut next = Sectors::ZERO;
        for (index, segment) in segments.iter().enumerate() {
            if segment.len == Sectors::ZERO {
                return Err(Error::InvalidTable(format!("segment {index} has length 0")));
            }
            if segment.start != next {
                return Err(Error::InvalidTable(format!(
                    "segment {index} starts at sector {} but the previous one ends at {next}",
                    segment.start
                )));
            }
            next = segment.start.checked_add(segment.len).ok_or_else(|| {
                Error::InvalidTable(format!("segment {index} ends past the last sector"))
            })?;
        }
        Ok(Self { segments })
    }

    /// A table of one segment covering `[0, len)`.
    pub fn single(len: Sectors, target: Target) -> Result<Self, Error> {
        Self::new(vec![Segment {
            start: Sectors::ZERO,
            len,
            target,
        }])
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether this table, read back from the kernel, is `wanted` but for
    /// what messages set: a clone's copy knobs and hydration switch. The
    /// kernel reads a clone's table back as it was built (its constructor's
    /// words); what it was told since shows only in its status.
    pub fn differs_only_in_messages(&self, wanted: &Table) -> bool {
        self.segments.len() == wanted.segments.len()
            && self
                .segments
                .iter()
                .zip(&wanted.segments)
                .all(|(found, want)| {
                    (found.start, found.len) == (want.start, want.len)
                        && match (&found.target, &want.target) {
                            (Target::Clone(found), Target::Clone(want)) => {
                                let untold = CloneParams {
                                    hydration: want.hydration,
                                    hydration_threshold: want.hydration_threshold,
                                    hydration_batch_size: want.hydration_batch_size,
                                    ..found.clone()
                                };
                                untold == *want
                            }
                            (found, want) => found == want,
                        }
                })
    }

    /// The hydration switch of the table's clone, if it has one.
    pub fn clone_hydration(&self) -> Option<bool> {
        self.segments.iter().find_map(|s| match &s.target {
            Target::Clone(clone) => Some(clone.hydration),
            _ => None,
        })
    }

    /// Total length in sectors.
    pub fn len_sectors(&self) -> Sectors {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// `(start, len, type, params)` per segment, as `DM::table_load` takes them.
    pub fn to_ioctl_targets(&self) -> Vec<(u64, u64, String, String)> {
        self.segments
            .iter()
            .map(|s| {
                (
                    s.start.0,
                    s.len.0,
                    s.target.type_name().to_owned(),
                    s.target.params(),
                )
            })
            .collect()
    }

    /// Reads back a table the kernel reported with the table flag.
    pub fn parse_lines(lines: &[(u64, u64, String, String)]) -> Result<Self, ParseError> {
        let segments = lines
            .iter()
            .map(|(start, len, kind, params)| {
                Ok(Segment {
                    start: Sectors(*start),
                    len: Sectors(*len),
                    target: Target::parse(kind, params)?,
                })
            })
            .collect::<Result<Vec<_>, ParseError>>()?;
        Self::new(segments).map_err(|err| {
            let text = lines
                .iter()
                .map(|(s, l, k, p)| format!("{s} {l} {k} {p}"))
                .collect::<Vec<_>>()
                .join("\n");
            ParseError::new("table", &text, err.to_string())
        })
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, s) in self.segments.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{} {} {}", s.start, s.len, s.target.type_name())?;
            let params = s.target.params();
            if !params.is_empty() {
                write!(f, " {params}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
