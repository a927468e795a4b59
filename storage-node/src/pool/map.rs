//! A volume's block map: logical block number -> (physical block, CRC).
//!
//! Thin: memory is spent only on 4 MiB chunks that hold at least one mapped block.

use super::format::BlockEntry;

const CHUNK_BLOCKS: usize = 1024;

#[derive(Default, Clone)]
pub struct BlockMap {
    chunks: Vec<Option<Box<[BlockEntry; CHUNK_BLOCKS]>>>,
    mapped: u64,
}

impl BlockMap {
    pub fn get(&self, lba: u64) -> BlockEntry {
        let (c, i) = split(lba);
        match self.chunks.get(c) {
            Some(Some(chunk)) => chunk[i],
            _ => BlockEntry::default(),
        }
    }

    /// Sets the entry and returns the previous one.
    pub fn set(&mut self, lba: u64, entry: BlockEntry) -> BlockEntry {
        let (c, i) = split(lba);
        if c >= self.chunks.len() {
            if !entry.is_mapped() {
                return BlockEntry::default();
            }
            self.chunks.resize(c + 1, None);
        }
        let slot = &mut self.chunks[c];
        if slot.is_none() {
            if !entry.is_mapped() {
                return BlockEntry::default();
            }
            *slot = Some(Box::new([BlockEntry::default(); CHUNK_BLOCKS]));
        }
        let chunk = slot.as_mut().expect("chunk present");
        let old = std::mem::replace(&mut chunk[i], entry);
        match (old.is_mapped(), entry.is_mapped()) {
            (false, true) => self.mapped += 1,
            (true, false) => self.mapped -= 1,
            _ => {}
        }
        old
    }

    /// Number of mapped blocks.
    pub fn mapped_blocks(&self) -> u64 {
        self.mapped
    }

    /// Every mapped block in lba order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, BlockEntry)> + '_ {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk.iter().flat_map(move |chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_mapped())
                    .map(move |(i, e)| ((c * CHUNK_BLOCKS + i) as u64, *e))
            })
        })
    }
}

fn split(lba: u64) -> (usize, usize) {
    (
        (lba / CHUNK_BLOCKS as u64) as usize,
        (lba % CHUNK_BLOCKS as u64) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_iterate() {
        let mut m = BlockMap::default();
        assert!(!m.get(5_000_000).is_mapped());
        let e = BlockEntry { pba: 9, crc: 1 };
        assert_eq!(m.set(5000, e), BlockEntry::default());
        assert_eq!(
            m.set(3, BlockEntry { pba: 10, crc: 2 }),
            BlockEntry::default()
        );
        assert_eq!(m.get(5000), e);
        assert_eq!(m.mapped_blocks(), 2);
        assert_eq!(m.set(5000, BlockEntry::default()), e);
        assert_eq!(m.mapped_blocks(), 1);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![(3, BlockEntry { pba: 10, crc: 2 })]
        );
        // Unmapping something never mapped allocates nothing.
        m.set(1 << 30, BlockEntry::default());
        assert_eq!(m.chunks.len(), 5);
    }
}
