//! The NBD server: accepts TCP connections, runs the fixed newstyle handshake
//! on each, then serves the chosen export's requests.
//!
//! One connection is one tokio task, plus:
//! - a writer task that owns the socket's write half and sends every reply,
//!   so reply frames never interleave (a READ reply's header and data are
//!   written back to back by that one task);
//! - one task per request, so requests run concurrently (the client pipelines
//!   them; replies may go out of order, which the protocol allows).
//!
//! The connection task reads requests off the socket continuously. Before it
//! starts a request it takes a slot from a per-connection semaphore of
//! [`MAX_IN_FLIGHT_REQUESTS`] and, for READ and WRITE, that many bytes from a
//! budget of [`MAX_IN_FLIGHT_BYTES`]. Both are released only once the reply
//! has been written to the socket, so a client that pipelines requests but
//! never reads replies stalls itself, not the server's memory.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info_span, warn, Instrument, Span};

use super::proto::{
    self, Action, BlockSizes, Op, ProtoError, MAX_OPTION_LEN, MAX_STRING_LEN, NBD_EIO,
    NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
    NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
    NBD_REP_INFO, OPTION_HEADER_LEN, REQUEST_HEADER_LEN, TRANSMISSION_FLAGS,
};
use crate::target::{BlockError, BlockTarget, TargetRegistry};

/// Requests of one connection that may be in flight (started and not yet
/// replied to) at once.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 64;
/// Bytes of READ and WRITE buffers one connection may hold at once. Each
/// request is at most [`proto::MAX_REQUEST_LEN`] (32 MiB), so the largest
/// request always fits.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// How long a client may take from connecting to entering transmission.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `serve` waits, after shutdown, for connections to finish their
/// in-flight requests before dropping them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Requests at least this large run on the bulk runtime, when there is one.
pub const BULK_REQUEST_BYTES: usize = 128 * 1024;

const READ_BUFFER: usize = 128 * 1024;
/// Pause after an accept error caused by resource exhaustion, so a flood of
/// connections cannot turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the targets of a registry over NBD.
pub struct NbdServer<R: TargetRegistry> {
    registry: Arc<R>,
    handshake_timeout: Duration,
    shutdown_grace: Duration,
    /// Runtimes that connections are spread over (empty: the caller's).
    connection_runtimes: Vec<tokio::runtime::Handle>,
    /// Where large requests run, if not on their connection's runtime.
    bulk_runtime: Option<tokio::runtime::Handle>,
    next_runtime: std::sync::atomic::AtomicUsize,
}

