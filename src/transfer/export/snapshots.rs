//! The source's half of snapshots travelling with their volume: a claim's
//! answer lists the volume's snapshots, and the destination, once it holds
//! the volume, asks for each snapshot's content where it differs from
//! something it already holds (the next newer snapshot, or the volume as
//! exported). This host compares the two locally, block by block, and
//! sends only the blocks that differ: only the deltas cross the network.
//! Where the volume's history reaches back to the snapshot, dm-era says
//! which blocks can differ at all, and only those are compared.

use std::{ops::Range, sync::Arc};

use tracing::{debug, info, warn};

use super::{Exports, return_trip::whole_regions};
use crate::{
    changes::Changes,
    context::Context,
    dm::names::DeviceName,
    error::AgentError,
    failpoint,
    ids::{SnapshotId, VolumeId},
    locks::Held,
    nvme::Nqn,
    refusal::Refusal,
    snapshot::Snapshots,
    store::{ArrivedFrom, Pending, SnapshotRecord, VolumeRecord},
    transfer::{
        release::{DeltaAsk, DeltaChunk, DeltaChunks, TravellingSnapshot},
        token::ReleaseToken,
    },
};

/// The most a chunk carries, and what is read at once: a gRPC message stays
/// far below its 4 MiB limit.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;
/// The smallest and largest comparison granularity a destination may ask.
const MIN_BLOCK: u64 = 4096;
const MAX_BLOCK: u64 = CHUNK_BYTES;
/// Past this many ranges a destination asks for `everything` instead.
pub(crate) const MAX_ALSO_RANGES: usize = 128 * 1024;

impl Exports {
    /// The volume's snapshots that may travel, oldest first (by creation,
    /// then by thin id, which the pool hands out in order).
    pub(super) async fn travelling_snapshots(
        &self,
        record: &VolumeRecord,
    ) -> Result<Vec<TravellingSnapshot>, AgentError> {
        let mut snapshots: Vec<SnapshotRecord> = self
            .ctx
            .snapshots_of(Some(&record.id))
            .await?
            .into_iter()
            .filter(|snapshot| snapshot.pending.is_none())
            .collect();
        snapshots.sort_by_key(|s| (s.created_unix, s.thin_id.0));
        Ok(snapshots
            .into_iter()
            .map(|s| TravellingSnapshot {
                id: s.id,
                size_bytes: s.size_bytes,
                created_unix: s.created_unix,
            })
            .collect())
    }

