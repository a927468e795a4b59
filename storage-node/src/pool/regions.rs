//! Overwrite regions: the parts of the data area where a block may be
//! overwritten in place, and the in-place writes in flight in each.
//!
//! The rule they keep is in [`super::format`] ("Crash consistency"): an
//! in-place write may start only in a region whose opening is durable, and a
//! region is closed only in a batch that also holds the new CRC of every
//! in-place write into it. This is the in-memory side. A region is in the
//! table only while it is durably open; closing removes it at once, under the
//! state lock, before the batch that closes it is written. So a write that
//! wants it again must open it anew, which waits for that batch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::format::MAX_OPEN_REGIONS;

/// A region with no in-place write for this long is closed at the next commit.
pub const IDLE_CLOSE: Duration = Duration::from_secs(10);
/// When the table is full, a region idle for this long gives its place to a
/// region a write wants opened. A region written more recently keeps its
/// place and the write goes copy-on-write, so random writes over more regions
/// than fit do not open and close regions (a journal sync each) over and over.
pub const IDLE_EVICT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct OpenRegions {
    open: HashMap<u32, Region>,
}

struct Region {
    in_flight: u32,
    last_write: Instant,
}

impl OpenRegions {
    /// Starts an in-place write into each of `regions` when all are open;
    /// otherwise starts nothing and returns the ones that are not.
    pub fn begin(&mut self, regions: &[u32]) -> Result<(), Vec<u32>> {
        let closed: Vec<u32> = regions
            .iter()
            .copied()
            .filter(|r| !self.open.contains_key(r))
            .collect();
        if !closed.is_empty() {
            return Err(closed);
        }
        let now = Instant::now();
        for r in regions {
            let region = self.open.get_mut(r).expect("checked open");
            region.in_flight += 1;
            region.last_write = now;
        }
        Ok(())
    }

    /// Ends in-place writes started by [`OpenRegions::begin`].
    pub fn end(&mut self, regions: &[u32]) {
        for r in regions {
            let region = self
                .open
                .get_mut(r)
                .expect("a region with a write in flight stays open");
            region.in_flight -= 1;
        }
    }

    pub fn is_open(&self, region: u32) -> bool {
        self.open.contains_key(&region)
    }

    /// Removes and returns the regions idle for `idle` with nothing in flight.
    pub fn take_idle(&mut self, idle: Duration) -> Vec<u32> {
        let now = Instant::now();
        let idle: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, r)| r.in_flight == 0 && now.duration_since(r.last_write) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            self.open.remove(id);
        }
        idle
    }

    /// Which of `wanted` (not open yet) can be opened, and which open regions
    /// are removed to make room for them (least recently written first,
    /// among those idle for [`IDLE_EVICT`]).
    pub fn make_room(&mut self, wanted: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let mut wanted: Vec<u32> = wanted
            .iter()
            .copied()
            .filter(|r| !self.open.contains_key(r))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let short = (self.open.len() + wanted.len()).saturating_sub(MAX_OPEN_REGIONS);
        let mut evicted = Vec::new();
        if short > 0 {
            let now = Instant::now();
            let mut idle: Vec<(Instant, u32)> = self
                .open
                .iter()
                .filter(|(_, r)| r.in_flight == 0 && now.duration_since(r.last_write) >= IDLE_EVICT)
                .map(|(id, r)| (r.last_write, *id))
                .collect();
            idle.sort_unstable();
            for (_, id) in idle.into_iter().take(short) {
                self.open.remove(&id);
                evicted.push(id);
            }
        }
        wanted.truncate(MAX_OPEN_REGIONS - self.open.len());
        (wanted, evicted)
    }

    /// Records regions whose opening is now durable.
    pub fn mark_open(&mut self, regions: &[u32]) {
        // Before any write: an opening is not a write, and the region must
        // not look idle to the commit right after it.
        let now = Instant::now();
        for r in regions {
            self.open.entry(*r).or_insert(Region {
                in_flight: 0,
                last_write: now,
            });
        }
    }

    /// The open regions, ascending (for a checkpoint).
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.open.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_starts_only_in_open_regions_and_keeps_them_open() {
        let mut regions = OpenRegions::default();
        assert_eq!(regions.begin(&[3, 4]), Err(vec![3, 4]));
        regions.mark_open(&[3]);
        assert_eq!(regions.begin(&[3, 4]), Err(vec![4]));
        regions.mark_open(&[4]);
        regions.begin(&[3, 4]).unwrap();
        // In flight: never closed, however long idle.
        assert!(regions.take_idle(Duration::ZERO).is_empty());
        regions.end(&[3, 4]);
        let mut closed = regions.take_idle(Duration::ZERO);
        closed.sort_unstable();
        assert_eq!(closed, vec![3, 4]);
        assert!(!regions.is_open(3));
    }

    #[test]
    fn a_full_table_gives_places_only_from_idle_regions() {
        let mut regions = OpenRegions::default();
        let all: Vec<u32> = (0..MAX_OPEN_REGIONS as u32).collect();
        regions.mark_open(&all);
        // Everything was just opened: nothing is idle long enough to leave.
        assert_eq!(regions.make_room(&[1000]), (vec![], vec![]));
        // Age all but region 5 past the eviction idle time.
        for (id, r) in regions.open.iter_mut() {
            if *id != 5 {
                r.last_write -= IDLE_EVICT * 2;
            }
        }
        regions.open.get_mut(&0).unwrap().last_write -= IDLE_EVICT;
        regions.begin(&[1]).unwrap();
        regions.open.get_mut(&1).unwrap().last_write -= IDLE_EVICT * 4;
        // Region 0 is the least recently written idle one; 1 is busy.
        let (opening, closing) = regions.make_room(&[1000, 3]);
        assert_eq!((opening, closing), (vec![1000], vec![0]));
        assert!(regions.is_open(1) && regions.is_open(5));
    }
}
