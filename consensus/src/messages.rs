//! The protocol's typed messages. Each travels inside a [`SignedEnvelope`]; the
//! envelope's signer is the message's author, so no message repeats its sender.

use serde::{Deserialize, Serialize};

use crate::PeerId;
use crate::envelope::{Message, MessageKind, SignedEnvelope, encode_body};
use crate::ids::{Hash32, ModelId, TaskId};

// These limits keep the largest possible verdict (announcement with the longest
// prompt, MAX_COMMITTEE members each with one full-length reveal) inside one envelope;
// `tests/verdicts.rs` seals that worst case.
/// Longest prompt (bytes of text, all chat messages together) a task may carry.
pub const MAX_PROMPT_BYTES: usize = 128 * 1024;
/// Most output tokens a task may ask for.
pub const MAX_OUTPUT_TOKENS: u32 = 4096;
/// Largest committee any attempt may seat (bounds every round's state).
pub const MAX_COMMITTEE: usize = 31;
/// Tokens a chat template may add around the messages' bytes (bound used to check a
/// context decline).
pub const TEMPLATE_SLACK_TOKENS: usize = 256;
/// Most stop tokens a task may list.
pub const MAX_STOP_TOKENS: usize = 16;

/// A model a node serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub id: ModelId,
    pub name: String,
}

/// Signed by every node every few seconds on `sampo/v1/nodes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    pub models: Vec<ModelRef>,
    /// Price per 1,000 output tokens, in credits.
    pub price_per_1k: u64,
    pub free_slots: u32,
    /// "cpu" or "cuda".
    pub backend: String,
    pub device: String,
    pub version: String,
    /// Multiaddrs the node listens on, as text.
    pub addrs: Vec<String>,
    pub api_url: Option<String>,
    /// Sender's clock (unix ms) when it was sent: later announcements replace earlier ones.
    pub sent_ms: u64,
    /// Admission to a closed network (`network.admission_keys`); `None` on an open one.
    pub certificate: Option<crate::admission::AdmissionCertificate>,
}

impl Message for NodeAnnouncement {
    const KIND: MessageKind = MessageKind::NodeAnnouncement;
}

/// What the model is asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is.
    Text(String),
    /// Chat messages, rendered by the model's own chat template.
    Chat(Vec<ChatMessage>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl Prompt {
    pub fn byte_len(&self) -> usize {
        match self {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(m) => m.iter().map(|m| m.role.len() + m.content.len()).sum(),
        }
    }
}

/// Sampling parameters. Floats travel as their bit patterns' serde encoding, so every
/// member samples with exactly the coordinator's values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub max_tokens: u32,
    pub seed: u64,
    pub stop: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, max_tokens: 64, seed: 0, stop: Vec::new() }
    }
}

/// The immutable part of a task; its hash is the task id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub coordinator: PeerId,
    /// Coordinator-chosen nonce, so that equal requests get distinct ids.
    pub nonce: u64,
    pub created_ms: u64,
    pub model: ModelId,
    pub prompt: Prompt,
    pub params: SamplingParams,
    /// Members of the first committee; escalation grows it (see [`crate::committee_size`]).
    pub k: u8,
    /// Escalations allowed before the task fails as disputed (part of the spec, so a
    /// verifier knows whether "escalated" or "disputed" was the right call).
    pub max_escalations: u8,
    /// Credits paid for the task, split among the agreeing members.
    pub fee: u64,
    /// Randomness from the client (or drawn for it by the API), committed before the
    /// committee is sampled: the committee's seed, which the coordinator cannot grind
    /// (its own fields — nonce, time — do not enter the seed).
    pub client_entropy: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("k must be at least 1, found 0")]
    ZeroK,
    #[error("prompt of {0} bytes exceeds the limit of {MAX_PROMPT_BYTES}")]
    PromptTooLong(usize),
    #[error("max_tokens {0} outside 1..={MAX_OUTPUT_TOKENS}")]
    MaxTokens(u32),
    #[error("{0} stop tokens exceed the limit of {MAX_STOP_TOKENS}")]
    TooManyStops(usize),
    #[error("temperature {0} must be finite and in [0, 100]")]
    Temperature(f32),
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
    #[error("k {k} with {escalations} escalations exceeds the largest committee of {MAX_COMMITTEE}")]
    CommitteeTooLarge { k: u8, escalations: u8 },
}

impl TaskSpec {
    /// `task_id = blake3(bincode(spec))`.
    pub fn id(&self) -> TaskId {
        // Encoding a spec of bounded size with the wire config cannot fail.
        TaskId(Hash32::of(&encode_body(self).unwrap_or_default()))
    }

    /// The seed of this task's committees: the client's entropy and the model only.
    pub fn committee_seed(&self) -> TaskId {
        let mut h = blake3::Hasher::new();
        h.update(b"sampo/v1/committee-seed");
        h.update(&self.client_entropy);
        h.update(&self.model.0.0);
        TaskId(Hash32(*h.finalize().as_bytes()))
    }

