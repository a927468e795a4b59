//! The io_uring engine: one ring on a dedicated thread, fed by tokio tasks.
//!
//! Tasks send requests over a channel and poke an eventfd; the ring thread keeps
//! a read of that eventfd armed, so it sleeps in one `io_uring_enter` waiting for
//! either a completion or new work. Everything that arrived since the last wake-up
//! is pushed as one batch and submitted with a single system call. The device file
//! and a set of buffers are registered with the ring up front, so requests skip
//! the per-call file lookup and page pinning.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use super::{AlignedBuf, BufferSets};

const RING_ENTRIES: u32 = 256;
/// At most this many requests are in the kernel at once; the rest wait in a backlog.
const MAX_IN_FLIGHT: usize = 256;
/// Registered buffers: 16 MiB of 128 KiB slots for block-sized requests and
/// 32 MiB of 1 MiB slots for large ones. Registered memory is pinned once, so
/// requests skip page pinning, and the slots are zeroed once, not per request.
pub(super) const SMALL_SLOT_SIZE: usize = 128 * 1024;
pub(super) const SMALL_SLOT_COUNT: usize = 128;
const LARGE_SLOT_SIZE: usize = 1024 * 1024;
const LARGE_SLOT_COUNT: usize = 32;
/// user_data of the armed eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;

pub(super) enum Op {
    Read,
    /// A write from memory the caller shares (kept alive until it is done),
    /// with its registered-buffer index when it lies in one of the slots.
    Write(Bytes, Option<u16>),
    SyncData,
}

pub(super) struct Request {
    pub(super) op: Op,
    pub(super) buf: Option<AlignedBuf>,
    pub(super) offset: u64,
    pub(super) done: oneshot::Sender<(Option<AlignedBuf>, io::Result<()>)>,
}

/// What a caller waits on for a request's outcome.
pub(super) type Outcome = oneshot::Receiver<(Option<AlignedBuf>, io::Result<()>)>;

impl Request {
    pub(super) fn new(op: Op, buf: Option<AlignedBuf>, offset: u64) -> (Request, Outcome) {
        let (done, outcome) = oneshot::channel();
        let request = Request {
            op,
            buf,
            offset,
            done,
        };
        (request, outcome)
    }
}

/// Work waiting for room in the ring.
enum Pending {
    New(Request),
    /// The rest of a short transfer, or a retry after EINTR/EAGAIN; the request
    /// stays in its in-flight slot.
    Retry(usize),
}

/// A request in the kernel, with how many bytes have been transferred so far
/// (short reads and writes are resubmitted for the rest).
pub(super) struct InFlight {
    pub(super) request: Request,
    pub(super) transferred: usize,
}

