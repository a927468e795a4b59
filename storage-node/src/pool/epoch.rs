//! Deferred release of freed blocks until no reader can still be using them.
//!
//! A read looks up a block's physical address and then reads it. If the block
//! is overwritten in between, its old physical block becomes free after the next
//! commit and could be handed to another write before the read's I/O is issued;
//! the read would then see someone else's data. So a reader holds the current
//! epoch for the duration of its I/O, and blocks freed by a commit are attached
//! to the epoch current at that commit. An epoch also keeps every newer epoch
//! alive, so its frees go back to the allocator only once every reader that
//! started before it has finished.

use std::sync::{Arc, Mutex};

use super::allocator::Allocator;

pub struct Epoch {
    frees: Mutex<Vec<u32>>,
    next: Mutex<Option<Arc<Epoch>>>,
    allocator: Arc<Mutex<Allocator>>,
}

impl Epoch {
    fn new(allocator: Arc<Mutex<Allocator>>) -> Arc<Epoch> {
        Arc::new(Epoch {
            frees: Mutex::new(Vec::new()),
            next: Mutex::new(None),
            allocator,
        })
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        let frees = std::mem::take(self.frees.get_mut().expect("epoch frees lock"));
        if !frees.is_empty() {
            let mut allocator = self.allocator.lock().expect("allocator lock");
            for pba in frees {
                allocator.release(pba);
            }
        }
    }
}

/// The current epoch, and the hand-over to a new one at each commit.
pub struct Epochs {
    current: Mutex<Arc<Epoch>>,
}

impl Epochs {
    pub fn new(allocator: Arc<Mutex<Allocator>>) -> Self {
        Epochs {
            current: Mutex::new(Epoch::new(allocator)),
        }
    }

    /// Held by a reader while its I/O is in flight.
    pub fn pin(&self) -> Arc<Epoch> {
        self.current.lock().expect("epoch lock").clone()
    }

    /// Frees `blocks` once every reader pinned so far has finished.
    pub fn release_after_readers(&self, blocks: Vec<u32>) {
        if blocks.is_empty() {
            return;
        }
        let mut current = self.current.lock().expect("epoch lock");
        let old = current.clone();
        old.frees.lock().expect("epoch frees lock").extend(blocks);
        let new = Epoch::new(old.allocator.clone());
        *old.next.lock().expect("epoch next lock") = Some(new.clone());
        *current = new;
        drop(current);
        drop(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frees_wait_for_older_readers() {
        let allocator = Arc::new(Mutex::new(Allocator::new(10, 10)));
        let blocks = allocator.lock().unwrap().allocate(4).unwrap();
        let epochs = Epochs::new(allocator.clone());
        let old_reader = epochs.pin();
        epochs.release_after_readers(vec![blocks[0]]);
        let newer_reader = epochs.pin();
        epochs.release_after_readers(vec![blocks[1]]);
        assert_eq!(allocator.lock().unwrap().free_blocks(), 6);
        // The newer reader finishing does not free the first batch: the old one
        // may still be reading blocks[0], and it keeps the later epochs alive.
        drop(newer_reader);
        assert_eq!(allocator.lock().unwrap().free_blocks(), 6);
        drop(old_reader);
        assert_eq!(allocator.lock().unwrap().free_blocks(), 8);
        // Without readers, release is immediate.
        epochs.release_after_readers(vec![blocks[2]]);
        assert_eq!(allocator.lock().unwrap().free_blocks(), 9);
    }
}
