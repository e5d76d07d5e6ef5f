//! The node's HTTP API (axum): OpenAI-compatible completions with SSE streaming, the
//! task API, node and peer views, health, readiness and metrics. Every error is an
//! OpenAI-style JSON body with a 4xx/5xx status.

// Handlers' early exits are ready `Response`s; boxing them buys nothing on the error path.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::Stream;
use prometheus_client::registry::Registry;
use sampo_consensus::{ChatMessage, EvidenceBundle, Hash32, Prompt, RoundError, SamplingParams, TaskId, TaskSpec};
use sampo_p2p::P2pHandle;
use sampo_storage::Store;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::executor::{Executor, Job, SubmitError, TokenPiece};
use crate::metrics::{ApiLabels, NodeMetrics};
use crate::models::{LoadedModel, Models};
use crate::runtime::{Runtime, SubmitTaskError, TaskState, now_ms};

/// What the API handlers share.
pub struct ApiState {
    pub info: NodeInfo,
    pub ready: AtomicBool,
    pub runtime: Option<Runtime>,
    pub models: Models,
    pub store: Option<Arc<Store>>,
    pub p2p: Option<P2pHandle>,
    pub executor: Option<Executor>,
    pub registry: Arc<Mutex<Registry>>,
    pub metrics: Arc<NodeMetrics>,
    pub policy: ApiPolicy,
    pub reputation: sampo_consensus::ReputationParams,
    pub trust: Arc<crate::trust::Trust>,
    rate: Mutex<HashMap<String, (u64, u32)>>,
}

/// Access control and task defaults.
#[derive(Debug, Clone, Default)]
pub struct ApiPolicy {
    pub api_keys: Vec<String>,
    /// Keys that may also credit accounts (`POST /v1/accounts/{name}/deposit`).
    pub admin_keys: Vec<String>,
    pub allow_ips: Vec<(IpAddr, u8)>,
    pub rate_limit_per_minute: u32,
    pub max_body_bytes: usize,
    pub default_k: u8,
    pub max_escalations: u8,
    pub max_tokens_per_task: u32,
    /// How long a request waits for its verdict.
    pub verdict_timeout: Duration,
}

impl ApiState {
    pub fn new(
        info: NodeInfo,
        models: Models,
        registry: Arc<Mutex<Registry>>,
        metrics: Arc<NodeMetrics>,
        policy: ApiPolicy,
    ) -> Self {
        Self {
            info,
            ready: AtomicBool::new(false),
            runtime: None,
            models,
            store: None,
            p2p: None,
            executor: None,
            registry,
            metrics,
            policy,
            reputation: Default::default(),
            trust: Default::default(),
            rate: Mutex::new(HashMap::new()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub peer_id: String,
    pub version: &'static str,
    pub api_url: String,
    pub listen: Vec<String>,
    pub models: Vec<ModelInfo>,
    pub backend: String,
    pub device: String,
    /// Why the node serves on the CPU when it was allowed a GPU (`backend = "auto"`).
    pub backend_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub id: String,
    pub context_length: usize,
    pub price_per_1k_tokens: u64,
}

pub fn router(state: Arc<ApiState>) -> axum::Router {
    let limit = state.policy.max_body_bytes.max(1024);
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(node_info))
        .route("/v1/peers", get(peers))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/evidence", get(get_evidence))
        .route("/v1/account", get(account))
        .route("/v1/accounts/{name}/deposit", post(deposit))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), gatekeeper))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// An OpenAI-style JSON error body.
pub fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": kind, "code": status.as_u16()}}))).into_response()
}

