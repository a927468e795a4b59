//! Serving the CSI services over a unix socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_proto::csi::controller_server::ControllerServer;
use strata_proto::csi::identity_server::IdentityServer;
use strata_proto::csi::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::backend::VolumeBackend;
use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::{NodeConfig, NodeService};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?} must be unix:///absolute/path.sock")]
    BadEndpoint(String),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node state: {0}")]
    State(std::io::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of a `unix:///path` endpoint (a bare absolute path also works).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(ServeError::BadEndpoint(endpoint.to_string()))
    }
}

/// Binds the socket, replacing one left by an earlier run of the plugin.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let socket_error = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(socket_error)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(socket_error(e)),
        _ => {}
    }
    UnixListener::bind(path).map_err(socket_error)
}

pub struct Services {
    pub controller: Option<Arc<dyn VolumeBackend>>,
    pub node: Option<NodeConfig>,
}

pub async fn serve(
    listener: UnixListener,
    services: Services,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let identity = IdentityService {
        controller: services.controller.is_some(),
    };
    let controller = services
        .controller
        .map(|backend| ControllerServer::new(ControllerService::new(backend)));
    let node = services
        .node
        .map(NodeService::new)
        .transpose()
        .map_err(ServeError::State)?
        .map(NodeServer::new);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
