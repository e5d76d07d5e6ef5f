//! The node's configuration: one TOML file, a default for every field, environment
//! overrides (`SAMPO_SECTION__KEY=value`) and command-line flags on top, validated
//! once at start-up. An unknown key, a wrong type or an invalid value is an error
//! naming the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variables with the `SAMPO_` prefix that are not config keys.
pub const NON_CONFIG_ENV: &[&str] = &["SAMPO_CONFIG", "SAMPO_LOG", "SAMPO_MODEL_DIR"];
pub const ENV_PREFIX: &str = "SAMPO_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Key { key: String, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// CUDA when a driver and device exist, else the CPU (with a log line saying why).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the key, the database and caches live.
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub network: NetworkConfig,
    pub api: ApiConfig,
    pub models: Vec<ModelConfig>,
    pub execution: ExecutionConfig,
    pub consensus: ConsensusConfig,
    pub storage: StorageConfig,
    pub testing: TestingConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Evidence, task records, stored commits and replay records older than this (on
    /// this node's clock) are pruned.
    pub retention_days: u64,
    /// The evidence kept is held under this size, oldest pruned first.
    pub max_evidence_mb: u64,
    /// Seconds between retention passes.
    pub prune_interval_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { retention_days: 30, max_evidence_mb: 2048, prune_interval_secs: 600 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    /// Misbehave on purpose; refused without `--unsafe-allow-faults`.
    pub behaviour: sampo_consensus::Behaviour,
    /// Peer ids this node colludes with under `behaviour = "collude"`.
    pub accomplices: Vec<String>,
    /// Gossip this many signed but invalid verdicts a second (a flooding peer, for soak
    /// tests); refused without `--unsafe-allow-faults` like `behaviour`.
    pub flood_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// libp2p multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Multiaddrs (with `/p2p/<peer id>`) of peers to bootstrap from.
    pub bootstrap: Vec<String>,
    /// Seconds between this node's capacity announcements.
    pub announce_interval_secs: u64,
    pub max_connections: u32,
    /// Peers this node dials on its own from discovery, at most (a gossip mesh needs
    /// ~12); inbound connections may add up to `max_connections`.
    pub target_connections: u32,
    /// Most connections to or from one IP address (IPv6: one /64); loopback included.
    pub max_connections_per_ip: u32,
    /// Connection slots kept for this node's own dials: inbound connections get at most
    /// `max_connections - reserved_outbound`. Must be below `max_connections`.
    pub reserved_outbound: u32,
    /// Use private, loopback, link-local... addresses that peers report (identify,
    /// Kademlia). For a testnet on one host or a LAN; bootstrap addresses always work.
    pub allow_private_addresses: bool,
    /// A closed network: hex ed25519 public keys of the admission issuers. Only nodes
    /// presenting a certificate one of them signed are sampled or relayed. Empty: open.
    pub admission_keys: Vec<String>,
    /// This node's admission certificate (`sampo keys certify --out`); required when
    /// `admission_keys` is set.
    pub certificate: Option<PathBuf>,
    /// IPs exempt from gossipsub's IP colocation penalty and from spreading committee
    /// seats across network prefixes: a testnet's loopback, never by default.
    pub colocation_whitelist: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Bearer keys; empty means no authentication (and one implicit local account).
    /// Each key is charged to its own account (`GET /v1/account` shows it).
    pub api_keys: Vec<String>,
    /// Keys that may also credit accounts (`POST /v1/accounts/{name}/deposit`).
    pub admin_keys: Vec<String>,
    /// Client IPs or CIDR ranges allowed; empty means all.
    pub allow_ips: Vec<String>,
    pub max_body_bytes: usize,
    /// Requests per minute per API key (0 = unlimited).
    pub rate_limit_per_minute: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A GGUF file.
    pub path: PathBuf,
    /// Name clients use; defaults to the file's `general.name`.
    pub name: Option<String>,
    /// Price per 1,000 generated tokens, in credits.
    pub price_per_1k_tokens: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { path: PathBuf::new(), name: None, price_per_1k_tokens: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutionConfig {
    pub backend: BackendChoice,
    /// Inference worker threads; 0 means one per core.
    pub threads: usize,
    /// Threads of the async runtime (network, API, consensus); 0 means one per core.
    /// Nodes sharing one machine (a local testnet) do better with one each: every
    /// extra thread is one more to wake and switch to.
    pub runtime_threads: usize,
    /// Sequences in flight at once, decoded together as one batch per step.
    pub max_concurrent: usize,
    /// Prompt tokens that newcomers may add to one batch step (a long prompt is
    /// prefilled in chunks so that running streams keep flowing).
    pub prefill_chunk_tokens: usize,
    /// MiB of prompt prefixes' keys and values kept for later prompts that start with
    /// them (a chat template's opening, a conversation resent with a turn added): those
    /// tokens are copied, not prefilled. CPU backends; 0: keep none.
    pub prefix_cache_mib: u64,
    /// MiB the CPU backend may keep per model for its batched kernel's weight rows laid
    /// out 8 to a vector (about 1.2x a 4-bit model's weights; batches decode faster with
    /// them). A model that needs more keeps none. 0: never keep them.
    pub prepared_weights_mib: u64,
    /// Bounded execution queue length.
    pub queue_capacity: usize,
    pub max_tokens_per_task: u32,
    /// A streaming client that leaves a token unread this long is dropped and its
    /// inference cancelled (the worker is never held by a slow reader).
    pub stream_write_timeout_ms: u64,
    /// NVRTC library that compiles the CUDA kernels (default: `SAMPO_NVRTC`, the loader's
    /// search path, the CUDA toolkit's folders, the PyPI package `nvidia-cuda-nvrtc`).
    pub nvrtc: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    /// Committee size.
    pub k: usize,
    pub commit_timeout_ms: u64,
    pub reveal_timeout_ms: u64,
    /// How many times a disputed task may escalate to a larger committee.
    pub max_escalations: u32,
    /// Reputation score below which a peer is not sampled.
    pub ban_threshold: f64,
    pub ban_duration_secs: u64,
    /// Seconds after which a past outcome weighs half as much.
    pub reputation_half_life_secs: u64,
    /// Fraction of the finalized verdicts this node sees (for a model it serves) that it
    /// re-executes by replay, at low priority, to catch a lie a majority agreed on.
    pub audit_rate: f64,
    /// Replays (audits, contested marks, fraud-proof checks) at most per minute for one
    /// coordinator or prover, so that a flood of verdicts cannot buy this node's CPU.
    pub replays_per_minute: u32,
    /// Sampling weight of a node on probation, as a fraction of its score.
    pub probation_weight: f64,
    /// Agreements in paid rounds coordinated by this node or another established node
    /// that end a peer's probation.
    pub probation_rounds: u64,
    /// Peer ids this node counts as established from the start (an operator's own
    /// fleet, a network's founders); in a closed network every admitted node is.
    pub trusted_peers: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("sampo-data"),
            log_format: LogFormat::Text,
            network: NetworkConfig::default(),
            api: ApiConfig::default(),
            models: Vec::new(),
            execution: ExecutionConfig::default(),
            consensus: ConsensusConfig::default(),
            storage: StorageConfig::default(),
            testing: TestingConfig::default(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/tcp/4001".into()],
            bootstrap: Vec::new(),
            announce_interval_secs: 5,
            max_connections: 256,
            target_connections: 24,
            max_connections_per_ip: 8,
            reserved_outbound: 16,
            allow_private_addresses: false,
            admission_keys: Vec::new(),
            certificate: None,
            colocation_whitelist: Vec::new(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            allow_ips: Vec::new(),
            max_body_bytes: 1 << 20,
            rate_limit_per_minute: 0,
        }
    }
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            threads: 0,
            runtime_threads: 0,
            max_concurrent: 8,
            prefill_chunk_tokens: crate::executor::PREFILL_CHUNK,
            prefix_cache_mib: (crate::executor::PREFIX_CACHE_BYTES >> 20) as u64,
            prepared_weights_mib: (sampo_kernels::DEFAULT_PREPARED_BUDGET >> 20) as u64,
            queue_capacity: 64,
            max_tokens_per_task: 512,
            stream_write_timeout_ms: 10_000,
            nvrtc: None,
        }
    }
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        Self {
            k: 3,
            commit_timeout_ms: 30_000,
            reveal_timeout_ms: 10_000,
            max_escalations: 2,
            ban_threshold: 0.25,
            ban_duration_secs: 600,
            reputation_half_life_secs: 21_600,
            audit_rate: 0.05,
            replays_per_minute: 6,
            probation_weight: 0.1,
            probation_rounds: 100,
            trusted_peers: Vec::new(),
        }
    }
}