fn too_many(message: &str, retry_after_secs: u64) -> Response {
    let mut r = error_response(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn ip_allowed(ip: IpAddr, allow: &[(IpAddr, u8)]) -> bool {
    if allow.is_empty() {
        return true;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allow.iter().any(|(net, bits)| match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if *bits == 0 { 0 } else { u32::MAX << (32 - *bits as u32) };
            u32::from(a) & mask == u32::from(*n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if *bits == 0 { 0 } else { u128::MAX << (128 - *bits as u32) };
            u128::from(a) & mask == u128::from(*n) & mask
        }
        _ => false,
    })
}

/// IP allowlist, bearer keys and per-key rate limits; counts every request by route
/// and status.
async fn gatekeeper(State(s): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "other".into());
    let caller = bearer(&req)
        .filter(|k| !s.policy.api_keys.is_empty() && key_matches(&s.policy.api_keys, k))
        .map_or_else(|| LOCAL_ACCOUNT.to_owned(), account_of_key);
    req.extensions_mut().insert(Caller(caller));
    let response = match check_access(&s, &req, &route) {
        Some(r) => r,
        None => next.run(req).await,
    };
    s.metrics.api_requests.get_or_create(&ApiLabels { route, status: response.status().as_u16() }).inc();
    response
}

fn check_access(s: &ApiState, req: &Request, route: &str) -> Option<Response> {
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if let Some(ip) = ip
        && !ip_allowed(ip, &s.policy.allow_ips)
    {
        return Some(error_response(StatusCode::FORBIDDEN, "permission_error", "this address may not use the API"));
    }
    // Probes and scrapes stay open to allowed addresses.
    if matches!(route, "/health" | "/ready" | "/metrics") {
        return None;
    }
    let mut who = ip.map(|i| i.to_string()).unwrap_or_default();
    if !s.policy.api_keys.is_empty() || !s.policy.admin_keys.is_empty() {
        match bearer(req) {
            Some(k) if key_matches(&s.policy.api_keys, k) || key_matches(&s.policy.admin_keys, k) => who = k.to_owned(),
            _ => {
                return Some(error_response(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "missing or unknown API key (send `Authorization: Bearer <key>`)",
                ));
            }
        }
    }
    let limit = s.policy.rate_limit_per_minute;
    if limit > 0 {
        let mut g = s.rate.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(why) = rate_check(&mut g, who, limit, now_ms()) {
            let wait = 60 - (now_ms() / 1000) % 60;
            return Some(too_many(why, wait));
        }
    }
    None
}

/// Count one request of `who` against `limit` per minute. The map holds at most
/// [`MAX_RATE_CLIENTS`] clients: when every slot is a client seen this minute, a
/// newcomer waits for the next minute.
pub fn rate_check(
    map: &mut std::collections::HashMap<String, (u64, u32)>,
    who: String,
    limit: u32,
    now_ms: u64,
) -> Result<(), &'static str> {
    let minute = now_ms / 60_000;
    if map.len() >= MAX_RATE_CLIENTS && !map.contains_key(&who) {
        map.retain(|_, (m, _)| *m == minute);
        if map.len() >= MAX_RATE_CLIENTS {
            return Err("too many distinct clients this minute");
        }
    }
    let e = map.entry(who).or_insert((minute, 0));
    if e.0 != minute {
        *e = (minute, 0);
    }
    if e.1 >= limit {
        return Err("rate limit per minute reached");
    }
    e.1 += 1;
    Ok(())
}

fn bearer(req: &Request) -> Option<&str> {
    bearer_of(req.headers())
}

fn bearer_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Distinct clients (keys or addresses) the rate limiter tracks per minute.
pub const MAX_RATE_CLIENTS: usize = 10_000;

/// Whether `given` is one of `keys`, in time independent of where they differ: each key
/// is compared through its blake3 hash (constant-time equality), all keys every time.
pub fn key_matches(keys: &[String], given: &str) -> bool {
    let g = blake3::hash(given.as_bytes());
    keys.iter().fold(false, |found, k| found | (blake3::hash(k.as_bytes()) == g))
}

/// A 500 that does not echo internal errors (paths, storage details) to the client.
fn internal_error(context: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "{context}");
    error_response(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error; see the node's log")
}

/// The caller's account: balance, what is held for running tasks, recent charges.
async fn account(State(s): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Response {
    let Some(store) = &s.store else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no store");
    };
    match store.client_account(&caller.0) {
        Ok(a) => {
            let a = a.unwrap_or_default();
            Json(json!({
                "account": caller.0,
                "local": caller.0 == LOCAL_ACCOUNT,
                "balance": a.balance,
                "held": a.held,
                "recent_charges": a.recent.iter().map(|c| json!({
                    "task": c.task.to_string(), "amount": c.amount, "kind": format!("{:?}", c.kind).to_lowercase(), "at_ms": c.at_ms,
                })).collect::<Vec<_>>(),
            }))
            .into_response()
        }
        Err(e) => internal_error("reading an account", &e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DepositRequest {
    amount: u64,
}

/// Credit an account (admin keys only): the one way credits enter the ledger.
async fn deposit(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    req_headers: axum::http::HeaderMap,
    body: Result<Json<DepositRequest>, JsonRejection>,
) -> Response {
    if s.policy.admin_keys.is_empty() || !bearer_of(&req_headers).is_some_and(|k| key_matches(&s.policy.admin_keys, k))
    {
        return error_response(
            StatusCode::FORBIDDEN,
            "permission_error",
            "depositing needs an admin key (api.admin_keys)",
        );
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(r) => return json_rejection(r),
    };
    let Some(store) = &s.store else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no store");
    };
    match store.deposit(&name, req.amount, now_ms()) {
        Ok(a) => {
            s.metrics.deposits.inc_by(req.amount);
            Json(json!({"account": name, "balance": a.balance, "held": a.held})).into_response()
        }
        Err(e @ (sampo_storage::LedgerError::Overflow | sampo_storage::LedgerError::BadAccountName)) => {
            bad_request(&e.to_string())
        }
        Err(e) => internal_error("depositing", &e),
    }
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(s): State<Arc<ApiState>>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false}))).into_response()
    }
}

