//! dmclone.v1.Snapshots: thin snapshots, revert, and changed-block tracking
//! with dm-era (MarkCheckpoint, GetChangedBlocks).

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{convert, handle, parts, span_id};
use crate::{
    agent::Agent,
    api::proto::v1 as pb,
    changes::{ChangedBlocks, EXTENTS_PER_MESSAGE, Extent, Since},
    error::AgentError,
    ids::{SnapshotId, VolumeId},
    snapshot::SnapshotView,
};

#[derive(Debug)]
pub struct SnapshotsApi {
    agent: Arc<Agent>,
}

impl SnapshotsApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn snapshot(view: SnapshotView) -> pb::Snapshot {
    pb::Snapshot {
        snapshot_id: view.id.to_string(),
        volume_id: view.volume_id.to_string(),
        size_bytes: view.size_bytes,
        allocated_bytes: view.allocated_bytes.unwrap_or(0),
        era: view.era.unwrap_or(0),
        has_era: view.era.is_some(),
        created_unix_seconds: view.created_unix,
        state: convert::snapshot_state(view.state).into(),
    }
}

/// One message of the answer: a batch of its extents with the eras.
fn message(changes: &ChangedBlocks, extents: Vec<Extent>) -> pb::ChangedBlocks {
    pb::ChangedBlocks {
        extents: extents
            .into_iter()
            .map(|e| pb::Extent {
                offset_bytes: e.offset_bytes,
                length_bytes: e.length_bytes,
            })
            .collect(),
        since_era: changes.since_era,
        next_era: changes.next_era,
        block_bytes: changes.block_bytes,
    }
}

/// The answer's messages, made one at a time as the stream takes them (an
/// empty answer is one message with no extents, so the caller always learns
/// the eras). The stream's channel holds a few, so however many extents the
/// answer has, only those messages are ever in memory.
async fn send_messages(
    changes: ChangedBlocks,
    tx: tokio::sync::mpsc::Sender<Result<pb::ChangedBlocks, Status>>,
) {
    for batch in changes.extent_batches(EXTENTS_PER_MESSAGE) {
        if tx.send(Ok(message(&changes, batch))).await.is_err() {
            return;
        }
    }
}

fn since(request: &pb::GetChangedBlocksRequest) -> Result<Since, AgentError> {
    match &request.since {
        Some(pb::get_changed_blocks_request::Since::Era(era)) => Ok(Since::Era(*era)),
        Some(pb::get_changed_blocks_request::Since::SnapshotId(id)) => {
            Ok(Since::Snapshot(SnapshotId::parse(id)?))
        }
        None => Err(AgentError::InvalidArgument {
            field: "since",
            reason: "set era (from MarkCheckpoint) or snapshot_id".into(),
        }),
    }
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsApi {
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "CreateSnapshot",
            &metadata,
            span_id(&req.snapshot_id),
            |agent| async move {
                let id = SnapshotId::parse(&req.snapshot_id)?;
                let volume = VolumeId::parse(&req.volume_id)?;
                Ok(snapshot(
                    agent.snapshots.create_snapshot(&id, &volume).await?,
                ))
            },
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "DeleteSnapshot",
            &metadata,
            span_id(&req.snapshot_id),
            |agent| async move {
                let id = SnapshotId::parse(&req.snapshot_id)?;
                agent.snapshots.delete_snapshot(&id).await?;
                Ok(pb::DeleteSnapshotResponse {})
            },
        )
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "GetSnapshot",
            &metadata,
            span_id(&req.snapshot_id),
            |agent| async move {
                let id = SnapshotId::parse(&req.snapshot_id)?;
                Ok(snapshot(agent.snapshots.get_snapshot(&id).await?))
            },
        )
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "ListSnapshots",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let volume = match req.volume_id.as_str() {
                    "" => None,
                    raw => Some(VolumeId::parse(raw)?),
                };
                let views = agent.snapshots.list_snapshots(volume.as_ref()).await?;
                Ok(pb::ListSnapshotsResponse {
                    snapshots: views.into_iter().map(snapshot).collect(),
                })
            },
        )
        .await
    }

    async fn revert_volume(
        &self,
        request: Request<pb::RevertVolumeRequest>,
    ) -> Result<Response<pb::RevertVolumeResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "RevertVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let volume = VolumeId::parse(&req.volume_id)?;
                let id = SnapshotId::parse(&req.snapshot_id)?;
                agent.snapshots.revert_volume(&volume, &id).await?;
                Ok(pb::RevertVolumeResponse {})
            },
        )
        .await
    }

    async fn mark_checkpoint(
        &self,
        request: Request<pb::MarkCheckpointRequest>,
    ) -> Result<Response<pb::Checkpoint>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "MarkCheckpoint",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let volume = VolumeId::parse(&req.volume_id)?;
                let era = agent.changes.mark_checkpoint(&volume).await?;
                Ok(pb::Checkpoint {
                    volume_id: volume.to_string(),
                    era,
                })
            },
        )
        .await
    }

    type GetChangedBlocksStream = BoxStream<pb::ChangedBlocks>;

    async fn get_changed_blocks(
        &self,
        request: Request<pb::GetChangedBlocksRequest>,
    ) -> Result<Response<Self::GetChangedBlocksStream>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "GetChangedBlocks",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let volume = VolumeId::parse(&req.volume_id)?;
                let changes = agent.changes.changed_blocks(&volume, &since(&req)?).await?;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tokio::spawn(send_messages(changes, tx));
                Ok(Box::pin(ReceiverStream::new(rx)) as Self::GetChangedBlocksStream)
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::changes::era_metadata::WrittenBlocks;

    fn answer(blocks: u64, written: impl IntoIterator<Item = u64>) -> ChangedBlocks {
        let mut bits = WrittenBlocks::new(blocks);
        written.into_iter().for_each(|block| bits.set(block));
        ChangedBlocks {
            since_era: 7 << 32 | 3,
            next_era: 7 << 32 | 9,
            block_bytes: 4096,
            volume_bytes: blocks * 4096,
            written: bits,
        }
    }

    async fn sent(changes: ChangedBlocks) -> Vec<pb::ChangedBlocks> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(send_messages(changes, tx));
        let mut messages = Vec::new();
        while let Some(message) = rx.recv().await {
            messages.push(message.unwrap());
        }
        messages
    }

    #[tokio::test]
    async fn an_answer_streams_in_messages_of_at_most_the_batch_size() {
        let blocks = 2 * EXTENTS_PER_MESSAGE as u64 + 10;
        let messages = sent(answer(2 * blocks, (0..2 * blocks).step_by(2))).await;
        let sizes: Vec<usize> = messages.iter().map(|m| m.extents.len()).collect();
        assert_eq!(sizes, vec![EXTENTS_PER_MESSAGE, EXTENTS_PER_MESSAGE, 10]);
        assert!(messages.iter().all(|m| m.next_era == 7 << 32 | 9));
        let last = messages[2].extents.last().unwrap();
        assert_eq!(
            (last.offset_bytes, last.length_bytes),
            ((2 * blocks - 2) * 4096, 4096)
        );
    }

    #[tokio::test]
    async fn an_empty_answer_is_one_message_with_the_eras() {
        let messages = sent(answer(100, [])).await;
        assert_eq!(messages.len(), 1);
        assert!(messages[0].extents.is_empty());
        assert_eq!(messages[0].since_era, 7 << 32 | 3);
    }
}
