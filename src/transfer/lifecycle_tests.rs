//! Transfers on the destination against the in-memory kernel, with a local
//! block device as the source: the clone stack, deferred starts and
//! commits, pause/resume/throttle as dm-clone messages, abort, the
//! event-driven finalize, retries, refusals, and crashes at every transfer
//! failpoint followed by a restart.

#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::*;
use crate::{
    error::AgentError,
    ids::{TransferId, VolumeId},
    testing::{MIB, TestHost, crash, refusal, transfer_reaches, volume_id},
};

const SOURCE: &str = "/dev/fake-source";

fn transfer_id(n: u32) -> TransferId {
    TransferId::parse(&format!("20000000-0000-4000-8000-{n:012}")).unwrap()
}

fn request(n: u32, volume: &VolumeId, deferred: bool) -> StartRequest {
    StartRequest {
        transfer: transfer_id(n),
        volume: volume.clone(),
        size_bytes: 8 * MIB,
        source: Source::Device(PathBuf::from(SOURCE)),
        deferred,
        knobs: KnobRequest::default(),
        leave_snapshots: false,
    }
}

/// A host with an 8 MiB source device.
fn host() -> TestHost {
    let host = TestHost::new();
    host.kernel
        .add_block_device_at(std::path::Path::new(SOURCE), 8 * MIB / 512);
    host
}

/// An agent on `host` with volume 1 arriving (transfer 1, hydrating).
async fn arriving(host: &TestHost) -> (Arc<crate::agent::Agent>, VolumeId) {
    started(host, false).await
}

/// A volume arriving by a deferred transfer (a live migration's prepare).
async fn deferred(host: &TestHost) -> (Arc<crate::agent::Agent>, VolumeId) {
    started(host, true).await
}

async fn started(host: &TestHost, deferred: bool) -> (Arc<crate::agent::Agent>, VolumeId) {
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent
        .transfers
        .start_transfer(request(1, &id, deferred))
        .await
        .unwrap();
    (agent, id)
}

fn public(id: &VolumeId) -> String {
    format!("dmt-{id}")
}

/// The device beneath dm-era: the clone while arriving, the thin device after.
fn lower(id: &VolumeId) -> String {
    format!("dmt-lower-{id}")
}

fn journal_has(host: &TestHost, entry: &str) -> bool {
    host.kernel.journal().iter().any(|e| e == entry)
}

#[tokio::test]
async fn a_started_transfer_presents_the_volume_through_dm_clone() {
    let host = host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let view = agent
        .transfers
        .start_transfer(request(1, &id, false))
        .await
        .unwrap();
    assert_eq!(view.state, TransferState::Hydrating);
    assert_eq!(
        view.device_path,
        PathBuf::from(format!("/dev/mapper/{}", public(&id)))
    );
    let table = host.kernel.table_text(&lower(&id)).unwrap();
    assert!(table.starts_with("0 16384 clone "), "{table}");
    let above = host.kernel.table_text(&public(&id)).unwrap();
    assert!(
        above.starts_with("0 16384 era "),
        "dm-era above the clone: {above}"
    );
    // The clone is built idle and told to copy once the stack above it is
    // up: its copying would slow the steps that build it.
    assert!(table.contains("no_hydration"), "{table}");
    let journal = host.kernel.journal();
    let at = |entry: &str| {
        journal
            .iter()
            .position(|e| e == entry)
            .unwrap_or_else(|| panic!("no {entry:?} in {journal:?}"))
    };
    let enabled = at(&format!("message {} enable_hydration", lower(&id)));
    assert!(
        at(&format!("create {}", public(&id))) < enabled,
        "{journal:?}"
    );
    let volume = agent.volumes.get_volume(&id).await.unwrap();
    assert_eq!(volume.state, crate::volume::VolumeState::Hydrating);
    assert!(
        journal_has(&host, &format!("zero dmt-cmeta-{id}")),
        "fresh clone metadata"
    );
}