/// OpenMetrics text rewritten in the classic Prometheus text format (0.0.4), for
/// clients that don't ask for OpenMetrics (promtool, curl): counters are named with
/// their `_total` suffix, info metrics become gauges, `# UNIT` and `# EOF` go.
pub fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(String, String)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name.to_owned(), text.to_owned()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" | "stateset" | "gaugehistogram" => (name.to_owned(), "untyped"),
                k => (name.to_owned(), k),
            };
            let text = help.take().filter(|(n, _)| name.starts_with(n.as_str())).map(|(_, t)| t).unwrap_or_default();
            let text = if text.is_empty() { "(no description)".to_owned() } else { text };
            out.push_str(&format!("# HELP {name} {text}\n# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

async fn metrics(State(s): State<Arc<ApiState>>, headers: axum::http::HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    s.metrics.observe_device(&s.info.backend, &s.info.device, device_status(&s).as_ref());
    let mut text = String::new();
    let encoded = {
        let reg = s.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &reg)
    };
    match encoded {
        Ok(()) if wants_openmetrics => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Ok(()) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], classic_text(&text)).into_response()
        }
        Err(e) => internal_error("encoding metrics", &e),
    }
}

/// The accelerator the models run on (None on the CPU); memory figures are live.
fn device_status(s: &ApiState) -> Option<sampo_kernels::DeviceStatus> {
    s.models.0.first().and_then(|m| m.engine.backend().device_status())
}

async fn node_info(State(s): State<Arc<ApiState>>) -> Response {
    let mut v = serde_json::to_value(&s.info).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("device_status".into(), json!(device_status(&s)));
        map.insert("admission".into(), json!(crate::admission::mode(s.p2p.as_ref())));
        let accounts = if s.policy.api_keys.is_empty() { "local" } else { "per_key" };
        map.insert("accounts".into(), json!(accounts));
    }
    if let (Some(p2p), Value::Object(map)) = (&s.p2p, &mut v) {
        let addrs: Vec<String> = p2p.listen_addrs().await.unwrap_or_default().iter().map(|a| a.to_string()).collect();
        map.insert("addresses".into(), json!(addrs));
        map.insert("connected_peers".into(), json!(p2p.connected_peers().await.map(|p| p.len()).unwrap_or(0)));
    }
    if let (Some(ex), Value::Object(map)) = (&s.executor, &mut v) {
        map.insert(
            "queue".into(),
            json!({
                "queued": ex.queued(),
                "running": ex.running(),
                "free_slots": ex.free_slots(),
                "cancelled": ex.cancelled(),
                "reused_prompt_tokens": ex.reused_prompt_tokens(),
            }),
        );
    }
    Json(v).into_response()
}

async fn peers(State(s): State<Arc<ApiState>>) -> Response {
    let Some(p2p) = &s.p2p else { return Json(json!({"peers": []})).into_response() };
    let now = now_ms();
    let live = p2p.live_nodes();
    // The gossip layer's view of each peer (negative: it sent messages the protocol
    // refused); `null` when not connected.
    let mut scores = Vec::with_capacity(live.len());
    for n in &live {
        scores.push(p2p.peer_score(n.peer).await.ok().flatten());
    }
    let mesh = p2p.mesh_peers(sampo_p2p::GossipTopic::Rounds).await.unwrap_or_default();
    let list: Vec<Value> = live
        .into_iter()
        .zip(scores)
        .map(|(n, gossip_score)| {
            let in_mesh = mesh.contains(&n.peer);
            let rep = s.store.as_ref().and_then(|st| st.reputation(&n.peer).ok().flatten()).unwrap_or_default();
            let credits = s.store.as_ref().and_then(|st| st.credits(&n.peer).ok()).unwrap_or_default();
            json!({
                "peer_id": n.peer.to_string(),
                "models": n.announcement.models.iter().map(|m| json!({"name": m.name, "id": m.id.to_string()})).collect::<Vec<_>>(),
                "price_per_1k_tokens": n.announcement.price_per_1k,
                "free_slots": n.announcement.free_slots,
                "backend": n.announcement.backend,
                "device": n.announcement.device,
                "version": n.announcement.version,
                "api_url": n.announcement.api_url,
                "addrs": n.announcement.addrs,
                "last_seen_ms_ago": now.saturating_sub(n.seen_ms),
                "ip": n.ip.map(|ip| ip.to_string()),
                "reputation": {
                    "score": rep.score_at(now, &s.reputation),
                    "weight": s.trust.weight(&n.peer, &rep, now),
                    "probation": !s.trust.established(&n.peer, &rep),
                    "trusted": s.trust.is_trusted(&n.peer),
                    "vouched": rep.vouched,
                    "agreed": rep.agreed, "wrong": rep.wrong, "absent": rep.absent,
                    "equivocations": rep.equivocations, "left_out": rep.left_out,
                    "banned": rep.is_banned(now),
                },
                "credits": credits.balance,
                "gossip_score": gossip_score,
                "in_rounds_mesh": in_mesh,
            })
        })
        .collect();
    Json(json!({"peers": list})).into_response()
}

