//! Device-mapper: typed tables and status (pure), names, and the ioctl boundary.

pub mod direct_io;
pub mod events;
#[cfg(any(test, feature = "kernel-fake"))]
pub mod fake;
pub mod held;
pub mod kernel;
pub mod names;
pub mod seam;
pub mod status;
pub mod table;
pub mod topology;

pub(crate) use seam::block_device;
pub use seam::{Kernel, LiveKernel, adopt, ensure_device};

/// Target types the agent cannot work without.
pub const REQUIRED_TARGETS: [&str; 5] = ["clone", "era", "thin-pool", "thin", "linear"];

/// The required targets missing from `loaded` (names as the kernel lists them).
pub fn missing_targets<'a>(loaded: impl IntoIterator<Item = &'a str>) -> Vec<&'static str> {
    let loaded: Vec<&str> = loaded.into_iter().collect();
    REQUIRED_TARGETS
        .into_iter()
        .filter(|required| !loaded.contains(required))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_missing_required_target() {
        assert_eq!(
            missing_targets(["linear", "thin", "thin-pool", "era", "striped"]),
            vec!["clone"]
        );
        assert!(missing_targets(REQUIRED_TARGETS).is_empty());
    }
}
