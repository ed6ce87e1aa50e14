//! The generated dmclone.v1 messages, services and clients. Only the API
//! layer, and the binaries and tests that talk to an agent, name them; the
//! domain below the API knows nothing of the wire.

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unreachable_pub
)]
pub mod v1 {
    tonic::include_proto!("dmclone.v1");
}

/// The encoded descriptor set of every dmclone.v1 file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dmclone_v1_descriptor");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// Reflection serves this set: every service and RPC of design.md's API
    /// surface must be in it, under the versioned package.
    #[test]
    fn descriptor_set_holds_the_whole_api_surface() {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<(String, Vec<String>)> = set
            .file
            .iter()
            .inspect(|f| assert_eq!(f.package(), "dmclone.v1", "{}", f.name()))
            .flat_map(|f| f.service.iter())
            .map(|s| {
                let methods = s.method.iter().map(|m| m.name().to_owned()).collect();
                (s.name().to_owned(), methods)
            })
            .collect();
        let rpcs = |service: &str| {
            services
                .iter()
                .find(|(name, _)| name == service)
                .map(|(_, methods)| methods.len())
                .unwrap_or_else(|| panic!("service {service} missing: {services:?}"))
        };
        assert_eq!(rpcs("Node"), 1);
        assert_eq!(rpcs("Volumes"), 7);
        assert_eq!(rpcs("Snapshots"), 7);
        assert_eq!(rpcs("Transfers"), 14);
    }

    /// Enums start with an UNSPECIFIED zero, so "unset" never means a state.
    #[test]
    fn enum_zero_values_are_unspecified() {
        assert_eq!(
            v1::VolumeState::try_from(0).unwrap(),
            v1::VolumeState::Unspecified
        );
        assert_eq!(
            v1::TransferState::try_from(0).unwrap(),
            v1::TransferState::Unspecified
        );
    }
}