async fn list_models(State(s): State<Arc<ApiState>>) -> Response {
    let data: Vec<Value> = s
        .models
        .0
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "sampo", "sampo": {"model_id": m.id.to_string(), "context_length": m.context_length()}}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "invalid_request_error", "no such route")
}

/// sampo's own request fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampoOptions {
    /// Committee size (replication).
    pub k: Option<u8>,
    /// Hold every token until the verdict.
    #[serde(default)]
    pub verified_only: bool,
    /// Highest price per 1k tokens a committee member may ask.
    pub max_price: Option<u64>,
    /// 64 hex digits of the client's own randomness: the committee's seed, so that not
    /// even the coordinator can choose who verifies the answer. Drawn by the node when
    /// absent.
    pub entropy: Option<String>,
}

/// The sampling fields every generation request shares.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationFields {
    pub max_tokens: Option<u32>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<u32>,
    pub sampo: Option<SampoOptions>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub generation: GenerationFields,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    #[serde(flatten)]
    pub generation: GenerationFields,
}

fn bad_request(msg: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, "invalid_request_error", msg)
}

fn json_rejection(r: JsonRejection) -> Response {
    let status = r.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_request_error" };
    error_response(status, kind, &r.body_text())
}

struct Prepared {
    model: Arc<LoadedModel>,
    spec: TaskSpec,
    prompt_tokens: Vec<u32>,
    options: SampoOptions,
}

/// The account a request is charged to: its bearer key's, or the node's local account
/// when the node has no API keys.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

/// The account name of a bearer key: a digest, so the key itself never shows.
pub fn account_of_key(key: &str) -> String {
    let h = blake3::hash(key.as_bytes());
    format!("key-{}", &h.to_hex()[..16])
}

fn prepare(s: &ApiState, model: &str, prompt: Prompt, generation: GenerationFields) -> Result<Prepared, Response> {
    let Some(m) = s.models.by_name(model).cloned() else {
        let known: Vec<&str> = s.models.0.iter().map(|m| m.name.as_str()).collect();
        return Err(error_response(
            StatusCode::NOT_FOUND,
            "model_not_found",
            &format!("model `{model}` is not served by this node (it serves: {})", known.join(", ")),
        ));
    };
    let GenerationFields {
        max_tokens, max_completion_tokens, temperature, top_p, top_k, seed, n, sampo: options, ..
    } = generation;
    if n.is_some_and(|n| n != 1) {
        return Err(bad_request("only n = 1 is supported"));
    }
    let options = options.unwrap_or_default();
    let max_tokens = max_completion_tokens.or(max_tokens).unwrap_or(s.policy.max_tokens_per_task.min(256));
    if max_tokens == 0 || max_tokens > s.policy.max_tokens_per_task {
        return Err(bad_request(&format!(
            "max_tokens {max_tokens} is outside 1..={} on this node",
            s.policy.max_tokens_per_task
        )));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(bad_request(&format!("temperature {temperature} is outside [0, 2]")));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request(&format!("top_p {top_p} is outside (0, 1]")));
    }
    let k = options.k.unwrap_or(s.policy.default_k);
    if k == 0 || k > 15 {
        return Err(bad_request(&format!("sampo.k {k} is outside 1..=15")));
    }
    // Bytes first: tokenizing costs CPU, so the cheap bound comes before it.
    if prompt.byte_len() > sampo_consensus::messages::MAX_PROMPT_BYTES {
        return Err(bad_request(&format!(
            "the prompt has {} bytes, more than the {} a task may carry",
            prompt.byte_len(),
            sampo_consensus::messages::MAX_PROMPT_BYTES
        )));
    }
    // A prompt too long for the context whatever its tokens: refused before the work.
    let ctx = m.context_length();
    let fewest = m.engine.tokenizer().min_tokens_for(prompt.byte_len());
    if fewest + max_tokens as usize > ctx {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            &format!(
                "this model's context is {ctx} tokens; the prompt needs at least {fewest} and max_tokens asks for {max_tokens}"
            ),
        ));
    }
    // Off the async workers (tokenizing a long prompt takes milliseconds).
    let tokenize = || m.prompt_tokens(&prompt);
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let prompt_tokens = if multi { tokio::task::block_in_place(tokenize) } else { tokenize() }
        .map_err(|e| bad_request(&format!("prompt: {e}")))?;
    if prompt_tokens.is_empty() {
        return Err(bad_request("the prompt is empty"));
    }
    if prompt_tokens.len() + max_tokens as usize > ctx {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            &format!(
                "this model's context is {ctx} tokens; the prompt has {} and max_tokens asks for {max_tokens}",
                prompt_tokens.len()
            ),
        ));
    }
    // This node's price for every seat, checked: a fee is bounded, and never above what
    // the client said it would pay per seat.
    if let Some(max) = options.max_price
        && m.price_per_1k > max
    {
        return Err(bad_request(&format!(
            "this node's price is {} per 1k tokens, above sampo.max_price {max}",
            m.price_per_1k
        )));
    }
    let fee = m
        .price_per_1k
        .checked_mul(u64::from(max_tokens))
        .map(|c| c.div_ceil(1000))
        .and_then(|c| c.checked_mul(u64::from(k)))
        .filter(|f| *f <= MAX_FEE)
        .ok_or_else(|| bad_request(&format!("the task's fee would exceed {MAX_FEE} credits")))?;
    let client_entropy = match options.entropy.as_deref() {
        None => rand::random(),
        Some(h) => {
            Hash32::from_hex(h).map(|h| h.0).ok_or_else(|| bad_request("sampo.entropy must be 64 hex digits"))?
        }
    };
    let spec = TaskSpec {
        coordinator: s.info.peer_id.parse().map_err(|_| bad_request("node identity unavailable"))?,
        nonce: rand::random(),
        created_ms: now_ms(),
        model: m.id,
        prompt,
        params: SamplingParams {
            temperature,
            top_k: top_k.unwrap_or(0),
            top_p,
            max_tokens,
            seed: seed.unwrap_or_else(rand::random),
            stop: Vec::new(),
        },
        k,
        max_escalations: s.policy.max_escalations,
        fee,
        client_entropy,
    };
    spec.validate().map_err(|e| bad_request(&e.to_string()))?;
    Ok(Prepared { model: m, spec, prompt_tokens, options })
}

