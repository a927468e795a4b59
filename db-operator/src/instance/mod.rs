//! strata-instance, the instance manager: the entrypoint of a PostgreSQL container.
//! It bootstraps the data directory, owns part of the configuration, supervises
//! postgres as its child, changes its role when the controller asks, and reports
//! over HTTP.

pub mod api;
pub mod error;
pub mod manager;
pub mod pgconf;
pub mod process;
pub mod sql;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use error::InstanceError;
pub use manager::InstanceManager;

use crate::instance_api::PrimaryAddress;

/// Everything the instance manager is started with.
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    /// This instance's name; also its `application_name` and slot name on the primary.
    pub name: String,
    pub data_dir: PathBuf,
    /// Where postgres puts its unix socket; private to the postgres user.
    pub socket_dir: PathBuf,
    /// Folder of initdb, postgres, pg_basebackup, pg_rewind, pg_controldata.
    pub pg_bin: PathBuf,
    /// postgres's `listen_addresses`.
    pub listen_address: String,
    pub port: u16,
    pub api_listen: SocketAddr,
    /// OS user postgres runs as when we start as root.
    pub run_as: Option<String>,
    /// All instances of the cluster, this one included.
    pub peers: Vec<String>,
    /// How many standbys must confirm each commit (0: asynchronous).
    pub sync_replicas: u32,
    /// Start as (or turn into) a replica of this primary; without it, an empty data
    /// directory is initialised as a new primary.
    pub primary: Option<PrimaryAddress>,
    pub superuser_password: String,
    pub replication_password: String,
    pub app: Option<AppDatabase>,
    /// Roles from `spec.users`, created on the primary when missing.
    pub users: Vec<DeclaredUser>,
    /// Databases from `spec.databases`, created on the primary when missing.
    pub databases: Vec<DeclaredDatabase>,
    /// User settings from `spec.postgresql.parameters`.
    pub parameters: Vec<(String, String)>,
}

/// A role the cluster declares, with its password from its Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredUser {
    pub name: String,
    /// Role attributes such as `CREATEDB`, checked against a list by the controller.
    pub options: Vec<String>,
    pub password: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredDatabase {
    pub name: String,
    pub owner: String,
}

/// The environment variable that carries a declared user's password.
pub fn user_password_env(user: &str) -> String {
    let name: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("STRATA_USER_PASSWORD_{name}")
}

/// The application database and its owner, created when a cluster is new.
#[derive(Clone, Debug)]
pub struct AppDatabase {
    pub database: String,
    pub owner: String,
    pub password: String,
}
