//! dmclone.v1.Snapshots: not implemented yet. Every call answers
//! UNIMPLEMENTED and says what is missing, so a caller never mistakes it for
//! success.

use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{not_yet, parts};
use crate::proto::v1 as pb;

#[derive(Debug)]
pub struct SnapshotsApi {
    agent: std::sync::Arc<crate::agent::Agent>,
}

impl SnapshotsApi {
    pub fn new(agent: std::sync::Arc<crate::agent::Agent>) -> Self {
        Self { agent }
    }
}

const MISSING: &str = "thin snapshots, reverts and dm-era change tracking are";

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsApi {
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        not_yet(&self.agent, MISSING, "CreateSnapshot", parts(request).0).await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        not_yet(&self.agent, MISSING, "DeleteSnapshot", parts(request).0).await
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        not_yet(&self.agent, MISSING, "GetSnapshot", parts(request).0).await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        not_yet(&self.agent, MISSING, "ListSnapshots", parts(request).0).await
    }

    async fn revert_volume(
        &self,
        request: Request<pb::RevertVolumeRequest>,
    ) -> Result<Response<pb::RevertVolumeResponse>, Status> {
        not_yet(&self.agent, MISSING, "RevertVolume", parts(request).0).await
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
