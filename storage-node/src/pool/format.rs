//! The on-disk format of a pool, as pure encode/decode functions.
//!
//! ```text
//! block 0                   superblock: identity and layout, CRC-protected
//! journal (J blocks)        batches of map updates, one batch per commit
//! checkpoint slot A         the full metadata (volumes, snapshots, block maps)
//! checkpoint slot B         the same, written alternately with A
//! data (D blocks)           4 KiB data blocks, allocated on first write
//! ```
//!
//! Snapshots (format version 2): a snapshot is a read-only block map kept in
//! the checkpoint beside the volumes' maps. Taking one copies the volume's map,
//! not its data, so a data block may be named by several maps. Reference counts
//! are not stored: like the free bitmap they are rebuilt at open by counting
//! the maps that name each block, so there is no on-disk count to get out of
//! step with the maps after a crash. A clone is an ordinary volume whose map
//! started as a copy of a snapshot's. Snapshots are created and deleted by
//! writing a checkpoint, never through the journal.
//!
//! Versions: version 1 and 2 pools open in this build; their superblock is
//! rewritten as version 3 at open, before the first version-3 checkpoint, so
//! an older build refuses the pool by its version number instead of misreading
//! it. Checkpoints say their own version by their magic. Version 3 added
//! overwrite regions (below): the journal's region records and the
//! checkpoint's list of open regions.
//!
//! Crash consistency: the volume's map is pointed at a block's data, with its
//! CRC, once the data is on the device, and map changes are made durable by a
//! journal batch at the next FLUSH (or FUA write). The newest valid checkpoint
//! plus the unbroken run of valid journal batches after it is the pool's
//! state; a torn batch fails its CRC and is ignored, which is correct because
//! its FLUSH never completed. Every metadata block carries a CRC32.
//!
//! A write goes to a free block (copy-on-write) unless its block can be
//! overwritten in place: mapped, named by no snapshot, and inside an *open
//! overwrite region*. The data area is divided into regions of
//! [`REGION_BLOCKS`]; a region is opened by a journal record that is durable
//! before the first in-place write into it, and closed by a later record (or
//! by leaving it out of a checkpoint's open list) once every in-place write
//! into it is in a durable batch. After an unclean stop a block in a region
//! still open may hold data newer than its durable CRC: written but never
//! flushed, perhaps torn, as a disk may return after power loss. Opening the
//! pool reads the mapped blocks of the open regions and records the CRC of
//! what is there. Outside open regions a mismatch can only be corruption. At
//! most [`MAX_OPEN_REGIONS`] are open, which bounds that scan (4 GiB). An
//! in-place write that fails leaves its blocks as the device does; the pool
//! reads them back at once and records what they hold, as the scan would.
//!
//! Checkpoints alternate between two slots. One that fails may still have
//! landed; since replay starts at the journal's beginning after whichever
//! checkpoint is newest, no journal batch is written after a failed
//! checkpoint until a retry of it succeeds.

use crate::pool::PoolError;

pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"STRATAPL";
/// Version 1 checkpoints: volumes only.
const CHECKPOINT_MAGIC_V1: &[u8; 8] = b"STRATACK";
/// Version 2 checkpoints: volumes, then snapshots.
const CHECKPOINT_MAGIC_V2: &[u8; 8] = b"STRATAC2";
/// Version 3 checkpoints: volumes, snapshots, then the open overwrite regions.
const CHECKPOINT_MAGIC: &[u8; 8] = b"STRATAC3";
const JOURNAL_MAGIC: u32 = 0x534a_4e4c; // "SJNL"
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format this build opens (and upgrades).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Bytes of metadata per allocated block in a checkpoint (lba, pba, crc).
const CHECKPOINT_ENTRY_BYTES: u64 = 16;
/// Map entries a checkpoint slot has room for, per block of the device.
/// Snapshots and clones add maps that share data blocks, so new pools get
/// room for two entries per block (version 1 pools were laid out with one).
const CHECKPOINT_ENTRIES_PER_BLOCK: u64 = 2;
/// Room in each checkpoint slot for the volume table.
const CHECKPOINT_VOLUME_TABLE_BYTES: u64 = 1 << 20;
/// Pools are addressed with 32-bit block numbers: 16 TiB at 4 KiB blocks.
pub const MAX_POOL_BLOCKS: u64 = u32::MAX as u64;
/// Blocks per overwrite region (64 MiB), counted from block 0 of the device.
pub const REGION_BLOCKS: u32 = 16384;
/// Overwrite regions open at once, at most: an unclean stop costs opening the
/// pool a read of this many regions (4 GiB) at most.
pub const MAX_OPEN_REGIONS: usize = 64;

