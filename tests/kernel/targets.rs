use crate::support::kernel;

/// The target types the product builds on, with the oldest version whose
/// table and status formats our parsers follow.
const REQUIRED: [(&str, (u32, u32, u32)); 7] = [
    ("clone", (1, 0, 0)),
    ("era", (1, 0, 0)),
    ("thin-pool", (1, 22, 0)),
    ("thin", (1, 22, 0)),
    ("linear", (1, 0, 0)),
    ("flakey", (1, 5, 0)),
    ("delay", (1, 0, 0)),
];

#[tokio::test]
async fn kernel_reports_clone_era_and_thin_target_versions() {
    let dm = kernel();
    let (major, minor, _) = dm.version().await.unwrap();
    assert!(
        (major, minor) >= (4, 37),
        "ioctl interface {major}.{minor} lacks per-device event numbers"
    );
    let versions = dm.target_versions().await.unwrap();
    for (target, minimum) in REQUIRED {
        let found = versions
            .iter()
            .find(|v| v.name == target)
            .unwrap_or_else(|| panic!("target {target} is not loaded; have {versions:?}"));
        assert!(
            found.version >= minimum,
            "target {target} is {:?}, need at least {minimum:?}",
            found.version
        );
    }
}
