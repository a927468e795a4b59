//! The replication protocol's framing: what a volume target and a replica say
//! to each other over TCP.
//!
//! Every frame is a fixed header, protected by its own CRC32, then an optional
//! payload followed by the payload's CRC32. Requests carry an id chosen by the
//! target; replies carry the same id and may come back in any order, so many
//! requests are in flight on one connection (pipelining). A frame that fails
//! its CRC or names an unknown operation ends the connection: the peer cannot
//! know where the next frame starts, and the target treats the replica as
//! failed, which is safe.
//!
//! Request header (48 bytes, little endian):
//! `magic u32 | op u8 | flags u8 | reserved u16 | id u64 | epoch u64 |
//!  offset u64 | length u64 | payload_len u32 | header_crc u32`
//!
//! Reply header (24 bytes):
//! `magic u32 | status u8 | reserved [u8; 3] | id u64 | payload_len u32 |
//!  header_crc u32`

use std::io;

use bytes::Bytes;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::engine::AlignedBuf;

pub const REQUEST_MAGIC: u32 = 0x5354_5251; // "STRQ"
pub const REPLY_MAGIC: u32 = 0x5354_5250; // "STRP"
pub const REQUEST_HEADER_LEN: usize = 48;
pub const REPLY_HEADER_LEN: usize = 24;
/// The largest payload either side accepts: a 32 MiB write, or the digests of
/// a large range. Anything bigger is a broken or hostile peer.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Request flag: the write must be durable before it is acknowledged.
pub const FLAG_FUA: u8 = 1;
/// Request flag (write zeroes): keep the range allocated.
pub const FLAG_NO_HOLE: u8 = 2;
/// Request flag (prepare): grant the epoch only if the replica has promised
/// no epoch above `length`. A node reopening the target it served before a
/// restart uses it, so it never takes a volume over from a newer target.
pub const FLAG_ONLY_IF_PROMISE_AT_MOST: u8 = 4;
/// Request flag (hello): the target names the replica it expects, the
/// replica id in `offset` and the volume uid in `length`. A replica that is
/// another one (a replica of a volume deleted and created again under the
/// same name, or one that replaced the expected one) refuses with NotFound.
pub const FLAG_EXPECT_REPLICA: u8 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// First request on a connection: the payload names the volume, and
    /// `FLAG_EXPECT_REPLICA` which replica of it. The reply carries the
    /// replica's incarnation (8 bytes, little-endian), which changes when its
    /// process restarts.
    Hello = 1,
    /// The replica's membership state (no epoch check).
    GetState = 2,
    /// Round 1 of a configuration change at `epoch`.
    Prepare = 3,
    /// Round 2: the payload is the config to persist.
    Persist = 4,
    Read = 5,
    Write = 6,
    Flush = 7,
    Trim = 8,
    WriteZeroes = 9,
    /// Digests of `length` extents from extent number `offset`.
    Digest = 10,
    /// Take a copy-on-write snapshot of the replica; the payload is the
    /// snapshot's name, `offset` its uid (the same in every copy). The reply
    /// carries the uid stored (8 bytes, little-endian): a replica of an older
    /// build answers without it. Epoch-checked like data requests, so a
    /// fenced target cannot take one.
    Snapshot = 11,
}

impl Op {
    /// Whether the request reads or changes the volume's data (or takes a
    /// copy of it), as opposed to membership and connection requests.
    pub fn carries_data(self) -> bool {
        matches!(
            self,
            Op::Read
                | Op::Write
                | Op::Flush
                | Op::Trim
                | Op::WriteZeroes
                | Op::Digest
                | Op::Snapshot
        )
    }

    pub fn from_u8(raw: u8) -> Option<Op> {
        Some(match raw {
            1 => Op::Hello,
            2 => Op::GetState,
            3 => Op::Prepare,
            4 => Op::Persist,
            5 => Op::Read,
            6 => Op::Write,
            7 => Op::Flush,
            8 => Op::Trim,
            9 => Op::WriteZeroes,
            10 => Op::Digest,
            11 => Op::Snapshot,
            _ => return None,
        })
    }
}

