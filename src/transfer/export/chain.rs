//! Chained moves: a volume still arriving here (A→B, this is B) moves on to
//! C before it has every byte. B exports the layer beneath its dm-era, the
//! clone itself, so C's reads of regions B has not copied go through B to
//! A. When C holds every byte it releases B as any source; B then drops its
//! copy, which is only part of one, and releases A in turn: A lets go only
//! once some host holds the whole volume.
//!
//! ```text
//! A: thin ──export──▶ B: era(lower = clone(thin, A)) ──export of lower──▶ C: era(clone(thin, B))
//! ```

use tracing::info;

use super::Exports;
use crate::{
    error::AgentError,
    failpoint,
    ids::{TransferId, VolumeId},
    nvme::Nqn,
    refusal::Refusal,
    store::{TransferPhase, TransferRecord, VolumeRecord},
};

impl Exports {
    /// Whether the arriving volume `record` may be exported to `host`: a
    /// repeat of its export (a restart restores it) always; otherwise only
    /// for a move, while its own transfer copies (or is paused), with dm-era
    /// above the clone, and within `transfer.max_chain_depth`.
    pub(super) async fn check_onward(
        &self,
        record: &VolumeRecord,
        transfer_id: &TransferId,
        host: &Nqn,
        for_transfer: bool,
    ) -> Result<(), AgentError> {
        if record
            .export
            .as_ref()
            .is_some_and(|e| e.serves_lower && e.host_nqn == host.as_str())
        {
            return Ok(());
        }
        let arriving = |hint| -> AgentError {
            Refusal::VolumeArriving {
                volume: record.id.clone(),
                transfer: transfer_id.clone(),
                hint,
            }
            .into()
        };
        if !for_transfer {
            return Err(arriving(
                "it is exported for an attachment once that transfer is done; it may move on \
                 now (export it for a move)",
            ));
        }
        let mut transfer = self.ctx.arriving_transfer(record, transfer_id).await?;
        if !transfer.era_above {
            return Err(arriving(
                "it arrives without dm-era above its clone (a transfer started before chained \
                 moves), so it moves on once that transfer is done",
            ));
        }
        match transfer.phase {
            TransferPhase::Hydrating | TransferPhase::Paused => {}
            TransferPhase::Deferred => {
                return Err(arriving(
                    "its own move waits for its commit (the source may still be written): \
                     commit it, then move it on",
                ));
            }
            _ => return Err(arriving("it moves on once that transfer is done")),
        }
        if transfer.upstream.is_none() {
            // Its claim in the background has not been answered yet: ask
            // now, the chain's depth depends on the answer.
            self.transfers
                .claim_now(&mut transfer)
                .await
                .map_err(|err| AgentError::Unavailable {
                    reason: format!(
                        "volume {}'s source has not told this host where the volume comes from \
                         ({err}); it moves on once its source answers",
                        record.id
                    ),
                })?;
        }
        let depth = transfer.chain_depth().ok_or_else(|| {
            AgentError::Internal(format!("transfer {transfer_id} has no upstream"))
        })? + 1;
        let max = self.ctx.settings.transfer.max_chain_depth;
        if depth > max as usize {
            return Err(Refusal::ChainTooDeep {
                volume: record.id.clone(),
                depth,
                max,
            }
            .into());
        }
        Ok(())
    }

    /// What a destination claiming an export of `record` records as its
    /// upstream: this host, then where this host still copies from.
    pub(super) async fn chain_from_here(
        &self,
        record: &VolumeRecord,
    ) -> Result<Vec<String>, AgentError> {
        let mut chain = vec![self.ctx.node_id.clone()];
        if let Some(transfer_id) = &record.transfer
            && let Some(transfer) = self.ctx.transfer_record(transfer_id).await?
        {
            chain.extend(transfer.upstream.unwrap_or_default());
        }
        Ok(chain)
    }

    /// The host this arriving copy was exported to holds every byte: this
    /// copy, only part of the volume, goes, and so does the source's (see
    /// the module's doc). Recorded first, so a restart finishes it.
    pub(super) async fn pass_on(
        &self,
        volume: VolumeRecord,
        transfer_id: &TransferId,
        host: &Nqn,
    ) -> Result<(), AgentError> {
        let mut transfer = self.ctx.arriving_transfer(&volume, transfer_id).await?;
        if matches!(
            transfer.phase,
            TransferPhase::Starting | TransferPhase::Finalizing
        ) {
            return Err(AgentError::Unavailable {
                reason: format!(
                    "transfer {transfer_id} of volume {} is {}; release it again in a moment",
                    volume.id,
                    transfer.phase.name()
                ),
            });
        }
        if !transfer.phase.is_finished() {
            transfer.phase = TransferPhase::Done;
            transfer.passed_on_to = Some(host.to_string());
            transfer.finished_unix = Some(crate::records::unix_now());
            transfer.message = format!(
                "passed on: {host}, which this copy was exported to, holds every byte; this \
                 host's partial copy was dropped and its source released"
            );
            // Its snapshots never came: they stay on the source.
            self.transfers.drop_arriving_snapshots(&transfer).await?;
            transfer.snapshots.clear();
            self.ctx.put_transfer(&transfer).await?;
            failpoint::hit("release.after_pass_on_record");
        }
        self.finish_pass_on(volume, &transfer).await
    }

    /// The steps after a pass-on's record: idempotent, repeated at start.
    pub(crate) async fn finish_pass_on(
        &self,
        volume: VolumeRecord,
        transfer: &TransferRecord,
    ) -> Result<(), AgentError> {
        let id: VolumeId = volume.id.clone();
        self.remove_export(&id).await?;
        self.ctx.tear_down(&volume, transfer).await?;
        failpoint::hit("release.after_pass_on_teardown");
        let key = id.clone();
        self.ctx
            .store_call(move |store| store.remove_volume(&key))
            .await?;
        self.ctx.registry.forget(&transfer.id);
        let _ = self
            .ctx
            .registry
            .updates
            .send(self.ctx.transfer_view(transfer));
        self.transfers.spawn_release(transfer);
        info!(volume = %id, transfer = %transfer.id, to = transfer.passed_on_to.as_deref().unwrap_or(""), "passed on: the volume lives on the host it moved on to; releasing its source");
        Ok(())
    }
}
