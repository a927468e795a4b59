//! strata-proto: the gRPC APIs of Strata, generated from `proto/*.proto`.

/// The storage node's control API.
pub mod storage {
    tonic::include_proto!("strata.storage.v1");
}

/// The Container Storage Interface (spec v1.8.0), served by strata-csi.
pub mod csi {
    tonic::include_proto!("csi.v1");
}