/// The outcome of a request, as the replica reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The request's epoch is older than the replica's promise: the sender
    /// has been replaced by a newer target.
    Fenced = 1,
    /// The request's epoch is newer than the replica's promise: the replica
    /// missed a configuration change.
    Behind = 2,
    Io = 3,
    /// A block failed its checksum: another replica may have a good copy.
    Checksum = 4,
    NoSpace = 5,
    OutOfRange = 6,
    Invalid = 7,
    NotFound = 8,
}

impl Status {
    pub fn from_u8(raw: u8) -> Option<Status> {
        Some(match raw {
            0 => Status::Ok,
            1 => Status::Fenced,
            2 => Status::Behind,
            3 => Status::Io,
            4 => Status::Checksum,
            5 => Status::NoSpace,
            6 => Status::OutOfRange,
            7 => Status::Invalid,
            8 => Status::NotFound,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub flags: u8,
    pub id: u64,
    pub epoch: u64,
    pub offset: u64,
    pub length: u64,
    /// Shared, not copied, when one write goes to several replicas.
    pub payload: Bytes,
}

impl Request {
    pub fn new(op: Op, id: u64, epoch: u64) -> Request {
        Request {
            op,
            flags: 0,
            id,
            epoch,
            offset: 0,
            length: 0,
            payload: Bytes::new(),
        }
    }

    /// The Hello for `volume`, naming the replica expected when known.
    pub fn hello(volume: &str, expected: Option<ExpectedReplica>) -> Request {
        let mut hello = Request::new(Op::Hello, 0, 0);
        hello.payload = Bytes::copy_from_slice(volume.as_bytes());
        if let Some(expected) = expected {
            hello.flags = FLAG_EXPECT_REPLICA;
            hello.offset = u64::from(expected.replica_id);
            hello.length = expected.volume_uid;
        }
        hello
    }

    /// The replica a Hello names (see `FLAG_EXPECT_REPLICA`), if any.
    pub fn expected_replica(&self) -> Option<ExpectedReplica> {
        if self.op != Op::Hello || self.flags & FLAG_EXPECT_REPLICA == 0 {
            return None;
        }
        Some(ExpectedReplica {
            // A replica id past u32 matches no replica.
            replica_id: u32::try_from(self.offset).unwrap_or(u32::MAX),
            volume_uid: self.length,
        })
    }
}

/// Which replica of a volume a target expects at the other end: replica ids
/// are only unique within one volume, and a volume name can be reused after
/// a delete, so both are needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedReplica {
    pub replica_id: u32,
    pub volume_uid: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub id: u64,
    /// A read's data, as the replica's engine read it (not copied).
    pub payload: Bytes,
}

/// Why a frame could not be read. Every one of them ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bad magic {0:#x}")]
    Magic(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(u32),
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("unknown status {0}")]
    UnknownStatus(u8),
}

fn seal(header: &mut [u8]) {
    let body = header.len() - 4;
    let crc = crc32fast::hash(&header[..body]);
    header[body..].copy_from_slice(&crc.to_le_bytes());
}

fn check_seal(header: &[u8]) -> Result<(), FrameError> {
    let body = header.len() - 4;
    let stored = u32::from_le_bytes(header[body..].try_into().expect("4 bytes"));
    if crc32fast::hash(&header[..body]) == stored {
        Ok(())
    } else {
        Err(FrameError::HeaderChecksum)
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends the request to `out` (header, payload, payload CRC).
pub fn encode_request(request: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(&request_header(request));
    append_payload(&request.payload, out);
}

/// The request as the pieces that go on the wire one after the other:
/// header, then payload and payload CRC when there is a payload. The payload
/// is shared with the request, not copied.
pub fn request_parts(request: &Request) -> Vec<Bytes> {
    let mut parts = Vec::with_capacity(3);
    parts.push(Bytes::copy_from_slice(&request_header(request)));
    if !request.payload.is_empty() {
        parts.push(request.payload.clone());
        let crc = crc32fast::hash(&request.payload).to_le_bytes();
        parts.push(Bytes::copy_from_slice(&crc));
    }
    parts
}

fn request_header(request: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    header[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
    header[4] = request.op as u8;
    header[5] = request.flags;
    header[8..16].copy_from_slice(&request.id.to_le_bytes());
    header[16..24].copy_from_slice(&request.epoch.to_le_bytes());
    header[24..32].copy_from_slice(&request.offset.to_le_bytes());
    header[32..40].copy_from_slice(&request.length.to_le_bytes());
    header[40..44].copy_from_slice(&(request.payload.len() as u32).to_le_bytes());
    seal(&mut header);
    header
}

/// Appends the reply to `out`.
pub fn encode_reply(reply: &Reply, out: &mut Vec<u8>) {
    out.extend_from_slice(&reply_header(reply));
    append_payload(&reply.payload, out);
}

fn reply_header(reply: &Reply) -> [u8; REPLY_HEADER_LEN] {
    let mut header = [0u8; REPLY_HEADER_LEN];
    header[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
    header[4] = reply.status as u8;
    header[8..16].copy_from_slice(&reply.id.to_le_bytes());
    header[16..20].copy_from_slice(&(reply.payload.len() as u32).to_le_bytes());
    seal(&mut header);
    header
}

/// Payloads from this size on go out from where they are, not copied into
/// the batch: below it, one more piece for the socket costs more than the copy.
const SHARED_PAYLOAD_MIN: usize = 1024;

/// Replies gathered for one vectored write. Headers, CRCs and small payloads
/// are copied together into runs; a large payload (a read's data, straight
/// from the replica's engine) is a piece of its own, not copied.
#[derive(Default)]
pub struct ReplyBatch {
    parts: Vec<Bytes>,
    run: Vec<u8>,
    len: usize,
}

impl ReplyBatch {
    pub fn push(&mut self, reply: &Reply) {
        let payload = &reply.payload;
        self.len += REPLY_HEADER_LEN + payload.len() + if payload.is_empty() { 0 } else { 4 };
        if payload.len() < SHARED_PAYLOAD_MIN {
            encode_reply(reply, &mut self.run);
            return;
        }
        self.run.extend_from_slice(&reply_header(reply));
        self.end_run();
        self.parts.push(payload.clone());
        self.run
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces to write, in order; the batch is empty afterwards.
    pub fn take(&mut self) -> Vec<Bytes> {
        self.end_run();
        self.len = 0;
        std::mem::take(&mut self.parts)
    }

    fn end_run(&mut self) {
        if !self.run.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.run)));
        }
    }
}

fn append_payload(payload: &[u8], out: &mut Vec<u8>) {
    if !payload.is_empty() {
        out.extend_from_slice(payload);
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    }
}

async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u32,
) -> Result<Vec<u8>, FrameError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).await?;
    check_payload(reader, &payload).await?;
    Ok(payload)
}