    /// Starts sending what `ask` wants of a snapshot of volume `id`, which
    /// must be exported for a move to `host_nqn` with `token` among its
    /// release tokens. Refusals come at once; the chunks follow on the
    /// receiver, and stop when it is dropped.
    pub async fn read_snapshot_delta(
        &self,
        id: &VolumeId,
        host_nqn: &str,
        token: Option<&ReleaseToken>,
        ask: DeltaAsk,
    ) -> Result<DeltaChunks, AgentError> {
        let host = Nqn::parse("host_nqn", host_nqn)?;
        check_block(ask.block_bytes)?;
        let (record, snapshot, against) = {
            let _held = self.ctx.locks.lock(id.as_str()).await;
            let record = self
                .exported_for_move_to(id, &host, token, "reading a snapshot")
                .await?;
            let snapshot = self.snapshot_of(id, &ask.snapshot, "snapshot_id").await?;
            let against = match &ask.against {
                Some(other) => Some(self.snapshot_of(id, other, "against_snapshot_id").await?),
                None => None,
            };
            (record, snapshot, against)
        };
        check_also(&ask.also, snapshot.size_bytes)?;
        let candidates = self
            .candidates(&record, &snapshot, against.as_ref(), &ask)
            .await;
        // One reader of a snapshot at a time: a destination that asks again
        // (its stream was cut) waits for the old reader to notice.
        let keys: Vec<String> = [Some(&snapshot), against.as_ref()]
            .into_iter()
            .flatten()
            .map(|s| read_lock_key(&s.id))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let held = self.ctx.locks.lock_all(&keys).await;
        let reading =
            SnapshotReading::activate(&self.ctx, &record, &snapshot, against.as_ref()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let plan = Plan::new(candidates, ask.also, ask.everything, ask.block_bytes);
        info!(volume = %id, snapshot = %snapshot.id, against = ?against.as_ref().map(|s| &s.id), candidate_bytes = plan.bytes(), "sending a snapshot's delta to the volume's new host");
        tokio::spawn(reading.send(plan, tx, held));
        Ok(rx)
    }

    /// Deletes the volume's snapshots in `moved`, which arrived on the
    /// move's destination; returns how many of its snapshots stay here.
    /// Callers hold the volume's lock.
    pub(super) async fn drop_moved_snapshots(
        &self,
        id: &VolumeId,
        moved: &[SnapshotId],
    ) -> Result<usize, AgentError> {
        let snapshots = Snapshots::new(Arc::clone(&self.ctx));
        let mut staying = 0;
        for record in self.ctx.snapshots_of(Some(id)).await? {
            if moved.contains(&record.id) {
                let snapshot = record.id.clone();
                snapshots.delete_locked(record).await?;
                info!(volume = %id, %snapshot, "the snapshot arrived with its volume on the new host: deleted here");
            } else {
                staying += 1;
            }
        }
        Ok(staying)
    }

    /// A volume that has arrived moves on only once its snapshots have
    /// too: they are made here from the volume and the source's copies.
    pub(super) async fn refuse_while_snapshots_arrive(
        &self,
        id: &VolumeId,
    ) -> Result<(), AgentError> {
        let arriving = self
            .ctx
            .snapshots_of(Some(id))
            .await?
            .into_iter()
            .find(|s| matches!(s.pending, Some(Pending::Arrive { .. })));
        match arriving {
            Some(snapshot) => Err(Refusal::SnapshotPending {
                snapshot: snapshot.id,
            }
            .into()),
            None => Ok(()),
        }
    }

    async fn snapshot_of(
        &self,
        volume: &VolumeId,
        snapshot: &SnapshotId,
        field: &'static str,
    ) -> Result<SnapshotRecord, AgentError> {
        let record = self
            .ctx
            .snapshot_record(snapshot)
            .await?
            .filter(|s| s.pending.is_none())
            .ok_or_else(|| AgentError::NotFound {
                what: "snapshot",
                id: snapshot.to_string(),
            })?;
        if record.volume_id != volume.as_str() {
            return Err(AgentError::InvalidArgument {
                field,
                reason: format!(
                    "snapshot {snapshot} is of volume {}, not of {volume}",
                    record.volume_id
                ),
            });
        }
        Ok(record)
    }

    /// Where the snapshot may differ from what the destination holds (the
    /// volume as exported, or `against`): where either differs from the
    /// volume, when the history the export ended goes back to both; else
    /// everywhere.
    async fn candidates(
        &self,
        record: &VolumeRecord,
        snapshot: &SnapshotRecord,
        against: Option<&SnapshotRecord>,
        ask: &DeltaAsk,
    ) -> Vec<Range<u64>> {
        let everywhere = std::iter::once(0..snapshot.size_bytes).collect();
        if ask.everything {
            return everywhere;
        }
        let ended = record.export.as_ref().and_then(|e| e.ended_history);
        let Some(known) = known_differences(snapshot, against, ended) else {
            debug!(snapshot = %snapshot.id, "no history back to the snapshot: every block is compared");
            return everywhere;
        };
        match Changes::new(Arc::clone(&self.ctx))
            .written_since_kernel_era(&record.id, known.era as u32)
            .await
        {
            Ok(changes) => changes
                .ranges_below(snapshot.size_bytes)
                .chain(known.differs)
                .map(|r| r.start..r.end.min(snapshot.size_bytes))
                .filter(|r| r.start < r.end)
                .collect(),
            Err(err) => {
                warn!(snapshot = %snapshot.id, error = %err, "cannot read what changed since the snapshot: every block is compared");
                everywhere
            }
        }
    }
}

/// Where `snapshot` and `against` may differ from the volume (and so from
/// each other), when the history the export `ended` reaches back to both:
/// what the volume had written to it since the older era, and the ranges
/// either was written at.
fn known_differences(
    snapshot: &SnapshotRecord,
    against: Option<&SnapshotRecord>,
    ended: Option<u32>,
) -> Option<ArrivedFrom> {
    let mut known: Option<ArrivedFrom> = None;
    for one in std::iter::once(snapshot).chain(against) {
        let mine = differences_from_volume(one).filter(|k| ended == Some((k.era >> 32) as u32))?;
        known = Some(match known {
            None => mine,
            Some(other) => ArrivedFrom {
                era: other.era.min(mine.era),
                differs: other.differs.into_iter().chain(mine.differs).collect(),
            },
        });
    }
    known
}

/// A snapshot taken here differs from its volume where the volume was
/// written since its era; one made here by travel, as its record says.
fn differences_from_volume(snapshot: &SnapshotRecord) -> Option<ArrivedFrom> {
    match (&snapshot.era, &snapshot.arrived_from) {
        (Some(era), _) => Some(ArrivedFrom {
            era: *era,
            differs: Vec::new(),
        }),
        (None, arrived) => arrived.clone(),
    }
}

fn read_lock_key(snapshot: &SnapshotId) -> String {
    format!("read-{snapshot}")
}

fn check_block(block_bytes: u64) -> Result<(), AgentError> {
    if block_bytes.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&block_bytes) {
        return Ok(());
    }
    Err(AgentError::InvalidArgument {
        field: "block_bytes",
        reason: format!(
            "{block_bytes} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK} bytes"
        ),
    })
}