    /// The fee per 1,000 output tokens asked for: what orders work in every queue, so a
    /// large fee for a long task does not outrank a fair fee for a short one.
    pub fn fee_per_1k_tokens(&self) -> u64 {
        self.fee.saturating_mul(1000) / u64::from(self.params.max_tokens.max(1))
    }

    /// Structural limits every node checks before spending work on a task.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.k == 0 {
            return Err(SpecError::ZeroK);
        }
        if crate::committee_size(self.k, self.max_escalations) > MAX_COMMITTEE {
            return Err(SpecError::CommitteeTooLarge { k: self.k, escalations: self.max_escalations });
        }
        if self.prompt.byte_len() > MAX_PROMPT_BYTES {
            return Err(SpecError::PromptTooLong(self.prompt.byte_len()));
        }
        let p = &self.params;
        if p.max_tokens == 0 || p.max_tokens > MAX_OUTPUT_TOKENS {
            return Err(SpecError::MaxTokens(p.max_tokens));
        }
        if p.stop.len() > MAX_STOP_TOKENS {
            return Err(SpecError::TooManyStops(p.stop.len()));
        }
        if !p.temperature.is_finite() || !(0.0..=100.0).contains(&p.temperature) {
            return Err(SpecError::Temperature(p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(SpecError::TopP(p.top_p));
        }
        Ok(())
    }
}

/// Gossiped by the coordinator on `sampo/v1/tasks/<model_id>`. A substitution
/// re-announces the same attempt with a higher `revision` and a longer committee:
/// members are only ever appended, so the last revision names everyone who was asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskAnnouncement {
    pub spec: TaskSpec,
    /// 0 for the first committee, +1 per escalation.
    pub attempt: u8,
    pub revision: u16,
    pub committee: Vec<PeerId>,
    pub commit_deadline_ms: u64,
    pub reveal_deadline_ms: u64,
    /// The candidates (and weights) the committee was sampled from, at most
    /// [`MAX_CANDIDATES`]: anyone recomputes the committee from them
    /// ([`crate::committee::check_committee`]) and sees any choice or exclusion.
    pub candidates: Vec<crate::committee::Listed>,
}

/// Most candidates an announcement lists (the best-ranked for the task's seed).
pub const MAX_CANDIDATES: usize = 512;

impl Message for TaskAnnouncement {
    const KIND: MessageKind = MessageKind::TaskAnnouncement;
}

impl TaskAnnouncement {
    pub fn task_id(&self) -> TaskId {
        self.spec.id()
    }
}

/// A member's commitment to its output, without the output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub task: TaskId,
    pub attempt: u8,
    pub hash: Hash32,
}

impl Message for Commit {
    const KIND: MessageKind = MessageKind::Commit;
}

/// The coordinator closes the commit phase: exactly these commits count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealRequest {
    pub task: TaskId,
    pub attempt: u8,
    /// (member, commit hash), sorted by member.
    pub accepted: Vec<(PeerId, Hash32)>,
}

impl Message for RevealRequest {
    const KIND: MessageKind = MessageKind::RevealRequest;
}

/// A member opens its commitment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reveal {
    pub task: TaskId,
    pub attempt: u8,
    pub tokens: Vec<u32>,
    pub salt: [u8; 32],
}

impl Message for Reveal {
    const KIND: MessageKind = MessageKind::Reveal;
}

/// Why a member declines a seat. Each reason is one the coordinator can check against
/// the task it announced, so a decline costs the member its pay but not its standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// The fee per member and 1,000 output tokens is below the member's price.
    Price { price_per_1k: u64 },
    /// The task asks for more output tokens than the member serves.
    MaxTokens { limit: u32 },
    /// The prompt plus its output does not fit the member's context.
    Context { limit: u32 },
    /// The member's queue is full.
    Full,
}

impl DeclineReason {
    /// Whether the reason holds for `spec` at a committee of `seats` (the coordinator's
    /// first-hand check; a member stating a false reason is treated as absent).
    pub fn holds_for(&self, spec: &TaskSpec, seats: usize) -> bool {
        match self {
            DeclineReason::Price { price_per_1k } => {
                let per_member = spec.fee / seats.max(1) as u64;
                // Credits per member per 1,000 tokens, rounded down: below the price?
                let offered = per_member.saturating_mul(1000) / u64::from(spec.params.max_tokens.max(1));
                offered < *price_per_1k
            }
            DeclineReason::MaxTokens { limit } => spec.params.max_tokens > *limit,
            // A prompt has at most one token per byte plus its template's few; a task
            // that fits a stated context by that bound was declined on a false reason.
            DeclineReason::Context { limit } => {
                (spec.params.max_tokens as usize) + spec.prompt.byte_len() + TEMPLATE_SLACK_TOKENS > *limit as usize
            }
            DeclineReason::Full => true,
        }
    }
}

