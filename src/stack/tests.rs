#![allow(clippy::unwrap_used)]

use super::*;
use crate::dm::{fake::FakeKernel, kernel::SegmentStatus};
use crate::units::Sectors;

const MIB: u64 = 1 << 20;

fn dev(minor: u32) -> DevRef {
    DevRef::from((253, minor))
}

#[test]
fn a_tracked_local_volume_is_era_over_its_thin_device() {
    let era = EraLayer {
        metadata: dev(2),
        block_bytes: 64 << 10,
    };
    let table = local_table(8 * MIB, dev(1), Some(era)).unwrap();
    assert_eq!(table.to_string(), "0 16384 era 253:2 253:1 128");
    let untracked = local_table(8 * MIB, dev(1), None).unwrap();
    assert_eq!(untracked.to_string(), "0 16384 linear 253:1 0");
}

#[test]
fn an_extended_arriving_volume_maps_its_new_range_to_the_thin_device() {
    let layer = CloneLayer {
        clone_bytes: 4 * MIB,
        region_bytes: MIB,
        hydration_threshold: Some(16),
        hydration_batch_size: Some(8),
        hydrate: false,
        discard_passdown: true,
    };
    let devices = CloneDevices {
        metadata: dev(3),
        destination: dev(1),
        source: DevRef::from((259, 0)),
    };
    let table = clone_table(6 * MIB, &layer, devices).unwrap();
    let segments = table.segments();
    assert_eq!(segments.len(), 2);
    assert_eq!(
        (segments[0].start, segments[0].len),
        (Sectors(0), Sectors(8192))
    );
    assert!(
        matches!(&segments[0].target, Target::Clone(c) if !c.hydration && c.region_sectors == Sectors(2048))
    );
    assert_eq!(
        (segments[1].start, segments[1].len),
        (Sectors(8192), Sectors(4096))
    );
    assert!(
        matches!(&segments[1].target, Target::Linear(l) if l.device == dev(1) && l.offset == Sectors(8192))
    );
    let same_size = clone_table(4 * MIB, &layer, devices).unwrap();
    assert_eq!(same_size.segments().len(), 1);
}

#[test]
fn only_a_change_of_length_counts_as_a_resize() {
    let small = local_table(MIB, dev(1), None).unwrap();
    let big = local_table(2 * MIB, dev(1), None).unwrap();
    let other = local_table(2 * MIB, dev(9), None).unwrap();
    assert!(is_resize_of(&small, &big));
    assert!(!is_resize_of(&small, &other));
}

fn arriving_clone(
    threshold: u32,
    hydrate: bool,
    [metadata, destination, source]: [DevRef; 3],
) -> Table {
    let layer = CloneLayer {
        clone_bytes: 4 * MIB,
        region_bytes: MIB,
        hydration_threshold: Some(threshold),
        hydration_batch_size: Some(8),
        hydrate,
        discard_passdown: true,
    };
    let devices = CloneDevices {
        metadata,
        destination,
        source,
    };
    clone_table(6 * MIB, &layer, devices).unwrap()
}

#[test]
fn a_clone_built_at_another_pace_or_switch_is_the_same_device() {
    let devices = [dev(3), dev(1), DevRef::from((259, 0))];
    let wanted = arriving_clone(0, true, devices);
    assert!(arriving_clone(16, false, devices).differs_only_in_messages(&wanted));
    let elsewhere = arriving_clone(0, true, [dev(3), dev(1), DevRef::from((259, 1))]);
    assert!(
        !elsewhere.differs_only_in_messages(&wanted),
        "another source"
    );
    let [clone, _] = wanted.segments() else {
        panic!("{wanted}")
    };
    let shorter = Table::new(vec![clone.clone()]).unwrap();
    assert!(!shorter.differs_only_in_messages(&wanted), "another size");
    let local = local_table(6 * MIB, dev(1), None).unwrap();
    assert!(local.differs_only_in_messages(&local));
    assert!(!local.differs_only_in_messages(&wanted));
}

fn name(text: &str) -> DeviceName {
    DeviceName::new(text).unwrap()
}

