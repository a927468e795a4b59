//! The header of a replica: the first block of its pool volume, where the
//! replica keeps who it is and its membership state (the epoch it promised,
//! the config it accepted).
//!
//! The block holds two slots of 2 KiB, written in turn. A write replaces
//! the older slot and writes the newer one again byte for byte, so a write
//! torn by a crash (the pool keeps what a torn in-place write left, see
//! `pool::format`) damages only the slot it was replacing, and the other
//! still holds the state from before that write. Falling back to it is
//! correct: the replica answers a request only after its header write
//! completed, so the state in a torn slot was never acted on.
//!
//! Each slot: `STRATREP | u32::MAX | sequence u64 | body_len u32 | crc u32 |
//! body`, the CRC32 covering sequence, length and body; the body is the
//! header as JSON. The slot with the higher sequence that checks out is the
//! header.
//!
//! Blocks written before slots existed hold one header in the whole block
//! (`STRATREP | body_len u32 | body`), without a CRC of its own. They are
//! still read, and a header too large for a slot is still written that way.
//! The first slot write after such a header goes to the second slot, so the
//! old header stays readable until a slot holds a newer one. A slot starts
//! with the same magic and a body length no whole block can have, so a node
//! of an older version (a rollback) finds a header it cannot decode and
//! keeps the replica unused, instead of taking it for one whose creation
//! never finished and deleting it.
//!
//! Media corruption of the block is not this module's concern: the pool's
//! CRC of the block fails, the block cannot be read, and the replica is kept
//! unused (a newer state may be lost with it, and an older one would let the
//! replica promise an epoch twice).

use serde::{Deserialize, Serialize};

use super::replica::{ConfigRecord, Member};

/// Bytes of the header block.
pub const HEADER_BYTES: u64 = 4096;
const SLOT_BYTES: usize = 2048;
const MAGIC: &[u8; 8] = b"STRATREP";
/// Where a whole block has its body length, a slot has this.
const SLOT_MARKER: [u8; 4] = u32::MAX.to_le_bytes();
const SLOT_PREAMBLE: usize = 28;
/// The largest body a slot holds.
const SLOT_BODY_MAX: usize = SLOT_BYTES - SLOT_PREAMBLE;
const WHOLE_BLOCK_PREAMBLE: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub volume: String,
    /// Which volume of that name this replica belongs to, chosen when the
    /// volume was created (0 in headers written before there was one).
    #[serde(default)]
    pub volume_uid: u64,
    pub replica_id: u32,
    pub members: Vec<Member>,
    pub promised_epoch: u64,
    pub config: ConfigRecord,
}

/// Why a block yields no header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No header was ever written: the replica's creation did not finish.
    #[error("no replica header (creation did not finish)")]
    Missing,
    /// A header was written but none can be read back.
    #[error("replica header damaged: {0}")]
    Damaged(String),
}

/// The header block as it is on the device, and where its newest header is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderBlock {
    bytes: Vec<u8>,
    /// The slot holding the newest header and its sequence number; for a
    /// whole-block header, slot 0 at sequence 0 (so the next write goes to
    /// slot 1 and leaves it readable); None for a block never written.
    newest: Option<(usize, u64)>,
}

impl HeaderBlock {
    /// A block with no header yet (a new replica: whatever the pool volume
    /// held before, such as the header of the snapshot it was cloned from,
    /// is overwritten by the first write).
    pub fn fresh() -> HeaderBlock {
        HeaderBlock {
            bytes: vec![0; HEADER_BYTES as usize],
            newest: None,
        }
    }

    /// The header in `bytes` (the block as read from the device), and the
    /// block for the writes that follow.
    pub fn decode(bytes: &[u8]) -> Result<(Header, HeaderBlock), HeaderError> {
        if bytes.len() != HEADER_BYTES as usize {
            return Err(HeaderError::Damaged(format!(
                "header block of {} bytes",
                bytes.len()
            )));
        }
        let mut newest: Option<(usize, u64, Header)> = None;
        let mut problems = Vec::new();
        let mut written = [false; 2];
        for slot in 0..2 {
            let decoded = decode_slot(&bytes[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES]);
            written[slot] = decoded.is_some();
            match decoded {
                Some(Err(problem)) => problems.push(format!("slot {slot}: {problem}")),
                Some(Ok((sequence, header)))
                    if newest.as_ref().is_none_or(|(_, seen, _)| sequence > *seen) =>
                {
                    newest = Some((slot, sequence, header));
                }
                _ => {}
            }
        }
        if let Some((slot, sequence, header)) = newest {
            let block = HeaderBlock {
                bytes: bytes.to_vec(),
                newest: Some((slot, sequence)),
            };
            return Ok((header, block));
        }
        if bytes.starts_with(MAGIC) && bytes[8..12] != SLOT_MARKER {
            let header = decode_whole_block(bytes).map_err(HeaderError::Damaged)?;
            let block = HeaderBlock {
                bytes: bytes.to_vec(),
                newest: Some((0, 0)),
            };
            return Ok((header, block));
        }
        // Only slot 0 written, and it does not check out: the replica's
        // first header write, which ends its creation, was torn (a first
        // write goes to slot 0; slot 1 alone follows a whole-block header).
        // The replica never answered anything: it was never made.
        if !written[1] {
            Err(HeaderError::Missing)
        } else {
            Err(HeaderError::Damaged(problems.join("; ")))
        }
    }

