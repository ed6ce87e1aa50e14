//! dmclone.v1.Transfers: the source side of a move (export, unexport,
//! release) and the destination side (start, commit, pause, resume,
//! throttle, abort, get, list, watch).

use std::{path::PathBuf, sync::Arc};

use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, codegen::BoxStream};
use tracing::warn;

use super::{access, convert, handle, parts, span_id, watch};
use crate::{
    agent::Agent,
    api::proto::v1 as pb,
    error::AgentError,
    ids::{SnapshotId, TransferId, VolumeId},
    nvme::auth::{DhchapKeys, DhchapSecret},
    transfer::{
        KnobRequest, Source, StartRequest, TransferQuery, TransferView, export::UnexportRequest,
        history::MAX_PAGE, token::ReleaseToken,
    },
};

#[derive(Debug)]
pub struct TransfersApi {
    agent: Arc<Agent>,
    watchers: watch::Watchers,
}

impl TransfersApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self {
            agent,
            watchers: watch::Watchers::default(),
        }
    }

    /// A call that names one transfer and answers with it.
    async fn on_transfer<F, Fut>(
        &self,
        method: &'static str,
        request: Request<pb::TransferRef>,
        call: F,
    ) -> Result<Response<pb::Transfer>, Status>
    where
        F: FnOnce(Arc<Agent>, TransferId) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<TransferView, AgentError>> + Send,
    {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            method,
            &metadata,
            span_id(&req.transfer_id),
            |agent| async move {
                let id = TransferId::parse(&req.transfer_id)?;
                Ok(convert::transfer(call(agent, id).await?))
            },
        )
        .await
    }

    /// A call a move's destination makes about its source's export
    /// (release, claim): `(volume_id, host_nqn, release_token)`, bound over
    /// TCP to the peer whose host it names.
    async fn on_destination_call<T, F, Fut>(
        &self,
        method: &'static str,
        act: access::DestinationAct,
        request: Request<(String, String, String)>,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Arc<Agent>, VolumeId, String, Option<ReleaseToken>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, AgentError>> + Send,
        T: Send + 'static,
    {
        let caller = request.extensions().get::<access::Caller>().cloned();
        let (metadata, (volume_id, host_nqn, token)) = parts(request);
        access::bind_peer(caller.as_ref(), &host_nqn, act)?;
        handle(
            &self.agent,
            method,
            &metadata,
            span_id(&volume_id),
            |agent| async move {
                let id = VolumeId::parse(&volume_id)?;
                call(agent, id, host_nqn, ReleaseToken::presented(&token)).await
            },
        )
        .await
    }
}

fn knobs(knobs: Option<pb::HydrationKnobs>) -> KnobRequest {
    let knobs = knobs.unwrap_or_default();
    let set = |value: u32| (value != 0).then_some(value);
    KnobRequest {
        region_bytes: set(knobs.region_bytes).map(u64::from),
        hydration_threshold: set(knobs.hydration_threshold),
        hydration_batch_size: set(knobs.hydration_batch_size),
        max_bytes_per_second: (knobs.max_bytes_per_second != 0)
            .then_some(knobs.max_bytes_per_second),
    }
}

/// The DH-HMAC-CHAP secrets a start request carries: both or neither.
fn connect_secrets(host: &str, ctrl: &str) -> Result<Option<DhchapKeys>, AgentError> {
    let host = DhchapSecret::parse("nvme_tcp.dhchap_host_secret", host)?;
    let ctrl = DhchapSecret::parse("nvme_tcp.dhchap_ctrl_secret", ctrl)?;
    match (host, ctrl) {
        (Some(host), Some(ctrl)) => Ok(Some(DhchapKeys { host, ctrl })),
        (None, None) => Ok(None),
        _ => Err(AgentError::InvalidArgument {
            field: "nvme_tcp.dhchap_ctrl_secret",
            reason: "give both secrets of the export (host and controller), or neither".into(),
        }),
    }
}