/// A clone built deferred and paced by messages since: a restart takes it
/// over as it is, and only a switch its status disagrees with is told.
#[tokio::test]
async fn a_clone_taken_over_keeps_its_table_and_is_told_only_its_switch() {
    let fake = FakeKernel::new();
    let disks = [1, 2, 3].map(|_| fake.add_block_device(16 << 11));
    let dm: &dyn Kernel = &fake;
    let device = name("t-lower");
    let built = arriving_clone(0, false, disks);
    ensure_device(dm, &device, &built, |_| false).await.unwrap();
    dm.message(&device, 0, "hydration_threshold 4")
        .await
        .unwrap();
    // Switches told, and tables loaded.
    let switches = || {
        fake.journal()
            .iter()
            .filter(|line| {
                line.ends_with("_hydration")
                    || line.starts_with("load ")
                    || line.starts_with("swap ")
            })
            .count()
    };
    let before = switches();

    let wanted = arriving_clone(16, true, disks);
    ensure_device(dm, &device, &wanted, |_| false)
        .await
        .unwrap();
    assert_eq!(switches(), before + 1, "{:?}", fake.journal());
    assert!(fake.journal().last().unwrap().ends_with("enable_hydration"));
    assert_eq!(fake.table_text("t-lower").unwrap(), built.to_string());
    ensure_device(dm, &device, &wanted, |_| false)
        .await
        .unwrap();
    assert_eq!(switches(), before + 1, "told once");

    let [metadata, destination, source] = disks;
    let other_regions = CloneLayer {
        clone_bytes: 6 * MIB,
        region_bytes: 2 * MIB,
        hydration_threshold: None,
        hydration_batch_size: None,
        hydrate: true,
        discard_passdown: true,
    };
    let devices = CloneDevices {
        metadata,
        destination,
        source,
    };
    let stranger = clone_table(6 * MIB, &other_regions, devices).unwrap();
    let refused = ensure_device(dm, &device, &stranger, |_| false).await;
    assert!(
        matches!(refused, Err(AgentError::Conflict(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn ensure_device_creates_adopts_resizes_and_refuses_a_stranger() {
    let fake = FakeKernel::new();
    let disk = fake.add_block_device(1 << 20);
    let dm: &dyn Kernel = &fake;
    let linear = |len: u64, offset: u64| {
        Table::single(
            Sectors(len),
            Target::Linear(Linear {
                device: disk,
                offset: Sectors(offset),
            }),
        )
        .unwrap()
    };
    let device = name("t-a");
    let made = ensure_device(dm, &device, &linear(100, 0), |_| false)
        .await
        .unwrap();
    let adopted = ensure_device(dm, &device, &linear(100, 0), |_| false)
        .await
        .unwrap();
    assert_eq!(made, adopted);
    let grow = linear(200, 0);
    ensure_device(dm, &device, &grow, |live| is_resize_of(live, &grow))
        .await
        .unwrap();
    assert_eq!(dm.table(&device).await.unwrap(), grow);
    let stranger = linear(200, 50);
    let refused = ensure_device(dm, &device, &stranger, |live| is_resize_of(live, &stranger)).await;
    assert!(
        matches!(refused, Err(AgentError::Conflict(_))),
        "{refused:?}"
    );
    assert_eq!(
        dm.table(&device).await.unwrap(),
        grow,
        "a refusal changes nothing"
    );
}

/// An 8-sector linear table over a new disk of `fake`.
fn small_linear(fake: &FakeKernel) -> Table {
    let disk = fake.add_block_device(1 << 20);
    Table::single(
        Sectors(8),
        Target::Linear(Linear {
            device: disk,
            offset: Sectors(0),
        }),
    )
    .unwrap()
}

#[tokio::test]
async fn remove_if_present_tolerates_absence_and_refuses_an_open_device() {
    let fake = FakeKernel::new();
    let table = small_linear(&fake);
    let dm: &dyn Kernel = &fake;
    let device = name("t-b");
    remove_if_present(dm, &device).await.unwrap();
    dm.create(&device, None, &table).await.unwrap();
    fake.open_device("t-b");
    let refused = remove_if_present(dm, &device).await;
    assert_eq!(
        crate::testing::refusal(&refused),
        Some("DEVICE_IN_USE"),
        "{refused:?}"
    );
    assert!(fake.device_names().contains(&"t-b".to_owned()));
    fake.close_device("t-b");
    remove_if_present(dm, &device).await.unwrap();
    assert!(fake.device_names().is_empty());
}

#[tokio::test]
async fn remove_if_present_outwaits_an_opener_that_lets_go_by_itself() {
    let fake = FakeKernel::new();
    let table = small_linear(&fake);
    let dm: &dyn Kernel = &fake;
    let device = name("t-c");
    dm.create(&device, None, &table).await.unwrap();
    fake.open_briefly("t-c");
    remove_if_present(dm, &device).await.unwrap();
    assert!(fake.device_names().is_empty());
}

/// A device that swaps only when the check says yes.
async fn swap_fixture(fake: &FakeKernel) -> (DeviceName, Table, Table) {
    let disk = fake.add_block_device(1 << 20);
    let old = Table::single(
        Sectors(8),
        Target::Linear(Linear {
            device: disk,
            offset: Sectors(0),
        }),
    )
    .unwrap();
    let new = Table::single(
        Sectors(8),
        Target::Linear(Linear {
            device: disk,
            offset: Sectors(8),
        }),
    )
    .unwrap();
    let device = name("t-swap");
    (fake as &dyn Kernel)
        .create(&device, None, &old)
        .await
        .unwrap();
    (device, old, new)
}

#[tokio::test]
async fn a_swap_loads_before_the_pause_and_resumes_onto_the_new_table() {
    let fake = FakeKernel::new();
    let (device, _, new) = swap_fixture(&fake).await;
    let dm: &dyn Kernel = &fake;
    let outcome = swap_under_io(dm, &device, &new, |status| {
        // The status of the live (old) table, read while suspended.
        status.len() == 1 && status[0].target_type == "linear"
    })
    .await
    .unwrap();
    assert!(matches!(outcome, SwapOutcome::Swapped(_)));
    assert_eq!(dm.table(&device).await.unwrap(), new);
    assert_eq!(fake.is_suspended("t-swap"), Some(false));
    let journal = fake.journal();
    assert_eq!(
        &journal[journal.len() - 3..],
        ["load t-swap", "suspend t-swap", "resume t-swap"]
    );
}

#[tokio::test]
async fn a_swap_whose_check_fails_keeps_the_old_table_serving() {
    let fake = FakeKernel::new();
    let (device, old, new) = swap_fixture(&fake).await;
    let dm: &dyn Kernel = &fake;
    let outcome = swap_under_io(dm, &device, &new, |_| false).await.unwrap();
    assert!(matches!(outcome, SwapOutcome::Kept));
    assert_eq!(dm.table(&device).await.unwrap(), old);
    let state = dm.info(&device).await.unwrap().unwrap();
    assert!(!state.suspended && !state.inactive_table);
}

#[tokio::test]
async fn a_swap_whose_status_cannot_be_read_keeps_the_old_table_serving() {
    let fake = FakeKernel::new();
    let (device, old, new) = swap_fixture(&fake).await;
    fake.fail_next("status", "t-swap", nix::errno::Errno::EIO);
    let dm: &dyn Kernel = &fake;
    let outcome = swap_under_io(dm, &device, &new, |_| true).await.unwrap();
    assert!(matches!(outcome, SwapOutcome::Kept));
    assert_eq!(dm.table(&device).await.unwrap(), old);
    let state = dm.info(&device).await.unwrap().unwrap();
    assert!(!state.suspended && !state.inactive_table);
}

#[tokio::test]
async fn a_failed_suspend_drops_the_loaded_table() {
    let fake = FakeKernel::new();
    let (device, old, new) = swap_fixture(&fake).await;
    fake.fail_next("suspend", "t-swap", nix::errno::Errno::EIO);
    let dm: &dyn Kernel = &fake;
    let result = swap_under_io(dm, &device, &new, |_| true).await;
    assert!(result.is_err());
    assert_eq!(dm.table(&device).await.unwrap(), old);
    assert!(!dm.info(&device).await.unwrap().unwrap().inactive_table);
}

#[test]
fn a_clone_is_ready_when_every_region_is_copied_and_it_writes() {
    let clone = |text: &str| {
        vec![SegmentStatus {
            start: 0,
            len: 2048,
            target_type: "clone".into(),
            text: text.into(),
        }]
    };
    let status = |hydrated: u64, mode: &str| {
        clone(&format!(
            "8 17/2048 64 {hydrated}/16 0 0 4 hydration_threshold 1 hydration_batch_size 1 {mode}"
        ))
    };
    assert!(clone_ready(&status(16, "rw")));
    assert!(!clone_ready(&status(15, "rw")));
    assert!(!clone_ready(&status(16, "ro")));
    assert!(!clone_ready(&clone("Fail")));
    assert!(!clone_ready(&clone("not a status")));
    assert!(!clone_ready(&[]));
}
