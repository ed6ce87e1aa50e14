//! Changed-block tracking with dm-era.
//!
//! A tracked volume's public device is `era(<prefix>-emeta-<id>, thin)`
//! instead of a linear map of the thin device: the same depth, so tracking
//! costs dm-era's bookkeeping and no extra remapping. Its metadata lives in a
//! thin device of the pool, active while the volume exists. An unpublished
//! volume has no public device; a call that needs dm-era then activates it
//! for a moment under a private name (a probe): nothing writes to an
//! unpublished volume, so its history cannot miss a write.
//!
//! Eras: dm-era counts up on `checkpoint` and on every resume. A write lands
//! in the era current at the time; "changed since era N" is every block
//! written in era N or later, read from a metadata snapshot by the agent's
//! own reader of dm-era's on-disk format ([`era_metadata`]). Snapshots
//! record the first era after them.
//!
//! Eras as callers see them are 64 bits: a history tag above dm-era's own
//! 32-bit era. Each history (a volume made, copied from elsewhere, reverted,
//! or arrived on this host) gets a fresh random tag, so an era from another
//! history, another host's included, is refused instead of being answered
//! with this history's unrelated blocks. Era 0 means "since the volume was
//! made".
//!
//! History has a start: a volume made empty knows every write (from era 0);
//! one whose content came from elsewhere (a snapshot, a clone, a revert,
//! another host) knows writes from the first era dm-era ran over it, and a
//! question about an earlier era is refused rather than answered wrongly.
//! An arriving volume has dm-era above its dm-clone from presentation on:
//! its history starts then, and every write made on this host while it
//! arrives is tracked (hydration's copies are not writes through dm-era).
//! Transfers recorded before that stack existed keep the clone as their
//! public device, and their volumes' tracking starts when they finish.

pub mod era_metadata;
#[doc(hidden)]
pub mod era_synthetic;
mod steps;

use std::{ops::Range, sync::Arc};

use tracing::{info, warn};

use crate::{
    config::MIB,
    context::Context,
    dm::{names::DeviceName, status::EraStatus},
    error::AgentError,
    ids::{SnapshotId, VolumeId},
    refusal::Refusal,
    store::{ChangeTracking, VolumeRecord},
};

/// dm-era's era array holds 0 for blocks never written, so "since era 0"
/// would name every block. No write ever lands in era 0: fresh
/// metadata starts there and every activation begins a new era before any
/// I/O. So "since 0" is asked as "since 1", which means the same.
const FIRST_WRITABLE_ERA: u32 = 1;

/// Bytes of a volume, from `offset_bytes`, written since the asked-for era.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset_bytes: u64,
    pub length_bytes: u64,
}

/// Extents per streamed message of an answer: 16 bytes each on the wire,
/// so a message stays far below gRPC's 4 MiB limit.
pub const EXTENTS_PER_MESSAGE: usize = 16 * 1024;

/// What a changed-blocks query answers: one bit per era block of the
/// volume, turned into extents only as they are sent, so an answer costs
/// memory in proportion to the volume's size however scattered its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlocks {
    pub since_era: u64,
    /// The era begun as the answer was read: it covers every earlier era,
    /// so asking since this one next time reports exactly what is new.
    pub next_era: u64,
    pub block_bytes: u64,
    pub volume_bytes: u64,
    pub written: era_metadata::WrittenBlocks,
}

impl ChangedBlocks {
    /// The written bytes of the volume, in order.
    pub fn extents(&self) -> Extents<era_metadata::Runs<'_>> {
        extents(self.written.runs(), self.block_bytes, self.volume_bytes)
    }

    /// The written byte ranges that start below `end`, cut there (a
    /// snapshot smaller than the volume now is).
    pub fn ranges_below(&self, end: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        self.extents()
            .map(move |e| e.offset_bytes..(e.offset_bytes + e.length_bytes).min(end))
            .filter(|r| r.start < r.end)
    }

    /// The extents in batches of at most `max_extents`, made as they are
    /// asked for. An answer without extents is one empty batch, so that a
    /// caller always learns the eras.
    pub fn extent_batches(&self, max_extents: usize) -> ExtentBatches<era_metadata::Runs<'_>> {
        ExtentBatches {
            extents: self.extents(),
            max_extents,
            started: false,
        }
    }
}

