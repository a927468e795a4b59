//! Free-space accounting for data blocks: a bitmap, and reference counts for
//! blocks that snapshots share.
//!
//! Neither is stored on disk; both are rebuilt at open from the volume and
//! snapshot maps, which are the only record of which blocks are in use.
//!
//! Placement keeps large free extents for large writes. Every overwrite in a
//! copy-on-write pool frees a block somewhere in the used space, so a pool
//! under random 4 KiB writes has holes all over it. Single blocks therefore
//! go to the lowest free block, which refills those holes first and leaves
//! the free space above the used blocks in one piece; multi-block writes look
//! for a contiguous run from a cursor of their own. With one next-fit cursor
//! for both, random writes spread the holes over the whole pool and a later
//! 1 MiB write finds no run and becomes hundreds of 4 KiB I/Os.

use std::collections::HashMap;

pub struct Allocator {
    first: u64,
    count: u64,
    /// One bit per data block; set = in use. The bits past `count` in the
    /// last word are set, so they are never handed out.
    bits: Vec<u64>,
    /// One bit per word of `bits`; set = that word has a free block. Finds
    /// the lowest free block without walking full words.
    words_with_free: Vec<u64>,
    /// No word below this one has a free block.
    lowest_word: u64,
    free: u64,
    /// Where the search for the next contiguous run starts.
    run_cursor: u64,
    /// No run of this many free blocks exists (known since the last free).
    no_run_of: Option<u64>,
    /// References beyond the first, for blocks named by more than one map
    /// (a volume and its snapshots, a snapshot and its clones). Most blocks
    /// have one reference, so only the shared ones take memory.
    extra_refs: HashMap<u32, u32>,
}

impl Allocator {
    /// All of blocks [first, first + count) free.
    pub fn new(first: u64, count: u64) -> Self {
        let words = count.div_ceil(64) as usize;
        let mut bits = vec![0; words];
        if count % 64 != 0 {
            bits[words - 1] = !0u64 << (count % 64);
        }
        let mut words_with_free = vec![0u64; words.div_ceil(64)];
        for w in 0..words {
            words_with_free[w / 64] |= 1 << (w % 64);
        }
        Allocator {
            first,
            count,
            bits,
            words_with_free,
            lowest_word: 0,
            free: count,
            run_cursor: 0,
            no_run_of: None,
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
        let w = (i / 64) as usize;
        let word = &mut self.bits[w];
        if used {
            *word |= 1 << (i % 64);
        } else {
            *word &= !(1 << (i % 64));
        }
        if *word == u64::MAX {
            self.words_with_free[w / 64] &= !(1 << (w % 64));
        } else {
            self.words_with_free[w / 64] |= 1 << (w % 64);
            self.lowest_word = self.lowest_word.min(w as u64);
        }
    }

    /// The lowest free block, or None when every block is in use.
    fn lowest_free(&mut self) -> Option<u64> {
        let mut summary = (self.lowest_word / 64) as usize;
        let mut mask = !0u64 << (self.lowest_word % 64);
        while summary < self.words_with_free.len() {
            let candidates = self.words_with_free[summary] & mask;
            if candidates != 0 {
                let w = summary * 64 + candidates.trailing_zeros() as usize;
                self.lowest_word = w as u64;
                let bit = (!self.bits[w]).trailing_zeros() as u64;
                return Some(w as u64 * 64 + bit);
            }
            summary += 1;
            mask = !0;
        }
        self.lowest_word = self.bits.len() as u64;
        None
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
    /// A multi-block request gets one contiguous run when there is one (one
    /// large I/O instead of many small ones); a single block, or a request
    /// no run can hold, gets the lowest free blocks.
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
                self.run_cursor = start + n;
                return Some(
                    (start..start + n)
                        .map(|i| (self.first + i) as u32)
                        .collect(),
                );
            }
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let i = self.lowest_free().expect("free count says there is one");
            self.set(i, true);
            out.push((self.first + i) as u32);
        }
        self.free -= n;
        Some(out)
    }

    /// The start of `n` contiguous free blocks at or after the run cursor,
    /// then from the beginning (runs do not wrap around the end). Works a
    /// word of the bitmap at a time, and remembers a size it found no run of
    /// until a block is freed, so a fragmented pool does not make every large
    /// write scan the whole bitmap.
    fn find_run(&mut self, n: u64) -> Option<u64> {
        const MAX_SCAN_WORDS: usize = 1 << 18; // 64 GiB of pool
        if self.no_run_of.is_some_and(|m| n >= m) {
            return None;
        }
        let words = self.bits.len();
        let cursor = if self.run_cursor < self.count {
            (self.run_cursor / 64) as usize
        } else {
            0
        };
        let mut scanned = 0;
        for range in [cursor..words, 0..cursor] {
            let (mut start, mut len) = (0u64, 0u64);
            for w in range {
                if scanned == MAX_SCAN_WORDS {
                    return None;
                }
                scanned += 1;
                let used = self.bits[w];
                let base = w as u64 * 64;
                if used == 0 {
                    if len == 0 {
                        start = base;
                    }
                    len += 64;
                } else {
                    // The free blocks at the low end of the word end the run
                    // that came from the words before.
                    let low_free = used.trailing_zeros() as u64;
                    if len + low_free >= n {
                        return Some(if len == 0 { base } else { start });
                    }
                    if n < 64 {
                        if let Some(offset) = free_run_within(used, n) {
                            return Some(base + offset);
                        }
                    }
                    // Those at the high end start a new one.
                    len = used.leading_zeros() as u64;
                    start = base + 64 - len;
                }
                if len >= n {
                    return Some(start);
                }
            }
        }
        self.no_run_of = Some(self.no_run_of.map_or(n, |m| m.min(n)));
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
            self.no_run_of = None;
        }
    }
}

