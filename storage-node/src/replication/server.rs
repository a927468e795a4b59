//! The replication endpoint of a storage node: volume targets on other nodes
//! reach this node's replicas here.
//!
//! A connection starts with `Hello` naming the volume; after that every
//! request is answered by the replica, many at once, replies in completion
//! order. A malformed frame closes that connection only.

use std::sync::Arc;

use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::replica::Replicas;
use super::wire::{self, Op, Reply, Status};

/// Requests one connection may have in progress; past it, reading waits.
const MAX_IN_FLIGHT: usize = 512;

/// Accepts target connections until `shutdown`. Each connection runs wholly
/// on one of `runtimes` (round robin; the caller's runtime when empty): with
/// single-threaded runtimes whose threads have io_uring rings of their own,
/// a request is read, written to the pool and answered on one thread, with
/// no hop to another thread and back.
pub async fn serve(
    listener: TcpListener,
    replicas: Arc<Replicas>,
    runtimes: Vec<tokio::runtime::Handle>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let replicas = replicas.clone();
                    let serve = move |stream: TcpStream| async move {
                        if let Err(err) = connection(stream, replicas).await {
                            tracing::warn!(%peer, %err, "replication connection closed");
                        }
                    };
                    if runtimes.is_empty() {
                        tokio::spawn(serve(stream));
                        continue;
                    }
                    let runtime = &runtimes[next % runtimes.len()];
                    next += 1;
                    match crate::runtime::move_stream(stream, runtime) {
                        Ok(stream) => {
                            runtime.spawn(serve(stream));
                        }
                        Err(err) => tracing::warn!(%peer, %err, "cannot move a replication connection to its runtime"),
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "accepting a replication connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn connection(stream: TcpStream, replicas: Arc<Replicas>) -> Result<(), wire::FrameError> {
    stream.set_nodelay(true)?;
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::with_capacity(256 << 10, read_half);

    let Some(hello) = wire::read_request(&mut reader).await? else {
        return Ok(());
    };
    let volume = String::from_utf8_lossy(&hello.payload).into_owned();
    let replica = match (hello.op, replicas.get(&volume)) {
        (Op::Hello, Some(replica)) => replica,
        (op, found) => {
            let (status, message) = if op != Op::Hello {
                (
                    Status::Invalid,
                    "the first request must be Hello".to_string(),
                )
            } else {
                debug_assert!(found.is_none());
                (
                    Status::NotFound,
                    format!("no replica of volume {volume:?} here"),
                )
            };
            let mut out = Vec::new();
            wire::encode_reply(
                &Reply {
                    status,
                    id: hello.id,
                    payload: message.into(),
                },
                &mut out,
            );
            wire::write_frames(&mut write_half, &out).await?;
            return Ok(());
        }
    };
    let mut out = Vec::new();
    wire::encode_reply(&replica.handle(hello).await, &mut out);
    wire::write_frames(&mut write_half, &out).await?;

    // Replies go through one writer task that sends whatever is ready in one
    // vectored write, so a burst of small replies costs one system call and
    // a read's data is not copied on its way out.
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        let mut batch = wire::ReplyBatch::default();
        while let Some(reply) = reply_rx.recv().await {
            batch.push(&reply);
            while batch.len() < (1 << 20) {
                match reply_rx.try_recv() {
                    Ok(reply) => batch.push(&reply),
                    Err(_) => break,
                }
            }
            if wire::write_parts(&mut write_half, &batch.take())
                .await
                .is_err()
            {
                return;
            }
        }
    });

    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        // A write's payload goes straight into the pool's engine memory.
        let buffer = |op, len| (op == Op::Write).then(|| replicas.pool().write_buffer(len));
        let request = match wire::read_request_with(&mut reader, buffer).await {
            Ok(Some(request)) => request,
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let replica = replica.clone();
        let reply_tx = reply_tx.clone();
        tokio::spawn(async move {
            let reply = replica.handle(request).await;
            let _ = reply_tx.send(reply);
            drop(permit);
        });
    };
    drop(reply_tx);
    // Requests still running finish and their replies are sent before the
    // writer ends, unless the peer is gone.
    let _ = writer.await;
    result
}