/// The commented default config that `sampo config default` prints. A test checks
/// that it parses to exactly `Config::default()`.
pub const DEFAULT_TOML: &str = r#"# sampo node configuration. Every key is optional; shown are the defaults.
# Any key can be overridden from the environment: SAMPO_<SECTION>__<KEY>=<value>,
# e.g. SAMPO_API__LISTEN="0.0.0.0:4000" or SAMPO_CONSENSUS__K=5.

# Key, database and caches.
data_dir = "sampo-data"
# "text" or "json"
log_format = "text"

[network]
# libp2p multiaddrs to listen on.
listen = ["/ip4/0.0.0.0/tcp/4001"]
# Peers to bootstrap from, e.g. "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...".
bootstrap = []
# Seconds between capacity announcements; a peer is forgotten after three missed.
announce_interval_secs = 5
max_connections = 256
# Peers dialled on this node's own initiative from what discovery finds (a gossip mesh
# needs ~12); discovery still learns every peer.
target_connections = 24
# Most connections to or from one IP address (IPv6: one /64), loopback included.
max_connections_per_ip = 8
# Of max_connections, slots only this node's own dials may use: inbound connections
# get at most max_connections - reserved_outbound.
reserved_outbound = 16
# Use private, loopback and link-local addresses that peers report (identify, Kademlia);
# for a testnet on one host or a LAN. Bootstrap addresses are used whatever they are.
allow_private_addresses = false
# A closed network: hex ed25519 public keys of admission issuers (see `sampo keys show`).
# Only nodes presenting a certificate one of them signed are sampled or relayed.
# Empty = an open network.
admission_keys = []
# This node's certificate, from `sampo keys certify --out`; required with admission_keys.
# certificate = "sampo-data/admission.cert"
# IPs exempt from gossipsub's IP colocation penalty and from one-seat-per-/24 (/48)
# committee spreading; only for a testnet on one host, e.g. ["127.0.0.1"].
colocation_whitelist = []

