//! Reputation arithmetic: decayed counts of agreed, wrong and absent rounds, a score in
//! (0, 1] that is the sampling weight, and bans below a threshold.

use serde::{Deserialize, Serialize};

use crate::messages::Mark;

/// Tunables of the reputation rule. Defaults suit rounds of seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReputationParams {
    /// Counts halve every `half_life_ms`: old behaviour fades, recent behaviour rules.
    pub half_life_ms: u64,
    /// A wrong output weighs this many agreed rounds.
    pub wrong_weight: f64,
    /// An absence weighs this many agreed rounds.
    pub absent_weight: f64,
    /// A score below this bans the node.
    pub ban_threshold: f64,
    pub ban_ms: u64,
    /// A node on probation (fewer than `probation_rounds` vouched agreements) weighs
    /// this fraction of its score: a fresh key starts low, whatever it announces.
    #[serde(default = "default_probation_weight")]
    pub probation_weight: f64,
    /// Agreements in rounds that another, established node coordinated for a paying
    /// client (or this node coordinated) that end a peer's probation.
    #[serde(default = "default_probation_rounds")]
    pub probation_rounds: u64,
}

fn default_probation_weight() -> f64 {
    0.1
}

fn default_probation_rounds() -> u64 {
    // Graduating costs real work: a hundred agreed seats in others' paid rounds (a
    // newcomer at probation weight gets only a few percent of seats meanwhile).
    100
}

impl Default for ReputationParams {
    fn default() -> Self {
        Self {
            half_life_ms: 6 * 3600 * 1000,
            wrong_weight: 3.0,
            absent_weight: 1.0,
            ban_threshold: 0.2,
            ban_ms: 3600 * 1000,
            probation_weight: default_probation_weight(),
            probation_rounds: default_probation_rounds(),
        }
    }
}

/// One peer's record, as stored in the `reputation` column family.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    pub agreed: f64,
    pub wrong: f64,
    pub absent: f64,
    /// Proven lies (equivocations, false reveals, refuted outputs), never decayed.
    pub equivocations: u32,
    /// Rounds seen, never decayed.
    pub rounds: u64,
    pub updated_ms: u64,
    pub banned_until_ms: u64,
    /// Times this node, eligible and known, was left off the candidate list of a task
    /// the peer coordinated (first-hand; decays like the other counts).
    pub left_out: f64,
    /// Agreements that count towards the end of probation (never decayed): only those
    /// in rounds this node coordinated, or that an established node other than the
    /// member coordinated for a paying client. A node's own rounds count for nothing.
    pub vouched: u64,
}

