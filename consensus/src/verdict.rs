//! The verdict rule, and checking a verdict against its evidence without trusting the
//! coordinator.
//!
//! [`decide`] is the one rule both sides use: the coordinator to rule, every other
//! node to recompute the ruling from the signed evidence. All maps are keyed by
//! member, so the result never depends on the order messages arrived in.

use std::collections::{BTreeMap, BTreeSet};

use crate::PeerId;
use crate::committee::{committee_size, quorum};
use crate::envelope::{EnvelopeError, SignedEnvelope};
use crate::ids::{Hash32, TaskId, commit_hash};
use crate::messages::{
    Commit, Decline, Mark, Outcome, Reveal, RevealRequest, SpecError, TaskAnnouncement, TaskSpec, Verdict,
};

/// What a ruling decides: the outcome, every member's mark, and who is paid what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub marks: Vec<(PeerId, Mark)>,
    pub payouts: Vec<(PeerId, u64)>,
}

/// The inputs of a ruling on one attempt.
#[derive(Debug)]
pub struct Tally<'a> {
    pub spec: &'a TaskSpec,
    pub task: TaskId,
    pub attempt: u8,
    pub committee: &'a [PeerId],
    /// Whether the commit phase was closed by a reveal request.
    pub request_sent: bool,
    /// The commits that count: the request's list, or every commit when none was sent.
    pub committed: &'a BTreeMap<PeerId, Hash32>,
    /// Every reveal received from a member with a counted commit.
    pub reveals: &'a BTreeMap<PeerId, Vec<Reveal>>,
    /// Members proven to have signed two different commits.
    pub equivocators: &'a BTreeSet<PeerId>,
    /// Members that declined their seat for a reason that holds.
    pub declined: &'a BTreeSet<PeerId>,
}

/// Split `fee` evenly among `winners` (sorted); the remainder goes one credit each to
/// the first members in peer order, so payouts always sum to the fee.
pub fn split_fee(fee: u64, winners: &[PeerId]) -> Vec<(PeerId, u64)> {
    if winners.is_empty() {
        return Vec::new();
    }
    let n = winners.len() as u64;
    let (share, rest) = (fee / n, fee % n);
    winners.iter().enumerate().map(|(i, p)| (*p, share + u64::from((i as u64) < rest))).collect()
}

/// The verdict rule.
pub fn decide(t: &Tally<'_>) -> Decision {
    let size = committee_size(t.spec.k, t.attempt);
    let need = quorum(size);
    let mut marks: BTreeMap<PeerId, Mark> = BTreeMap::new();
    let mut outputs: BTreeMap<&[u32], Vec<PeerId>> = BTreeMap::new();
    for member in t.committee {
        let mark = if t.equivocators.contains(member) {
            Mark::Wrong
        } else if let Some(hash) = t.committed.get(member) {
            if !t.request_sent {
                Mark::Undecided
            } else {
                match t.reveals.get(member) {
                    None => Mark::Absent,
                    Some(rs) if rs.is_empty() => Mark::Absent,
                    Some(rs) => match rs.iter().find(|r| commit_hash(&t.task, member, &r.tokens, &r.salt) == *hash) {
                        Some(r) => {
                            outputs.entry(&r.tokens).or_default().push(*member);
                            // Provisional; settled below once the winner is known.
                            Mark::Undecided
                        }
                        // A reveal that does not open its own commit is provably false.
                        None => Mark::Wrong,
                    },
                }
            }
        } else if t.declined.contains(member) {
            Mark::Declined
        } else {
            Mark::Absent
        };
        marks.insert(*member, mark);
    }
    let winner = outputs.iter().find(|(_, members)| members.len() >= need).map(|(out, _)| out.to_vec());
    let outcome = match &winner {
        Some(output) => {
            for (out, members) in &outputs {
                let m = if *out == output.as_slice() { Mark::Agreed } else { Mark::Wrong };
                for p in members {
                    marks.insert(*p, m);
                }
            }
            Outcome::Finalized { output: output.clone() }
        }
        None if t.attempt < t.spec.max_escalations => Outcome::Escalated,
        None => Outcome::Disputed,
    };
    let agreed: Vec<PeerId> = marks.iter().filter(|(_, m)| **m == Mark::Agreed).map(|(p, _)| *p).collect();
    Decision { outcome, marks: marks.into_iter().collect(), payouts: split_fee(t.spec.fee, &agreed) }
}