/// The point a changed-blocks query starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    Era(u64),
    Snapshot(SnapshotId),
}

/// The dm-era device a call works through.
pub(crate) struct EraDevice {
    pub(crate) name: DeviceName,
    /// Activated for this call (the volume is not published).
    pub(crate) probe: bool,
}

impl EraDevice {
    /// A published volume's dm-era: its public device.
    pub(crate) fn public(name: DeviceName) -> Self {
        Self { name, probe: false }
    }
}

/// Checkpoints and changed blocks of tracked volumes.
#[derive(Debug, Clone)]
pub struct Changes {
    ctx: Arc<Context>,
}

impl Changes {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// Marks a point in the volume's history and returns its era: blocks
    /// written after this call are in this era or later.
    pub async fn mark_checkpoint(&self, id: &VolumeId) -> Result<u64, AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "mark a checkpoint").await?;
        let era = self.ctx.era_device(&mut record).await?;
        let result = async {
            if !era.probe {
                // A probe's activation already began a new era.
                self.ctx.dm.message(&era.name, 0, "checkpoint").await?;
            }
            self.ctx.current_era(&era.name).await
        }
        .await;
        self.ctx.release_era_device(era).await;
        let current = public_era(tracking_of(&record)?, result?);
        info!(volume = %id, era = current, "checkpoint");
        Ok(current)
    }

    /// Every extent of the volume written since `since`, at the volume's era
    /// block granularity, read from a metadata snapshot.
    pub async fn changed_blocks(
        &self,
        id: &VolumeId,
        since: &Since,
    ) -> Result<ChangedBlocks, AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "report changed blocks").await?;
        let since_era = self.era_of(id, since).await?;
        let era = self.ctx.era_device(&mut record).await?;
        let result = self
            .read_changes(&record, &era, Asked::Era(since_era))
            .await;
        self.ctx.release_era_device(era).await;
        result
    }

    /// Every extent written since dm-era's own era `since_kernel`, under
    /// whatever history tag: for a caller that knows dm-era saw every write
    /// from there on (a return trip: the volume's history before its export
    /// for the move, see `ExportRecord::history_before`).
    pub(crate) async fn written_since_kernel_era(
        &self,
        id: &VolumeId,
        since_kernel: u32,
    ) -> Result<ChangedBlocks, AgentError> {
        let _held = self.ctx.locks.lock(id.as_str()).await;
        let mut record = self.ctx.ready_record(id, "say what changed").await?;
        let era = self.ctx.era_device_while_exported(&mut record).await?;
        let result = self
            .read_changes(&record, &era, Asked::KernelEra(since_kernel))
            .await;
        self.ctx.release_era_device(era).await;
        result
    }

    /// The era a snapshot began, checked against the history we have.
    async fn era_of(&self, id: &VolumeId, since: &Since) -> Result<u64, AgentError> {
        match since {
            Since::Era(era) => Ok(*era),
            Since::Snapshot(snapshot) => {
                let record = self.ctx.snapshot_record(snapshot).await?.ok_or_else(|| {
                    AgentError::NotFound {
                        what: "snapshot",
                        id: snapshot.to_string(),
                    }
                })?;
                if record.volume_id != id.as_str() {
                    return Err(AgentError::InvalidArgument {
                        field: "snapshot_id",
                        reason: format!(
                            "snapshot {snapshot} is of volume {}, not of {id}",
                            record.volume_id
                        ),
                    });
                }
                record.era.ok_or_else(|| {
                    Refusal::SnapshotNotTracked {
                        snapshot: snapshot.clone(),
                        volume: id.clone(),
                    }
                    .into()
                })
            }
        }
    }

    async fn read_changes(
        &self,
        record: &VolumeRecord,
        era: &EraDevice,
        asked: Asked,
    ) -> Result<ChangedBlocks, AgentError> {
        let id = record.id.clone();
        let tracking = tracking_of(record)?;
        let status: EraStatus = self.ctx.dm.status_of(&era.name, 0).await?;
        let (since_era, since_kernel, known_from) = match asked {
            Asked::Era(era) => (
                era,
                kernel_era(&id, tracking, era)?,
                tracking.known_from_era,
            ),
            Asked::KernelEra(era) => (0, era, Some(era)),
        };
        check_answerable(&id, tracking, since_kernel, status.current_era, known_from)?;
        if status.held_root.is_some() {
            // Left by a call that died half-way; only the agent takes one.
            warn!(volume = %id, "dropping a metadata snapshot left from an interrupted call");
            self.ctx
                .dm
                .message(&era.name, 0, "drop_metadata_snap")
                .await?;
        }
        self.ctx
            .dm
            .message(&era.name, 0, "take_metadata_snap")
            .await?;
        // Taking the metadata snapshot began a new era: the answer covers
        // every era before it, so it is where the caller asks from next.
        let next = self.ctx.current_era(&era.name).await;
        let metadata = self.ctx.naming.era_metadata(&id).mapper_path();
        let asked = since_kernel.max(FIRST_WRITABLE_ERA);
        let volume_blocks = era_blocks(record.size_bytes, tracking.block_bytes);
        let written = crate::context::blocking(move || {
            let mut device =
                era_metadata::DeviceBlocks::open(&metadata).map_err(|source| AgentError::Io {
                    context: format!("cannot open {}", metadata.display()),
                    source,
                })?;
            era_metadata::written_since(&mut device, asked, volume_blocks)
        })
        .await;
        let dropped = self
            .ctx
            .dm
            .message(&era.name, 0, "drop_metadata_snap")
            .await;
        let written = written?;
        dropped?;
        Ok(ChangedBlocks {
            since_era,
            next_era: public_era(tracking, next?),
            block_bytes: tracking.block_bytes,
            volume_bytes: record.size_bytes,
            written,
        })
    }
}

