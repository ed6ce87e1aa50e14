//! dmclone.v1.Volumes

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, handle, parts, span_id};
use crate::{
    agent::Agent,
    api::proto::v1 as pb,
    error::AgentError,
    ids::{SnapshotId, VolumeId},
};

#[derive(Debug)]
pub struct VolumesApi {
    agent: Arc<Agent>,
}

impl VolumesApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

#[tonic::async_trait]
impl pb::volumes_server::Volumes for VolumesApi {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "CreateVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                let (volume, _) = match (
                    req.source_snapshot_id.as_str(),
                    req.source_volume_id.as_str(),
                ) {
                    ("", "") => agent.volumes.create_volume(&id, req.size_bytes).await?,
                    (snapshot, "") => {
                        let snapshot = SnapshotId::parse(snapshot)?;
                        agent
                            .snapshots
                            .create_volume_from_snapshot(&id, req.size_bytes, &snapshot)
                            .await?
                    }
                    ("", source) => {
                        let source = VolumeId::parse(source)?;
                        agent
                            .snapshots
                            .clone_volume(&id, req.size_bytes, &source)
                            .await?
                    }
                    _ => {
                        return Err(AgentError::InvalidArgument {
                            field: "source_snapshot_id",
                            reason: "name a source snapshot or a source volume, not both".into(),
                        });
                    }
                };
                Ok(convert::volume(volume))
            },
        )
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "DeleteVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                agent.volumes.delete_volume(&id).await?;
                Ok(pb::DeleteVolumeResponse {})
            },
        )
        .await
    }

    async fn extend_volume(
        &self,
        request: Request<pb::ExtendVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "ExtendVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                Ok(convert::volume(
                    agent.volumes.extend_volume(&id, req.new_size_bytes).await?,
                ))
            },
        )
        .await
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "GetVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                Ok(convert::volume(agent.volumes.get_volume(&id).await?))
            },
        )
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let (metadata, request) = parts(request);
        handle(
            &self.agent,
            "ListVolumes",
            &metadata,
            "",
            |agent| async move {
                let volumes = agent.volumes.list_volumes(request.include_warm).await?;
                Ok(pb::ListVolumesResponse {
                    volumes: volumes.into_iter().map(convert::volume).collect(),
                })
            },
        )
        .await
    }

    async fn publish_volume(
        &self,
        request: Request<pb::PublishVolumeRequest>,
    ) -> Result<Response<pb::PublishVolumeResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "PublishVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                let path = agent.volumes.publish_volume(&id).await?;
                Ok(pb::PublishVolumeResponse {
                    device_path: path.display().to_string(),
                })
            },
        )
        .await
    }

    async fn unpublish_volume(
        &self,
        request: Request<pb::UnpublishVolumeRequest>,
    ) -> Result<Response<pb::UnpublishVolumeResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "UnpublishVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                agent.volumes.unpublish_volume(&id).await?;
                Ok(pb::UnpublishVolumeResponse {})
            },
        )
        .await
    }
}
