//! Chained moves: three agents in one guest. A volume moves A→B and, while
//! B still copies it (slowly, under a byte limit), on to C, which reads what
//! B lacks through B from A. Writes follow the volume: on B while it
//! arrives there, then on C. C ends with every byte; then B's partial copy
//! and A's copy are released, in that order. The middle host's agent
//! killed, and the first host unreachable, cost time, not data.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use dmclone::api::proto::v1::{
    AbortTransferRequest, GetNodeInfoRequest, HydrationKnobs, ThrottleTransferRequest, Transfer,
    TransferState,
};
use sha2::{Digest, Sha256};
use tonic::Code;

use super::{
    api::{create, get, publish, unpublish},
    fixture::AgentProcess,
    moves::{
        Ids, agent, configfs_has, export, fill, get_transfer, host_nqn, public, start_move_with,
        transfers, wait_released,
    },
    outage::Relay,
};
use crate::support::*;

const SIZE: u64 = 64 * MIB;
/// B's copy from A crawls, so that it is still arriving while C copies.
const SLOW: u64 = MIB;

/// What the volume must hold: A's content, then every write since.
struct Expected(Vec<u8>);

impl Expected {
    fn new(seed: u64) -> Self {
        Self(pattern(seed, 0, SIZE as usize))
    }

    fn write(&mut self, device: &Path, offset: u64, data: &[u8]) {
        write_at(device, offset, data);
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.0))
    }
}

async fn node_id(agent: &AgentProcess) -> String {
    agent
        .node()
        .await
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_id
}

fn slow() -> Option<HydrationKnobs> {
    Some(HydrationKnobs {
        max_bytes_per_second: SLOW,
        ..HydrationKnobs::default()
    })
}