/// The account a node without client accounts charges: topped up to this balance, so
/// local use never runs dry, and every credit still comes from a recorded deposit.
pub const LOCAL_ACCOUNT: &str = "local";
/// The largest fee one task may carry.
pub const MAX_FEE: u64 = 1 << 48;
const LOCAL_FLOAT: u64 = 1 << 50;

/// Hold a task's fee before it is announced: the members' pay comes out of it at the
/// verdict (and the rest back), a disputed task gets it all back.
fn hold_fee(store: &Store, metrics: &NodeMetrics, account: &str, spec: &TaskSpec) -> Result<(), Response> {
    let now = now_ms();
    let internal = |e: &dyn std::fmt::Display| internal_error("holding a fee", e);
    if account == LOCAL_ACCOUNT {
        let balance = store.client_account(LOCAL_ACCOUNT).map_err(|e| internal(&e))?.map_or(0, |a| a.balance);
        if balance < spec.fee.max(LOCAL_FLOAT / 2) {
            let top_up = LOCAL_FLOAT.saturating_sub(balance).max(spec.fee);
            store.deposit(LOCAL_ACCOUNT, top_up, now).map_err(|e| internal(&e))?;
            metrics.deposits.inc_by(top_up);
        }
    }
    // Durable with the task's verdict or refund (synced writes, before any settlement).
    match store.hold_with_next_sync(account, &spec.id(), spec.fee, now) {
        Ok(sampo_storage::LedgerOutcome::Done) => {
            metrics.fees_held.inc_by(spec.fee);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(sampo_storage::LedgerError::NoAccount(_)) => Err(error_response(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            &format!("the task's fee is {} credits; this account holds none yet", spec.fee),
        )),
        Err(sampo_storage::LedgerError::InsufficientBalance { balance, needed }) => Err(error_response(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            &format!("the task's fee is {needed} credits; the account holds {balance}"),
        )),
        Err(e) => Err(internal(&e)),
    }
}

async fn submit(s: &ApiState, p: &Prepared, caller: &Caller) -> Result<TaskId, Response> {
    let Some(rt) = &s.runtime else {
        return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the node is not running tasks"));
    };
    if let Some(store) = &s.store {
        // Database writes: off the async workers.
        let (store, metrics, account, spec) = (store.clone(), s.metrics.clone(), caller.0.clone(), p.spec.clone());
        tokio::task::spawn_blocking(move || hold_fee(&store, &metrics, &account, &spec))
            .await
            .map_err(|e| internal_error("holding a fee", &e))??;
    }
    let submitted = rt.submit(p.spec.clone(), p.options.max_price).await;
    if submitted.is_err()
        && let Some(store) = &s.store
    {
        // Never announced: the hold goes back at once.
        let _ = store.refund(&p.spec.id(), now_ms());
    }
    submitted.map_err(|e| match e {
        SubmitTaskError::Busy | SubmitTaskError::Round(RoundError::Busy(_)) => too_many(&e.to_string(), 1),
        SubmitTaskError::Round(RoundError::NoCommittee { .. }) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, "insufficient_nodes", &e.to_string())
        }
        other => error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", &other.to_string()),
    })
}