/// Reads the CRC that follows `payload` and checks it.
async fn check_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    payload: &[u8],
) -> Result<(), FrameError> {
    let stored = reader.read_u32_le().await?;
    if crc32fast::hash(payload) != stored {
        return Err(FrameError::PayloadChecksum);
    }
    Ok(())
}

/// Reads one request; `Ok(None)` on a clean end of stream between frames.
pub async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Request>, FrameError> {
    read_request_with(reader, |_, _| None).await
}

/// [`read_request`], reading a payload into the memory `buffer` gives for
/// the request's operation and payload length, if it gives some: a replica
/// takes a write's payload in its engine's memory, which its device then
/// writes as it is.
pub async fn read_request_with<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: impl FnOnce(Op, usize) -> Option<AlignedBuf>,
) -> Result<Option<Request>, FrameError> {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    if !read_header(reader, &mut header).await? {
        return Ok(None);
    }
    let magic = u32_at(&header, 0);
    if magic != REQUEST_MAGIC {
        return Err(FrameError::Magic(magic));
    }
    check_seal(&header)?;
    let op = Op::from_u8(header[4]).ok_or(FrameError::UnknownOp(header[4]))?;
    let len = u32_at(&header, 40);
    let given = match len {
        0 | MAX_PAYLOAD.. => None,
        _ => buffer(op, len as usize).filter(|b| b.len() == len as usize),
    };
    let payload = match given {
        Some(mut buf) => {
            reader.read_exact(&mut buf).await?;
            check_payload(reader, &buf).await?;
            Bytes::from_owner(buf)
        }
        None => Bytes::from(read_payload(reader, len).await?),
    };
    Ok(Some(Request {
        op,
        flags: header[5],
        id: u64_at(&header, 8),
        epoch: u64_at(&header, 16),
        offset: u64_at(&header, 24),
        length: u64_at(&header, 32),
        payload,
    }))
}