fn tracking_of(record: &VolumeRecord) -> Result<&ChangeTracking, AgentError> {
    match &record.tracking {
        Some(tracking) => Ok(tracking),
        None => Err(Refusal::VolumeNotTracked {
            volume: record.id.clone(),
        }
        .into()),
    }
}

/// Where a changed-blocks question starts.
#[derive(Debug, Clone, Copy)]
enum Asked {
    /// An era as callers write it, within the volume's history.
    Era(u64),
    /// dm-era's own era, from which the asker knows dm-era saw every write.
    KernelEra(u32),
}

/// Refuses a question the history cannot answer.
fn check_answerable(
    id: &VolumeId,
    tracking: &ChangeTracking,
    since_era: u32,
    current_era: u32,
    known_from: Option<u32>,
) -> Result<(), AgentError> {
    if since_era > current_era {
        return Err(AgentError::InvalidArgument {
            field: "era",
            reason: format!(
                "era {} has not begun; volume {id}'s current era is {}",
                shown_era(tracking, since_era),
                public_era(tracking, current_era)
            ),
        });
    }
    match known_from {
        Some(start) if since_era >= start => Ok(()),
        start => Err(Refusal::EraBeforeHistory {
            volume: id.clone(),
            known_from_era: start.map(|s| public_era(tracking, s)),
            since_era: shown_era(tracking, since_era),
        }
        .into()),
    }
}

/// An era as callers see it: the history's tag above dm-era's era.
pub fn public_era(tracking: &ChangeTracking, kernel_era: u32) -> u64 {
    u64::from(tracking.history) << 32 | u64::from(kernel_era)
}

/// An era for a message: 0 as the caller wrote it.
fn shown_era(tracking: &ChangeTracking, kernel_era: u32) -> u64 {
    if kernel_era == 0 {
        0
    } else {
        public_era(tracking, kernel_era)
    }
}

/// dm-era's era for one a caller names; 0 stays 0 ("since the volume was
/// made", answerable only for a volume made empty).
fn kernel_era(id: &VolumeId, tracking: &ChangeTracking, era: u64) -> Result<u32, AgentError> {
    if era == 0 {
        return Ok(0);
    }
    if era >> 32 != u64::from(tracking.history) {
        return Err(Refusal::EraOtherHistory {
            volume: id.clone(),
            era,
        }
        .into());
    }
    Ok(era as u32)
}

/// A fresh history tag from the kernel's random generator: never 0 (era 0
/// is special) and never the tag it replaces.
pub(crate) fn new_history_tag(replacing: Option<u32>) -> u32 {
    loop {
        let tag = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .ok()
            .and_then(|uuid| u32::from_str_radix(uuid.get(..8)?, 16).ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.subsec_nanos() ^ d.as_secs() as u32)
            });
        if tag != 0 && Some(tag) != replacing {
            return tag;
        }
    }
}

