//! Per-thread io_uring rings driven by the thread's own tokio reactor.
//!
//! The shared ring (`uring.rs`) lives on its own thread, so each request from a
//! tokio task crosses threads twice: to the ring thread and back. Threads that
//! serve NBD connections (each a single-threaded tokio runtime) instead get a
//! ring of their own for each engine: a request is submitted straight from the
//! task that makes it, and completions are reaped when the ring's descriptor
//! becomes readable in the same thread's epoll. No thread hop per request.
//!
//! A thread opts in with [`use_thread_local_rings`]; elsewhere the shared ring
//! serves, so callers never need to know which ring they use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use io_uring::{types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::uring::{build_sqe, complete, Completion, InFlight, Op, Request};
use super::{AlignedBuf, BufferSets};

const LOCAL_RING_ENTRIES: u32 = 128;
/// While requests are in flight the reaper also looks every so often, so a
/// readiness event that never comes cannot stall them.
const REAP_FALLBACK: Duration = Duration::from_millis(2);
/// How long a closing ring waits for the kernel to finish its requests.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

thread_local! {
    /// engine id -> this thread's ring for it (None: setting it up failed).
    /// The map is absent on threads that did not opt in.
    static LOCAL_RINGS: RefCell<Option<HashMap<u64, Option<Arc<LocalRing>>>>> =
        const { RefCell::new(None) };
}

/// Lets the io_uring engines give the calling thread rings of its own. Call it
/// at the start of a thread that runs a single-threaded tokio runtime.
pub fn use_thread_local_rings() {
    LOCAL_RINGS.with(|rings| *rings.borrow_mut() = Some(HashMap::new()));
}

/// This thread's ring for engine `id`, set up on first use; None when the
/// thread did not opt in, is outside a tokio runtime, or the ring failed.
pub(super) fn ring_for(
    id: u64,
    file: &Arc<File>,
    slots: &Option<Arc<BufferSets>>,
) -> Option<Arc<LocalRing>> {
    LOCAL_RINGS.with(|rings| {
        let mut rings = rings.borrow_mut();
        let rings = rings.as_mut()?;
        rings
            .entry(id)
            .or_insert_with(|| {
                tokio::runtime::Handle::try_current().ok()?;
                match LocalRing::start(file.clone(), slots.clone()) {
                    Ok(ring) => Some(ring),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot set up a per-thread io_uring; using the shared ring");
                        None
                    }
                }
            })
            .clone()
    })
}

/// The ring's descriptor, for epoll; the ring itself owns and closes it.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

struct Inner {
    ring: IoUring,
    in_flight: Vec<Option<InFlight>>,
    free_tokens: Vec<usize>,
    /// Requests in the kernel. Never more than the completion queue holds:
    /// past that the kernel parks completions on an overflow list that only
    /// a later io_uring_enter flushes.
    in_kernel: usize,
    capacity: usize,
    /// Requests waiting for room, submitted as completions come in.
    backlog: std::collections::VecDeque<Request>,
}

impl Inner {
    /// Nothing tells when the kernel is done with the buffers of the requests
    /// in flight: better leaked than reused under a transfer.
    fn leak(&mut self, why: &str) {
        tracing::error!(
            why,
            requests = self.in_kernel,
            "cannot wait for a closing per-thread io_uring; leaking its buffers"
        );
        std::mem::forget(std::mem::take(&mut self.in_flight));
    }

    /// Queues a request on the ring; the kernel gets it with the next
    /// [`Inner::submit_queued`]. Gives it back if the ring refuses it.
    fn start(&mut self, request: Request) -> Result<(), Request> {
        let token = self.free_tokens.pop().unwrap_or_else(|| {
            self.in_flight.push(None);
            self.in_flight.len() - 1
        });
        self.in_flight[token] = Some(InFlight {
            request,
            transferred: 0,
        });
        let entry = self.in_flight[token].as_mut().expect("just inserted");
        let sqe = build_sqe(entry).user_data(token as u64);
        // SAFETY: the buffer is owned by the in-flight entry until completion.
        let pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok()
            || (self.submit_queued()
                // SAFETY: as above.
                && unsafe { self.ring.submission().push(&sqe) }.is_ok());
        if pushed {
            self.in_kernel += 1;
            return Ok(());
        }
        self.free_tokens.push(token);
        Err(self.in_flight[token].take().expect("entry").request)
    }

    /// Hands every queued request to the kernel in one system call, which
    /// also rings the device's doorbell once for all of them. False if the
    /// kernel took none; they stay queued for the next call.
    fn submit_queued(&mut self) -> bool {
        if self.ring.submission().is_empty() {
            return true;
        }
        match self.ring.submit() {
            Ok(_) => true,
            Err(err) => {
                tracing::debug!(error = %err, "io_uring submit failed; retrying later");
                false
            }
        }
    }
}

impl Drop for Inner {
    /// Closing a ring does not wait for the I/O it started: the kernel finishes
    /// it later, reading into or writing from the buffers of `in_flight`. Those
    /// go back to their slots or the allocator when this drops, so wait for
    /// every request in the kernel first. This runs when the thread's runtime
    /// or the thread itself ends, where blocking is fine.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        let tick = types::Timespec::new().sec(1);
        while self.in_kernel > 0 {
            let args = types::SubmitArgs::new().timespec(&tick);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => {}
                Err(err) => return self.leak(&err.to_string()),
            }
            if std::time::Instant::now() > deadline {
                return self.leak("requests still in the kernel");
            }
            let tokens: Vec<u64> = self.ring.completion().map(|cqe| cqe.user_data()).collect();
            for token in tokens {
                // A request is finished here even when its transfer was short:
                // nobody waits for it any more.
                let entry = self
                    .in_flight
                    .get_mut(token as usize)
                    .and_then(Option::take);
                if entry.is_some() {
                    self.in_kernel -= 1;
                }
            }
        }
    }
}

