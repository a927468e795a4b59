//! strata-csi: the CSI driver in front of Strata storage nodes.
//!
//! Not built yet: this crate is filled by the issue "CSI driver and Kubernetes
//! deployment". It holds no code until then, so nothing here pretends to work.
