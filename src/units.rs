//! Units the kernel counts in. Byte counts are `u64` bytes throughout the
//! domain; device-mapper tables count 512-byte sectors.

/// Bytes in a device-mapper sector.
pub const SECTOR: u64 = 512;

/// Sectors in `bytes` (which callers keep sector-aligned).
pub const fn sectors(bytes: u64) -> u64 {
    bytes / SECTOR
}

/// Bytes in `sectors`.
pub const fn bytes(sectors: u64) -> u64 {
    sectors * SECTOR
}
