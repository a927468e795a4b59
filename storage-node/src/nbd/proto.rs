//! NBD wire format: constants, and pure encoding and parsing functions for the
//! fixed newstyle handshake, option haggling and the transmission phase
//! (requests and simple replies).
//!
//! Nothing here does I/O, so every rule about what a message means (which
//! flags are valid on which command, which error a bad request gets, what
//! block size constraints we advertise) is decided here and unit tested here;
//! `server.rs` only moves bytes.
//!
//! All values follow `doc/proto.md` of the NetworkBlockDevice/nbd repository.
//! Every integer on the wire is big-endian.

use crate::target::BlockError;

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// First 8 bytes the server sends (`NBDMAGIC`, also known as `INIT_PASSWD`).
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle magic (`IHAVEOPT`): second 8 bytes of the greeting, and the first
/// 8 bytes of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: first 4 bytes of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: first 4 bytes of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits)
// ---------------------------------------------------------------------------

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags this server sends.
pub const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits)
// ---------------------------------------------------------------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The transmission flags of every export. CAN_MULTI_CONN is set because a
/// target's flush covers writes made through every connection.
pub const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types. Errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// Information types of NBD_REP_INFO (NBD_OPT_INFO / NBD_OPT_GO).
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission: commands, command flags, errors
// ---------------------------------------------------------------------------

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Largest READ or WRITE we accept, and the maximum block size we advertise.
/// 2^25 is the size the spec says a client desiring interoperability limits
/// itself to, and the size below which a request must not be treated as a
/// denial of service. It also bounds every per-request allocation.
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Largest option payload we read into memory. Real options are a few bytes
/// plus an export name (at most 4096 bytes); anything bigger is refused with
/// NBD_REP_ERR_TOO_BIG without being buffered.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The spec's upper bound on any string (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;

pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;

/// A violation of the protocol that leaves no way to answer: the connection
/// is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    b
}

/// What the client's flags negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// Omit the 124 zero bytes after an NBD_OPT_EXPORT_NAME reply.
    pub no_zeroes: bool,
}

/// Checks the client flags. The spec says the server MUST drop the connection
/// on unknown flags; we also refuse clients that do not speak fixed newstyle,
/// since option haggling with them cannot report errors.
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, ProtoError> {
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(ProtoError::UnknownClientFlags(flags & !known));
    }
    if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle);
    }
    Ok(ClientFlags {
        no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed 16-byte head of an option; `len` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(&b[8..12]),
        len: be_u32(&b[12..16]),
    })
}

/// One option reply: magic, option, reply type, length, data.
///
/// Panics only if `data` exceeds 4 GiB, which no caller can produce: every
/// reply we build is a few bytes plus strings we bounded.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("option reply data fits in u32");
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An NBD_REP_SERVER reply to NBD_OPT_LIST for one export, with no description.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    option_reply(NBD_OPT_LIST, NBD_REP_SERVER, &data)
}

/// NBD_INFO_EXPORT payload: type, size, transmission flags (length 12).
pub fn info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&transmission_flags.to_be_bytes());
    d
}

/// NBD_INFO_NAME payload: type, name.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + name.len());
    d.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Block size constraints as sent in NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// Our constraints for a target: any alignment works (minimum 1, targets
    /// take unaligned I/O), the pool's block size is preferred, and requests
    /// are at most [`MAX_REQUEST_LEN`].
    ///
    /// The spec requires the preferred size to be a power of two, at least
    /// 512, and (since the maximum must be at least min(preferred, export
    /// size)) not above the maximum; a target reporting something else is
    /// rounded up to a power of two and clamped rather than advertised as is.
    pub fn for_target(target_block_size: u32) -> BlockSizes {
        let preferred = target_block_size
            .clamp(512, MAX_REQUEST_LEN)
            .checked_next_power_of_two()
            .unwrap_or(MAX_REQUEST_LEN)
            .min(MAX_REQUEST_LEN);
        BlockSizes {
            minimum: 1,
            preferred,
            maximum: MAX_REQUEST_LEN,
        }
    }

    /// NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum (length 14).
    pub fn encode(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&self.minimum.to_be_bytes());
        d.extend_from_slice(&self.preferred.to_be_bytes());
        d.extend_from_slice(&self.maximum.to_be_bytes());
        d
    }
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// The NBD_INFO_* types the client asked for (unknown ones included;
    /// the spec says to ignore those).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: name length, name, number of
