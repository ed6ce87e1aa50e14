//! Metrics scraped while a transfer runs, and the caller's request id in the
//! agent's log.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use dmclone::api::proto::v1::{
    GetVolumeRequest, HydrationKnobs, StartTransferRequest, TransferRef, TransferState,
    start_transfer_request::Source, transfers_client::TransfersClient,
};
use tonic::{Code, Request};

use super::fixture::AgentProcess;
use crate::support::*;

const TRANSFER: &str = "1d9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01";
const VOLUME: &str = "2d9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d02";

fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body.to_owned()
}

/// Parses the exposition and returns the value of one sample.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_transfer_and_match_the_api() {
    let size = 64 * MIB;
    let source = LoopDisk::with_pattern(size, 101);
    let address = format!("127.0.0.1:{}", free_port());
    let agent = AgentProcess::start_with(
        "dmctmetrics",
        &["--pool-file-size", "1G", "--metrics-listen", &address],
        &[],
    )
    .await;
    let before = scrape(&address);
    assert_eq!(sample(&before, "dmclone_pool_low_space", &[]), Some(0.0));
    assert!(sample(&before, "dmclone_pool_data_size_bytes", &[]).unwrap() > 900.0 * MIB as f64);
    assert!(sample(&before, "dmclone_reconcile_duration_seconds", &[]).is_some());

    let mut client = TransfersClient::new(agent.channel().await);
    client
        .start_transfer(StartTransferRequest {
            transfer_id: TRANSFER.into(),
            volume_id: VOLUME.into(),
            size_bytes: size,
            source: Some(Source::DevicePath(source.path().display().to_string())),
            deferred: false,
            knobs: Some(HydrationKnobs {
                region_bytes: 64 * 1024,
                hydration_threshold: 1,
                hydration_batch_size: 1,
                max_bytes_per_second: 8 * MIB,
            }),
            leave_snapshots: false,
        })
        .await
        .unwrap();
    let labels = [("transfer", TRANSFER), ("volume", VOLUME)];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = scrape(&address);
        let api = client
            .get_transfer(TransferRef {
                transfer_id: TRANSFER.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let hydrated =
            sample(&text, "dmclone_transfer_hydrated_bytes", &labels).expect("per-transfer bytes");
        assert_eq!(
            sample(&text, "dmclone_transfer_size_bytes", &labels),
            Some(size as f64)
        );
        // The scrape comes first, so it may trail the API a little, never lead.
        assert!(
            hydrated <= api.bytes_hydrated as f64,
            "metrics {hydrated} ahead of the API {}",
            api.bytes_hydrated
        );
        seen.push(hydrated);
        if api.state() == TransferState::Done {
            break;
        }
        assert!(Instant::now() < deadline, "{api:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "bytes only grow: {seen:?}"
    );
    assert!(
        seen.iter().any(|b| *b > 0.0 && *b < size as f64),
        "seen mid-way: {seen:?}"
    );
    let after = scrape(&address);
    assert_eq!(
        sample(&after, "dmclone_transfers", &[("state", "done")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "dmclone_volumes", &[("state", "available")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "dmclone_transfer_finalize_latency_seconds_count",
            &[]
        ),
        Some(1.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "dmclone_rpc_requests_total",
            &[("method", "StartTransfer"), ("code", "Ok")]
        ) == Some(1.0),
        "{after}"
    );
    assert!(sample(&after, "dmclone_pool_data_used_bytes", &[]).unwrap() >= size as f64);
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_request_id_is_in_the_agents_log() {
    let agent = AgentProcess::start("dmctreqid").await;
    let mut request = Request::new(GetVolumeRequest {
        volume_id: VOLUME.into(),
    });
    let request_id = "req-7f3a9c1e-cinder";
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    let status = agent.volumes().await.get_volume(request).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains(request_id))
        .unwrap_or_else(|| panic!("{request_id} not in the log:\n{log}"));
    assert!(
        line.contains("GetVolume") && line.contains(VOLUME),
        "{line}"
    );
    agent.destroy().await;

    // The same in JSON, one object per line, for log shippers.
    let agent = AgentProcess::start_with(
        "dmctreqjson",
        &["--pool-file-size", "256M", "--log-format", "json"],
        &[],
    )
    .await;
    let mut request = Request::new(GetVolumeRequest {
        volume_id: VOLUME.into(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    agent.volumes().await.get_volume(request).await.unwrap_err();
    let log = agent.log();
    let event = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|event| event["span"]["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no JSON event with request_id {request_id}:\n{log}"));
    assert_eq!(event["span"]["method"], "GetVolume", "{event}");
    assert_eq!(event["span"]["id"], VOLUME, "{event}");
    assert_eq!(event["level"], "WARN", "{event}");
    agent.destroy().await;
}

/// Type=notify: the agent tells systemd it is ready once it serves, and that
/// it is stopping on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_notifies_systemd_when_ready_and_when_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let notify = socket_path.display().to_string();
    let mut agent = AgentProcess::start_with(
        "dmctnotify",
        &["--pool-file-size", "256M"],
        &[("NOTIFY_SOCKET", &notify)],
    )
    .await;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("READY=1 from the agent");
    assert_eq!(&buf[..n], b"READY=1");
    let status = agent.stop().await;
    assert!(status.success(), "{status}");
    let n = socket.recv(&mut buf).expect("STOPPING=1 from the agent");
    assert_eq!(&buf[..n], b"STOPPING=1");
    agent.destroy().await;
}
