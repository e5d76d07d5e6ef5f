//! Starting and stopping a node.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::Duration;

use prometheus_client::registry::Registry;
use sampo_consensus::{Behaviour, Consensus, ReputationParams, RoundParams};
use sampo_p2p::P2pConfig;
use sampo_storage::Store;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::api::{ApiPolicy, ApiState, ModelInfo, NodeInfo};
use crate::config::Config;
use crate::executor::{Executor, ExecutorConfig};
use crate::keys;
use crate::metrics::NodeMetrics;
use crate::models::{LoadedModel, Models};
use crate::runtime::{self, LocalRuns, LoopParts, Runtime, TaskBoard};

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
    #[error("{0}")]
    Config(String),
    #[error("model: {0}")]
    Model(String),
    #[error("p2p: {0}")]
    P2p(String),
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

/// Flags that are not config keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Accept a `[testing] behaviour` other than honest.
    pub allow_faults: bool,
}

fn p2p_config(cfg: &Config, key: &sampo_consensus::NodeKey) -> Result<P2pConfig, NodeError> {
    let (admission_keys, certificate) =
        crate::admission::from_config(cfg, &key.peer_id(), runtime::now_ms()).map_err(NodeError::Config)?;
    let parse = |key: &'static str, v: &[String]| -> Result<Vec<sampo_p2p::Multiaddr>, NodeError> {
        v.iter()
            .map(|a| a.parse().map_err(|e| NodeError::Config(format!("{key}: `{a}` is not a multiaddr: {e}"))))
            .collect()
    };
    Ok(P2pConfig {
        listen: parse("network.listen", &cfg.network.listen)?,
        bootstrap: parse("network.bootstrap", &cfg.network.bootstrap)?,
        max_connections: cfg.network.max_connections,
        target_connections: cfg.network.target_connections,
        max_connections_per_ip: cfg.network.max_connections_per_ip,
        reserved_outbound: cfg.network.reserved_outbound,
        allow_private_addresses: cfg.network.allow_private_addresses,
        announce_interval: Duration::from_secs(cfg.network.announce_interval_secs),
        discovery_interval: Duration::from_secs(cfg.network.announce_interval_secs.clamp(1, 10)),
        // The node judges every protocol message before it is forwarded.
        node_validates: true,
        admission_keys,
        certificate,
        // Validated with the config.
        colocation_whitelist: cfg.network.colocation_whitelist.iter().filter_map(|ip| ip.parse().ok()).collect(),
        ..P2pConfig::default()
    })
}

/// Run a node until `shutdown` resolves, then drain and flush.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
    run_with(cfg, RunOptions::default(), shutdown).await
}