/// A member's signed refusal of a seat, for a stated reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decline {
    pub task: TaskId,
    pub attempt: u8,
    pub reason: DeclineReason,
}

impl Message for Decline {
    const KIND: MessageKind = MessageKind::Decline;
}

/// A node that replayed a finalized task and found that the model does not produce its
/// output says so on `sampo/v1/rounds`. It names the verdict by content address, so
/// every node that applied that verdict can check the claim by its own replay before
/// it acts on it: the proof convinces by re-execution, not by the prover's word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudProof {
    pub task: TaskId,
    pub attempt: u8,
    /// [`crate::SignedEnvelope::id`] of the verdict whose output is false.
    pub verdict: Hash32,
    /// First position (index into the output) where the model leaves the output.
    pub position: u32,
    /// The model's token there (`None`: the model stops there).
    pub expected: Option<u32>,
}

impl Message for FraudProof {
    const KIND: MessageKind = MessageKind::FraudProof;
}

/// How one committee member fared in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mark {
    /// Revealed the winning output.
    Agreed,
    /// Revealed another output, a reveal that does not open its commit, or two commits.
    Wrong,
    /// Did not commit in time, or committed and never revealed.
    Absent,
    /// Revealed in a round without a quorum: nothing is known about it.
    Undecided,
    /// Declined the seat for a reason that holds: no pay, no penalty.
    Declined,
}

/// The result of one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// An output had a quorum.
    Finalized { output: Vec<u32> },
    /// No quorum; the coordinator starts attempt + 1 with a larger committee.
    Escalated,
    /// No quorum and no escalation left.
    Disputed,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Finalized { .. } => "finalized",
            Outcome::Escalated => "escalated",
            Outcome::Disputed => "disputed",
        }
    }
}

/// Everything a third party needs to recompute a verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The last revision of the attempt's announcement.
    pub announcement: SignedEnvelope,
    /// Absent when the commit phase closed without a quorum of commits.
    pub reveal_request: Option<SignedEnvelope>,
    /// Every accepted commit.
    pub commits: Vec<SignedEnvelope>,
    /// Every reveal received for an accepted commit.
    pub reveals: Vec<SignedEnvelope>,
    /// Pairs of conflicting commits signed by one member.
    pub equivocations: Vec<(SignedEnvelope, SignedEnvelope)>,
    /// Signed declines, at most one per member, whose reasons hold.
    pub declines: Vec<SignedEnvelope>,
}

/// The coordinator's ruling on one attempt, with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub task: TaskId,
    pub attempt: u8,
    pub outcome: Outcome,
    /// Every committee member's mark, sorted by member.
    pub marks: Vec<(PeerId, Mark)>,
    /// Credits per agreeing member, sorted by member.
    pub payouts: Vec<(PeerId, u64)>,
    pub evidence: Evidence,
    pub decided_ms: u64,
}

impl Message for Verdict {
    const KIND: MessageKind = MessageKind::Verdict;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;

    pub(crate) fn spec() -> TaskSpec {
        TaskSpec {
            coordinator: NodeKey::from_seed([9; 32]).peer_id(),
            nonce: 1,
            created_ms: 1000,
            model: ModelId(Hash32::of(b"model")),
            prompt: Prompt::Text("hello".into()),
            params: SamplingParams::default(),
            k: 3,
            max_escalations: 1,
            fee: 90,
            client_entropy: [7; 32],
        }
    }

    #[test]
    fn task_id_depends_on_every_field() {
        let base = spec();
        let mut other = base.clone();
        other.nonce = 2;
        assert_ne!(base.id(), other.id());
        let mut other = base.clone();
        other.params.seed = 7;
        assert_ne!(base.id(), other.id());
        assert_eq!(base.id(), base.clone().id());
    }

    #[test]
    fn spec_limits_are_typed() {
        let mut s = spec();
        s.params.max_tokens = 0;
        assert_eq!(s.validate(), Err(SpecError::MaxTokens(0)));
        let mut s = spec();
        s.params.temperature = f32::NAN;
        assert!(matches!(s.validate(), Err(SpecError::Temperature(_))));
        let mut s = spec();
        s.prompt = Prompt::Text("x".repeat(MAX_PROMPT_BYTES + 1));
        assert!(matches!(s.validate(), Err(SpecError::PromptTooLong(_))));
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn messages_round_trip_through_envelopes() {
        let key = NodeKey::from_seed([1; 32]);
        let ann = TaskAnnouncement {
            spec: spec(),
            attempt: 0,
            revision: 0,
            committee: vec![key.peer_id()],
            commit_deadline_ms: 5,
            reveal_deadline_ms: 6,
            candidates: [key.peer_id()].iter().map(|p| crate::committee::Listed::new(*p, 1.0)).collect(),
        };
        let env = SignedEnvelope::seal(&key, &ann).expect("seal");
        let back = SignedEnvelope::from_bytes(&env.to_bytes()).expect("decode");
        assert_eq!(back.open::<TaskAnnouncement>().expect("open"), ann);
    }
}
