//! Verification by replay (DESIGN.md, "Trust model", promise 2): re-running a verdict's
//! prompt with each revealed output teacher-forced, to settle contested marks, audit a
//! random fraction of finalized verdicts, and check fraud proofs. Replays run on the
//! inference threads at the lowest priority, and at most `replays_per_minute` per
//! coordinator (or prover), so a flood of verdicts cannot buy this node's CPU.

use std::collections::{BTreeMap, HashMap};

use sampo_consensus::{PeerId, VerifiedVerdict, outputs_to_replay};
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

/// Replays allowed per minute per peer (the coordinator of a verdict, the sender of a
/// fraud proof). Bounded: at most [`MAX_TRACKED`] peers are tracked; the stalest go.
#[derive(Debug)]
pub struct ReplayBudget {
    per_minute: u32,
    used: HashMap<PeerId, (u64, u32)>,
}

const MAX_TRACKED: usize = 4096;

impl ReplayBudget {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, used: HashMap::new() }
    }

    /// Take one replay from `who`'s budget for the minute of `now_ms`.
    pub fn take(&mut self, who: PeerId, now_ms: u64) -> bool {
        let minute = now_ms / 60_000;
        if self.used.len() >= MAX_TRACKED && !self.used.contains_key(&who) {
            self.used.retain(|_, (m, _)| *m == minute);
            if self.used.len() >= MAX_TRACKED {
                return false;
            }
        }
        let e = self.used.entry(who).or_insert((minute, 0));
        if e.0 != minute {
            *e = (minute, 0);
        }
        if e.1 >= self.per_minute {
            return false;
        }
        e.1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_per_peer_and_per_minute_and_bounded() {
        let mut b = ReplayBudget::new(2);
        let (a, c) = (PeerId::random(), PeerId::random());
        assert!(b.take(a, 0) && b.take(a, 1));
        assert!(!b.take(a, 2), "third in the same minute");
        assert!(b.take(c, 3), "another peer has its own budget");
        assert!(b.take(a, 60_000), "a new minute");
        for _ in 0..(2 * MAX_TRACKED) {
            b.take(PeerId::random(), 60_001);
        }
        assert!(b.used.len() <= MAX_TRACKED);
    }
}
