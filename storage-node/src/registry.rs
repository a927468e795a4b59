//! The NBD export registry of a node: one export per volume, named after it.

use std::sync::Arc;

use crate::pool::{Pool, Volume};
use crate::target::TargetRegistry;

pub struct PoolRegistry {
    pool: Arc<Pool>,
}

impl PoolRegistry {
    pub fn new(pool: Arc<Pool>) -> Self {
        PoolRegistry { pool }
    }
}

impl TargetRegistry for PoolRegistry {
    type Target = Volume;

    fn export_names(&self) -> Vec<String> {
        self.pool
            .list_volumes()
            .into_iter()
            .map(|v| v.name)
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        self.pool.volume(name).map(Arc::new)
    }
}