/// information requests, requests. `Err` means NBD_REP_ERR_INVALID.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    if data.len() < 6 {
        return Err("option data shorter than 6 bytes");
    }
    let name_len = be_u32(&data[0..4]) as usize;
    // The name must leave room for the 16-bit request count.
    if name_len > data.len() - 6 {
        return Err("export name length exceeds option length");
    }
    let name = parse_string(&data[4..4 + name_len])?;
    let rest = &data[4 + name_len..];
    let count = be_u16(&rest[0..2]) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err("information request count does not match option length");
    }
    let requests = list.chunks_exact(2).map(be_u16).collect();
    Ok(InfoRequest { name, requests })
}

/// Parses a protocol string (an export name): valid UTF-8, no NUL, at most
/// 4096 bytes.
pub fn parse_string(b: &[u8]) -> Result<String, &'static str> {
    if b.len() > MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if b.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")
}

/// The reply to a successful NBD_OPT_EXPORT_NAME: size, transmission flags,
/// and 124 zero bytes unless the client negotiated NBD_FLAG_C_NO_ZEROES.
pub fn export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A request header as sent by the client. For NBD_CMD_WRITE, `len` bytes of
/// payload follow it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtoError> {
    let magic = be_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    Ok(Request {
        flags: be_u16(&b[4..6]),
        kind: be_u16(&b[6..8]),
        handle: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        len: be_u32(&b[24..28]),
    })
}

/// Header of a simple reply; for a successful READ the data follows it.
pub fn simple_reply_header(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_HEADER_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// The commands we execute, for error mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

/// A validated operation, ready for the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` bytes of payload follow the header and must be read first.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        allocate: bool,
    },
}

impl Op {
    pub fn command(&self) -> Command {
        match self {
            Op::Read { .. } => Command::Read,
            Op::Write { .. } => Command::Write,
            Op::Flush => Command::Flush,
            Op::Trim { .. } => Command::Trim,
            Op::WriteZeroes { .. } => Command::WriteZeroes,
        }
    }

    /// Bytes the server holds in memory for this request (the write payload
    /// or the read buffer); the in-flight byte budget is charged this much.
    pub fn buffer_len(&self) -> u32 {
        match self {
            Op::Read { len, .. } | Op::Write { len, .. } => *len,
            _ => 0,
        }
    }
}

/// What the server does with one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the operation on the target and reply with its result.
    Execute(Op),
    /// Reply success without touching the target (zero-length requests,
    /// whose behaviour the spec leaves to the server; it only says not to
    /// disconnect). A zero-length READ reply carries no data.
    Succeed,
    /// NBD_CMD_DISC: finish in-flight requests, then close. No reply.
    Disconnect,
    /// Reply with this error. If `drain` is nonzero this was a WRITE whose
    /// payload must be read and discarded first to stay in sync.
    Reject { error: u32, drain: u32 },
    /// Reply with this error, then close: a WRITE whose payload is too big to
    /// be worth reading (the spec allows a hard disconnect for this).
    RejectAndClose { error: u32 },
}

/// Maps a target error to the NBD error of the reply. This is the only place
/// that decides error numbers for target failures, including our own bounds
/// checks, which are expressed as `BlockError::OutOfRange`.
pub fn errno_for(err: &BlockError, command: Command) -> u32 {
    match err {
        BlockError::Io(_) | BlockError::Checksum(_) => NBD_EIO,
        BlockError::NoSpace => NBD_ENOSPC,
        // The spec: ENOSPC for a write (or write zeroes) reaching past the
        // end of the device, EINVAL for a read or trim doing so.
        BlockError::OutOfRange { .. } => match command {
            Command::Write | Command::WriteZeroes => NBD_ENOSPC,
            Command::Read | Command::Trim | Command::Flush => NBD_EINVAL,
        },
        BlockError::ReadOnly => NBD_EPERM,
        // ESHUTDOWN tells the client to disconnect, which is what it should
        // do once its export has been deleted.
        BlockError::Gone => NBD_ESHUTDOWN,
    }
}