/// The overwrite region a physical block is in.
pub fn region_of(pba: u32) -> u32 {
    pba / REGION_BLOCKS
}

/// Where everything is, in blocks from the start of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub total_blocks: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub checkpoint_start: [u64; 2],
    pub checkpoint_blocks: u64,
    pub data_start: u64,
    pub data_blocks: u64,
}

impl Layout {
    /// Lays out a device of `total_blocks`.
    pub fn for_device(total_blocks: u64) -> Result<Layout, PoolError> {
        let total_blocks = total_blocks.min(MAX_POOL_BLOCKS);
        // The journal: 1/64 of the device, between 1 MiB and 64 MiB.
        let journal_blocks = (total_blocks / 64).clamp(256, 16384);
        // Each checkpoint slot must hold map entries for every data block, and
        // as many again for snapshots.
        let checkpoint_blocks =
            (total_blocks * CHECKPOINT_ENTRIES_PER_BLOCK * CHECKPOINT_ENTRY_BYTES
                + CHECKPOINT_VOLUME_TABLE_BYTES)
                .div_ceil(BLOCK_SIZE_U64);
        let journal_start = 1;
        let checkpoint_start = [
            journal_start + journal_blocks,
            journal_start + journal_blocks + checkpoint_blocks,
        ];
        let data_start = checkpoint_start[1] + checkpoint_blocks;
        if data_start + 256 > total_blocks {
            return Err(PoolError::Invalid(format!(
                "device too small: {} bytes, a pool needs at least {} bytes",
                total_blocks * BLOCK_SIZE_U64,
                (data_start + 256) * BLOCK_SIZE_U64
            )));
        }
        Ok(Layout {
            total_blocks,
            journal_start,
            journal_blocks,
            checkpoint_start,
            checkpoint_blocks,
            data_start,
            data_blocks: total_blocks - data_start,
        })
    }

    pub fn is_data_block(&self, pba: u64) -> bool {
        pba >= self.data_start && pba < self.total_blocks
    }

    /// How many map entries (over all volumes and snapshots together) a
    /// checkpoint slot has room for.
    pub fn checkpoint_entry_capacity(&self) -> u64 {
        (self.checkpoint_blocks * BLOCK_SIZE_U64)
            .saturating_sub(BLOCK_SIZE_U64 + CHECKPOINT_VOLUME_TABLE_BYTES)
            / CHECKPOINT_ENTRY_BYTES
    }
}