pub struct UringEngine {
    /// Identifies this engine's rings in threads that have their own.
    id: u64,
    file: Arc<File>,
    requests: Mutex<Option<Sender<Request>>>,
    wake: Arc<Wake>,
    slots: Option<Arc<BufferSets>>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    pub fn new(file: File) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let slots = BufferSets::new(
            SMALL_SLOT_SIZE,
            SMALL_SLOT_COUNT,
            LARGE_SLOT_SIZE,
            LARGE_SLOT_COUNT,
        );
        // SAFETY: the slot memory lives as long as the Arc, which the ring thread
        // holds until after the ring is dropped.
        let slots = match unsafe { ring.submitter().register_buffers(&slots.iovecs()) } {
            Ok(()) => Some(slots),
            Err(err) => {
                tracing::warn!(error = %err, "cannot register io_uring buffers, using unregistered ones");
                None
            }
        };
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let wake = Arc::new(Wake {
            // SAFETY: raw is a fresh descriptor we own.
            eventfd: unsafe { OwnedFd::from_raw_fd(raw) },
            pending: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let file = Arc::new(file);
        let thread_file = file.clone();
        let thread_wake = wake.clone();
        let thread_slots = slots.clone();
        let thread = std::thread::Builder::new()
            .name("strata-uring".into())
            .spawn(move || {
                // Keep the file and the registered memory alive until the ring is gone.
                let _file = thread_file;
                let _slots = thread_slots;
                if let Err(err) = run_ring(ring, rx, &thread_wake) {
                    tracing::error!(error = %err, "io_uring thread failed");
                }
            })?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(UringEngine {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            file,
            requests: Mutex::new(Some(tx)),
            wake,
            slots,
            thread: Some(thread),
        })
    }

    pub fn buffer(&self, len: usize) -> AlignedBuf {
        self.slots
            .as_ref()
            .and_then(|slots| slots.take(len, true))
            .unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    pub fn read_buffer(&self, len: usize) -> AlignedBuf {
        self.slots
            .as_ref()
            .and_then(|slots| slots.take(len, false))
            .unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    pub async fn read_at(&self, buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        let (buf, res) = self.call(Op::Read, Some(buf), offset).await;
        (buf.expect("read returns its buffer"), res)
    }

    /// Writes `data`, which must be aligned, without copying it.
    pub async fn write_shared(&self, data: Bytes, offset: u64) -> io::Result<()> {
        let index = self
            .slots
            .as_ref()
            .and_then(|slots| slots.index_of(data.as_ptr(), data.len()));
        self.call(Op::Write(data, index), None, offset).await.1
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        self.call(Op::SyncData, None, 0).await.1
    }

    async fn call(
        &self,
        op: Op,
        buf: Option<AlignedBuf>,
        offset: u64,
    ) -> (Option<AlignedBuf>, io::Result<()>) {
        if let Some(local) = super::uring_local::ring_for(self.id, &self.file, &self.slots) {
            return local.call(op, buf, offset).await;
        }
        let (request, result) = Request::new(op, buf, offset);
        let sent = match self.requests.lock().expect("requests lock").as_ref() {
            Some(tx) => tx.send(request).map_err(|e| e.0),
            None => Err(request),
        };
        if let Err(request) = sent {
            return (
                request.buf,
                Err(io::Error::other("io_uring engine stopped")),
            );
        }
        self.wake.poke();
        match result.await {
            Ok(outcome) => outcome,
            Err(_) => (None, Err(io::Error::other("io_uring thread exited"))),
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish in-flight work and exit.
        self.requests.lock().expect("requests lock").take();
        self.wake.poke();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The ring thread's doorbell: an eventfd whose read the ring keeps armed.
/// Pokes are coalesced: while one is pending (the thread has not yet woken and
/// drained the channel), further requests need no system call.
struct Wake {
    eventfd: OwnedFd,
    pending: AtomicBool,
}

impl Wake {
    fn poke(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), &one as *const u64 as *const _, 8) };
    }

    /// Called by the ring thread when it wakes, before draining the channel:
    /// a request sent after this pokes again.
    fn woken(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }
}

fn run_ring(mut ring: IoUring, requests: Receiver<Request>, wake: &Wake) -> io::Result<()> {
    // What the kernel may still write into: the eventfd read's counter and the
    // buffers of requests in flight.
    let mut wake_counter = Box::new(0u64);
    let mut in_flight: Vec<Option<InFlight>> = Vec::with_capacity(MAX_IN_FLIGHT);
    let result = drive_ring(
        &mut ring,
        &requests,
        wake,
        &mut wake_counter,
        &mut in_flight,
    );
    // Closing a ring does not wait for what is in it. The eventfd read may
    // still be armed (8 bytes, once per engine), and after an error requests
    // may be in the kernel: their memory is leaked rather than reused under a
    // transfer. On success nothing else is in flight.
    std::mem::forget(wake_counter);
    if result.is_err() {
        std::mem::forget(in_flight);
    }
    result
}

fn drive_ring(
    ring: &mut IoUring,
    requests: &Receiver<Request>,
    wake: &Wake,
    wake_counter: &mut u64,
    in_flight: &mut Vec<Option<InFlight>>,
) -> io::Result<()> {
    let mut free_tokens: Vec<usize> = Vec::new();
    let mut backlog: VecDeque<Pending> = VecDeque::new();
    let mut in_flight_count = 0usize;
    let mut closed = false;
    let mut wake_armed = false;

    loop {
        if !wake_armed && !closed {
            let sqe = opcode::Read::new(
                types::Fd(wake.eventfd.as_raw_fd()),
                wake_counter as *mut u64 as *mut u8,
                8,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // SAFETY: the counter outlives the ring (see run_ring).
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                wake_armed = true;
            }
        }
        loop {
            match requests.try_recv() {
                Ok(request) => backlog.push_back(Pending::New(request)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Push as much of the backlog as the ring and the in-flight cap allow.
        // Retries always go in (they already hold a slot); new requests only
        // while under the in-flight cap.
        loop {
            if matches!(backlog.front(), Some(Pending::New(_))) && in_flight_count >= MAX_IN_FLIGHT
            {
                break;
            }
            let token = match backlog.pop_front() {
                None => break,
                Some(Pending::Retry(token)) => token,
                Some(Pending::New(request)) => {
                    let token = free_tokens.pop().unwrap_or_else(|| {
                        in_flight.push(None);
                        in_flight.len() - 1
                    });
                    in_flight[token] = Some(InFlight {
                        request,
                        transferred: 0,
                    });
                    in_flight_count += 1;
                    token
                }
            };
            let entry = in_flight[token].as_mut().expect("in-flight entry");
            let sqe = build_sqe(entry).user_data(token as u64);
            // SAFETY: the buffer is owned by the in-flight entry until completion.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                // Submission queue full: hand what we have to the kernel first.
                ring.submit()?;
                // SAFETY: as above.
                if unsafe { ring.submission().push(&sqe) }.is_err() {
                    return Err(io::Error::other("io_uring submission queue stuck"));
                }
            }
        }
        if closed && in_flight_count == 0 && backlog.is_empty() {
            return Ok(());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
            Err(err) => return Err(err),
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (token, result) in completions {
            if token == WAKE_TOKEN {
                wake_armed = false;
                wake.woken();
                continue;
            }
            let token = token as usize;
            let entry = in_flight[token]
                .as_mut()
                .expect("completion for a known request");
            let outcome = complete(entry, result);
            match outcome {
                Completion::Resubmit => backlog.push_front(Pending::Retry(token)),
                Completion::Done(res) => {
                    let finished = in_flight[token].take().expect("in-flight entry");
                    in_flight_count -= 1;
                    free_tokens.push(token);
                    let request = finished.request;
                    let _ = request.done.send((request.buf, res));
                }
            }
        }
    }
}

pub(super) enum Completion {
    Done(io::Result<()>),
    Resubmit,
}

pub(super) fn complete(entry: &mut InFlight, result: i32) -> Completion {
    if result < 0 {
        let errno = -result;
        if errno == libc::EINTR || errno == libc::EAGAIN {
            return Completion::Resubmit;
        }
        return Completion::Done(Err(io::Error::from_raw_os_error(errno)));
    }
    let len = match &entry.request.op {
        Op::Write(data, _) => data.len(),
        _ => entry.request.buf.as_ref().map_or(0, |b| b.len()),
    };
    if matches!(entry.request.op, Op::SyncData) {
        return Completion::Done(Ok(()));
    }
    if result == 0 && entry.transferred < len {
        let kind = match entry.request.op {
            Op::Read => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::WriteZero,
        };
        return Completion::Done(Err(io::Error::new(kind, "short transfer")));
    }
    entry.transferred += result as usize;
    if entry.transferred < len {
        Completion::Resubmit
    } else {
        Completion::Done(Ok(()))
    }
}

pub(super) fn build_sqe(entry: &mut InFlight) -> squeue::Entry {
    let file = types::Fixed(0);
    let request = &mut entry.request;
    let offset = request.offset + entry.transferred as u64;
    match (&request.op, request.buf.as_mut()) {
        (Op::SyncData, _) => opcode::Fsync::new(file)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        (Op::Read, Some(buf)) => {
            let remaining = (buf.len() - entry.transferred) as u32;
            // SAFETY: `transferred` < len, so the pointer stays inside the buffer.
            let ptr = unsafe { buf.as_mut_ptr().add(entry.transferred) };
            match buf.registered_index() {
                Some(i) => opcode::ReadFixed::new(file, ptr, remaining, i)
                    .offset(offset)
                    .build(),
                None => opcode::Read::new(file, ptr, remaining)
                    .offset(offset)
                    .build(),
            }
        }
        (Op::Write(data, index), None) => {
            let remaining = (data.len() - entry.transferred) as u32;
            // SAFETY: `transferred` < len, so the pointer stays inside the bytes.
            let ptr = unsafe { data.as_ptr().add(entry.transferred) };
            match index {
                Some(i) => opcode::WriteFixed::new(file, ptr, remaining, *i)
                    .offset(offset)
                    .build(),
                None => opcode::Write::new(file, ptr, remaining)
                    .offset(offset)
                    .build(),
            }
        }
        (Op::Read, None) => unreachable!("reads always carry a buffer"),
        (Op::Write(..), Some(_)) => unreachable!("writes carry their data in the op"),
    }
}
