//! The generated gRPC contract (`proto/`): device-facing `flotilla.agent.v1` and operator-facing
//! `flotilla.admin.v1`, plus the encoded descriptor set served through reflection.

pub mod codec;

#[allow(clippy::all, missing_docs)]
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("flotilla.agent.v1");
    }
}

#[allow(clippy::all, missing_docs)]
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("flotilla.admin.v1");
    }
}

/// The encoded `FileDescriptorSet` of every .proto in `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));
