//! `dmclonectl node`

use dmclone::api::proto::v1::{GetNodeInfoRequest, NodeInfo, node_client::NodeClient};
use serde_json::json;
use tonic::transport::Channel;

use crate::{Failure, output};

pub async fn show(channel: Channel, as_json: bool) -> Result<(), Failure> {
    let info = NodeClient::new(channel)
        .get_node_info(GetNodeInfoRequest {})
        .await?
        .into_inner();
    if as_json {
        output::json(&to_json(&info));
    } else {
        print_human(&info);
    }
    Ok(())
}

/// The documented, stable JSON shape of `node --json`.
pub fn to_json(info: &NodeInfo) -> serde_json::Value {
    let pool = info.pool.clone().unwrap_or_default();
    json!({
        "node_id": info.node_id,
        "hostname": info.hostname,
        "agent_version": info.agent_version,
        "api_version": info.api_version,
        "kernel_release": info.kernel_release,
        "dm_ioctl_version": info.dm_ioctl_version,
        "host_nqn": info.host_nqn,
        "targets": info.targets.iter().map(|t| json!({
            "name": t.name,
            "version": format!("{}.{}.{}", t.major, t.minor, t.patch),
        })).collect::<Vec<_>>(),
        "pool": {
            "health": pool.health,
            "low_space": pool.low_space,
            "data_total_bytes": pool.data_total_bytes,
            "data_used_bytes": pool.data_used_bytes,
            "metadata_total_bytes": pool.metadata_total_bytes,
            "metadata_used_bytes": pool.metadata_used_bytes,
            "provisioned_bytes": pool.provisioned_bytes,
            "volume_count": pool.volume_count,
        },
    })
}

fn print_human(info: &NodeInfo) {
    let pool = info.pool.clone().unwrap_or_default();
    let targets: Vec<String> = info
        .targets
        .iter()
        .filter(|t| ["clone", "era", "thin-pool", "thin", "linear"].contains(&t.name.as_str()))
        .map(|t| format!("{} {}.{}.{}", t.name, t.major, t.minor, t.patch))
        .collect();
    println!("node       {} ({})", info.node_id, info.hostname);
    println!("agent      {} ({})", info.agent_version, info.api_version);
    println!(
        "kernel     {}, dm ioctl {}",
        info.kernel_release, info.dm_ioctl_version
    );
    println!("targets    {}", targets.join(", "));
    println!("host NQN   {}", info.host_nqn);
    println!(
        "pool       {}{}; data {} of {} ({}); metadata {} of {} ({})",
        pool.health,
        if pool.low_space {
            ", LOW SPACE: allocations refused"
        } else {
            ""
        },
        output::size(pool.data_used_bytes),
        output::size(pool.data_total_bytes),
        output::percent(pool.data_used_bytes, pool.data_total_bytes),
        output::size(pool.metadata_used_bytes),
        output::size(pool.metadata_total_bytes),
        output::percent(pool.metadata_used_bytes, pool.metadata_total_bytes),
    );
    println!(
        "volumes    {}, {} provisioned",
        pool.volume_count,
        output::size(pool.provisioned_bytes)
    );
}
