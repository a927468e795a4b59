// TEMPORARY compile placeholder until the NBD server lands (being written now).
use std::future::Future;
use std::sync::Arc;
use crate::target::TargetRegistry;
pub struct NbdServer<R: TargetRegistry> { _r: Arc<R> }
impl<R: TargetRegistry> NbdServer<R> {
    pub fn new(registry: Arc<R>) -> Self { NbdServer { _r: registry } }
    pub async fn serve(self: Arc<Self>, _l: tokio::net::TcpListener, shutdown: impl Future<Output=()> + Send) -> std::io::Result<()> { shutdown.await; Ok(()) }
}
