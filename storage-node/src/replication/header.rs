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
//! still read, and a header too large for a slot (over 2020 bytes of JSON)
//! is still written that way, without the protection of slots. The first
//! slot write after such a header writes slot 1 and then slot 0 (see
//! [`HeaderBlock::writes`]). A slot starts with the same magic and a body
//! length no whole block can have, so a node of an older version (a
//! rollback) finds a header it cannot decode and keeps the replica unused,
//! instead of taking it for one whose creation never finished and deleting
//! it. (A crash in the middle of that first slot write may leave the start
//! of the old header in slot 0; only an older node would read it.)
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
    /// The highest replica id any member list this replica took named, so
    /// a new replica's id never repeats one that was deleted (0 in headers
    /// written before there was one: the member ids then tell).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub highest_member_id: u32,
}

fn is_zero(id: &u32) -> bool {
    *id == 0
}

/// Why a block yields no header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Nothing in the block looks like a header: the replica's creation did
    /// not finish (its first header write is copy-on-write, so it is either
    /// wholly there or not at all).
    #[error("no replica header (creation did not finish)")]
    Missing,
    /// A header was written but none can be read back.
    #[error("replica header damaged: {0}")]
    Damaged(String),
}

/// Where the newest header of a block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Newest {
    /// Nowhere: the block was never written.
    Never,
    /// In the whole block, as before slots.
    WholeBlock,
    /// In a slot, with its sequence number.
    Slot { slot: usize, sequence: u64 },
}

/// The header block as it is on the device, and where its newest header is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderBlock {
    bytes: Vec<u8>,
    newest: Newest,
}

