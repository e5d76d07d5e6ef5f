//! The node's own metrics (`sampo_` prefix), registered in the same registry as
//! libp2p's. Labels have bounded cardinality: no peer or task ids.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use sampo_kernels::Generation;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// coordinator, member or observer.
    pub role: String,
    /// finalized, escalated or disputed.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// The matched route template, e.g. /v1/chat/completions.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScoreBucket {
    /// Upper bound of the reputation score bucket.
    pub score_up_to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    /// audit, contested or fraud_proof.
    pub reason: String,
    /// upheld, refuted, skipped (rate limit or queue), or failed.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub backend: String,
    pub device: String,
    pub compute_capability: String,
}

pub struct NodeMetrics {
    pub tasks: Family<TaskLabels, Counter>,
    pub round_seconds: Histogram,
    /// Where a round's time goes, phase by phase.
    pub round_phase_seconds: Family<PhaseLabel, Histogram>,
    pub inference_tokens: Counter,
    pub decode_tokens_per_second: Histogram,
    pub time_to_first_token_seconds: Histogram,
    pub queue_depth: Gauge,
    /// Prompt tokens taken from the executor's kept prefixes instead of prefilled.
    pub prompt_tokens_reused: Counter,
    /// Sequences in flight: the executor's current batch.
    pub inference_sequences: Gauge,
    pub queue_rejections: Counter,
    pub reputation_peers: Family<ScoreBucket, Gauge>,
    pub banned_peers: Gauge,
    pub api_requests: Family<ApiLabels, Counter>,
    pub refused_messages: Counter,
    pub device_info: Family<DeviceLabels, Gauge>,
    pub device_memory_total_bytes: Gauge,
    pub device_memory_free_bytes: Gauge,
    pub replays: Family<ReplayLabels, Counter>,
    pub fraud_proofs_sent: Counter,
    pub coordinator_equivocations: Counter,
    pub pruned: Family<KindLabel, Counter>,
    pub left_out: Counter,
    pub deposits: Counter,
    pub fees_held: Counter,
    pub fees_settled: Counter,
    pub payouts: Counter,
    pub fees_returned: Counter,
}

impl NodeMetrics {
    pub fn replay(&self, reason: &str, result: &str) {
        self.replays.get_or_create(&ReplayLabels { reason: reason.into(), result: result.into() }).inc();
    }
}

impl NodeMetrics {
    /// Refresh the device gauges (called per scrape: free memory moves).
    pub fn observe_device(&self, backend: &str, device: &str, status: Option<&sampo_kernels::DeviceStatus>) {
        let labels = DeviceLabels {
            backend: backend.to_owned(),
            device: status.map_or_else(|| device.to_owned(), |d| d.name.clone()),
            compute_capability: status.map(|d| d.compute_capability.clone()).unwrap_or_default(),
        };
        self.device_info.get_or_create(&labels).set(1);
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.device_memory_total_bytes.set(status.map_or(0, |d| clamp(d.memory_total_bytes)));
        self.device_memory_free_bytes.set(status.map_or(0, |d| clamp(d.memory_free_bytes)));
    }

    pub fn observe_phase(&self, phase: &'static str, since: std::time::Instant) {
        let took = since.elapsed();
        tracing::debug!(target: "sampo::timeline", phase, us = took.as_micros() as u64, "phase done");
        self.round_phase_seconds.get_or_create(&PhaseLabel { phase }).observe(took.as_secs_f64());
    }