/// Block 0: who the pool is and where its parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub name: String,
    pub layout: Layout,
    /// Volumes may be provisioned up to this many percent of the data capacity.
    pub overcommit_percent: u32,
    /// The format version the superblock was written with; [`Superblock::encode`]
    /// always writes [`FORMAT_VERSION`].
    pub format_version: u32,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(SUPERBLOCK_MAGIC);
        w.u32(FORMAT_VERSION);
        w.u32(BLOCK_SIZE as u32);
        w.bytes(&self.uuid);
        w.string(&self.name);
        let l = &self.layout;
        for v in [
            l.total_blocks,
            l.journal_start,
            l.journal_blocks,
            l.checkpoint_start[0],
            l.checkpoint_start[1],
            l.checkpoint_blocks,
            l.data_start,
            l.data_blocks,
        ] {
            w.u64(v);
        }
        w.u32(self.overcommit_percent);
        seal_block(w.0)
    }

    pub fn decode(block: &[u8]) -> Result<Superblock, PoolError> {
        let body = check_block(block).ok_or_else(|| {
            PoolError::Corrupt("superblock checksum mismatch (not a Strata pool?)".into())
        })?;
        let mut r = Reader::new(body);
        if r.bytes(8)? != SUPERBLOCK_MAGIC {
            return Err(PoolError::Corrupt("no Strata pool superblock".into()));
        }
        let version = r.u32()?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(PoolError::Corrupt(format!(
                "pool format version {version} is not supported (this build reads versions \
                 {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}; a newer Strata wrote this pool)"
            )));
        }
        let block_size = r.u32()?;
        if block_size as usize != BLOCK_SIZE {
            return Err(PoolError::Corrupt(format!(
                "unsupported block size {block_size}"
            )));
        }
        let uuid = r.bytes(16)?.try_into().expect("16 bytes");
        let name = r.string()?;
        let layout = Layout {
            total_blocks: r.u64()?,
            journal_start: r.u64()?,
            journal_blocks: r.u64()?,
            checkpoint_start: [r.u64()?, r.u64()?],
            checkpoint_blocks: r.u64()?,
            data_start: r.u64()?,
            data_blocks: r.u64()?,
        };
        let overcommit_percent = r.u32()?;
        Ok(Superblock {
            uuid,
            name,
            layout,
            overcommit_percent,
            format_version: version,
        })
    }
}

/// A data block's place and checksum, as kept in a volume's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockEntry {
    /// Physical block number; 0 means unmapped (block 0 is the superblock).
    pub pba: u32,
    pub crc: u32,
}

impl BlockEntry {
    pub fn is_mapped(&self) -> bool {
        self.pba != 0
    }
}

/// One volume in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub created_unix: u64,
    /// (lba, entry) for every mapped block, in lba order.
    pub blocks: Vec<(u64, BlockEntry)>,
}

/// One snapshot in a checkpoint: a frozen map, and the volume it was taken of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The name of the volume at the time of the snapshot (it may be gone since).
    pub source: String,
    /// Id, name, size, creation time and map of the snapshot itself.
    pub image: VolumeRecord,
}

/// The full metadata at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Increases with every checkpoint; the newest valid one wins.
    pub generation: u64,
    /// The last journal batch this checkpoint includes.
    pub journal_seq: u64,
    /// Next id for a volume or a snapshot (they share one id space).
    pub next_volume_id: u64,
    pub volumes: Vec<VolumeRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    /// Overwrite regions open at this checkpoint, ascending.
    pub open_regions: Vec<u32>,
}

impl Checkpoint {
    /// Encodes as whole blocks: a header block, then the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Writer::default();
        p.u32(self.volumes.len() as u32);
        for v in &self.volumes {
            p.volume_record(v);
        }
        p.u32(self.snapshots.len() as u32);
        for s in &self.snapshots {
            p.string(&s.source);
            p.volume_record(&s.image);
        }
        p.u32(self.open_regions.len() as u32);
        for region in &self.open_regions {
            p.u32(*region);
        }
        let payload = p.0;
        let mut h = Writer::default();
        h.bytes(CHECKPOINT_MAGIC);
        h.u64(self.generation);
        h.u64(self.journal_seq);
        h.u64(self.next_volume_id);
        h.u64(payload.len() as u64);
        h.u32(crc32fast::hash(&payload));
        let mut out = seal_block(h.0);
        out.extend_from_slice(&payload);
        out.resize(out.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
        out
    }

    /// The payload length announced by a header block, or None when the header
    /// is not a valid checkpoint header.
    pub fn payload_len(header: &[u8]) -> Option<u64> {
        let body = check_block(header)?;
        let mut r = Reader::new(body);
        let magic = r.bytes(8).ok()?;
        if ![
            &CHECKPOINT_MAGIC[..],
            CHECKPOINT_MAGIC_V2,
            CHECKPOINT_MAGIC_V1,
        ]
        .contains(&magic)
        {
            return None;
        }
        r.u64().ok()?;
        r.u64().ok()?;
        r.u64().ok()?;
        r.u64().ok()
    }

