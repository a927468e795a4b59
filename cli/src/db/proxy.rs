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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers every connection with its own name, then echoes.
    async fn named_backend(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = stream.write_all(name.as_bytes()).await;
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    async fn greeting(stream: &mut TcpStream) -> String {
        let mut buf = [0u8; 1];
        stream.read_exact(&mut buf).await.unwrap();
        String::from_utf8(buf.to_vec()).unwrap()
    }

    /// Reads until EOF or error: true when the proxy closed the connection.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[tokio::test]
    async fn connections_follow_the_backend_and_leave_a_replaced_one() {
        let (a, b) = (named_backend("a").await, named_backend("b").await);
        let listen = free_addr().await;
        let proxy = Proxy::start(listen).await.unwrap();

        // No backend: a connection is closed at once.
        let mut none = TcpStream::connect(listen).await.unwrap();
        assert!(closed(&mut none).await);

        proxy.set_backends(vec![a]);
        let mut to_a = TcpStream::connect(listen).await.unwrap();
        assert_eq!(greeting(&mut to_a).await, "a");
        to_a.write_all(b"xyz").await.unwrap();
        let mut echo = [0u8; 3];
        to_a.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"xyz");

        // The primary moves: the old connection is cut, new ones reach b.
        proxy.set_backends(vec![b]);
        assert!(closed(&mut to_a).await);
        let mut to_b = TcpStream::connect(listen).await.unwrap();
        assert_eq!(greeting(&mut to_b).await, "b");

        // Read-only address: new connections take the backends in turn,
        // and a connection to a backend that stays listed is kept.
        proxy.set_backends(vec![b, a]);
        let mut names = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(listen).await.unwrap();
            names.push(greeting(&mut c).await);
        }
        names.sort();
        assert_eq!(names, ["a", "b"]);
        to_b.write_all(b"k").await.unwrap();
        let mut one = [0u8; 1];
        to_b.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"k");
    }
}
