//! Topics, content-addressed message ids, per-kind size limits, validation of every
//! gossiped message before it is forwarded, and peer-scoring parameters derived from
//! the protocol's timing.

use std::time::Duration;

use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, TopicHash};
use sampo_consensus::{
    EnvelopeError, Hash32, MessageKind, ModelId, NodeAnnouncement, RecentIds, SignedEnvelope, TaskAnnouncement,
};

/// Node announcements.
pub const NODES_TOPIC: &str = "sampo/v1/nodes";
/// Verdicts and fraud proofs; commits, reveal requests and reveals when they cannot
/// go to their peers directly.
pub const ROUNDS_TOPIC: &str = "sampo/v1/rounds";

/// Task announcements for one model.
pub fn tasks_topic(model: &ModelId) -> IdentTopic {
    IdentTopic::new(format!("sampo/v1/tasks/{model}"))
}
pub fn nodes_topic() -> IdentTopic {
    IdentTopic::new(NODES_TOPIC)
}
pub fn rounds_topic() -> IdentTopic {
    IdentTopic::new(ROUNDS_TOPIC)
}

/// Gossipsub heartbeat: mesh maintenance and score decay tick at this pace.
pub const HEARTBEAT: Duration = Duration::from_millis(700);
/// Scores decay at this pace (gossipsub's minimum).
pub const DECAY_INTERVAL: Duration = Duration::from_secs(1);
/// Largest frame gossipsub accepts; the envelope limit plus protobuf framing.
pub const MAX_TRANSMIT_BYTES: usize = sampo_consensus::MAX_ENVELOPE_BYTES + 16 * 1024;
/// How long gossipsub remembers a message id to drop duplicates.
pub const DUPLICATE_CACHE: Duration = Duration::from_secs(120);
/// How many envelope ids we remember beyond gossipsub's duplicate cache, to reject
/// replays of old messages.
pub const REPLAY_MEMORY: usize = 65_536;
/// How far an announcement's clock may be from ours before it counts as a replay.
pub const ANNOUNCEMENT_SKEW_MS: u64 = 60_000;

/// Largest envelope each kind may be: an honest message never comes near these, so
/// anything larger is junk that costs its sender score.
pub fn max_bytes(kind: MessageKind) -> usize {
    match kind {
        MessageKind::NodeAnnouncement => 16 * 1024,
        // A maximal prompt plus the longest candidate list (MAX_CANDIDATES).
        MessageKind::TaskAnnouncement => 192 * 1024,
        MessageKind::Commit => 1024,
        MessageKind::RevealRequest => 16 * 1024,
        MessageKind::Reveal => 24 * 1024,
        MessageKind::Verdict => sampo_consensus::MAX_ENVELOPE_BYTES,
        MessageKind::Decline => 1024,
        MessageKind::FraudProof => 1024,
    }
}

/// Message id = blake3(topic || data): the same bytes on the same topic are one message,
/// whoever forwards them.
pub fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    let mut h = blake3::Hasher::new();
    h.update(m.topic.as_str().as_bytes());
    h.update(&[0]);
    h.update(&m.data);
    gossipsub::MessageId::from(h.finalize().as_bytes().to_vec())
}

