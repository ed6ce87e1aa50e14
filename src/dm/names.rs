//! Device-mapper device names: validated once, so the ioctl layer never sees a
//! name the kernel would reject or one that could escape `/dev/mapper`.

use std::{fmt, path::PathBuf};

use crate::error::{Error, Result};

/// The kernel's limit is 128 bytes including the terminating NUL.
const MAX_NAME_LEN: usize = 127;

/// A device-mapper device name that is safe to use as a file name under
/// `/dev/mapper`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl DeviceName {
    /// Accepts ASCII letters, digits and `._+-`, not starting with `.` or `-`.
    pub fn new(name: &str) -> Result<Self> {
        let reject = |reason: &str| Error::InvalidName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if name.is_empty() {
            return Err(reject("empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(reject("longer than 127 bytes"));
        }
        if name.starts_with(['.', '-']) {
            return Err(reject("starts with '.' or '-'"));
        }
        if let Some(bad) = name.chars().find(|c| !is_name_char(*c)) {
            return Err(reject(&format!(
                "character {bad:?} is not allowed (use A-Z a-z 0-9 . _ + -)"
            )));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stable path of the device, `/dev/mapper/<name>`.
    pub fn mapper_path(&self) -> PathBuf {
        PathBuf::from("/dev/mapper").join(&self.0)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DeviceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_volume_style_names() {
        let name = DeviceName::new("dmclone-0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11").unwrap();
        assert_eq!(
            name.mapper_path(),
            PathBuf::from("/dev/mapper/dmclone-0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11")
        );
    }

    #[test]
    fn rejects_path_escapes_and_odd_characters() {
        for bad in ["", "../x", "a/b", ".hidden", "-flag", "sp ace", "é", "a\0b"] {
            let err = DeviceName::new(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid device-mapper name"),
                "{bad:?}: {err}"
            );
        }
        assert!(DeviceName::new(&"a".repeat(128)).is_err());
        assert!(DeviceName::new(&"a".repeat(127)).is_ok());
    }

    proptest! {
        #[test]
        fn accepted_names_never_contain_a_slash(s in "\\PC{0,140}") {
            if let Ok(name) = DeviceName::new(&s) {
                prop_assert!(!name.as_str().contains('/'));
                prop_assert!(name.as_str().len() <= MAX_NAME_LEN);
                let path = name.mapper_path();
                prop_assert_eq!(path.parent(), Some(std::path::Path::new("/dev/mapper")));
            }
        }
    }
}
