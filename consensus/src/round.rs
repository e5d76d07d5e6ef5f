//! The commit-reveal round state machine: a node's coordinator rounds, its committee
//! duties, and the verdicts it sees, driven by messages and ticks with the time passed
//! in. Produces [`Action`]s for the node to carry out (publish, execute, apply).
//!
//! Every message the node publishes is also fed back into the machine at once, since
//! gossipsub does not deliver a node's own messages to itself: a coordinator that sits
//! on its own committee commits and reveals through the same path as everyone else.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::committee::{
    Candidate, CommitteeError, Eligibility, Listed, candidate_list, check_committee, committee_size,
    max_probation_seats, next_from_list, quorum, select,
};
use crate::envelope::{EnvelopeError, MessageKind, SignedEnvelope};
use crate::identity::NodeKey;
use crate::ids::{Hash32, ModelId, TaskId, commit_hash};
use crate::messages::{
    Commit, Decline, DeclineReason, Evidence, Mark, Outcome, Reveal, RevealRequest, SpecError, TaskAnnouncement,
    TaskSpec, Verdict,
};
use crate::verdict::{Tally, VerifiedVerdict, VerifyError, check, decide, verify};
use crate::{MAX_COMMITTEE, PeerId};

/// Timing and memory bounds of the state machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundParams {
    /// From announcement to the commit deadline: long enough to run the inference.
    pub commit_window_ms: u64,
    /// From the commit deadline to the reveal deadline.
    pub reveal_window_ms: u64,
    /// Substitutes a coordinator may seat per attempt for members that did not commit.
    pub max_substitutions: usize,
    /// Tasks this node may coordinate at once.
    pub max_coordinated: usize,
    /// Committee seats this node may hold at once.
    pub max_duties: usize,
    /// Seats one coordinator may hold on this node at once: one key cannot occupy them all.
    pub max_duties_per_coordinator: usize,
    /// Longest a seat is held, from when it was taken, whatever deadlines the
    /// announcement states (they are the coordinator's claim, on its clock).
    pub max_seat_ms: u64,
    /// Verdicts remembered to drop duplicates.
    pub verdict_memory: usize,
}

impl Default for RoundParams {
    fn default() -> Self {
        Self {
            commit_window_ms: 30_000,
            reveal_window_ms: 10_000,
            max_substitutions: 3,
            max_coordinated: 1024,
            max_duties: 256,
            max_duties_per_coordinator: 32,
            max_seat_ms: 10 * 60 * 1000,
            verdict_memory: 16_384,
        }
    }
}

/// Deliberate misbehaviour, for tests and `sampo testnet --byzantine`. A production node
/// runs `Honest`; the node refuses any other value unless started with an explicit flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    #[default]
    Honest,
    /// Commit and reveal a corrupted output.
    WrongOutput,
    /// Commit, never reveal.
    NeverReveal,
    /// Skip the work: copy another member's commit hash, then its reveal.
    CopyCommit,
    /// Sign two different commits.
    Equivocate,
    /// As a coordinator, every attack a single key can try on others' standing: gossip
    /// a forged verdict marking its committee absent, drop one member's commit,
    /// re-announce a finished attempt to fish for a second commit, and sign a second
    /// verdict for the same attempt.
    ByzantineCoordinator,
    /// Collude with the accomplices ([`Consensus::with_accomplices`]): commit and reveal
    /// a corrupted output (the same one every colluder makes) when this node and its
    /// accomplices hold a quorum of the committee; honest otherwise, so that no
    /// outvoted lie gives the colluders away.
    Collude,
}

/// Where a message is published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic {
    /// `sampo/v1/tasks/<model_id>`
    Tasks(ModelId),
    /// `sampo/v1/rounds`
    Rounds,
}