impl<R: TargetRegistry> NbdServer<R> {
    pub fn new(registry: Arc<R>) -> Self {
        NbdServer {
            registry,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            connection_runtimes: Vec::new(),
            bulk_runtime: None,
            next_runtime: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Serves each connection wholly on one of these runtimes, round robin.
    ///
    /// With single-threaded runtimes, a connection's socket, its request tasks
    /// and its replies all stay on one thread: no work stealing and no
    /// cross-thread wake-ups per request, which on a busy node costs more CPU
    /// than the protocol itself.
    pub fn with_connection_runtimes(mut self, runtimes: Vec<tokio::runtime::Handle>) -> Self {
        self.connection_runtimes = runtimes;
        self
    }

    /// Closes connections that have not finished the handshake after `timeout`.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long `serve` lets connections finish in-flight requests after
    /// shutdown before dropping them.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Runs requests of [`BULK_REQUEST_BYTES`] or more on `runtime` (a
    /// multi-threaded one). A connection's requests otherwise all run on its
    /// own thread, which then does everything for a large write in turn:
    /// receiving it, copying, checksumming, submitting. Handing the large ones
    /// to other threads lets that work overlap with receiving the next.
    pub fn with_bulk_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.bulk_runtime = Some(runtime);
        self
    }

    /// Accepts connections until the listener fails or `shutdown` resolves;
    /// each connection in its own task.
    ///
    /// On shutdown, connections stop reading requests, finish and answer the
    /// ones in flight, and close; after the grace period the rest are
    /// dropped. Returns the listener's error if it failed, `Ok` on shutdown.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);

        let result = loop {
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let server = Arc::clone(&self);
                        let stop = stop_rx.clone();
                        if self.connection_runtimes.is_empty() {
                            connections.spawn(server.handle_connection(stream, peer, stop));
                        } else {
                            let i = self.next_runtime.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let runtime = &self.connection_runtimes[i % self.connection_runtimes.len()];
                            match crate::runtime::move_stream(stream, runtime) {
                                Ok(stream) => {
                                    connections.spawn_on(server.handle_connection(stream, peer, stop), runtime);
                                }
                                Err(e) => warn!(error = %e, "cannot move an NBD connection to its runtime"),
                            }
                        }
                    }
                    Err(e) if is_transient_accept_error(&e) => {
                        warn!(error = %e, "accepting an NBD connection failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Err(e) => {
                        warn!(error = %e, "NBD listener failed");
                        break Err(e);
                    }
                },
                // Reap finished connections so the set does not grow forever.
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    log_connection_exit(joined);
                }
            }
        };

        drop(listener);
        let _ = stop_tx.send(true);
        let drain = async {
            while let Some(joined) = connections.join_next().await {
                log_connection_exit(joined);
            }
        };
        if tokio::time::timeout(self.shutdown_grace, drain)
            .await
            .is_err()
        {
            warn!(
                remaining = connections.len(),
                "NBD connections still busy after the shutdown grace period; dropping them"
            );
            connections.shutdown().await;
        }
        result
    }

    async fn handle_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) {
        let span = info_span!("nbd_connection", %peer, export = tracing::field::Empty);
        async move {
            debug!("connection accepted");
            match self.run_connection(stream, stop).await {
                Ok(()) => debug!("connection closed"),
                Err(e) if e.is_disconnect() => debug!(error = %e, "client went away"),
                Err(e) => warn!(error = %e, "connection closed"),
            }
        }
        .instrument(span)
        .await
    }

    async fn run_connection(
        &self,
        mut stream: TcpStream,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        // The spec recommends disabling Nagle: replies are small and latency
        // bound. Failure only costs latency.
        let _ = stream.set_nodelay(true);

        let negotiated = tokio::select! {
            r = tokio::time::timeout(self.handshake_timeout, self.handshake(&mut stream)) => {
                r.map_err(|_| ConnError::HandshakeTimeout(self.handshake_timeout))??
            }
            () = stopped(&mut stop) => return Ok(()),
        };
        let Some((name, target)) = negotiated else {
            return Ok(()); // NBD_OPT_ABORT
        };
        Span::current().record("export", name.as_str());
        debug!("entering transmission");
        transmission(stream, target, stop, self.bulk_runtime.clone()).await
    }

    /// Runs option haggling. Returns the export to serve, or `None` if the
    /// client aborted.
    async fn handshake(
        &self,
        stream: &mut TcpStream,
    ) -> Result<Option<(String, Arc<R::Target>)>, ConnError> {
        stream.write_all(&proto::greeting()).await?;
        let client = proto::parse_client_flags(stream.read_u32().await?)?;

        loop {
            let mut header = [0u8; OPTION_HEADER_LEN];
            stream.read_exact(&mut header).await?;
            let opt = proto::parse_option_header(&header)?;

            if opt.len > MAX_OPTION_LEN {
                if opt.option == NBD_OPT_EXPORT_NAME {
                    // This option has no error reply: all we can do is close.
                    return Err(ConnError::BadExportName("name longer than 4096 bytes"));
                }
                // Skip the data without buffering it; the option can still
                // be answered.
                discard(stream, opt.len).await?;
                let msg = b"option data too large";
                write_option_reply(stream, opt.option, NBD_REP_ERR_TOO_BIG, msg).await?;
                continue;
            }
            let mut data = vec![0u8; opt.len as usize];
            stream.read_exact(&mut data).await?;

            match opt.option {
                NBD_OPT_EXPORT_NAME => {
                    let name = proto::parse_string(&data).map_err(ConnError::BadExportName)?;
                    let Some(target) = self.registry.lookup(&name) else {
                        return Err(ConnError::UnknownExport(name));
                    };
                    let reply = proto::export_name_reply(
                        target.size(),
                        TRANSMISSION_FLAGS,
                        client.no_zeroes,
                    );
                    stream.write_all(&reply).await?;
                    return Ok(Some((name, target)));
                }
                NBD_OPT_ABORT => {
                    // The client may close without waiting for the ACK; a
                    // failed write is not an error then.
                    let _ = write_option_reply(stream, NBD_OPT_ABORT, NBD_REP_ACK, &[]).await;
                    return Ok(None);
                }
                NBD_OPT_LIST => {
                    if !data.is_empty() {
                        let msg = b"NBD_OPT_LIST takes no data";
                        write_option_reply(stream, opt.option, NBD_REP_ERR_INVALID, msg).await?;
                        continue;
                    }
                    let mut out = Vec::new();
                    for name in self.registry.export_names() {
                        // A name the spec does not allow could never be selected.
                        if name.len() <= MAX_STRING_LEN {
                            out.extend_from_slice(&proto::rep_server(&name));
                        }
                    }
                    out.extend_from_slice(&proto::option_reply(NBD_OPT_LIST, NBD_REP_ACK, &[]));
                    stream.write_all(&out).await?;
                }
                NBD_OPT_INFO | NBD_OPT_GO => {
                    let request = match proto::parse_info_request(&data) {
                        Ok(request) => request,
                        Err(msg) => {
                            let (o, m) = (opt.option, msg.as_bytes());
                            write_option_reply(stream, o, NBD_REP_ERR_INVALID, m).await?;
                            continue;
                        }
                    };
                    let Some(target) = self.registry.lookup(&request.name) else {
                        let msg = b"no such export";
                        write_option_reply(stream, opt.option, NBD_REP_ERR_UNKNOWN, msg).await?;
                        continue;
                    };
                    let info =
                        |payload: &[u8]| proto::option_reply(opt.option, NBD_REP_INFO, payload);
                    let mut out = info(&proto::info_export(target.size(), TRANSMISSION_FLAGS));
                    // We enforce a maximum request size other than the
                    // default, so the spec says we MUST send our constraints
                    // when asked and SHOULD advertise them anyway; clients
                    // ignore information they did not ask for.
                    out.extend_from_slice(&info(
                        &BlockSizes::for_target(target.block_size()).encode(),
                    ));
                    if request.wants(NBD_INFO_NAME) {
                        out.extend_from_slice(&info(&proto::info_name(&request.name)));
                    }
                    out.extend_from_slice(&proto::option_reply(opt.option, NBD_REP_ACK, &[]));
                    stream.write_all(&out).await?;
                    if opt.option == NBD_OPT_GO {
                        return Ok(Some((request.name, target)));
                    }
                }
                // Everything else: STARTTLS (we run in NOTLS mode, where the
                // spec allows ERR_UNSUP), STRUCTURED_REPLY, the metadata
                // context options, PEEK_EXPORT, and unknown options. Their
                // data has already been consumed.
                other => {
                    let msg = b"option not supported";
                    write_option_reply(stream, other, NBD_REP_ERR_UNSUP, msg).await?;
                }
            }
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME with an invalid name: {0}")]
    BadExportName(&'static str),
    #[error("NBD_CMD_WRITE of {0} bytes exceeds the maximum request size")]
    OversizedWrite(u32),
}

impl ConnError {
    /// The client simply went away: not worth a warning.
    fn is_disconnect(&self) -> bool {
        match self {
            ConnError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// One simple reply, queued for the writer task. Holding the request's
/// permits here means they are released only once the reply is on the wire.
struct Reply {
    handle: u64,
    error: u32,
    /// The data of a successful READ.
    data: Option<Bytes>,
    _permits: Option<Permits>,
}

impl Reply {
    fn status(handle: u64, error: u32) -> Reply {
        Reply {
            handle,
            error,
            data: None,
            _permits: None,
        }
    }
}

struct Permits {
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The in-flight limits of one connection.
struct Limits {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Limits {
    async fn acquire(&self, bytes: u32) -> Permits {
        // Acquiring fails only on a closed semaphore, and these are never
        // closed; `ok()` keeps even that impossible case from panicking.
        let slot = Arc::clone(&self.slots).acquire_owned().await.ok();
        let bytes = match bytes {
            0 => None,
            n => Arc::clone(&self.bytes).acquire_many_owned(n).await.ok(),
        };
        Permits {
            _slot: slot,
            _bytes: bytes,
        }
    }
}

/// The transmission phase of one connection.
async fn transmission<T: BlockTarget>(
    stream: TcpStream,
    target: Arc<T>,
    mut stop: watch::Receiver<bool>,
    bulk: Option<tokio::runtime::Handle>,
) -> Result<(), ConnError> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT_REQUESTS);
    let writer_failed = Arc::new(Notify::new());
    // Aborted if this connection's task is dropped (serve's shutdown grace
    // expired), so a writer blocked on a client that never reads does not
    // outlive the connection.
    let mut writer = AbortOnDrop(tokio::spawn(
        write_replies(wr, rx, Arc::clone(&writer_failed)).instrument(Span::current()),
    ));
    let limits = Limits {
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
    };

    let read_result = read_requests(
        &mut rd,
        &target,
        &tx,
        &limits,
        &mut stop,
        &writer_failed,
        bulk.as_ref(),
    )
    .await;

    // Whatever ended the loop (DISC, a protocol violation, shutdown, the
    // client going away), let every started request finish and reply before
    // closing: DISC requires it, and no target operation is cut off midway.
    // The writer ends once every request task has dropped its sender.
    drop(tx);
    let write_result = match (&mut writer.0).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("reply writer task failed: {e}"))),
    };
    // If the writer died early, request tasks may still be running against
    // the target; wait for them so shutdown does not race them.
    let _ = limits
        .slots
        .acquire_many(MAX_IN_FLIGHT_REQUESTS as u32)
        .await;

    read_result?;
    write_result?;
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads and dispatches requests until DISC, shutdown, an error, or the
/// writer failing.
async fn read_requests<T: BlockTarget>(
    rd: &mut BufReader<OwnedReadHalf>,
    target: &Arc<T>,
    tx: &mpsc::Sender<Reply>,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
    writer_failed: &Notify,
    bulk: Option<&tokio::runtime::Handle>,
) -> Result<(), ConnError> {
    loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            r = rd.read_exact(&mut header) => { r?; }
            () = stopped(stop) => {
                debug!("server shutting down; closing connection");
                return Ok(());
            }
            // The writer reports its own error; just stop reading.
            () = writer_failed.notified() => return Ok(()),
        }
        let req = proto::parse_request(&header)?;

        match proto::decode_request(&req, target.size()) {
            Action::Disconnect => {
                debug!("client sent NBD_CMD_DISC");
                return Ok(());
            }
            Action::Succeed => send(tx, Reply::status(req.handle, 0)).await,
            Action::Reject { error, drain } => {
                // A rejected WRITE's payload is skipped, not buffered.
                discard(rd, drain).await?;
                debug!(?req, error, "request rejected");
                send(tx, Reply::status(req.handle, error)).await;
            }
            Action::RejectAndClose { error } => {
                send(tx, Reply::status(req.handle, error)).await;
                return Err(ConnError::OversizedWrite(req.len));
            }
            Action::Execute(op) => {
                let permits = tokio::select! {
                    p = limits.acquire(op.buffer_len()) => p,
                    () = stopped(stop) => return Ok(()),
                };
                let payload = match op {
                    Op::Write { offset, len, .. } => {
                        // Bounded by MAX_REQUEST_LEN and paid for by `permits`.
                        // If the client drops mid-payload, read_exact fails and
                        // nothing reaches the target.
                        read_write_payload(rd, &**target, offset, len as usize).await?
                    }
                    _ => Bytes::new(),
                };
                let target = Arc::clone(target);
                let tx = tx.clone();
                let handle = req.handle;
                let runtime = bulk.filter(|_| op.buffer_len() as usize >= BULK_REQUEST_BYTES);
                let task = async move {
                    // A panicking target must not leave the client
                    // waiting forever for this handle.
                    let outcome = AssertUnwindSafe(execute(&*target, op, payload))
                        .catch_unwind()
                        .await;
                    let (error, data) = match outcome {
                        Ok(Ok(data)) => (0, data),
                        Ok(Err(error)) => (error, None),
                        Err(_) => {
                            warn!(?op, "target panicked; replying EIO");
                            (NBD_EIO, None)
                        }
                    };
                    let reply = Reply {
                        handle,
                        error,
                        data,
                        _permits: Some(permits),
                    };
                    send(&tx, reply).await;
                }
                .instrument(Span::current());
                match runtime {
                    Some(runtime) => drop(runtime.spawn(task)),
                    None => drop(tokio::spawn(task)),
                }
            }
        }
    }
}

/// Runs one validated operation. Returns the data of a READ, or the NBD error.
async fn execute<T: BlockTarget>(target: &T, op: Op, payload: Bytes) -> Result<Option<Bytes>, u32> {
    let result = match op {
        Op::Read { offset, len } => match target.read(offset, len).await {
            // Sending a different length would desynchronise the stream.
            Ok(data) if data.len() == len as usize => return Ok(Some(data)),
            Ok(data) => {
                warn!(
                    offset,
                    len,
                    returned = data.len(),
                    "target returned a read of the wrong length"
                );
                return Err(NBD_EIO);
            }
            Err(e) => Err(e),
        },
        Op::Write { offset, fua, .. } => target.write_owned(offset, payload, fua).await,
        Op::Flush => target.flush().await,
        Op::Trim { offset, len, fua } => match target.trim(offset, len).await {
            // `trim` has no FUA parameter; a flush afterwards makes the
            // discard durable before we reply, as FUA requires.
            Ok(()) if fua => target.flush().await,
            r => r,
        },
        Op::WriteZeroes {
            offset,
            len,
            fua,
            allocate,
        } => target.write_zeroes(offset, len, fua, allocate).await,
    };
    result.map(|()| None).map_err(|e| {
        match &e {
            // Caused by the client (or a resize racing it), not worth a warning.
            BlockError::OutOfRange { .. } | BlockError::ReadOnly => {
                debug!(?op, error = %e, "request failed")
            }
            _ => warn!(?op, error = %e, "request failed"),
        }
        proto::errno_for(&e, op.command())
    })
}

/// Reads the payload of a WRITE of `len` bytes at `offset`. One of whole
/// blocks goes into the target's own buffer, which its device takes without
/// another copy; any other into a plain one.
async fn read_write_payload<R: AsyncRead + Unpin, T: BlockTarget>(
    rd: &mut R,
    target: &T,
    offset: u64,
    len: usize,
) -> io::Result<Bytes> {
    let block = target.block_size() as usize;
    if len > 0 && len % block == 0 && offset % block as u64 == 0 {
        if let Some(mut buf) = target.write_buffer(len) {
            rd.read_exact(&mut buf).await?;
            return Ok(Bytes::from_owner(buf));
        }
    }
    Ok(Bytes::from(read_payload(rd, len).await?))
}

/// Reads a WRITE payload of exactly `len` bytes into spare capacity: no
/// zero-filling of a buffer that is about to be overwritten, and reads as
/// large as what remains, so a buffered reader with nothing buffered hands
/// them straight to the socket instead of copying through its buffer.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let remaining = len - buf.len();
        let mut rest = (&mut buf).limit(remaining);
        if rd.read_buf(&mut rest).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

/// The writer task: sends queued replies in order of completion.
async fn write_replies(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Reply>,
    failed: Arc<Notify>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(MAX_IN_FLIGHT_REQUESTS);
    let result = async {
        // Whatever else is ready goes out with the first reply.
        while rx.recv_many(&mut batch, MAX_IN_FLIGHT_REQUESTS).await > 0 {
            write_batch(&mut wr, &batch).await?;
            // Dropping the replies releases their permits.
            batch.clear();
        }
        wr.shutdown().await
    }
    .await;
    if result.is_err() {
        failed.notify_one();
    }
    result
}

/// Writes `replies` back to back with vectored writes: each header, then
/// its data where the target left it (a READ's is usually the buffer the
/// device read into), so the data is not copied on its way to the socket.
/// At most [`MAX_IN_FLIGHT_REQUESTS`] replies, two slices each, stay well
/// under the kernel's limit of 1024 slices per call.
async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, replies: &[Reply]) -> io::Result<()> {
    let headers: Vec<[u8; proto::SIMPLE_REPLY_HEADER_LEN]> = replies
        .iter()
        .map(|reply| proto::simple_reply_header(reply.error, reply.handle))
        .collect();
    let mut slices = Vec::with_capacity(replies.len() * 2);
    for (reply, header) in replies.iter().zip(&headers) {
        slices.push(IoSlice::new(header));
        if let Some(data) = &reply.data {
            slices.push(IoSlice::new(data));
        }
    }
    crate::vectored::write_all_vectored(w, &mut slices).await
}

