//! Volume life cycle against the in-memory kernel: every transition, the
//! retries Cinder makes, every refusal, and what a crash at each failpoint
//! leaves for the next start.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::*;
use crate::testing::{MIB, TestHost, crash, refusal, volume_id};

/// The devices of volume `n` that exist, by role ("thin", "public", ...).
fn roles(host: &TestHost, n: u32) -> Vec<&'static str> {
    let id = volume_id(n);
    let named = [
        ("public", format!("dmt-{id}")),
        ("thin", format!("dmt-thin-{id}")),
        ("emeta", format!("dmt-emeta-{id}")),
        ("probe", format!("dmt-era-{id}")),
        ("cmeta", format!("dmt-cmeta-{id}")),
    ];
    let devices = host.devices();
    named
        .into_iter()
        .filter(|(_, name)| devices.contains(name))
        .map(|(role, _)| role)
        .collect()
}

fn thin_ids(host: &TestHost) -> Vec<u32> {
    host.kernel.thin_ids("dmt-pool")
}

#[tokio::test]
async fn a_new_volume_has_its_thin_device_and_era_metadata_and_no_public_device() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let (volume, outcome) = agent
        .volumes
        .create_volume(&volume_id(1), 3 * MIB + 1)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Created);
    assert_eq!(
        volume.size_bytes,
        4 * MIB,
        "rounded up to the allocation unit"
    );
    assert_eq!(volume.state, VolumeState::Available);
    assert!(volume.change_tracking && !volume.published);
    assert_eq!(roles(&host, 1), ["thin", "emeta"]);
    assert_eq!(
        thin_ids(&host).len(),
        2,
        "the volume's and its era metadata's"
    );
}

#[tokio::test]
async fn a_retried_create_returns_the_volume_and_another_size_is_a_conflict() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    agent
        .volumes
        .create_volume(&volume_id(1), 4 * MIB)
        .await
        .unwrap();
    let (_, outcome) = agent
        .volumes
        .create_volume(&volume_id(1), 4 * MIB)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Existed);
    let other = agent.volumes.create_volume(&volume_id(1), 8 * MIB).await;
    assert!(
        matches!(other, Err(AgentError::AlreadyExists { .. })),
        "{other:?}"
    );
    assert_eq!(thin_ids(&host).len(), 2, "nothing more was allocated");
}

#[tokio::test]
async fn concurrent_creates_of_one_id_make_it_once() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let agent = Arc::clone(&agent);
            tokio::spawn(async move { agent.volumes.create_volume(&volume_id(7), 4 * MIB).await })
        })
        .collect();
    let mut created = 0;
    for call in calls {
        if call.await.unwrap().unwrap().1 == Outcome::Created {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    assert_eq!(thin_ids(&host).len(), 2);
}

#[tokio::test]
async fn bad_sizes_are_refused_and_change_nothing() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    for size in [0, u64::MAX] {
        let refused = agent.volumes.create_volume(&volume_id(1), size).await;
        assert!(
            matches!(
                refused,
                Err(AgentError::InvalidArgument {
                    field: "size_bytes",
                    ..
                })
            ),
            "{size}: {refused:?}"
        );
    }
    assert!(agent.volumes.list_volumes(false).await.unwrap().is_empty());
    assert!(thin_ids(&host).is_empty());
}

#[tokio::test]
async fn publishing_puts_dm_era_over_the_thin_device_and_unpublishing_removes_it() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    let path = agent.volumes.publish_volume(&id).await.unwrap();
    assert_eq!(
        path,
        std::path::PathBuf::from(format!("/dev/mapper/dmt-{id}"))
    );
    assert_eq!(
        agent.volumes.publish_volume(&id).await.unwrap(),
        path,
        "publish is idempotent"
    );
    let table = host.kernel.table_text(&format!("dmt-{id}")).unwrap();
    assert!(table.starts_with("0 8192 era "), "{table}");
    assert!(agent.volumes.get_volume(&id).await.unwrap().published);
    agent.volumes.unpublish_volume(&id).await.unwrap();
    agent.volumes.unpublish_volume(&id).await.unwrap();
    assert_eq!(roles(&host, 1), ["thin", "emeta"]);
}

