//! Test-only crash points. When `DMCLONE_FAILPOINT` names a point the agent
//! reaches, the agent kills itself with SIGKILL right there, exactly like
//! `kill -9` at that instant: the crash-recovery tests use this to stop
//! create, extend and delete between any two of their steps. Unset in
//! production, where every point is a no-op.

use std::sync::OnceLock;

use tracing::error;

pub const ENV: &str = "DMCLONE_FAILPOINT";

/// Every point, so tests can iterate over them and typos are caught.
pub const POINTS: &[&str] = &[
    "create.after_record",
    "create.after_thin",
    "create.after_device",
    "extend.after_record",
    "extend.after_thin_table",
    "extend.after_public_table",
    "delete.after_record",
    "delete.after_devices",
    "delete.after_thin",
    "publish.after_record",
    "unpublish.after_record",
    "transfer.after_record",
    "transfer.after_metadata",
    "finalize.after_record",
    "finalize.after_swap",
    "abort.after_record",
    "snapshot.after_record",
    "snapshot.delete_after_record",
    "clone.after_record",
    "revert.after_record",
];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

#[cfg(test)]
tokio::task_local! {
    static ARMED_IN_TASK: &'static str;
}

/// Runs `future` with `point` armed for it alone: reaching the point panics,
/// which ends the task right there as a kill ends the process. Unit tests
/// replay crashes with it against the in-memory kernel.
#[cfg(test)]
pub async fn crash_at<F: std::future::Future>(point: &'static str, future: F) -> F::Output {
    assert!(POINTS.contains(&point), "unknown failpoint {point}");
    ARMED_IN_TASK.scope(point, future).await
}

/// Dies here if `point` is armed.
pub fn hit(point: &'static str) {
    debug_assert!(POINTS.contains(&point), "unknown failpoint {point}");
    #[cfg(test)]
    if ARMED_IN_TASK
        .try_with(|armed| *armed == point)
        .unwrap_or(false)
    {
        panic!("failpoint {point} reached");
    }
    if armed() == Some(point) {
        error!(failpoint = point, "failpoint reached: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Checks a configured failpoint name at start, so a typo in a test fails
/// loudly instead of never firing.
pub fn check_configured() -> Result<(), String> {
    match armed() {
        Some(point) if !POINTS.contains(&point) => Err(format!(
            "{ENV}={point} is not a failpoint; known: {}",
            POINTS.join(", ")
        )),
        _ => Ok(()),
    }
}
