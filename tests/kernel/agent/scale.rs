//! A thousand volumes: all of them come back after a restart, one List
//! returns them all. Prints the measured reconcile time and the agent's
//! resident memory (figures only; the benchmark suite owns any targets).

use std::time::Instant;

use dmclone::api::proto::v1::volumes_client::VolumesClient;

use super::{
    api::{create, list},
    fixture::AgentProcess,
};
use crate::support::MIB;

const VOLUMES: usize = 1000;

fn volume_id(i: usize) -> String {
    format!("4a9d1c3e-5f1a-4f7e-9a57-{i:012x}")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn logged_number(log: &str, key: &str) -> u64 {
    log.lines()
        .rev()
        .find(|l| l.contains("reconciled the kernel with the store"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the reconcile line:\n{log}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_volumes_survive_a_restart_and_list_in_one_call() {
    let mut agent = AgentProcess::start_with("dmctscale", &["--pool-file-size", "2G"], &[]).await;
    let channel = agent.channel().await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let mut client = VolumesClient::new(channel.clone());
        tasks.spawn(async move {
            for i in (worker..VOLUMES).step_by(8) {
                create(&mut client, &volume_id(i), MIB)
                    .await
                    .expect("create");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let create_secs = started.elapsed().as_secs_f64();
    let mut client = agent.volumes().await;
    let listed = Instant::now();
    let before = list(&mut client).await;
    let list_ms = listed.elapsed().as_millis();
    assert_eq!(before.len(), VOLUMES);
    let rss_serving = rss_kib(agent.pid());

    // A crash, then a restart that adopts every live device.
    agent.kill9().await;
    agent.restart().await;
    let log = agent.log();
    assert_eq!(logged_number(&log, "volumes="), VOLUMES as u64);
    assert_eq!(logged_number(&log, "rebuilt="), 0);
    let restart_ms = logged_number(&log, "millis=");
    let after = list(&mut agent.volumes().await).await;
    assert_eq!(after, before);
    let rss_restarted = rss_kib(agent.pid());
    println!(
        "MEASURED {VOLUMES} volumes: created in {create_secs:.1} s; one ListVolumes {list_ms} ms; \
         reconcile at restart {restart_ms} ms; agent RSS {} MiB serving, {} MiB after restart",
        rss_serving / 1024,
        rss_restarted / 1024
    );
    agent.destroy().await;
}