fn check_also(also: &[Range<u64>], size_bytes: u64) -> Result<(), AgentError> {
    if also.len() > MAX_ALSO_RANGES {
        return Err(AgentError::InvalidArgument {
            field: "also",
            reason: format!(
                "{} ranges (at most {MAX_ALSO_RANGES}; ask for everything instead)",
                also.len()
            ),
        });
    }
    let mut end = 0;
    for range in also {
        if range.start < end || range.start >= range.end || range.end > size_bytes {
            return Err(AgentError::InvalidArgument {
                field: "also",
                reason: format!(
                    "{}..{} is empty, out of order or past the snapshot's {size_bytes} bytes",
                    range.start, range.end
                ),
            });
        }
        end = range.end;
    }
    Ok(())
}

/// What to send: blocks of `ranges` that differ, and blocks in `also` (or
/// every block) whatever they hold.
struct Plan {
    /// Every range to read: the candidates and `also`, in whole blocks,
    /// merged, in order.
    ranges: Vec<Range<u64>>,
    also: Vec<Range<u64>>,
    everything: bool,
    block_bytes: u64,
}

impl Plan {
    fn new(
        candidates: Vec<Range<u64>>,
        also: Vec<Range<u64>>,
        everything: bool,
        block_bytes: u64,
    ) -> Self {
        let mut all: Vec<Range<u64>> = candidates.into_iter().chain(also.iter().cloned()).collect();
        all.sort_by_key(|r| r.start);
        Self {
            ranges: whole_regions(all.into_iter(), block_bytes),
            also,
            everything,
            block_bytes,
        }
    }

    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether the block at `offset` goes whatever it holds.
    fn always(&self, offset: u64) -> bool {
        // `also` is in order and does not overlap: the first range ending
        // past the block's start is the only one that can meet it.
        let first = self.also.partition_point(|r| r.end <= offset);
        self.everything
            || self
                .also
                .get(first)
                .is_some_and(|r| r.start < offset + self.block_bytes)
    }
}

/// The snapshot, and what it is compared with, activated for reading.
struct SnapshotReading {
    ctx: Arc<Context>,
    snapshot: DeviceName,
    size_bytes: u64,
    /// `None`: the volume's own thin device, which the export keeps active.
    against: Option<DeviceName>,
    volume_thin: DeviceName,
}