async fn wait_verdict(s: &ApiState, task: &TaskId) -> Result<TaskState, Response> {
    let Some(rt) = &s.runtime else {
        return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the node is not running tasks"));
    };
    match rt.board.wait_final(task, s.policy.verdict_timeout).await {
        Some(st) => Ok(st),
        None => Err(error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            &format!(
                "no verdict for task {task} in {} s; see GET /v1/tasks/{task}",
                s.policy.verdict_timeout.as_secs()
            ),
        )),
    }
}

fn sampo_field(task: &TaskId, st: &TaskState, streamed: Option<bool>) -> Value {
    let mut v = json!({
        "task_id": task.to_string(),
        "verdict": st.status,
        "attempt": st.attempt,
        "committee": st.committee,
        "marks": st.marks.iter().map(|(p, m)| json!({"peer_id": p, "mark": m})).collect::<Vec<_>>(),
        "evidence_url": format!("/v1/tasks/{task}/evidence"),
    });
    if let (Some(matches), Value::Object(m)) = (streamed, &mut v) {
        m.insert("streamed_tokens_match_verdict".into(), json!(matches));
    }
    v
}

fn finish_reason(output: &[u32], max_tokens: u32) -> &'static str {
    if output.len() as u32 >= max_tokens { "length" } else { "stop" }
}

async fn chat_completions(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    tracing::debug!(target: "sampo::timeline", "request");
    let Json(req) = match body {
        Ok(b) => b,
        Err(r) => return json_rejection(r),
    };
    if req.messages.is_empty() {
        return bad_request("messages must not be empty");
    }
    let stream = req.generation.stream;
    let p = match prepare(&s, &req.model, Prompt::Chat(req.messages), req.generation) {
        Ok(p) => p,
        Err(r) => return r,
    };
    respond(s, p, stream, true, caller).await
}

async fn completions(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(r) => return json_rejection(r),
    };
    let stream = req.generation.stream;
    let p = match prepare(&s, &req.model, Prompt::Text(req.prompt), req.generation) {
        Ok(p) => p,
        Err(r) => return r,
    };
    respond(s, p, stream, false, caller).await
}

