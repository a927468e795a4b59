//! A minimal NBD client for tests that need to know exactly which requests
//! were acknowledged (the durability ledger) or to send malformed input.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_FLAG_FUA: u16 = 1;

pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    next_handle: u64,
}

impl NbdClient {
    /// Fixed-newstyle handshake and NBD_OPT_GO for `export`.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<NbdClient> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut hdr = [0u8; 18];
        s.read_exact(&mut hdr)?;
        if u64::from_be_bytes(hdr[0..8].try_into().unwrap()) != NBD_MAGIC
            || u64::from_be_bytes(hdr[8..16].try_into().unwrap()) != IHAVEOPT
        {
            return Err(io::Error::other("bad server greeting"));
        }
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut rep = [0u8; 20];
            s.read_exact(&mut rep)?;
            if u64::from_be_bytes(rep[0..8].try_into().unwrap()) != OPT_REPLY_MAGIC {
                return Err(io::Error::other("bad option reply magic"));
            }
            let kind = u32::from_be_bytes(rep[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rep[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                other => return Err(io::Error::other(format!("option refused: {other:#x}"))),
            }
        }
        Ok(NbdClient {
            stream: s,
            size: size.ok_or_else(|| io::Error::other("no export size"))?,
            next_handle: 1,
        })
    }

    /// Makes a reply that does not come within `timeout` an error, so a
    /// server that hangs fails the test instead of hanging it.
    pub fn set_reply_timeout(&self, timeout: std::time::Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.stream.write_all(&req)?;
        Ok(handle)
    }

    /// Reads one simple reply; returns (handle, error).
    fn reply(&mut self) -> io::Result<(u64, u32)> {
        let mut rep = [0u8; 16];
        self.stream.read_exact(&mut rep)?;
        if u32::from_be_bytes(rep[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::other("bad reply magic"));
        }
        let error = u32::from_be_bytes(rep[4..8].try_into().unwrap());
        Ok((u64::from_be_bytes(rep[8..16].try_into().unwrap()), error))
    }

    fn expect_ok(&mut self, handle: u64) -> io::Result<()> {
        let (h, error) = self.reply()?;
        if h != handle {
            return Err(io::Error::other("reply for another request"));
        }
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error as i32));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let h = self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        self.expect_ok(h)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let h = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.expect_ok(h)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let h = self.request(CMD_READ, 0, offset, len, &[])?;
        self.expect_ok(h)?;
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    /// Sends a raw request header (for malformed-input tests) and returns the
    /// error field of the reply.
    pub fn raw_request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> io::Result<u32> {
        let h = self.request(cmd, flags, offset, len, &[])?;
        let (got, error) = self.reply()?;
        if got != h {
            return Err(io::Error::other("reply for another request"));
        }
        Ok(error)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