/// Checks that `[offset, offset + len)` lies within an export of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// Validates a request against the negotiated features and the current
/// export size, and decides what to do with it.
pub fn decode_request(req: &Request, export_size: u64) -> Action {
    // FUA is valid on every command once NBD_FLAG_SEND_FUA is negotiated.
    const ALWAYS: u16 = NBD_CMD_FLAG_FUA;
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    let range =
        |command| check_range(req.offset, len, export_size).map_err(|e| errno_for(&e, command));

    match req.kind {
        NBD_CMD_READ => {
            if req.flags & !ALWAYS != 0 || req.len > MAX_REQUEST_LEN {
                return reject(NBD_EINVAL);
            }
            if let Err(error) = range(Command::Read) {
                return reject(error);
            }
            if req.len == 0 {
                return Action::Succeed;
            }
            Action::Execute(Op::Read {
                offset: req.offset,
                len: req.len,
            })
        }
        NBD_CMD_WRITE => {
            if req.len > MAX_REQUEST_LEN {
                return Action::RejectAndClose { error: NBD_EINVAL };
            }
            let drain = |error| Action::Reject {
                error,
                drain: req.len,
            };
            if req.flags & !ALWAYS != 0 {
                return drain(NBD_EINVAL);
            }
            if let Err(error) = range(Command::Write) {
                return drain(error);
            }
            if req.len == 0 {
                return Action::Succeed;
            }
            Action::Execute(Op::Write {
                offset: req.offset,
                len: req.len,
                fua,
            })
        }
        NBD_CMD_DISC => Action::Disconnect,
        NBD_CMD_FLUSH => {
            // Offset and length are reserved and MUST be zero.
            if req.flags & !ALWAYS != 0 || req.offset != 0 || req.len != 0 {
                return reject(NBD_EINVAL);
            }
            Action::Execute(Op::Flush)
        }
        NBD_CMD_TRIM => {
            if req.flags & !ALWAYS != 0 {
                return reject(NBD_EINVAL);
            }
            if let Err(error) = range(Command::Trim) {
                return reject(error);
            }
            if req.len == 0 {
                return Action::Succeed;
            }
            Action::Execute(Op::Trim {
                offset: req.offset,
                len,
                fua,
            })
        }
        NBD_CMD_WRITE_ZEROES => {
            // NBD_CMD_FLAG_FAST_ZERO is rejected: we do not advertise
            // NBD_FLAG_SEND_FAST_ZERO, and the spec says EINVAL then.
            if req.flags & !(ALWAYS | NBD_CMD_FLAG_NO_HOLE) != 0 {
                return reject(NBD_EINVAL);
            }
            // No length limit: there is no payload, so nothing is buffered,
            // and the Linux kernel client sends zeroing requests larger than
            // the maximum block size it never learns.
            if let Err(error) = range(Command::WriteZeroes) {
                return reject(error);
            }
            if req.len == 0 {
                return Action::Succeed;
            }
            Action::Execute(Op::WriteZeroes {
                offset: req.offset,
                len,
                fua,
                allocate: req.flags & NBD_CMD_FLAG_NO_HOLE != 0,
            })
        }
        // Unknown commands (and CACHE, BLOCK_STATUS, RESIZE, which we do not
        // advertise) get EINVAL. None of them carries a payload.
        _ => reject(NBD_EINVAL),
    }
}

