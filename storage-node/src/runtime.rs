//! Moving a connection onto another tokio runtime.
//!
//! A node serves NBD connections, replication connections and its targets'
//! links to replicas on single-threaded runtimes, one connection wholly on
//! one of them (see `daemon`). A socket accepted or connected elsewhere is
//! registered with that runtime's reactor first, so its readiness wakes tasks
//! on that runtime's thread rather than on the thread that made it.

use std::io;

use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// `stream`, registered with `runtime`'s reactor instead of the current one.
pub fn move_stream(stream: TcpStream, runtime: &Handle) -> io::Result<TcpStream> {
    let stream = stream.into_std()?;
    let _entered = runtime.enter();
    TcpStream::from_std(stream)
}