/// Waits until `check` holds for the transfer (polled; 120 s at most).
async fn wait_for(ids: Ids, agent: &AgentProcess, what: &str, check: impl Fn(&Transfer) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = get_transfer(ids, agent).await;
        if check(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "not in time: {what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes 64 KiB into a different MiB of `device` each round until
/// stopped; answers how many writes it made and the last seed per MiB.
fn writer(
    device: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u64, BTreeMap<u64, u64>)> {
    std::thread::spawn(move || {
        let mut last_seed = BTreeMap::new();
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let chunk = (round * 11) % (SIZE / MIB);
            let seed = 7000 + round;
            write_at(
                &device,
                chunk * MIB + 256 * 1024,
                &pattern(seed, 0, 64 * 1024),
            );
            last_seed.insert(chunk, seed);
            round += 1;
        }
        (round, last_seed)
    })
}

/// Three agents and a 64 MiB volume on A, filled and unpublished.
async fn three_hosts(
    prefix: &str,
    first_port: u16,
    ids: Ids,
    seed: u64,
) -> ([AgentProcess; 3], Expected) {
    let uuid = |n: u16| format!("0c{n:06x}-0000-4000-8000-0000000000{:02}", n % 100);
    let mut hosts = Vec::new();
    for (n, name) in ["a", "b", "c"].into_iter().enumerate() {
        let port = first_port + n as u16;
        hosts.push(agent(&format!("{prefix}{name}"), port, &uuid(port)).await);
    }
    let [a, b, c]: [AgentProcess; 3] = hosts.try_into().ok().unwrap();
    let mut volumes_a = a.volumes().await;
    create(&mut volumes_a, ids.volume, SIZE).await.unwrap();
    let path_a = publish(&mut volumes_a, ids.volume).await.unwrap();
    fill(Path::new(&path_a), seed, SIZE);
    unpublish(&mut volumes_a, ids.volume).await.unwrap();
    ([a, b, c], Expected::new(seed))
}

/// Lifts the transfer's byte limit.
async fn full_speed(ids: Ids, agent: &AgentProcess) {
    transfers(agent)
        .await
        .throttle_transfer(ThrottleTransferRequest {
            transfer_id: ids.transfer.into(),
            knobs: Some(HydrationKnobs {
                max_bytes_per_second: 1 << 40,
                ..HydrationKnobs::default()
            }),
        })
        .await
        .unwrap();
}

/// B's transfer ended by passing the volume on, and A let go of its copy.
async fn b_passed_on_and_released_a(ab: Ids, a: &AgentProcess, b: &AgentProcess) {
    wait_for(ab, b, "A released", |t| {
        t.source_released && !t.passed_on_to.is_empty()
    })
    .await;
    assert_eq!(
        get(&mut a.volumes().await, ab.volume)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

/// Starts the slow move A→B and waits until B knows where it comes from.
async fn arrive_slowly(ab: Ids, a: &AgentProcess, b: &AgentProcess) {
    let to_b = export(ab, a, b).await.unwrap();
    start_move_with(ab, a, &to_b, b, false, slow())
        .await
        .unwrap();
    let a_node = node_id(a).await;
    wait_for(ab, b, "B knows its upstream", |t| {
        t.upstream == [a_node.clone()]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_moves_on_while_arriving_and_every_copy_is_released_in_order() {
    let volume = "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d40";
    let ab = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d40",
    };
    let bc = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d41",
    };
    let ([a, b, c], mut expected) = three_hosts("dmctch", 4451, ab, 131).await;
    arrive_slowly(ab, &a, &b).await;
    // Written on B while it arrives: through dm-era and the clone.
    for n in 0..8u64 {
        let offset = n * 7 * MIB + 12 * 1024;
        expected.write(&public(ab, &b), offset, &pattern(600 + n, 0, 48 * 1024));
    }
    let mut volumes_b = b.volumes().await;
    unpublish(&mut volumes_b, volume).await.unwrap();

    let to_c = export(bc, &b, &c).await.unwrap();
    // C copies slowly too until the chain has been looked at.
    let onward = start_move_with(bc, &b, &to_c, &c, false, slow())
        .await
        .unwrap();
    assert_eq!(onward.device_path, public(bc, &c).display().to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(public(bc, &c), stop.clone());
    let (a_node, b_node) = (node_id(&a).await, node_id(&b).await);
    wait_for(bc, &c, "C knows its chain", |t| {
        t.upstream == [b_node.clone(), a_node.clone()]
    })
    .await;
    assert!(
        get_transfer(ab, &b).await.bytes_hydrated < SIZE,
        "B is still arriving while C copies through it"
    );
    assert!(
        get(&mut a.volumes().await, volume).await.is_ok(),
        "A keeps its copy while no host has every byte"
    );
    full_speed(bc, &c).await;

    let done = wait_released(bc, &c).await;
    stop.store(true, Ordering::Relaxed);
    let (writes, last_seed) = writing.join().expect("no write on C failed");
    assert!(
        writes > 10,
        "C was written through its move: {writes} writes"
    );
    for (chunk, seed) in last_seed {
        let at = (chunk * MIB + 256 * 1024) as usize;
        expected.0[at..at + 64 * 1024].copy_from_slice(&pattern(seed, 0, 64 * 1024));
    }
    assert_eq!(sha256_of(&public(bc, &c), SIZE), expected.sha256());
    println!(
        "MEASURED chain A->B->C: C done with {writes} writes on it; finalize pause {} us",
        done.finalize_pause_micros
    );

    // B passed the volume on without finishing its own copy, and released A.
    let passed = get_transfer(ab, &b).await;
    assert_eq!(passed.state(), TransferState::Done);
    assert_eq!(passed.passed_on_to, host_nqn(&c).await);
    assert_eq!(
        get(&mut volumes_b, volume).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(!configfs_has(&to_c.subsystem_nqn), "B's export is gone");
    b_passed_on_and_released_a(ab, &a, &b).await;
    let left: Vec<String> = std::fs::read_dir("/dev/mapper")
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(volume) && !name.starts_with(&c.prefix))
        .collect();
    assert!(
        left.is_empty(),
        "A or B kept devices of the volume: {left:?}"
    );
    c.destroy().await;
    b.destroy().await;
    a.destroy().await;
}

/// The middle of a chain killed mid-copy and started again: C's copy goes
/// on through B's kernel devices while B's agent is down, B's agent adopts
/// them, and the chain ends as if nothing happened. Before that, a move to
/// C aborted leaves B arriving as it was.
#[tokio::test(flavor = "multi_thread")]
async fn the_middle_of_a_chain_killed_and_an_onward_move_aborted_converge() {
    let volume = "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d42";
    let ab = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d42",
    };
    let aborted = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d43",
    };
    let bc = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d44",
    };
    let ([a, mut b, c], expected) = three_hosts("dmctck", 4461, ab, 137).await;
    arrive_slowly(ab, &a, &b).await;
    let mut volumes_b = b.volumes().await;
    unpublish(&mut volumes_b, volume).await.unwrap();

    let to_c = export(aborted, &b, &c).await.unwrap();
    start_move_with(aborted, &b, &to_c, &c, false, slow())
        .await
        .unwrap();
    let refused = transfers(&b)
        .await
        .abort_transfer(AbortTransferRequest {
            transfer_id: ab.transfer.into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    transfers(&c)
        .await
        .abort_transfer(AbortTransferRequest {
            transfer_id: aborted.transfer.into(),
            force: false,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while configfs_has(&to_c.subsystem_nqn) {
        assert!(Instant::now() < deadline, "C withdraws B's export");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b_now = get_transfer(ab, &b).await;
    assert_eq!(b_now.state(), TransferState::Hydrating, "{b_now:?}");

    let to_c = export(bc, &b, &c).await.unwrap();
    start_move_with(bc, &b, &to_c, &c, false, slow())
        .await
        .unwrap();
    wait_for(bc, &c, "C copies", |t| t.bytes_hydrated >= 2 * MIB).await;
    b.kill9().await;
    let before = get_transfer(bc, &c).await.bytes_hydrated;
    wait_for(bc, &c, "C copies while B's agent is down", |t| {
        t.bytes_hydrated >= before + 2 * MIB
    })
    .await;
    b.restart().await;
    full_speed(bc, &c).await;
    wait_released(bc, &c).await;
    assert_eq!(sha256_of(&public(bc, &c), SIZE), expected.sha256());
    b_passed_on_and_released_a(ab, &a, &b).await;
    c.destroy().await;
    b.destroy().await;
    a.destroy().await;
}

/// A unreachable mid-chain (its network cut for 15 s): B, barely copying,
/// and C, which reads through B what B lacks, both degrade; nothing fails,
/// and once A is back C finishes with every byte and the chain is released.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_host_of_a_chain_unreachable_degrades_the_chain_and_loses_nothing() {
    let volume = "8c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d45";
    let ab = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d45",
    };
    let bc = Ids {
        volume,
        transfer: "9c9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d46",
    };
    let ([a, b, c], expected) = three_hosts("dmctcu", 4471, ab, 139).await;
    // B reaches A only through the relay: cutting it cuts A off.
    let relay = Relay::start(4474, 4471).await;
    let mut to_b = export(ab, &a, &b).await.unwrap();
    to_b.transport_service_id = u32::from(relay.port());
    let crawl = Some(HydrationKnobs {
        max_bytes_per_second: 64 * 1024,
        ..HydrationKnobs::default()
    });
    start_move_with(ab, &a, &to_b, &b, false, crawl)
        .await
        .unwrap();
    let a_node = node_id(&a).await;
    wait_for(ab, &b, "B knows its upstream", |t| {
        t.upstream == [a_node.clone()]
    })
    .await;
    unpublish(&mut b.volumes().await, volume).await.unwrap();
    let to_c = export(bc, &b, &c).await.unwrap();
    let steady = Some(HydrationKnobs {
        max_bytes_per_second: 2 * MIB,
        ..HydrationKnobs::default()
    });
    start_move_with(bc, &b, &to_c, &c, false, steady)
        .await
        .unwrap();
    wait_for(bc, &c, "C copies through B", |t| {
        t.bytes_hydrated >= 8 * MIB
    })
    .await;

    relay.cut();
    wait_for(bc, &c, "C degraded", |t| {
        t.state() == TransferState::Degraded
    })
    .await;
    wait_for(ab, &b, "B degraded for its lost source", |t| {
        t.state() == TransferState::Degraded && t.message.contains("the connection to the source")
    })
    .await;
    let stalled = get_transfer(bc, &c).await;
    assert!(stalled.bytes_hydrated < SIZE, "{stalled:?}");
    tokio::time::sleep(Duration::from_secs(15)).await;
    relay.restore().await;
    full_speed(bc, &c).await;
    wait_released(bc, &c).await;
    assert_eq!(sha256_of(&public(bc, &c), SIZE), expected.sha256());
    b_passed_on_and_released_a(ab, &a, &b).await;
    relay.cut();
    c.destroy().await;
    b.destroy().await;
    a.destroy().await;
}