fn reject(error: u32) -> Action {
    Action::Reject { error, drain: 0 }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 7,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 0b11]);
    }

    #[test]
    fn magics_match_spec_ascii() {
        assert_eq!(NBD_MAGIC.to_be_bytes(), *b"NBDMAGIC");
        assert_eq!(IHAVEOPT.to_be_bytes(), *b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(1), Ok(ClientFlags { no_zeroes: false }));
        assert_eq!(parse_client_flags(3), Ok(ClientFlags { no_zeroes: true }));
        assert_eq!(parse_client_flags(0), Err(ProtoError::NotFixedNewstyle));
        assert_eq!(parse_client_flags(2), Err(ProtoError::NotFixedNewstyle));
        assert_eq!(
            parse_client_flags(1 | 4),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert_eq!(
            parse_client_flags(0x8000_0001),
            Err(ProtoError::UnknownClientFlags(0x8000_0000))
        );
    }

    #[test]
    fn option_header() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..16].copy_from_slice(&0x1234u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                option: NBD_OPT_GO,
                len: 0x1234
            })
        );
        b[0] = b'X';
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(NBD_OPT_LIST, NBD_REP_ERR_UNSUP, b"hi");
        assert_eq!(r.len(), 22);
        assert_eq!(&r[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &3u32.to_be_bytes());
        assert_eq!(&r[12..16], &0x8000_0001u32.to_be_bytes());
        assert_eq!(&r[16..20], &2u32.to_be_bytes());
        assert_eq!(&r[20..], b"hi");
    }

    #[test]
    fn rep_server_layout() {
        let r = rep_server("vol1");
        assert_eq!(&r[12..16], &NBD_REP_SERVER.to_be_bytes());
        assert_eq!(&r[16..20], &8u32.to_be_bytes());
        assert_eq!(&r[20..24], &4u32.to_be_bytes());
        assert_eq!(&r[24..], b"vol1");
    }

    #[test]
    fn info_payloads() {
        let e = info_export(0x0102_0304_0506_0708, 0x0145);
        assert_eq!(e, [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x45]);
        let b = BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 1 << 25,
        }
        .encode();
        assert_eq!(b.len(), 14);
        assert_eq!(&b[0..2], &[0, 3]);
        assert_eq!(&b[2..6], &1u32.to_be_bytes());
        assert_eq!(&b[6..10], &4096u32.to_be_bytes());
        assert_eq!(&b[10..14], &(1u32 << 25).to_be_bytes());
        assert_eq!(info_name("ab"), [0, 1, b'a', b'b']);
    }

    #[test]
    fn block_sizes_follow_spec_rules() {
        for (bs, want) in [
            (4096, 4096),
            (512, 512),
            (65536, 65536),
            (0, 512),
            (1, 512),
            (3000, 4096),
            (u32::MAX, MAX_REQUEST_LEN),
            (MAX_REQUEST_LEN + 1, MAX_REQUEST_LEN),
        ] {
            let s = BlockSizes::for_target(bs);
            assert_eq!(s.preferred, want, "target block size {bs}");
            assert_eq!(s.minimum, 1);
            assert_eq!(s.maximum, MAX_REQUEST_LEN);
            assert!(s.preferred.is_power_of_two() && s.preferred >= 512);
            assert!(s.preferred <= s.maximum);
        }
    }

    fn info_data(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request_parsing() {
        let r = parse_info_request(&info_data(b"vol", &[3, 1, 99])).unwrap();
        assert_eq!(r.name, "vol");
        assert_eq!(r.requests, vec![3, 1, 99]);
        assert!(r.wants(NBD_INFO_BLOCK_SIZE));
        assert!(!r.wants(NBD_INFO_DESCRIPTION));

        let r = parse_info_request(&info_data(b"", &[])).unwrap();
        assert_eq!(r.name, "");
        assert!(r.requests.is_empty());

        // Too short, name overruns, count mismatch, trailing bytes, bad UTF-8, NUL.
        assert!(parse_info_request(&[0, 0, 0, 0, 0]).is_err());
        let mut d = info_data(b"vol", &[]);
        d[3] = 200;
        assert!(parse_info_request(&d).is_err());
        let mut d = info_data(b"vol", &[1]);
        d.pop();
        assert!(parse_info_request(&d).is_err());
        let mut d = info_data(b"vol", &[1]);
        d.push(0);
        assert!(parse_info_request(&d).is_err());
        let mut d = info_data(b"vol", &[]);
        d[3] = 0xff;
        d.truncate(4);
        d.extend_from_slice(&[0u8; 2]);
        assert!(parse_info_request(&d).is_err());
        d[3] = u32::MAX as u8;
        assert!(parse_info_request(&d).is_err());
        assert!(parse_info_request(&info_data(&[0xff, 0xfe], &[])).is_err());
        assert!(parse_info_request(&info_data(b"a\0b", &[])).is_err());
        assert!(parse_info_request(&info_data(&[b'a'; 4097], &[])).is_err());
        assert!(parse_info_request(&info_data(&[b'a'; 4096], &[])).is_ok());
        // A name length near u32::MAX must not overflow.
        let mut d = vec![0xff, 0xff, 0xff, 0xff];
        d.extend_from_slice(&[0; 8]);
        assert!(parse_info_request(&d).is_err());
    }

    #[test]
    fn export_name_reply_zeroes() {
        let r = export_name_reply(1 << 20, TRANSMISSION_FLAGS, false);
        assert_eq!(r.len(), 134);
        assert_eq!(&r[0..8], &(1u64 << 20).to_be_bytes());
        assert_eq!(&r[8..10], &TRANSMISSION_FLAGS.to_be_bytes());
        assert!(r[10..].iter().all(|&b| b == 0));
        assert_eq!(
            export_name_reply(1 << 20, TRANSMISSION_FLAGS, true).len(),
            10
        );
    }

    #[test]
    fn transmission_flags_value() {
        // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN.
        assert_eq!(TRANSMISSION_FLAGS, 0b1_0110_1101);
    }

    #[test]
    fn request_parsing() {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&b),
            Ok(Request {
                flags: 1,
                kind: NBD_CMD_WRITE,
                handle: 0xdead_beef,
                offset: 4096,
                len: 512
            })
        );
        b[0] = 0x12;
        assert!(matches!(parse_request(&b), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn simple_reply_layout() {
        let h = simple_reply_header(NBD_EINVAL, 0x0102_0304_0506_0708);
        assert_eq!(&h[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&h[4..8], &22u32.to_be_bytes());
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn error_mapping() {
        let oor = BlockError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(errno_for(&BlockError::Io("x".into()), Command::Read), 5);
        assert_eq!(errno_for(&BlockError::NoSpace, Command::Write), 28);
        assert_eq!(errno_for(&oor, Command::Write), 28);
        assert_eq!(errno_for(&oor, Command::WriteZeroes), 28);
        assert_eq!(errno_for(&oor, Command::Read), 22);
        assert_eq!(errno_for(&oor, Command::Trim), 22);
        assert_eq!(errno_for(&BlockError::ReadOnly, Command::Trim), 1);
        assert_eq!(errno_for(&BlockError::Gone, Command::Flush), 108);
    }

    #[test]
    fn range_checks() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(11, 0, 10).is_err());
        assert!(check_range(5, 6, 10).is_err());
        assert!(check_range(u64::MAX, 1, u64::MAX).is_err());
        assert!(check_range(u64::MAX - 1, 2, u64::MAX).is_err());
    }

    const SIZE: u64 = 1 << 20;

    #[test]
    fn decode_read() {
        assert_eq!(
            decode_request(&req(NBD_CMD_READ, 0, 1, 100), SIZE),
            Action::Execute(Op::Read {
                offset: 1,
                len: 100
            })
        );
        // FUA is accepted (and meaningless) on a read.
        assert!(matches!(
            decode_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 1), SIZE),
            Action::Execute(_)
        ));
        for bad in [
            req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1),
            req(NBD_CMD_READ, 0x8000, 0, 1),
            req(NBD_CMD_READ, 0, SIZE - 1, 2),
            req(NBD_CMD_READ, 0, u64::MAX, 1),
            req(NBD_CMD_READ, 0, 0, MAX_REQUEST_LEN + 1),
        ] {
            assert_eq!(
                decode_request(&bad, SIZE),
                Action::Reject {
                    error: NBD_EINVAL,
                    drain: 0
                },
                "{bad:?}"
            );
        }
        assert_eq!(
            decode_request(&req(NBD_CMD_READ, 0, 0, MAX_REQUEST_LEN + 1), u64::MAX),
            Action::Reject {
                error: NBD_EINVAL,
                drain: 0
            }
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_READ, 0, 0, MAX_REQUEST_LEN), u64::MAX),
            Action::Execute(Op::Read {
                offset: 0,
                len: MAX_REQUEST_LEN
            })
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_READ, 0, SIZE, 0), SIZE),
            Action::Succeed
        );
        assert!(matches!(
            decode_request(&req(NBD_CMD_READ, 0, SIZE + 1, 0), SIZE),
            Action::Reject { error: 22, .. }
        ));
    }

    #[test]
    fn decode_write() {
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 3, 5), SIZE),
            Action::Execute(Op::Write {
                offset: 3,
                len: 5,
                fua: true
            })
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE, 0, SIZE - 4, 5), SIZE),
            Action::Reject {
                error: NBD_ENOSPC,
                drain: 5
            }
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE, 0, u64::MAX, 5), SIZE),
            Action::Reject {
                error: NBD_ENOSPC,
                drain: 5
            }
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 5), SIZE),
            Action::Reject {
                error: NBD_EINVAL,
                drain: 5
            }
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE, 0, 0, MAX_REQUEST_LEN + 1), u64::MAX),
            Action::RejectAndClose { error: NBD_EINVAL }
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE, 0, 0, 0), SIZE),
            Action::Succeed
        );
    }

    #[test]
    fn decode_flush_trim_zeroes_disc_unknown() {
        assert_eq!(
            decode_request(&req(NBD_CMD_FLUSH, 0, 0, 0), SIZE),
            Action::Execute(Op::Flush)
        );
        assert!(matches!(
            decode_request(&req(NBD_CMD_FLUSH, 0, 1, 0), SIZE),
            Action::Reject { error: 22, .. }
        ));
        assert_eq!(
            decode_request(&req(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 0, u32::MAX), u64::MAX),
            Action::Execute(Op::Trim {
                offset: 0,
                len: u32::MAX as u64,
                fua: true
            })
        );
        assert!(matches!(
            decode_request(&req(NBD_CMD_TRIM, 0, SIZE, 1), SIZE),
            Action::Reject { error: 22, .. }
        ));
        assert!(matches!(
            decode_request(&req(NBD_CMD_TRIM, NBD_CMD_FLAG_NO_HOLE, 0, 1), SIZE),
            Action::Reject { error: 22, .. }
        ));
        assert_eq!(
            decode_request(
                &req(
                    NBD_CMD_WRITE_ZEROES,
                    NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
                    10,
                    20
                ),
                SIZE
            ),
            Action::Execute(Op::WriteZeroes {
                offset: 10,
                len: 20,
                fua: true,
                allocate: true
            })
        );
        assert_eq!(
            decode_request(&req(NBD_CMD_WRITE_ZEROES, 0, 10, 20), SIZE),
            Action::Execute(Op::WriteZeroes {
                offset: 10,
                len: 20,
                fua: false,
                allocate: false
            })
        );
        assert!(matches!(
            decode_request(
                &req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 1),
                SIZE
            ),
            Action::Reject { error: 22, .. }
        ));
        assert!(matches!(
            decode_request(&req(NBD_CMD_WRITE_ZEROES, 0, SIZE, 1), SIZE),
            Action::Reject { error: 28, .. }
        ));
        assert_eq!(
            decode_request(&req(NBD_CMD_DISC, 0, 0, 0), SIZE),
            Action::Disconnect
        );
        for kind in [
            NBD_CMD_CACHE,
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_RESIZE,
            9,
            0xffff,
        ] {
            assert_eq!(
                decode_request(&req(kind, 0, 0, 1), SIZE),
                Action::Reject {
                    error: NBD_EINVAL,
                    drain: 0
                }
            );
        }
    }
}