fn start_request(req: pb::StartTransferRequest) -> Result<StartRequest, AgentError> {
    let source = match req.source {
        Some(pb::start_transfer_request::Source::DevicePath(path)) => {
            if !path.starts_with('/') {
                return Err(AgentError::InvalidArgument {
                    field: "device_path",
                    reason: format!("{} is not an absolute path", crate::ids::quoted(&path)),
                });
            }
            Source::Device(PathBuf::from(path))
        }
        Some(pb::start_transfer_request::Source::NvmeTcp(nvme)) => Source::NvmeTcp {
            subsystem_nqn: nvme.subsystem_nqn,
            address: nvme.transport_address,
            port: nvme.transport_service_id,
            agent_endpoint: nvme.source_agent_endpoint,
            release_token: ReleaseToken::presented(&nvme.release_token),
            auth: connect_secrets(&nvme.dhchap_host_secret, &nvme.dhchap_ctrl_secret)?,
        },
        None => {
            return Err(AgentError::InvalidArgument {
                field: "source",
                reason: "name the source: nvme_tcp (another agent's export) or device_path".into(),
            });
        }
    };
    Ok(StartRequest {
        transfer: TransferId::parse(&req.transfer_id)?,
        volume: VolumeId::parse(&req.volume_id)?,
        size_bytes: req.size_bytes,
        source,
        deferred: req.deferred,
        knobs: knobs(req.knobs),
        leave_snapshots: req.leave_snapshots,
    })
}