async fn respond(s: Arc<ApiState>, p: Prepared, stream: bool, chat: bool, caller: Caller) -> Response {
    tracing::debug!(target: "sampo::timeline", "prepared");
    let t0 = Instant::now();
    let created = now_ms() / 1000;
    // Run the local inference first when streaming: a full queue is a 429 before any
    // task is announced.
    let local = if stream && !p.options.verified_only {
        let Some(ex) = &s.executor else {
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no executor");
        };
        // Room for every token the request may produce: the batch never waits for a
        // slow reader (the executor's write timeout is only a backstop).
        let (tx, rx) = mpsc::channel::<TokenPiece>(p.spec.params.max_tokens as usize + 1);
        let (done, done_rx) = oneshot::channel();
        let job = Job {
            // The same order as committee work: what the task pays per token.
            priority: p.spec.fee_per_1k_tokens().saturating_add(1),
            engine: p.model.engine.clone(),
            prompt: p.prompt_tokens.clone(),
            params: p.model.sampling(&p.spec),
            stream: Some(tx),
            done,
        };
        match ex.submit(job) {
            Ok(()) => Some((rx, done_rx)),
            Err(SubmitError::Full(_)) => {
                s.metrics.queue_rejections.inc();
                return too_many("the inference queue is full", 2);
            }
            Err(SubmitError::Closed) => {
                return error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the node is shutting down");
            }
        }
    } else {
        None
    };
    // Registered before the task exists: this node's own seat on it (seated as the task
    // is announced) takes the streamed run's tokens instead of decoding them again.
    let shared = match (&local, &s.runtime) {
        (Some(_), Some(rt)) => {
            let task = p.spec.id();
            rt.local_runs
                .register(task, p.prompt_tokens.clone())
                .map(|tx| (tx, LocalRunGuard { runs: rt.local_runs.clone(), task }))
        }
        _ => None,
    };
    let task = match submit(&s, &p, &caller).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, &task.to_string()[..24]);
    let model_name = p.model.name.clone();
    let object = if chat { "chat.completion" } else { "text_completion" };
    if !stream {
        tracing::debug!(target: "sampo::timeline", %task, "submitted");
        let st = match wait_verdict(&s, &task).await {
            Ok(st) => st,
            Err(r) => return r,
        };
        tracing::debug!(target: "sampo::timeline", %task, "verdict seen");
        let Some(output) = st.output.clone().filter(|_| st.status == "finalized") else {
            return error_response(
                StatusCode::BAD_GATEWAY,
                "consensus_failed",
                &format!("task {task} ended {} without a verified output", st.status),
            );
        };
        let text = p.model.detokenize(&output);
        let fr = finish_reason(&output, p.spec.params.max_tokens);
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fr, "logprobs": null})
        } else {
            json!({"index": 0, "text": text, "finish_reason": fr, "logprobs": null})
        };
        return Json(json!({
            "id": id, "object": object, "created": created, "model": model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": p.prompt_tokens.len(), "completion_tokens": output.len(), "total_tokens": p.prompt_tokens.len() + output.len()},
            "sampo": sampo_field(&task, &st, None),
        }))
        .into_response();
    }
    let chunk_object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |content: Option<&str>, role: bool, fr: Option<&str>, extra: Option<Value>| -> Event {
        let choice = if chat {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(c) = content {
                delta.insert("content".into(), json!(c));
            }
            json!({"index": 0, "delta": delta, "finish_reason": fr, "logprobs": null})
        } else {
            json!({"index": 0, "text": content.unwrap_or(""), "finish_reason": fr, "logprobs": null})
        };
        let mut body =
            json!({"id": id, "object": chunk_object, "created": created, "model": model_name, "choices": [choice]});
        if let (Some(x), Value::Object(m)) = (extra, &mut body) {
            m.insert("sampo".into(), x);
        }
        Event::default().data(body.to_string())
    };
    // The run's end goes to the seat sharing it (and the metrics) at once, not after
    // its tokens reached a client that may read slowly or not at all.
    let (share, guard) = shared.unzip();
    let local = local.map(|(rx, done_rx)| {
        let metrics = s.metrics.clone();
        tokio::spawn(
            async move {
                let finished = match done_rx.await {
                    Ok(Ok(g)) => {
                        metrics.observe_generation(&g);
                        (g.finish != sampo_kernels::FinishReason::Cancelled).then_some(g.tokens)
                    }
                    _ => None,
                };
                if let (Some(share), Some(tokens)) = (share, finished) {
                    let _ = share.send(tokens);
                }
            }
            .instrument(tracing::info_span!("local-run")),
        );
        rx
    });
    let s2 = s.clone();
    let max_tokens = p.spec.params.max_tokens;
    let model = p.model.clone();
    let (out_tx, out_rx) = mpsc::channel::<Event>(64);
    // The producer ends when the client goes away: sends fail, the token receiver is
    // dropped, and the inference thread stops at its next token.
    tokio::spawn(async move {
        if chat && out_tx.send(chunk(None, true, None, None)).await.is_err() {
            return;
        }
        // Forgets the shared run when this ends, however it ends.
        let _guard = guard;
        let mut streamed: Option<Vec<u32>> = None;
        if let Some(mut rx) = local {
            let mut first = true;
            let mut ids = Vec::new();
            while let Some(piece) = rx.recv().await {
                if first {
                    s2.metrics.time_to_first_token_seconds.observe(t0.elapsed().as_secs_f64());
                    first = false;
                }
                ids.push(piece.id);
                if !piece.text.is_empty() && out_tx.send(chunk(Some(&piece.text), false, None, None)).await.is_err() {
                    return;
                }
            }
            streamed = Some(ids);
        }
        let st = match wait_verdict(&s2, &task).await {
            Ok(st) => st,
            Err(_) => {
                let err =
                    json!({"error": {"message": format!("no verdict for task {task} in time"), "type": "timeout"}});
                let _ = out_tx.send(Event::default().data(err.to_string())).await;
                let _ = out_tx.send(Event::default().data("[DONE]")).await;
                return;
            }
        };
        let output = st.output.clone().filter(|_| st.status == "finalized");
        if streamed.is_none()
            && let Some(out) = &output
        {
            let text = model.detokenize(out);
            if out_tx.send(chunk(Some(&text), false, None, None)).await.is_err() {
                return;
            }
        }
        let matches = streamed.as_ref().map(|ids| Some(ids) == output.as_ref());
        let fr = output.as_ref().map(|o| finish_reason(o, max_tokens)).unwrap_or("error");
        let _ = out_tx.send(chunk(None, false, Some(fr), Some(sampo_field(&task, &st, matches)))).await;
        let _ = out_tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(receiver_stream(out_rx)).keep_alive(KeepAlive::default()).into_response()
}

/// Forgets a streamed run shared with this node's seat when the request ends.
struct LocalRunGuard {
    runs: Arc<crate::runtime::LocalRuns>,
    task: TaskId,
}

impl Drop for LocalRunGuard {
    fn drop(&mut self) {
        self.runs.forget(&self.task);
    }
}

fn receiver_stream(mut rx: mpsc::Receiver<Event>) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}

/// `POST /v1/tasks`: start a task and return its id at once.
#[derive(Debug, Deserialize)]
pub struct TaskRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    pub generation: GenerationFields,
}