#[tokio::test]
async fn hydration_complete_raises_the_event_and_the_monitor_finalizes_onto_dm_era() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    let ids_while_arriving = host.kernel.thin_ids("dmt-pool").len();
    host.kernel.hydrate(&lower(&id));
    let done = transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
    assert!(done.finalize_pause_micros.is_some());
    let journal = host.kernel.journal();
    let at = |entry: String| journal.iter().position(|e| *e == entry);
    let flushed = at(format!("flush {}", lower(&id)));
    let suspended = at(format!("suspend {}", lower(&id)));
    assert!(
        flushed.is_some() && flushed < suspended,
        "the clone commits its end before the swap: {journal:?}"
    );
    let table = host.kernel.table_text(&public(&id)).unwrap();
    assert!(table.starts_with("0 16384 era "), "{table}");
    let beneath = host.kernel.table_text(&lower(&id)).unwrap();
    assert!(beneath.starts_with("0 16384 thin "), "{beneath}");
    assert!(
        !journal_has(&host, &format!("suspend {}", public(&id))),
        "dm-era is not touched by the swap: {journal:?}"
    );
    assert!(!host.devices().contains(&format!("dmt-cmeta-{id}")));
    assert_eq!(
        host.kernel.thin_ids("dmt-pool").len(),
        ids_while_arriving - 1,
        "the clone metadata's thin id is freed"
    );
    let volume = agent.volumes.get_volume(&id).await.unwrap();
    assert_eq!(volume.state, crate::volume::VolumeState::Available);
    agent.changes.mark_checkpoint(&id).await.unwrap();
}

#[tokio::test]
async fn a_deferred_transfer_copies_nothing_until_committed() {
    let host = host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let view = agent
        .transfers
        .start_transfer(request(1, &id, true))
        .await
        .unwrap();
    assert_eq!(view.state, TransferState::Deferred);
    assert!(view.deferred, "the view says so, whatever its state");
    let enable = format!("message {} enable_hydration", lower(&id));
    assert!(
        host.kernel
            .table_text(&lower(&id))
            .unwrap()
            .contains("no_hydration")
            && !journal_has(&host, &enable),
        "a deferred clone copies nothing before the commit"
    );
    let view = agent
        .transfers
        .commit_transfer(&transfer_id(1))
        .await
        .unwrap();
    assert_eq!(view.state, TransferState::Hydrating);
    assert!(!view.deferred, "committed");
    assert!(journal_has(
        &host,
        &format!("message {} enable_hydration", lower(&id))
    ));
}

#[tokio::test]
async fn pause_resume_and_throttle_are_clone_messages() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    let paused = agent
        .transfers
        .pause_transfer(&transfer_id(1))
        .await
        .unwrap();
    assert_eq!(paused.state, TransferState::Paused);
    assert!(journal_has(
        &host,
        &format!("message {} disable_hydration", lower(&id))
    ));
    let resumed = agent
        .transfers
        .resume_transfer(&transfer_id(1))
        .await
        .unwrap();
    assert_eq!(resumed.state, TransferState::Hydrating);
    let knobs = KnobRequest {
        hydration_threshold: Some(4),
        hydration_batch_size: Some(2),
        ..KnobRequest::default()
    };
    let throttled = agent
        .transfers
        .throttle_transfer(&transfer_id(1), knobs)
        .await
        .unwrap();
    assert_eq!(
        (
            throttled.hydration_threshold,
            throttled.hydration_batch_size
        ),
        (4, 2)
    );
    assert!(journal_has(
        &host,
        &format!("message {} hydration_threshold 4", lower(&id))
    ));
}