[api]
# OpenAI-compatible HTTP API, /metrics, /health and /ready.
listen = "127.0.0.1:4000"
# Bearer keys clients must present, each charged to its own prepaid account; empty =
# open, with one implicit local account (topped up by recorded deposits).
api_keys = []
# Keys that may credit accounts: POST /v1/accounts/{name}/deposit.
admin_keys = []
# Client IPs or CIDR ranges allowed; empty = all.
allow_ips = []
max_body_bytes = 1048576
# Requests per minute per API key; 0 = unlimited.
rate_limit_per_minute = 0

# Models served, one [[models]] table each:
# [[models]]
# path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
# name = "smollm2-135m-instruct"
# price_per_1k_tokens = 1

[execution]
# "auto" (CUDA if a device works, else CPU), "cpu" or "cuda"
backend = "auto"
# Inference threads; 0 = one per core.
threads = 0
# Threads of the async runtime (network, API, consensus); 0 = one per core. Nodes
# sharing one machine (a local testnet) do better with 1.
runtime_threads = 0
# Sequences in flight, decoded together as one batch per step.
max_concurrent = 8
# Prompt tokens newcomers add to one batch step (long prompts are prefilled in
# chunks so that running streams keep flowing; a GPU node can raise it).
prefill_chunk_tokens = 64
# MiB of prompt prefixes' keys and values kept for later prompts that start with
# them (a chat template's opening): those tokens are copied, not prefilled. 0 = none.
prefix_cache_mib = 64
# MiB the CPU backend may keep per model for its batched kernel's weight rows laid
# out 8 to a vector (about 1.2x a 4-bit model's weights; batched decode is faster).
# A model that needs more keeps none; 0 = never.
prepared_weights_mib = 1024
queue_capacity = 64
max_tokens_per_task = 512
# A streaming client that leaves a token unread this long is dropped.
stream_write_timeout_ms = 10000
# NVRTC library for the CUDA kernels (compiled PTX is cached in <data_dir>/ptx-cache).
# nvrtc = "/usr/local/cuda/lib64/libnvrtc.so"