/// The content is replaced (a revert): what dm-era saw so far no longer
/// describes it, so a new history starts when dm-era next runs.
pub(crate) fn restart_history(record: &mut VolumeRecord) {
    if let Some(tracking) = record.tracking.as_mut() {
        tracking.history = new_history_tag(Some(tracking.history));
        tracking.known_from_era = None;
        tracking.origin = None;
    }
}

/// Era blocks of a volume: the last one may be partial.
fn era_blocks(volume_bytes: u64, block_bytes: u64) -> u64 {
    // The configuration never allows a zero block; `max` keeps this total.
    volume_bytes.div_ceil(block_bytes.max(1))
}

/// Block ranges as byte extents, the last one cut at the volume's end;
/// blocks past the end are dropped.
pub fn extents<I>(blocks: I, block_bytes: u64, volume_bytes: u64) -> Extents<I>
where
    I: Iterator<Item = Range<u64>>,
{
    Extents {
        blocks,
        block_bytes,
        volume_bytes,
    }
}

/// See [`extents`].
#[derive(Debug, Clone)]
pub struct Extents<I> {
    blocks: I,
    block_bytes: u64,
    volume_bytes: u64,
}

impl<I: Iterator<Item = Range<u64>>> Iterator for Extents<I> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let (block_bytes, volume_bytes) = (self.block_bytes, self.volume_bytes);
        self.blocks.find_map(|range| {
            let start = range.start.saturating_mul(block_bytes);
            let end = range.end.saturating_mul(block_bytes).min(volume_bytes);
            (start < end).then(|| Extent {
                offset_bytes: start,
                length_bytes: end - start,
            })
        })
    }
}

/// See [`ChangedBlocks::extent_batches`].
#[derive(Debug, Clone)]
pub struct ExtentBatches<I> {
    extents: Extents<I>,
    max_extents: usize,
    started: bool,
}

impl<I: Iterator<Item = Range<u64>>> Iterator for ExtentBatches<I> {
    type Item = Vec<Extent>;

    fn next(&mut self) -> Option<Vec<Extent>> {
        let batch: Vec<Extent> = self.extents.by_ref().take(self.max_extents).collect();
        let first = !std::mem::replace(&mut self.started, true);
        (first || !batch.is_empty()).then_some(batch)
    }
}

/// Room for dm-era's metadata of a volume as large as volumes may grow: the
/// era array (4 bytes a block), four writesets' bits, and btree and
/// space-map overhead. A thin device, so only what dm-era writes takes space.
pub fn era_metadata_bytes(max_volume_bytes: u64, block_bytes: u64) -> u64 {
    let blocks = max_volume_bytes.div_ceil(block_bytes);
    let bytes = blocks * 4 + blocks.div_ceil(8) * 4 + 16 * MIB;
    bytes.div_ceil(MIB) * MIB
}

