//! Snapshots travelling with their volume, on the destination. The
//! source lists the volume's snapshots when it answers the claim; each gets
//! a record here at once (arriving: listed, not usable). Once the volume has
//! arrived, they come newest first, each made as a thin snapshot of what
//! is here already, so they share blocks as they did on the source:
//!
//! - the newest from the volume itself, then made equal to the snapshot:
//!   the source sends the blocks where the snapshot differs from the
//!   volume as it was exported, and those this host wrote since it
//!   presented the volume (its own dm-era says which);
//! - each older one from the next newer one that arrived, and the source
//!   sends the blocks where the two differ.
//!
//! A block is written only where it differs from what the new snapshot
//! holds already, so unchanged blocks stay shared. The source's copies are
//! released once every snapshot arrived; a step cut short (a crash, a lost
//! connection) starts that snapshot afresh.

use std::{ops::Range, sync::Arc, time::Duration};

use tracing::{error, info, warn};

use super::{
    Transfers,
    export::{snapshots::MAX_ALSO_RANGES, whole_regions},
    release::{DeltaAsk, DeltaRequest, SourceAnswer, TravellingSnapshot},
};
use crate::{
    changes::Changes,
    dm::names::DeviceName,
    error::{AgentError, ErrorKind},
    failpoint,
    ids::{SnapshotId, ThinId, TransferId},
    snapshot::Snapshots,
    store::{ArrivedFrom, Change, Pending, SnapshotRecord, TransferRecord},
};

/// Travel retries back off up to this.
const TRAVEL_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A source that is down or failed asks for another try; one that refuses
/// or does not know the volume answers the same again.
fn worth_asking_again(err: &AgentError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Unavailable
            | ErrorKind::Busy
            | ErrorKind::ResourceExhausted
            | ErrorKind::Internal
    )
}

/// Past this many ranges a snapshot made here by travel no longer keeps
/// where it differs from its volume (a move on compares it everywhere).
const MAX_DIFFERS_RANGES: usize = 4096;

/// What a snapshot is made from here, and what the source is asked for.
struct Base {
    ask: DeltaAsk,
    /// How the base was found, for the log.
    from: String,
    /// Where the base may differ from the volume, when that is known.
    differs_from_volume: Option<ArrivedFrom>,
}

/// A snapshot filled in: the bytes the source sent, and where the
/// snapshot now differs from the base it was made from (`None` past
/// [`MAX_DIFFERS_RANGES`] ranges).
struct Filled {
    received: u64,
    written: Option<Vec<Range<u64>>>,
}

impl Transfers {
    /// After the source answered the claim: records the snapshots it
    /// offers as arriving, unless the caller leaves them there, they are
    /// recorded already, or the pool has no room for them (then they stay
    /// on the source, which keeps its copy while they do). An answer that
    /// comes after the volume arrived is left to [`Self::after_arrival`],
    /// which may have released the source already. Callers hold the
    /// volume's lock and store `transfer` afterwards.
    pub(super) async fn plan_snapshots(
        &self,
        transfer: &mut TransferRecord,
        answer: &SourceAnswer,
    ) -> Result<(), AgentError> {
        if transfer.phase.is_finished() {
            return Ok(());
        }
        self.plan_offered(transfer, answer).await
    }