[consensus]
# Committee size.
k = 3
commit_timeout_ms = 30000
reveal_timeout_ms = 10000
max_escalations = 2
# Peers scoring below this are not sampled until their ban expires.
ban_threshold = 0.25
ban_duration_secs = 600
# Seconds after which a past outcome weighs half as much.
reputation_half_life_secs = 21600
# Fraction of finalized verdicts (for a served model) re-executed by replay, at low
# priority; a refuted output becomes a gossiped fraud proof.
audit_rate = 0.05
# Replays at most per minute for one coordinator (or fraud-proof sender).
replays_per_minute = 6
# New identities are on probation: they weigh probation_weight of their score and hold
# a minority of any committee's seats, until probation_rounds agreements in paid rounds
# that this node, or another established node, coordinated.
probation_weight = 0.1
probation_rounds = 100
# Peer ids counted as established from the start (your own fleet, the founders).
trusted_peers = []

[storage]
# Evidence, task records, stored commits and replay records older than this go.
retention_days = 30
# The evidence kept stays under this size (MiB), oldest pruned first.
max_evidence_mb = 2048
prune_interval_secs = 600

# Deliberate misbehaviour for testnets: "honest", "wrong_output", "never_reveal",
# "copy_commit" (copies a commit it sees: commits go to the coordinator directly, so
# only one that falls back to gossip), "equivocate", "byzantine_coordinator" (forged
# absences, dropped commits, re-announcements, two verdicts for one attempt) or
# "collude" (lie with the peer ids in `accomplices` when together they hold a quorum
# of a committee). Anything but "honest" is refused unless the node is started with
# --unsafe-allow-faults.
[testing]
behaviour = "honest"
accomplices = []
flood_per_second = 0
"#;

/// A value given on the command line for a config key (`network.bootstrap`, ...).
#[derive(Debug, Clone)]
pub struct Override {
    pub key: String,
    pub value: toml::Value,
}

