//! Free-space accounting for data blocks: a bitmap with a next-fit cursor,
//! and reference counts for blocks that snapshots share.
//!
//! Neither is stored on disk; both are rebuilt at open from the volume and
//! snapshot maps, which are the only record of which blocks are in use.

use std::collections::HashMap;

pub struct Allocator {
    first: u64,
    count: u64,
    /// One bit per data block; set = in use.
    bits: Vec<u64>,
    free: u64,
    cursor: u64,
    /// References beyond the first, for blocks named by more than one map
    /// (a volume and its snapshots, a snapshot and its clones). Most blocks
    /// have one reference, so only the shared ones take memory.
    extra_refs: HashMap<u32, u32>,
}

impl Allocator {
    /// All of blocks [first, first + count) free.
    pub fn new(first: u64, count: u64) -> Self {
        Allocator {
            first,
            count,
            bits: vec![0; count.div_ceil(64) as usize],
            free: count,
            cursor: 0,
            extra_refs: HashMap::new(),
        }
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    fn is_used(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64, used: bool) {
        let word = &mut self.bits[(i / 64) as usize];
        if used {
            *word |= 1 << (i % 64);
        } else {
            *word &= !(1 << (i % 64));
        }
    }

    /// Counts one map's reference to `pba` while rebuilding at open. False
    /// when it is outside the data area.
    pub fn mark_used(&mut self, pba: u64) -> bool {
        let Some(i) = pba.checked_sub(self.first).filter(|i| *i < self.count) else {
            return false;
        };
        if self.is_used(i) {
            *self.extra_refs.entry(pba as u32).or_insert(0) += 1;
            return true;
        }
        self.set(i, true);
        self.free -= 1;
        true
    }

    /// Another map now names `pba`, which is in use.
    pub fn add_ref(&mut self, pba: u32) {
        debug_assert!(
            self.is_used(pba as u64 - self.first),
            "ref to free block {pba}"
        );
        *self.extra_refs.entry(pba).or_insert(0) += 1;
    }

    /// Whether more than one map names `pba`: overwriting it frees nothing.
    pub fn is_shared(&self, pba: u32) -> bool {
        self.extra_refs.contains_key(&pba)
    }

    /// `n` free blocks; None (and nothing taken) when fewer than `n` are free.
    /// A multi-block request gets one contiguous run when the bitmap has one
    /// near the cursor (one large I/O instead of many small ones); otherwise
    /// the free blocks found first from the cursor, in ascending order.
    pub fn allocate(&mut self, n: u64) -> Option<Vec<u32>> {
        if n > self.free {
            return None;
        }
        if n > 1 {
            if let Some(start) = self.find_run(n) {
                for i in start..start + n {
                    self.set(i, true);
                }
                self.free -= n;
                self.cursor = start + n;
                return Some(
                    (start..start + n)
                        .map(|i| (self.first + i) as u32)
                        .collect(),
                );
            }
        }
        let mut out = Vec::with_capacity(n as usize);
        let mut i = self.cursor;
        while (out.len() as u64) < n {
            if i >= self.count {
                i = 0;
            }
            // Skip full words quickly.
            if i % 64 == 0 && self.bits[(i / 64) as usize] == u64::MAX {
                i += 64;
                continue;
            }
            if !self.is_used(i) {
                self.set(i, true);
                out.push((self.first + i) as u32);
            }
            i += 1;
        }
        self.free -= n;
        self.cursor = i;
        Some(out)
    }

    /// The start of `n` contiguous free blocks at or after the cursor (then
    /// from the beginning), looking at no more than RUN_SEARCH_BLOCKS so a
    /// fragmented pool does not make every write scan the whole bitmap.
    fn find_run(&self, n: u64) -> Option<u64> {
        const RUN_SEARCH_BLOCKS: u64 = 1 << 22; // 16 GiB of pool
        let mut i = self.cursor.min(self.count);
        let mut scanned = 0;
        let (mut start, mut len) = (i, 0u64);
        while scanned < self.count.min(RUN_SEARCH_BLOCKS) {
            if i >= self.count {
                // Runs do not wrap around the end.
                i = 0;
                len = 0;
            }
            let word = self.bits[(i / 64) as usize];
            if i % 64 == 0 && i + 64 <= self.count && (word == 0 || word == u64::MAX) {
                // A whole word at once: all free extends the run, all used ends it.
                if word == 0 {
                    if len == 0 {
                        start = i;
                    }
                    len += 64;
                } else {
                    len = 0;
                }
                i += 64;
                scanned += 64;
            } else {
                if self.is_used(i) {
                    len = 0;
                } else {
                    if len == 0 {
                        start = i;
                    }
                    len += 1;
                }
                i += 1;
                scanned += 1;
            }
            if len >= n {
                return Some(start);
            }
        }
        None
    }

    /// Drops one reference to a block; the block is free when it was the
    /// last. Freeing a block that is not in use is a bug in the caller.
    pub fn release(&mut self, pba: u32) {
        if let Some(refs) = self.extra_refs.get_mut(&pba) {
            *refs -= 1;
            if *refs == 0 {
                self.extra_refs.remove(&pba);
            }
            return;
        }
        let i = pba as u64 - self.first;
        debug_assert!(self.is_used(i), "double free of block {pba}");
        if self.is_used(i) {
            self.set(i, false);
            self.free += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_contiguously_and_reuses_freed_blocks() {
        let mut a = Allocator::new(100, 200);
        let first = a.allocate(10).unwrap();
        assert_eq!(first, (100..110).collect::<Vec<u32>>());
        assert_eq!(a.free_blocks(), 190);
        for pba in &first[2..5] {
            a.release(*pba);
        }
        assert_eq!(a.free_blocks(), 193);
        // Next-fit continues after the cursor, then wraps to reuse the hole.
        let rest = a.allocate(192).unwrap();
        assert_eq!(rest.len(), 192);
        assert_eq!(rest[..2], [110, 111]);
        assert_eq!(rest[190..], [102, 103]);
        assert_eq!(a.free_blocks(), 1);
        assert!(a.allocate(2).is_none(), "no partial allocation");
        assert_eq!(a.free_blocks(), 1);
    }

    #[test]
    fn multi_block_requests_get_a_contiguous_run_when_there_is_one() {
        let mut a = Allocator::new(0, 1024);
        let all = a.allocate(1024).unwrap();
        // Free every other block of the first half, and a run of 100 later.
        for pba in all[..512].iter().step_by(2) {
            a.release(*pba);
        }
        for pba in &all[700..800] {
            a.release(*pba);
        }
        a.cursor = 0;
        let run = a.allocate(64).unwrap();
        assert_eq!(
            run,
            (700..764).collect::<Vec<u32>>(),
            "skips the scattered holes"
        );
        // No run of 200 exists: it takes scattered blocks instead.
        let scattered = a.allocate(200).unwrap();
        assert_eq!(scattered.len(), 200);
        assert_eq!(a.free_blocks(), 256 + 100 - 64 - 200);
    }

    #[test]
    fn mark_used_rejects_out_of_range_and_counts_shared_blocks() {
        let mut a = Allocator::new(10, 100);
        assert!(a.mark_used(10));
        assert!(a.mark_used(10), "a second map naming the block");
        assert!(!a.mark_used(9));
        assert!(!a.mark_used(110));
        assert_eq!(a.free_blocks(), 99);
        assert!(a.is_shared(10));
        a.release(10);
        assert!(!a.is_shared(10));
        assert_eq!(a.free_blocks(), 99, "one reference left");
        a.release(10);
        assert_eq!(a.free_blocks(), 100);
    }

    #[test]
    fn a_shared_block_is_free_only_after_its_last_reference() {
        let mut a = Allocator::new(0, 8);
        let blocks = a.allocate(2).unwrap();
        a.add_ref(blocks[0]);
        a.add_ref(blocks[0]);
        a.release(blocks[0]);
        a.release(blocks[0]);
        assert_eq!(a.free_blocks(), 6);
        a.release(blocks[0]);
        assert_eq!(a.free_blocks(), 7);
        // The freed block is handed out again, unshared.
        a.cursor = 0;
        assert_eq!(a.allocate(1).unwrap(), vec![blocks[0]]);
        assert!(!a.is_shared(blocks[0]));
    }
}