impl HeaderBlock {
    /// A block with no header yet (a new replica: whatever the pool volume
    /// held before, such as the header of the snapshot it was cloned from,
    /// is overwritten by the first write).
    pub fn fresh() -> HeaderBlock {
        HeaderBlock {
            bytes: vec![0; HEADER_BYTES as usize],
            newest: Newest::Never,
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
        for slot in 0..2 {
            match decode_slot(slot_bytes(bytes, slot)) {
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
                newest: Newest::Slot { slot, sequence },
            };
            return Ok((header, block));
        }
        if bytes.starts_with(MAGIC) && bytes[8..12] != SLOT_MARKER {
            let header = decode_whole_block(bytes).map_err(HeaderError::Damaged)?;
            let block = HeaderBlock {
                bytes: bytes.to_vec(),
                newest: Newest::WholeBlock,
            };
            return Ok((header, block));
        }
        if !bytes.starts_with(MAGIC) && !slot_bytes(bytes, 1).starts_with(MAGIC) {
            return Err(HeaderError::Missing);
        }
        // Something was written that no longer reads (or a slot from a
        // newer version): kept unused, never deleted.
        if problems.is_empty() {
            problems.push("no slot checks out".into());
        }
        Err(HeaderError::Damaged(problems.join("; ")))
    }

    /// The blocks to write, one after the other, each durable before the
    /// next, to make `header` the newest; the last is the block afterwards.
    /// Usually one: `header` in the slot not holding the newest header, the
    /// other slot as it is. Two when a whole-block header is involved:
    /// - after one, the header goes to slot 1 and then to slot 0 as well,
    ///   so no old whole-block header is left for an older node to read;
    /// - for a header too large for a slot (it takes the whole block, as
    ///   before slots), the newest slot is first copied into the other, so
    ///   a torn whole-block write leaves that header in both slots, and not
    ///   an older one in the slot the tear spared.
    pub fn writes(&self, header: &Header) -> Result<Vec<HeaderBlock>, String> {
        let body = serde_json::to_vec(header).map_err(|e| e.to_string())?;
        if body.len() > SLOT_BODY_MAX {
            let whole = HeaderBlock {
                bytes: encode_whole_block(&body)?,
                newest: Newest::WholeBlock,
            };
            return Ok(match self.newest {
                Newest::Slot { slot, .. } => {
                    let newest_body = slot_body(slot_bytes(&self.bytes, slot));
                    vec![self.with_slot(1 - slot, newest_body), whole]
                }
                Newest::Never | Newest::WholeBlock => vec![whole],
            });
        }
        Ok(match self.newest {
            Newest::Slot { slot, .. } => vec![self.with_slot(1 - slot, &body)],
            Newest::Never => vec![self.with_slot(0, &body)],
            Newest::WholeBlock => {
                let first = self.with_slot(1, &body);
                let second = first.with_slot(0, &body);
                vec![first, second]
            }
        })
    }

    /// This block with `body` written in `slot`, at the next sequence number.
    fn with_slot(&self, slot: usize, body: &[u8]) -> HeaderBlock {
        let sequence = match self.newest {
            Newest::Slot { sequence, .. } => sequence + 1,
            Newest::Never | Newest::WholeBlock => 1,
        };
        let mut bytes = self.bytes.clone();
        let at = slot * SLOT_BYTES;
        bytes[at..at + SLOT_BYTES].copy_from_slice(&encode_slot(sequence, body));
        HeaderBlock {
            bytes,
            newest: Newest::Slot { slot, sequence },
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The slot holding the newest header (test only: to tear it).
    #[cfg(test)]
    pub fn newest_slot_range(&self) -> Option<std::ops::Range<usize>> {
        match self.newest {
            Newest::Slot { slot, .. } => Some(slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES),
            Newest::Never | Newest::WholeBlock => None,
        }
    }
}

fn slot_bytes(block: &[u8], slot: usize) -> &[u8] {
    &block[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES]
}

/// The body of a slot that checked out.
fn slot_body(slot: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(slot[20..24].try_into().expect("4 bytes")) as usize;
    &slot[SLOT_PREAMBLE..SLOT_PREAMBLE + len]
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
            highest_member_id: 3,
            config: ConfigRecord {
                epoch: promised_epoch,
                members: vec![1, 2, 3],
                in_sync: vec![1, 2, 3],
                leaving: None,
                successor: None,
                removed: None,
                added: None,
            },
        }
    }

    /// The block after writing `header` on `block`, every step landed.
    fn write(block: &HeaderBlock, header: &Header) -> HeaderBlock {
        block
            .writes(header)
            .unwrap()
            .pop()
            .expect("at least one write")
    }

    /// What a crash may leave of a write from `before` to `after`: each
    /// 512-byte sector old or new.
    fn tears<'a>(before: &'a [u8], after: &'a [u8]) -> impl Iterator<Item = Vec<u8>> + 'a {
        (0u32..256).map(move |mask| {
            let mut bytes = before.to_vec();
            for sector in 0..8 {
                if mask & (1 << sector) != 0 {
                    let range = sector * 512..(sector + 1) * 512;
                    bytes[range.clone()].copy_from_slice(&after[range]);
                }
            }
            bytes
        })
    }

    /// Writes `header` on `block` as a replica does, step by step, and
    /// checks what every crash along the way leaves: the header before
    /// (`acknowledged`), the new one, or, where `may_be_damaged`, a damaged
    /// header (kept unused). Never an older header, never "missing".
    fn write_checking_crashes(
        block: &HeaderBlock,
        acknowledged: &Header,
        header: &Header,
        may_be_damaged: bool,
    ) -> HeaderBlock {
        let mut on_disk = block.clone();
        for step in block.writes(header).unwrap() {
            for torn in tears(on_disk.bytes(), step.bytes()) {
                match HeaderBlock::decode(&torn) {
                    Ok((read, _)) => assert!(
                        read == *acknowledged || read == *header,
                        "a crash left promise {} (before: {}, writing: {})",
                        read.promised_epoch,
                        acknowledged.promised_epoch,
                        header.promised_epoch
                    ),
                    Err(HeaderError::Damaged(_)) if may_be_damaged => {}
                    other => panic!("a crash writing {} left {other:?}", header.promised_epoch),
                }
            }
            on_disk = step;
        }
        let (read, reread) = HeaderBlock::decode(on_disk.bytes()).unwrap();
        assert_eq!(read, *header);
        assert_eq!(reread, on_disk, "the next write continues from it");
        on_disk
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
    fn a_crash_in_any_slot_write_leaves_the_header_before_it_or_the_new_one() {
        let mut block = write(&HeaderBlock::fresh(), &header(1, 4));
        for epoch in 2..=6 {
            block = write_checking_crashes(&block, &header(epoch - 1, 4), &header(epoch, 4), false);
        }
        // Written on from a torn block, the next header replaces the torn slot.
        let torn = tears(block.bytes(), write(&block, &header(7, 4)).bytes())
            .find(|bytes| HeaderBlock::decode(bytes).unwrap().0 == header(6, 4))
            .expect("some tear leaves the old header");
        let (_, from_torn) = HeaderBlock::decode(&torn).unwrap();
        write_checking_crashes(&from_torn, &header(6, 4), &header(8, 4), false);
    }

    #[test]
    fn a_whole_block_header_moves_to_slots_so_no_older_node_reads_it_stale() {
        let old = encode_whole_block(&serde_json::to_vec(&header(3, 4)).unwrap()).unwrap();
        let (read, block) = HeaderBlock::decode(&old).unwrap();
        assert_eq!(read, header(3, 4));
        assert_eq!(read_by_an_older_node(&old), Ok(header(3, 4)));
        let block = write_checking_crashes(&block, &header(3, 4), &header(4, 4), false);
        assert_eq!(
            read_by_an_older_node(block.bytes()),
            Err(true),
            "after the first slot write, an older node keeps the replica unused"
        );
        write_checking_crashes(&block, &header(4, 4), &header(5, 4), false);
    }

    #[test]
    fn a_crash_writing_a_header_too_large_for_a_slot_never_brings_back_an_older_one() {
        let block = write(&write(&HeaderBlock::fresh(), &header(1, 4)), &header(2, 4));
        let big = header(3, 900);
        let block = write_checking_crashes(&block, &header(2, 4), &big, true);
        // Back to slots: the large body reached into slot 1, so a crash may
        // leave nothing readable, but never the older header.
        let block = write_checking_crashes(&block, &big, &header(4, 4), true);
        assert_eq!(read_by_an_older_node(block.bytes()), Err(true));
        assert!(HeaderBlock::fresh().writes(&header(1, 2000)).is_err());
    }

    #[test]
    fn an_older_node_keeps_a_slotted_replica_instead_of_deleting_it() {
        let mut block = HeaderBlock::fresh();
        for epoch in 1..=3 {
            block = write(&block, &header(epoch, 4));
            assert_eq!(
                read_by_an_older_node(block.bytes()),
                Err(true),
                "epoch {epoch}"
            );
        }
    }

    #[test]
    fn only_a_block_with_no_header_at_all_is_missing() {
        assert_eq!(
            HeaderBlock::decode(HeaderBlock::fresh().bytes()),
            Err(HeaderError::Missing)
        );
        // One slot written that does not read (a tear cannot do that to a
        // first write, which is copy-on-write): damaged, so kept.
        let mut first = write(&HeaderBlock::fresh(), &header(1, 4)).bytes().to_vec();
        first[100] ^= 1;
        assert!(matches!(
            HeaderBlock::decode(&first),
            Err(HeaderError::Damaged(_))
        ));
        let block = write(&write(&HeaderBlock::fresh(), &header(1, 4)), &header(2, 4));
        let mut bytes = block.bytes().to_vec();
        bytes[40] ^= 1;
        bytes[SLOT_BYTES + 40] ^= 1;
        assert!(matches!(
            HeaderBlock::decode(&bytes),
            Err(HeaderError::Damaged(_))
        ));
    }
}
