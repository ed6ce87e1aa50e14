//! Waiting for device-mapper events without polling.
//!
//! Targets signal what matters through their device's event counter (dm-clone
//! bumps it when hydration completes; thin-pool on low space and mode changes).
//! One monitor per process owns its own control fd: the kernel makes that fd
//! readable whenever any device's counter moved since the last
//! `DM_DEV_ARM_POLL`. A dedicated thread sleeps in poll(2) on it; on each wake-up
//! it re-arms, lists every device's counter and publishes the snapshot. Waiters
//! compare against the counter they last saw, so an event that fires between a
//! status read and the wait is never missed.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    thread,
};

use devicemapper::DM;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    unistd::pipe,
};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    dm::{
        kernel::{self, DeviceMapper},
        names::DeviceName,
    },
    error::{Error, Result},
};

/// The counters of every device at one moment, or why the monitor stopped.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    counters: HashMap<String, u32>,
    failure: Option<String>,
}

/// Watches the control fd and publishes event counters to waiters.
#[derive(Debug)]
pub struct EventMonitor {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Dropping this closes the pipe, which wakes the thread and ends it.
    _stop: OwnedFd,
}

impl EventMonitor {
    /// Starts the monitor on a fresh control fd (poll state is per open file,
    /// so it must not share the fd other callers use). The first snapshot is
    /// taken before this returns.
    pub fn start() -> Result<Self> {
        let dm = DeviceMapper::open()?.control_for_events()?;
        let (stop_rx, stop_tx) = pipe().map_err(|errno| Error::Io {
            context: "cannot create the event monitor's stop pipe",
            path: "pipe".into(),
            source: errno.into(),
        })?;
        let first = read_counters(&dm)?;
        let (publisher, snapshots) = watch::channel(Arc::new(first));
        thread::Builder::new()
            .name("dm-events".into())
            .spawn(move || watch_control_fd(&dm, &stop_rx, &publisher))
            .map_err(|source| Error::Io {
                context: "cannot start the event monitor thread",
                path: "dm-events".into(),
                source,
            })?;
        Ok(Self {
            snapshots,
            _stop: stop_tx,
        })
    }

    /// The device's event counter as last published.
    pub fn counter(&self, name: &DeviceName) -> Option<u32> {
        self.snapshots.borrow().counters.get(name.as_str()).copied()
    }

    /// Waits until the device's event counter differs from `seen` and returns
    /// the new value. Callers read the device's status after this returns:
    /// events carry no payload. Fails if the device disappears or the monitor
    /// stops; wrap in `tokio::time::timeout` to bound the wait.
    pub async fn wait_for_event(&self, name: &DeviceName, seen: u32) -> Result<u32> {
        let mut snapshots = self.snapshots.clone();
        let snapshot = snapshots
            .wait_for(|s| s.failure.is_some() || s.counters.get(name.as_str()) != Some(&seen))
            .await
            .map_err(|_| Error::Other("the device-mapper event monitor stopped".into()))?;
        if let Some(failure) = &snapshot.failure {
            return Err(Error::Other(format!(
                "the device-mapper event monitor failed: {failure}"
            )));
        }
        snapshot
            .counters
            .get(name.as_str())
            .copied()
            .ok_or_else(|| Error::NoSuchDevice {
                device: name.to_string(),
            })
    }
}

fn watch_control_fd(dm: &DM, stop: &OwnedFd, publisher: &watch::Sender<Arc<Snapshot>>) {
    loop {
        match wait_readable(dm, stop) {
            Ok(true) => {}
            Ok(false) => return, // the monitor was dropped
            Err(err) => return publish_failure(publisher, err.to_string()),
        }
        match read_counters(dm) {
            Ok(snapshot) => {
                if publisher.send(Arc::new(snapshot)).is_err() {
                    return; // nobody listens any more
                }
            }
            Err(err) => return publish_failure(publisher, err.to_string()),
        }
    }
}

/// Sleeps until the control fd is readable (true) or the stop pipe closes
/// (false).
fn wait_readable(dm: &DM, stop: &OwnedFd) -> std::result::Result<bool, Errno> {
    loop {
        let mut fds = [
            PollFd::new(dm.file().as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno),
        }
        let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
        if stopped {
            return Ok(false);
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            return Ok(true);
        }
    }
}

fn publish_failure(publisher: &watch::Sender<Arc<Snapshot>>, failure: String) {
    warn!(%failure, "device-mapper event monitor stopped");
    publisher.send_modify(|s| {
        let mut failed = Snapshot::clone(s);
        failed.failure = Some(failure);
        *s = Arc::new(failed);
    });
}

/// Re-arms the poll state, then lists the counters: anything that happens
/// after the re-arm makes the fd readable again, so nothing falls in between.
fn read_counters(dm: &DM) -> Result<Snapshot> {
    kernel::arm_poll(dm)?;
    let counters = kernel::list_devices(dm)?
        .into_iter()
        .map(|d| (d.name, d.event_nr))
        .collect();
    Ok(Snapshot {
        counters,
        failure: None,
    })
}