impl SnapshotReading {
    async fn activate(
        ctx: &Arc<Context>,
        volume: &VolumeRecord,
        snapshot: &SnapshotRecord,
        against: Option<&SnapshotRecord>,
    ) -> Result<Self, AgentError> {
        let activate = async |record: &SnapshotRecord| {
            let name = ctx.naming.snapshot_read(&record.id);
            ctx.remove_device_if_present(&name).await?;
            let table = ctx.pool.thin_table(record.thin_id, record.size_bytes)?;
            ctx.dm.create(&name, None, &table).await?;
            Ok::<_, AgentError>(name)
        };
        let snapshot_device = activate(snapshot).await?;
        let against_device = match against {
            Some(record) => match activate(record).await {
                Ok(name) => Some(name),
                Err(err) => {
                    let _ = ctx.remove_device_if_present(&snapshot_device).await;
                    return Err(err);
                }
            },
            None => None,
        };
        Ok(Self {
            ctx: Arc::clone(ctx),
            snapshot: snapshot_device,
            size_bytes: snapshot.size_bytes,
            against: against_device,
            volume_thin: ctx.thin_name(volume),
        })
    }

    /// Sends the plan's blocks until done, failed, or nobody listens; then
    /// deactivates what it activated.
    async fn send(
        self,
        plan: Plan,
        tx: tokio::sync::mpsc::Sender<Result<DeltaChunk, AgentError>>,
        _held: Vec<Held>,
    ) {
        let outcome = self.send_blocks(&plan, &tx).await;
        match outcome {
            Ok(sent) => {
                info!(snapshot = %self.snapshot, sent_bytes = sent, "a snapshot's delta was sent")
            }
            Err(err) => {
                warn!(snapshot = %self.snapshot, error = %err, "sending a snapshot's delta stopped");
                let _ = tx.send(Err(err)).await;
            }
        }
        for name in [Some(&self.snapshot), self.against.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(err) = self.ctx.remove_device_if_present(name).await {
                warn!(device = %name, error = %err, "cannot deactivate a snapshot after reading it; the next start does");
            }
        }
    }

    async fn send_blocks(
        &self,
        plan: &Plan,
        tx: &tokio::sync::mpsc::Sender<Result<DeltaChunk, AgentError>>,
    ) -> Result<u64, AgentError> {
        let against = self.against.as_ref().unwrap_or(&self.volume_thin);
        let mut sent = 0;
        for range in &plan.ranges {
            let mut offset = range.start;
            while offset < range.end.min(self.size_bytes) {
                let length = (range.end.min(self.size_bytes) - offset).min(CHUNK_BYTES);
                let mine = self
                    .ctx
                    .dm
                    .read_at(&self.snapshot, offset, length as usize)
                    .await?;
                let theirs = if plan.everything {
                    Vec::new()
                } else {
                    self.ctx
                        .dm
                        .read_at(against, offset, length as usize)
                        .await?
                };
                for chunk in differing(plan, offset, &mine, &theirs) {
                    sent += chunk.data.len() as u64;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Err(AgentError::Unavailable {
                            reason: "the destination stopped reading".into(),
                        });
                    }
                    failpoint::hit("travel.after_send");
                }
                offset += length;
            }
        }
        Ok(sent)
    }
}

