//! Units the kernel counts in. Byte counts are `u64` bytes throughout the
//! domain; device-mapper tables count 512-byte sectors.

/// Bytes in a device-mapper sector.
pub const SECTOR: u64 = 512;

/// Sectors in `bytes`. Every size the agent hands the kernel is a whole
/// number of sectors (volumes are rounded up to at least 1 MiB).
pub const fn sectors(bytes: u64) -> u64 {
    debug_assert!(
        bytes.is_multiple_of(SECTOR),
        "a byte count the kernel cannot map"
    );
    bytes / SECTOR
}

/// Bytes in `sectors`.
pub const fn bytes(sectors: u64) -> u64 {
    sectors * SECTOR
}
