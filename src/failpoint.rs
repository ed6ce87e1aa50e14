//! Test-only crash points. When `DMCLONE_FAILPOINT` names a point the agent
//! reaches, the agent kills itself with SIGKILL right there, exactly like
//! `kill -9` at that instant: the crash-recovery tests use this to stop
//! create, extend and delete between any two of their steps.
//!
//! The points exist only in builds with the `failpoints` feature (the test
//! tier's). Other builds, releases among them, compile every point to
//! nothing and refuse to start with `DMCLONE_FAILPOINT` set, so that a crash
//! test run against the wrong binary fails instead of passing untested.

pub const ENV: &str = "DMCLONE_FAILPOINT";

/// The point named in the environment, if any.
fn configured() -> Option<String> {
    std::env::var(ENV).ok().filter(|v| !v.is_empty())
}

/// Checks a configured failpoint name at start, so a typo in a test, or a
/// build without failpoints, fails loudly instead of never firing.
pub fn check_configured() -> Result<(), String> {
    check(configured().as_deref())
}

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
    "finalize.after_resume",
    "finalize.after_swap",
    "abort.after_record",
    "export.after_record",
    "unexport.after_unexport",
    "release.after_unexport",
    "release.after_pass_on_record",
    "release.after_pass_on_teardown",
    "snapshot.after_record",
    "snapshot.after_message",
    "snapshot.delete_after_record",
    "clone.after_record",
    "revert.after_record",
    "travel.after_write",
    "travel.after_send",
];

#[cfg(feature = "failpoints")]
pub use self::armed::hit;

#[cfg(feature = "failpoints")]
use self::armed::check;

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;

    use tracing::error;

    use super::{ENV, POINTS, configured};

    /// Read once: points sit on hot paths.
    fn armed() -> Option<&'static str> {
        static ARMED: OnceLock<Option<String>> = OnceLock::new();
        ARMED.get_or_init(configured).as_deref()
    }

    /// Dies here if `point` is armed.
    pub fn hit(point: &'static str) {
        debug_assert!(POINTS.contains(&point), "unknown failpoint {point}");
        #[cfg(test)]
        super::in_task::hit(point);
        if armed() == Some(point) {
            error!(failpoint = point, "failpoint reached: killing the agent");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    pub(super) fn check(configured: Option<&str>) -> Result<(), String> {
        match configured {
            Some(point) if !POINTS.contains(&point) => Err(format!(
                "{ENV}={point} is not a failpoint; known: {}",
                POINTS.join(", ")
            )),
            _ => Ok(()),
        }
    }
}

/// A failpoint in a build without them: nothing at all (but in unit tests,
/// where a point may be armed for one task).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(point: &'static str) {
    #[cfg(test)]
    in_task::hit(point);
    #[cfg(not(test))]
    let _ = point;
}

#[cfg(test)]
pub use self::in_task::crash_at;

/// Unit tests replay crashes against the in-memory kernel: a point armed
/// for one task panics there, which ends the task right there as a kill
/// ends the process, and leaves every other test alone.
#[cfg(test)]
mod in_task {
    use super::POINTS;

    tokio::task_local! {
        static ARMED_IN_TASK: &'static str;
    }

    /// Runs `future` with `point` armed for it alone.
    pub async fn crash_at<F: std::future::Future>(point: &'static str, future: F) -> F::Output {
        assert!(POINTS.contains(&point), "unknown failpoint {point}");
        ARMED_IN_TASK.scope(point, future).await
    }

    pub fn hit(point: &'static str) {
        if ARMED_IN_TASK
            .try_with(|armed| *armed == point)
            .unwrap_or(false)
        {
            panic!("failpoint {point} reached");
        }
    }
}

#[cfg(not(feature = "failpoints"))]
fn check(configured: Option<&str>) -> Result<(), String> {
    match configured {
        Some(point) => Err(format!(
            "{ENV}={point} is set, but this build has no failpoints \
             (build the agent with --features failpoints)"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_configured_starts() {
        assert_eq!(check(None), Ok(()));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn every_known_point_may_be_armed() {
        for point in POINTS {
            assert_eq!(check(Some(point)), Ok(()), "{point}");
        }
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_misspelt_point_is_refused_with_the_known_ones() {
        let err = check(Some("create.after_nothing")).expect_err("a typo");
        assert!(err.contains("is not a failpoint"), "{err}");
        assert!(err.contains("create.after_record"), "{err}");
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn a_build_without_failpoints_refuses_any_point() {
        let err = check(Some("create.after_record")).expect_err("no failpoints");
        assert!(err.contains("this build has no failpoints"), "{err}");
        assert!(err.contains(ENV), "{err}");
    }
}