/// What the node must do next.
#[derive(Clone, Debug)]
pub enum Action {
    Publish {
        topic: Topic,
        envelope: SignedEnvelope,
        /// Who needs it: empty for everyone. A task's announcement and its reveal
        /// request concern the committee, a round's commits, declines and reveals the
        /// coordinator; everyone else learns them from the verdict. The transport may
        /// still send to more (the protocol never relies on who else sees a message).
        to: Vec<PeerId>,
    },
    /// Store this seat's commit durably (synced), then carry out the actions after it:
    /// the commit is published only once it can be answered again after a restart.
    StoreCommit {
        task: TaskId,
        attempt: u8,
        /// The committed output.
        tokens: Vec<u32>,
    },
    /// Run the inference for a committee seat, then call [`Consensus::executed`] (or
    /// [`Consensus::resume`] with the commit stored for this seat before).
    Execute { task: TaskId, attempt: u8, spec: Box<TaskSpec>, commit_deadline_ms: u64 },
    /// A verdict whose evidence checked out: apply it to storage.
    Apply(Box<VerifiedVerdict>),
    /// A verdict whose announcement for `model` has a candidate list (not full) that
    /// leaves this node out: if this node serves the model and the coordinator knows
    /// it, that is the coordinator's choice, recorded first-hand against it (the
    /// coordinator signed the list).
    LeftOut {
        coordinator: PeerId,
        model: ModelId,
        /// What a seat would pay per 1,000 output tokens: a node whose price is above
        /// it was not eligible, and was rightly left out.
        offered_per_1k: u64,
        /// When the task was created: whether this node could have been a candidate
        /// then (announcing long enough, with a free slot) is the node's to judge.
        created_ms: u64,
    },
    /// A task this node coordinates is over.
    Finished { task: TaskId, outcome: Outcome },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RoundError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("invalid task: {0}")]
    Spec(#[from] SpecError),
    #[error("verdict rejected: {0}")]
    Verdict(#[from] VerifyError),
    #[error("the {0} is not signed by the task's coordinator")]
    NotCoordinator(&'static str),
    #[error("{kind} from a peer that is not on the committee of task {task}")]
    NotOnCommittee { kind: &'static str, task: TaskId },
    #[error("this node coordinates {0} tasks already; try again later")]
    Busy(usize),
    #[error("only {found} eligible nodes for a committee that needs at least {need}")]
    NoCommittee { need: usize, found: usize },
    #[error("task {0} is already running")]
    Duplicate(TaskId),
    #[error("a task's coordinator must be the submitting node")]
    ForeignSpec,
    #[error("attempt {attempt} is beyond the {max} escalations the task allows")]
    AttemptOutOfRange { attempt: u8, max: u8 },
    #[error("deadlines out of order or too far ahead (commit {commit_ms}, reveal {reveal_ms})")]
    BadDeadlines { commit_ms: u64, reveal_ms: u64 },
    #[error("committee not sampled from its candidates: {0}")]
    Committee(#[from] CommitteeError),
}

impl RoundError {
    /// Whether the sender of the message deserves a gossip penalty.
    pub fn merits_penalty(&self) -> bool {
        match self {
            RoundError::Envelope(e) => e.merits_penalty(),
            RoundError::Spec(_)
            | RoundError::AttemptOutOfRange { .. }
            | RoundError::BadDeadlines { .. }
            | RoundError::Committee(_)
            | RoundError::Verdict(_)
            | RoundError::NotCoordinator(_)
            | RoundError::NotOnCommittee { .. } => true,
            RoundError::Busy(_)
            | RoundError::NoCommittee { .. }
            | RoundError::Duplicate(_)
            | RoundError::ForeignSpec => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Committing,
    Revealing,
    /// A verdict without a quorum was published; the next tick seats a larger committee.
    Escalating,
    /// ByzantineCoordinator: a verdict was published; waiting to re-announce the attempt.
    Lingering,
}

/// A coordinator's view of one of its tasks, for the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundView {
    pub task: TaskId,
    pub attempt: u8,
    pub phase: Phase,
    pub committee: Vec<PeerId>,
    pub commits: usize,
    pub reveals: usize,
    pub commit_deadline_ms: u64,
    pub reveal_deadline_ms: u64,
}

struct Coordinated {
    task: TaskId,
    ann: TaskAnnouncement,
    ann_env: SignedEnvelope,
    eligibility: Eligibility,
    phase: Phase,
    /// First commit per member.
    commits: BTreeMap<PeerId, SignedEnvelope>,
    hashes: BTreeMap<PeerId, Hash32>,
    /// Members in the order their first commit arrived: the first `size` count.
    arrival: Vec<PeerId>,
    equivocations: Vec<(SignedEnvelope, SignedEnvelope)>,
    equivocators: BTreeSet<PeerId>,
    request: Option<(SignedEnvelope, BTreeMap<PeerId, Hash32>)>,
    /// At most [`REVEALS_PER_MEMBER`] per member.
    reveals: BTreeMap<PeerId, Vec<SignedEnvelope>>,
    /// First decline per member whose reason holds.
    declines: BTreeMap<PeerId, SignedEnvelope>,
    /// Members whose commit or decline came before the deadline but after the commit
    /// phase closed early: the verdict marks them absent, this node does not.
    excused: BTreeSet<PeerId>,
    /// The commit deadline each member was given when it was seated.
    seated_deadline: BTreeMap<PeerId, u64>,
    substitutions: usize,
    late_commits: u64,
    /// ByzantineCoordinator: the first round's commit per member, kept across the
    /// re-announcement; `Some` once the attempt was re-announced.
    fishing: Option<BTreeMap<PeerId, SignedEnvelope>>,
    /// ByzantineCoordinator: re-announce once the members' seats have expired.
    linger_until_ms: u64,
    /// Verdicts of this task's escalated attempts, applied (stored: the store serves
    /// evidence to anyone who asks) and published only once the task ends: their
    /// evidence holds the outputs revealed so far, which no later attempt's committee may
    /// see before it commits (publishing them once the next attempt's commits closed let
    /// a third attempt's committee see the first attempt's outputs).
    held: Vec<Sealed>,
}

/// A verdict this node sealed, with the verdict itself: fed back to this node, it is
/// checked without opening the envelope again (opening checks every nested signature,
/// which this node checked as each message came in).
type Sealed = (SignedEnvelope, Box<Verdict>);

/// A member gets two tries at a reveal that opens its commit; more is noise.
const REVEALS_PER_MEMBER: usize = 2;

impl Coordinated {
    fn size(&self) -> usize {
        committee_size(self.ann.spec.k, self.ann.attempt)
    }
    fn honest_commits(&self) -> usize {
        self.arrival.iter().filter(|p| !self.equivocators.contains(p)).count()
    }
    fn view(&self) -> RoundView {
        RoundView {
            task: self.task,
            attempt: self.ann.attempt,
            phase: self.phase,
            committee: self.ann.committee.clone(),
            commits: self.commits.len(),
            reveals: self.reveals.len(),
            commit_deadline_ms: self.ann.commit_deadline_ms,
            reveal_deadline_ms: self.ann.reveal_deadline_ms,
        }
    }
}

enum DutyState {
    Executing,
    Committed {
        tokens: Vec<u32>,
        salt: [u8; 32],
        hash: Hash32,
    },
    /// CopyCommit: waiting for a victim's commit, then its reveal.
    Copying {
        victim: Option<PeerId>,
        hash: Option<Hash32>,
    },
    Done,
}

struct Duty {
    coordinator: PeerId,
    committee: Vec<PeerId>,
    /// When the seat frees itself: the announced reveal deadline, capped at
    /// `seated_ms + max_seat_ms` on this node's clock.
    reveal_deadline_ms: u64,
    seated_ms: u64,
    state: DutyState,
}

/// One node's consensus state: the tasks it coordinates, the seats it holds, and the
/// verdicts it has applied.
pub struct Consensus {
    key: NodeKey,
    me: PeerId,
    params: RoundParams,
    behaviour: Behaviour,
    accomplices: Vec<PeerId>,
    coordinated: HashMap<TaskId, Coordinated>,
    duties: HashMap<(TaskId, u8), Duty>,
    /// Content address of the first verdict seen per (task, attempt).
    seen_verdicts: HashMap<(TaskId, u8), Hash32>,
    seen_order: VecDeque<(TaskId, u8)>,
    /// Envelopes this node published, fed back before control returns (a verdict with
    /// its open form).
    loopback: VecDeque<(SignedEnvelope, Option<Box<Verdict>>)>,
    /// Members of this node's recent rounds that were in time but marked absent.
    excused: VecDeque<((TaskId, u8), BTreeSet<PeerId>)>,
}

/// Rounds whose excused members are remembered (until their verdicts are applied).
const EXCUSED_MEMORY: usize = 1024;

/// How old a verdict may be and still tell a node it was left out (see
/// [`Action::LeftOut`]): old verdicts can be gossiped again by anyone.
pub const LEFT_OUT_FRESH_MS: u64 = 120_000;

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus")
            .field("me", &self.me)
            .field("coordinated", &self.coordinated.len())
            .field("duties", &self.duties.len())
            .finish_non_exhaustive()
    }
}

fn seal<M: crate::Message>(key: &NodeKey, m: &M) -> SignedEnvelope {
    // Our own messages are bounded by the spec limits checked at submission, far below
    // the envelope limit; a failure here is a bug, not input.
    match SignedEnvelope::seal(key, m) {
        Ok(e) => e,
        Err(e) => unreachable!("sealing a bounded {} failed: {e}", M::KIND.as_str()),
    }
}

impl Consensus {
    pub fn new(key: NodeKey, params: RoundParams) -> Self {
        Self {
            me: key.peer_id(),
            key,
            params,
            behaviour: Behaviour::Honest,
            accomplices: Vec::new(),
            coordinated: HashMap::new(),
            duties: HashMap::new(),
            seen_verdicts: HashMap::new(),
            seen_order: VecDeque::new(),
            loopback: VecDeque::new(),
            excused: VecDeque::new(),
        }
    }

    /// Misbehave on purpose (tests, byzantine testnet nodes).
    pub fn with_behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    /// Members of this node's round (task, attempt) that its verdict marks absent
    /// although their commit (or decline) arrived before the deadline, after the phase
    /// closed early: this node must not hold that against them.
    pub fn excused(&self, task: &TaskId, attempt: u8) -> BTreeSet<PeerId> {
        self.excused.iter().find(|(k, _)| *k == (*task, attempt)).map(|(_, s)| s.clone()).unwrap_or_default()
    }

    /// The colluders this node lies with under [`Behaviour::Collude`].
    pub fn with_accomplices(mut self, accomplices: Vec<PeerId>) -> Self {
        self.accomplices = accomplices;
        self
    }

    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// Sign a message with this node's key (fraud proofs, which the node publishes
    /// outside any round); `None` only if it would not fit an envelope.
    pub fn sign<M: crate::Message>(&self, m: &M) -> Option<SignedEnvelope> {
        SignedEnvelope::seal(&self.key, m).ok()
    }

    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    /// Tasks coordinated and seats held right now.
    pub fn load(&self) -> (usize, usize) {
        (self.coordinated.len(), self.duties.len())
    }

    pub fn view(&self, task: &TaskId) -> Option<RoundView> {
        self.coordinated.get(task).map(Coordinated::view)
    }

    /// Start coordinating a task: sample its committee from `candidates` and announce it.
    pub fn submit(
        &mut self,
        spec: TaskSpec,
        max_price_per_1k: Option<u64>,
        candidates: &[Candidate],
        now_ms: u64,
    ) -> Result<(TaskId, Vec<Action>), RoundError> {
        spec.validate()?;
        if spec.coordinator != self.me {
            return Err(RoundError::ForeignSpec);
        }
        let task = spec.id();
        if self.coordinated.contains_key(&task) {
            return Err(RoundError::Duplicate(task));
        }
        if self.coordinated.len() >= self.params.max_coordinated {
            return Err(RoundError::Busy(self.coordinated.len()));
        }
        let eligibility = Eligibility { model: spec.model, max_price_per_1k };
        let size = committee_size(spec.k, 0);
        let seed = spec.committee_seed();
        let list = candidate_list(&seed, 0, candidates, &eligibility, crate::messages::MAX_CANDIDATES);
        let committee = select(&seed, 0, &list, size, max_probation_seats(size));
        if committee.len() < quorum(size) {
            return Err(RoundError::NoCommittee { need: quorum(size), found: committee.len() });
        }
        let mut actions = Vec::new();
        if self.behaviour == Behaviour::ByzantineCoordinator {
            self.forge_absent_verdict(&spec, &committee, now_ms, &mut actions);
        }
        self.announce(spec, 0, (committee, list), eligibility, now_ms, &mut actions);
        self.drain_loopback(now_ms, &mut actions);
        Ok((task, actions))
    }

    fn announce(
        &mut self,
        spec: TaskSpec,
        attempt: u8,
        (committee, candidates): (Vec<PeerId>, Vec<Listed>),
        eligibility: Eligibility,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let task = spec.id();
        let commit_deadline_ms = now_ms + self.params.commit_window_ms;
        let ann = TaskAnnouncement {
            spec,
            attempt,
            revision: 0,
            committee,
            commit_deadline_ms,
            reveal_deadline_ms: commit_deadline_ms + self.params.reveal_window_ms,
            candidates,
        };
        let ann_env = seal(&self.key, &ann);
        self.publish_to(Topic::Tasks(ann.spec.model), ann_env.clone(), ann.committee.clone(), actions);
        let committee_deadlines = ann.committee.iter().map(|p| (*p, commit_deadline_ms)).collect();
        self.coordinated.insert(
            task,
            Coordinated {
                task,
                ann,
                ann_env,
                eligibility,
                phase: Phase::Committing,
                commits: BTreeMap::new(),
                hashes: BTreeMap::new(),
                arrival: Vec::new(),
                equivocations: Vec::new(),
                equivocators: BTreeSet::new(),
                request: None,
                reveals: BTreeMap::new(),
                declines: BTreeMap::new(),
                excused: BTreeSet::new(),
                seated_deadline: committee_deadlines,
                substitutions: 0,
                late_commits: 0,
                fishing: None,
                linger_until_ms: 0,
                held: Vec::new(),
            },
        );
    }

    /// Apply and publish verdicts held back (see `Coordinated::held`).
    fn publish_held(&mut self, held: Vec<Sealed>, actions: &mut Vec<Action>) {
        for sealed in held {
            self.publish_verdict(sealed, actions);
        }
    }

    fn publish_verdict(&mut self, (envelope, verdict): Sealed, actions: &mut Vec<Action>) {
        self.loopback.push_back((envelope.clone(), Some(verdict)));
        actions.push(Action::Publish { topic: Topic::Rounds, envelope, to: Vec::new() });
    }

    fn publish(&mut self, topic: Topic, envelope: SignedEnvelope, actions: &mut Vec<Action>) {
        self.publish_to(topic, envelope, Vec::new(), actions);
    }

    /// Publish for `to` (see [`Action::Publish`]); this node sees its own message too.
    fn publish_to(&mut self, topic: Topic, envelope: SignedEnvelope, to: Vec<PeerId>, actions: &mut Vec<Action>) {
        self.loopback.push_back((envelope.clone(), None));
        actions.push(Action::Publish { topic, envelope, to });
    }

    fn drain_loopback(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        while let Some((env, own_verdict)) = self.loopback.pop_front() {
            // Our own messages are valid by construction; an error here would only mean
            // a stale duplicate, which is safe to drop.
            match own_verdict {
                Some(verdict) => {
                    if let Ok(verified) = check(*verdict, &env) {
                        self.accept_verified(verified, &env, now_ms, actions);
                    }
                }
                None => {
                    let _ = self.dispatch(&env, now_ms, actions);
                }
            }
        }
    }

    /// Feed a verified envelope received from the network.
    pub fn handle(&mut self, env: &SignedEnvelope, now_ms: u64) -> Result<Vec<Action>, RoundError> {
        let mut actions = Vec::new();
        let result = self.dispatch(env, now_ms, &mut actions);
        self.drain_loopback(now_ms, &mut actions);
        result.map(|()| actions)
    }

    fn dispatch(&mut self, env: &SignedEnvelope, now_ms: u64, actions: &mut Vec<Action>) -> Result<(), RoundError> {
        match env.kind() {
            MessageKind::TaskAnnouncement => self.on_announcement(env, now_ms, actions),
            MessageKind::Commit => self.on_commit(env, now_ms, actions),
            MessageKind::RevealRequest => self.on_reveal_request(env, actions),
            MessageKind::Reveal => self.on_reveal(env, now_ms, actions),
            MessageKind::Verdict => self.on_verdict(env, now_ms, actions),
            MessageKind::Decline => self.on_decline(env, now_ms),
            // Fraud proofs are checked by replay, outside the round machine.
            MessageKind::FraudProof => Ok(()),
            // Registry traffic is not the round machine's business.
            MessageKind::NodeAnnouncement => Ok(()),
        }
    }

    fn on_announcement(
        &mut self,
        env: &SignedEnvelope,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), RoundError> {
        let ann: TaskAnnouncement = env.open()?;
        if env.signer() != ann.spec.coordinator {
            return Err(RoundError::NotCoordinator("task announcement"));
        }
        ann.spec.validate()?;
        if ann.attempt > ann.spec.max_escalations {
            return Err(RoundError::AttemptOutOfRange { attempt: ann.attempt, max: ann.spec.max_escalations });
        }
        // Deadlines in the wrong order, or a commit deadline beyond how long a seat may
        // be held: no honest coordinator announces that.
        if ann.reveal_deadline_ms <= ann.commit_deadline_ms
            || ann.commit_deadline_ms > now_ms.saturating_add(self.params.max_seat_ms)
        {
            return Err(RoundError::BadDeadlines {
                commit_ms: ann.commit_deadline_ms,
                reveal_ms: ann.reveal_deadline_ms,
            });
        }
        if ann.committee.len() > MAX_COMMITTEE * 2 {
            return Err(RoundError::Spec(SpecError::CommitteeTooLarge {
                k: ann.spec.k,
                escalations: ann.spec.max_escalations,
            }));
        }
        // Announcements that don't seat us (gossiped when a member could not be sent
        // one directly) cost a decode and a hash, and leave no state. Whether the
        // candidate list left this node out is read from the verdict, which everyone
        // gets.
        if !ann.committee.contains(&self.me) {
            return Ok(());
        }
        // Our seat must follow from the announced candidates, not from the coordinator's
        // choice.
        check_committee(
            &ann.spec.committee_seed(),
            ann.attempt,
            &ann.candidates,
            max_probation_seats(committee_size(ann.spec.k, ann.attempt)),
            &ann.committee,
        )?;
        let task = ann.task_id();
        let key = (task, ann.attempt);
        if let Some(duty) = self.duties.get_mut(&key) {
            if duty.coordinator == env.signer() {
                duty.committee = ann.committee.clone();
                let cap = duty.seated_ms.saturating_add(self.params.max_seat_ms);
                duty.reveal_deadline_ms = duty.reveal_deadline_ms.max(ann.reveal_deadline_ms).min(cap);
            }
            return Ok(());
        }
        // Seats still owed work count against the caps; finished ones (revealed,
        // declined) linger only to recognise re-announcements, and must not crowd out a
        // busy honest coordinator's next task.
        let open = |d: &&Duty| !matches!(d.state, DutyState::Done);
        if now_ms >= ann.commit_deadline_ms
            || self.duties.values().filter(open).count() >= self.params.max_duties
            || self.duties.len() >= 8 * self.params.max_duties
        {
            return Ok(());
        }
        let coordinator = ann.spec.coordinator;
        if self.duties.values().filter(open).filter(|d| d.coordinator == coordinator).count()
            >= self.params.max_duties_per_coordinator
        {
            return Ok(());
        }
        let state = match self.behaviour {
            Behaviour::CopyCommit => DutyState::Copying { victim: None, hash: None },
            _ => DutyState::Executing,
        };
        self.duties.insert(
            key,
            Duty {
                coordinator: ann.spec.coordinator,
                committee: ann.committee.clone(),
                reveal_deadline_ms: ann.reveal_deadline_ms.min(now_ms.saturating_add(self.params.max_seat_ms)),
                seated_ms: now_ms,
                state,
            },
        );
        if self.behaviour != Behaviour::CopyCommit {
            actions.push(Action::Execute {
                task,
                attempt: ann.attempt,
                commit_deadline_ms: ann.commit_deadline_ms,
                spec: Box::new(ann.spec),
            });
        }
        Ok(())
    }

    /// The inference for a seat finished with `tokens`: store the commit, then publish it.
    pub fn executed(&mut self, task: TaskId, attempt: u8, tokens: Vec<u32>, now_ms: u64) -> Vec<Action> {
        let mut tokens = tokens;
        let colluding = self.behaviour == Behaviour::Collude
            && self.duties.get(&(task, attempt)).is_some_and(|d| {
                let ours = d.committee.iter().filter(|p| **p == self.me || self.accomplices.contains(p)).count();
                ours >= quorum(d.committee.len())
            });
        if self.behaviour == Behaviour::WrongOutput || colluding {
            corrupt(&mut tokens);
        }
        self.commit_seat(task, attempt, tokens, true, now_ms)
    }

    /// A seat this node committed to before (a re-announcement, or a restart): commit
    /// to the stored output again. The salt is derived, so the commit is the same one.
    pub fn resume(&mut self, task: TaskId, attempt: u8, committed: Vec<u32>, now_ms: u64) -> Vec<Action> {
        self.commit_seat(task, attempt, committed, false, now_ms)
    }

    /// Refuse a seat, signed, for a reason the coordinator can check.
    pub fn decline(&mut self, task: TaskId, attempt: u8, reason: DeclineReason, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(duty) = self.duties.get_mut(&(task, attempt)) else { return actions };
        if !matches!(duty.state, DutyState::Executing) {
            return actions;
        }
        duty.state = DutyState::Done;
        let coordinator = duty.coordinator;
        let env = seal(&self.key, &Decline { task, attempt, reason });
        self.publish_to(Topic::Rounds, env, vec![coordinator], &mut actions);
        self.drain_loopback(now_ms, &mut actions);
        actions
    }

    fn commit_seat(&mut self, task: TaskId, attempt: u8, tokens: Vec<u32>, store: bool, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(duty) = self.duties.get_mut(&(task, attempt)) else { return actions };
        if !matches!(duty.state, DutyState::Executing) {
            return actions;
        }
        let salt = self.key.commit_salt(&task, attempt);
        let hash = commit_hash(&task, &self.me, &tokens, &salt);
        duty.state = DutyState::Committed { tokens: tokens.clone(), salt, hash };
        let coordinator = duty.coordinator;
        if store {
            actions.push(Action::StoreCommit { task, attempt, tokens: tokens.clone() });
        }
        let commit = seal(&self.key, &Commit { task, attempt, hash });
        self.publish_to(Topic::Rounds, commit, vec![coordinator], &mut actions);
        if self.behaviour == Behaviour::Equivocate {
            let mut other = tokens;
            corrupt(&mut other);
            let second = seal(&self.key, &Commit { task, attempt, hash: commit_hash(&task, &self.me, &other, &salt) });
            self.publish_to(Topic::Rounds, second, vec![coordinator], &mut actions);
        }
        self.drain_loopback(now_ms, &mut actions);
        actions
    }

    fn on_commit(&mut self, env: &SignedEnvelope, now_ms: u64, actions: &mut Vec<Action>) -> Result<(), RoundError> {
        let c: Commit = env.open()?;
        let who = env.signer();
        self.copy_commit_hook(&c, who, actions);
        let Some(round) = self.coordinated.get_mut(&c.task) else { return Ok(()) };
        if c.attempt != round.ann.attempt {
            return Ok(());
        }
        if !round.ann.committee.contains(&who) {
            return Err(RoundError::NotOnCommittee { kind: "commit", task: c.task });
        }
        if self.behaviour == Behaviour::ByzantineCoordinator {
            // Drop the first other member's real commit, so that it looks absent.
            if round.ann.committee.iter().find(|p| **p != self.me) == Some(&who) && round.fishing.is_none() {
                return Ok(());
            }
            // Fishing: a second commit that differs from the first is kept as "proof".
            if let Some(first) = round.fishing.as_ref().and_then(|f| f.get(&who))
                && first.open::<Commit>().is_ok_and(|f| f.hash != c.hash)
                && !round.equivocators.contains(&who)
            {
                round.equivocations.push((first.clone(), env.clone()));
                round.equivocators.insert(who);
                return Ok(());
            }
        }
        if let Some(prev) = round.hashes.get(&who) {
            if *prev != c.hash && !round.equivocators.contains(&who) {
                // Two signed commits for one seat: kept as proof, punished in the verdict.
                if let Some(first) = round.commits.get(&who) {
                    round.equivocations.push((first.clone(), env.clone()));
                }
                round.equivocators.insert(who);
            }
            return Ok(());
        }
        if round.phase != Phase::Committing {
            // After the reveal request nobody may join: they could copy a revealed output.
            round.late_commits += 1;
            // But it came in time: closing early was our choice, so it is not absent.
            if round.seated_deadline.get(&who).is_some_and(|d| now_ms < *d) {
                round.excused.insert(who);
            }
            return Ok(());
        }
        round.hashes.insert(who, c.hash);
        round.commits.insert(who, env.clone());
        round.arrival.push(who);
        if round.honest_commits() >= round.size() {
            let task = c.task;
            self.close_commits(task, actions);
        }
        Ok(())
    }

    /// A seated member declines: recorded when its reason holds for the task, so the
    /// verdict marks it declined (no pay, no penalty) instead of absent.
    fn on_decline(&mut self, env: &SignedEnvelope, now_ms: u64) -> Result<(), RoundError> {
        let d: Decline = env.open()?;
        let who = env.signer();
        let Some(round) = self.coordinated.get_mut(&d.task) else { return Ok(()) };
        if d.attempt != round.ann.attempt {
            return Ok(());
        }
        if !round.ann.committee.contains(&who) {
            return Err(RoundError::NotOnCommittee { kind: "decline", task: d.task });
        }
        if round.phase != Phase::Committing {
            let in_time = round.seated_deadline.get(&who).is_some_and(|d| now_ms < *d);
            if in_time && d.reason.holds_for(&round.ann.spec, round.size()) {
                round.excused.insert(who);
            }
            return Ok(());
        }
        if round.hashes.contains_key(&who) || round.declines.contains_key(&who) {
            return Ok(());
        }
        // A false reason is ignored: the member is then absent, first-hand.
        if d.reason.holds_for(&round.ann.spec, round.size()) {
            round.declines.insert(who, env.clone());
        }
        Ok(())
    }

    fn close_commits(&mut self, task: TaskId, actions: &mut Vec<Action>) {
        let Some(round) = self.coordinated.get_mut(&task) else { return };
        let size = round.size();
        let accepted: BTreeMap<PeerId, Hash32> = round
            .arrival
            .iter()
            .filter(|p| !round.equivocators.contains(p))
            .take(size)
            .filter_map(|p| round.hashes.get(p).map(|h| (*p, *h)))
            .collect();
        let req = RevealRequest {
            task,
            attempt: round.ann.attempt,
            accepted: accepted.iter().map(|(p, h)| (*p, *h)).collect(),
        };
        let env = seal(&self.key, &req);
        round.request = Some((env.clone(), accepted));
        round.phase = Phase::Revealing;
        // The whole committee: a member left out learns that its seat is over. Earlier
        // attempts' verdicts stay held: this attempt may escalate again, and the next
        // committee must not see any output before it commits.
        let committee = round.ann.committee.clone();
        self.publish_to(Topic::Rounds, env, committee, actions);
    }

    fn on_reveal_request(&mut self, env: &SignedEnvelope, actions: &mut Vec<Action>) -> Result<(), RoundError> {
        let req: RevealRequest = env.open()?;
        let Some(duty) = self.duties.get_mut(&(req.task, req.attempt)) else { return Ok(()) };
        if env.signer() != duty.coordinator {
            return Err(RoundError::NotCoordinator("reveal request"));
        }
        let mine = req.accepted.iter().find(|(p, _)| *p == self.me).map(|(_, h)| *h);
        let reveal = match (&duty.state, mine) {
            (DutyState::Committed { tokens, salt, hash }, Some(h)) if h == *hash => {
                Some(Reveal { task: req.task, attempt: req.attempt, tokens: tokens.clone(), salt: *salt })
            }
            _ => None,
        };
        if !matches!(duty.state, DutyState::Copying { .. }) {
            duty.state = DutyState::Done;
        }
        let coordinator = duty.coordinator;
        if let Some(r) = reveal
            && self.behaviour != Behaviour::NeverReveal
        {
            let env = seal(&self.key, &r);
            self.publish_to(Topic::Rounds, env, vec![coordinator], actions);
        }
        Ok(())
    }

    fn on_reveal(&mut self, env: &SignedEnvelope, now_ms: u64, actions: &mut Vec<Action>) -> Result<(), RoundError> {
        let r: Reveal = env.open()?;
        let who = env.signer();
        self.copy_reveal_hook(&r, who, actions);
        let Some(round) = self.coordinated.get_mut(&r.task) else { return Ok(()) };
        if r.attempt != round.ann.attempt || round.phase != Phase::Revealing {
            return Ok(());
        }
        // Longer than the task allows: not an answer, and it must not bloat the verdict.
        if r.tokens.len() > round.ann.spec.params.max_tokens as usize {
            return Ok(());
        }
        if !round.ann.committee.contains(&who) {
            return Err(RoundError::NotOnCommittee { kind: "reveal", task: r.task });
        }
        let Some((_, accepted)) = &round.request else { return Ok(()) };
        if !accepted.contains_key(&who) {
            return Ok(());
        }
        let list = round.reveals.entry(who).or_default();
        if list.len() >= REVEALS_PER_MEMBER || list.iter().any(|e| e == env) {
            return Ok(());
        }
        list.push(env.clone());
        let opened = |round: &Coordinated, p: &PeerId, h: &Hash32| {
            round.reveals.get(p).is_some_and(|l| {
                l.iter()
                    .any(|e| e.open::<Reveal>().is_ok_and(|r| commit_hash(&round.task, p, &r.tokens, &r.salt) == *h))
            })
        };
        if accepted.iter().all(|(p, h)| opened(round, p, h)) {
            let task = r.task;
            self.finish(task, now_ms, actions);
        }
        Ok(())
    }

    fn on_verdict(&mut self, env: &SignedEnvelope, now_ms: u64, actions: &mut Vec<Action>) -> Result<(), RoundError> {
        let verified = verify(env)?;
        self.accept_verified(verified, env, now_ms, actions);
        Ok(())
    }

    /// Feed a verdict that was verified off the caller's loop ([`crate::verify`] is the
    /// expensive part: every nested signature).
    pub fn handle_verified(&mut self, verified: VerifiedVerdict, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let env = verified.envelope.clone();
        self.accept_verified(verified, &env, now_ms, &mut actions);
        self.drain_loopback(now_ms, &mut actions);
        actions
    }

    fn accept_verified(
        &mut self,
        verified: VerifiedVerdict,
        env: &SignedEnvelope,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let key = (verified.task(), verified.verdict.attempt);
        let id = env.id();
        match self.seen_verdicts.get(&key) {
            Some(first) if *first == id => return,
            // A second, different verdict for one attempt, both signed by the task's
            // coordinator: passed on, so that the store records the equivocation.
            Some(_) => {
                actions.push(Action::Apply(Box::new(verified)));
                return;
            }
            None => {
                self.seen_verdicts.insert(key, id);
            }
        }
        // Only a recent verdict: anyone may gossip an old one again, and a node that has
        // forgotten it (restarted, or past `verdict_memory`) would count it once more.
        if now_ms <= verified.verdict.decided_ms.saturating_add(LEFT_OUT_FRESH_MS)
            && let Some(left_out) = self.left_out(&verified)
        {
            actions.push(left_out);
        }
        self.seen_order.push_back(key);
        while self.seen_order.len() > self.params.verdict_memory {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen_verdicts.remove(&old);
            }
        }
        actions.push(Action::Apply(Box::new(verified)));
    }

    /// [`Action::LeftOut`] when the candidate list of `v`'s announcement (not full)
    /// leaves this node out of a round it neither coordinates nor sits in.
    fn left_out(&self, v: &VerifiedVerdict) -> Option<Action> {
        if v.committee.contains(&self.me)
            || v.coordinator == self.me
            || v.candidates.len() >= crate::messages::MAX_CANDIDATES
            || v.candidates.iter().any(|c| c.peer == self.me)
        {
            return None;
        }
        let spec = &v.spec;
        let seats = committee_size(spec.k, v.verdict.attempt).max(1) as u64;
        let offered_per_1k = (spec.fee / seats).saturating_mul(1000) / u64::from(spec.params.max_tokens.max(1));
        Some(Action::LeftOut {
            coordinator: v.coordinator,
            model: spec.model,
            offered_per_1k,
            created_ms: spec.created_ms,
        })
    }

    /// Publish the verdict of a coordinated round.
    fn finish(&mut self, task: TaskId, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(round) = self.coordinated.get_mut(&task) else { return };
        let attempt = round.ann.attempt;
        let (request_sent, committed, commit_envs) = match &round.request {
            Some((_, accepted)) => {
                (true, accepted.clone(), accepted.keys().filter_map(|p| round.commits.get(p).cloned()).collect())
            }
            None => (false, round.hashes.clone(), round.commits.values().cloned().collect::<Vec<_>>()),
        };
        // One reveal per member goes into the evidence: the one that opens its commit if
        // any does, else the first. The ruling is the same, and the verdict stays small.
        let mut reveals: BTreeMap<PeerId, Vec<Reveal>> = BTreeMap::new();
        let mut reveal_envs = Vec::new();
        for (p, list) in &round.reveals {
            let opened: Vec<(Reveal, &SignedEnvelope)> =
                list.iter().filter_map(|e| e.open::<Reveal>().ok().map(|r| (r, e))).collect();
            let opens = |r: &Reveal| committed.get(p).is_some_and(|h| commit_hash(&task, p, &r.tokens, &r.salt) == *h);
            let pick = opened.iter().position(|(r, _)| opens(r)).or((!opened.is_empty()).then_some(0));
            if let Some(i) = pick {
                reveals.entry(*p).or_default().push(opened[i].0.clone());
                reveal_envs.push(opened[i].1.clone());
            }
        }
        let declined: BTreeSet<PeerId> =
            round.declines.keys().filter(|p| !committed.contains_key(p)).copied().collect();
        let decision = decide(&Tally {
            spec: &round.ann.spec,
            task,
            attempt,
            committee: &round.ann.committee,
            request_sent,
            committed: &committed,
            reveals: &reveals,
            equivocators: &round.equivocators,
            declined: &declined,
        });
        let verdict = Verdict {
            task,
            attempt,
            outcome: decision.outcome.clone(),
            marks: decision.marks,
            payouts: decision.payouts,
            evidence: Evidence {
                announcement: round.ann_env.clone(),
                reveal_request: round.request.as_ref().map(|(e, _)| e.clone()),
                commits: commit_envs,
                reveals: reveal_envs,
                equivocations: round.equivocations.clone(),
                declines: round
                    .declines
                    .iter()
                    .filter(|(p, _)| !committed.contains_key(p))
                    .map(|(_, e)| e.clone())
                    .collect(),
            },
            decided_ms: now_ms,
        };
        let env = seal(&self.key, &verdict);
        // Members the verdict marks absent without an accepted commit, whose own commit
        // deadline had not passed when the round closed early: not absent first-hand.
        for (p, m) in &verdict.marks {
            if *m == Mark::Absent
                && !committed.contains_key(p)
                && round.seated_deadline.get(p).is_some_and(|d| now_ms < *d)
            {
                round.excused.insert(*p);
            }
        }
        if !round.excused.is_empty() {
            self.excused.push_back(((task, attempt), round.excused.clone()));
            while self.excused.len() > EXCUSED_MEMORY {
                self.excused.pop_front();
            }
        }
        if self.behaviour == Behaviour::ByzantineCoordinator && round.fishing.is_none() {
            // Keep the round: once the members' seats expire, re-announce the attempt.
            round.phase = Phase::Lingering;
            round.linger_until_ms = round.ann.reveal_deadline_ms + 1000;
        } else if decision.outcome == Outcome::Escalated {
            round.phase = Phase::Escalating;
            // Applied and published when the task ends (see `Coordinated::held`).
            round.held.push((env, Box::new(verdict)));
            return;
        } else {
            let held = std::mem::take(&mut round.held);
            self.coordinated.remove(&task);
            actions.push(Action::Finished { task, outcome: decision.outcome });
            self.publish_held(held, actions);
        }
        self.publish_verdict((env, Box::new(verdict)), actions);
    }

    /// Advance deadlines: close commit phases (or seat substitutes), rule on rounds whose
    /// reveal deadline passed, escalate, and forget expired seats.
    pub fn tick(&mut self, now_ms: u64, candidates: &[Candidate]) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut tasks: Vec<TaskId> = self.coordinated.keys().copied().collect();
        tasks.sort();
        for task in tasks {
            let Some(round) = self.coordinated.get(&task) else { continue };
            match round.phase {
                Phase::Committing if now_ms >= round.ann.commit_deadline_ms => {
                    self.commit_deadline(task, now_ms, &mut actions)
                }
                Phase::Revealing if now_ms >= round.ann.reveal_deadline_ms => self.finish(task, now_ms, &mut actions),
                Phase::Escalating => self.escalate(task, now_ms, candidates, &mut actions),
                Phase::Lingering if now_ms >= round.linger_until_ms => self.reannounce(task, now_ms, &mut actions),
                _ => {}
            }
        }
        // A seat whose inference still runs keeps counting (up to the seat cap), so that
        // short deadlines cannot queue unbounded work past the per-coordinator limit.
        let cap = self.params.max_seat_ms;
        self.duties.retain(|_, d| {
            now_ms < d.reveal_deadline_ms
                || (matches!(d.state, DutyState::Executing) && now_ms < d.seated_ms.saturating_add(cap))
        });
        self.drain_loopback(now_ms, &mut actions);
        actions
    }

    fn commit_deadline(&mut self, task: TaskId, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(round) = self.coordinated.get_mut(&task) else { return };
        let size = round.size();
        let honest = round.honest_commits();
        if honest >= quorum(size) {
            self.close_commits(task, actions);
            return;
        }
        let room = self
            .params
            .max_substitutions
            .saturating_sub(round.substitutions)
            .min(2 * size - round.ann.committee.len().min(2 * size));
        let wanted = (size - honest).min(room);
        let subs = if wanted > 0 {
            // From the announced list, so that anyone can recompute the substitutes too.
            next_from_list(
                &round.ann.spec.committee_seed(),
                round.ann.attempt,
                &round.ann.candidates,
                round.ann.committee.len(),
                wanted,
                max_probation_seats(size),
            )
        } else {
            Vec::new()
        };
        if subs.is_empty() {
            self.finish(task, now_ms, actions);
            return;
        }
        round.substitutions += subs.len();
        let deadline = now_ms + self.params.commit_window_ms;
        for s in &subs {
            round.seated_deadline.insert(*s, deadline);
        }
        round.ann.committee.extend(subs);
        round.ann.revision += 1;
        round.ann.commit_deadline_ms = deadline;
        round.ann.reveal_deadline_ms = round.ann.commit_deadline_ms + self.params.reveal_window_ms;
        round.ann_env = seal(&self.key, &round.ann);
        let (env, model, to) = (round.ann_env.clone(), round.ann.spec.model, round.ann.committee.clone());
        self.publish_to(Topic::Tasks(model), env, to, actions);
    }

    /// ByzantineCoordinator: announce a finished attempt again, keeping the first
    /// commits, to catch any member that would commit differently the second time.
    fn reannounce(&mut self, task: TaskId, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(round) = self.coordinated.get_mut(&task) else { return };
        round.fishing = Some(std::mem::take(&mut round.commits));
        round.hashes.clear();
        round.arrival.clear();
        round.request = None;
        round.reveals.clear();
        round.phase = Phase::Committing;
        round.ann.revision += 1;
        round.ann.commit_deadline_ms = now_ms + self.params.commit_window_ms;
        round.ann.reveal_deadline_ms = round.ann.commit_deadline_ms + self.params.reveal_window_ms;
        round.ann_env = seal(&self.key, &round.ann);
        let (env, model, to) = (round.ann_env.clone(), round.ann.spec.model, round.ann.committee.clone());
        self.publish_to(Topic::Tasks(model), env, to, actions);
    }

    fn escalate(&mut self, task: TaskId, now_ms: u64, candidates: &[Candidate], actions: &mut Vec<Action>) {
        let Some(round) = self.coordinated.remove(&task) else { return };
        let attempt = round.ann.attempt + 1;
        let size = committee_size(round.ann.spec.k, attempt);
        let seed = round.ann.spec.committee_seed();
        let list = candidate_list(&seed, attempt, candidates, &round.eligibility, crate::messages::MAX_CANDIDATES);
        let committee = select(&seed, attempt, &list, size, max_probation_seats(size));
        if committee.len() < quorum(size) {
            // No larger committee can be seated: the task fails as disputed.
            actions.push(Action::Finished { task, outcome: Outcome::Disputed });
            self.publish_held(round.held, actions);
            return;
        }
        self.announce(round.ann.spec, attempt, (committee, list), round.eligibility, now_ms, actions);
        if let Some(next) = self.coordinated.get_mut(&task) {
            next.held = round.held;
        }
    }

    /// ByzantineCoordinator: a verdict on a task nobody ran, marking `victims` absent.
    /// It verifies (the coordinator signed everything in it), and proves nothing.
    fn forge_absent_verdict(&mut self, spec: &TaskSpec, victims: &[PeerId], now_ms: u64, actions: &mut Vec<Action>) {
        let mut fake = spec.clone();
        fake.nonce ^= 0x5eed_f00d;
        let task = fake.id();
        let ann = TaskAnnouncement {
            spec: fake,
            attempt: 0,
            revision: 0,
            committee: victims.to_vec(),
            commit_deadline_ms: now_ms,
            reveal_deadline_ms: now_ms,
            candidates: victims.iter().map(|p| Listed::new(*p, 1.0)).collect(),
        };
        let none = BTreeMap::new();
        let decision = decide(&Tally {
            spec: &ann.spec,
            task,
            attempt: 0,
            committee: &ann.committee,
            request_sent: false,
            committed: &none,
            reveals: &BTreeMap::new(),
            equivocators: &BTreeSet::new(),
            declined: &BTreeSet::new(),
        });
        let verdict = Verdict {
            task,
            attempt: 0,
            outcome: decision.outcome,
            marks: decision.marks,
            payouts: decision.payouts,
            evidence: Evidence {
                announcement: seal(&self.key, &ann),
                reveal_request: None,
                commits: Vec::new(),
                reveals: Vec::new(),
                equivocations: Vec::new(),
                declines: Vec::new(),
            },
            decided_ms: now_ms,
        };
        let env = seal(&self.key, &verdict);
        self.publish(Topic::Rounds, env, actions);
    }

    /// CopyCommit: publish the first other member's commit hash as our own.
    fn copy_commit_hook(&mut self, c: &Commit, who: PeerId, actions: &mut Vec<Action>) {
        if self.behaviour != Behaviour::CopyCommit || who == self.me {
            return;
        }
        let Some(duty) = self.duties.get_mut(&(c.task, c.attempt)) else { return };
        if let DutyState::Copying { victim: victim @ None, hash } = &mut duty.state
            && duty.committee.contains(&who)
        {
            *victim = Some(who);
            *hash = Some(c.hash);
            let env = seal(&self.key, &Commit { task: c.task, attempt: c.attempt, hash: c.hash });
            self.publish(Topic::Rounds, env, actions);
        }
    }

    /// CopyCommit: once the victim reveals, reveal the same output and salt.
    fn copy_reveal_hook(&mut self, r: &Reveal, who: PeerId, actions: &mut Vec<Action>) {
        if self.behaviour != Behaviour::CopyCommit {
            return;
        }
        let Some(duty) = self.duties.get_mut(&(r.task, r.attempt)) else { return };
        if let DutyState::Copying { victim: Some(v), .. } = &duty.state
            && *v == who
        {
            duty.state = DutyState::Done;
            let env = seal(&self.key, r);
            self.publish(Topic::Rounds, env, actions);
        }
    }
}

/// A wrong output that is still a plausible token sequence.
fn corrupt(tokens: &mut Vec<u32>) {
    match tokens.last_mut() {
        Some(t) => *t ^= 1,
        None => tokens.push(0),
    }
}