/// Why a gossiped message was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GossipReject {
    #[error("envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("{kind} of {size} bytes exceeds its limit of {max}")]
    TooLarge { kind: &'static str, size: usize, max: usize },
    #[error("a {kind} does not belong on topic {topic}")]
    WrongTopic { kind: &'static str, topic: String },
    #[error("replay of a message already seen")]
    Replay,
    #[error("announcement clock {sent_ms} is more than {ANNOUNCEMENT_SKEW_MS} ms from ours ({now_ms})")]
    StaleAnnouncement { sent_ms: u64, now_ms: u64 },
    #[error("unknown topic {0}")]
    UnknownTopic(String),
}

impl GossipReject {
    /// Reject (score penalty) or Ignore (no penalty: e.g. a newer protocol version).
    pub fn acceptance(&self) -> MessageAcceptance {
        match self {
            GossipReject::Envelope(e) if !e.merits_penalty() => MessageAcceptance::Ignore,
            // Seen before, so not forwarded; but honest relays pass on copies of what
            // reached this node another way (a round message sent directly, then
            // gossiped when that was slow), and a replay costs only a hash
            // (`validate` checks the replay memory before decoding).
            GossipReject::Replay => MessageAcceptance::Ignore,
            _ => MessageAcceptance::Reject,
        }
    }
}

/// Remembers envelope ids for longer than gossipsub's duplicate cache.
#[derive(Debug)]
pub struct ReplayGuard(RecentIds);

impl Default for ReplayGuard {
    fn default() -> Self {
        Self(RecentIds::new(REPLAY_MEMORY))
    }
}

impl ReplayGuard {
    /// Whether an id was seen (without recording it).
    pub fn seen(&self, id: &Hash32) -> bool {
        self.0.contains(id)
    }

    /// Forget an id (a message seen but not taken), so a later copy is not a replay.
    pub fn forget(&mut self, id: &Hash32) {
        self.0.remove(id);
    }

    /// True the first time an id is seen.
    pub fn first_sight(&mut self, id: Hash32) -> bool {
        self.0.insert(id)
    }
}

/// Decode and check one gossiped message: size, envelope, signature, topic,
/// freshness. Returns the verified envelope. The envelope's signer is the message's
/// author: gossipsub frames carry none of their own, so a relay that re-publishes a
/// signed envelope is only forwarding it — one envelope has one encoding (others are
/// refused as malformed) and one topic (a task announcement only its model's), so the
/// copy has the same id and is a duplicate — and one that alters it breaks the
/// signature and pays in score.
pub fn validate(
    topic: &TopicHash,
    data: &[u8],
    replay: &mut ReplayGuard,
    now_ms: u64,
) -> Result<SignedEnvelope, GossipReject> {
    // Seen before: refused for the price of a hash, before any decoding or signature
    // check (an envelope's id is the hash of its one, canonical, encoding).
    let id = Hash32::of(data);
    if replay.seen(&id) {
        return Err(GossipReject::Replay);
    }
    let env = SignedEnvelope::from_bytes(data)?;
    let kind = env.kind();
    let max = max_bytes(kind);
    if data.len() > max {
        return Err(GossipReject::TooLarge { kind: kind.as_str(), size: data.len(), max });
    }
    let t = topic.as_str();
    let topic_ok = match kind {
        MessageKind::NodeAnnouncement => t == NODES_TOPIC,
        MessageKind::TaskAnnouncement => t.starts_with("sampo/v1/tasks/"),
        _ => t == ROUNDS_TOPIC,
    };
    // A task announcement goes on its own model's topic: a relay must not move it to
    // another (there it would be a second message, a replay where both topics meet).
    let topic_ok = topic_ok
        && (kind != MessageKind::TaskAnnouncement
            || env.open::<TaskAnnouncement>().is_ok_and(|a| t == tasks_topic(&a.spec.model).hash().as_str()));
    if !topic_ok {
        if !(t == NODES_TOPIC || t == ROUNDS_TOPIC || t.starts_with("sampo/v1/tasks/")) {
            return Err(GossipReject::UnknownTopic(t.to_owned()));
        }
        return Err(GossipReject::WrongTopic { kind: kind.as_str(), topic: t.to_owned() });
    }
    if kind == MessageKind::NodeAnnouncement {
        let ann: NodeAnnouncement = env.open()?;
        if ann.sent_ms.abs_diff(now_ms) > ANNOUNCEMENT_SKEW_MS {
            return Err(GossipReject::StaleAnnouncement { sent_ms: ann.sent_ms, now_ms });
        }
    }
    if !replay.first_sight(id) {
        return Err(GossipReject::Replay);
    }
    Ok(env)
}

/// The checks a round message sent directly passes besides its envelope's (already
/// verified while decoding): a kind that may travel that way (a task's messages to
/// the peers they concern, not the ones everyone needs), and its size.
pub fn check_direct(env: &SignedEnvelope) -> Result<(), GossipReject> {
    let kind = env.kind();
    if !matches!(
        kind,
        MessageKind::TaskAnnouncement
            | MessageKind::Commit
            | MessageKind::Decline
            | MessageKind::Reveal
            | MessageKind::RevealRequest
    ) {
        return Err(GossipReject::WrongTopic { kind: kind.as_str(), topic: "a direct send".into() });
    }
    let (size, max) = (env.to_bytes().len(), max_bytes(kind));
    if size > max {
        return Err(GossipReject::TooLarge { kind: kind.as_str(), size, max });
    }
    Ok(())
}

/// Peer-scoring thresholds. A peer at `GRAYLIST` is ignored entirely; one rejected
/// message costs [`INVALID_MESSAGE_WEIGHT`] × topic weight, squared in the count.
pub const GOSSIP_THRESHOLD: f64 = -10.0;
pub const PUBLISH_THRESHOLD: f64 = -50.0;
pub const GRAYLIST_THRESHOLD: f64 = -80.0;
pub const INVALID_MESSAGE_WEIGHT: f64 = -100.0;
/// Penalties fade by half over this long: about a dozen announcement intervals, so a
/// peer that stops sending junk recovers within minutes, and one that keeps on doesn't.
pub const PENALTY_HALF_LIFE: Duration = Duration::from_secs(60);

fn decay_per_tick(half_life: Duration) -> f64 {
    let ticks = half_life.as_secs_f64() / DECAY_INTERVAL.as_secs_f64();
    0.5f64.powf(1.0 / ticks)
}

/// Score parameters for one topic: only invalid deliveries count (P4); mesh delivery
/// rates (P3) are off, since the task and round topics are bursty by nature.
pub fn topic_params(weight: f64) -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: weight,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: decay_per_tick(PENALTY_HALF_LIFE),
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
        invalid_message_deliveries_decay: decay_per_tick(PENALTY_HALF_LIFE),
        ..gossipsub::TopicScoreParams::default()
    }
}

