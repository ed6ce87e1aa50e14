//! What the benchmarks share.

use std::error::Error as StdError;

use dmclone::dm::{kernel::DeviceMapper, names::DeviceName};

pub type BenchResult<T> = Result<T, Box<dyn StdError + Send + Sync>>;

/// Removes every device named `<prefix>-…`, those stacked on others first
/// (a device is removable once nothing holds it open).
pub async fn remove_devices_with_prefix(dm: &DeviceMapper, prefix: &str) -> BenchResult<()> {
    loop {
        let mut ours = Vec::new();
        for device in dm.list().await? {
            if device.name.starts_with(&format!("{prefix}-")) {
                ours.push(DeviceName::new(&device.name)?);
            }
        }
        if ours.is_empty() {
            return Ok(());
        }
        let mut removed = false;
        for name in &ours {
            if dm.info(name).await?.map(|s| s.open_count) == Some(0) {
                dm.remove(name).await?;
                removed = true;
            }
        }
        if !removed {
            return Err(format!("bench devices {ours:?} are held open by something else").into());
        }
    }
}