/// The offset of the lowest `n` consecutive free (zero) bits inside `used`,
/// for 1 < n < 64. Bit i of `run` says whether bits i..i+k are all free; each
/// step doubles k (or closes the gap to n) with one shift.
fn free_run_within(used: u64, n: u64) -> Option<u64> {
    let mut run = !used;
    let mut k = 1;
    while k < n && run != 0 {
        let step = (n - k).min(k);
        run &= run >> step;
        k += step;
    }
    (run != 0).then(|| run.trailing_zeros() as u64)
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
        // No run of 192 exists: the lowest free blocks, the hole first.
        let rest = a.allocate(192).unwrap();
        assert_eq!(rest.len(), 192);
        assert_eq!(rest[..5], [102, 103, 104, 110, 111]);
        assert_eq!(rest[191], 298);
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
        assert_eq!(a.allocate(1).unwrap(), vec![blocks[0]]);
        assert!(!a.is_shared(blocks[0]));
    }

    #[test]
    fn single_blocks_fill_holes_and_keep_the_free_space_in_one_piece() {
        // A volume of 6000 blocks written sequentially in a pool of 8000,
        // then overwritten at random one block at a time, copy-on-write: each
        // overwrite takes a new block, and the old one is freed at the next
        // commit (every 32 writes, as a queue depth of 32 would).
        let mut a = Allocator::new(0, 8000);
        let mut map: Vec<u32> = Vec::new();
        for _ in 0..6000 / 250 {
            map.extend(a.allocate(250).unwrap());
        }
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut pending = Vec::new();
        for _ in 0..50_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let lba = (rng % map.len() as u64) as usize;
            let new = a.allocate(1).unwrap()[0];
            pending.push(std::mem::replace(&mut map[lba], new));
            if pending.len() == 32 {
                pending.drain(..).for_each(|pba| a.release(pba));
            }
        }
        pending.drain(..).for_each(|pba| a.release(pba));
        assert_eq!(a.free_blocks(), 2000);
        // A 1 MiB write still finds 256 contiguous blocks, several times over.
        for _ in 0..7 {
            let run = a.allocate(256).unwrap();
            assert!(
                run.windows(2).all(|w| w[1] == w[0] + 1),
                "a large write after random overwrites got scattered blocks"
            );
        }
    }

    #[test]
    fn blocks_past_the_end_are_never_handed_out() {
        let mut a = Allocator::new(5, 70);
        let mut got: Vec<u32> = (0..70).map(|_| a.allocate(1).unwrap()[0]).collect();
        got.sort_unstable();
        assert_eq!(got, (5..75).collect::<Vec<u32>>());
        assert!(a.allocate(1).is_none());
        a.release(40);
        assert_eq!(a.allocate(1).unwrap(), vec![40]);
    }

    #[test]
    fn runs_are_found_across_words_and_inside_one() {
        let mut a = Allocator::new(0, 640);
        a.allocate(640).unwrap();
        (100..230).chain(600..610).for_each(|pba| a.release(pba));
        assert_eq!(a.allocate(130).unwrap(), (100..230).collect::<Vec<u32>>());
        assert_eq!(a.allocate(7).unwrap(), (600..607).collect::<Vec<u32>>());
        (62..126).for_each(|pba| a.release(pba));
        assert_eq!(a.allocate(64).unwrap(), (62..126).collect::<Vec<u32>>());
    }

    #[test]
    fn a_size_with_no_run_is_searched_again_once_a_block_is_freed() {
        let mut a = Allocator::new(0, 256);
        a.allocate(256).unwrap();
        a.release(10);
        a.release(12);
        assert_eq!(
            a.allocate(2).unwrap(),
            vec![10, 12],
            "no run: single blocks"
        );
        a.release(20);
        a.release(21);
        assert_eq!(a.allocate(2).unwrap(), vec![20, 21]);
    }

    #[test]
    fn free_runs_inside_a_word() {
        assert_eq!(free_run_within(!0b0111_1110, 6), Some(1));
        assert_eq!(free_run_within(!0b0111_1110, 7), None);
        assert_eq!(free_run_within(!0u64 >> 1, 2), None);
        assert_eq!(free_run_within(!0u64 >> 3, 3), Some(61));
        assert_eq!(free_run_within(0xF0F0_F0F0_F0F0_F0F0, 4), Some(0));
    }
}
