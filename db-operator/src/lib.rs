//! strata-operator: the PostgresCluster custom resource, its controller, and
//! strata-instance, the in-pod instance manager that supervises postgres.

pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod decisions;
pub mod instance;
pub mod instance_api;
pub mod instance_client;
pub mod lsn;
pub mod metrics;
pub mod orchestration;
pub mod validation;
