//! What a node may conclude about its peers from a verdict (DESIGN.md, "Trust model",
//! promises 1–4). A verified verdict proves what its signers signed, and nothing more:
//!
//! - an *Agreed* mark is credited (promise 5 will limit whose);
//! - a member's own signatures that contradict each other (two commits for one attempt,
//!   a reveal that does not open its accepted commit) prove a lie: banned at once;
//! - *Absent* is applied only by the coordinator that seated the member and saw it miss
//!   the deadline first-hand; nobody else applies it on the coordinator's word;
//! - a *Wrong* mark that rests only on disagreeing with the majority is *contested*: it
//!   is recorded only once this node's own replay shows the model does not produce the
//!   member's output;
//! - two different verdicts for one (task, attempt) signed by one coordinator are that
//!   coordinator's equivocation.
//!
//! Everything here is pure: replay results come in as a predicate.

use std::collections::BTreeSet;

use crate::PeerId;
use crate::messages::{Mark, Outcome};
use crate::verdict::VerifiedVerdict;

/// What applying a verified verdict may change in this node's view right away.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assessment {
    /// Marks to record now.
    pub marks: Vec<(PeerId, Mark)>,
    /// Peers whose own signatures prove a lie: banned now.
    pub bans: Vec<PeerId>,
    /// Members marked wrong only for disagreeing with the majority: nothing is recorded
    /// unless a replay by this node refutes their output.
    pub contested: Vec<PeerId>,
    /// Agreed members whose agreement counts towards the end of their probation
    /// (promise 5): the round was for a paying client (fee > 0) and coordinated by this
    /// node, or by another node this node already counts as established; a member's
    /// seat in a round it coordinated itself never counts.
    pub vouched: Vec<PeerId>,
}

/// Assess a verdict as node `me`. `coordinator_established`: whether this node counts
/// the verdict's coordinator as established (off probation, or trusted); only then do
/// its rounds vouch for the members (a Sybil farm's own rounds vouch for nobody).
pub fn assess(v: &VerifiedVerdict, me: &PeerId, coordinator_established: bool) -> Assessment {
    let first_hand = v.coordinator == *me;
    let vouching = v.spec.fee > 0 && (first_hand || coordinator_established);
    let mut a = Assessment::default();
    for (peer, mark) in &v.verdict.marks {
        match mark {
            Mark::Agreed => {
                a.marks.push((*peer, Mark::Agreed));
                if vouching && *peer != v.coordinator {
                    a.vouched.push(*peer);
                }
            }
            Mark::Absent if first_hand => a.marks.push((*peer, Mark::Absent)),
            Mark::Wrong if v.proven_liars.contains(peer) => {
                a.marks.push((*peer, Mark::Wrong));
                a.bans.push(*peer);
            }
            Mark::Wrong => a.contested.push(*peer),
            Mark::Absent | Mark::Undecided | Mark::Declined => {}
        }
    }
    a
}

/// Whether `me` took part in the round: it coordinated it, or revealed in it. Merely
/// being listed on a committee is not taking part (anyone can list anyone).
pub fn took_part(v: &VerifiedVerdict, me: &PeerId) -> bool {
    v.coordinator == *me || v.opened.contains_key(me)
}

/// Whether node `me` replays a verdict: it contests someone and `me` took part (as its
/// coordinator or a revealing member: bystanders leave contested marks unapplied and
/// learn of a refuted output from the fraud proof), or it is drawn for a random audit
/// (`audit_draw` uniform in [0, 1)).
pub fn needs_replay(v: &VerifiedVerdict, a: &Assessment, me: &PeerId, audit_rate: f64, audit_draw: f64) -> bool {
    let involved = took_part(v, me);
    matches!(v.verdict.outcome, Outcome::Finalized { .. })
        && ((involved && !a.contested.is_empty()) || audit_draw < audit_rate)
}

/// What a replay of a verdict's revealed outputs settles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayJudgement {
    /// Members whose revealed output the model does not produce, outside the winning
    /// group: recorded as wrong.
    pub wrong: Vec<PeerId>,
    /// Members whose signed reveals carried a finalized output the model does not
    /// produce: banned, and the task is overturned.
    pub liars: Vec<PeerId>,
    pub overturned: bool,
}

/// Judge a verdict given `produced(output)`: whether this node's replay shows the model
/// producing that output for the task (`None`: not replayed, so nothing is concluded).
pub fn judge(v: &VerifiedVerdict, produced: &dyn Fn(&[u32]) -> Option<bool>) -> ReplayJudgement {
    let winner = match &v.verdict.outcome {
        Outcome::Finalized { output } => Some(output.as_slice()),
        _ => None,
    };
    let mut j = ReplayJudgement::default();
    let mut seen: BTreeSet<&[u32]> = BTreeSet::new();
    for (peer, output) in &v.opened {
        seen.insert(output.as_slice());
        if produced(output) != Some(false) {
            continue;
        }
        if Some(output.as_slice()) == winner {
            j.liars.push(*peer);
            j.overturned = true;
        } else {
            j.wrong.push(*peer);
        }
    }
    j
}

/// The distinct revealed outputs of a verdict, the winner first: what a replay checks.
pub fn outputs_to_replay(v: &VerifiedVerdict) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    if let Outcome::Finalized { output } = &v.verdict.outcome {
        out.push(output.clone());
    }
    for o in v.opened.values() {
        if !out.contains(o) {
            out.push(o.clone());
        }
    }
    out
}
