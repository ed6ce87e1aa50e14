//! dd and fio: the contenders and probes that are processes.

use std::path::Path;

use crate::{
    KIB, MIB,
    common::{BenchResult, FioJob, run_tool},
};

pub(crate) const SEQ_READ: FioJob = FioJob {
    rw: "read",
    block_bytes: MIB,
    seconds: None,
};
pub(crate) const SEQ_WRITE: FioJob = FioJob {
    rw: "write",
    block_bytes: MIB,
    seconds: None,
};

/// 4 KiB at random offsets (`randread` or `randwrite`) for `seconds`.
pub(crate) fn random_4k(rw: &'static str, seconds: u64) -> FioJob {
    FioJob {
        rw,
        block_bytes: 4 * KIB,
        seconds: Some(seconds),
    }
}

pub(crate) fn dd_copy(from: &Path, to: &Path, size: u64) -> BenchResult<()> {
    run_tool(
        "dd",
        &[
            format!("if={}", from.display()),
            format!("of={}", to.display()),
            "bs=1M".into(),
            format!("count={}", size / MIB),
            "iflag=direct".into(),
            "oflag=direct".into(),
            "status=none".into(),
        ],
    )?;
    Ok(())
}