    async fn plan_offered(
        &self,
        transfer: &mut TransferRecord,
        answer: &SourceAnswer,
    ) -> Result<(), AgentError> {
        if transfer.snapshots_listed || transfer.leave_snapshots || !transfer.snapshots.is_empty() {
            return Ok(());
        }
        transfer.snapshots_listed = true;
        let mut offered: Vec<&TravellingSnapshot> = Vec::new();
        for snapshot in &answer.snapshots {
            // A size this agent would not make a volume of is not believed.
            let size_ok = self
                .ctx
                .volume_size("size_bytes", snapshot.size_bytes)
                .is_ok_and(|size| size == snapshot.size_bytes);
            if !size_ok {
                warn!(transfer = %transfer.id, snapshot = %snapshot.id, size = snapshot.size_bytes, "the source offers a snapshot of a size this host does not make: it stays on the source");
            } else if self.ctx.snapshot_record(&snapshot.id).await?.is_some() {
                warn!(transfer = %transfer.id, snapshot = %snapshot.id, "a snapshot with this id is here already: it stays on the source");
            } else {
                offered.push(snapshot);
            }
        }
        if offered.is_empty() {
            return Ok(());
        }
        let bytes = offered
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.size_bytes));
        if let Err(err) = self.ctx.check_room_for(bytes).await {
            warn!(transfer = %transfer.id, error = %err, "no room promised for the volume's snapshots: they stay on the source");
            transfer.leave_snapshots = true;
            return Ok(());
        }
        let records: Vec<SnapshotRecord> = offered
            .iter()
            .map(|s| SnapshotRecord {
                id: s.id.clone(),
                volume_id: transfer.volume_id.clone(),
                thin_id: ThinId(0),
                size_bytes: s.size_bytes,
                created_unix: s.created_unix,
                pending: Some(Pending::Arrive {
                    transfer: transfer.id.clone(),
                }),
                era: None,
                arrived_from: None,
            })
            .collect();
        transfer.snapshots = records.iter().map(|r| r.id.clone()).collect();
        let planned = transfer.clone();
        let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
        self.ctx
            .store_call(move |store| {
                store.allocate_and_commit(count, |ids| {
                    let mut changes = Vec::with_capacity(records.len() + 1);
                    for (record, thin_id) in records.into_iter().zip(ids) {
                        changes.push(Change::insert(&SnapshotRecord {
                            thin_id: *thin_id,
                            ..record
                        })?);
                    }
                    changes.push(Change::put(&planned)?);
                    Ok(changes)
                })
            })
            .await?;
        info!(transfer = %transfer.id, snapshots = transfer.snapshots.len(), bytes, "the volume's snapshots follow it once it has arrived");
        Ok(())
    }

    /// Once the volume has arrived: its snapshots travel, then the source
    /// is released; with none arriving, the source is released at once.
    /// When the volume arrived before the source's answer to the claim, the
    /// source is asked for its snapshots first.
    pub(crate) async fn after_arrival(&self, transfer: &TransferRecord) {
        if transfer.snapshots_unlisted() {
            self.spawn_listing(transfer);
        } else {
            self.bring_or_release(transfer).await;
        }
    }

    async fn bring_or_release(&self, transfer: &TransferRecord) {
        match self.arriving(transfer).await {
            Ok(arriving) if !arriving.is_empty() => self.spawn_travel(transfer),
            Ok(_) => self.spawn_release(transfer),
            Err(err) => {
                warn!(transfer = %transfer.id, error = %err, "cannot tell whether snapshots travel; the next start does");
            }
        }
    }

    /// Asks the source for the volume's snapshots (its claim answer) until
    /// it answers, plans them, then brings them or releases the source. A
    /// source that refuses (no export, no token) keeps them: it is released
    /// as before, and keeps its copy while they stay.
    fn spawn_listing(&self, transfer: &TransferRecord) {
        let transfers = self.clone();
        let transfer = transfer.clone();
        self.ctx.background.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            let answer = loop {
                match transfers.claim_asking(&transfer, None).await {
                    Ok(answer) => break Some(answer),
                    Err(err) if worth_asking_again(&err) => {
                        warn!(transfer = %transfer.id, error = %err, retry_in = ?backoff, "the source did not list the volume's snapshots yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(TRAVEL_BACKOFF_MAX);
                    }
                    Err(err) => {
                        warn!(transfer = %transfer.id, error = %err, "the source does not list the volume's snapshots: they stay there");
                        break None;
                    }
                }
            };
            match transfers.record_listing(&transfer.id, answer).await {
                Ok(listed) => transfers.bring_or_release(&listed).await,
                Err(err) => {
                    warn!(transfer = %transfer.id, error = %err, "cannot record the source's snapshots; the next start asks again");
                }
            }
        });
    }

    async fn record_listing(
        &self,
        id: &TransferId,
        answer: Option<SourceAnswer>,
    ) -> Result<TransferRecord, AgentError> {
        let (mut transfer, _held) = self.ctx.locked_transfer(id).await?;
        if transfer.snapshots_unlisted() {
            match &answer {
                Some(answer) => {
                    if let Some((endpoint, _)) = transfer.source_agent() {
                        let endpoint = endpoint.to_owned();
                        self.note_claim_answer(&mut transfer, answer, &endpoint)
                            .await?;
                    }
                    self.plan_offered(&mut transfer, answer).await?;
                }
                None => transfer.snapshots_listed = true,
            }
            self.ctx.put_transfer(&transfer).await?;
        }
        Ok(transfer)
    }

    /// The transfer's snapshots still arriving, newest first.
    async fn arriving(&self, transfer: &TransferRecord) -> Result<Vec<SnapshotRecord>, AgentError> {
        let mut arriving = Vec::new();
        for id in transfer.snapshots.iter().rev() {
            if let Some(record) = self.ctx.snapshot_record(id).await?
                && record.pending
                    == Some(Pending::Arrive {
                        transfer: transfer.id.clone(),
                    })
            {
                arriving.push(record);
            }
        }
        Ok(arriving)
    }

    fn spawn_travel(&self, transfer: &TransferRecord) {
        let transfers = self.clone();
        let id = transfer.id.clone();
        self.ctx.background.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                match transfers.bring_snapshots(&id).await {
                    Ok(()) => break,
                    Err(err @ AgentError::PermissionDenied { .. }) => {
                        error!(transfer = %id, error = %err, "the source refused to send the volume's snapshots; they stay arriving here and on the source until an operator acts");
                        return;
                    }
                    Err(err) => {
                        warn!(transfer = %id, error = %err, retry_in = ?backoff, "a snapshot could not be brought yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(TRAVEL_BACKOFF_MAX);
                    }
                }
            }
            match transfers.ctx.transfer_record(&id).await {
                Ok(Some(record)) => transfers.spawn_release(&record),
                Ok(None) => {}
                Err(err) => warn!(transfer = %id, error = %err, "cannot read the transfer to release its source; the next start does"),
            }
        });
    }

    /// Brings every snapshot still arriving, newest first.
    async fn bring_snapshots(&self, id: &TransferId) -> Result<(), AgentError> {
        loop {
            let Some(transfer) = self.ctx.transfer_record(id).await? else {
                return Ok(());
            };
            let Some(snapshot) = self.arriving(&transfer).await?.into_iter().next() else {
                return Ok(());
            };
            let brought = match self.bring(&transfer, &snapshot).await {
                Ok(brought) => Some(brought),
                Err(err @ AgentError::NotFound { .. }) => {
                    warn!(transfer = %id, snapshot = %snapshot.id, error = %err, "the snapshot is gone from the source: dropped here too");
                    None
                }
                Err(err) => return Err(err),
            };
            self.settle_arrival(id, snapshot, brought).await?;
        }
    }

    /// Makes one snapshot here and fills in what differs; returns the bytes
    /// received and where the snapshot may differ from the volume.
    async fn bring(
        &self,
        transfer: &TransferRecord,
        snapshot: &SnapshotRecord,
    ) -> Result<Brought, AgentError> {
        let base = self.make_from_base(transfer, snapshot).await?;
        info!(transfer = %transfer.id, snapshot = %snapshot.id, from = %base.from, everything = base.ask.everything, also = base.ask.also.len(), "bringing a snapshot");
        let device = self.ctx.snapshot_name(snapshot);
        let table = self
            .ctx
            .pool
            .thin_table(snapshot.thin_id, snapshot.size_bytes)?;
        self.ctx.dm.create(&device, None, &table).await?;
        let filled = self.fill(transfer, snapshot, &device, base.ask).await;
        if let Err(err) = self.ctx.remove_device_if_present(&device).await {
            warn!(snapshot = %snapshot.id, error = %err, "cannot deactivate an arriving snapshot; the next start does");
        }
        let filled = filled?;
        Ok(Brought {
            bytes: filled.received,
            arrived_from: base
                .differs_from_volume
                .zip(filled.written)
                .and_then(|(base, written)| differing_further(base, written)),
        })
    }

    /// The snapshot's thin device, made afresh from the nearest newer
    /// snapshot that arrived, else from the volume; and what to ask.
    async fn make_from_base(
        &self,
        transfer: &TransferRecord,
        snapshot: &SnapshotRecord,
    ) -> Result<Base, AgentError> {
        let newer = self.newest_arrived_after(transfer, &snapshot.id).await?;
        let held = self.ctx.locks.lock(&transfer.volume_id).await;
        self.unmake(snapshot).await?;
        let block_bytes = self.ctx.pool.layout.block_bytes.clamp(4096, 1 << 20);
        if let Some(newer) = newer {
            self.ctx
                .remove_device_if_present(&self.ctx.snapshot_name(&newer))
                .await?;
            self.ctx
                .pool
                .snapshot(snapshot.thin_id, newer.thin_id, &[])
                .await?;
            return Ok(Base {
                differs_from_volume: newer.arrived_from.clone(),
                ask: DeltaAsk {
                    snapshot: snapshot.id.clone(),
                    against: Some(newer.id.clone()),
                    block_bytes,
                    also: Vec::new(),
                    everything: false,
                },
                from: format!("snapshot {}", newer.id),
            });
        }
        let mut volume = self
            .ctx
            .ready_record(&transfer.volume_id, "give its snapshots a base")
            .await?;
        let era = Snapshots::new(Arc::clone(&self.ctx))
            .snapshot_volume_into(&mut volume, snapshot.thin_id)
            .await?;
        drop(held);
        let written = self.written_here(transfer, snapshot.size_bytes).await;
        let from = match &written {
            Ok(ranges) => format!("the volume, {} ranges written here", ranges.len()),
            Err(why) => format!("the volume, every block compared: {why}"),
        };
        Ok(Base {
            differs_from_volume: era.map(|era| ArrivedFrom {
                era,
                differs: Vec::new(),
            }),
            ask: DeltaAsk {
                snapshot: snapshot.id.clone(),
                against: None,
                block_bytes,
                everything: written.is_err(),
                also: written.unwrap_or_default(),
            },
            from,
        })
    }

    /// The nearest snapshot newer than `id` among the transfer's that has
    /// arrived and is still here.
    async fn newest_arrived_after(
        &self,
        transfer: &TransferRecord,
        id: &SnapshotId,
    ) -> Result<Option<SnapshotRecord>, AgentError> {
        let position = transfer.snapshots.iter().position(|s| s == id);
        let newer = position.map_or(&[][..], |p| &transfer.snapshots[p + 1..]);
        for candidate in newer {
            if let Some(record) = self.ctx.snapshot_record(candidate).await?
                && record.pending.is_none()
            {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// Where this host wrote the volume since presenting it, when its
    /// history says so (it began with the claim of this transfer's source
    /// and dm-era sat above the clone from the start); else why not.
    async fn written_here(
        &self,
        transfer: &TransferRecord,
        size_bytes: u64,
    ) -> Result<Vec<Range<u64>>, String> {
        let volume = self
            .ctx
            .record(&transfer.volume_id)
            .await
            .map_err(|err| err.to_string())?
            .ok_or("the volume is gone")?;
        let tracking = volume
            .tracking
            .as_ref()
            .ok_or("this host tracks no changes of the volume")?;
        // Transfers recorded before `arrival_history` prove it by the
        // origin their claim's answer recorded.
        let began_here = transfer.history_began_with(tracking)
            || (transfer.era_above
                && transfer.arrival_history.is_none()
                && tracking.origin.is_some()
                && tracking.origin.as_ref().map(|o| &o.node_id)
                    == transfer.upstream.as_ref().and_then(|u| u.first()));
        let from = tracking
            .known_from_era
            .filter(|_| began_here)
            .ok_or("the volume's history here does not begin with its arrival")?;
        let changes = Changes::new(Arc::clone(&self.ctx))
            .written_since_kernel_era(&transfer.volume_id, from)
            .await
            .map_err(|err| format!("cannot read what changed here: {err}"))?;
        let ranges: Vec<Range<u64>> = changes.ranges_below(size_bytes).collect();
        if ranges.len() > MAX_ALSO_RANGES {
            return Err(format!(
                "{} ranges written here: too many to list",
                ranges.len()
            ));
        }
        Ok(ranges)
    }

    /// Writes what the source sends into the snapshot's device, where it
    /// differs.
    async fn fill(
        &self,
        transfer: &TransferRecord,
        snapshot: &SnapshotRecord,
        device: &DeviceName,
        ask: DeltaAsk,
    ) -> Result<Filled, AgentError> {
        let (endpoint, token) = transfer.source_agent().ok_or_else(|| {
            AgentError::Internal(format!("transfer {} has no source agent", transfer.id))
        })?;
        let block_bytes = ask.block_bytes;
        let request = DeltaRequest {
            source: self.source_agent_at(endpoint)?,
            volume_id: transfer.volume_id.to_string(),
            host_nqn: self.ctx.nvme.host_nqn.to_string(),
            token: Some(token.clone()),
            ask,
        };
        let mut chunks = self.ctx.source_releaser.snapshot_delta(&request).await?;
        let (mut received, mut written_bytes) = (0u64, 0u64);
        let mut written: Option<Vec<Range<u64>>> = Some(Vec::new());
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk?;
            check_chunk(
                chunk.offset,
                chunk.data.len(),
                block_bytes,
                snapshot.size_bytes,
            )?;
            received += chunk.data.len() as u64;
            let here = self
                .ctx
                .dm
                .read_at(device, chunk.offset, chunk.data.len())
                .await?;
            for (offset, data) in runs_differing(chunk.offset, &chunk.data, &here, block_bytes) {
                written_bytes += data.len() as u64;
                written = written
                    .map(|mut ranges| {
                        ranges.push(offset..offset + data.len() as u64);
                        ranges
                    })
                    .filter(|ranges| ranges.len() <= MAX_DIFFERS_RANGES);
                self.ctx.dm.write_at(device, offset, data).await?;
                failpoint::hit("travel.after_write");
            }
        }
        self.ctx.dm.flush(device).await?;
        info!(snapshot = %snapshot.id, received, written = written_bytes, "snapshot arrived");
        Ok(Filled { received, written })
    }

    /// Records a snapshot as arrived (usable), or drops it when the source
    /// no longer has it (`brought` is `None`).
    async fn settle_arrival(
        &self,
        id: &TransferId,
        mut snapshot: SnapshotRecord,
        brought: Option<Brought>,
    ) -> Result<(), AgentError> {
        if brought.is_none() {
            self.unmake(&snapshot).await?;
        }
        let (mut transfer, _held) = self.ctx.locked_transfer(id).await?;
        if brought.is_some() && !transfer.snapshots_arrived.contains(&snapshot.id) {
            transfer.snapshots_arrived.push(snapshot.id.clone());
        }
        transfer.snapshot_bytes += brought.as_ref().map_or(0, |b| b.bytes);
        let change = match brought {
            Some(brought) => {
                snapshot.pending = None;
                snapshot.arrived_from = brought.arrived_from;
                Change::put(&snapshot)?
            }
            None => Change::remove::<SnapshotRecord>(&snapshot.id),
        };
        let changes = vec![change, Change::put(&transfer)?];
        self.ctx
            .store_call(move |store| store.commit(changes))
            .await?;
        let _ = self
            .ctx
            .registry
            .updates
            .send(self.ctx.transfer_view(&transfer));
        Ok(())
    }

    /// Removes what an arriving snapshot has of a device and a thin device
    /// (a try cut short leaves them; a retry starts afresh).
    async fn unmake(&self, snapshot: &SnapshotRecord) -> Result<(), AgentError> {
        self.ctx
            .remove_device_if_present(&self.ctx.snapshot_name(snapshot))
            .await?;
        self.ctx.pool.delete_thin(snapshot.thin_id).await.map(drop)
    }

    /// The volume will not arrive here after all (an abort), or moved on
    /// before its snapshots came (a chained move passed it on): they stay
    /// on the source, and their records here go.
    pub(crate) async fn drop_arriving_snapshots(
        &self,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        for snapshot in self.arriving(transfer).await? {
            self.unmake(&snapshot).await?;
            let key = snapshot.id.clone();
            self.ctx
                .store_call(move |store| store.commit(vec![Change::remove::<SnapshotRecord>(&key)]))
                .await?;
        }
        Ok(())
    }
}

/// A snapshot brought here: the bytes received, and where it may differ
/// from the volume when that is known.
struct Brought {
    bytes: u64,
    arrived_from: Option<ArrivedFrom>,
}

/// Where a snapshot made from `base` and then written at `written` may
/// differ from the volume; `None` past [`MAX_DIFFERS_RANGES`].
fn differing_further(base: ArrivedFrom, written: Vec<Range<u64>>) -> Option<ArrivedFrom> {
    let mut all = base.differs;
    all.extend(written);
    all.sort_by_key(|r| r.start);
    let differs = whole_regions(all.into_iter(), 1);
    (differs.len() <= MAX_DIFFERS_RANGES).then_some(ArrivedFrom {
        era: base.era,
        differs,
    })
}

/// A chunk must be whole blocks inside the snapshot (the last may end at
/// its end): anything else is a source that does not follow the protocol.
fn check_chunk(
    offset: u64,
    length: usize,
    block_bytes: u64,
    size_bytes: u64,
) -> Result<(), AgentError> {
    let end = offset.checked_add(length as u64);
    let whole = offset.is_multiple_of(block_bytes)
        && length > 0
        && length.is_multiple_of(crate::dm::direct_io::ALIGN)
        && end.is_some_and(|end| {
            end <= size_bytes && (end.is_multiple_of(block_bytes) || end == size_bytes)
        });
    if whole {
        return Ok(());
    }
    Err(AgentError::Unavailable {
        reason: format!(
            "the source sent {length} bytes at {offset}: not whole blocks of {block_bytes} inside \
             the snapshot's {size_bytes} bytes"
        ),
    })
}

/// The runs of `data` (at `offset`) whose blocks differ from `here`.
fn runs_differing(offset: u64, data: &[u8], here: &[u8], block_bytes: u64) -> Vec<(u64, Vec<u8>)> {
    let block = block_bytes as usize;
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (index, (theirs, mine)) in data.chunks(block).zip(here.chunks(block)).enumerate() {
        if theirs == mine {
            continue;
        }
        let at = offset + (index * block) as u64;
        match runs.last_mut() {
            Some((start, run)) if *start + run.len() as u64 == at => run.extend_from_slice(theirs),
            _ => runs.push((at, theirs.to_vec())),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocks_that_differ_are_written_in_runs() {
        let theirs = b"aaaabbbbccccdddd";
        let here = b"aaaaXXXXccccYYYY";
        assert_eq!(
            runs_differing(8, theirs, here, 4),
            vec![(12, b"bbbb".to_vec()), (20, b"dddd".to_vec())]
        );
        let here = b"aaaaXXXXYYYYdddd";
        assert_eq!(
            runs_differing(0, theirs, here, 4),
            vec![(4, b"bbbbcccc".to_vec())]
        );
        assert!(runs_differing(0, theirs, theirs, 4).is_empty());
    }

    #[test]
    fn what_a_snapshot_differs_by_accumulates_along_the_chain() {
        let base = ArrivedFrom {
            era: (7 << 32) | 3,
            differs: vec![0..4096, 65536..131072],
        };
        let further = differing_further(base, vec![131072..135168, 8192..12288, 2048..6144])
            .expect("few ranges are kept");
        assert_eq!(further.era, (7 << 32) | 3);
        assert_eq!(further.differs, vec![0..6144, 8192..12288, 65536..135168]);
    }

    #[test]
    fn too_many_ranges_are_not_kept() {
        let base = ArrivedFrom {
            era: 1,
            differs: Vec::new(),
        };
        let written: Vec<Range<u64>> = (0..=MAX_DIFFERS_RANGES as u64)
            .map(|i| i * 8192..i * 8192 + 4096)
            .collect();
        assert!(differing_further(base.clone(), written[1..].to_vec()).is_some());
        assert!(differing_further(base, written).is_none());
    }

    #[test]
    fn chunks_outside_whole_blocks_of_the_snapshot_are_refused() {
        let block = 65536;
        assert!(check_chunk(0, 65536, block, 1 << 20).is_ok());
        assert!(check_chunk(983040, 65536, block, 1 << 20).is_ok());
        // The last block may end at the snapshot's end.
        assert!(check_chunk(65536, 4096, block, 65536 + 4096).is_ok());
        for (offset, length) in [
            (4096, 65536),
            (0, 0),
            (0, 1000),
            ((1 << 20) - 65536, 131072),
        ] {
            assert!(
                check_chunk(offset, length, block, 1 << 20).is_err(),
                "{offset} {length}"
            );
        }
        assert!(check_chunk(u64::MAX - 4095, 4096, 4096, u64::MAX).is_err());
    }
}