    /// Decodes a header block followed by its payload.
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, PoolError> {
        let bad = |what: &str| PoolError::Corrupt(format!("checkpoint: {what}"));
        let header = bytes.get(..BLOCK_SIZE).ok_or_else(|| bad("truncated"))?;
        let body = check_block(header).ok_or_else(|| bad("header checksum mismatch"))?;
        let mut r = Reader::new(body);
        let version = match r.bytes(8)? {
            m if m == CHECKPOINT_MAGIC => 3,
            m if m == CHECKPOINT_MAGIC_V2 => 2,
            m if m == CHECKPOINT_MAGIC_V1 => 1,
            _ => return Err(bad("bad magic")),
        };
        let generation = r.u64()?;
        let journal_seq = r.u64()?;
        let next_volume_id = r.u64()?;
        let len = r.u64()? as usize;
        let crc = r.u32()?;
        let payload = bytes
            .get(BLOCK_SIZE..BLOCK_SIZE.saturating_add(len))
            .ok_or_else(|| bad("payload truncated"))?;
        if crc32fast::hash(payload) != crc {
            return Err(bad("payload checksum mismatch"));
        }
        let mut r = Reader::new(payload);
        let count = r.u32()?;
        let mut volumes = Vec::with_capacity(count.min(4096) as usize);
        for _ in 0..count {
            volumes.push(r.volume_record()?);
        }
        let mut snapshots = Vec::new();
        if version >= 2 {
            let count = r.u32()?;
            for _ in 0..count {
                let source = r.string()?;
                let image = r.volume_record()?;
                snapshots.push(SnapshotRecord { source, image });
            }
        }
        let mut open_regions = Vec::new();
        if version >= 3 {
            let count = r.u32()?;
            for _ in 0..count {
                open_regions.push(r.u32()?);
            }
        }
        Ok(Checkpoint {
            generation,
            journal_seq,
            next_volume_id,
            volumes,
            snapshots,
            open_regions,
        })
    }
}

#[cfg(test)]
impl Superblock {
    /// This superblock as a version 1 build wrote it (to test upgrades).
    pub fn encode_version_1(&self) -> Vec<u8> {
        let mut body = self.encode()[..BLOCK_SIZE - 4].to_vec();
        body[8..12].copy_from_slice(&1u32.to_le_bytes());
        seal_block(body)
    }
}

#[cfg(test)]
impl Checkpoint {
    /// This checkpoint as a version 1 build wrote it: the old magic, no
    /// snapshot table (to test upgrades; snapshots are left out).
    pub fn encode_version_1(&self) -> Vec<u8> {
        self.encode_old(1)
    }

    /// This checkpoint as a version 2 build wrote it: no open regions.
    pub fn encode_version_2(&self) -> Vec<u8> {
        self.encode_old(2)
    }

    fn encode_old(&self, version: u32) -> Vec<u8> {
        let mut payload = Writer::default();
        payload.u32(self.volumes.len() as u32);
        for v in &self.volumes {
            payload.volume_record(v);
        }
        if version == 2 {
            payload.u32(self.snapshots.len() as u32);
            for s in &self.snapshots {
                payload.string(&s.source);
                payload.volume_record(&s.image);
            }
        }
        let mut header = Writer::default();
        header.bytes(if version == 2 {
            CHECKPOINT_MAGIC_V2
        } else {
            CHECKPOINT_MAGIC_V1
        });
        for v in [
            self.generation,
            self.journal_seq,
            self.next_volume_id,
            payload.0.len() as u64,
        ] {
            header.u64(v);
        }
        header.u32(crc32fast::hash(&payload.0));
        let mut out = seal_block(header.0);
        out.extend_from_slice(&payload.0);
        out.resize(out.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
        out
    }
}

/// One map change in the journal, or (with [`REGION_RECORD`] as its volume
/// id) the opening or closing of an overwrite region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecord {
    pub volume_id: u64,
    pub lba: u64,
    /// The new entry; an unmapped entry records a TRIM.
    pub entry: BlockEntry,
}

