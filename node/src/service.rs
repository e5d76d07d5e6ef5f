//! Starting and stopping a node.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sampo_storage::Store;
use tracing::{Instrument, info, info_span, warn};

use crate::api::{ApiState, NodeInfo};
use crate::config::Config;
use crate::keys;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("opening the database: {0}")]
    Storage(#[from] sampo_storage::StorageError),
    #[error("API address {addr} is already in use; choose another with `api.listen` in the config or --api-listen")]
    AddrInUse { addr: std::net::SocketAddr },
    #[error("binding the API on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("creating data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("API server: {0}")]
    Serve(std::io::Error),
}

/// What a started node writes to `<data_dir>/node.json`, so tools (the testnet) can
/// find a node that bound port 0.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub peer_id: String,
    pub api_url: String,
    pub pid: u32,
}

pub const RUN_INFO_FILE: &str = "node.json";

/// Run a node until `shutdown` resolves, then drain and flush.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?;
    let (key, created) = keys::load_or_create(&cfg.key_path())?;
    if created {
        info!(path = %cfg.key_path().display(), "created a new node key");
    }
    let peer_id = key.peer_id();
    let store = Store::open(&cfg.db_path())?;
    info!(path = %store.path().display(), schema = sampo_storage::SCHEMA_VERSION, "database open");

    let listener = tokio::net::TcpListener::bind(cfg.api.listen).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            NodeError::AddrInUse { addr: cfg.api.listen }
        } else {
            NodeError::Bind { addr: cfg.api.listen, source }
        }
    })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Bind { addr: cfg.api.listen, source })?;
    let api_url = format!("http://{addr}");
    let state = Arc::new(ApiState {
        info: NodeInfo {
            peer_id: peer_id.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            api_url: api_url.clone(),
            data_dir: cfg.data_dir.display().to_string(),
            listen: cfg.network.listen.clone(),
            models: cfg.models.iter().map(|m| m.path.display().to_string()).collect(),
            backend: "cpu".into(),
        },
        ready: AtomicBool::new(false),
    });
    let app = crate::api::router(state.clone());
    // Tasks are named through their tracing span (tokio's task names need tokio_unstable).
    let server = tokio::spawn(
        async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await }
            .instrument(info_span!("api-server")),
    );

    let run_info = RunInfo { peer_id: peer_id.to_string(), api_url: api_url.clone(), pid: std::process::id() };
    if let Ok(json) = serde_json::to_vec_pretty(&run_info)
        && let Err(e) = std::fs::write(cfg.data_dir.join(RUN_INFO_FILE), json)
    {
        warn!(error = %e, "could not write node.json");
    }
    state.ready.store(true, Ordering::Release);
    info!(%peer_id, api = %api_url, "node ready");

    let served = server.await;
    state.ready.store(false, Ordering::Release);
    info!("shutting down: flushing storage");
    store.flush()?;
    let _ = std::fs::remove_file(cfg.data_dir.join(RUN_INFO_FILE));
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NodeError::Serve(e)),
        Err(join) => Err(NodeError::Serve(std::io::Error::other(join.to_string()))),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    info!("shutdown requested");
}
