//! A step taken while devices are suspended, as one piece: whatever happens
//! inside (an error, a panic, a suspend that fails part-way) every device
//! suspended for it is resumed before the piece returns. Both kernels run
//! their suspend → step → resume through here, inside one blocking call, so
//! no caller can stop between a suspend and its resume.

use std::time::Instant;

use tracing::warn;

use super::kernel::SegmentStatus;
use crate::error::Error;

/// Whether a device should resume onto its loaded table, judged from its
/// status read while it is suspended.
pub type SwitchCheck = fn(&[SegmentStatus]) -> bool;

/// How a swap held under one suspend went, timed inside the kernel step.
#[derive(Debug, Clone, Copy)]
pub struct HeldSwap {
    /// The device resumed onto the loaded table.
    pub switched: bool,
    /// When I/O stopped being served (the suspend began).
    pub started: Instant,
    pub suspended: Instant,
    pub checked: Instant,
    /// When the device served I/O again.
    pub resumed: Instant,
}

/// The operations a held swap needs from a kernel, on one device.
#[allow(missing_debug_implementations)] // closures
pub struct SwapSteps<S, R, St, D> {
    pub suspend: S,
    pub resume: R,
    pub status: St,
    pub drop_loaded: D,
}

/// Suspends the device (a table waits in its inactive slot), reads its
/// status, and resumes: onto the loaded table when `switch` accepts the
/// status, else onto the live one after dropping the loaded table. A status
/// that cannot be read keeps the live table. One piece, like
/// [`while_suspended`].
pub fn resume_loaded_if<N, S, R, St, D>(
    name: &N,
    steps: SwapSteps<S, R, St, D>,
    switch: SwitchCheck,
) -> Result<HeldSwap, Error>
where
    N: std::fmt::Display,
    S: FnMut(&N) -> Result<(), Error>,
    R: FnMut(&N) -> Result<(), Error>,
    St: FnOnce() -> Result<Vec<SegmentStatus>, Error>,
    D: FnOnce() -> Result<(), Error>,
{
    let started = Instant::now();
    let mut inside = (started, started);
    let switched = while_suspended(
        std::slice::from_ref(name),
        steps.suspend,
        steps.resume,
        || {
            let suspended = Instant::now();
            let switched = match (steps.status)() {
                Ok(status) => switch(&status),
                Err(err) => {
                    warn!(device = %name, error = %err, "cannot read the status while suspended; keeping the live table");
                    false
                }
            };
            if !switched {
                (steps.drop_loaded)()?;
            }
            inside = (suspended, Instant::now());
            Ok(switched)
        },
    )?;
    Ok(HeldSwap {
        switched,
        started,
        suspended: inside.0,
        checked: inside.1,
        resumed: Instant::now(),
    })
}

/// Suspends each of `names` in order, runs `step`, and resumes them in
/// reverse order on every path. The step's error comes first; a resume that
/// fails after a successful step is the error then.
pub fn while_suspended<N, T>(
    names: &[N],
    mut suspend: impl FnMut(&N) -> Result<(), Error>,
    resume: impl FnMut(&N) -> Result<(), Error>,
    step: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error>
where
    N: std::fmt::Display,
{
    let mut held = Held {
        names,
        suspended: 0,
        resume,
    };
    for name in names {
        suspend(name)?;
        held.suspended += 1;
    }
    let stepped = step();
    let resumed = held.release();
    match (stepped, resumed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(resume)) => Err(resume),
        (Err(step), _) => Err(step),
    }
}

/// The devices suspended so far; dropping it resumes them, so an early
/// return or a panic cannot leave one suspended.
struct Held<'a, N: std::fmt::Display, R: FnMut(&N) -> Result<(), Error>> {
    names: &'a [N],
    suspended: usize,
    resume: R,
}