impl Config {
    /// Load `path` (or the defaults when `None`), apply `SAMPO_*` variables from `env`
    /// and then `overrides`, and validate.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[Override],
    ) -> Result<Self, ConfigError> {
        let mut tree = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax { path: p.to_owned(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !NON_CONFIG_ENV.contains(&k.as_str()))
            .collect();
        env.sort();
        for (var, raw) in env {
            let key = var[ENV_PREFIX.len()..].to_ascii_lowercase().replace("__", ".");
            set_path(&mut tree, &key, parse_scalar(&raw))
                .map_err(|reason| ConfigError::Env { var: var.clone(), reason })?;
            // Checking now names the variable rather than a key in the error.
            check_tree(&tree).map_err(|e| match e {
                ConfigError::Key { key, reason } => {
                    ConfigError::Env { var: var.clone(), reason: format!("`{key}`: {reason}") }
                }
                other => other,
            })?;
        }
        for o in overrides {
            set_path(&mut tree, &o.key, o.value.clone())
                .map_err(|reason| ConfigError::Key { key: o.key.clone(), reason })?;
        }
        let cfg = check_tree(&tree)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse a TOML string (no env, no overrides) and validate it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let tree = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax { path: PathBuf::from("<string>"), message: e.to_string() })?;
        let cfg = check_tree(&tree)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Value checks that types alone can't express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| Err(ConfigError::Key { key: key.into(), reason });
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty".into());
        }
        for (i, a) in self.network.listen.iter().chain(&self.network.bootstrap).enumerate() {
            if !a.starts_with('/') {
                let key = if i < self.network.listen.len() { "network.listen" } else { "network.bootstrap" };
                return bad(key, format!("`{a}` is not a multiaddr (expected e.g. /ip4/127.0.0.1/tcp/4001)"));
            }
        }
        if self.network.announce_interval_secs == 0 {
            return bad("network.announce_interval_secs", "must be at least 1".into());
        }
        // Above max_connections it is simply capped by it.
        if self.network.target_connections == 0 {
            return bad("network.target_connections", "must be at least 1".into());
        }
        if self.network.max_connections == 0 {
            return bad("network.max_connections", "must be at least 1".into());
        }
        if self.network.max_connections_per_ip == 0 {
            return bad("network.max_connections_per_ip", "must be at least 1".into());
        }
        if self.network.reserved_outbound >= self.network.max_connections {
            return bad(
                "network.reserved_outbound",
                format!(
                    "{} must be below network.max_connections ({}): inbound connections need a slot",
                    self.network.reserved_outbound, self.network.max_connections
                ),
            );
        }
        for (i, k) in self.network.admission_keys.iter().enumerate() {
            if let Err(reason) = sampo_consensus::admission::parse_issuer_key(k) {
                return bad(&format!("network.admission_keys[{i}]"), reason);
            }
        }
        for (i, ip) in self.network.colocation_whitelist.iter().enumerate() {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return bad(&format!("network.colocation_whitelist[{i}]"), format!("`{ip}` is not an IP address"));
            }
        }
        for (i, p) in self.consensus.trusted_peers.iter().enumerate() {
            if p.parse::<sampo_consensus::PeerId>().is_err() {
                return bad(&format!("consensus.trusted_peers[{i}]"), format!("`{p}` is not a peer id"));
            }
        }
        if !(self.consensus.probation_weight > 0.0 && self.consensus.probation_weight <= 1.0) {
            return bad("consensus.probation_weight", format!("{} must be in (0, 1]", self.consensus.probation_weight));
        }
        match &self.network.certificate {
            Some(p) if p.as_os_str().is_empty() => return bad("network.certificate", "must not be empty".into()),
            None if !self.network.admission_keys.is_empty() => {
                return bad(
                    "network.certificate",
                    "is required when network.admission_keys is set (issue one with `sampo keys certify`)".into(),
                );
            }
            _ => {}
        }
        if self.api.max_body_bytes < 1024 {
            return bad("api.max_body_bytes", format!("{} is too small (at least 1024)", self.api.max_body_bytes));
        }
        for (i, k) in self.api.api_keys.iter().enumerate() {
            if k.len() < 8 || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(&format!("api.api_keys[{i}]"), "keys need 8+ printable characters without spaces".into());
            }
        }
        for (i, ip) in self.api.allow_ips.iter().enumerate() {
            if parse_ip_range(ip).is_none() {
                return bad(&format!("api.allow_ips[{i}]"), format!("`{ip}` is not an IP address or CIDR range"));
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.path.as_os_str().is_empty() {
                return bad(&format!("models[{i}].path"), "is required".into());
            }
        }
        let e = &self.execution;
        if e.max_concurrent == 0 {
            return bad("execution.max_concurrent", "must be at least 1".into());
        }
        if e.prefill_chunk_tokens == 0 {
            return bad("execution.prefill_chunk_tokens", "must be at least 1".into());
        }
        if e.queue_capacity == 0 {
            return bad("execution.queue_capacity", "must be at least 1".into());
        }
        let most = sampo_consensus::messages::MAX_OUTPUT_TOKENS;
        if e.max_tokens_per_task == 0 || e.max_tokens_per_task > most {
            return bad("execution.max_tokens_per_task", format!("{} is outside 1..={most}", e.max_tokens_per_task));
        }
        if e.stream_write_timeout_ms == 0 {
            return bad("execution.stream_write_timeout_ms", "must be positive".into());
        }
        for (key, n) in [("execution.threads", e.threads), ("execution.runtime_threads", e.runtime_threads)] {
            if n > 1024 {
                return bad(key, format!("{n} threads is absurd"));
            }
        }
        let c = &self.consensus;
        let most_seats = sampo_consensus::MAX_COMMITTEE;
        if c.k == 0 || c.k > most_seats {
            return bad("consensus.k", format!("{} is outside 1..={most_seats}", c.k));
        }
        if c.commit_timeout_ms == 0 {
            return bad("consensus.commit_timeout_ms", "must be positive".into());
        }
        if c.reveal_timeout_ms == 0 {
            return bad("consensus.reveal_timeout_ms", "must be positive".into());
        }
        if !(c.ban_threshold > 0.0 && c.ban_threshold < 1.0) {
            return bad("consensus.ban_threshold", format!("{} is outside (0, 1)", c.ban_threshold));
        }
        if c.reputation_half_life_secs == 0 {
            return bad("consensus.reputation_half_life_secs", "must be at least 1".into());
        }
        let st = &self.storage;
        if st.retention_days == 0 || st.retention_days > 36_500 {
            return bad("storage.retention_days", format!("{} is outside 1..=36500", st.retention_days));
        }
        if st.max_evidence_mb == 0 {
            return bad("storage.max_evidence_mb", "must be positive".into());
        }
        if st.prune_interval_secs == 0 {
            return bad("storage.prune_interval_secs", "must be positive".into());
        }
        if !(0.0..=1.0).contains(&c.audit_rate) {
            return bad("consensus.audit_rate", format!("{} is outside [0, 1]", c.audit_rate));
        }
        if c.max_escalations > 8 {
            return bad("consensus.max_escalations", format!("{} is more than 8", c.max_escalations));
        }
        // Every escalation at least doubles the committee; the last one must still fit.
        let last = sampo_consensus::committee_size(c.k as u8, c.max_escalations as u8);
        if last > most_seats {
            return bad(
                "consensus.max_escalations",
                format!(
                    "{} escalations from k = {} seat {last} members at the last attempt, more than the {most_seats} a committee may have",
                    c.max_escalations, c.k
                ),
            );
        }
        Ok(())
    }

    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join("node.key")
    }
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("db")
    }
}

