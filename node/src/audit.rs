//! Verification by replay (DESIGN.md, "Trust model", promise 2): re-running a verdict's
//! prompt with each revealed output teacher-forced, to settle contested marks, audit a
//! random fraction of finalized verdicts, and check fraud proofs. Replays run on the
//! inference threads at the lowest priority, and at most `replays_per_minute` per
//! coordinator (or prover), so a flood of verdicts cannot buy this node's CPU.

use std::collections::{BTreeMap, HashMap, VecDeque};

use sampo_consensus::{PeerId, SignedEnvelope, TaskId, VerifiedVerdict, outputs_to_replay};
use sampo_kernels::replay::Divergence;

use crate::models::LoadedModel;

/// Why a replay runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayReason {
    /// The verdict marks a member wrong only for disagreeing with the majority.
    Contested,
    /// Drawn at random (`consensus.audit_rate`).
    Audit,
    /// Another node claims the finalized output is false.
    FraudProof,
}

impl ReplayReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayReason::Contested => "contested",
            ReplayReason::Audit => "audit",
            ReplayReason::FraudProof => "fraud_proof",
        }
    }
}

/// What a replay found for each distinct revealed output.
#[derive(Clone, Debug, Default)]
pub struct ReplayOutcome {
    /// Whether the model produces each output.
    pub produced: BTreeMap<Vec<u32>, bool>,
    /// Where the finalized output leaves the model's, when it does.
    pub winner_divergence: Option<Divergence>,
    pub secs: f64,
}

/// Replay a verdict's outputs on `model`: the finalized output first. Generation is a
/// function of (model, prompt, parameters), so when the model produces the winner every
/// other output is refuted without running it; otherwise each is replayed on its own.
pub fn replay_verdict(model: &LoadedModel, v: &VerifiedVerdict) -> Result<ReplayOutcome, String> {
    let prompt = model.prompt_tokens(&v.spec.prompt).map_err(|e| e.to_string())?;
    let params = model.sampling(&v.spec);
    let outputs = outputs_to_replay(v);
    let mut out = ReplayOutcome::default();
    let winner = match &v.verdict.outcome {
        sampo_consensus::Outcome::Finalized { output } => Some(output.clone()),
        _ => None,
    };
    for o in &outputs {
        if let Some(w) = &winner
            && o != w
            && out.produced.get(w) == Some(&true)
        {
            out.produced.insert(o.clone(), false);
            continue;
        }
        let r = model.engine.replay(&prompt, o, &params).map_err(|e| e.to_string())?;
        out.secs += r.secs;
        if Some(o) == winner.as_ref() {
            out.winner_divergence = r.divergence;
        }
        out.produced.insert(o.clone(), r.is_valid());
    }
    Ok(out)
}

/// Replays for rounds this node took no part in (audits, fraud proofs from others):
/// at most `per_minute` per peer that caused them (a verdict's coordinator, a proof's
/// sender) and at most `GLOBAL_FACTOR × per_minute` for the whole node, so fresh keys
/// buy nothing beyond the node-wide cap. Replays of rounds this node coordinated or
/// revealed in are not charged: they are bounded by its own seats. At most
/// [`MAX_TRACKED`] peers are tracked; when all are current, newcomers draw on the
/// node-wide budget alone.
#[derive(Debug)]
pub struct ReplayBudget {
    per_minute: u32,
    used: HashMap<PeerId, (u64, u32)>,
    global: (u64, u32),
}

const MAX_TRACKED: usize = 4096;
/// The node-wide budget, in units of the per-peer one.
pub const GLOBAL_FACTOR: u32 = 10;

impl ReplayBudget {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, used: HashMap::new(), global: (0, 0) }
    }

    /// Take one replay from `who`'s budget and the node's for the minute of `now_ms`.
    pub fn take(&mut self, who: PeerId, now_ms: u64) -> bool {
        let minute = now_ms / 60_000;
        if self.global.0 != minute {
            self.global = (minute, 0);
        }
        if self.global.1 >= self.per_minute.saturating_mul(GLOBAL_FACTOR) {
            return false;
        }
        if self.used.len() >= MAX_TRACKED && !self.used.contains_key(&who) {
            self.used.retain(|_, (m, _)| *m == minute);
        }
        if self.used.len() < MAX_TRACKED || self.used.contains_key(&who) {
            let e = self.used.entry(who).or_insert((minute, 0));
            if e.0 != minute {
                *e = (minute, 0);
            }
            if e.1 >= self.per_minute {
                return false;
            }
            e.1 += 1;
        }
        self.global.1 += 1;
        true
    }
}