#[cfg(test)]
mod agent_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::ThinId;

    fn tracking(known_from_era: Option<u32>) -> ChangeTracking {
        ChangeTracking {
            history: 7,
            metadata_thin_id: ThinId(2),
            metadata_bytes: 32 * MIB,
            block_bytes: 64 << 10,
            known_from_era,
            origin: None,
        }
    }

    fn written(blocks: u64, set: impl IntoIterator<Item = u64>) -> era_metadata::WrittenBlocks {
        let mut written = era_metadata::WrittenBlocks::new(blocks);
        set.into_iter().for_each(|block| written.set(block));
        written
    }

    fn answer(volume_blocks: u64, set: impl IntoIterator<Item = u64>) -> ChangedBlocks {
        ChangedBlocks {
            since_era: 1,
            next_era: 2,
            block_bytes: 4096,
            volume_bytes: volume_blocks * 4096,
            written: written(volume_blocks, set),
        }
    }

    #[test]
    fn extents_are_bytes_cut_at_the_volume_end() {
        let block = 64 << 10;
        let runs = written(16, [0, 1, 5, 15]);
        let got: Vec<_> = extents(runs.runs(), block, 15 * block + 4096).collect();
        assert_eq!(
            got,
            vec![
                Extent {
                    offset_bytes: 0,
                    length_bytes: 2 * block
                },
                Extent {
                    offset_bytes: 5 * block,
                    length_bytes: block
                },
                Extent {
                    offset_bytes: 15 * block,
                    length_bytes: 4096
                },
            ]
        );
        let past_the_end = written(32, [20, 30, 31]);
        assert_eq!(extents(past_the_end.runs(), block, 15 * block).count(), 0);
    }

    #[test]
    fn extents_come_in_batches_and_an_empty_answer_is_one_empty_batch() {
        let scattered = answer(100, (0..100).step_by(3));
        let batches: Vec<Vec<Extent>> = scattered.extent_batches(16).collect();
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![16, 16, 2]
        );
        assert_eq!(batches.concat(), scattered.extents().collect::<Vec<_>>());
        assert_eq!(batches[2][1].offset_bytes, 99 * 4096);

        let exact = answer(64, (0..64).step_by(2));
        assert_eq!(exact.extent_batches(16).count(), 2);
        let empty: Vec<_> = answer(64, []).extent_batches(16).collect();
        assert_eq!(empty, vec![Vec::<Extent>::new()]);
    }

    #[test]
    fn a_volume_of_a_partial_last_block_has_one_more_era_block() {
        assert_eq!(era_blocks(15 * 65536 + 4096, 65536), 16);
        assert_eq!(era_blocks(16 * 65536, 65536), 16);
        assert_eq!(era_blocks(0, 65536), 0);
    }

    #[test]
    fn questions_before_the_history_or_after_now_are_refused() {
        let id = VolumeId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap();
        assert!(check_answerable(&id, &tracking(Some(0)), 0, 5, Some(0)).is_ok());
        assert!(check_answerable(&id, &tracking(Some(3)), 3, 5, Some(3)).is_ok());
        let early = check_answerable(&id, &tracking(Some(3)), 2, 5, Some(3)).unwrap_err();
        assert!(
            matches!(early, AgentError::Refused(Refusal::EraBeforeHistory { .. })),
            "{early}"
        );
        assert!(
            early
                .to_string()
                .contains(&format!("known from era {}", 7u64 << 32 | 3)),
            "{early}"
        );
        let unknown = check_answerable(&id, &tracking(None), 0, 5, None).unwrap_err();
        assert!(unknown.to_string().contains("not yet started"), "{unknown}");
        let future = check_answerable(&id, &tracking(Some(0)), 6, 5, Some(0)).unwrap_err();
        assert!(
            matches!(future, AgentError::InvalidArgument { field: "era", .. }),
            "{future}"
        );
    }

    #[test]
    fn eras_carry_their_history_and_other_histories_are_refused() {
        let id = VolumeId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap();
        let ours = tracking(Some(1));
        let era = public_era(&ours, 5);
        assert_eq!(era, 7 << 32 | 5);
        assert_eq!(kernel_era(&id, &ours, era).unwrap(), 5);
        assert_eq!(kernel_era(&id, &ours, 0).unwrap(), 0);
        let foreign = kernel_era(&id, &ours, 8 << 32 | 5).unwrap_err();
        assert!(
            matches!(
                foreign,
                AgentError::Refused(Refusal::EraOtherHistory { .. })
            ),
            "{foreign}"
        );
        assert!(foreign.to_string().contains("not from volume"), "{foreign}");
        let bare = kernel_era(&id, &ours, 5).unwrap_err();
        assert!(bare.to_string().contains("not from volume"), "{bare}");
    }

    #[test]
    fn a_new_history_has_a_new_nonzero_tag() {
        for _ in 0..100 {
            let tag = new_history_tag(Some(7));
            assert!(tag != 0 && tag != 7);
        }
        let mut record = crate::records::new_record(
            &VolumeId::parse("0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap(),
            1 << 20,
        );
        record.tracking = Some(tracking(Some(3)));
        restart_history(&mut record);
        let restarted = record.tracking.unwrap();
        assert_ne!(restarted.history, 7);
        assert_eq!(restarted.known_from_era, None);
    }

    #[test]
    fn metadata_room_grows_with_the_largest_volume() {
        let small = era_metadata_bytes(1 << 30, 64 << 10);
        assert_eq!(small, 17 * MIB);
        let largest = era_metadata_bytes(64 << 40, 64 << 10);
        assert_eq!(largest, (4 << 30) + (512 << 20) + 16 * MIB);
        assert_eq!(largest % MIB, 0);
    }
}
