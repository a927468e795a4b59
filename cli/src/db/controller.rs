//! The local database controller that `strata up` runs: it finds the
//! databases recorded in `DIR/db/` and runs each in its own task
//! ([`local_cluster::run`]), so a slow volume attach of one never delays a
//! failover of another. Stopping it stops every instance and detaches the
//! volumes before `strata up` stops the storage nodes under them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::local_cluster;
use super::record;

const DISCOVERY_INTERVAL: Duration = Duration::from_millis(500);

pub struct DbController {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DbController {
    pub fn start(dir: PathBuf) -> DbController {
        let (shutdown, stopping) = watch::channel(false);
        let task = tokio::spawn(discover(dir, stopping));
        DbController { shutdown, task }
    }

    /// Stops every database's instances and detaches their volumes.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn discover(dir: PathBuf, mut stopping: watch::Receiver<bool>) {
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(DISCOVERY_INTERVAL);
    loop {
        tokio::select! {
            _ = stopping.changed() => break,
            _ = tick.tick() => {}
        }
        // A task ends when its database is removed; a database created again
        // under the same name gets a new one.
        running.retain(|_, task| !task.is_finished());
        let names = match record::database_names(&dir) {
            Ok(names) => names,
            Err(err) => {
                eprintln!("db: {err:#}");
                continue;
            }
        };
        for name in names {
            running.entry(name.clone()).or_insert_with(|| {
                tokio::spawn(local_cluster::run(dir.clone(), name, stopping.clone()))
            });
        }
    }
    if !running.is_empty() {
        println!("stopping {} databases...", running.len());
    }
    for (_, task) in running {
        let _ = task.await;
    }
}