    /// The block after writing `header`: in the slot not holding the newest
    /// header, with the other slot as it is; in the whole block if the
    /// header is too large for a slot.
    pub fn with(&self, header: &Header) -> Result<HeaderBlock, String> {
        let body = serde_json::to_vec(header).map_err(|e| e.to_string())?;
        if body.len() > SLOT_BODY_MAX {
            return Ok(HeaderBlock {
                bytes: encode_whole_block(&body)?,
                newest: Some((0, 0)),
            });
        }
        let (slot, sequence) = match self.newest {
            Some((slot, sequence)) => (1 - slot, sequence + 1),
            None => (0, 1),
        };
        let mut bytes = self.bytes.clone();
        let at = slot * SLOT_BYTES;
        bytes[at..at + SLOT_BYTES].copy_from_slice(&encode_slot(sequence, &body));
        Ok(HeaderBlock {
            bytes,
            newest: Some((slot, sequence)),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The slot holding the newest header (test only: to tear it).
    #[cfg(test)]
    pub fn newest_slot_range(&self) -> Option<std::ops::Range<usize>> {
        self.newest
            .map(|(slot, _)| slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES)
    }
}

fn slot_crc(sequence_and_len: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(sequence_and_len);
    hasher.update(body);
    hasher.finalize()
}

fn encode_slot(sequence: u64, body: &[u8]) -> Vec<u8> {
    let mut slot = vec![0u8; SLOT_BYTES];
    slot[..8].copy_from_slice(MAGIC);
    slot[8..12].copy_from_slice(&SLOT_MARKER);
    slot[12..20].copy_from_slice(&sequence.to_le_bytes());
    slot[20..24].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = slot_crc(&slot[12..24], body);
    slot[24..28].copy_from_slice(&crc.to_le_bytes());
    slot[SLOT_PREAMBLE..SLOT_PREAMBLE + body.len()].copy_from_slice(body);
    slot
}

/// None when the slot was never written (no magic).
fn decode_slot(slot: &[u8]) -> Option<Result<(u64, Header), String>> {
    if !slot.starts_with(MAGIC) || slot[8..12] != SLOT_MARKER {
        return None;
    }
    let sequence = u64::from_le_bytes(slot[12..20].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(slot[20..24].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(slot[24..28].try_into().expect("4 bytes"));
    Some((|| {
        let body = slot
            .get(SLOT_PREAMBLE..SLOT_PREAMBLE + len)
            .ok_or_else(|| format!("body length {len} out of range"))?;
        if slot_crc(&slot[12..24], body) != crc {
            return Err("checksum mismatch (a torn write?)".to_string());
        }
        let header = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        Ok((sequence, header))
    })())
}

fn encode_whole_block(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut block = vec![0u8; HEADER_BYTES as usize];
    if body.len() > block.len() - WHOLE_BLOCK_PREAMBLE {
        return Err(format!(
            "replica header of {} bytes does not fit in a block",
            body.len()
        ));
    }
    block[..8].copy_from_slice(MAGIC);
    block[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    block[WHOLE_BLOCK_PREAMBLE..WHOLE_BLOCK_PREAMBLE + body.len()].copy_from_slice(body);
    Ok(block)
}

fn decode_whole_block(block: &[u8]) -> Result<Header, String> {
    let len = u32::from_le_bytes(block[8..12].try_into().expect("4 bytes")) as usize;
    let body = block
        .get(WHOLE_BLOCK_PREAMBLE..WHOLE_BLOCK_PREAMBLE + len)
        .ok_or_else(|| "header length out of range".to_string())?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Whether `block` looks like a replica header block (test only: to find
/// one in a pool file).
#[cfg(test)]
pub fn looks_like_header(block: &[u8]) -> bool {
    block.starts_with(MAGIC) || block[SLOT_BYTES..].starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(promised_epoch: u64, node_name_len: usize) -> Header {
        Header {
            volume: "db".into(),
            volume_uid: 9,
            replica_id: 2,
            members: (1..=3)
                .map(|id| Member {
                    id,
                    node: format!("{id}{}", "n".repeat(node_name_len)),
                    address: format!("127.0.0.1:{}", 7000 + id),
                })
                .collect(),
            promised_epoch,
            config: ConfigRecord {
                epoch: promised_epoch,
                members: vec![1, 2, 3],
                in_sync: vec![1, 2, 3],
                leaving: None,
                successor: None,
            },
        }
    }

    fn tear(block: &HeaderBlock) -> Vec<u8> {
        let mut bytes = block.bytes().to_vec();
        let range = block.newest_slot_range().expect("a slot was written");
        // The second half of the slot still holds what was there before.
        for byte in &mut bytes[range.start + 30..range.end] {
            *byte ^= 0x5a;
        }
        bytes
    }

    #[test]
    fn the_newest_header_reads_back_after_each_write() {
        let mut block = HeaderBlock::fresh();
        assert_eq!(
            HeaderBlock::decode(block.bytes()),
            Err(HeaderError::Missing)
        );
        for epoch in 1..=5 {
            block = block.with(&header(epoch, 4)).unwrap();
            let (read, reread_block) = HeaderBlock::decode(block.bytes()).unwrap();
            assert_eq!(read, header(epoch, 4));
            assert_eq!(reread_block, block, "the next write continues from it");
        }
    }

    #[test]
    fn a_torn_write_leaves_the_header_before_it() {
        let mut block = HeaderBlock::fresh().with(&header(1, 4)).unwrap();
        // Torn while writing the very first header, which ends the
        // replica's creation: it was never finished.
        assert_eq!(
            HeaderBlock::decode(&tear(&block)),
            Err(HeaderError::Missing)
        );
        for epoch in 2..=4 {
            block = block.with(&header(epoch, 4)).unwrap();
            let (read, after_tear) = HeaderBlock::decode(&tear(&block)).unwrap();
            assert_eq!(read, header(epoch - 1, 4), "torn at epoch {epoch}");
            // Writing on from the torn block: the next header replaces the
            // torn slot, and the one before stays where it was.
            let next = after_tear.with(&header(epoch + 10, 4)).unwrap();
            assert_eq!(
                HeaderBlock::decode(next.bytes()).unwrap().0,
                header(epoch + 10, 4)
            );
            assert_eq!(
                HeaderBlock::decode(&tear(&next)).unwrap().0,
                header(epoch - 1, 4)
            );
        }
    }

    #[test]
    fn a_whole_block_header_reads_and_survives_a_torn_first_slot_write() {
        let body = serde_json::to_vec(&header(3, 4)).unwrap();
        let old = encode_whole_block(&body).unwrap();
        let (read, block) = HeaderBlock::decode(&old).unwrap();
        assert_eq!(read, header(3, 4));
        let next = block.with(&header(4, 4)).unwrap();
        assert_eq!(HeaderBlock::decode(next.bytes()).unwrap().0, header(4, 4));
        assert_eq!(
            HeaderBlock::decode(&tear(&next)).unwrap().0,
            header(3, 4),
            "the old header stays readable until a slot holds a newer one"
        );
    }

    #[test]
    fn a_torn_slot_write_after_a_large_whole_block_header_is_damaged_not_missing() {
        let big = HeaderBlock::fresh().with(&header(1, 900)).unwrap();
        let next = big.with(&header(2, 4)).unwrap();
        assert!(matches!(
            HeaderBlock::decode(&tear(&next)),
            Err(HeaderError::Damaged(_))
        ));
    }

    #[test]
    fn a_header_too_large_for_a_slot_takes_the_whole_block() {
        let block = HeaderBlock::fresh().with(&header(1, 4)).unwrap();
        let big = header(2, 900);
        let next = block.with(&big).unwrap();
        assert_eq!(HeaderBlock::decode(next.bytes()).unwrap().0, big);
        let after = next.with(&header(3, 4)).unwrap();
        assert_eq!(HeaderBlock::decode(after.bytes()).unwrap().0, header(3, 4));
        assert!(HeaderBlock::fresh().with(&header(1, 2000)).is_err());
    }

    /// What a node from before slots does with a block (its whole decoder):
    /// Ok, Err(true) for a header it keeps unused, Err(false) for one it
    /// deletes as unfinished.
    fn read_by_an_older_node(block: &[u8]) -> Result<Header, bool> {
        if !block.starts_with(MAGIC) {
            return Err(false);
        }
        decode_whole_block(block).map_err(|_| true)
    }

    #[test]
    fn an_older_node_keeps_a_slotted_replica_instead_of_deleting_it() {
        let mut block = HeaderBlock::fresh();
        for epoch in 1..=3 {
            block = block.with(&header(epoch, 4)).unwrap();
            assert_eq!(
                read_by_an_older_node(block.bytes()),
                Err(true),
                "epoch {epoch}"
            );
        }
    }

    #[test]
    fn both_slots_damaged_is_damaged_not_missing() {
        let block = HeaderBlock::fresh()
            .with(&header(1, 4))
            .unwrap()
            .with(&header(2, 4))
            .unwrap();
        let mut bytes = block.bytes().to_vec();
        bytes[40] ^= 1;
        bytes[SLOT_BYTES + 40] ^= 1;
        assert!(matches!(
            HeaderBlock::decode(&bytes),
            Err(HeaderError::Damaged(_))
        ));
    }
}