/// Fraud proofs that arrived before the verdict they name: a few per (task, attempt),
/// a bounded number in all, oldest evicted first, none kept past [`PROOF_TTL_MS`].
#[derive(Debug, Default)]
pub struct PendingProofs {
    queue: VecDeque<((TaskId, u8), u64, SignedEnvelope)>,
}

pub const MAX_PENDING_PROOFS: usize = 256;
const PROOFS_PER_TASK: usize = 4;
pub const PROOF_TTL_MS: u64 = 10 * 60 * 1000;

impl PendingProofs {
    pub fn park(&mut self, key: (TaskId, u8), proof: SignedEnvelope, now_ms: u64) {
        self.expire(now_ms);
        let for_key = self.queue.iter().filter(|(k, _, _)| *k == key).count();
        if for_key >= PROOFS_PER_TASK || self.queue.iter().any(|(_, _, e)| *e == proof) {
            return;
        }
        if self.queue.len() >= MAX_PENDING_PROOFS {
            self.queue.pop_front();
        }
        self.queue.push_back((key, now_ms, proof));
    }

    /// The proofs parked for `key`, removed.
    pub fn take(&mut self, key: (TaskId, u8), now_ms: u64) -> Vec<SignedEnvelope> {
        self.expire(now_ms);
        let (mine, rest): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.queue).into_iter().partition(|(k, _, _)| *k == key);
        self.queue = rest;
        mine.into_iter().map(|(_, _, e)| e).collect()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while self.queue.front().is_some_and(|(_, t, _)| now_ms.saturating_sub(*t) > PROOF_TTL_MS) {
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_per_peer_per_minute_and_node_wide() {
        let mut b = ReplayBudget::new(2);
        let (a, c) = (PeerId::random(), PeerId::random());
        assert!(b.take(a, 0) && b.take(a, 1));
        assert!(!b.take(a, 2), "third in the same minute");
        assert!(b.take(c, 3), "another peer has its own budget");
        assert!(b.take(a, 60_000), "a new minute");
        // Fresh keys buy nothing past the node-wide cap.
        let granted = (0..1000).filter(|_| b.take(PeerId::random(), 60_001)).count();
        assert_eq!(granted as u32, 2 * GLOBAL_FACTOR - 1);
        assert!(b.used.len() <= MAX_TRACKED);
        assert!(b.take(a, 120_000), "the next minute starts afresh");
    }

    #[test]
    fn pending_proofs_are_bounded_per_task_in_all_and_in_time() {
        let key = sampo_consensus::NodeKey::from_seed([1; 32]);
        let proof = |n: u32| {
            SignedEnvelope::seal(
                &key,
                &sampo_consensus::FraudProof {
                    task: TaskId(sampo_consensus::Hash32::of(&n.to_le_bytes())),
                    attempt: 0,
                    verdict: sampo_consensus::Hash32::of(b"v"),
                    position: n,
                    expected: None,
                },
            )
            .expect("seal")
        };
        let t = |n: u32| (TaskId(sampo_consensus::Hash32::of(&n.to_le_bytes())), 0u8);
        let mut p = PendingProofs::default();
        for n in 0..10 {
            p.park(t(0), proof(1000 + n), 0);
        }
        assert_eq!(p.len(), PROOFS_PER_TASK, "one task cannot hold more");
        for n in 0..(2 * MAX_PENDING_PROOFS as u32) {
            p.park(t(n + 1), proof(n), 1);
        }
        assert_eq!(p.len(), MAX_PENDING_PROOFS, "bounded in all, oldest evicted");
        assert!(p.take(t(0), 2).is_empty(), "the oldest went first");
        let last = 2 * MAX_PENDING_PROOFS as u32;
        assert_eq!(p.take(t(last), 2).len(), 1);
        assert!(p.take(t(last - 1), 2 + PROOF_TTL_MS + 1).is_empty(), "expired");
        assert!(p.is_empty());
    }
}
