//! The stable local addresses of a database: a TCP proxy per address that
//! forwards each new connection to one of its current backends (the primary
//! for the read-write address, the ready replicas in turn for the read-only
//! one). The controller changes the backends as roles change; connections to
//! a backend that left the set are closed, so a client never keeps writing to
//! a former primary. With no backend, new connections are closed at once and
//! the client retries — as with a Kubernetes Service without endpoints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The backends of one proxy; dropping it stops the proxy and its connections.
pub struct Proxy {
    backends: watch::Sender<Vec<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (bound now, so a taken port is an error at once).
    pub async fn start(listen: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let (backends, watch) = watch::channel(Vec::new());
        let task = tokio::spawn(accept_loop(listener, watch));
        Ok(Proxy { backends, task })
    }

    /// Sets where new connections go; closes connections to backends no longer listed.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        self.backends.send_if_modified(|current| {
            if *current == backends {
                return false;
            }
            *current = backends;
            true
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, backends: watch::Receiver<Vec<SocketAddr>>) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors and the like: let the moment pass.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let current = backends.borrow().clone();
        if current.is_empty() {
            continue; // dropping `client` closes it
        }
        let backend = current[next.fetch_add(1, Ordering::Relaxed) % current.len()];
        // The JoinSet aborts every connection when the proxy stops.
        connections.spawn(forward(client, backend, backends.clone()));
    }
}

/// Copies both ways until either side closes or `backend` leaves the set.
async fn forward(
    mut client: TcpStream,
    backend: SocketAddr,
    mut backends: watch::Receiver<Vec<SocketAddr>>,
) {
    let Ok(mut server) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let still_listed = async {
        loop {
            if backends.changed().await.is_err() {
                return;
            }
            if !backends.borrow().contains(&backend) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = still_listed => {}
    }
}