#[tokio::test]
async fn an_open_volume_is_neither_unpublished_nor_deleted() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    host.kernel.open_device(&format!("dmt-{id}"));
    let refused = agent.volumes.unpublish_volume(&id).await;
    assert_eq!(refusal(&refused), Some("VOLUME_IN_USE"), "{refused:?}");
    let refused = agent.volumes.delete_volume(&id).await;
    assert_eq!(refusal(&refused), Some("VOLUME_PUBLISHED"), "{refused:?}");
    assert_eq!(roles(&host, 1), ["public", "thin", "emeta"]);
    assert!(agent.volumes.get_volume(&id).await.unwrap().published);
    host.kernel.close_device(&format!("dmt-{id}"));
    agent.volumes.unpublish_volume(&id).await.unwrap();
    agent.volumes.delete_volume(&id).await.unwrap();
    assert!(roles(&host, 1).is_empty());
}

/// A process forked while the device was open, or a udev probe after a
/// write, holds it for a moment after the instance let go: not a refusal.
#[tokio::test]
async fn unpublish_outwaits_a_brief_opener() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    host.kernel.open_briefly(&format!("dmt-{id}"));
    agent.volumes.unpublish_volume(&id).await.unwrap();
    assert_eq!(roles(&host, 1), ["thin", "emeta"]);
    host.kernel.open_briefly(&format!("dmt-thin-{id}"));
    agent.volumes.delete_volume(&id).await.unwrap();
    assert!(roles(&host, 1).is_empty());
}

#[tokio::test]
async fn extend_grows_every_layer_and_never_shrinks() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let grown = agent.volumes.extend_volume(&id, 6 * MIB).await.unwrap();
    assert_eq!(grown.size_bytes, 6 * MIB);
    for name in [format!("dmt-{id}"), format!("dmt-thin-{id}")] {
        let table = host.kernel.table_text(&name).unwrap();
        assert!(table.starts_with("0 12288 "), "{name}: {table}");
    }
    let smaller = agent.volumes.extend_volume(&id, 4 * MIB).await;
    assert!(
        matches!(smaller, Err(AgentError::InvalidArgument { .. })),
        "{smaller:?}"
    );
    assert_eq!(
        agent.volumes.get_volume(&id).await.unwrap().size_bytes,
        6 * MIB
    );
}

