//! The sampo protocol, pure: message types, signed envelopes, committee sampling, the
//! commit-reveal round state machine, the verdict rule and its verification, and
//! reputation arithmetic.
//!
//! Nothing here performs I/O, reads a clock or spawns a task; time is passed in by the
//! caller. See `DESIGN.md` in the shared docs for the protocol this crate implements.

pub mod accountability;
pub mod admission;
pub mod committee;
pub mod envelope;
pub mod identity;
pub mod ids;
pub mod messages;
pub mod reputation;
pub mod round;
pub mod sim;
pub mod verdict;

pub use accountability::{Assessment, ReplayJudgement, assess, judge, needs_replay, outputs_to_replay, took_part};
pub use admission::{AdmissionCertificate, AdmissionError};
pub use committee::{
    Candidate, CommitteeError, Eligibility, Listed, candidate_list, check_committee, committee_size,
    max_probation_seats, next_from_list, quorum, sample, select,
};
pub use envelope::{
    EnvelopeError, MAX_ENVELOPE_BYTES, MAX_NESTED_ENVELOPES, Message, MessageKind, PROTOCOL_VERSION, SignedEnvelope,
};
pub use identity::{IdentityError, NodeKey};
pub use ids::{Hash32, ModelId, RecentIds, TaskId, commit_hash};
pub use libp2p_identity::PeerId;
pub use messages::{
    ChatMessage, Commit, Decline, DeclineReason, Evidence, FraudProof, MAX_CANDIDATES, MAX_COMMITTEE, Mark, ModelRef,
    NodeAnnouncement, Outcome, Prompt, Reveal, RevealRequest, SamplingParams, SpecError, TaskAnnouncement, TaskSpec,
    Verdict,
};
pub use reputation::{Reputation, ReputationParams};
pub use round::{Action, Behaviour, Consensus, LEFT_OUT_FRESH_MS, Phase, RoundError, RoundParams, RoundView, Topic};
pub use verdict::{Decision, EvidenceBundle, VerifiedVerdict, VerifyError, decide, split_fee, verify};