pub async fn run_with(
    cfg: Config,
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    if cfg.testing.flood_per_second > 0 && !opts.allow_faults {
        return Err(NodeError::Config(
            "testing.flood_per_second makes this node flood the network; start with --unsafe-allow-faults if that is what you want".into(),
        ));
    }
    if cfg.testing.behaviour != Behaviour::Honest && !opts.allow_faults {
        return Err(NodeError::Config(format!(
            "testing.behaviour = {:?} makes this node misbehave on purpose; start with --unsafe-allow-faults if that is what you want",
            cfg.testing.behaviour
        )));
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?;
    let (key, created) = keys::load_or_create(&cfg.key_path())?;
    if created {
        info!(path = %cfg.key_path().display(), "created a new node key");
    }
    let peer_id = key.peer_id();
    let store = Arc::new(Store::open(&cfg.db_path())?);
    info!(path = %store.path().display(), schema = sampo_storage::SCHEMA_VERSION, "database open");

    // Models first: the backend's self-test runs on each of them.
    let mut loaded = Vec::new();
    for (i, m) in cfg.models.iter().enumerate() {
        let model = sampo_kernels::Model::load(&m.path)
            .map_err(|e| NodeError::Model(format!("models[{i}] ({}): {e}", m.path.display())))?;
        let budget = usize::try_from(cfg.execution.prepared_weights_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        model.set_prepared_budget(budget);
        loaded.push(Arc::new(model));
    }
    let chosen = crate::backend::choose(
        cfg.execution.backend,
        cfg.execution.threads,
        cfg.execution.nvrtc.clone(),
        Some(cfg.data_dir.join("ptx-cache")),
        &loaded,
    )
    .map_err(NodeError::Config)?;
    let device = chosen.backend.device();
    let mut models = Vec::new();
    for (model, m) in loaded.into_iter().zip(&cfg.models) {
        let lm = LoadedModel::new(model, m.name.clone(), m.price_per_1k_tokens, chosen.backend.clone());
        info!(name = %lm.name, id = %lm.id, backend = chosen.kind, "model loaded");
        models.push(Arc::new(lm));
    }
    let models = Models(models);
    // Whatever the backend builds lazily per model (the CPU's prepared weight rows) is
    // made now, beside the start-up, not during the first request.
    for m in &models.0 {
        let engine = m.engine.clone();
        tokio::task::spawn_blocking(move || engine.backend().warm(&engine.model));
    }

    let listener = tokio::net::TcpListener::bind(cfg.api.listen).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            NodeError::AddrInUse { addr: cfg.api.listen }
        } else {
            NodeError::Bind { addr: cfg.api.listen, source }
        }
    })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Bind { addr: cfg.api.listen, source })?;
    let api_url = format!("http://{addr}");

    let mut registry = Registry::default();
    let metrics = Arc::new(NodeMetrics::register(&mut registry));
    let (p2p, p2p_events) = sampo_p2p::spawn(key.clone(), p2p_config(&cfg, &key)?, &mut registry)
        .await
        .map_err(|e| NodeError::P2p(e.to_string()))?;
    let registry = Arc::new(std::sync::Mutex::new(registry));

    let executor = Executor::start(ExecutorConfig {
        max_concurrent: cfg.execution.max_concurrent,
        queue_capacity: cfg.execution.queue_capacity,
        stream_timeout: Duration::from_millis(cfg.execution.stream_write_timeout_ms),
        prefill_chunk: cfg.execution.prefill_chunk_tokens,
        prefix_cache_bytes: usize::try_from(cfg.execution.prefix_cache_mib.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
    })
    .map_err(|e| NodeError::Model(format!("starting inference threads: {e}")))?;
    let c = &cfg.consensus;
    let round_params = RoundParams {
        commit_window_ms: c.commit_timeout_ms,
        reveal_window_ms: c.reveal_timeout_ms,
        ..RoundParams::default()
    };
    let reputation = ReputationParams {
        half_life_ms: c.reputation_half_life_secs.saturating_mul(1000),
        ban_threshold: c.ban_threshold,
        ban_ms: c.ban_duration_secs.saturating_mul(1000),
        probation_weight: c.probation_weight,
        probation_rounds: c.probation_rounds,
        ..ReputationParams::default()
    };
    let trust = Arc::new(crate::trust::Trust {
        params: reputation.clone(),
        // Validated with the config.
        // A node counts itself as established: its own seat in its own rounds is its
        // own business (its agreements there still vouch for nobody).
        trusted: c.trusted_peers.iter().filter_map(|p| p.parse().ok()).chain([peer_id]).collect(),
        closed: !cfg.network.admission_keys.is_empty(),
        whitelist: cfg.network.colocation_whitelist.iter().filter_map(|ip| ip.parse().ok()).collect(),
    });
    if cfg.testing.behaviour != Behaviour::Honest {
        warn!(behaviour = ?cfg.testing.behaviour, "THIS NODE MISBEHAVES ON PURPOSE (testing)");
    }
    let accomplices = cfg
        .testing
        .accomplices
        .iter()
        .map(|s| {
            s.parse::<sampo_consensus::PeerId>()
                .map_err(|_| NodeError::Config(format!("testing.accomplices: {s:?} is not a peer id")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let consensus =
        Consensus::new(key.clone(), round_params).with_behaviour(cfg.testing.behaviour).with_accomplices(accomplices);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (stop_tx, stop_rx) = watch::channel(false);
    let board = Arc::new(TaskBoard::default());
    let local_runs = Arc::new(LocalRuns::default());
    let announcement = runtime::announcement(&models, chosen.kind, &device, &api_url);
    let event_loop = tokio::spawn(
        runtime::run(LoopParts {
            consensus,
            p2p: p2p.clone(),
            p2p_events,
            commands: cmd_rx,
            self_tx: cmd_tx.clone(),
            executor: executor.clone(),
            models: models.clone(),
            store: store.clone(),
            board: board.clone(),
            local_runs: local_runs.clone(),
            metrics: metrics.clone(),
            reputation: reputation.clone(),
            trust: trust.clone(),
            announcement,
            announce_interval: Duration::from_secs(cfg.network.announce_interval_secs),
            max_tokens_per_task: cfg.execution.max_tokens_per_task,
            audit_rate: c.audit_rate,
            replay_budget: crate::audit::ReplayBudget::new(c.replays_per_minute),
            pending_proofs: crate::audit::PendingProofs::default(),
            replays_in_flight: std::collections::HashSet::new(),
            apply_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            started_ms: crate::runtime::now_ms(),
            busy_announced_ms: 0,
            left_out_seen: std::collections::HashMap::new(),
            shutdown: stop_rx.clone(),
        })
        .instrument(info_span!("event-loop")),
    );
    if cfg.testing.flood_per_second > 0 {
        warn!(per_second = cfg.testing.flood_per_second, "THIS NODE FLOODS THE NETWORK ON PURPOSE (testing)");
        tokio::spawn(
            runtime::flood_loop(p2p.clone(), key.clone(), cfg.testing.flood_per_second, stop_rx.clone())
                .instrument(info_span!("flood")),
        );
    }
    // A task the API gave up on (verdict_timeout) gets its hold back once a verdict
    // can no longer be on its way.
    let verdict_timeout =
        Duration::from_millis((c.commit_timeout_ms + c.reveal_timeout_ms) * (u64::from(c.max_escalations) + 2) + 5_000);
    tokio::spawn(
        runtime::hold_sweep_loop(
            store.clone(),
            verdict_timeout * 2,
            Duration::from_secs(60),
            metrics.clone(),
            stop_rx.clone(),
        )
        .instrument(info_span!("hold-sweep")),
    );
    let retention = sampo_storage::Retention {
        max_age_ms: cfg.storage.retention_days.saturating_mul(24 * 3600 * 1000),
        max_evidence_bytes: cfg.storage.max_evidence_mb.saturating_mul(1 << 20),
    };
    tokio::spawn(
        runtime::prune_loop(
            store.clone(),
            retention,
            reputation.clone(),
            Duration::from_secs(cfg.storage.prune_interval_secs),
            metrics.clone(),
            stop_rx,
        )
        .instrument(info_span!("retention")),
    );

    let policy = ApiPolicy {
        api_keys: cfg.api.api_keys.clone(),
        admin_keys: cfg.api.admin_keys.clone(),
        allow_ips: cfg.api.allow_ips.iter().filter_map(|s| crate::config::parse_ip_range(s)).collect(),
        rate_limit_per_minute: cfg.api.rate_limit_per_minute,
        max_body_bytes: cfg.api.max_body_bytes,
        default_k: c.k.min(255) as u8,
        max_escalations: c.max_escalations.min(8) as u8,
        max_tokens_per_task: cfg.execution.max_tokens_per_task,
        verdict_timeout,
    };
    let info = NodeInfo {
        peer_id: peer_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        api_url: api_url.clone(),
        listen: cfg.network.listen.clone(),
        models: models
            .0
            .iter()
            .map(|m| ModelInfo {
                name: m.name.clone(),
                id: m.id.to_string(),
                context_length: m.context_length(),
                price_per_1k_tokens: m.price_per_1k,
            })
            .collect(),
        backend: chosen.kind.into(),
        device,
        backend_reason: chosen.cpu_reason.clone(),
    };
    let mut state = ApiState::new(info, models, registry, metrics, policy);
    state.runtime = Some(Runtime { tx: cmd_tx, board, local_runs });
    state.store = Some(store.clone());
    state.p2p = Some(p2p.clone());
    state.executor = Some(executor.clone());
    state.reputation = reputation;
    state.trust = trust;
    let state = Arc::new(state);
    let app = crate::api::router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
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
    info!("shutting down: draining inference, stopping the mesh, flushing storage");
    let ex = executor.clone();
    let _ = tokio::task::spawn_blocking(move || ex.shutdown(DRAIN_TIMEOUT)).await;
    let _ = stop_tx.send(true);
    let _ = event_loop.await;
    p2p.shutdown().await;
    store.flush()?;
    let _ = std::fs::remove_file(cfg.data_dir.join(RUN_INFO_FILE));
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NodeError::Serve(e)),
        Err(join) => Err(NodeError::Serve(std::io::Error::other(join.to_string()))),
    }
}

/// How long in-flight inferences may run on after a shutdown request.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

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