/// Why a verdict does not stand. Each names the part of the evidence that fails.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("{part}: {source}")]
    Envelope { part: &'static str, source: EnvelopeError },
    #[error("task spec: {0}")]
    Spec(#[from] SpecError),
    #[error("the {part} is signed by {signer}, not by the task's coordinator {coordinator}")]
    NotCoordinator { part: &'static str, signer: String, coordinator: String },
    #[error("the {part} is for task {task} attempt {attempt}, not the verdict's")]
    WrongTask { part: &'static str, task: TaskId, attempt: u8 },
    #[error("the committee lists {0} twice")]
    DuplicateMember(PeerId),
    #[error("the committee has {len} members; attempt {attempt} seats {size} plus at most as many substitutes")]
    CommitteeSize { len: usize, size: usize, attempt: u8 },
    #[error("{part} signed by {0}, who is not on the committee", part = .1)]
    NotAMember(PeerId, &'static str),
    #[error("two different commits by {0} are filed as commits, not as an equivocation")]
    UnfiledEquivocation(PeerId),
    #[error("equivocation proof against {0} is invalid: {1}")]
    BadEquivocation(PeerId, &'static str),
    #[error("the reveal request accepts {accepted} commits, more than the {size} seats of the attempt")]
    TooManyAccepted { accepted: usize, size: usize },
    #[error("the reveal request is not sorted by member, or lists a member twice")]
    UnsortedRequest,
    #[error("the reveal request accepts a commit by {0} that the evidence does not contain")]
    MissingCommit(PeerId),
    #[error("the evidence holds a commit by {0} that the reveal request did not accept")]
    UnacceptedCommit(PeerId),
    #[error("no reveal request, although {commits} commits reached the quorum of {quorum}")]
    MissingRequest { commits: usize, quorum: usize },
    #[error("reveal by {0}, whose commit was not accepted")]
    UnacceptedReveal(PeerId),
    #[error("attempt {attempt} is beyond the {max} escalations the task allows")]
    AttemptOutOfRange { attempt: u8, max: u8 },
    #[error("committee: {0}")]
    Committee(#[from] crate::committee::CommitteeError),
    #[error("{count} {part} for a committee of {members}")]
    TooManyProofs { part: &'static str, count: usize, members: usize },
    #[error("a decline by {0} states a reason that does not hold for the task")]
    FalseDecline(PeerId),
    #[error("two declines by {0}")]
    DuplicateDecline(PeerId),
    #[error("the verdict claims {field} {claimed}, but the evidence gives {actual}")]
    ClaimMismatch { field: &'static str, claimed: String, actual: String },
}

/// A verdict whose evidence checked out.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedVerdict {
    pub verdict: Verdict,
    pub spec: TaskSpec,
    pub committee: Vec<PeerId>,
    /// The candidates the announcement lists (the committee was sampled from them).
    pub candidates: Vec<crate::Listed>,
    pub coordinator: PeerId,
    pub envelope: SignedEnvelope,
    /// Each member's revealed output, for members whose reveal opened their accepted
    /// commit: what the member itself signed as the model's answer.
    pub opened: BTreeMap<PeerId, Vec<u32>>,
    /// Members whose own signatures prove a lie: two commits for the attempt, or a
    /// reveal that does not open their accepted commit.
    pub proven_liars: BTreeSet<PeerId>,
}

impl VerifiedVerdict {
    pub fn task(&self) -> TaskId {
        self.verdict.task
    }
}

fn open<M: crate::Message>(env: &SignedEnvelope, part: &'static str) -> Result<M, VerifyError> {
    env.open::<M>().map_err(|source| VerifyError::Envelope { part, source })
}

fn same_task(part: &'static str, task: TaskId, attempt: u8, v: &Verdict) -> Result<(), VerifyError> {
    if task != v.task || attempt != v.attempt {
        return Err(VerifyError::WrongTask { part, task, attempt });
    }
    Ok(())
}

/// Check a verdict envelope against its own evidence: every signature, the task id, the
/// committee membership of every commit and reveal, the commit/reveal hashes, the
/// reveal request, and the quorum arithmetic behind the outcome, the marks and the
/// payouts. Trusts nothing the coordinator merely claims.
pub fn verify(envelope: &SignedEnvelope) -> Result<VerifiedVerdict, VerifyError> {
    // Opening checks every nested envelope's signature (they are checked as decoded).
    check(open(envelope, "verdict")?, envelope)
}

/// [`verify`] for a verdict already open: every check but the nested signatures, which
/// were checked when its envelopes were decoded — or, for the verdict a coordinator has
/// just sealed, when it received them. `envelope` must be `verdict` sealed.
pub(crate) fn check(verdict: Verdict, envelope: &SignedEnvelope) -> Result<VerifiedVerdict, VerifyError> {
    let ev = &verdict.evidence;
    let ann: TaskAnnouncement = open(&ev.announcement, "announcement")?;
    let spec = &ann.spec;
    spec.validate()?;
    let coordinator = spec.coordinator;
    for (part, signer) in [("announcement", ev.announcement.signer()), ("verdict", envelope.signer())] {
        if signer != coordinator {
            return Err(VerifyError::NotCoordinator {
                part,
                signer: signer.to_string(),
                coordinator: coordinator.to_string(),
            });
        }
    }
    let task = spec.id();
    same_task("announcement", task, ann.attempt, &verdict)?;
    // Before any arithmetic with it: the spec bounds the attempts, and `validate` has
    // already bounded the largest committee the spec allows.
    if ann.attempt > spec.max_escalations {
        return Err(VerifyError::AttemptOutOfRange { attempt: ann.attempt, max: spec.max_escalations });
    }
    let size = committee_size(spec.k, ann.attempt);
    let max_listed = size.checked_mul(2).ok_or(VerifyError::CommitteeSize {
        len: ann.committee.len(),
        size,
        attempt: ann.attempt,
    })?;
    if ann.committee.len() > max_listed {
        return Err(VerifyError::CommitteeSize { len: ann.committee.len(), size, attempt: ann.attempt });
    }
    let members: BTreeSet<PeerId> = ann.committee.iter().copied().collect();
    if members.len() != ann.committee.len() {
        let mut seen = BTreeSet::new();
        let dup = ann.committee.iter().find(|p| !seen.insert(**p)).copied().unwrap_or(coordinator);
        return Err(VerifyError::DuplicateMember(dup));
    }
    crate::committee::check_committee(
        &spec.committee_seed(),
        ann.attempt,
        &ann.candidates,
        crate::committee::max_probation_seats(size),
        &ann.committee,
    )?;

    // One proof per member at most; more is padding that costs signature checks.
    for (part, n) in [("equivocations", ev.equivocations.len()), ("declines", ev.declines.len())] {
        if n > ann.committee.len() {
            return Err(VerifyError::TooManyProofs { part, count: n, members: ann.committee.len() });
        }
    }
    let mut equivocators = BTreeSet::new();
    for (a, b) in &ev.equivocations {
        let who = a.signer();
        let ca: Commit = open(a, "equivocation")?;
        let cb: Commit = open(b, "equivocation")?;
        if b.signer() != who {
            return Err(VerifyError::BadEquivocation(who, "the two commits have different signers"));
        }
        if !members.contains(&who) {
            return Err(VerifyError::NotAMember(who, "equivocation"));
        }
        same_task("equivocation", ca.task, ca.attempt, &verdict)?;
        same_task("equivocation", cb.task, cb.attempt, &verdict)?;
        if ca.hash == cb.hash {
            return Err(VerifyError::BadEquivocation(who, "the two commits are the same"));
        }
        equivocators.insert(who);
    }

    let mut declined = BTreeSet::new();
    for env in &ev.declines {
        let d: Decline = open(env, "decline")?;
        let who = env.signer();
        same_task("decline", d.task, d.attempt, &verdict)?;
        if !members.contains(&who) {
            return Err(VerifyError::NotAMember(who, "decline"));
        }
        if !d.reason.holds_for(spec, size) {
            return Err(VerifyError::FalseDecline(who));
        }
        if !declined.insert(who) {
            return Err(VerifyError::DuplicateDecline(who));
        }
    }

    let mut commits: BTreeMap<PeerId, Hash32> = BTreeMap::new();
    for env in &ev.commits {
        let c: Commit = open(env, "commit")?;
        let who = env.signer();
        same_task("commit", c.task, c.attempt, &verdict)?;
        if !members.contains(&who) {
            return Err(VerifyError::NotAMember(who, "commit"));
        }
        if let Some(prev) = commits.insert(who, c.hash)
            && prev != c.hash
        {
            return Err(VerifyError::UnfiledEquivocation(who));
        }
    }

    let need = quorum(size);
    let (request_sent, committed) = match &ev.reveal_request {
        Some(env) => {
            let req: RevealRequest = open(env, "reveal request")?;
            if env.signer() != coordinator {
                return Err(VerifyError::NotCoordinator {
                    part: "reveal request",
                    signer: env.signer().to_string(),
                    coordinator: coordinator.to_string(),
                });
            }
            same_task("reveal request", req.task, req.attempt, &verdict)?;
            if req.accepted.len() > size {
                return Err(VerifyError::TooManyAccepted { accepted: req.accepted.len(), size });
            }
            if req.accepted.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(VerifyError::UnsortedRequest);
            }
            let accepted: BTreeMap<PeerId, Hash32> = req.accepted.iter().copied().collect();
            for (who, hash) in &accepted {
                if commits.get(who) != Some(hash) {
                    return Err(VerifyError::MissingCommit(*who));
                }
            }
            if let Some(extra) = commits.keys().find(|p| !accepted.contains_key(p)) {
                return Err(VerifyError::UnacceptedCommit(*extra));
            }
            (true, accepted)
        }
        None => {
            let honest = commits.keys().filter(|p| !equivocators.contains(p)).count();
            if honest >= need {
                return Err(VerifyError::MissingRequest { commits: honest, quorum: need });
            }
            (false, commits)
        }
    };

    let mut reveals: BTreeMap<PeerId, Vec<Reveal>> = BTreeMap::new();
    for env in &ev.reveals {
        let r: Reveal = open(env, "reveal")?;
        let who = env.signer();
        same_task("reveal", r.task, r.attempt, &verdict)?;
        if !request_sent || !committed.contains_key(&who) {
            return Err(VerifyError::UnacceptedReveal(who));
        }
        reveals.entry(who).or_default().push(r);
    }

    let decision = decide(&Tally {
        spec,
        task,
        attempt: ann.attempt,
        committee: &ann.committee,
        request_sent,
        committed: &committed,
        reveals: &reveals,
        equivocators: &equivocators,
        declined: &declined,
    });
    check_claim("outcome", &verdict.outcome, &decision.outcome)?;
    check_claim("marks", &verdict.marks, &decision.marks)?;
    check_claim("payouts", &verdict.payouts, &decision.payouts)?;
    let mut opened = BTreeMap::new();
    let mut proven_liars = equivocators.clone();
    if request_sent {
        for (who, hash) in &committed {
            if equivocators.contains(who) {
                continue;
            }
            let Some(rs) = reveals.get(who) else { continue };
            match rs.iter().find(|r| commit_hash(&task, who, &r.tokens, &r.salt) == *hash) {
                Some(r) => {
                    opened.insert(*who, r.tokens.clone());
                }
                None if !rs.is_empty() => {
                    proven_liars.insert(*who);
                }
                None => {}
            }
        }
    }
    Ok(VerifiedVerdict {
        opened,
        proven_liars,
        spec: spec.clone(),
        committee: ann.committee.clone(),
        candidates: ann.candidates.clone(),
        coordinator,
        envelope: envelope.clone(),
        verdict,
    })
}

fn check_claim<T: PartialEq + std::fmt::Debug>(
    field: &'static str,
    claimed: &T,
    actual: &T,
) -> Result<(), VerifyError> {
    if claimed != actual {
        return Err(VerifyError::ClaimMismatch {
            field,
            claimed: format!("{claimed:?}"),
            actual: format!("{actual:?}"),
        });
    }
    Ok(())
}

/// The file `sampo verify` reads and `GET /v1/tasks/{id}/evidence` serves: the verdict
/// envelope, which carries all its evidence, as hex inside JSON.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvidenceBundle {
    /// Always [`EvidenceBundle::FORMAT`].
    pub format: String,
    pub task: TaskId,
    pub attempt: u8,
    pub verdict: SignedEnvelope,
}

impl EvidenceBundle {
    pub const FORMAT: &'static str = "sampo-evidence/1";

    pub fn new(v: &VerifiedVerdict) -> Self {
        Self { format: Self::FORMAT.into(), task: v.task(), attempt: v.verdict.attempt, verdict: v.envelope.clone() }
    }
}