impl<N: std::fmt::Display, R: FnMut(&N) -> Result<(), Error>> Held<'_, N, R> {
    /// Resumes every device still suspended, last first; tries them all and
    /// returns the first failure.
    fn release(&mut self) -> Result<(), Error> {
        let mut first_failure = Ok(());
        while self.suspended > 0 {
            self.suspended -= 1;
            let name = &self.names[self.suspended];
            if let Err(err) = (self.resume)(name) {
                warn!(device = %name, error = %err, "a device suspended for a step did not resume");
                if first_failure.is_ok() {
                    first_failure = Err(err);
                }
            }
        }
        first_failure
    }
}

impl<N: std::fmt::Display, R: FnMut(&N) -> Result<(), Error>> Drop for Held<'_, N, R> {
    fn drop(&mut self) {
        // Reached with devices still suspended only on an early return or
        // a panic; the failure, if any, was logged.
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{cell::RefCell, panic::AssertUnwindSafe};

    use super::*;

    /// What happened, in order, to devices "a", "b", "c".
    #[derive(Default)]
    struct Log {
        events: RefCell<Vec<String>>,
        fail_suspend_of: Option<&'static str>,
        fail_resume_of: Option<&'static str>,
    }

    impl Log {
        fn run<T>(&self, step: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
            while_suspended(
                &["a", "b", "c"],
                |name| self.note("suspend", name, self.fail_suspend_of),
                |name| self.note("resume", name, self.fail_resume_of),
                step,
            )
        }

        fn note(&self, what: &str, name: &&str, fail: Option<&str>) -> Result<(), Error> {
            self.events.borrow_mut().push(format!("{what} {name}"));
            match fail {
                Some(failing) if failing == *name => Err(Error::Other(format!("{what} {name}"))),
                _ => Ok(()),
            }
        }

        fn events(&self) -> Vec<String> {
            self.events.borrow().clone()
        }
    }

    const AROUND: [&str; 6] = [
        "suspend a",
        "suspend b",
        "suspend c",
        "resume c",
        "resume b",
        "resume a",
    ];

    #[test]
    fn the_step_runs_between_suspends_and_resumes_in_reverse() {
        let log = Log::default();
        let got = log.run(|| {
            log.events.borrow_mut().push("step".into());
            Ok(7)
        });
        assert_eq!(got.ok(), Some(7));
        let mut expected: Vec<String> = AROUND.iter().map(|e| (*e).to_owned()).collect();
        expected.insert(3, "step".into());
        assert_eq!(log.events(), expected);
    }

    #[test]
    fn a_failed_step_still_resumes_everything_and_is_the_error() {
        let log = Log {
            fail_resume_of: Some("b"),
            ..Log::default()
        };
        let got: Result<(), Error> = log.run(|| Err(Error::Other("step".into())));
        assert_eq!(
            got.unwrap_err().to_string(),
            Error::Other("step".into()).to_string()
        );
        assert_eq!(log.events(), AROUND);
    }

    #[test]
    fn a_failed_resume_after_a_good_step_is_the_error() {
        let log = Log {
            fail_resume_of: Some("c"),
            ..Log::default()
        };
        let got = log.run(|| Ok(()));
        assert!(got.unwrap_err().to_string().contains("resume c"));
        assert_eq!(log.events(), AROUND, "b and a resumed all the same");
    }

    #[test]
    fn a_suspend_failing_part_way_resumes_what_was_suspended_and_skips_the_step() {
        let log = Log {
            fail_suspend_of: Some("c"),
            ..Log::default()
        };
        let got = log.run(|| -> Result<(), Error> { panic!("the step must not run") });
        assert!(got.is_err());
        assert_eq!(
            log.events(),
            [
                "suspend a",
                "suspend b",
                "suspend c",
                "resume b",
                "resume a"
            ]
        );
    }

    #[test]
    fn a_panicking_step_leaves_nothing_suspended() {
        let log = Log::default();
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            log.run(|| -> Result<(), Error> { panic!("inside the window") })
        }));
        assert!(caught.is_err());
        assert_eq!(log.events(), AROUND);
    }
}
