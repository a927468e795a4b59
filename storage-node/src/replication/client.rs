//! The target's side of a replication connection: many requests in flight on
//! one TCP connection, replies matched to requests by id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::wire::{self, ExpectedReplica, Reply, Request, Status};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection lost: {0}")]
    Closed(String),
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("{0}")]
    Refused(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

pub struct ReplicaClient {
    address: String,
    frames: mpsc::UnboundedSender<Vec<Bytes>>,
    pending: Pending,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    incarnation: Option<u64>,
}

impl ReplicaClient {
    /// Connects to the replication endpoint at `address` and says Hello for
    /// `volume`; with `expected`, a replica other than that one refuses
    /// (`LinkError::Refused`). The tasks that send and receive the link's
    /// frames run on `runtime` when given, else on the caller's runtime.
    pub async fn connect(
        address: &str,
        volume: &str,
        expected: Option<ExpectedReplica>,
        timeout: Duration,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> Result<ReplicaClient, LinkError> {
        let connect_error = |reason: String| LinkError::Connect {
            address: address.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| connect_error(format!("no answer within {timeout:?}")))?
            .map_err(|err| connect_error(err.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|err| connect_error(err.to_string()))?;
        let stream = match runtime {
            Some(runtime) => crate::runtime::move_stream(stream, runtime)
                .map_err(|err| connect_error(err.to_string()))?,
            None => stream,
        };
        let spawn =
            |task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| match runtime {
                Some(runtime) => runtime.spawn(task),
                None => tokio::spawn(task),
            };
        let (read_half, mut write_half) = stream.into_split();
        let mut reader = BufReader::with_capacity(256 << 10, read_half);

        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let (frames, mut frames_rx) = mpsc::unbounded_channel::<Vec<Bytes>>();

        // Hello is answered before anything else is sent.
        let hello = Request::hello(volume, expected);
        let mut out = Vec::new();
        wire::encode_request(&hello, &mut out);
        let answer = tokio::time::timeout(timeout, async {
            wire::write_frames(&mut write_half, &out).await?;
            wire::read_reply(&mut reader).await
        })
        .await
        .map_err(|_| connect_error(format!("no answer within {timeout:?}")))?
        .map_err(|err| connect_error(err.to_string()))?;
        let incarnation = match answer {
            Some(reply) if reply.status == Status::Ok => {
                // Older nodes answer Hello with nothing.
                <[u8; 8]>::try_from(&reply.payload[..])
                    .ok()
                    .map(u64::from_le_bytes)
            }
            Some(reply) => {
                return Err(LinkError::Refused(
                    String::from_utf8_lossy(&reply.payload).into_owned(),
                ))
            }
            None => return Err(connect_error("closed during hello".into())),
        };

        let writer_alive = alive.clone();
        spawn(Box::pin(async move {
            // Whatever is queued goes out in one vectored write, up to 1 MiB
            // or 512 pieces; payloads are not copied together first.
            let mut batch: Vec<Bytes> = Vec::with_capacity(64);
            while let Some(parts) = frames_rx.recv().await {
                batch.clear();
                let mut bytes: usize = parts.iter().map(Bytes::len).sum();
                batch.extend(parts);
                while bytes < (1 << 20) && batch.len() < 512 {
                    match frames_rx.try_recv() {
                        Ok(parts) => {
                            bytes += parts.iter().map(Bytes::len).sum::<usize>();
                            batch.extend(parts);
                        }
                        Err(_) => break,
                    }
                }
                if wire::write_parts(&mut write_half, &batch).await.is_err() {
                    break;
                }
            }
            writer_alive.store(false, Ordering::Release);
        }));

        let reader_pending = pending.clone();
        let reader_alive = alive.clone();
        let peer = address.to_string();
        spawn(Box::pin(async move {
            loop {
                match wire::read_reply(&mut reader).await {
                    Ok(Some(reply)) => {
                        let waiter = reader_pending
                            .lock()
                            .expect("pending lock")
                            .remove(&reply.id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(reply);
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        tracing::warn!(%peer, %err, "replication connection broken");
                        break;
                    }
                }
            }
            reader_alive.store(false, Ordering::Release);
            // Dropping the waiters fails every request still in flight.
            reader_pending.lock().expect("pending lock").clear();
        }));

        Ok(ReplicaClient {
            address: address.to_string(),
            frames,
            pending,
            next_id: AtomicU64::new(1),
            alive,
            incarnation,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The replica's incarnation from its Hello reply: it changes when the
    /// replica's process restarts.
    pub fn incarnation(&self) -> Option<u64> {
        self.incarnation
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Sends `request` (its id is replaced) and waits for the reply.
    pub async fn call(&self, mut request: Request, timeout: Duration) -> Result<Reply, LinkError> {
        if !self.is_alive() {
            return Err(LinkError::Closed("connection is down".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request.id = id;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        // Whatever ends this call (a reply, an error, a timeout, or the
        // caller dropping it), its waiter does not stay behind.
        let _waiter = PendingGuard {
            pending: &self.pending,
            id,
        };
        if self.frames.send(wire::request_parts(&request)).is_err() {
            return Err(LinkError::Closed("connection is down".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(LinkError::Closed("connection lost".into())),
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }
}

/// Removes a call's waiter from the pending map when the call ends.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().expect("pending lock").remove(&self.id);
    }
}