/// Peer scoring. More than [`IP_COLOCATION_THRESHOLD`] peers behind one IP (one host
/// minting identities) lose score by the square of the surplus; `whitelist` (a
/// testnet's loopback, by configuration) is exempt.
pub fn score_params(whitelist: std::collections::HashSet<std::net::IpAddr>) -> gossipsub::PeerScoreParams {
    let mut p = gossipsub::PeerScoreParams {
        decay_interval: DECAY_INTERVAL,
        decay_to_zero: 0.01,
        retain_score: Duration::from_secs(600),
        ip_colocation_factor_weight: IP_COLOCATION_WEIGHT,
        ip_colocation_factor_threshold: IP_COLOCATION_THRESHOLD,
        ip_colocation_factor_whitelist: whitelist,
        behaviour_penalty_weight: -10.0,
        // Honest peers break a few IHAVE promises when a connection is pruned or a
        // machine stalls; only a habit of it costs score (Lighthouse uses 6 too).
        behaviour_penalty_threshold: BEHAVIOUR_PENALTY_THRESHOLD,
        behaviour_penalty_decay: decay_per_tick(PENALTY_HALF_LIFE),
        ..gossipsub::PeerScoreParams::default()
    };
    p.topics.insert(nodes_topic().hash(), topic_params(1.0));
    p.topics.insert(rounds_topic().hash(), topic_params(1.0));
    p
}

/// Misbehaviours (GRAFTs in backoff, broken IHAVE promises) a peer may commit before
/// they cost score.
pub const BEHAVIOUR_PENALTY_THRESHOLD: f64 = 6.0;

/// Peers one IP may hold before the colocation penalty starts.
pub const IP_COLOCATION_THRESHOLD: f64 = 3.0;
/// Per squared surplus peer: four surplus identities on one IP fall below the gossip
/// threshold, eight below the publish threshold.
pub const IP_COLOCATION_WEIGHT: f64 = -1.0;