async fn create_task(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<TaskRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(r) => return json_rejection(r),
    };
    let prompt = match (req.prompt, req.messages) {
        (Some(t), None) => Prompt::Text(t),
        (None, Some(m)) if !m.is_empty() => Prompt::Chat(m),
        _ => return bad_request("give exactly one of `prompt` or a non-empty `messages`"),
    };
    let p = match prepare(&s, &req.model, prompt, req.generation) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match submit(&s, &p, &caller).await {
        Ok(task) => (
            StatusCode::ACCEPTED,
            Json(json!({"task_id": task.to_string(), "status_url": format!("/v1/tasks/{task}"), "evidence_url": format!("/v1/tasks/{task}/evidence")})),
        )
            .into_response(),
        Err(r) => r,
    }
}

fn parse_task(id: &str) -> Result<TaskId, Response> {
    Hash32::from_hex(id).map(TaskId).ok_or_else(|| bad_request("a task id is 64 hex digits"))
}

async fn get_task(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let task = match parse_task(&id) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let live = s.runtime.as_ref().and_then(|rt| rt.board.get(&task));
    let stored = s.store.as_ref().and_then(|st| st.task(&task).ok().flatten());
    let model = live.as_ref().map(|l| l.model.clone()).or_else(|| stored.as_ref().map(|r| r.model.to_string()));
    let text = |out: &Option<Vec<u32>>| {
        let m = model.as_deref().and_then(|m| s.models.0.iter().find(|x| x.id.to_string() == m));
        match (m, out) {
            (Some(m), Some(o)) => Some(m.detokenize(o)),
            _ => None,
        }
    };
    // A replay that refuted the finalized output: by whom, and where it leaves the model's.
    let overturned = stored
        .as_ref()
        .and_then(|r| r.overturned.as_ref())
        .map(|o| json!({"prover": o.prover.to_string(), "first_divergent_position": o.position, "at_ms": o.at_ms}));
    match (live, stored) {
        (Some(l), _) => {
            let out = l.output.clone();
            Json(json!({"task": l, "output_tokens": out, "output_text": text(&out), "overturned": overturned}))
                .into_response()
        }
        (None, Some(r)) => {
            let out = r.output.clone();
            Json(json!({
                "task": {"task": r.task.to_string(), "status": r.status, "attempt": r.attempt,
                    "committee": r.committee.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "coordinator": r.coordinator.to_string(), "model": r.model.to_string()},
                "output_tokens": out, "output_text": text(&out), "overturned": overturned
            }))
            .into_response()
        }
        (None, None) => {
            error_response(StatusCode::NOT_FOUND, "not_found", &format!("task {task} is unknown to this node"))
        }
    }
}

async fn get_evidence(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let task = match parse_task(&id) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(store) = &s.store else { return not_found().await };
    match store.evidence(&task) {
        Ok(list) => match list.last() {
            Some(rec) => {
                let attempt = rec.verdict.open::<sampo_consensus::Verdict>().map(|v| v.attempt).unwrap_or(0);
                Json(EvidenceBundle {
                    format: EvidenceBundle::FORMAT.into(),
                    task,
                    attempt,
                    verdict: rec.verdict.clone(),
                })
                .into_response()
            }
            None => error_response(StatusCode::NOT_FOUND, "not_found", &format!("no verdict stored for task {task}")),
        },
        Err(e) => internal_error("reading evidence", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_match_exactly() {
        let keys = vec!["alpha-key".to_owned(), "beta-key".to_owned()];
        assert!(key_matches(&keys, "alpha-key") && key_matches(&keys, "beta-key"));
        for wrong in ["", "alpha", "alpha-key ", "alpha-kez", "beta-key-longer"] {
            assert!(!key_matches(&keys, wrong), "{wrong:?}");
        }
        assert!(!key_matches(&[], "alpha-key"));
    }

    #[test]
    fn the_rate_limiter_stays_bounded() {
        let mut map = HashMap::new();
        assert!(rate_check(&mut map, "a".into(), 2, 0).is_ok());
        assert!(rate_check(&mut map, "a".into(), 2, 1).is_ok());
        assert!(rate_check(&mut map, "a".into(), 2, 2).is_err(), "third request in a minute");
        assert!(rate_check(&mut map, "a".into(), 2, 60_000).is_ok(), "a new minute");
        for i in 0..(2 * MAX_RATE_CLIENTS) {
            let _ = rate_check(&mut map, format!("client {i}"), 2, 60_001);
        }
        assert!(map.len() <= MAX_RATE_CLIENTS);
        assert!(rate_check(&mut map, "a".into(), 2, 60_002).is_ok(), "a known client is still served");
        // A minute later the old entries make room for newcomers.
        assert!(rate_check(&mut map, "newcomer".into(), 2, 120_000).is_ok());
        assert!(map.len() <= MAX_RATE_CLIENTS);
    }
}