pub(super) struct LocalRing {
    // Field order is drop order: the epoll registration goes while the ring's
    // descriptor is still open, and the ring goes before the memory that
    // requests may still point into.
    readiness: AsyncFd<RingFd>,
    inner: Mutex<Inner>,
    /// Raised when a request is queued: the submitter task hands the kernel
    /// whatever is queued by the time it runs.
    submit_wanted: Notify,
    _file: Arc<File>,
    _slots: Option<Arc<BufferSets>>,
}

impl LocalRing {
    fn start(file: Arc<File>, slots: Option<Arc<BufferSets>>) -> io::Result<Arc<LocalRing>> {
        let ring = IoUring::new(LOCAL_RING_ENTRIES)?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        if let Some(slots) = &slots {
            // The same memory as the shared ring's slots, so a buffer's
            // registered index is valid in every ring of the engine.
            // SAFETY: the slots outlive the ring (held in `_slots`).
            unsafe { ring.submitter().register_buffers(&slots.iovecs())? };
        }
        // SAFETY: the ring's descriptor stays open while `readiness` exists:
        // the ring is dropped after it (field order of LocalRing).
        let readiness = unsafe {
            AsyncFd::register_with_interest(RingFd(ring.as_raw_fd()), tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let local = Arc::new(LocalRing {
            inner: Mutex::new(Inner {
                capacity: ring.params().cq_entries() as usize,
                ring,
                in_flight: Vec::new(),
                free_tokens: Vec::new(),
                in_kernel: 0,
                backlog: std::collections::VecDeque::new(),
            }),
            readiness,
            submit_wanted: Notify::new(),
            _file: file,
            _slots: slots,
        });
        tokio::spawn(reap(local.clone()));
        tokio::spawn(submit_batches(local.clone()));
        Ok(local)
    }

    pub(super) async fn call(
        &self,
        op: Op,
        buf: Option<AlignedBuf>,
        offset: u64,
    ) -> (Option<AlignedBuf>, io::Result<()>) {
        let (request, result) = Request::new(op, buf, offset);
        if let Err(request) = self.submit(request) {
            return (
                request.buf,
                Err(io::Error::other("io_uring submission failed")),
            );
        }
        match result.await {
            Ok(outcome) => outcome,
            Err(_) => (None, Err(io::Error::other("per-thread io_uring stopped"))),
        }
    }

    fn submit(&self, request: Request) -> Result<(), Request> {
        let mut inner = self.inner.lock().expect("local ring lock");
        if inner.in_kernel >= inner.capacity {
            inner.backlog.push_back(request);
            return Ok(());
        }
        inner.start(request)?;
        drop(inner);
        self.submit_wanted.notify_one();
        Ok(())
    }

    /// Hands out every completion; resubmits short transfers.
    fn drain(&self) -> usize {
        let mut inner = self.inner.lock().expect("local ring lock");
        let inner = &mut *inner;
        let completions: Vec<(u64, i32)> = inner
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (token, result) in completions {
            let token = token as usize;
            let Some(entry) = inner.in_flight.get_mut(token).and_then(Option::as_mut) else {
                continue;
            };
            match complete(entry, result) {
                Completion::Resubmit => {
                    let sqe = build_sqe(entry).user_data(token as u64);
                    // SAFETY: the buffer stays owned by the in-flight entry.
                    if unsafe { inner.ring.submission().push(&sqe) }.is_err() {
                        inner.submit_queued();
                        // SAFETY: as above.
                        let _ = unsafe { inner.ring.submission().push(&sqe) };
                    }
                }
                Completion::Done(res) => {
                    let finished = inner.in_flight[token].take().expect("entry");
                    inner.free_tokens.push(token);
                    inner.in_kernel -= 1;
                    let request = finished.request;
                    let _ = request.done.send((request.buf, res));
                }
            }
        }
        while inner.in_kernel < inner.capacity {
            let Some(request) = inner.backlog.pop_front() else {
                break;
            };
            if let Err(request) = inner.start(request) {
                let _ = request.done.send((
                    request.buf,
                    Err(io::Error::other("io_uring submission failed")),
                ));
            }
        }
        // Resubmissions and requests from the backlog, in one call.
        inner.submit_queued();
        inner.in_kernel + inner.backlog.len()
    }
}

/// Submits queued requests in batches. A task that queues a request wakes
/// this one, which runs after the tasks already ready to run (the current-
/// thread scheduler is first in, first out): requests that one read from a
/// client's socket brought in reach the kernel, and the device, together.
async fn submit_batches(local: Arc<LocalRing>) {
    loop {
        local.submit_wanted.notified().await;
        local.inner.lock().expect("local ring lock").submit_queued();
    }
}

/// Reaps completions whenever the ring's descriptor is readable. Runs until
/// the thread's runtime is dropped.
async fn reap(local: Arc<LocalRing>) {
    loop {
        let outstanding = local.drain();
        let ready = if outstanding > 0 {
            tokio::time::timeout(REAP_FALLBACK, local.readiness.readable())
                .await
                .ok()
        } else {
            Some(local.readiness.readable().await)
        };
        // Cleared before the next drain: a completion that arrives after the
        // drain raises readiness again.
        if let Some(Ok(mut guard)) = ready {
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
/// How many rings of their own the calling thread has.
pub(super) fn thread_ring_count() -> usize {
    LOCAL_RINGS.with(|rings| {
        rings
            .borrow()
            .as_ref()
            .map_or(0, |m| m.values().filter(|r| r.is_some()).count())
    })
}
