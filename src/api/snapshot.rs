//! dmclone.v1.Snapshots: thin snapshots and revert. Change-block tracking
//! (MarkCheckpoint, GetChangedBlocks) answers UNIMPLEMENTED until dm-era is
//! part of the volume stack.

use std::sync::Arc;

use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{handle, not_yet, parts, span_id};
use crate::{
    agent::Agent,
    ids::{SnapshotId, VolumeId},
    proto::v1 as pb,
    snapshot::SnapshotView,
};

const MISSING: &str = "change-block tracking with dm-era is";

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
        snapshot_id: view.id,
        volume_id: view.volume_id,
        size_bytes: view.size_bytes,
        allocated_bytes: view.allocated_bytes.unwrap_or(0),
        era: 0,
        created_unix_seconds: view.created_unix,
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
            async {
                let id = SnapshotId::parse(&req.snapshot_id)?;
                let volume = VolumeId::parse(&req.volume_id)?;
                Ok(snapshot(self.agent.create_snapshot(&id, &volume).await?))
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
            async {
                let id = SnapshotId::parse(&req.snapshot_id)?;
                self.agent.delete_snapshot(&id).await?;
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
            async {
                let id = SnapshotId::parse(&req.snapshot_id)?;
                Ok(snapshot(self.agent.get_snapshot(&id).await?))
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
            async {
                let volume = match req.volume_id.as_str() {
                    "" => None,
                    raw => Some(VolumeId::parse(raw)?),
                };
                let views = self.agent.list_snapshots(volume.as_ref()).await?;
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
            async {
                let volume = VolumeId::parse(&req.volume_id)?;
                let id = SnapshotId::parse(&req.snapshot_id)?;
                self.agent.revert_volume(&volume, &id).await?;
                Ok(pb::RevertVolumeResponse {})
            },
        )
        .await
    }

    async fn mark_checkpoint(
        &self,
        request: Request<pb::MarkCheckpointRequest>,
    ) -> Result<Response<pb::Checkpoint>, Status> {
        not_yet(&self.agent, MISSING, "MarkCheckpoint", parts(request).0).await
    }

    type GetChangedBlocksStream = BoxStream<pb::ChangedBlocks>;

    async fn get_changed_blocks(
        &self,
        request: Request<pb::GetChangedBlocksRequest>,
    ) -> Result<Response<Self::GetChangedBlocksStream>, Status> {
        not_yet(&self.agent, MISSING, "GetChangedBlocks", parts(request).0).await
    }
}