pub fn score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: GOSSIP_THRESHOLD,
        publish_threshold: PUBLISH_THRESHOLD,
        graylist_threshold: GRAYLIST_THRESHOLD,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sampo_consensus::{Commit, NodeKey, Reveal, TaskId};

    fn announcement(device: String, sent_ms: u64) -> NodeAnnouncement {
        NodeAnnouncement {
            models: Vec::new(),
            price_per_1k: 0,
            free_slots: 1,
            backend: "cpu".into(),
            device,
            version: "0".into(),
            addrs: Vec::new(),
            api_url: None,
            sent_ms,
            certificate: None,
        }
    }

    fn commit_env(key: &NodeKey) -> SignedEnvelope {
        SignedEnvelope::seal(key, &Commit { task: TaskId(Hash32::of(b"t")), attempt: 0, hash: Hash32::of(b"h") })
            .expect("seal")
    }

    #[test]
    fn a_forgotten_id_is_no_replay() {
        let key = NodeKey::from_seed([1; 32]);
        let rounds = TopicHash::from_raw(ROUNDS_TOPIC);
        let bytes = commit_env(&key).to_bytes();
        let mut guard = ReplayGuard::default();
        let env = validate(&rounds, &bytes, &mut guard, 0).expect("valid");
        assert_eq!(validate(&rounds, &bytes, &mut guard, 0), Err(GossipReject::Replay));
        // Not taken by the node (a full queue): a later copy is welcome.
        guard.forget(&env.id());
        assert!(validate(&rounds, &bytes, &mut guard, 0).is_ok());
    }

    #[test]
    fn only_a_tasks_messages_within_their_size_travel_directly() {
        let key = NodeKey::from_seed([1; 32]);
        assert_eq!(check_direct(&commit_env(&key)), Ok(()));
        // A task's announcement concerns its committee; a node's announcement everyone.
        assert_eq!(check_direct(&task_announcement(&key, ModelId(Hash32::of(b"m")), "hi")), Ok(()));
        let ann = SignedEnvelope::seal(&key, &announcement("x".into(), 0)).expect("seal");
        assert!(matches!(check_direct(&ann), Err(GossipReject::WrongTopic { kind: "node_announcement", .. })));
        // A reveal longer than any answer may be (each token a five-byte varint).
        let tokens = vec![u32::MAX; max_bytes(MessageKind::Reveal) / 5 + 1];
        let reveal = Reveal { task: TaskId(Hash32::of(b"t")), attempt: 0, tokens, salt: [0; 32] };
        let reveal = SignedEnvelope::seal(&key, &reveal).expect("seal");
        assert!(matches!(check_direct(&reveal), Err(GossipReject::TooLarge { kind: "reveal", .. })));
        // A seen message is dropped without a penalty for whoever relayed it: an honest
        // relay passes on what reached this node directly first.
        assert_eq!(GossipReject::Replay.acceptance(), MessageAcceptance::Ignore);
    }

    #[test]
    fn validation_rules() {
        let key = NodeKey::from_seed([1; 32]);
        let other = NodeKey::from_seed([2; 32]);
        let env = commit_env(&key);
        let bytes = env.to_bytes();
        let rounds = rounds_topic().hash();
        let mut guard = ReplayGuard::default();
        let got = validate(&rounds, &bytes, &mut guard, 0).expect("valid");
        // The author is the envelope's signer, whoever relayed it.
        assert_eq!(got.signer(), key.peer_id());
        assert_eq!(validate(&rounds, &bytes, &mut guard, 0), Err(GossipReject::Replay));
        let mut fresh = ReplayGuard::default();
        assert!(matches!(validate(&nodes_topic().hash(), &bytes, &mut fresh, 0), Err(GossipReject::WrongTopic { .. })));
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 1] ^= 1;
        let err = validate(&rounds, &flipped, &mut fresh, 0).expect_err("bad signature");
        assert_eq!(err.acceptance(), MessageAcceptance::Reject);
        // Someone else's key named as the signer (the last 96 bytes are signer and
        // signature): refused, never attributed to the key it names.
        let mut renamed = bytes.clone();
        renamed[n - 96..n - 64].copy_from_slice(&other.public());
        let err = validate(&rounds, &renamed, &mut fresh, 0).expect_err("signer swapped");
        assert_eq!(err.acceptance(), MessageAcceptance::Reject);
    }

    /// A task announcement for `model`, sealed by `key`, with a `prompt`.
    fn task_announcement(key: &NodeKey, model: ModelId, prompt: &str) -> SignedEnvelope {
        sampo_consensus::sim::sealed_announcement(key, model, vec![key.peer_id()], prompt)
    }

    #[test]
    fn a_task_announcement_only_on_its_models_topic() {
        let key = NodeKey::from_seed([1; 32]);
        let model = ModelId(Hash32::of(b"m"));
        let bytes = task_announcement(&key, model, "hi").to_bytes();
        let own = tasks_topic(&model).hash();
        assert!(validate(&own, &bytes, &mut ReplayGuard::default(), 0).is_ok());
        // Moved by a relay to another model's topic: refused there.
        let other = tasks_topic(&ModelId(Hash32::of(b"other"))).hash();
        let err = validate(&other, &bytes, &mut ReplayGuard::default(), 0).expect_err("another model's topic");
        assert!(matches!(err, GossipReject::WrongTopic { .. }), "{err:?}");
        assert_eq!(err.acceptance(), MessageAcceptance::Reject);
    }

    #[test]
    fn oversized_announcement_is_rejected() {
        let key = NodeKey::from_seed([1; 32]);
        let env = SignedEnvelope::seal(&key, &announcement("x".repeat(20_000), 5)).expect("seal");
        let err =
            validate(&nodes_topic().hash(), &env.to_bytes(), &mut ReplayGuard::default(), 5).expect_err("too large");
        assert!(matches!(err, GossipReject::TooLarge { .. }));
    }

    #[test]
    fn score_params_are_valid() {
        assert!(score_params(Default::default()).validate().is_ok());
        assert!(score_thresholds().validate().is_ok());
        assert!(topic_params(1.0).validate().is_ok());
    }
}
