//! Small helpers for the kernel's file systems (configfs, sysfs): attribute
//! reads, directory listings, errors that name the path and the errno, and
//! running such calls on tokio's blocking pool.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use nix::errno::Errno;

use crate::error::AgentError;

/// The symbolic errno of `err` (`EBUSY`), or its text when it has none.
pub(crate) fn errno_name(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => format!("{:?}", Errno::from_raw(code)),
        None => err.kind().to_string(),
    }
}

/// An error that names what was done, where, the errno, and what to do.
pub(crate) fn fs_error(action: &str, path: &Path, err: io::Error, hint: &str) -> AgentError {
    let errno = errno_name(&err);
    let hint = if hint.is_empty() {
        String::new()
    } else {
        format!("; {hint}")
    };
    AgentError::Io {
        context: format!("{action} {} failed with {errno}{hint}", path.display()),
        source: err,
    }
}

/// An attribute's value without the trailing newline the kernel appends.
pub(crate) fn read_attr(path: &Path) -> Result<String, AgentError> {
    fs::read_to_string(path)
        .map(|text| text.trim_end_matches('\n').to_owned())
        .map_err(|err| fs_error("reading", path, err, ""))
}

/// Like [`read_attr`], but `None` when the attribute (or its object) is gone:
/// kernel objects vanish between a listing and a read.
pub(crate) fn read_attr_if_present(path: &Path) -> Result<Option<String>, AgentError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim_end_matches('\n').to_owned())),
        Err(err) if is_gone(&err) => Ok(None),
        Err(err) => Err(fs_error("reading", path, err, "")),
    }
}

/// Writes `value` in one write(2): a kernel attribute takes the whole value
/// from a single call (no create, no truncate, no retry loop).
pub(crate) fn write_attr(path: &Path, value: &str, hint: &str) -> Result<(), AgentError> {
    let fail = |err| fs_error(&format!("writing {value:?} to"), path, err, hint);
    let written = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write(value.as_bytes()))
        .map_err(fail)?;
    if written != value.len() {
        return Err(fail(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("the kernel took {written} of {} bytes", value.len()),
        )));
    }
    Ok(())
}

/// Entry names of a directory, sorted; an absent directory has none.
pub(crate) fn entry_names(dir: &Path) -> Result<Vec<String>, AgentError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if is_gone(&err) => return Ok(Vec::new()),
        Err(err) => return Err(fs_error("listing", dir, err, "")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|err| fs_error("listing", dir, err, ""))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Whether `path` exists, without following a final symlink.
pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The object went away (or never was): ENOENT, or ENODEV from a sysfs
/// attribute whose device is being deleted.
pub(crate) fn is_gone(err: &io::Error) -> bool {
    matches!(errno_of(err), Some(Errno::ENOENT | Errno::ENODEV))
}

pub(crate) fn errno_of(err: &io::Error) -> Option<Errno> {
    err.raw_os_error().map(Errno::from_raw)
}

/// Runs blocking file-system work on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(what: &'static str, work: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| AgentError::Internal(format!("{what}: worker failed: {err}")))?
}

/// `base/relative`, for paths built from validated names.
pub(crate) fn join(base: &Path, parts: &[&str]) -> PathBuf {
    let mut path = base.to_path_buf();
    for part in parts {
        path.push(part);
    }
    path
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_name_path_errno_and_hint() {
        let err = fs_error(
            "writing \"1\" to",
            Path::new("/sys/kernel/config/nvmet/x/enable"),
            io::Error::from_raw_os_error(Errno::EBUSY as i32),
            "disable it first",
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "writing \"1\" to /sys/kernel/config/nvmet/x/enable failed with EBUSY; disable it first"
            ),
            "{text}"
        );
    }

    #[test]
    fn attribute_reads_drop_the_newline_and_tolerate_absence() {
        let dir = tempfile::tempdir().unwrap();
        let attr = dir.path().join("state");
        fs::write(&attr, "live\n").unwrap();
        assert_eq!(read_attr(&attr).unwrap(), "live");
        assert_eq!(
            read_attr_if_present(&dir.path().join("gone")).unwrap(),
            None
        );
        assert!(entry_names(&dir.path().join("gone")).unwrap().is_empty());
        assert_eq!(entry_names(dir.path()).unwrap(), vec!["state"]);
    }
}
