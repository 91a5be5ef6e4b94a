//! The protobuf schema AMCT's text files follow (`proto/amct.proto`): the
//! generated types and their descriptors for the text format.

use prost_reflect::DescriptorPool;
use std::sync::OnceLock;

/// Protobuf types generated from `proto/amct.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/amct.rs"));
}

/// The descriptors of `proto/amct.proto`, for the text format.
pub fn descriptors() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(
            include_bytes!(concat!(env!("OUT_DIR"), "/amct_descriptor.bin")).as_slice(),
        )
        .expect("the descriptor set generated at build time is valid")
    })
}
