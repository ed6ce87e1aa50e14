#![allow(clippy::unwrap_used)]

use super::*;
use crate::{
    ids::ThinId,
    store::{Change, SourceRecord, TransferPhase},
    testing::{TestHost, volume_id},
};

const NOW: i64 = 1_800_000_000;
const HOUR: i64 = 3600;

fn transfer_id(n: u32) -> TransferId {
    TransferId::parse(&format!("30000000-0000-4000-8000-{n:012}")).unwrap()
}

fn record(n: u32, phase: TransferPhase, finished_unix: Option<i64>) -> TransferRecord {
    TransferRecord {
        id: transfer_id(n),
        volume_id: volume_id(n % 7 + 1),
        source: SourceRecord::Device {
            path: "/dev/fake-source".into(),
            identity: None,
        },
        phase,
        clone_bytes: 1 << 20,
        region_bytes: 1 << 20,
        hydration_threshold: 1,
        hydration_batch_size: 1,
        max_bytes_per_second: 0,
        metadata_thin_id: ThinId(1),
        metadata_bytes: 1 << 20,
        created_unix: finished_unix.unwrap_or(NOW) - 10,
        finished_unix,
        message: String::new(),
        finalize_pause_micros: None,
        done_to_finalized_micros: None,
        source_released: false,
        export_withdrawn: false,
        export_claimed: false,
        switched_local: false,
        era_above: false,
        arrival_history: None,
        upstream: None,
        passed_on_to: None,
        return_trip: None,
        leave_snapshots: false,
        snapshots_listed: false,
        snapshots: Vec::new(),
        snapshots_arrived: Vec::new(),
        snapshot_bytes: 0,
    }
}

fn moved_over_nvme(mut record: TransferRecord, released: bool) -> TransferRecord {
    record.source = SourceRecord::NvmeTcp {
        subsystem_nqn: "nqn.2026-01.io.dmclone:v".into(),
        address: "10.0.0.1".into(),
        port: 4420,
        agent_endpoint: "10.0.0.1:9443".into(),
        release_token: None,
        auth: None,
    };
    record.source_released = released;
    record
}

fn ids(numbers: &[u32]) -> Vec<TransferId> {
    numbers.iter().map(|n| transfer_id(*n)).collect()
}

#[test]
fn finished_transfers_go_after_their_time_or_beyond_the_count() {
    let records = vec![
        record(1, TransferPhase::Done, Some(NOW - 3 * HOUR)),
        record(2, TransferPhase::Aborted, Some(NOW - 30)),
        record(3, TransferPhase::Failed, Some(NOW - 20)),
        record(4, TransferPhase::Done, Some(NOW - 10)),
        record(5, TransferPhase::Hydrating, None),
        record(6, TransferPhase::Finalizing, None),
    ];
    let by_time = Keeping {
        seconds: 2 * HOUR as u64,
        count: 100,
    };
    assert_eq!(past_keeping(&records, NOW, by_time), ids(&[1]));
    let by_count = Keeping {
        seconds: 24 * HOUR as u64,
        count: 2,
    };
    assert_eq!(past_keeping(&records, NOW, by_count), ids(&[2, 1]));
    let none = Keeping {
        seconds: 0,
        count: 0,
    };
    assert_eq!(past_keeping(&records, NOW, none), ids(&[4, 3, 2, 1]));
}

#[test]
fn a_done_move_is_kept_until_its_source_released_its_copy() {
    let old = NOW - 100 * HOUR;
    let records = vec![
        moved_over_nvme(record(1, TransferPhase::Done, Some(old)), false),
        moved_over_nvme(record(2, TransferPhase::Done, Some(old)), true),
        moved_over_nvme(record(3, TransferPhase::Aborted, Some(old)), false),
    ];
    let keep = Keeping {
        seconds: HOUR as u64,
        count: 0,
    };
    assert_eq!(past_keeping(&records, NOW, keep), ids(&[2, 3]));
}

fn view_of(n: u32, volume: u32, state: TransferState) -> TransferView {
    TransferView {
        id: transfer_id(n),
        volume_id: volume_id(volume),
        state,
        regions_hydrated: 0,
        regions_total: 1,
        region_bytes: 1 << 20,
        bytes_hydrated: 0,
        bytes_total: 1 << 20,
        bytes_per_second: 0.0,
        eta_seconds: None,
        hydration_threshold: 1,
        hydration_batch_size: 1,
        max_bytes_per_second: 0,
        device_path: "/dev/mapper/x".into(),
        message: String::new(),
        finalize_pause_micros: None,
        done_to_finalized_micros: None,
        source_released: false,
        deferred: false,
        source: "device /dev/x".into(),
        upstream: Vec::new(),
        passed_on_to: None,
        bytes_skipped: 0,
        snapshots_total: 0,
        snapshots_arrived: 0,
        snapshot_bytes_received: 0,
    }
}

fn numbers(page: &TransferPage) -> Vec<TransferId> {
    page.transfers.iter().map(|view| view.id.clone()).collect()
}