#[tonic::async_trait]
impl pb::transfers_server::Transfers for TransfersApi {
    async fn export_volume(
        &self,
        request: Request<pb::ExportVolumeRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "ExportVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                let export = agent
                    .exports
                    .export_volume(&id, &req.host_nqn, req.for_transfer)
                    .await?;
                Ok(pb::Export {
                    volume_id: export.volume_id,
                    subsystem_nqn: export.subsystem_nqn,
                    transport_address: export.address,
                    transport_service_id: u32::from(export.port),
                    allowed_host_nqn: export.host_nqn,
                    release_token: export
                        .release_token
                        .map(|token| token.expose().to_owned())
                        .unwrap_or_default(),
                    dhchap_host_secret: export
                        .auth
                        .as_ref()
                        .map(|keys| keys.host.expose().to_owned())
                        .unwrap_or_default(),
                    dhchap_ctrl_secret: export
                        .auth
                        .map(|keys| keys.ctrl.expose().to_owned())
                        .unwrap_or_default(),
                    claim_deadline_unix: export.claim_deadline_unix.unwrap_or(0),
                })
            },
        )
        .await
    }

    async fn unexport_volume(
        &self,
        request: Request<pb::UnexportVolumeRequest>,
    ) -> Result<Response<pb::UnexportVolumeResponse>, Status> {
        let caller = request.extensions().get::<access::Caller>().cloned();
        let (metadata, req) = parts(request);
        access::no_force_by_peer(caller.as_ref(), req.force)?;
        let unexport = UnexportRequest {
            token: ReleaseToken::presented(&req.release_token),
            force: req.force,
            peer_host: access::peer_host(caller.as_ref()),
        };
        handle(
            &self.agent,
            "UnexportVolume",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let id = VolumeId::parse(&req.volume_id)?;
                agent.exports.unexport_volume(&id, &unexport).await?;
                Ok(pb::UnexportVolumeResponse {})
            },
        )
        .await
    }

    async fn release_volume(
        &self,
        request: Request<pb::ReleaseVolumeRequest>,
    ) -> Result<Response<pb::ReleaseVolumeResponse>, Status> {
        let moved = request.get_ref().snapshots_moved.clone();
        let request = request.map(|r| (r.volume_id, r.host_nqn, r.release_token));
        self.on_destination_call(
            "ReleaseVolume",
            access::DestinationAct::Release,
            request,
            |agent, id, host, token| async move {
                let moved = moved
                    .iter()
                    .map(|raw| SnapshotId::parse(raw))
                    .collect::<Result<Vec<_>, _>>()?;
                agent
                    .exports
                    .release_volume_and_snapshots(&id, &host, token.as_ref(), &moved)
                    .await
                    .map(|()| pb::ReleaseVolumeResponse {})
            },
        )
        .await
    }

    async fn claim_export(
        &self,
        request: Request<pb::ClaimExportRequest>,
    ) -> Result<Response<pb::ClaimExportResponse>, Status> {
        let ask = request.get_ref().return_trip.clone();
        let request = request.map(|r| (r.volume_id, r.host_nqn, r.release_token));
        self.on_destination_call(
            "ClaimExport",
            access::DestinationAct::Claim,
            request,
            |agent, id, host, token| async move {
                let ask = ask.map(convert::return_trip_ask).transpose()?;
                agent
                    .exports
                    .claim_export(&id, &host, token.as_ref(), ask.as_ref())
                    .await
                    .map(convert::claim_response)
            },
        )
        .await
    }

    type ReadSnapshotDeltaStream = BoxStream<pb::SnapshotDeltaChunk>;

    async fn read_snapshot_delta(
        &self,
        request: Request<pb::ReadSnapshotDeltaRequest>,
    ) -> Result<Response<Self::ReadSnapshotDeltaStream>, Status> {
        let ask = convert::delta_ask(request.get_ref());
        let request = request.map(|r| (r.volume_id, r.host_nqn, r.release_token));
        self.on_destination_call(
            "ReadSnapshotDelta",
            access::DestinationAct::ReadSnapshot,
            request,
            |agent, id, host, token| async move {
                let chunks = agent
                    .exports
                    .read_snapshot_delta(&id, &host, token.as_ref(), ask?)
                    .await?;
                let stream = ReceiverStream::new(chunks).map(|chunk| {
                    chunk
                        .map(convert::delta_chunk)
                        .map_err(|err| super::status::status_of(&err))
                });
                Ok(Box::pin(stream) as Self::ReadSnapshotDeltaStream)
            },
        )
        .await
    }

    async fn start_transfer(
        &self,
        request: Request<pb::StartTransferRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let caller = request.extensions().get::<access::Caller>().cloned();
        let (metadata, req) = parts(request);
        if matches!(
            req.source,
            Some(pb::start_transfer_request::Source::DevicePath(_))
        ) {
            access::from_this_host(caller.as_ref(), "a device_path source")?;
        }
        handle(
            &self.agent,
            "StartTransfer",
            &metadata,
            span_id(&req.transfer_id),
            |agent| async move {
                let request = start_request(req)?;
                Ok(convert::transfer(
                    agent.transfers.start_transfer(request).await?,
                ))
            },
        )
        .await
    }

    async fn commit_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        self.on_transfer("CommitTransfer", request, |agent, id| async move {
            agent.transfers.commit_transfer(&id).await
        })
        .await
    }

    async fn abort_transfer(
        &self,
        request: Request<pb::AbortTransferRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let force = request.get_ref().force;
        let request = request.map(|req| pb::TransferRef {
            transfer_id: req.transfer_id,
        });
        self.on_transfer("AbortTransfer", request, move |agent, id| async move {
            if force {
                warn!(target: "dmclone::audit", transfer = %id, "forced abort: writes made on the destination of a deferred transfer are dropped");
            }
            agent.transfers.abort_transfer(&id, force).await
        })
        .await
    }

    async fn pause_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        self.on_transfer("PauseTransfer", request, |agent, id| async move {
            agent.transfers.pause_transfer(&id).await
        })
        .await
    }

    async fn resume_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        self.on_transfer("ResumeTransfer", request, |agent, id| async move {
            agent.transfers.resume_transfer(&id).await
        })
        .await
    }

    async fn throttle_transfer(
        &self,
        request: Request<pb::ThrottleTransferRequest>,
    ) -> Result<Response<pb::Transfer>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "ThrottleTransfer",
            &metadata,
            span_id(&req.transfer_id),
            |agent| async move {
                let id = TransferId::parse(&req.transfer_id)?;
                Ok(convert::transfer(
                    agent
                        .transfers
                        .throttle_transfer(&id, knobs(req.knobs))
                        .await?,
                ))
            },
        )
        .await
    }

    async fn get_transfer(
        &self,
        request: Request<pb::TransferRef>,
    ) -> Result<Response<pb::Transfer>, Status> {
        self.on_transfer("GetTransfer", request, |agent, id| async move {
            agent.transfers.get_transfer(&id).await
        })
        .await
    }

    async fn list_transfers(
        &self,
        request: Request<pb::ListTransfersRequest>,
    ) -> Result<Response<pb::ListTransfersResponse>, Status> {
        let (metadata, req) = parts(request);
        handle(
            &self.agent,
            "ListTransfers",
            &metadata,
            span_id(&req.volume_id),
            |agent| async move {
                let page = agent.transfers.list_page(&transfer_query(&req)?).await?;
                Ok(pb::ListTransfersResponse {
                    transfers: page.transfers.into_iter().map(convert::transfer).collect(),
                    next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
                })
            },
        )
        .await
    }

    type WatchTransfersStream = BoxStream<pb::Transfer>;

    async fn watch_transfers(
        &self,
        request: Request<pb::WatchTransfersRequest>,
    ) -> Result<Response<Self::WatchTransfersStream>, Status> {
        let (metadata, req) = parts(request);
        let caller = access::caller_of(&metadata);
        let slot = self
            .watchers
            .admit(&caller, self.agent.settings().limits.max_watches_per_caller)?;
        handle(
            &self.agent,
            "WatchTransfers",
            &metadata,
            span_id(&req.transfer_id),
            |agent| async move {
                let only = match req.transfer_id.as_str() {
                    "" => None,
                    raw => Some(TransferId::parse(raw)?),
                };
                let updates = agent.transfers.watch_transfers();
                let first = watch::current(&agent, only.as_ref()).await?;
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                tokio::spawn(watch::feed(agent, only, updates, first, tx, slot));
                Ok(Box::pin(ReceiverStream::new(rx)) as Self::WatchTransfersStream)
            },
        )
        .await
    }
}

