//! strata-operator: the PostgresCluster custom resource, its controller, and
//! strata-instance, the in-pod instance manager.
//!
//! Not built yet: this crate is filled by the issue "Managed PostgreSQL". It holds
//! no code until then, so nothing here pretends to work.