#[test]
fn pages_follow_id_order_and_filters() {
    let views: Vec<TransferView> = [5, 1, 4, 2, 3]
        .into_iter()
        .map(|n| {
            let state = if n % 2 == 0 {
                TransferState::Done
            } else {
                TransferState::Hydrating
            };
            view_of(n, n % 2, state)
        })
        .collect();
    let mut query = TransferQuery {
        page_size: 2,
        ..TransferQuery::default()
    };
    let first = page(views.clone(), &query);
    assert_eq!(numbers(&first), ids(&[1, 2]));
    assert_eq!(first.next, Some(transfer_id(2)));
    query.after = first.next;
    let second = page(views.clone(), &query);
    assert_eq!(numbers(&second), ids(&[3, 4]));
    query.after = second.next;
    let last = page(views.clone(), &query);
    assert_eq!((numbers(&last), last.next), (ids(&[5]), None));

    let of_volume = TransferQuery {
        volume: Some(volume_id(0)),
        ..TransferQuery::default()
    };
    assert_eq!(numbers(&page(views.clone(), &of_volume)), ids(&[2, 4]));
    let hydrating = TransferQuery {
        states: vec![TransferState::Hydrating, TransferState::Paused],
        ..TransferQuery::default()
    };
    assert_eq!(numbers(&page(views.clone(), &hydrating)), ids(&[1, 3, 5]));
    let exactly_full = TransferQuery {
        page_size: 5,
        ..TransferQuery::default()
    };
    assert_eq!(page(views, &exactly_full).next, None);
}

#[test]
fn a_page_never_holds_more_than_the_most() {
    let views = (0..MAX_PAGE as u32 + 5)
        .map(|n| view_of(n, 1, TransferState::Done))
        .collect();
    let unbounded = TransferQuery::default();
    let first = page(views, &unbounded);
    assert_eq!(first.transfers.len(), MAX_PAGE);
    assert_eq!(first.next, Some(transfer_id(MAX_PAGE as u32 - 1)));
}

async fn all_pages(agent: &crate::agent::Agent) -> (Vec<TransferView>, usize) {
    let (mut seen, mut pages) = (Vec::new(), 0);
    let mut query = TransferQuery::default();
    loop {
        let page = agent.transfers.list_page(&query).await.unwrap();
        pages += 1;
        seen.extend(page.transfers);
        match page.next {
            Some(next) => query.after = Some(next),
            None => return (seen, pages),
        }
    }
}

/// 5,000 finished transfers, three hours of them, in the store of an agent
/// that starts: it forgets those past the hour and beyond the newest 1,000;
/// listing pages the rest whole, and the metrics carry a series only for
/// what is left.
#[tokio::test]
async fn five_thousand_finished_transfers_are_forgotten_at_start() {
    let host = TestHost::with_config("[transfer]\nkeep_finished_seconds = 3600\n");
    let now = crate::records::unix_now();
    let finished: Vec<TransferRecord> = (0..5000u32)
        .map(|n| {
            let phase = [
                TransferPhase::Done,
                TransferPhase::Aborted,
                TransferPhase::Failed,
            ][n as usize % 3];
            record(n, phase, Some(now - i64::from(n) * 2))
        })
        .collect();
    let store = crate::store::Store::open(host.state_dir()).unwrap();
    let changes = finished.iter().map(Change::put).collect::<Result<_, _>>();
    store.commit(changes.unwrap()).unwrap();
    drop(store);

    let agent = host.start().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (left, pages) = loop {
        // A listing taken while the forgetting runs may span it: its first
        // page still saw more to come.
        let (listed, pages) = all_pages(&agent).await;
        if (listed.len() <= 1000 && pages == 1) || std::time::Instant::now() > deadline {
            break (listed, pages);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // The newest 1,000 (all within the hour) are ids 0..999.
    let expected: Vec<TransferId> = (0..1000).map(transfer_id).collect();
    let left_ids: Vec<TransferId> = left.iter().map(|v| v.id.clone()).collect();
    assert_eq!((left_ids, pages), (expected, 1));
    let text = agent.render_metrics().await.unwrap();
    let series = text
        .lines()
        .filter(|line| line.starts_with("dmclone_transfer_hydrated_bytes{"))
        .count();
    assert_eq!(series, 1000);
    assert_eq!(agent.transfers.forget_finished(now).await.unwrap(), 0);
}

/// A transfer whose volume still names it is mid-finish (an abort cut by a
/// crash): it stays until the agent completes it.
#[tokio::test]
async fn a_transfer_its_volume_still_names_is_not_forgotten() {
    let host = TestHost::with_config("[transfer]\nkeep_finished_seconds = 0\nkeep_finished = 0\n");
    let agent = host.start().await.unwrap();
    let mut aborting = record(1, TransferPhase::Aborted, Some(NOW - HOUR));
    aborting.volume_id = volume_id(9);
    let mut volume = crate::records::new_record(&volume_id(9), 1 << 20);
    volume.pending = None;
    volume.transfer = Some(aborting.id.clone());
    // One transaction: the start's own sweep may run at any moment.
    let failed = record(2, TransferPhase::Failed, Some(NOW));
    agent
        .ctx
        .store_call(move |store| {
            store.commit(vec![
                Change::put(&volume)?,
                Change::put(&aborting)?,
                Change::put(&failed)?,
            ])
        })
        .await
        .unwrap();
    // The start's own sweep may have run meanwhile: what is left counts.
    agent.transfers.forget_finished(NOW).await.unwrap();
    let (left, _) = all_pages(&agent).await;
    assert_eq!(
        left.iter().map(|v| v.id.clone()).collect::<Vec<_>>(),
        ids(&[1])
    );
}
