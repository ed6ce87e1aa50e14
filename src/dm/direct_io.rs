//! Reading and writing a device's blocks past the page cache (O_DIRECT):
//! cached copies of whole snapshots would crowd out the host's memory, and
//! a block the agent writes must be on the device, not in a cache, when
//! the agent records it written (after a flush).

use std::{
    fs::OpenOptions,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

/// O_DIRECT transfers start and end on the device's logical block and use
/// memory aligned to it; 4 KiB covers every device the agent makes.
pub const ALIGN: usize = 4096;

/// `length` bytes whose start is aligned for O_DIRECT, found inside a
/// slightly larger allocation (no unsafe allocator calls needed).
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    length: usize,
}

impl Aligned {
    fn zeroed(length: usize) -> Self {
        let bytes = vec![0u8; length + ALIGN];
        let start = bytes.as_ptr().align_offset(ALIGN);
        Self {
            bytes,
            start,
            length,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.length]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.length]
    }
}

fn unaligned(what: &str, value: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{what} {value} is not a multiple of {ALIGN} bytes"),
    )
}

fn check_aligned(offset: u64, length: usize) -> std::io::Result<()> {
    if !offset.is_multiple_of(ALIGN as u64) {
        return Err(unaligned("offset", offset));
    }
    if !length.is_multiple_of(ALIGN) {
        return Err(unaligned("length", length as u64));
    }
    Ok(())
}

/// `length` bytes of the device at `path` from `offset`.
pub fn read_at(path: &Path, offset: u64, length: usize) -> std::io::Result<Vec<u8>> {
    check_aligned(offset, length)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    let mut buffer = Aligned::zeroed(length);
    file.read_exact_at(buffer.as_mut_slice(), offset)?;
    Ok(buffer.as_slice().to_vec())
}

/// Writes `data` to the device at `path` from `offset`; on the device once
/// it is flushed.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    check_aligned(offset, data.len())?;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    let mut buffer = Aligned::zeroed(data.len());
    buffer.as_mut_slice().copy_from_slice(data);
    file.write_all_at(buffer.as_slice(), offset)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buffers_start_aligned_whatever_the_allocation() {
        for length in [ALIGN, 3 * ALIGN, 256 * ALIGN] {
            let buffer = Aligned::zeroed(length);
            assert_eq!(buffer.as_slice().as_ptr().align_offset(ALIGN), 0);
            assert_eq!(buffer.as_slice().len(), length);
        }
    }

    #[test]
    fn unaligned_offsets_and_lengths_are_refused_before_any_open() {
        let nowhere = Path::new("/nonexistent/device");
        let refused = read_at(nowhere, 512, ALIGN).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
        let refused = write_at(nowhere, 0, &[0u8; 100]).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
    }
}