/// The volume id of region records. Volume ids count up from 1 and never
/// reach it. A region record's `lba` is the region, its `entry.pba` is 1 for
/// open and 0 for closed.
pub const REGION_RECORD: u64 = u64::MAX;

impl JournalRecord {
    pub fn region(region: u32, open: bool) -> JournalRecord {
        JournalRecord {
            volume_id: REGION_RECORD,
            lba: region as u64,
            entry: BlockEntry {
                pba: open as u32,
                crc: 0,
            },
        }
    }

    /// `(region, open)` when this is a region record.
    pub fn as_region(&self) -> Option<(u32, bool)> {
        (self.volume_id == REGION_RECORD).then_some((self.lba as u32, self.entry.pba == 1))
    }
}

const JOURNAL_HEADER_BYTES: usize = 24;
const JOURNAL_RECORD_BYTES: usize = 24;
/// Records that fit in one journal block (the last 4 bytes are the CRC).
pub const RECORDS_PER_JOURNAL_BLOCK: usize =
    (BLOCK_SIZE - JOURNAL_HEADER_BYTES - 4) / JOURNAL_RECORD_BYTES;

/// Encodes a batch as whole journal blocks. Each block names the batch and its
/// own position, so a batch is applied only when all of its blocks are present.
pub fn encode_journal_batch(seq: u64, records: &[JournalRecord]) -> Vec<u8> {
    let chunks: Vec<&[JournalRecord]> = if records.is_empty() {
        vec![&[]]
    } else {
        records.chunks(RECORDS_PER_JOURNAL_BLOCK).collect()
    };
    let count = chunks.len() as u32;
    let mut out = Vec::with_capacity(chunks.len() * BLOCK_SIZE);
    for (index, chunk) in chunks.iter().enumerate() {
        let mut w = Writer::default();
        w.u32(JOURNAL_MAGIC);
        w.u64(seq);
        w.u32(index as u32);
        w.u32(count);
        w.u32(chunk.len() as u32);
        for r in chunk.iter() {
            w.u64(r.volume_id);
            w.u64(r.lba);
            w.u32(r.entry.pba);
            w.u32(r.entry.crc);
        }
        out.extend_from_slice(&seal_block(w.0));
    }
    out
}

/// Number of blocks [`encode_journal_batch`] produces for `records` records.
pub fn journal_batch_blocks(records: usize) -> u64 {
    records.div_ceil(RECORDS_PER_JOURNAL_BLOCK).max(1) as u64
}

/// A decoded journal block.
#[derive(Debug)]
pub struct JournalBlock {
    pub seq: u64,
    pub index: u32,
    pub count: u32,
    pub records: Vec<JournalRecord>,
}

/// Decodes one journal block; None when it is not a valid journal block.
pub fn decode_journal_block(block: &[u8]) -> Option<JournalBlock> {
    let body = check_block(block)?;
    let mut r = Reader::new(body);
    if r.u32().ok()? != JOURNAL_MAGIC {
        return None;
    }
    let seq = r.u64().ok()?;
    let index = r.u32().ok()?;
    let count = r.u32().ok()?;
    let n = r.u32().ok()? as usize;
    if n > RECORDS_PER_JOURNAL_BLOCK || index >= count {
        return None;
    }
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        records.push(JournalRecord {
            volume_id: r.u64().ok()?,
            lba: r.u64().ok()?,
            entry: BlockEntry {
                pba: r.u32().ok()?,
                crc: r.u32().ok()?,
            },
        });
    }
    Some(JournalBlock {
        seq,
        index,
        count,
        records,
    })
}