/// Reads one reply; `Ok(None)` on a clean end of stream between frames.
pub async fn read_reply<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Reply>, FrameError> {
    let mut header = [0u8; REPLY_HEADER_LEN];
    if !read_header(reader, &mut header).await? {
        return Ok(None);
    }
    let magic = u32_at(&header, 0);
    if magic != REPLY_MAGIC {
        return Err(FrameError::Magic(magic));
    }
    check_seal(&header)?;
    let status = Status::from_u8(header[4]).ok_or(FrameError::UnknownStatus(header[4]))?;
    let payload = Bytes::from(read_payload(reader, u32_at(&header, 16)).await?);
    Ok(Some(Reply {
        status,
        id: u64_at(&header, 8),
        payload,
    }))
}

/// Fills `header`; false when the stream ended before its first byte.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: &mut [u8],
) -> Result<bool, FrameError> {
    let first = reader.read(&mut header[..]).await?;
    if first == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut header[first..]).await?;
    Ok(true)
}

/// Writes already-encoded frames and flushes.
pub async fn write_frames<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Writes `parts` one after the other, with as few system calls as the
/// socket allows and without first copying them into one buffer.
pub async fn write_parts<W: AsyncWrite + Unpin>(writer: &mut W, parts: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    crate::vectored::write_all_vectored(writer, &mut slices).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_request() -> Request {
        Request {
            op: Op::Write,
            flags: FLAG_FUA,
            id: 7,
            epoch: 3,
            offset: 4096,
            length: 5,
            payload: Bytes::from_static(b"hello"),
        }
    }

    #[tokio::test]
    async fn request_parts_written_vectored_are_the_encoded_request() {
        let flush = Request::new(Op::Flush, 8, 3);
        let mut parts = request_parts(&sample_request());
        assert_eq!(parts.len(), 3, "header, payload, CRC");
        parts.extend(request_parts(&flush));
        let mut written = Vec::new();
        write_parts(&mut written, &parts).await.unwrap();
        let mut encoded = Vec::new();
        encode_request(&sample_request(), &mut encoded);
        encode_request(&flush, &mut encoded);
        assert_eq!(written, encoded);
    }

    #[tokio::test]
    async fn a_reply_batch_reads_back_as_its_replies_and_shares_large_payloads() {
        let read_data = Bytes::from(vec![0xa5u8; 8192]);
        let reply = |id, status, payload: Bytes| Reply {
            status,
            id,
            payload,
        };
        let replies = [
            reply(1, Status::Ok, Bytes::new()),
            reply(2, Status::Invalid, Bytes::from_static(b"out of range")),
            reply(3, Status::Ok, read_data.clone()),
            reply(4, Status::Ok, read_data.slice(..SHARED_PAYLOAD_MIN)),
            reply(5, Status::Ok, Bytes::new()),
        ];
        let mut batch = ReplyBatch::default();
        for r in &replies {
            batch.push(r);
        }
        let expected_len = batch.len();
        let parts = batch.take();
        assert!(batch.is_empty(), "take leaves the batch empty");
        assert!(
            parts
                .iter()
                .any(|p| p.as_ptr() == read_data.as_ptr() && p.len() == 8192),
            "the 8 KiB read goes out from where it is, not copied"
        );
        let mut written = Vec::new();
        write_parts(&mut written, &parts).await.unwrap();
        assert_eq!(written.len(), expected_len);
        let mut reader = &written[..];
        for r in &replies {
            let got = read_reply(&mut reader).await.unwrap().expect("a reply");
            assert_eq!(
                (got.status, got.id, &got.payload),
                (r.status, r.id, &r.payload)
            );
        }
        assert!(read_reply(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn request_and_reply_round_trip() {
        let mut bytes = Vec::new();
        encode_request(&sample_request(), &mut bytes);
        let flush = Request::new(Op::Flush, 8, 3);
        encode_request(&flush, &mut bytes);
        let mut reader = &bytes[..];
        assert_eq!(
            read_request(&mut reader).await.unwrap(),
            Some(sample_request())
        );
        assert_eq!(read_request(&mut reader).await.unwrap(), Some(flush));
        assert_eq!(read_request(&mut reader).await.unwrap(), None);

        let reply = Reply {
            status: Status::Checksum,
            id: 7,
            payload: Bytes::from_static(&[1, 2, 3]),
        };
        let mut bytes = Vec::new();
        encode_reply(&reply, &mut bytes);
        let mut reader = &bytes[..];
        assert_eq!(read_reply(&mut reader).await.unwrap(), Some(reply));
    }

    #[tokio::test]
    async fn a_payload_read_into_given_memory_is_checked_and_kept_there() {
        let mut request = sample_request();
        request.payload = Bytes::from(vec![0x5A; 8192]);
        let mut bytes = Vec::new();
        encode_request(&request, &mut bytes);
        let mut reader = &bytes[..];
        let mut at = None;
        let read = read_request_with(&mut reader, |op, len| {
            assert_eq!((op, len), (Op::Write, 8192));
            let buf = AlignedBuf::zeroed(len);
            at = Some(buf.as_ptr() as usize);
            Some(buf)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(read, request);
        assert_eq!(Some(read.payload.as_ptr() as usize), at, "not copied out");
        // A damaged payload is refused there too.
        let last = bytes.len() - 5;
        bytes[last] ^= 1;
        let mut reader = &bytes[..];
        let read = read_request_with(&mut reader, |_, len| Some(AlignedBuf::zeroed(len))).await;
        assert!(matches!(read, Err(FrameError::PayloadChecksum)));
    }

    #[tokio::test]
    async fn every_flipped_bit_is_caught() {
        let mut bytes = Vec::new();
        encode_request(&sample_request(), &mut bytes);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let mut reader = &damaged[..];
            // Either an error, or (a flipped payload length) a short read.
            assert!(
                read_request(&mut reader).await.is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_refused() {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        header[4] = Op::Write as u8;
        header[40..44].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        seal(&mut header);
        let mut reader = &header[..];
        assert!(matches!(
            read_request(&mut reader).await,
            Err(FrameError::TooLarge(_))
        ));

        header[4] = 200;
        header[40..44].copy_from_slice(&0u32.to_le_bytes());
        seal(&mut header);
        let mut reader = &header[..];
        assert!(matches!(
            read_request(&mut reader).await,
            Err(FrameError::UnknownOp(200))
        ));

        let mut reader = &b"GET / HTTP/1.1\r\nHost: strata.example\r\nAccept: */*\r\n\r\n"[..];
        assert!(matches!(
            read_request(&mut reader).await,
            Err(FrameError::Magic(_))
        ));
    }
}