#[tokio::test]
async fn delete_removes_every_device_and_thin_id_and_absent_volumes_delete_fine() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let refused = agent.volumes.delete_volume(&id).await;
    assert_eq!(
        refusal(&refused),
        Some("VOLUME_PUBLISHED"),
        "published: {refused:?}"
    );
    agent.volumes.unpublish_volume(&id).await.unwrap();
    agent.volumes.delete_volume(&id).await.unwrap();
    assert!(roles(&host, 1).is_empty());
    assert!(thin_ids(&host).is_empty());
    agent.volumes.delete_volume(&id).await.unwrap();
    let missing = agent.volumes.get_volume(&id).await;
    assert!(
        matches!(missing, Err(AgentError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_create_the_kernel_rejects_leaves_nothing_behind() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    host.kernel
        .fail_next("create", &format!("dmt-emeta-{id}"), nix::errno::Errno::EIO);
    assert!(agent.volumes.create_volume(&id, 4 * MIB).await.is_err());
    assert!(roles(&host, 1).is_empty());
    assert!(thin_ids(&host).is_empty());
    assert!(agent.volumes.list_volumes(false).await.unwrap().is_empty());
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
}

#[tokio::test]
async fn a_create_cut_anywhere_is_rolled_back_at_the_next_start() {
    for point in [
        "create.after_record",
        "create.after_thin",
        "create.after_device",
    ] {
        let host = TestHost::new();
        let agent = host.start().await.unwrap();
        let id = volume_id(1);
        let caller = Arc::clone(&agent);
        crash(point, async move {
            caller.volumes.create_volume(&id, 4 * MIB).await
        })
        .await;
        let agent = host.restart(agent).await.unwrap();
        assert_eq!(agent.reconcile_report().rolled_back, 1, "{point}");
        assert!(
            agent.volumes.list_volumes(false).await.unwrap().is_empty(),
            "{point}"
        );
        assert!(roles(&host, 1).is_empty(), "{point}: {:?}", host.devices());
        assert!(thin_ids(&host).is_empty(), "{point}");
    }
}

#[tokio::test]
async fn a_delete_cut_anywhere_is_finished_at_the_next_start() {
    for point in [
        "delete.after_record",
        "delete.after_devices",
        "delete.after_thin",
    ] {
        let host = TestHost::new();
        let agent = host.start().await.unwrap();
        let id = volume_id(1);
        agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
        let caller = Arc::clone(&agent);
        crash(
            point,
            async move { caller.volumes.delete_volume(&id).await },
        )
        .await;
        let agent = host.restart(agent).await.unwrap();
        assert_eq!(agent.reconcile_report().finished, 1, "{point}");
        assert!(
            agent.volumes.list_volumes(false).await.unwrap().is_empty(),
            "{point}"
        );
        assert!(roles(&host, 1).is_empty(), "{point}");
        assert!(thin_ids(&host).is_empty(), "{point}");
    }
}

#[tokio::test]
async fn an_extend_cut_anywhere_is_finished_at_the_next_start() {
    for point in [
        "extend.after_record",
        "extend.after_thin_table",
        "extend.after_public_table",
    ] {
        let host = TestHost::new();
        let agent = host.start().await.unwrap();
        let id = volume_id(1);
        agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
        agent.volumes.publish_volume(&id).await.unwrap();
        let caller = Arc::clone(&agent);
        let target = id.clone();
        crash(point, async move {
            caller.volumes.extend_volume(&target, 8 * MIB).await
        })
        .await;
        let agent = host.restart(agent).await.unwrap();
        let volume = agent.volumes.get_volume(&id).await.unwrap();
        assert_eq!(
            (volume.size_bytes, &volume.state),
            (8 * MIB, &VolumeState::Available)
        );
        let table = host.kernel.table_text(&format!("dmt-{id}")).unwrap();
        assert!(table.starts_with("0 16384 era "), "{point}: {table}");
    }
}

#[tokio::test]
async fn a_publish_or_unpublish_cut_after_its_record_is_finished_at_the_next_start() {
    for (point, published) in [
        ("publish.after_record", true),
        ("unpublish.after_record", false),
    ] {
        let host = TestHost::new();
        let agent = host.start().await.unwrap();
        let id = volume_id(1);
        agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
        if !published {
            agent.volumes.publish_volume(&id).await.unwrap();
        }
        let caller = Arc::clone(&agent);
        let target = id.clone();
        crash(point, async move {
            if published {
                caller.volumes.publish_volume(&target).await.map(drop)
            } else {
                caller.volumes.unpublish_volume(&target).await
            }
        })
        .await;
        let agent = host.restart(agent).await.unwrap();
        assert_eq!(
            agent.volumes.get_volume(&id).await.unwrap().published,
            published,
            "{point}"
        );
        assert_eq!(roles(&host, 1).contains(&"public"), published, "{point}");
    }
}

#[tokio::test]
async fn after_a_reboot_every_volume_gets_its_devices_back() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    for n in 1..=3 {
        agent
            .volumes
            .create_volume(&volume_id(n), 4 * MIB)
            .await
            .unwrap();
    }
    agent.volumes.publish_volume(&volume_id(2)).await.unwrap();
    let before = host.devices();
    host.kernel.reboot();
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(host.devices(), before);
    assert_eq!(agent.reconcile_report().volumes, 3);
    assert_eq!(
        agent.reconcile_report().rebuilt,
        4,
        "3 thin devices and 1 public device"
    );
    assert!(
        agent
            .volumes
            .get_volume(&volume_id(2))
            .await
            .unwrap()
            .published
    );
}

#[tokio::test]
async fn a_device_left_suspended_is_resumed_at_start() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    let public = agent.ctx.naming.public(&id);
    agent
        .ctx
        .dm
        .suspend(&public, crate::dm::kernel::Flush::Flush)
        .await
        .unwrap();
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(host.kernel.is_suspended(public.as_str()), Some(false));
    assert!(agent.volumes.get_volume(&id).await.unwrap().published);
}

#[tokio::test]
async fn devices_no_record_explains_are_reported_and_left_alone() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    host.kernel
        .add_foreign_device("dmt-thin-00000000-0000-4000-8000-000000000099");
    host.kernel.add_foreign_device("someone-elses");
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(
        agent.reconcile_report().unknown_devices,
        ["dmt-thin-00000000-0000-4000-8000-000000000099"]
    );
    assert!(host.devices().contains(&"someone-elses".to_owned()));
    assert!(
        host.devices()
            .contains(&"dmt-thin-00000000-0000-4000-8000-000000000099".to_owned())
    );
}