/// What a ListTransfers request asks for, checked.
fn transfer_query(req: &pb::ListTransfersRequest) -> Result<TransferQuery, AgentError> {
    let states = req
        .states
        .iter()
        .map(|raw| {
            pb::TransferState::try_from(*raw)
                .ok()
                .and_then(convert::transfer_state_from_wire)
                .ok_or_else(|| AgentError::InvalidArgument {
                    field: "states",
                    reason: format!("{raw} is not a transfer state"),
                })
        })
        .collect::<Result<_, _>>()?;
    let page_size = usize::try_from(req.page_size).unwrap_or(usize::MAX);
    if page_size > MAX_PAGE {
        return Err(AgentError::InvalidArgument {
            field: "page_size",
            reason: format!("{page_size} is more than a page holds ({MAX_PAGE}); ask for less"),
        });
    }
    Ok(TransferQuery {
        volume: non_empty(&req.volume_id).map(VolumeId::parse).transpose()?,
        states,
        after: non_empty(&req.page_token)
            .map(|token| {
                TransferId::parse(token).map_err(|_| AgentError::InvalidArgument {
                    field: "page_token",
                    reason: format!("{token:?} is not a token this agent gave out"),
                })
            })
            .transpose()?,
        page_size,
    })
}

fn non_empty(raw: &str) -> Option<&str> {
    (!raw.is_empty()).then_some(raw)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const VOLUME: &str = "00000000-0000-4000-8000-000000000001";

    fn refused_field(req: pb::ListTransfersRequest) -> &'static str {
        match transfer_query(&req) {
            Err(AgentError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_list_request_becomes_a_query() {
        let query = transfer_query(&pb::ListTransfersRequest {
            volume_id: VOLUME.into(),
            states: vec![
                pb::TransferState::Done.into(),
                pb::TransferState::Failed.into(),
            ],
            page_size: 10,
            page_token: "30000000-0000-4000-8000-000000000007".into(),
        })
        .unwrap();
        assert_eq!(query.volume.unwrap().as_str(), VOLUME);
        assert_eq!(
            query.states,
            [
                crate::transfer::TransferState::Done,
                crate::transfer::TransferState::Failed
            ]
        );
        assert_eq!(query.page_size, 10);
        assert!(query.after.is_some());
        assert_eq!(
            transfer_query(&pb::ListTransfersRequest::default()).unwrap(),
            TransferQuery::default()
        );
    }

    #[test]
    fn bad_list_requests_name_the_field() {
        let bad = |edit: fn(&mut pb::ListTransfersRequest)| {
            let mut req = pb::ListTransfersRequest::default();
            edit(&mut req);
            refused_field(req)
        };
        assert_eq!(bad(|r| r.volume_id = "not-a-uuid".into()), "volume_id");
        assert_eq!(bad(|r| r.states = vec![0]), "states");
        assert_eq!(bad(|r| r.states = vec![42]), "states");
        assert_eq!(bad(|r| r.page_size = 1001), "page_size");
        assert_eq!(bad(|r| r.page_token = "../../etc".into()), "page_token");
    }
}
