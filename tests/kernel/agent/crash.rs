//! `kill -9` between any two steps of create, extend, delete, publish and
//! unpublish: after a restart, store and kernel agree, half-done creates are
//! gone, everything else is finished, and data written before reads back
//! identical.

use std::path::Path;

use super::{
    api::{
        VOL_A, VOL_B, assert_kernel_matches, create, delete, extend, get, pool_used, publish,
        unpublish,
    },
    fixture::AgentProcess,
};
use crate::support::*;
use dmclone::api::proto::v1::volumes_client::VolumesClient;
use tonic::{Code, transport::Channel};

/// `AgentProcess::crash_inside` with a volumes client.
async fn crash_at<F, Fut>(agent: &mut AgentProcess, point: &str, call: F)
where
    F: FnOnce(VolumesClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    agent
        .crash_inside(point, async move |agent| call(agent.volumes().await).await)
        .await;
}

fn devices_named(names: &[String], id: &str) -> Vec<String> {
    names
        .iter()
        .filter(|n| n.starts_with("dmctcrash-") && n.contains(id))
        .cloned()
        .collect()
}

async fn device_names() -> Vec<String> {
    kernel()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_at_every_step_loses_nothing() {
    let mut agent = AgentProcess::start("dmctcrash").await;
    let mut volumes = agent.volumes().await;
    // A volume whose data must survive every crash below.
    create(&mut volumes, VOL_A, 32 * MIB).await.unwrap();
    let keep = publish(&mut volumes, VOL_A).await.unwrap();
    for chunk in 0..32 {
        write_at(
            Path::new(&keep),
            chunk * MIB,
            &pattern(21, chunk * MIB, MIB as usize),
        );
    }
    let keep_sha = sha256_of(Path::new(&keep), 32 * MIB);
    let baseline = pool_used(&agent).await.0;

    for point in [
        "create.after_record",
        "create.after_thin",
        "create.after_device",
    ] {
        crash_at(&mut agent, point, |mut v| async move {
            assert!(create(&mut v, VOL_B, 16 * MIB).await.is_err());
        })
        .await;
        let mut v = agent.volumes().await;
        assert_eq!(
            get(&mut v, VOL_B).await.unwrap_err().code(),
            Code::NotFound,
            "{point}: the interrupted create is rolled back"
        );
        assert!(
            devices_named(&device_names().await, VOL_B).is_empty(),
            "{point}"
        );
        assert!(agent.log().contains("rolling back a create"), "{point}");
        // The id is usable again.
        create(&mut v, VOL_B, 16 * MIB).await.unwrap();
        delete(&mut v, VOL_B).await.unwrap();
    }

    for point in [
        "extend.after_record",
        "extend.after_thin_table",
        "extend.after_public_table",
    ] {
        let mut v = agent.volumes().await;
        create(&mut v, VOL_B, 16 * MIB).await.unwrap();
        let path = publish(&mut v, VOL_B).await.unwrap();
        let data = pattern(5, 0, 2 * MIB as usize);
        write_at(Path::new(&path), 14 * MIB, &data);
        crash_at(&mut agent, point, |mut v| async move {
            assert!(extend(&mut v, VOL_B, 48 * MIB).await.is_err());
        })
        .await;
        let mut v = agent.volumes().await;
        let volume = get(&mut v, VOL_B).await.unwrap();
        assert_eq!(
            volume.size_bytes,
            48 * MIB,
            "{point}: the interrupted extend is finished"
        );
        assert!(volume.published, "{point}");
        assert_kernel_matches(&agent, &volume).await;
        assert_eq!(
            read_at(Path::new(&path), 14 * MIB, data.len()),
            data,
            "{point}"
        );
        unpublish(&mut v, VOL_B).await.unwrap();
        delete(&mut v, VOL_B).await.unwrap();
    }

    for point in [
        "delete.after_record",
        "delete.after_devices",
        "delete.after_thin",
    ] {
        let mut v = agent.volumes().await;
        create(&mut v, VOL_B, 16 * MIB).await.unwrap();
        let path = publish(&mut v, VOL_B).await.unwrap();
        write_at(Path::new(&path), 0, &pattern(6, 0, 4 * MIB as usize));
        unpublish(&mut v, VOL_B).await.unwrap();
        assert!(pool_used(&agent).await.0 > baseline);
        crash_at(&mut agent, point, |mut v| async move {
            assert!(delete(&mut v, VOL_B).await.is_err());
        })
        .await;
        let mut v = agent.volumes().await;
        assert_eq!(
            get(&mut v, VOL_B).await.unwrap_err().code(),
            Code::NotFound,
            "{point}: the interrupted delete is finished"
        );
        assert!(
            devices_named(&device_names().await, VOL_B).is_empty(),
            "{point}"
        );
        assert_eq!(
            pool_used(&agent).await.0,
            baseline,
            "{point}: the deleted volume's blocks are freed"
        );
    }

    let mut v = agent.volumes().await;
    create(&mut v, VOL_B, 16 * MIB).await.unwrap();
    crash_at(&mut agent, "publish.after_record", |mut v| async move {
        assert!(publish(&mut v, VOL_B).await.is_err());
    })
    .await;
    let mut v = agent.volumes().await;
    let volume = get(&mut v, VOL_B).await.unwrap();
    assert!(volume.published, "the interrupted publish is finished");
    assert_kernel_matches(&agent, &volume).await;

    crash_at(&mut agent, "unpublish.after_record", |mut v| async move {
        assert!(unpublish(&mut v, VOL_B).await.is_err());
    })
    .await;
    let mut v = agent.volumes().await;
    let volume = get(&mut v, VOL_B).await.unwrap();
    assert!(!volume.published, "the interrupted unpublish is finished");
    assert_kernel_matches(&agent, &volume).await;

    // Through all of it, the first volume stayed published and intact.
    let kept = get(&mut v, VOL_A).await.unwrap();
    assert!(kept.published);
    assert_eq!(sha256_of(Path::new(&keep), 32 * MIB), keep_sha);
    agent.destroy().await;
}

/// A typo in a failpoint name must not pass silently as "never fired".
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_failpoint_stops_the_agent_at_start() {
    let dm = kernel();
    remove_all_with_prefix(&dm, "dmctfpname").await;
    let dir = tempfile::tempdir().unwrap();
    #[allow(clippy::disallowed_types)] // the agent under test is a process
    let output = std::process::Command::new(super::fixture::agent_binary())
        .args(["--config", "/dev/null", "--state-dir"])
        .arg(dir.path())
        .args(["--dm-prefix", "dmctfpname", "--pool-file-size", "256M"])
        .env("DMCLONE_FAILPOINT", "create.after_nothing")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a failpoint"), "{stderr}");
}
