//! NBD (Network Block Device) frontend: exports [`BlockTarget`]s found in a
//! [`TargetRegistry`] to NBD clients (the Linux kernel's nbd driver through
//! `nbd-client`, qemu, libnbd tools).
//!
//! - [`proto`] holds the wire format: constants, encoding and parsing, and the
//!   rules deciding how each request is answered. It does no I/O.
//! - [`server`] holds [`NbdServer`], the tokio server: the fixed newstyle
//!   handshake (NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO, GO) and a pipelined
//!   transmission phase with simple replies (READ, WRITE, FLUSH, TRIM,
//!   WRITE_ZEROES, DISC).
//!
//! The server follows `doc/proto.md` of the NetworkBlockDevice/nbd
//! repository. No TLS, no structured replies, no metadata contexts: clients
//! that ask for them get NBD_REP_ERR_UNSUP and carry on without.
//!
//! Robustness against clients: nothing a client sends can panic the server,
//! make it allocate more than 32 MiB for one request or more than
//! [`server::MAX_IN_FLIGHT_BYTES`] for one connection, or affect another
//! connection. A protocol violation closes only the offending connection.
//!
//! [`BlockTarget`]: crate::target::BlockTarget
//! [`TargetRegistry`]: crate::target::TargetRegistry

pub mod proto;
pub mod server;

pub use server::NbdServer;
