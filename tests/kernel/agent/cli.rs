//! dmclonectl against a real agent: each volume command, its JSON, and the
//! exit statuses that tell usage errors, missing objects and an unreachable
//! agent apart.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use super::{api::VOL_A, fixture::AgentProcess};
use crate::support::{MIB, pattern, write_at};

fn dmclonectl() -> PathBuf {
    let agent = super::fixture::agent_binary();
    agent.with_file_name("dmclonectl")
}

#[allow(clippy::disallowed_types)] // the CLI under test is a process
fn run(agent: &AgentProcess, args: &[&str]) -> Output {
    std::process::Command::new(dmclonectl())
        .arg("--socket")
        .arg(agent.socket())
        .args(args)
        .output()
        .expect("run dmclonectl")
}

fn json(agent: &AgentProcess, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = run(agent, &all);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "{args:?}: {err}: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn dmclonectl_drives_volumes_and_reports_with_exit_codes() {
    let agent = AgentProcess::start_with(
        "dmctcli",
        &[
            "--nvme-auth",
            crate::support::nvme_auth_policy(),
            "--pool-file-size",
            "1G",
            "--nvme-export-address",
            "127.0.0.1",
            "--nvme-export-port",
            "4450",
            "--nvme-export-port-id",
            "4450",
        ],
        &[],
    )
    .await;
    let node = json(&agent, &["node"]);
    assert_eq!(node["api_version"], "dmclone.v1");
    assert_eq!(node["pool"]["health"], "healthy");
    assert!(node["pool"]["data_total_bytes"].as_u64().unwrap() > 900 * MIB);
    assert!(
        node["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "clone")
    );

    let created = json(&agent, &["volume", "create", VOL_A, "48M"]);
    assert_eq!(created["volumes"][0]["size_bytes"], 48 * MIB);
    assert_eq!(created["volumes"][0]["state"], "available");
    let published = json(&agent, &["volume", "publish", VOL_A]);
    let path = published["device_path"].as_str().unwrap().to_owned();
    assert!(
        path.ends_with(VOL_A) && std::path::Path::new(&path).exists(),
        "{published}"
    );
    let extended = json(&agent, &["volume", "extend", VOL_A, "64M"]);
    assert_eq!(extended["volumes"][0]["size_bytes"], 64 * MIB);
    let listed = json(&agent, &["volume", "list"]);
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(listed["volumes"][0]["published"], true);
    assert_eq!(listed["volumes"][0]["device_path"], path.as_str());

    let table = run(&agent, &["volume", "list"]);
    let text = String::from_utf8(table.stdout).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("VOLUME"), "{text}");
    let row = lines.next().unwrap();
    assert!(
        row.contains(VOL_A) && row.contains("64.0MiB") && row.contains("available"),
        "{text}"
    );
    let human_node = String::from_utf8(run(&agent, &["node"]).stdout).unwrap();
    assert!(human_node.contains("pool       healthy"), "{human_node}");

    // Exit statuses: 1 server refusal, 2 invalid, 3 not found, 4 unreachable.
    let refused = run(&agent, &["volume", "delete", VOL_A]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unpublish it"), "{stderr}");
    assert!(stderr.contains("[VOLUME_PUBLISHED]"), "{stderr}");
    assert_eq!(
        run(&agent, &["volume", "show", "not-a-uuid"]).status.code(),
        Some(2)
    );
    assert_eq!(
        run(&agent, &["volume", "create", VOL_A, "lots"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(
            &agent,
            &["volume", "show", "9f9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11"]
        )
        .status
        .code(),
        Some(3)
    );
    #[allow(clippy::disallowed_types)]
    let unreachable = std::process::Command::new(dmclonectl())
        .args(["--socket", "/nonexistent/agent.sock", "node"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(4));

    let unpublished = json(&agent, &["volume", "unpublish", VOL_A]);
    assert_eq!(unpublished["result"], "unpublished");
    let deleted = json(&agent, &["volume", "delete", VOL_A]);
    assert_eq!(deleted["result"], "deleted");
    assert!(
        json(&agent, &["volume", "list"])["volumes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    json(&agent, &["volume", "create", VOL_A, "8M"]);
    let host = "nqn.2014-08.org.nvmexpress:uuid:0c000000-0000-4000-8000-0000000000c1";
    let exported = json(&agent, &["volume", "export", VOL_A, "--host-nqn", host]);
    assert_eq!(exported["allowed_host_nqn"], host);
    assert_eq!(
        (exported["address"].as_str(), exported["port"].as_u64()),
        (Some("127.0.0.1"), Some(4450))
    );
    assert!(
        exported["subsystem_nqn"].as_str().unwrap().ends_with(VOL_A),
        "{exported}"
    );
    assert_eq!(exported["release_token"], "", "an attachment's export");
    assert_eq!(
        json(&agent, &["volume", "unexport", VOL_A])["result"],
        "unexported"
    );
    // A move's export: its token, or --force, withdraws it.
    let export_for_move = || {
        json(
            &agent,
            &[
                "volume",
                "export",
                VOL_A,
                "--host-nqn",
                host,
                "--for-transfer",
            ],
        )
    };
    let for_move = export_for_move();
    let token = for_move["release_token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64, "{for_move}");
    let refused = run(&agent, &["volume", "unexport", VOL_A]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("release token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let with_token = std::process::Command::new(dmclonectl())
        .arg("--socket")
        .arg(agent.socket())
        .args(["--json", "volume", "unexport", VOL_A])
        .env("DMCLONE_RELEASE_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        with_token.status.success(),
        "{}",
        String::from_utf8_lossy(&with_token.stderr)
    );
    export_for_move();
    assert_eq!(
        json(&agent, &["volume", "unexport", VOL_A, "--force"])["result"],
        "unexported"
    );
    let snapshot = "5f9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01";
    let taken = json(&agent, &["snapshot", "create", snapshot, "--volume", VOL_A]);
    assert_eq!(taken["snapshots"][0]["size_bytes"], 8 * MIB);
    let listed = json(&agent, &["snapshot", "list", "--volume", VOL_A]);
    assert_eq!(listed["snapshots"][0]["snapshot_id"], snapshot);
    let table = String::from_utf8(run(&agent, &["snapshot", "list"]).stdout).unwrap();
    assert!(
        table.starts_with("SNAPSHOT") && table.contains(snapshot),
        "{table}"
    );
    assert_eq!(
        run(&agent, &["volume", "delete", VOL_A]).status.code(),
        Some(1),
        "snapshots block the delete"
    );
    assert_eq!(
        json(&agent, &["snapshot", "delete", snapshot])["result"],
        "deleted"
    );
    assert_eq!(
        json(&agent, &["volume", "delete", VOL_A])["result"],
        "deleted"
    );
    let completions = run(&agent, &["completions", "bash"]);
    assert!(String::from_utf8_lossy(&completions.stdout).contains("dmclonectl"));
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dmclonectl_starts_watches_and_steers_a_transfer() {
    let size = 48 * MIB;
    let source = crate::support::LoopDisk::with_pattern(size, 111);
    let agent = AgentProcess::start("dmctclixfer").await;
    let transfer = "3e9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01";
    let started = json(
        &agent,
        &[
            "transfer",
            "start",
            "--volume",
            VOL_A,
            "--size",
            "48M",
            "--id",
            transfer,
            "--device",
            &source.path().display().to_string(),
            "--deferred",
            "--region",
            "64K",
            "--threshold",
            "1",
            "--batch",
            "1",
        ],
    );
    assert_eq!(started["transfers"][0]["state"], "deferred");
    assert_eq!(started["transfers"][0]["deferred"], true);
    assert_eq!(started["transfers"][0]["region_bytes"], 65536);
    let listed = json(&agent, &["transfer", "list"]);
    assert_eq!(listed["transfers"][0]["transfer_id"], transfer);
    let of_volume = json(
        &agent,
        &["transfer", "list", "--volume", VOL_A, "--state", "deferred"],
    );
    assert_eq!(of_volume["transfers"][0]["transfer_id"], transfer);
    let finished = json(
        &agent,
        &["transfer", "list", "--state", "done", "--state", "failed"],
    );
    assert_eq!(finished["transfers"].as_array().map(Vec::len), Some(0));
    let throttled = json(
        &agent,
        &[
            "transfer",
            "throttle",
            transfer,
            "--threshold",
            "2",
            "--max-rate",
            "4M",
        ],
    );
    assert_eq!(throttled["transfers"][0]["hydration_threshold"], 2);
    assert_eq!(throttled["transfers"][0]["max_bytes_per_second"], 4 * MIB);
    let committed = json(&agent, &["transfer", "commit", transfer]);
    assert_eq!(committed["transfers"][0]["state"], "hydrating");
    assert_eq!(committed["transfers"][0]["deferred"], false);
    assert_eq!(
        json(&agent, &["transfer", "pause", transfer])["transfers"][0]["state"],
        "paused"
    );
    assert_eq!(
        json(&agent, &["transfer", "resume", transfer])["transfers"][0]["state"],
        "hydrating"
    );

    // watch, not on a terminal: plain lines until the transfer ends.
    let watched = run(&agent, &["transfer", "watch", transfer]);
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let text = String::from_utf8(watched.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    assert!(
        lines.iter().all(|l| l.starts_with(&transfer[..8])),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("hydrating") && l.contains('%')),
        "{text}"
    );
    let last = lines.last().unwrap();
    assert!(
        last.contains("done") && last.contains("(100%)") && last.contains("[===================="),
        "{text}"
    );
    let shown = json(&agent, &["transfer", "show", transfer]);
    assert_eq!(shown["transfers"][0]["state"], "done");
    assert_eq!(shown["transfers"][0]["bytes_hydrated"], 48 * MIB);
    assert!(
        shown["transfers"][0]["finalize_pause_micros"]
            .as_u64()
            .unwrap()
            > 0
    );
    let table = String::from_utf8(run(&agent, &["transfer", "list"]).stdout).unwrap();
    assert!(
        table.starts_with("TRANSFER") && table.contains("done"),
        "{table}"
    );
    assert_eq!(
        run(&agent, &["transfer", "abort", transfer]).status.code(),
        Some(1),
        "a finished transfer cannot be aborted"
    );
    assert_eq!(
        run(
            &agent,
            &["transfer", "show", "4e9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d01"]
        )
        .status
        .code(),
        Some(3)
    );
    agent.destroy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dmclonectl_checkpoints_and_reports_changed_blocks() {
    let agent = AgentProcess::start("dmctclicbt").await;
    json(&agent, &["volume", "create", VOL_A, "16M"]);
    let published = json(&agent, &["volume", "publish", VOL_A]);
    let device = PathBuf::from(published["device_path"].as_str().unwrap());
    let shown = json(&agent, &["volume", "show", VOL_A]);
    assert_eq!(shown["volumes"][0]["change_tracking"], true, "{shown}");
    let era = json(&agent, &["volume", "checkpoint", VOL_A])["era"]
        .as_u64()
        .unwrap();

    // 4 KiB inside the 64 KiB block at 1 MiB + 128 KiB.
    let block = MIB + 128 * 1024;
    write_at(&device, block + 12 * 1024, &pattern(7, 0, 4096));
    let since = era.to_string();
    let changes = json(&agent, &["volume", "changes", VOL_A, "--since-era", &since]);
    assert_eq!(
        changes["extents"],
        serde_json::json!([{ "offset_bytes": block, "length_bytes": 65536 }]),
        "{changes}"
    );
    assert_eq!(
        (&changes["since_era"], &changes["block_bytes"]),
        (&serde_json::json!(era), &serde_json::json!(65536)),
        "{changes}"
    );
    assert_eq!(changes["changed_bytes"], 65536, "{changes}");
    let table = run(&agent, &["volume", "changes", VOL_A, "--since-era", &since]);
    let text = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("OFFSET"), "{text}");
    assert!(
        lines[1].starts_with(&block.to_string()) && lines[1].contains("64.0KiB"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("1 extent, 64.0KiB (65536 bytes) changed since era"),
        "{text}"
    );
    // Shown with --nocapture: the output of record.
    print!("$ dmclonectl volume changes {VOL_A} --since-era {since}\n{text}");
    println!("$ dmclonectl --json volume changes ...\n{changes:#}");

    // Human checkpoint: the era alone; later eras are part of "since".
    let next = String::from_utf8(run(&agent, &["volume", "checkpoint", VOL_A]).stdout).unwrap();
    println!("$ dmclonectl volume checkpoint {VOL_A}\n{next}");
    assert!(next.trim().parse::<u64>().unwrap() > era, "{next}");
    let snapshot = "5f9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d02";
    json(&agent, &["snapshot", "create", snapshot, "--volume", VOL_A]);
    let shown = json(&agent, &["snapshot", "show", snapshot]);
    assert!(
        shown["snapshots"][0]["era"].as_u64().unwrap() > era,
        "{shown}"
    );
    let after = json(
        &agent,
        &["volume", "changes", VOL_A, "--since-snapshot", snapshot],
    );
    assert_eq!(after["extent_count"], 0, "{after}");
    assert_eq!(
        json(&agent, &["volume", "changes", VOL_A, "--since-era", &since])["extents"],
        changes["extents"]
    );
    agent.destroy().await;
}

/// `dmclonectl node` and `volume create` as a process of `uid` with primary
/// group `gid` and supplementary `groups` (util-linux setpriv sets them);
/// whether each succeeded, and what the refusal said.
#[allow(clippy::disallowed_types)] // the CLI under test is a process
fn as_user(socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> Vec<(bool, String)> {
    let calls: [&[&str]; 2] = [&["node"], &["volume", "create", VOL_A, "8M"]];
    let groups = match groups {
        [] => "--clear-groups".to_owned(),
        some => format!(
            "--groups={}",
            some.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    calls
        .iter()
        .map(|args| {
            let output = std::process::Command::new("setpriv")
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    &groups,
                ])
                .arg(dmclonectl())
                .arg("--socket")
                .arg(socket)
                .args(*args)
                .output()
                .expect("run setpriv (util-linux)");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        })
        .collect()
}

/// `socket_readers`: the socket becomes 0660 with the group; a process of
/// that group (primary or supplementary) may read and nothing more; any
/// other user may not call at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_group_reads_on_the_socket_and_nobody_else_calls() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const READERS: u32 = 4242;
    let run = tempfile::Builder::new()
        .prefix("dmctgrp")
        .tempdir_in("/run")
        .unwrap();
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.path().join("dmclone").join("agent.sock");
    let socket_text = socket.display().to_string();
    let agent = AgentProcess::start_with(
        "dmctgrp",
        &[
            "--pool-file-size",
            "256M",
            "--socket",
            &socket_text,
            "--socket-readers",
            "4242",
        ],
        &[],
    )
    .await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.gid()),
        (0o660, READERS),
        "socket mode and group"
    );
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert!(
        dir.mode() & 0o001 != 0 || (dir.gid() == READERS && dir.mode() & 0o010 != 0),
        "the group can reach the socket: {:o}",
        dir.mode()
    );

    for (who, uid, gid, groups) in [
        ("primary group", 1000, READERS, vec![]),
        ("supplementary group", 1001, 1001, vec![READERS]),
    ] {
        let outcomes = as_user(&socket, uid, gid, &groups);
        assert!(outcomes[0].0, "{who} reads: {}", outcomes[0].1);
        assert!(!outcomes[1].0, "{who} may not create");
        assert!(
            outcomes[1].1.contains("reader") && outcomes[1].1.contains("may not call"),
            "{who}: {}",
            outcomes[1].1
        );
    }
    let stranger = as_user(&socket, 1002, 1002, &[]);
    assert!(stranger.iter().all(|(ok, _)| !ok), "{stranger:?}");
    assert!(
        stranger[0].1.contains("Permission denied") || stranger[0].1.contains("only root"),
        "{}",
        stranger[0].1
    );
    assert!(
        json(&agent, &["volume", "list"])["volumes"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was created"
    );
    agent.destroy().await;
}