fn check_tree(tree: &toml::Table) -> Result<Config, ConfigError> {
    let value = toml::Value::Table(tree.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names the unknown field in its message; point at the table it sits in.
        let key = if path == "." { "<root>".to_owned() } else { path };
        ConfigError::Key { key, reason: inner.trim().to_owned() }
    })
}

/// Parse an environment value as a TOML value (number, bool, array...), or else a string.
fn parse_scalar(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(tree: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{key}` is not a config key"));
    }
    let (last, parents) = parts.split_last().ok_or_else(|| "empty key".to_owned())?;
    let mut table = tree;
    for p in parents {
        let entry = table.entry((*p).to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    table.insert((*last).to_owned(), value);
    Ok(())
}

/// `a.b.c.d` or `a.b.c.d/n` (IPv4 or IPv6) into an address and prefix length.
pub fn parse_ip_range(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = bits.unwrap_or(max);
    (bits <= max).then_some((ip, bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).expect("write");
        Config::load(Some(&p), env.iter().map(|(a, b)| (a.to_string(), b.to_string())), &[])
    }

    #[test]
    fn commented_default_parses_to_default() {
        assert_eq!(Config::from_toml_str(DEFAULT_TOML).expect("default parses"), Config::default());
        assert_eq!(Config::default().api.listen.port(), 4000);
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(load_str("", &[]).expect("empty ok"), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[api]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", &[]).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("lisen") && msg.contains("api"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load_str("[consensus]\nk = \"three\"\n", &[]).expect_err("wrong type");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "consensus.k"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = load_str("[consensus]\nban_threshold = 1.5\n", &[]).expect_err("invalid");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "consensus.ban_threshold"), "{err}");
        let err = load_str("[api]\nlisten = \"nonsense\"\n", &[]).expect_err("bad addr");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "api.listen"), "{err}");
        let err = load_str("[api]\nallow_ips = [\"10.0.0.0/33\"]\n", &[]).expect_err("bad cidr");
        assert!(err.to_string().contains("api.allow_ips[0]"), "{err}");
        // Escalations whose last committee would not fit are refused at start, not by
        // a 400 on every request.
        let err = load_str("[consensus]\nk = 4\nmax_escalations = 3\n", &[]).expect_err("too many seats");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "consensus.max_escalations"), "{err}");
        assert!(load_str("[consensus]\nk = 3\nmax_escalations = 3\n", &[]).is_ok(), "3, 7, 15, 31 fit");
        let err = load_str("[consensus]\nk = 32\nmax_escalations = 0\n", &[]).expect_err("k too large");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "consensus.k"), "{err}");
        let err = load_str("[execution]\nruntime_threads = 100000\n", &[]).expect_err("threads");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "execution.runtime_threads"), "{err}");
        assert!(load_str("[execution]\nruntime_threads = 1\n", &[]).is_ok());
        let err = load_str("[consensus]\naudit_rate = 1.5\n", &[]).expect_err("rate");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "consensus.audit_rate"), "{err}");
        let err = load_str("[network]\nmax_connections = 16\n", &[]).expect_err("reserved >= max");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "network.reserved_outbound"), "{err}");
        assert!(load_str("[network]\nmax_connections = 16\nreserved_outbound = 4\n", &[]).is_ok());
        let err = load_str("[network]\nmax_connections_per_ip = 0\n", &[]).expect_err("per ip");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "network.max_connections_per_ip"), "{err}");
        let err =
            load_str("[network]\nadmission_keys = [\"abcd\"]\ncertificate = \"c\"\n", &[]).expect_err("short key");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "network.admission_keys[0]"), "{err}");
        let hex_key = hex::encode(sampo_consensus::NodeKey::from_seed([1; 32]).public());
        let err = load_str(&format!("[network]\nadmission_keys = [\"{hex_key}\"]\n"), &[]).expect_err("no cert");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "network.certificate"), "{err}");
        let ok = load_str(&format!("[network]\nadmission_keys = [\"{hex_key}\"]\ncertificate = \"c.bin\"\n"), &[])
            .expect("closed network");
        assert_eq!(ok.network.certificate, Some(PathBuf::from("c.bin")));
        let err = load_str("[network]\ncertificate = \"\"\n", &[]).expect_err("empty path");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "network.certificate"), "{err}");
        let err = load_str("[network]\nallow_private_addresses = \"yes\"\n", &[]).expect_err("bool");
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == "network.allow_private_addresses"), "{err}");
    }

    #[test]
    fn syntax_error_names_file() {
        let err = load_str("[api\n", &[]).expect_err("syntax");
        assert!(matches!(err, ConfigError::Syntax { .. }));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let cfg = load_str(
            "[consensus]\nk = 5\n",
            &[
                ("SAMPO_CONSENSUS__K", "7"),
                ("SAMPO_API__LISTEN", "127.0.0.1:0"),
                ("SAMPO_CONFIG", "ignored"),
                ("OTHER", "x"),
            ],
        )
        .expect("env ok");
        assert_eq!(cfg.consensus.k, 7);
        assert_eq!(cfg.api.listen.port(), 0);
        let cfg = Config::load(
            None,
            [("SAMPO_CONSENSUS__K".to_string(), "7".to_string())],
            &[Override { key: "consensus.k".into(), value: toml::Value::Integer(4) }],
        )
        .expect("flags ok");
        assert_eq!(cfg.consensus.k, 4);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let err = load_str("", &[("SAMPO_CONSENSUS__KK", "7")]).expect_err("unknown env key");
        assert!(matches!(&err, ConfigError::Env { var, .. } if var == "SAMPO_CONSENSUS__KK"), "{err}");
        let err = load_str("", &[("SAMPO_CONSENSUS__K", "many")]).expect_err("bad env type");
        assert!(err.to_string().contains("SAMPO_CONSENSUS__K"), "{err}");
    }

    #[test]
    fn env_array_values() {
        let cfg = load_str("", &[("SAMPO_NETWORK__BOOTSTRAP", r#"["/ip4/1.2.3.4/tcp/1"]"#)]).expect("array");
        assert_eq!(cfg.network.bootstrap, vec!["/ip4/1.2.3.4/tcp/1".to_string()]);
    }
}