/// Pads `body` to a block and puts the CRC of everything before it in the last 4 bytes.
fn seal_block(mut body: Vec<u8>) -> Vec<u8> {
    assert!(body.len() <= BLOCK_SIZE - 4, "metadata block overflow");
    body.resize(BLOCK_SIZE - 4, 0);
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

/// The body of a sealed block when its CRC matches.
fn check_block(block: &[u8]) -> Option<&[u8]> {
    if block.len() != BLOCK_SIZE {
        return None;
    }
    let (body, crc) = block.split_at(BLOCK_SIZE - 4);
    (crc32fast::hash(body) == u32::from_le_bytes(crc.try_into().ok()?)).then_some(body)
}

/// Checksum of one data block, as stored in its map entry.
pub fn data_crc(block: &[u8]) -> u32 {
    crc32fast::hash(block)
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.bytes(s.as_bytes());
    }
    fn volume_record(&mut self, v: &VolumeRecord) {
        self.u64(v.id);
        self.string(&v.name);
        self.u64(v.size);
        self.u64(v.created_unix);
        self.u64(v.blocks.len() as u64);
        for (lba, e) in &v.blocks {
            self.u64(*lba);
            self.u32(e.pba);
            self.u32(e.crc);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], PoolError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| PoolError::Corrupt("metadata record truncated".into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, PoolError> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, PoolError> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, PoolError> {
        let len = self.u32()? as usize;
        String::from_utf8(self.bytes(len)?.to_vec())
            .map_err(|_| PoolError::Corrupt("metadata string is not UTF-8".into()))
    }
    fn volume_record(&mut self) -> Result<VolumeRecord, PoolError> {
        let id = self.u64()?;
        let name = self.string()?;
        let size = self.u64()?;
        let created_unix = self.u64()?;
        let n = self.u64()?;
        let mut blocks = Vec::with_capacity(n.min(1 << 20) as usize);
        for _ in 0..n {
            let lba = self.u64()?;
            let pba = self.u32()?;
            let crc = self.u32()?;
            blocks.push((lba, BlockEntry { pba, crc }));
        }
        Ok(VolumeRecord {
            id,
            name,
            size,
            created_unix,
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = Superblock {
            uuid: [7; 16],
            name: "pool-a".into(),
            layout: Layout::for_device(262_144).unwrap(),
            overcommit_percent: 300,
            format_version: FORMAT_VERSION,
        };
        let mut block = sb.encode();
        assert_eq!(block.len(), BLOCK_SIZE);
        assert_eq!(Superblock::decode(&block).unwrap(), sb);
        block[20] ^= 1;
        assert!(matches!(
            Superblock::decode(&block),
            Err(PoolError::Corrupt(_))
        ));
    }

    #[test]
    fn layout_regions_do_not_overlap() {
        let l = Layout::for_device(1 << 18).unwrap();
        assert_eq!(l.journal_start, 1);
        assert_eq!(l.checkpoint_start[0], l.journal_start + l.journal_blocks);
        assert_eq!(
            l.checkpoint_start[1],
            l.checkpoint_start[0] + l.checkpoint_blocks
        );
        assert_eq!(l.data_start, l.checkpoint_start[1] + l.checkpoint_blocks);
        assert_eq!(l.data_start + l.data_blocks, l.total_blocks);
        // A full pool's map must fit in a checkpoint slot.
        assert!(l.checkpoint_blocks * BLOCK_SIZE_U64 >= l.data_blocks * CHECKPOINT_ENTRY_BYTES);
        assert!(Layout::for_device(100).is_err());
    }

    #[test]
    fn checkpoint_round_trips_and_detects_damage() {
        let cp = Checkpoint {
            generation: 9,
            journal_seq: 41,
            next_volume_id: 3,
            volumes: vec![VolumeRecord {
                id: 2,
                name: "db".into(),
                size: 1 << 30,
                created_unix: 1_700_000_000,
                blocks: vec![
                    (0, BlockEntry { pba: 900, crc: 5 }),
                    (77, BlockEntry { pba: 901, crc: 6 }),
                ],
            }],
            snapshots: vec![SnapshotRecord {
                source: "db".into(),
                image: VolumeRecord {
                    id: 5,
                    name: "db-monday".into(),
                    size: 1 << 30,
                    created_unix: 1_700_000_100,
                    blocks: vec![(0, BlockEntry { pba: 900, crc: 5 })],
                },
            }],
            open_regions: vec![0, 7],
        };
        let mut bytes = cp.encode();
        assert_eq!(bytes.len() % BLOCK_SIZE, 0);
        let payload = Checkpoint::payload_len(&bytes[..BLOCK_SIZE]).unwrap();
        assert!(payload > 0 && payload <= bytes.len() as u64 - BLOCK_SIZE_U64);
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), cp);
        let last_payload_byte = BLOCK_SIZE + 10;
        bytes[last_payload_byte] ^= 0xff;
        assert!(Checkpoint::decode(&bytes).is_err());
    }

    #[test]
    fn version_1_pools_are_read_and_unknown_versions_refused_clearly() {
        let sb = Superblock {
            uuid: [1; 16],
            name: "old".into(),
            layout: Layout::for_device(262_144).unwrap(),
            overcommit_percent: 200,
            format_version: FORMAT_VERSION,
        };
        let v1 = Superblock::decode(&sb.encode_version_1()).unwrap();
        assert_eq!(v1.format_version, 1);
        assert_eq!(v1.layout, sb.layout);
        let mut future = sb.encode()[..BLOCK_SIZE - 4].to_vec();
        future[8..12].copy_from_slice(&99u32.to_le_bytes());
        let err = Superblock::decode(&seal_block(future)).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");

        // A version 1 checkpoint: the old magic and no snapshot table.
        let volume = VolumeRecord {
            id: 1,
            name: "v".into(),
            size: 8192,
            created_unix: 7,
            blocks: vec![(1, BlockEntry { pba: 300, crc: 9 })],
        };
        let old = Checkpoint {
            generation: 4,
            journal_seq: 2,
            next_volume_id: 2,
            volumes: vec![volume.clone()],
            snapshots: Vec::new(),
            open_regions: Vec::new(),
        };
        // A version 2 checkpoint: snapshots but no list of open regions.
        let mut v2 = old.clone();
        v2.snapshots = vec![SnapshotRecord {
            source: "v".into(),
            image: volume.clone(),
        }];
        assert_eq!(Checkpoint::decode(&v2.encode_version_2()).unwrap(), v2);

        let bytes = old.encode_version_1();
        assert_ne!(bytes, old.encode());
        let cp = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(cp.volumes, vec![volume]);
        assert!(cp.snapshots.is_empty());
        assert_eq!((cp.generation, cp.journal_seq), (4, 2));
    }

    #[test]
    fn journal_batches_split_into_blocks_and_reject_damage() {
        let records: Vec<JournalRecord> = (0..300)
            .map(|i| JournalRecord {
                volume_id: 1,
                lba: i,
                entry: BlockEntry {
                    pba: 1000 + i as u32,
                    crc: i as u32,
                },
            })
            .collect();
        let bytes = encode_journal_batch(12, &records);
        assert_eq!(
            bytes.len() as u64,
            journal_batch_blocks(300) * BLOCK_SIZE_U64
        );
        let mut decoded = Vec::new();
        for (i, block) in bytes.chunks(BLOCK_SIZE).enumerate() {
            let b = decode_journal_block(block).unwrap();
            assert_eq!((b.seq, b.index as usize), (12, i));
            decoded.extend(b.records);
        }
        assert_eq!(decoded, records);
        let region = JournalRecord::region(41, true);
        assert_eq!(region.as_region(), Some((41, true)));
        assert_eq!(
            JournalRecord::region(41, false).as_region(),
            Some((41, false))
        );
        assert_eq!(records[0].as_region(), None);
        let batch = encode_journal_batch(13, &[records[0], region]);
        assert_eq!(
            decode_journal_block(&batch).unwrap().records,
            vec![records[0], region]
        );
        let mut torn = bytes[..BLOCK_SIZE].to_vec();
        torn[100] ^= 4;
        assert!(decode_journal_block(&torn).is_none());
        assert!(decode_journal_block(&[0u8; BLOCK_SIZE]).is_none());
    }
}