/// Queues a reply. If the writer is gone the connection is closing and the
/// reply has nowhere to go, so a failure is ignored.
async fn send(tx: &mpsc::Sender<Reply>, reply: Reply) {
    let _ = tx.send(reply).await;
}

async fn write_option_reply(
    stream: &mut TcpStream,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> io::Result<()> {
    stream
        .write_all(&proto::option_reply(option, reply_type, data))
        .await
}

/// Reads and throws away `len` bytes without buffering them.
async fn discard<S: AsyncRead + Unpin>(stream: &mut S, len: u32) -> io::Result<()> {
    let len = u64::from(len);
    let copied = tokio::io::copy(&mut stream.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Resolves once the server is shutting down (or gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Accept errors that concern one connection or a passing shortage of
/// resources, after which the listener still works.
fn is_transient_accept_error(e: &io::Error) -> bool {
    // Linux errno values: ENOMEM, ENFILE, EMFILE, ENOBUFS.
    const RESOURCE_SHORTAGE: [i32; 4] = [12, 23, 24, 105];
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || e
        .raw_os_error()
        .is_some_and(|code| RESOURCE_SHORTAGE.contains(&code))
}

fn log_connection_exit(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            warn!("an NBD connection task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    //! End-to-end tests over real TCP connections, with a hand-written client
    //! and an in-memory target.

    use super::*;
    use crate::nbd::proto::*;
    use crate::target::BlockResult;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const EXPORT_SIZE: usize = 1 << 20;
    /// Bound on every wait in these tests, so a bug fails instead of hanging.
    const WAIT: Duration = Duration::from_secs(10);

    /// Failure injected into the next operations of a [`MemTarget`].
    #[derive(Clone)]
    enum Fail {
        Error(BlockError),
        Panic,
        ShortRead,
    }

    /// Test-only target: a byte vector behind a mutex, recording what the
    /// server asked of it.
    struct MemTarget {
        data: Mutex<Vec<u8>>,
        block_size: u32,
        fail: Mutex<Option<Fail>>,
        reads: AtomicU64,
        writes: AtomicU64,
        flushes: AtomicU64,
        last_fua: AtomicBool,
        last_allocate: AtomicBool,
    }

    impl MemTarget {
        fn new(size: usize, block_size: u32) -> Arc<MemTarget> {
            // A recognisable non-zero pattern, so zeroing is observable.
            let data = (0..size).map(|i| (i % 251) as u8 + 1).collect();
            Arc::new(MemTarget {
                data: Mutex::new(data),
                block_size,
                fail: Mutex::new(None),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                last_fua: AtomicBool::new(false),
                last_allocate: AtomicBool::new(false),
            })
        }

        fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
            self.data.lock().unwrap()[offset..offset + len].to_vec()
        }

        fn set_fail(&self, fail: Option<Fail>) {
            *self.fail.lock().unwrap() = fail;
        }

        fn injected(&self) -> BlockResult<()> {
            // Not matched on the guard: panicking while holding it would poison it.
            let fail = self.fail.lock().unwrap().clone();
            match fail {
                None | Some(Fail::ShortRead) => Ok(()),
                Some(Fail::Error(e)) => Err(e),
                Some(Fail::Panic) => panic!("injected target panic"),
            }
        }

        fn range(&self, offset: u64, len: u64) -> BlockResult<std::ops::Range<usize>> {
            let size = self.data.lock().unwrap().len() as u64;
            check_range(offset, len, size)?;
            Ok(offset as usize..(offset + len) as usize)
        }
    }

    impl BlockTarget for MemTarget {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }

        fn block_size(&self) -> u32 {
            self.block_size
        }

        async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.injected()?;
            let r = self.range(offset, len.into())?;
            let mut data = self.data.lock().unwrap()[r].to_vec();
            if matches!(*self.fail.lock().unwrap(), Some(Fail::ShortRead)) {
                data.pop();
            }
            Ok(data.into())
        }

        async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
            self.injected()?;
            let r = self.range(offset, data.len() as u64)?;
            self.data.lock().unwrap()[r].copy_from_slice(data);
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.last_fua.store(fua, Ordering::SeqCst);
            Ok(())
        }

        async fn flush(&self) -> BlockResult<()> {
            self.injected()?;
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        async fn trim(&self, offset: u64, len: u64) -> BlockResult<()> {
            self.injected()?;
            let r = self.range(offset, len)?;
            self.data.lock().unwrap()[r].fill(0);
            Ok(())
        }

        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            fua: bool,
            allocate: bool,
        ) -> BlockResult<()> {
            self.injected()?;
            let r = self.range(offset, len)?;
            self.data.lock().unwrap()[r].fill(0);
            self.last_fua.store(fua, Ordering::SeqCst);
            self.last_allocate.store(allocate, Ordering::SeqCst);
            Ok(())
        }
    }

    struct MemRegistry {
        targets: BTreeMap<String, Arc<MemTarget>>,
    }

    impl TargetRegistry for MemRegistry {
        type Target = MemTarget;

        fn export_names(&self) -> Vec<String> {
            self.targets.keys().cloned().collect()
        }

        fn lookup(&self, name: &str) -> Option<Arc<MemTarget>> {
            self.targets.get(name).cloned()
        }
    }

    struct TestServer {
        addr: SocketAddr,
        registry: Arc<MemRegistry>,
        shutdown: Option<oneshot::Sender<()>>,
        task: JoinHandle<io::Result<()>>,
    }

    impl TestServer {
        async fn start() -> TestServer {
            Self::start_with(|s| s).await
        }

        async fn start_with(
            configure: impl FnOnce(NbdServer<MemRegistry>) -> NbdServer<MemRegistry>,
        ) -> TestServer {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                )
                .try_init();
            let mut targets = BTreeMap::new();
            targets.insert("vol1".to_string(), MemTarget::new(EXPORT_SIZE, 4096));
            targets.insert("vol2".to_string(), MemTarget::new(4 * EXPORT_SIZE, 512));
            let registry = Arc::new(MemRegistry { targets });
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = Arc::new(configure(NbdServer::new(Arc::clone(&registry))));
            let (tx, rx) = oneshot::channel();
            let task = tokio::spawn(server.serve(listener, async {
                let _ = rx.await;
            }));
            TestServer {
                addr,
                registry,
                shutdown: Some(tx),
                task,
            }
        }

        fn target(&self, name: &str) -> Arc<MemTarget> {
            Arc::clone(&self.registry.targets[name])
        }

        async fn stop(mut self) -> io::Result<()> {
            let _ = self.shutdown.take().unwrap().send(());
            tokio::time::timeout(WAIT, self.task)
                .await
                .expect("serve did not return after shutdown")
                .expect("serve panicked")
        }
    }

    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(WAIT, f)
            .await
            .expect("timed out waiting for the server")
    }

    /// A minimal NBD client speaking the wire format by hand.
    struct Client {
        s: TcpStream,
    }

    impl Client {
        /// Connects and checks the greeting; does not send client flags.
        async fn connect(addr: SocketAddr) -> Client {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut g = [0u8; 18];
            within(s.read_exact(&mut g)).await.unwrap();
            assert_eq!(&g[0..8], b"NBDMAGIC");
            assert_eq!(&g[8..16], b"IHAVEOPT");
            assert_eq!(u16::from_be_bytes([g[16], g[17]]), 0b11);
            Client { s }
        }

        /// Connects and sends the client flags.
        async fn negotiate(addr: SocketAddr, client_flags: u32) -> Client {
            let mut c = Client::connect(addr).await;
            c.s.write_all(&client_flags.to_be_bytes()).await.unwrap();
            c
        }

        /// A full handshake ending with NBD_OPT_GO; returns (size, flags).
        async fn go(addr: SocketAddr, name: &str) -> (Client, u64, u16) {
            let mut c = Client::negotiate(addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
            c.option(NBD_OPT_GO, &info_data(name, &[])).await;
            let (size, flags) = c.expect_export_info(NBD_OPT_GO).await;
            (c, size, flags)
        }

        async fn option(&mut self, option: u32, data: &[u8]) {
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&option.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            self.s.write_all(&b).await.unwrap();
        }

        /// Reads one option reply: (option, reply type, data).
        async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
            let mut h = [0u8; 20];
            within(self.s.read_exact(&mut h)).await.unwrap();
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            assert!(len < 1 << 20, "absurd option reply length {len}");
            let mut data = vec![0u8; len as usize];
            within(self.s.read_exact(&mut data)).await.unwrap();
            (option, kind, data)
        }

        /// Reads NBD_REP_INFO replies up to the ACK; checks the block size
        /// info and returns (size, transmission flags).
        async fn expect_export_info(&mut self, option: u32) -> (u64, u16) {
            let mut export = None;
            let mut block_size = None;
            loop {
                let (opt, kind, data) = self.option_reply().await;
                assert_eq!(opt, option);
                match kind {
                    NBD_REP_INFO => match u16::from_be_bytes([data[0], data[1]]) {
                        NBD_INFO_EXPORT => {
                            assert_eq!(data.len(), 12);
                            let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            export = Some((size, flags));
                        }
                        NBD_INFO_BLOCK_SIZE => {
                            assert_eq!(data.len(), 14);
                            let v =
                                |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                            block_size = Some((v(2), v(6), v(10)));
                        }
                        NBD_INFO_NAME => {}
                        other => panic!("unexpected info type {other}"),
                    },
                    NBD_REP_ACK => break,
                    other => panic!("unexpected reply type {other:#x}"),
                }
            }
            let (min, preferred, max) = block_size.expect("NBD_INFO_BLOCK_SIZE sent");
            assert_eq!(min, 1);
            assert!(preferred == 4096 || preferred == 512);
            assert_eq!(max, 32 << 20);
            export.expect("NBD_INFO_EXPORT sent")
        }

        async fn request(
            &mut self,
            flags: u16,
            kind: u16,
            handle: u64,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) {
            self.s
                .write_all(&request_bytes(flags, kind, handle, offset, len, payload))
                .await
                .unwrap();
        }

        /// Reads a simple reply header: (error, handle).
        async fn reply(&mut self) -> (u32, u64) {
            let mut h = [0u8; 16];
            within(self.s.read_exact(&mut h)).await.unwrap();
            assert_eq!(
                u32::from_be_bytes(h[0..4].try_into().unwrap()),
                SIMPLE_REPLY_MAGIC
            );
            (
                u32::from_be_bytes(h[4..8].try_into().unwrap()),
                u64::from_be_bytes(h[8..16].try_into().unwrap()),
            )
        }

        async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
            self.request(0, NBD_CMD_READ, 1, offset, len, &[]).await;
            let (error, handle) = self.reply().await;
            assert_eq!(handle, 1);
            if error != 0 {
                return Err(error);
            }
            let mut data = vec![0u8; len as usize];
            within(self.s.read_exact(&mut data)).await.unwrap();
            Ok(data)
        }

        async fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
            self.request(flags, NBD_CMD_WRITE, 2, offset, data.len() as u32, data)
                .await;
            let (error, handle) = self.reply().await;
            assert_eq!(handle, 2);
            error
        }

        /// A command without payload or reply data; returns the error.
        async fn command(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> u32 {
            self.request(flags, kind, 3, offset, len, &[]).await;
            let (error, handle) = self.reply().await;
            assert_eq!(handle, 3);
            error
        }

        /// Asserts the server closed the connection (after any bytes it was
        /// still sending).
        async fn expect_closed(&mut self) {
            let mut rest = Vec::new();
            match within(self.s.read_to_end(&mut rest)).await {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            }
        }
    }

    fn request_bytes(
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn go_then_read_write_round_trips_at_unaligned_offsets() {
        let srv = TestServer::start().await;
        let target = srv.target("vol1");
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        c.option(
            NBD_OPT_GO,
            &info_data("vol1", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
        )
        .await;
        let (size, flags) = c.expect_export_info(NBD_OPT_GO).await;
        assert_eq!(size, EXPORT_SIZE as u64);
        assert_eq!(flags, TRANSMISSION_FLAGS);
        for bit in [
            NBD_FLAG_HAS_FLAGS,
            NBD_FLAG_SEND_FLUSH,
            NBD_FLAG_SEND_FUA,
            NBD_FLAG_SEND_TRIM,
            NBD_FLAG_SEND_WRITE_ZEROES,
            NBD_FLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(flags & bit, 0);
        }
        assert_eq!(flags & (NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_DF), 0);

        let mut model = target.snapshot(0, EXPORT_SIZE);
        let data = pattern(5000, 7);
        assert_eq!(c.write(0, 1001, &data).await, 0);
        model[1001..6001].copy_from_slice(&data);
        assert!(!target.last_fua.load(Ordering::SeqCst));
        assert_eq!(c.read(999, 5004).await.unwrap(), model[999..6003]);

        // FUA reaches the target; the last byte of the export is writable.
        assert_eq!(
            c.write(NBD_CMD_FLAG_FUA, EXPORT_SIZE as u64 - 3, b"xyz")
                .await,
            0
        );
        model[EXPORT_SIZE - 3..].copy_from_slice(b"xyz");
        assert!(target.last_fua.load(Ordering::SeqCst));
        assert_eq!(
            c.read(EXPORT_SIZE as u64 - 10, 10).await.unwrap(),
            model[EXPORT_SIZE - 10..]
        );

        assert_eq!(c.command(NBD_CMD_FLUSH, 0, 0, 0).await, 0);
        assert_eq!(target.flushes.load(Ordering::SeqCst), 1);

        // TRIM zeroes in our target; with FUA the server flushes after it.
        assert_eq!(
            c.command(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 3000, 777).await,
            0
        );
        model[3000..3777].fill(0);
        assert_eq!(target.flushes.load(Ordering::SeqCst), 2);

        assert_eq!(
            c.command(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 10_001, 333)
                .await,
            0
        );
        model[10_001..10_334].fill(0);
        assert!(target.last_allocate.load(Ordering::SeqCst));
        assert!(!target.last_fua.load(Ordering::SeqCst));
        assert_eq!(
            c.command(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA, 20_000, 10)
                .await,
            0
        );
        model[20_000..20_010].fill(0);
        assert!(!target.last_allocate.load(Ordering::SeqCst));
        assert!(target.last_fua.load(Ordering::SeqCst));

        // Zero-length requests succeed without data.
        assert_eq!(c.read(5, 0).await.unwrap(), Vec::<u8>::new());
        assert_eq!(c.write(0, 5, &[]).await, 0);

        assert_eq!(c.read(0, 32_768).await.unwrap(), model[..32_768]);
        assert_eq!(target.snapshot(0, EXPORT_SIZE), model);
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn export_name_honours_no_zeroes() {
        let srv = TestServer::start().await;
        for no_zeroes in [false, true] {
            let flags =
                NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
            let mut c = Client::negotiate(srv.addr, flags).await;
            c.option(NBD_OPT_EXPORT_NAME, b"vol2").await;
            let mut r = [0u8; 10];
            within(c.s.read_exact(&mut r)).await.unwrap();
            assert_eq!(
                u64::from_be_bytes(r[0..8].try_into().unwrap()),
                4 * EXPORT_SIZE as u64
            );
            assert_eq!(u16::from_be_bytes([r[8], r[9]]), TRANSMISSION_FLAGS);
            if !no_zeroes {
                let mut z = [1u8; 124];
                within(c.s.read_exact(&mut z)).await.unwrap();
                assert!(z.iter().all(|&b| b == 0));
            }
            // The next bytes are the reply to our first request: in sync.
            let expected = srv.target("vol2").snapshot(100, 10);
            assert_eq!(c.read(100, 10).await.unwrap(), expected);
        }
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn list_returns_every_export_then_ack() {
        let srv = TestServer::start().await;
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        c.option(NBD_OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (opt, kind, data) = c.option_reply().await;
            assert_eq!(opt, NBD_OPT_LIST);
            match kind {
                NBD_REP_SERVER => {
                    let len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                    assert_eq!(len, data.len() - 4);
                    names.push(String::from_utf8(data[4..].to_vec()).unwrap());
                }
                NBD_REP_ACK => break,
                other => panic!("unexpected reply {other:#x}"),
            }
        }
        assert_eq!(names, ["vol1", "vol2"]);

        // LIST with data is invalid, and the session goes on.
        c.option(NBD_OPT_LIST, b"junk").await;
        assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
        c.option(NBD_OPT_GO, &info_data("vol1", &[])).await;
        c.expect_export_info(NBD_OPT_GO).await;
        assert!(c.read(0, 1).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn info_for_unknown_export_is_err_unknown_and_haggling_continues() {
        let srv = TestServer::start().await;
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        c.option(NBD_OPT_INFO, &info_data("nope", &[NBD_INFO_BLOCK_SIZE]))
            .await;
        let (opt, kind, _) = c.option_reply().await;
        assert_eq!((opt, kind), (NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN));

        c.option(NBD_OPT_GO, &info_data("", &[])).await;
        assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNKNOWN);

        // Malformed INFO data is NBD_REP_ERR_INVALID.
        c.option(NBD_OPT_INFO, &[0, 0, 0, 9, b'v']).await;
        assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);

        // INFO on a real export does not enter transmission.
        c.option(NBD_OPT_INFO, &info_data("vol2", &[])).await;
        let (size, _) = c.expect_export_info(NBD_OPT_INFO).await;
        assert_eq!(size, 4 * EXPORT_SIZE as u64);
        c.option(NBD_OPT_GO, &info_data("vol2", &[])).await;
        c.expect_export_info(NBD_OPT_GO).await;
        assert!(c.read(0, 512).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn unsupported_options_are_refused_and_their_data_skipped() {
        let srv = TestServer::start().await;
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        // Option data that looks like another option must not be parsed as one.
        let mut tricky = IHAVEOPT.to_be_bytes().to_vec();
        tricky.extend_from_slice(&NBD_OPT_ABORT.to_be_bytes());
        tricky.extend_from_slice(&0u32.to_be_bytes());
        for option in [
            NBD_OPT_STARTTLS,
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_LIST_META_CONTEXT,
            NBD_OPT_SET_META_CONTEXT,
            NBD_OPT_PEEK_EXPORT,
            11,
            0xdead_beef,
        ] {
            c.option(option, &tricky).await;
            let (opt, kind, _) = c.option_reply().await;
            assert_eq!((opt, kind), (option, NBD_REP_ERR_UNSUP), "option {option}");
            c.option(option, &[]).await;
            assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNSUP);
        }
        c.option(NBD_OPT_GO, &info_data("vol1", &[])).await;
        c.expect_export_info(NBD_OPT_GO).await;
        assert!(c.read(0, 1).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn oversized_option_is_too_big_and_not_buffered() {
        let srv = TestServer::start().await;
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        for option in [NBD_OPT_INFO, 0x1234] {
            let data = vec![0xa5u8; MAX_OPTION_LEN as usize + 1];
            c.option(option, &data).await;
            let (opt, kind, _) = c.option_reply().await;
            assert_eq!((opt, kind), (option, NBD_REP_ERR_TOO_BIG));
        }
        c.option(NBD_OPT_GO, &info_data("vol1", &[])).await;
        c.expect_export_info(NBD_OPT_GO).await;

        // A huge length is refused the same way; the connection is then
        // closed by the client, not by a server allocation failure.
        let mut c2 = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&99u32.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        c2.s.write_all(&h).await.unwrap();
        c2.s.write_all(&[0u8; 4096]).await.unwrap();
        drop(c2);

        // NBD_OPT_EXPORT_NAME cannot be answered with an error: closed.
        let mut c3 = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        c3.s.write_all(&h).await.unwrap();
        c3.expect_closed().await;

        assert!(c.read(0, 1).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn abort_is_acked_then_closed() {
        let srv = TestServer::start().await;
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        c.option(NBD_OPT_ABORT, &[]).await;
        let (opt, kind, data) = c.option_reply().await;
        assert_eq!((opt, kind, data.len()), (NBD_OPT_ABORT, NBD_REP_ACK, 0));
        c.expect_closed().await;
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn bad_client_flags_close_the_connection() {
        let srv = TestServer::start().await;
        for flags in [
            0,
            NBD_FLAG_C_NO_ZEROES,
            NBD_FLAG_C_FIXED_NEWSTYLE | 4,
            u32::MAX,
        ] {
            let mut c = Client::negotiate(srv.addr, flags).await;
            c.option(NBD_OPT_LIST, &[]).await;
            let mut buf = Vec::new();
            let n = within(c.s.read_to_end(&mut buf)).await.unwrap_or(0);
            assert_eq!(n, 0, "flags {flags:#x} got a reply");
        }
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_export_name_closes_the_connection() {
        let srv = TestServer::start().await;
        let mut c = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        c.option(NBD_OPT_EXPORT_NAME, b"missing").await;
        let mut buf = Vec::new();
        assert_eq!(within(c.s.read_to_end(&mut buf)).await.unwrap_or(0), 0);
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn garbage_during_handshake_closes_only_that_connection() {
        let srv = TestServer::start().await;
        let (mut good, _, _) = Client::go(srv.addr, "vol1").await;

        // Garbage where an option header belongs.
        let mut bad = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        bad.s
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        bad.expect_closed().await;

        // Garbage as the very first bytes (no valid client flags).
        let mut bad = Client::connect(srv.addr).await;
        bad.s.write_all(&[0xff; 64]).await.unwrap();
        bad.expect_closed().await;

        // A client that vanishes mid-option.
        let mut bad = Client::negotiate(srv.addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        bad.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
        drop(bad);

        let data = pattern(100, 3);
        assert_eq!(good.write(0, 12_345, &data).await, 0);
        assert_eq!(good.read(12_345, 100).await.unwrap(), data);
        let (mut again, _, _) = Client::go(srv.addr, "vol1").await;
        assert_eq!(again.read(12_345, 100).await.unwrap(), data);
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn requests_past_the_end_get_spec_errors_and_the_connection_keeps_working() {
        let srv = TestServer::start().await;
        let target = srv.target("vol1");
        let before = target.snapshot(0, EXPORT_SIZE);
        let (mut c, size, _) = Client::go(srv.addr, "vol1").await;

        assert_eq!(c.read(size - 10, 11).await, Err(NBD_EINVAL));
        assert_eq!(c.read(size + 1, 0).await, Err(NBD_EINVAL));
        assert_eq!(c.read(u64::MAX, 1).await, Err(NBD_EINVAL));
        assert_eq!(c.read(u64::MAX - 2, 16).await, Err(NBD_EINVAL));
        // The write payload is consumed, so the stream stays in sync.
        assert_eq!(c.write(0, size - 2, b"abcd").await, NBD_ENOSPC);
        assert_eq!(c.write(0, u64::MAX - 1, b"abcd").await, NBD_ENOSPC);
        assert_eq!(c.command(NBD_CMD_TRIM, 0, size, 1).await, NBD_EINVAL);
        assert_eq!(
            c.command(NBD_CMD_WRITE_ZEROES, 0, size - 1, 2).await,
            NBD_ENOSPC
        );
        assert_eq!(target.snapshot(0, EXPORT_SIZE), before);
        assert_eq!(target.reads.load(Ordering::SeqCst), 0);

        assert_eq!(
            c.read(size - 10, 10).await.unwrap(),
            before[EXPORT_SIZE - 10..]
        );
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn oversized_requests() {
        let srv = TestServer::start().await;
        let (mut c, _, _) = Client::go(srv.addr, "vol1").await;
        // Over the maximum block size: EINVAL, connection stays up.
        assert_eq!(c.read(0, MAX_REQUEST_LEN + 1).await, Err(NBD_EINVAL));
        assert_eq!(c.read(0, u32::MAX).await, Err(NBD_EINVAL));
        assert!(c.read(0, 4096).await.is_ok());

        // An oversized write's payload is not read: EINVAL, then closed.
        c.request(0, NBD_CMD_WRITE, 77, 0, MAX_REQUEST_LEN + 1, &[0u8; 4096])
            .await;
        assert_eq!(c.reply().await, (NBD_EINVAL, 77));
        c.expect_closed().await;

        // The server is fine.
        let (mut c, _, _) = Client::go(srv.addr, "vol1").await;
        assert!(c.read(0, 4096).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_commands_and_flags_get_einval() {
        let srv = TestServer::start().await;
        let target = srv.target("vol1");
        let before = target.snapshot(0, EXPORT_SIZE);
        let (mut c, _, _) = Client::go(srv.addr, "vol1").await;
        for kind in [
            NBD_CMD_CACHE,
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_RESIZE,
            9,
            0xffff,
        ] {
            assert_eq!(
                c.command(kind, 0, 0, 512).await,
                NBD_EINVAL,
                "command {kind}"
            );
        }
        assert_eq!(
            c.command(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512).await,
            NBD_EINVAL
        );
        assert_eq!(c.command(NBD_CMD_READ, 1 << 15, 0, 512).await, NBD_EINVAL);
        assert_eq!(
            c.command(NBD_CMD_TRIM, NBD_CMD_FLAG_NO_HOLE, 0, 512).await,
            NBD_EINVAL
        );
        assert_eq!(
            c.command(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512)
                .await,
            NBD_EINVAL
        );
        assert_eq!(c.command(NBD_CMD_FLUSH, 0, 0, 1).await, NBD_EINVAL);
        assert_eq!(
            c.write(NBD_CMD_FLAG_NO_HOLE, 0, &[9u8; 700]).await,
            NBD_EINVAL
        );
        assert_eq!(target.snapshot(0, EXPORT_SIZE), before);
        assert_eq!(c.read(0, 700).await.unwrap(), before[..700]);
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn bad_request_magic_closes_only_that_connection() {
        let srv = TestServer::start().await;
        let (mut a, _, _) = Client::go(srv.addr, "vol1").await;
        let (mut b, _, _) = Client::go(srv.addr, "vol1").await;
        let mut req = request_bytes(0, NBD_CMD_READ, 1, 0, 512, &[]);
        req[0] ^= 0xff;
        a.s.write_all(&req).await.unwrap();
        a.expect_closed().await;
        assert!(b.read(0, 512).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn client_dropped_mid_write_does_not_affect_another_client() {
        let srv = TestServer::start().await;
        let target = srv.target("vol1");
        let (mut b, _, _) = Client::go(srv.addr, "vol1").await;
        let old = pattern(8192, 42);
        assert_eq!(b.write(0, 65_536, &old).await, 0);
        let writes = target.writes.load(Ordering::SeqCst);

        let (mut a, _, _) = Client::go(srv.addr, "vol1").await;
        a.request(0, NBD_CMD_WRITE, 5, 65_536, 8192, &[0xee; 4096])
            .await;
        a.s.flush().await.unwrap();
        drop(a);

        // Give the server time to notice, while b keeps working.
        for i in 0..20u64 {
            assert_eq!(b.read(65_536, 8192).await.unwrap(), old);
            assert_eq!(b.write(0, 200_000 + i * 10, b"0123456789").await, 0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(target.snapshot(65_536, 8192), old);
        assert_eq!(target.writes.load(Ordering::SeqCst), writes + 20);
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn disc_finishes_in_flight_requests_then_closes() {
        let srv = TestServer::start().await;
        let target = srv.target("vol2");
        let (mut c, _, _) = Client::go(srv.addr, "vol2").await;
        let mut burst = Vec::new();
        for i in 0..10u64 {
            burst.extend(request_bytes(
                0,
                NBD_CMD_WRITE,
                100 + i,
                i * 4096 + 1,
                4096,
                &pattern(4096, i as u8),
            ));
        }
        burst.extend(request_bytes(0, NBD_CMD_DISC, 999, 0, 0, &[]));
        c.s.write_all(&burst).await.unwrap();

        let mut handles = Vec::new();
        for _ in 0..10 {
            let (error, handle) = c.reply().await;
            assert_eq!(error, 0);
            handles.push(handle);
        }
        handles.sort();
        assert_eq!(handles, (100..110).collect::<Vec<_>>());
        c.expect_closed().await;
        for i in 0..10u64 {
            assert_eq!(
                target.snapshot(i as usize * 4096 + 1, 4096),
                pattern(4096, i as u8)
            );
        }
        srv.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_beyond_the_in_flight_cap_all_get_replies() {
        let srv = TestServer::start().await;
        let target = srv.target("vol2");
        let initial = target.snapshot(0, 4 * EXPORT_SIZE);
        let (c, _, _) = Client::go(srv.addr, "vol2").await;
        let (mut rd, mut wr) = c.s.into_split();
        const N: u64 = 600;

        // Even handles write block i, odd handles read block i + N (never
        // written), so every read's expected data is known.
        let sender = tokio::spawn(async move {
            for i in 0..N {
                let req = if i % 2 == 0 {
                    request_bytes(0, NBD_CMD_WRITE, i, i * 2048, 2048, &pattern(2048, i as u8))
                } else {
                    request_bytes(0, NBD_CMD_READ, i, (i + N) * 2048, 2048, &[])
                };
                wr.write_all(&req).await.unwrap();
            }
            wr
        });
        let mut seen = vec![false; N as usize];
        for _ in 0..N {
            let mut h = [0u8; 16];
            within(rd.read_exact(&mut h)).await.unwrap();
            assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(&h[4..8], &[0, 0, 0, 0]);
            let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert!(!seen[handle as usize], "handle {handle} answered twice");
            seen[handle as usize] = true;
            if handle % 2 == 1 {
                let mut data = vec![0u8; 2048];
                within(rd.read_exact(&mut data)).await.unwrap();
                let off = ((handle + N) * 2048) as usize;
                assert_eq!(data, initial[off..off + 2048]);
            }
        }
        assert!(seen.iter().all(|&s| s));
        sender.await.unwrap();
        for i in (0..N).step_by(2) {
            assert_eq!(
                target.snapshot(i as usize * 2048, 2048),
                pattern(2048, i as u8)
            );
        }
        srv.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_reads_replies_is_bounded_and_isolated() {
        let srv =
            TestServer::start_with(|s| s.with_shutdown_grace(Duration::from_millis(200))).await;
        let target = srv.target("vol2");
        let (c, _, _) = Client::go(srv.addr, "vol2").await;
        let (_rd, mut wr) = c.s.into_split();
        // 2000 reads of 4 MiB = 8 GiB of replies nobody reads.
        let flood = tokio::spawn(async move {
            for i in 0..2000u64 {
                let req = request_bytes(0, NBD_CMD_READ, i, 0, 4 << 20, &[]);
                if wr.write_all(&req).await.is_err() {
                    break;
                }
            }
        });
        // The 64 MiB byte budget admits 16 such reads (the 64-request cap
        // alone would admit 64); wait until they have been served.
        within(async {
            while target.reads.load(Ordering::SeqCst) < 16 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // Then the server must stop reading requests: beyond the budget only
        // the few replies the kernel's socket buffers absorb get through.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let served = target.reads.load(Ordering::SeqCst);
        assert!(served <= 24, "server kept reading: {served} reads served");

        let (mut other, _, _) = Client::go(srv.addr, "vol2").await;
        let expected = target.snapshot(4096, 4096);
        assert_eq!(other.read(4096, 4096).await.unwrap(), expected);

        // Shutdown does not hang on the stalled connection.
        srv.stop().await.unwrap();
        flood.abort();
    }

    #[tokio::test]
    async fn target_errors_are_mapped_to_nbd_errors() {
        let srv = TestServer::start().await;
        let target = srv.target("vol1");
        let (mut c, _, _) = Client::go(srv.addr, "vol1").await;
        // (injected failure, READ error, WRITE error, FLUSH error)
        let cases = [
            (
                Fail::Error(BlockError::Io("disk on fire".into())),
                NBD_EIO,
                NBD_EIO,
                NBD_EIO,
            ),
            (
                Fail::Error(BlockError::NoSpace),
                NBD_ENOSPC,
                NBD_ENOSPC,
                NBD_ENOSPC,
            ),
            (
                Fail::Error(BlockError::ReadOnly),
                NBD_EPERM,
                NBD_EPERM,
                NBD_EPERM,
            ),
            (
                Fail::Error(BlockError::Gone),
                NBD_ESHUTDOWN,
                NBD_ESHUTDOWN,
                NBD_ESHUTDOWN,
            ),
            (
                Fail::Error(BlockError::OutOfRange {
                    offset: 0,
                    len: 1,
                    size: 0,
                }),
                NBD_EINVAL,
                NBD_ENOSPC,
                NBD_EINVAL,
            ),
            (Fail::Panic, NBD_EIO, NBD_EIO, NBD_EIO),
            // A target returning the wrong amount of data must not desync the stream.
            (Fail::ShortRead, NBD_EIO, 0, 0),
        ];
        for (fail, read_err, write_err, flush_err) in cases {
            target.set_fail(Some(fail));
            assert_eq!(c.read(0, 100).await, Err(read_err));
            assert_eq!(c.write(0, 0, &[1; 100]).await, write_err);
            assert_eq!(c.command(NBD_CMD_FLUSH, 0, 0, 0).await, flush_err);
        }
        target.set_fail(None);
        assert!(c.read(0, 100).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn idle_handshake_times_out() {
        let srv =
            TestServer::start_with(|s| s.with_handshake_timeout(Duration::from_millis(200))).await;
        let mut idle = Client::connect(srv.addr).await;
        let started = std::time::Instant::now();
        idle.expect_closed().await;
        assert!(started.elapsed() >= Duration::from_millis(150));
        // Transmission is not subject to the timeout.
        let (mut c, _, _) = Client::go(srv.addr, "vol1").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(c.read(0, 1).await.is_ok());
        srv.stop().await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_connections_and_stops_accepting() {
        let srv = TestServer::start().await;
        let addr = srv.addr;
        let (mut c, _, _) = Client::go(addr, "vol1").await;
        let mut h = Client::negotiate(addr, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        srv.stop().await.unwrap();
        c.expect_closed().await;
        h.expect_closed().await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    /// Interoperability with real clients: libnbd's nbdinfo and qemu-io.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn external_clients_nbdinfo_and_qemu_io() {
        let have = |bin: &str| std::path::Path::new(bin).exists();
        if !have("/usr/bin/nbdinfo") || !have("/usr/bin/qemu-io") {
            eprintln!("skipping: nbdinfo or qemu-io not installed");
            return;
        }
        let srv = TestServer::start().await;
        let target = srv.target("vol1");
        let uri = format!("nbd://{}/vol1", srv.addr);

        let out = run("/usr/bin/nbdinfo", &["--json", &uri]).await;
        let json: String = out.split_whitespace().collect();
        for expected in [
            format!("\"export-size\":{EXPORT_SIZE}"),
            "\"is_read_only\":false".into(),
            "\"can_flush\":true".into(),
            "\"can_fua\":true".into(),
            "\"can_trim\":true".into(),
            "\"can_zero\":true".into(),
            "\"can_multi_conn\":true".into(),
            "\"block_size_minimum\":1".into(),
            "\"block_size_preferred\":4096".into(),
            format!("\"block_size_maximum\":{}", 32 << 20),
        ] {
            assert!(
                json.contains(&expected),
                "nbdinfo output lacks {expected}: {out}"
            );
        }

        let out = run(
            "/usr/bin/nbdinfo",
            &["--list", &format!("nbd://{}", srv.addr)],
        )
        .await;
        assert!(out.contains("vol1") && out.contains("vol2"), "{out}");

        let out = run(
            "/usr/bin/qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 4096 8192",
                "-c",
                "read -P 0xab 4096 8192",
                "-c",
                "write -P 0xcd 12345 1000",
                "-c",
                "read -P 0xcd 12345 1000",
                "-c",
                "write -z 65536 4096",
                "-c",
                "read -P 0 65536 4096",
                "-c",
                "discard 131072 4096",
                "-c",
                "flush",
                &uri,
            ],
        )
        .await;
        assert!(
            !out.contains("failed") && !out.contains("Pattern"),
            "qemu-io reported: {out}"
        );
        assert_eq!(out.matches("wrote").count(), 3, "{out}");
        assert_eq!(out.matches("read ").count(), 3, "{out}");
        assert!(target.snapshot(4096, 8192).iter().all(|&b| b == 0xab));
        assert!(target.snapshot(12_345, 1000).iter().all(|&b| b == 0xcd));
        assert!(target.snapshot(65_536, 4096).iter().all(|&b| b == 0));
        assert!(target.flushes.load(Ordering::SeqCst) >= 1);
        srv.stop().await.unwrap();
    }

    /// A socket that takes at most a few bytes per write, so every reply's
    /// slices are cut at odd places.
    struct Trickle {
        written: Vec<u8>,
        per_write: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.per_write);
            self.written.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for slice in slices {
                let take = slice.len().min(self.per_write - n);
                self.written.extend_from_slice(&slice[..take]);
                n += take;
                if n == self.per_write {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_of_replies_cut_by_short_writes_arrives_whole_and_in_order() {
        let replies = vec![
            Reply {
                handle: 1,
                error: 0,
                data: Some(Bytes::from(pattern(4096, 1))),
                _permits: None,
            },
            Reply::status(2, NBD_EIO),
            Reply {
                handle: 3,
                error: 0,
                data: Some(Bytes::from(pattern(513, 3))),
                _permits: None,
            },
            Reply::status(4, 0),
        ];
        let mut expected = Vec::new();
        for reply in &replies {
            expected.extend_from_slice(&simple_reply_header(reply.error, reply.handle));
            expected.extend_from_slice(reply.data.as_deref().unwrap_or_default());
        }
        for per_write in [1, 7, 16, 17, 4096, 1 << 20] {
            let mut socket = Trickle {
                written: Vec::new(),
                per_write,
            };
            write_batch(&mut socket, &replies).await.unwrap();
            assert!(socket.written == expected, "{per_write} bytes per write");
        }
    }

    /// Runs a program, asserts it succeeded, returns stdout and stderr.
    async fn run(program: &str, args: &[&str]) -> String {
        let out = within(tokio::process::Command::new(program).args(args).output())
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{program} {args:?} failed: {text}");
        text
    }
}