/// The runs of blocks of `mine` (read at `offset`) to send: those that
/// differ from `theirs` (same span; empty: compare nothing) or that the
/// plan sends whatever they hold.
fn differing(plan: &Plan, offset: u64, mine: &[u8], theirs: &[u8]) -> Vec<DeltaChunk> {
    let block = plan.block_bytes as usize;
    let mut chunks: Vec<DeltaChunk> = Vec::new();
    for (index, bytes) in mine.chunks(block).enumerate() {
        let at = offset + (index * block) as u64;
        let send = plan.always(at)
            || theirs
                .get(index * block..index * block + bytes.len())
                .is_none_or(|other| other != bytes);
        if !send {
            continue;
        }
        match chunks.last_mut() {
            Some(last) if last.offset + last.data.len() as u64 == at => {
                last.data.extend_from_slice(bytes)
            }
            _ => chunks.push(DeltaChunk {
                offset: at,
                data: bytes.to_vec(),
            }),
        }
    }
    chunks
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const HISTORY: u64 = 7 << 32;

    fn snapshot(era: Option<u64>, arrived_from: Option<(u64, Vec<Range<u64>>)>) -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId::parse("10000000-0000-4000-8000-000000000001").expect("an id"),
            volume_id: VolumeId::parse("00000000-0000-4000-8000-000000000001").expect("an id"),
            thin_id: crate::ids::ThinId(3),
            size_bytes: 1 << 20,
            created_unix: 0,
            pending: None,
            era,
            arrived_from: arrived_from.map(|(era, differs)| ArrivedFrom { era, differs }),
        }
    }

    #[test]
    fn a_snapshot_taken_here_differs_where_the_volume_was_written_since() {
        let taken = snapshot(Some(HISTORY | 5), None);
        assert_eq!(
            known_differences(&taken, None, Some(7)),
            Some(ArrivedFrom {
                era: HISTORY | 5,
                differs: vec![]
            })
        );
        assert_eq!(known_differences(&taken, None, Some(8)), None);
        assert_eq!(known_differences(&taken, None, None), None);
    }

    #[test]
    fn a_snapshot_that_arrived_also_differs_where_it_was_written() {
        let arrived = snapshot(None, Some((HISTORY | 3, vec![0..4096])));
        let newer = snapshot(None, Some((HISTORY | 3, vec![8192..12288])));
        let taken = snapshot(Some(HISTORY | 9), None);
        assert_eq!(
            known_differences(&arrived, Some(&newer), Some(7)),
            Some(ArrivedFrom {
                era: HISTORY | 3,
                differs: vec![0..4096, 8192..12288]
            })
        );
        // Against a snapshot taken later: from the older era of the two.
        assert_eq!(
            known_differences(&arrived, Some(&taken), Some(7)),
            Some(ArrivedFrom {
                era: HISTORY | 3,
                differs: vec![0..4096]
            })
        );
        // Either one unbounded, or from another history: everywhere.
        let unknown = snapshot(None, None);
        assert_eq!(known_differences(&arrived, Some(&unknown), Some(7)), None);
        assert_eq!(known_differences(&unknown, Some(&taken), Some(7)), None);
        let elsewhere = snapshot(None, Some(((8 << 32) | 3, vec![])));
        assert_eq!(known_differences(&taken, Some(&elsewhere), Some(7)), None);
    }

    fn plan(also: Vec<Range<u64>>, everything: bool) -> Plan {
        Plan::new(vec![0..16], also, everything, 4)
    }

    #[test]
    fn only_differing_blocks_go_merged_into_runs() {
        let mine = b"aaaabbbbccccdddd";
        let theirs = b"aaaaXbbbXcccdddd";
        let chunks = differing(&plan(vec![], false), 100, mine, theirs);
        assert_eq!(
            chunks,
            vec![DeltaChunk {
                offset: 104,
                data: b"bbbbcccc".to_vec()
            }]
        );
        assert!(differing(&plan(vec![], false), 0, mine, mine).is_empty());
    }

    #[test]
    fn blocks_asked_for_go_even_when_equal() {
        let mine = b"aaaabbbbccccdddd";
        let chunks = differing(&plan(vec![12..13], false), 0, mine, mine);
        assert_eq!(
            chunks,
            vec![DeltaChunk {
                offset: 12,
                data: b"dddd".to_vec()
            }]
        );
        let all = differing(&plan(vec![], true), 0, mine, &[]);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].data, mine.to_vec());
    }

    #[test]
    fn the_plan_reads_candidates_and_extras_in_whole_blocks() {
        let plan = Plan::new(vec![1..2, 30..33], vec![9..10], false, 8);
        assert_eq!(plan.ranges, vec![0..16, 24..40]);
        assert_eq!(plan.bytes(), 32);
    }

    #[test]
    fn odd_blocks_and_unordered_extras_are_refused() {
        assert!(check_block(4096).is_ok());
        assert!(check_block(1 << 20).is_ok());
        for bad in [0, 512, 6144, 2 << 20] {
            assert!(check_block(bad).is_err(), "{bad}");
        }
        assert!(check_also(&[0..4096, 8192..12288], 1 << 20).is_ok());
        assert!(check_also(&[8192..12288, 0..4096], 1 << 20).is_err());
        assert!(check_also(&[0..0], 1 << 20).is_err());
        assert!(check_also(&[0..(2 << 20)], 1 << 20).is_err());
    }
}
