//! # proto: raftsched on the wire
//!
//! * [`scheduler::v1`]: the public API (`Tasks`, `Workers`, `Cluster` services);
//! * [`internal::v1`]: node to node — `RaftService` (Raft's own RPCs, served by the `raft`
//!   crate's handlers) and `PeerService` (forwarded writes and heartbeats, read index, status,
//!   leader-transfer steps; served by `node`);
//! * [`status`]: the error contract shared by server and client — reason codes
//!   (`x-raftsched-reason`), the leader hint (`x-raftsched-leader`, `<id>@<host:port>`) and the
//!   one-hop forwarding mark;
//! * [`convert`]: conversions between wire messages and the domain types of the
//!   `state-machine` crate (they live here because of the orphan rule);
//! * [`codec`]: the protobuf codec of every generated client and server (a message that
//!   does not decode is `INVALID_ARGUMENT`, not tonic's `INTERNAL`);
//! * [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//!
//! Wire-level checks that need no state (enum values, required messages) happen in the
//! conversions and return a [`state_machine::Rejection`] naming the field; everything else
//! is validated by `state_machine::validate`.

pub mod auth;
pub mod codec;
pub mod convert;
pub mod status;

/// Generated code of package `scheduler.v1`.
pub mod scheduler {
    /// Version 1 of the public API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("scheduler.v1");
    }
}

/// Generated code of package `raftsched.internal.v1`.
pub mod internal {
    /// Version 1 of the node-to-node services.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("raftsched.internal.v1");
    }
}

pub use scheduler::v1 as pb;

/// Encoded `FileDescriptorSet` of every service, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptors");
