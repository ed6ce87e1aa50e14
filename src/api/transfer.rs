//! dmclone.v1.Transfers: not implemented yet. Every call answers
//! UNIMPLEMENTED and says what is missing, so a caller never mistakes it for
//! success.

use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{not_yet, parts};
use crate::proto::v1 as pb;

#[derive(Debug)]
pub struct TransfersApi;

const MISSING: &str =
    "moving volumes between hosts (NVMe/TCP export, dm-clone hydration, finalize) is";

#[tonic::async_trait]
impl pb::transfers_server::Transfers for TransfersApi {
    async fn export_volume(
        &self,
        request: Request<pb::ExportVolumeRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        not_yet(MISSING, "ExportVolume", parts(request).0).await
    }

    async fn unexport_volume(
        &self,
        request: Request<pb::UnexportVolumeRequest>,
    ) -> Result<Response<pb::UnexportVolumeResponse>, Status> {
        not_yet(MISSING, "UnexportVolume", parts(request).0).await
    }

    async fn start_transfer(
        &self,
        request: Request<pb::StartTransferRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "StartTransfer", parts(request).0).await
    }

    async fn commit_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "CommitTransfer", parts(request).0).await
    }

    async fn abort_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "AbortTransfer", parts(request).0).await
    }

    async fn pause_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "PauseTransfer", parts(request).0).await
    }

    async fn resume_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "ResumeTransfer", parts(request).0).await
    }

    async fn throttle_transfer(
        &self,
        request: Request<pb::ThrottleTransferRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "ThrottleTransfer", parts(request).0).await
    }

    async fn get_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        not_yet(MISSING, "GetTransfer", parts(request).0).await
    }

    async fn list_transfers(
        &self,
        request: Request<pb::ListTransfersRequest>,
    ) -> Result<Response<pb::ListTransfersResponse>, Status> {
        not_yet(MISSING, "ListTransfers", parts(request).0).await
    }

    type WatchTransfersStream = BoxStream<pb::Transfer>;

    async fn watch_transfers(
        &self,
        request: Request<pb::WatchTransfersRequest>,
    ) -> Result<Response<Self::WatchTransfersStream>, Status> {
        not_yet(MISSING, "WatchTransfers", parts(request).0).await
    }
}
