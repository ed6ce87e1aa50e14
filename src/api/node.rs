//! dmclone.v1.Node

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, handle, parts};
use crate::{agent::Agent, api::proto::v1 as pb};

#[derive(Debug)]
pub struct NodeApi {
    agent: Arc<Agent>,
}

impl NodeApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn get_node_info(
        &self,
        request: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let (metadata, _) = parts(request);
        handle(
            &self.agent,
            "GetNodeInfo",
            &metadata,
            "",
            |agent| async move { Ok(convert::node_info(agent.node_info().await?)) },
        )
        .await
    }
}
