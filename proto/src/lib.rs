//! strata-proto: the gRPC APIs of Strata, generated from `proto/*.proto`.

/// The storage node's control API.
pub mod storage {
    tonic::include_proto!("strata.storage.v1");
}