    pub fn register(root: &mut Registry) -> Self {
        let m = Self {
            tasks: Family::default(),
            round_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            round_phase_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))),
            inference_tokens: Counter::default(),
            decode_tokens_per_second: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            time_to_first_token_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            queue_depth: Gauge::default(),
            prompt_tokens_reused: Counter::default(),
            inference_sequences: Gauge::default(),
            queue_rejections: Counter::default(),
            reputation_peers: Family::default(),
            banned_peers: Gauge::default(),
            api_requests: Family::default(),
            refused_messages: Counter::default(),
            device_info: Family::default(),
            device_memory_total_bytes: Gauge::default(),
            device_memory_free_bytes: Gauge::default(),
            replays: Family::default(),
            fraud_proofs_sent: Counter::default(),
            coordinator_equivocations: Counter::default(),
            pruned: Family::default(),
            left_out: Counter::default(),
            deposits: Counter::default(),
            fees_held: Counter::default(),
            fees_settled: Counter::default(),
            payouts: Counter::default(),
            fees_returned: Counter::default(),
        };
        let r = root.sub_registry_with_prefix("sampo");
        r.register("tasks", "Verdicts applied, by this node's role and the outcome", m.tasks.clone());
        r.register_with_unit(
            "round_duration",
            "Time from announcing a task to its final verdict (coordinator)",
            Unit::Seconds,
            m.round_seconds.clone(),
        );
        r.register_with_unit(
            "round_phase_duration",
            "Phases of a round: commits (announcement to reveal request) and reveals (to the verdict) at the coordinator; at members announcement (submission to seat, one clock), seat_prepare (stored-commit check, tokenizing), inference (queue and run), commit_store (the synced write before a commit is sent); apply (a verdict's synced write) everywhere",
            Unit::Seconds,
            m.round_phase_seconds.clone(),
        );
        r.register("inference_tokens", "Tokens generated", m.inference_tokens.clone());
        r.register(
            "inference_decode_tokens_per_second",
            "Decode speed of each inference",
            m.decode_tokens_per_second.clone(),
        );
        r.register_with_unit(
            "time_to_first_token",
            "Time from an API request to its first streamed token",
            Unit::Seconds,
            m.time_to_first_token_seconds.clone(),
        );
        r.register("queue_depth", "Inference jobs waiting", m.queue_depth.clone());
        r.register(
            "prompt_tokens_reused",
            "Prompt tokens whose keys and values came from a kept prompt prefix instead of a prefill",
            m.prompt_tokens_reused.clone(),
        );
        r.register(
            "inference_sequences",
            "Sequences in flight, decoded together as one batch per step",
            m.inference_sequences.clone(),
        );
        r.register("queue_rejections", "Jobs and seats refused because the queue was full", m.queue_rejections.clone());
        r.register("reputation_peers", "Known peers by reputation score bucket", m.reputation_peers.clone());
        r.register("banned_peers", "Peers currently banned", m.banned_peers.clone());
        r.register("api_requests", "API requests by route and status", m.api_requests.clone());
        r.register("refused_messages", "Protocol messages the state machine refused", m.refused_messages.clone());
        r.register("device_info", "The compute device the models run on (value 1)", m.device_info.clone());
        r.register(
            "device_memory_total_bytes",
            "Accelerator memory in total (0 on the CPU backend)",
            m.device_memory_total_bytes.clone(),
        );
        r.register(
            "device_memory_free_bytes",
            "Accelerator memory free now (0 on the CPU backend)",
            m.device_memory_free_bytes.clone(),
        );
        r.register("replays", "Replays of verdicts by why they ran and what they found", m.replays.clone());
        r.register("fraud_proofs_sent", "Fraud proofs this node published", m.fraud_proofs_sent.clone());
        r.register(
            "coordinator_equivocations",
            "Second, different verdicts for an applied attempt (the coordinator is banned)",
            m.coordinator_equivocations.clone(),
        );
        r.register("pruned_records", "Records dropped by retention, by kind", m.pruned.clone());
        r.register("ledger_deposits", "Credits deposited into client accounts", m.deposits.clone());
        r.register("ledger_fees_held", "Task fees held from client accounts at submission", m.fees_held.clone());
        r.register("ledger_fees_settled", "Held fees closed by a verdict or a refund", m.fees_settled.clone());
        r.register("ledger_payouts", "Credits paid to agreeing members out of held fees", m.payouts.clone());
        r.register(
            "ledger_fees_returned",
            "Held credits returned to clients (unspent or refunded)",
            m.fees_returned.clone(),
        );
        r.register(
            "left_out",
            "Announcements whose candidate list left this node out (recorded against their coordinator)",
            m.left_out.clone(),
        );
        m
    }

    pub fn observe_generation(&self, g: &Generation) {
        self.inference_tokens.inc_by(g.tokens.len() as u64);
        if g.decode_secs > 0.0 && g.tokens.len() > 1 {
            self.decode_tokens_per_second.observe((g.tokens.len() - 1) as f64 / g.decode_secs);
        }
    }
}