#[tokio::test]
async fn an_abort_removes_the_arriving_volume_and_frees_its_thin_ids() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    let view = agent
        .transfers
        .abort_transfer(&transfer_id(1), false)
        .await
        .unwrap();
    assert_eq!(view.state, TransferState::Aborted);
    assert!(
        host.devices().iter().all(|d| !d.contains(id.as_str())),
        "{:?}",
        host.devices()
    );
    assert!(host.kernel.thin_ids("dmt-pool").is_empty());
    let missing = agent.volumes.get_volume(&id).await;
    assert!(
        matches!(missing, Err(AgentError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_retried_start_returns_the_transfer_and_conflicting_ones_are_refused() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    let again = agent
        .transfers
        .start_transfer(request(1, &id, false))
        .await
        .unwrap();
    assert_eq!(again.id, transfer_id(1).to_string());
    let other_volume = agent
        .transfers
        .start_transfer(request(1, &volume_id(2), false))
        .await;
    assert!(
        matches!(other_volume, Err(AgentError::AlreadyExists { .. })),
        "{other_volume:?}"
    );
    let onto_itself = agent.transfers.start_transfer(request(2, &id, false)).await;
    assert!(
        matches!(onto_itself, Err(AgentError::AlreadyExists { .. })),
        "{onto_itself:?}"
    );
    agent
        .volumes
        .create_volume(&volume_id(3), 4 * MIB)
        .await
        .unwrap();
    let existing = agent
        .transfers
        .start_transfer(request(3, &volume_id(3), false))
        .await;
    assert!(
        matches!(existing, Err(AgentError::AlreadyExists { .. })),
        "{existing:?}"
    );
}

#[tokio::test]
async fn a_source_smaller_than_the_volume_or_no_block_device_is_refused_untouched() {
    let host = host();
    let agent = host.start().await.unwrap();
    let mut big = request(1, &volume_id(1), false);
    big.size_bytes = 16 * MIB;
    let refused = agent.transfers.start_transfer(big).await;
    assert!(
        matches!(
            refused,
            Err(AgentError::InvalidArgument {
                field: "size_bytes",
                ..
            })
        ),
        "{refused:?}"
    );
    let mut nowhere = request(2, &volume_id(2), false);
    nowhere.source = Source::Device(PathBuf::from("/dev/nothing-here"));
    let refused = agent.transfers.start_transfer(nowhere).await;
    assert!(
        matches!(
            refused,
            Err(AgentError::InvalidArgument {
                field: "device_path",
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(agent.transfers.list_transfers().await.unwrap().is_empty());
    assert!(host.kernel.thin_ids("dmt-pool").is_empty());
}

/// Another volume's device, or this agent's pool, is no source: copying it
/// would hand one tenant's data to another.
#[tokio::test]
async fn a_source_among_the_agents_own_devices_is_refused_untouched() {
    let host = host();
    let agent = host.start().await.unwrap();
    let tenant = volume_id(7);
    agent.volumes.create_volume(&tenant, 8 * MIB).await.unwrap();
    agent.volumes.publish_volume(&tenant).await.unwrap();
    let devices = host.devices();
    for own in [
        format!("/dev/mapper/dmt-{tenant}"),
        format!("/dev/mapper/dmt-thin-{tenant}"),
        "/dev/mapper/dmt-pool".to_owned(),
    ] {
        let mut request = request(1, &volume_id(1), false);
        request.source = Source::Device(PathBuf::from(&own));
        let refused = agent.transfers.start_transfer(request).await;
        match refused {
            Err(AgentError::InvalidArgument {
                field: "device_path",
                reason,
            }) => assert!(reason.contains("own storage"), "{own}: {reason}"),
            other => panic!("{own}: {other:?}"),
        }
    }
    assert!(agent.transfers.list_transfers().await.unwrap().is_empty());
    assert_eq!(host.devices(), devices, "nothing was made");
}

/// The clone's metadata and its destination are made side by side: when
/// either fails, the start takes back what both made.
#[tokio::test]
async fn a_start_whose_device_fails_takes_back_what_it_made() {
    let host = host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    for failing in [format!("dmt-cmeta-{id}"), format!("dmt-thin-{id}")] {
        host.kernel
            .fail_next("create", &failing, nix::errno::Errno::ENOMEM);
        let failed = agent.transfers.start_transfer(request(1, &id, false)).await;
        assert!(failed.is_err(), "{failing}: {failed:?}");
        assert_nothing_left(&host, &agent, &failing).await;
    }
    // Nothing of the failures stays in the way of the next start.
    agent
        .transfers
        .start_transfer(request(1, &id, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_start_cut_anywhere_is_rolled_back_at_the_next_start() {
    for point in ["transfer.after_record", "transfer.after_metadata"] {
        let host = host();
        let agent = host.start().await.unwrap();
        let caller = Arc::clone(&agent);
        crash(point, async move {
            caller
                .transfers
                .start_transfer(request(1, &volume_id(1), false))
                .await
        })
        .await;
        let agent = host.restart(agent).await.unwrap();
        assert_nothing_left(&host, &agent, point).await;
    }
}

/// No transfer, volume, thin id or device is left beside the pool's.
async fn assert_nothing_left(host: &TestHost, agent: &crate::agent::Agent, after: &str) {
    assert!(
        agent.transfers.list_transfers().await.unwrap().is_empty(),
        "{after}"
    );
    assert!(
        agent.volumes.list_volumes(false).await.unwrap().is_empty(),
        "{after}"
    );
    assert!(host.kernel.thin_ids("dmt-pool").is_empty(), "{after}");
    assert_eq!(
        host.devices().len(),
        3,
        "{after}: only the pool's: {:?}",
        host.devices()
    );
}

#[tokio::test]
async fn a_running_transfer_gets_its_clone_back_after_a_reboot_and_finishes() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    host.kernel.reboot();
    let agent = host.restart(agent).await.unwrap();
    assert!(
        host.kernel
            .table_text(&lower(&id))
            .unwrap()
            .contains(" clone ")
    );
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
}

/// After a reboot the source's path names another disk: the transfer
/// degrades, saying so, and builds nothing over that disk; once the path
/// names the source again, it goes on.
#[tokio::test]
async fn a_source_path_that_names_another_disk_after_a_reboot_is_not_copied() {
    let host = host();
    let source = std::path::Path::new(SOURCE);
    let original = host.kernel.device_at(source).unwrap();
    let (agent, id) = arriving(&host).await;
    host.kernel.reboot();
    host.kernel.add_block_device_at(source, 8 * MIB / 512);
    let agent = host.restart(agent).await.unwrap();
    let view = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
    assert_eq!(view.state, TransferState::Degraded, "{view:?}");
    assert!(
        view.message.contains("is now another device"),
        "{}",
        view.message
    );
    assert_eq!(
        host.kernel.table_text(&lower(&id)),
        None,
        "no clone over the other disk"
    );
    assert_eq!(host.kernel.table_text(&public(&id)), None);

    host.kernel.point_at(source, original);
    transfer_reaches(&agent, &transfer_id(1), TransferState::Hydrating).await;
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
}

#[tokio::test]
async fn a_finalize_cut_anywhere_is_finished_at_the_next_start() {
    for point in [
        "finalize.after_record",
        "finalize.after_resume",
        "finalize.after_swap",
    ] {
        let host = host();
        let agent = host.start().await.unwrap();
        let id = volume_id(1);
        agent
            .transfers
            .start_transfer(request(1, &id, false))
            .await
            .unwrap();
        // The finalize runs here, in the test's task, where the point is armed.
        agent.stop_background();
        host.kernel.hydrate(&lower(&id));
        let caller = Arc::clone(&agent);
        crash(point, async move {
            caller.transfers.finalize(&transfer_id(1)).await
        })
        .await;
        let agent = host.restart(agent).await.unwrap();
        assert_eq!(agent.reconcile_report().degraded, 0, "{point}");
        transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
        let table = host.kernel.table_text(&public(&id)).unwrap();
        assert!(table.starts_with("0 16384 era "), "{point}: {table}");
        let beneath = host.kernel.table_text(&lower(&id)).unwrap();
        assert!(beneath.starts_with("0 16384 thin "), "{point}: {beneath}");
        assert!(
            !host.devices().contains(&format!("dmt-cmeta-{id}")),
            "{point}"
        );
    }
}

#[tokio::test]
async fn an_abort_cut_after_its_record_is_finished_at_the_next_start() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    let caller = Arc::clone(&agent);
    crash("abort.after_record", async move {
        caller
            .transfers
            .abort_transfer(&transfer_id(1), false)
            .await
    })
    .await;
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(
        agent
            .transfers
            .get_transfer(&transfer_id(1))
            .await
            .unwrap()
            .state,
        TransferState::Aborted
    );
    assert!(agent.volumes.get_volume(&id).await.is_err());
    assert!(host.kernel.thin_ids("dmt-pool").is_empty());
}

#[tokio::test]
async fn extending_an_arriving_volume_keeps_the_clone_and_maps_the_rest_locally() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    let grown = agent.volumes.extend_volume(&id, 12 * MIB).await.unwrap();
    assert_eq!(grown.size_bytes, 12 * MIB);
    let table = host.kernel.table_text(&lower(&id)).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("0 16384 clone "), "{table}");
    assert!(lines[1].starts_with("16384 8192 linear "), "{table}");
    let above = host.kernel.table_text(&public(&id)).unwrap();
    assert!(
        above.starts_with("0 24576 era "),
        "dm-era grew too: {above}"
    );
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
    let table = host.kernel.table_text(&public(&id)).unwrap();
    assert!(table.starts_with("0 24576 era "), "{table}");
    let beneath = host.kernel.table_text(&lower(&id)).unwrap();
    assert!(beneath.starts_with("0 24576 thin "), "{beneath}");
}

/// A byte limit's pace lives in the kernel: a clone loaded again (an
/// extend builds it copying nothing until its monitor looks) is told its
/// pace again, and once the limit is lifted, a restart takes over the clone
/// built under it (the kernel reads a table back as built) as it is.
#[tokio::test]
async fn a_limited_clone_loaded_again_or_taken_over_goes_on_copying() {
    use super::move_tests::{thresholds_told, wait_until};
    let host = host();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let mut limited = request(1, &id, false);
    // A quarter second of it holds the transfer's own threshold of regions.
    limited.knobs.max_bytes_per_second = Some(64 * MIB);
    agent.transfers.start_transfer(limited).await.unwrap();
    let own = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
    let own = own.hydration_threshold.to_string();
    wait_until(async || thresholds_told(&host, &lower(&id)).last() == Some(&own)).await;
    let before = thresholds_told(&host, &lower(&id)).len();

    agent.volumes.extend_volume(&id, 12 * MIB).await.unwrap();
    let reloaded = host.kernel.table_text(&lower(&id)).unwrap();
    assert!(reloaded.contains("hydration_threshold 0"), "{reloaded}");
    wait_until(async || {
        let told = thresholds_told(&host, &lower(&id));
        told.len() > before && told.last() == Some(&own)
    })
    .await;

    let lifted = KnobRequest {
        max_bytes_per_second: Some(0),
        ..KnobRequest::default()
    };
    agent
        .transfers
        .throttle_transfer(&transfer_id(1), lifted)
        .await
        .unwrap();
    let agent = taken_over_at_a_restart(&host, agent).await;
    assert_eq!(host.kernel.table_text(&lower(&id)).unwrap(), reloaded);
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
}

/// Restarts the agent, whose transfer 1 comes back hydrating.
async fn taken_over_at_a_restart(
    host: &TestHost,
    agent: Arc<crate::agent::Agent>,
) -> Arc<crate::agent::Agent> {
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(agent.reconcile_report().degraded, 0);
    let view = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
    assert_eq!(view.state, TransferState::Hydrating, "{view:?}");
    agent
}

/// Regions copied while a transfer was paused (the copies in flight at the
/// pause, the regions writes touch) are no byte limit's to charge: a limit
/// set during the pause applies from the resume on.
#[tokio::test]
async fn a_limit_set_while_paused_does_not_charge_what_the_pause_copied() {
    use super::move_tests::{thresholds_told, wait_until};
    let host = host();
    let (agent, id) = arriving(&host).await;
    agent
        .transfers
        .pause_transfer(&transfer_id(1))
        .await
        .unwrap();
    host.kernel.write_regions(&lower(&id), 6);
    wait_until(async || {
        let view = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
        view.regions_hydrated == 6
    })
    .await;
    let limit = KnobRequest {
        max_bytes_per_second: Some(4 * MIB),
        ..KnobRequest::default()
    };
    agent
        .transfers
        .throttle_transfer(&transfer_id(1), limit)
        .await
        .unwrap();
    agent
        .transfers
        .resume_transfer(&transfer_id(1))
        .await
        .unwrap();
    // A quarter second of the limit holds one region; credit the fake
    // leaves unspent widens that.
    wait_until(async || !thresholds_told(&host, &lower(&id)).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let told = thresholds_told(&host, &lower(&id));
    assert_eq!(told[0], "1", "{told:?}");
    assert!(!told.contains(&"0".to_owned()), "never held: {told:?}");
}

/// A deferred move committed: its clone, built not hydrating, is taken
/// over at a restart as it is, and left hydrating.
#[tokio::test]
async fn a_committed_clone_is_taken_over_at_a_restart() {
    let host = host();
    let (agent, id) = deferred(&host).await;
    agent
        .transfers
        .commit_transfer(&transfer_id(1))
        .await
        .unwrap();
    let agent = taken_over_at_a_restart(&host, agent).await;
    let table = host.kernel.table_text(&lower(&id)).unwrap();
    assert!(table.contains("no_hydration"), "as built: {table}");
    let enabled = format!("message {} enable_hydration", lower(&id));
    let told = host.kernel.journal();
    assert_eq!(
        told.iter().filter(|l| **l == enabled).count(),
        1,
        "{told:?}"
    );
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
}

#[tokio::test]
async fn an_arriving_volume_unpublished_loses_its_device_once_the_transfer_is_done() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    agent.volumes.unpublish_volume(&id).await.unwrap();
    assert!(
        host.devices().contains(&public(&id)),
        "hydration runs through the public device"
    );
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
    // The device goes right after the transfer is recorded done.
    for _ in 0..400 {
        if !host.devices().contains(&public(&id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!host.devices().contains(&public(&id)));
    assert!(
        !host.devices().contains(&lower(&id)),
        "nor the layer beneath"
    );
    assert!(!agent.volumes.get_volume(&id).await.unwrap().published);
}

#[tokio::test]
async fn a_finished_transfer_cannot_be_aborted_or_paused() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    host.kernel.hydrate(&lower(&id));
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
    let abort = agent.transfers.abort_transfer(&transfer_id(1), false).await;
    assert_eq!(refusal(&abort), Some("TRANSFER_WRONG_STATE"), "{abort:?}");
    let pause = agent.transfers.pause_transfer(&transfer_id(1)).await;
    assert_eq!(refusal(&pause), Some("TRANSFER_WRONG_STATE"), "{pause:?}");
    assert!(host.devices().contains(&public(&id)), "nothing changed");
}

/// When device-mapper events stop reaching the agent, each wait fails at
/// once: the monitor must pause between looks instead of spinning, say why
/// the transfer is degraded, and still see the end of hydration.
#[tokio::test]
async fn a_monitor_without_events_backs_off_and_still_finishes() {
    let host = host();
    let (agent, id) = arriving(&host).await;
    host.kernel.fail_events();
    let reads_before = host.kernel.status_reads();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reads = host.kernel.status_reads() - reads_before;
    // Pauses of 0.5, 1 s...: a handful of looks, where a spin makes thousands.
    assert!(reads <= 6, "{reads} status reads in 1.2 s without events");
    let view = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
    assert_eq!(view.state, TransferState::Degraded, "{view:?}");
    assert!(
        view.message
            .contains("device-mapper events do not reach the agent"),
        "{view:?}"
    );

    host.kernel.hydrate(&lower(&id));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
        if view.state == TransferState::Done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never finished: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A move hydrates every region: one the pool could not write in full
/// below its low-space mark is refused and leaves nothing, and so is one
/// that fits only if the moves already arriving did not write theirs,
/// however far the pool may over-commit.
#[tokio::test]
async fn a_move_the_pool_could_not_write_in_full_is_refused() {
    let host = TestHost::new().with_oversubscription(20.0);
    let big = std::path::Path::new("/dev/fake-big-source");
    host.kernel.add_block_device_at(big, 400 * MIB / 512);
    let agent = host.start().await.unwrap();
    let sized = |n: u32, size: u64| StartRequest {
        size_bytes: size,
        source: Source::Device(big.to_path_buf()),
        ..request(n, &volume_id(n), false)
    };
    let devices = host.devices();

    let whole = agent.transfers.start_transfer(sized(1, 400 * MIB)).await;
    let Err(AgentError::ResourceExhausted { reason }) = whole else {
        panic!("{whole:?}");
    };
    assert!(reason.contains("writes every region"), "{reason}");
    assert_eq!(host.devices(), devices, "nothing is left of it");
    assert!(agent.ctx.record(&volume_id(1)).await.unwrap().is_none());

    agent
        .transfers
        .start_transfer(sized(2, 120 * MIB))
        .await
        .unwrap();
    let second = agent.transfers.start_transfer(sized(3, 120 * MIB)).await;
    let Err(AgentError::ResourceExhausted { reason }) = second else {
        panic!("{second:?}");
    };
    assert!(reason.contains("still to arrive"), "{reason}");
}

/// A live migration's destination may write (or discard) every region before
/// the commit: the clone then holds the whole volume, but it finalizes only
/// after the commit, which says the source let go; until then it stays
/// deferred, so the caller's commit finds it as it left it.
#[tokio::test]
async fn a_deferred_transfer_written_in_full_finalizes_only_after_its_commit() {
    let host = host();
    let (agent, id) = deferred(&host).await;
    host.kernel.hydrate(&lower(&id));
    for _ in 0..3 {
        agent.ctx.registry.wake(&transfer_id(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
    assert_eq!(waiting.state, TransferState::Deferred, "{waiting:?}");
    agent
        .transfers
        .commit_transfer(&transfer_id(1))
        .await
        .unwrap();
    transfer_reaches(&agent, &transfer_id(1), TransferState::Done).await;
}

/// A deferred clone copies nothing by itself: regions it holds were written
/// on the destination, and an abort that would drop them is refused unless
/// forced. Untouched, it aborts as before.
#[tokio::test]
async fn a_deferred_transfer_whose_destination_was_written_aborts_only_by_force() {
    let host = host();
    let (agent, id) = deferred(&host).await;
    host.kernel.write_regions(&lower(&id), 2);
    let refused = agent.transfers.abort_transfer(&transfer_id(1), false).await;
    assert_eq!(
        refusal(&refused),
        Some("DESTINATION_WRITTEN"),
        "{refused:?}"
    );
    let still = agent.transfers.get_transfer(&transfer_id(1)).await.unwrap();
    assert!(still.deferred, "{still:?}");
    let forced = agent
        .transfers
        .abort_transfer(&transfer_id(1), true)
        .await
        .unwrap();
    assert_eq!(forced.state, TransferState::Aborted);
}