#[tokio::test]
async fn a_device_that_contradicts_its_record_quarantines_the_volume() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    agent.volumes.unpublish_volume(&id).await.unwrap();
    // Someone else's device under the volume's public name.
    host.kernel.add_foreign_device(&format!("dmt-{id}"));
    host.kernel.open_device(&format!("dmt-{id}"));
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(agent.reconcile_report().quarantined, 1);
    let volume = agent.volumes.get_volume(&id).await.unwrap();
    assert!(
        matches!(volume.state, VolumeState::Quarantined(_)),
        "{volume:?}"
    );
    let refused = agent.volumes.extend_volume(&id, 8 * MIB).await;
    assert_eq!(refusal(&refused), Some("VOLUME_QUARANTINED"), "{refused:?}");
    assert!(
        host.kernel
            .table_text(&format!("dmt-{id}"))
            .unwrap()
            .contains("linear")
    );
}

/// A call whose caller went away half-way leaves its intent; until a retry
/// or the next start finishes it, other calls are refused with its reason.
#[tokio::test]
async fn a_volume_in_the_middle_of_a_create_or_delete_refuses_other_calls() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    let id = volume_id(1);
    let (caller, volume) = (Arc::clone(&agent), id.clone());
    crash("create.after_thin", async move {
        caller.volumes.create_volume(&volume, 4 * MIB).await
    })
    .await;
    let refused = agent.volumes.publish_volume(&id).await;
    assert_eq!(
        refusal(&refused),
        Some("VOLUME_BEING_CREATED"),
        "{refused:?}"
    );
    // The retry Cinder makes finishes the create.
    agent.volumes.create_volume(&id, 4 * MIB).await.unwrap();
    agent.volumes.publish_volume(&id).await.unwrap();
    agent.volumes.unpublish_volume(&id).await.unwrap();

    let (caller, volume) = (Arc::clone(&agent), id.clone());
    crash("delete.after_record", async move {
        caller.volumes.delete_volume(&volume).await
    })
    .await;
    let refused = agent.volumes.publish_volume(&id).await;
    assert_eq!(
        refusal(&refused),
        Some("VOLUME_BEING_DELETED"),
        "{refused:?}"
    );
    let refused = agent.volumes.create_volume(&id, 4 * MIB).await;
    assert_eq!(
        refusal(&refused),
        Some("VOLUME_BEING_DELETED"),
        "{refused:?}"
    );
    agent.volumes.delete_volume(&id).await.unwrap();
    assert!(roles(&host, 1).is_empty());
}

/// After a reboot one volume's device is refused by the kernel (a fault
/// that passes): the agent starts, serves the others, shows that one
/// DEGRADED with the reason, and brings it back by itself.
#[tokio::test]
async fn a_volume_that_cannot_come_back_at_start_degrades_alone() {
    let host = TestHost::new();
    let agent = host.start().await.unwrap();
    for n in 1..=2 {
        agent
            .volumes
            .create_volume(&volume_id(n), 4 * MIB)
            .await
            .unwrap();
        agent.volumes.publish_volume(&volume_id(n)).await.unwrap();
    }
    host.kernel.reboot();
    let thin = format!("dmt-thin-{}", volume_id(1));
    host.kernel
        .fail_next("create", &thin, nix::errno::Errno::ENOMEM);
    let agent = host.restart(agent).await.unwrap();
    assert_eq!(agent.reconcile_report().unsettled, 1);
    let degraded = agent.volumes.get_volume(&volume_id(1)).await.unwrap();
    match &degraded.state {
        VolumeState::Degraded(reason) => assert!(reason.contains("did not come back"), "{reason}"),
        other => panic!("expected degraded, got {other:?}"),
    }
    assert_eq!(roles(&host, 2), ["public", "thin", "emeta"]);
    let served = agent.volumes.get_volume(&volume_id(2)).await.unwrap();
    assert_eq!(served.state, VolumeState::Available);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while agent.volumes.get_volume(&volume_id(1)).await.unwrap().state != VolumeState::Available {
        assert!(std::time::Instant::now() < deadline, "never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(roles(&host, 1), ["public", "thin", "emeta"]);
}
