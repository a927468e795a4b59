//! Free-space accounting for data blocks: a bitmap with a next-fit cursor.
//!
//! The bitmap is not stored on disk; it is rebuilt at open from the volume maps,
//! which are the only record of which blocks are in use.

pub struct Allocator {
    first: u64,
    count: u64,
    /// One bit per data block; set = in use.
    bits: Vec<u64>,
    free: u64,
    cursor: u64,
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

    /// Marks `pba` used while rebuilding at open. False when it is outside the
    /// data area or already used (two map entries pointing at one block).
    pub fn mark_used(&mut self, pba: u64) -> bool {
        let Some(i) = pba.checked_sub(self.first).filter(|i| *i < self.count) else {
            return false;
        };
        if self.is_used(i) {
            return false;
        }
        self.set(i, true);
        self.free -= 1;
        true
    }

    /// `n` free blocks, as contiguous as the free space allows, in ascending runs
    /// from the cursor; None (and nothing taken) when fewer than `n` are free.
    pub fn allocate(&mut self, n: u64) -> Option<Vec<u32>> {
        if n > self.free {
            return None;
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

    /// Returns a block. Freeing a block that is not in use is a bug in the caller.
    pub fn release(&mut self, pba: u32) {
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
    fn mark_used_rejects_out_of_range_and_duplicates() {
        let mut a = Allocator::new(10, 100);
        assert!(a.mark_used(10));
        assert!(!a.mark_used(10));
        assert!(!a.mark_used(9));
        assert!(!a.mark_used(110));
        assert_eq!(a.free_blocks(), 99);
    }
}