impl Reputation {
    /// Decay the counts to `now`. A clock that went backwards decays nothing.
    pub fn decay_to(&mut self, now_ms: u64, p: &ReputationParams) {
        if now_ms > self.updated_ms && p.half_life_ms > 0 {
            let halvings = (now_ms - self.updated_ms) as f64 / p.half_life_ms as f64;
            let f = libm::exp2(-halvings);
            self.agreed *= f;
            self.wrong *= f;
            self.absent *= f;
            self.left_out *= f;
        }
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// `(1 + agreed) / (1 + agreed + w·wrong + a·absent)`: 1 for a newcomer, falling
    /// towards 0 with misbehaviour, never 0, so a node is never ruled out for ever.
    pub fn score(&self, p: &ReputationParams) -> f64 {
        let good = 1.0 + self.agreed;
        // Leaving a known, eligible node off a candidate list weighs half an absence:
        // a coordinator that keeps doing it samples this node's view of it down.
        good / (good + p.wrong_weight * self.wrong + p.absent_weight * (self.absent + 0.5 * self.left_out))
    }

    /// Score at `now` without changing the record.
    pub fn score_at(&self, now_ms: u64, p: &ReputationParams) -> f64 {
        let mut r = self.clone();
        r.decay_to(now_ms, p);
        r.score(p)
    }

    /// Whether the peer is still on probation (DESIGN.md, "Trust model", promise 5).
    pub fn on_probation(&self, p: &ReputationParams) -> bool {
        self.vouched < p.probation_rounds
    }

    /// Sampling weight at `now`: the score, scaled down while on probation unless the
    /// peer is `trusted` (configured, or certified by a closed network's admission key).
    pub fn weight_at(&self, now_ms: u64, p: &ReputationParams, trusted: bool) -> f64 {
        let score = self.score_at(now_ms, p);
        if !trusted && self.on_probation(p) { score * p.probation_weight.clamp(1e-6, 1.0) } else { score }
    }

    /// One agreement that counts towards the end of probation.
    pub fn record_vouched(&mut self) {
        self.vouched = self.vouched.saturating_add(1);
    }

    pub fn is_banned(&self, now_ms: u64) -> bool {
        now_ms < self.banned_until_ms
    }

    /// Record one round's mark at `now`, banning the peer if its score falls below the
    /// threshold.
    pub fn record(&mut self, mark: Mark, now_ms: u64, p: &ReputationParams) {
        self.decay_to(now_ms, p);
        self.rounds += 1;
        match mark {
            Mark::Agreed => self.agreed += 1.0,
            Mark::Wrong => self.wrong += 1.0,
            Mark::Absent => self.absent += 1.0,
            Mark::Undecided | Mark::Declined => {}
        }
        if self.score(p) < p.ban_threshold {
            self.banned_until_ms = self.banned_until_ms.max(now_ms.saturating_add(p.ban_ms));
        }
    }

    /// A lie proven by the peer's own signatures: two commits (or two verdicts) for one
    /// attempt, a reveal that does not open its commit, or an output replay refutes.
    /// This node was left off a candidate list the peer announced.
    pub fn record_left_out(&mut self, now_ms: u64, p: &ReputationParams) {
        self.decay_to(now_ms, p);
        self.left_out += 1.0;
    }

    pub fn record_equivocation(&mut self, now_ms: u64, p: &ReputationParams) {
        self.equivocations += 1;
        // A deliberate lie: ban at once, whatever the score.
        self.banned_until_ms = self.banned_until_ms.max(now_ms.saturating_add(p.ban_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcomer_scores_one_and_liar_is_banned() {
        let p = ReputationParams::default();
        let mut r = Reputation::default();
        assert_eq!(r.score(&p), 1.0);
        r.record(Mark::Wrong, 10, &p);
        assert!(!r.is_banned(10), "one wrong output: {}", r.score(&p));
        r.record(Mark::Wrong, 20, &p);
        assert!(r.is_banned(20) && r.is_banned(20 + p.ban_ms - 1) && !r.is_banned(20 + p.ban_ms));
    }

    #[test]
    fn honest_node_survives_a_few_absences() {
        let p = ReputationParams::default();
        let mut r = Reputation::default();
        for t in 0..10 {
            r.record(Mark::Agreed, t, &p);
        }
        for t in 10..13 {
            r.record(Mark::Absent, t, &p);
        }
        assert!(!r.is_banned(13), "{}", r.score(&p));
        assert!(r.score(&p) > 0.7);
    }

    #[test]
    fn counts_decay_by_half_life() {
        let p = ReputationParams::default();
        let mut r = Reputation::default();
        r.record(Mark::Wrong, 0, &p);
        r.decay_to(p.half_life_ms, &p);
        assert!((r.wrong - 0.5).abs() < 1e-12);
        // A clock going backwards changes nothing.
        r.decay_to(1, &p);
        assert!((r.wrong - 0.5).abs() < 1e-12);
    }

    #[test]
    fn score_stays_in_unit_interval() {
        let p = ReputationParams::default();
        let mut r = Reputation::default();
        for t in 0..1000 {
            r.record(if t % 3 == 0 { Mark::Agreed } else { Mark::Wrong }, t, &p);
            let s = r.score(&p);
            assert!(s > 0.0 && s <= 1.0);
        }
    }
}
