//! Range locks: a writer holds `[start, end)` of something (a volume target's
//! bytes, a pool volume's blocks) and overlapping writers wait for it.
//!
//! A volume target takes byte ranges: two overlapping writes in flight at once
//! could reach the replicas in different orders and leave them different, and
//! a rebuild copying an extent must not interleave with a write to it. A pool
//! volume takes block ranges, so two writes never overwrite one block in place
//! at once (see `pool::volume`). Disjoint ranges never wait for each other.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: Mutex<u64>,
    released: Notify,
}

/// Holds `[start, end)` until dropped.
pub struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

impl RangeLock {
    pub fn new() -> Arc<RangeLock> {
        Arc::new(RangeLock::default())
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between the check and
            // the wait is not missed.
            released.as_mut().enable();
            {
                let mut held = self.held.lock().expect("range lock");
                if !held.iter().any(|&(_, s, e)| s < end && start < e) {
                    let id = {
                        let mut next = self.next_id.lock().expect("range id");
                        *next += 1;
                        *next
                    };
                    held.push((id, start, end));
                    return RangeGuard {
                        lock: self.clone(),
                        id,
                    };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.lock
            .held
            .lock()
            .expect("range lock")
            .retain(|&(id, _, _)| id != self.id);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = RangeLock::new();
        let first = lock.lock(0, 4096).await;
        // Disjoint: granted at once.
        let _other = lock.lock(4096, 8192).await;
        // Overlapping: waits until the first is dropped.
        let waiter = tokio::spawn({
            let lock = lock.clone();
            async move {
                let _g = lock.lock(100, 200).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "overlapping range was granted");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter granted after release")
            .unwrap();
    }
}
