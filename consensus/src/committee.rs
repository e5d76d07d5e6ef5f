//! Committee sizes, quorums and weighted rendezvous sampling.
//!
//! Sampling is a pure function of `(task_id, attempt, candidates)`: two nodes with the
//! same view of the registry pick the same committee, and a node's chance of a seat is
//! proportional to its weight (its reputation score).

use serde::{Deserialize, Serialize};

use crate::PeerId;
use crate::ids::{ModelId, TaskId};

/// Committee size of an attempt: `k`, then `2k + 1`, `4k + 3`, … so every escalation
/// at least doubles the committee and keeps it odd when `k` is.
pub fn committee_size(k: u8, attempt: u8) -> usize {
    let mut n = k as usize;
    for _ in 0..attempt {
        n = n.saturating_mul(2).saturating_add(1);
    }
    n
}

/// Members needed for an output to win: `k/2 + 1` of the attempt's committee size.
pub fn quorum(size: usize) -> usize {
    size / 2 + 1
}

/// A node the coordinator may seat, as its registry and reputation store see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub peer: PeerId,
    pub models: Vec<ModelId>,
    pub price_per_1k: u64,
    pub free_slots: u32,
    /// Reputation score in (0, 1].
    pub score: f64,
    /// Banned nodes are never sampled.
    pub banned: bool,
    /// New to this node (DESIGN.md, "Trust model", promise 5): a minority of seats at most.
    pub probation: bool,
    /// Network prefix group as this node saw the peer (/24, /48); 0 when not grouped.
    pub group: u32,
}

/// Which candidates may sit on a committee for a task.
#[derive(Clone, Debug)]
pub struct Eligibility {
    pub model: ModelId,
    pub max_price_per_1k: Option<u64>,
}

impl Eligibility {
    pub fn admits(&self, c: &Candidate) -> bool {
        !c.banned
            && c.free_slots > 0
            && c.score > 0.0
            && c.score.is_finite()
            && c.models.contains(&self.model)
            && self.max_price_per_1k.is_none_or(|max| c.price_per_1k <= max)
    }
}

/// Weighted rendezvous key of a candidate: `-ln(u) / w` with `u` uniform in (0, 1]
/// from `blake3(task_id || attempt || peer)`; the `n` smallest keys win. This is the
/// exponential-race formulation of weighted sampling without replacement.
fn rendezvous_key(task: &TaskId, attempt: u8, peer: &PeerId, weight: f64) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(b"sampo/v1/committee");
    h.update(&task.0.0);
    h.update(&[attempt]);
    h.update(&peer.to_bytes());
    let bytes = h.finalize();
    let mut top = [0u8; 8];
    top.copy_from_slice(&bytes.as_bytes()[..8]);
    // 53 random bits → u in (0, 1]; never 0, so ln is finite.
    let u = ((u64::from_le_bytes(top) >> 11) + 1) as f64 / (1u64 << 53) as f64;
    // libm, not the platform's ln: every node must rank candidates identically.
    -libm::log(u) / weight
}

/// A candidate as an announcement lists it: what anyone needs to recompute the
/// committee. `probation` and `group` are the coordinator's view (DESIGN.md, "Trust
/// model", promise 5): at most a minority of seats go to nodes on probation, and at
/// most one seat to each network prefix group (0: not grouped).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listed {
    pub peer: PeerId,
    pub weight: f64,
    pub probation: bool,
    pub group: u32,
}

impl Listed {
    /// An established, ungrouped candidate.
    pub fn new(peer: PeerId, weight: f64) -> Self {
        Self { peer, weight, probation: false, group: 0 }
    }
}

/// Most seats of a committee of `size` that may go to nodes on probation: a minority,
/// so nodes on probation alone never make a quorum.
pub fn max_probation_seats(size: usize) -> usize {
    size.saturating_sub(quorum(size))
}

/// Why an announced committee is not the one its candidate list gives.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommitteeError {
    #[error("{0} candidates, more than {max}", max = crate::messages::MAX_CANDIDATES)]
    TooManyCandidates(usize),
    #[error("candidate {0} is listed twice or with a weight that is not a positive finite number")]
    BadCandidate(PeerId),
    #[error("member {0} is not among the announced candidates")]
    NotACandidate(PeerId),
    #[error("the committee is not the best-ranked {0} of the announced candidates")]
    NotSampled(usize),
}

/// The candidates in rank order for `seed` and `attempt`.
fn ranked<'a>(seed: &TaskId, attempt: u8, list: &'a [Listed]) -> Vec<&'a Listed> {
    let mut keyed: Vec<(f64, &Listed)> =
        list.iter().map(|c| (rendezvous_key(seed, attempt, &c.peer, c.weight), c)).collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.peer.to_bytes().cmp(&b.1.peer.to_bytes())));
    keyed.into_iter().map(|(_, c)| c).collect()
}

/// The first `n` seats of a list: candidates in rank order, skipping one on probation
/// once `probation_cap` of them are seated and one whose prefix group already has a
/// seat. Prefix-consistent: the first `m < n` seats are `select(.., m, ..)`, so
/// substitutes continue the same walk.
pub fn select(seed: &TaskId, attempt: u8, list: &[Listed], n: usize, probation_cap: usize) -> Vec<PeerId> {
    let mut seats = Vec::with_capacity(n.min(list.len()));
    let mut on_probation = 0;
    let mut groups = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in ranked(seed, attempt, list) {
        if seats.len() >= n {
            break;
        }
        if !seen.insert(c.peer)
            || (c.probation && on_probation >= probation_cap)
            || (c.group != 0 && groups.contains(&c.group))
        {
            continue;
        }
        on_probation += usize::from(c.probation);
        if c.group != 0 {
            groups.insert(c.group);
        }
        seats.push(c.peer);
    }
    seats
}

/// Check that `committee` is exactly the first `committee.len()` seats [`select`] gives
/// for `seed` and `attempt` — the first seats and every substitute after them, in any
/// order. The coordinator cannot choose members, only list candidates; a candidate
/// left off the list sees that it was left out.
pub fn check_committee(
    seed: &TaskId,
    attempt: u8,
    candidates: &[Listed],
    probation_cap: usize,
    committee: &[PeerId],
) -> Result<(), CommitteeError> {
    if candidates.len() > crate::messages::MAX_CANDIDATES {
        return Err(CommitteeError::TooManyCandidates(candidates.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in candidates {
        if !(c.weight.is_finite() && c.weight > 0.0 && seen.insert(c.peer)) {
            return Err(CommitteeError::BadCandidate(c.peer));
        }
    }
    if let Some(m) = committee.iter().find(|m| !seen.contains(m)) {
        return Err(CommitteeError::NotACandidate(*m));
    }
    let best: std::collections::BTreeSet<PeerId> =
        select(seed, attempt, candidates, committee.len(), probation_cap).into_iter().collect();
    let given: std::collections::BTreeSet<PeerId> = committee.iter().copied().collect();
    if best != given || given.len() != committee.len() {
        return Err(CommitteeError::NotSampled(committee.len()));
    }
    Ok(())
}

/// The eligible candidates with their weights, the best-ranked first, at most `max`:
/// what a coordinator announces and samples from.
pub fn candidate_list(
    seed: &TaskId,
    attempt: u8,
    candidates: &[Candidate],
    eligibility: &Eligibility,
    max: usize,
) -> Vec<Listed> {
    let mut keyed: Vec<(f64, Listed)> = candidates
        .iter()
        .filter(|c| eligibility.admits(c))
        .map(|c| {
            let l = Listed { peer: c.peer, weight: c.score, probation: c.probation, group: c.group };
            (rendezvous_key(seed, attempt, &c.peer, c.score), l)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.peer.to_bytes().cmp(&b.1.peer.to_bytes())));
    keyed.dedup_by(|a, b| a.1.peer == b.1.peer);
    keyed.into_iter().take(max).map(|(_, l)| l).collect()
}

/// The next `n` seats of an announced list after the `seated` already chosen from it.
pub fn next_from_list(
    seed: &TaskId,
    attempt: u8,
    list: &[Listed],
    seated: usize,
    n: usize,
    probation_cap: usize,
) -> Vec<PeerId> {
    let mut all = select(seed, attempt, list, seated.saturating_add(n), probation_cap);
    all.drain(..seated.min(all.len()));
    all
}

/// Pick up to `n` eligible candidates not in `exclude`, by weighted rendezvous hashing.
/// The result is ordered by rank (best first); fewer than `n` when too few are eligible.
pub fn sample(
    task: &TaskId,
    attempt: u8,
    candidates: &[Candidate],
    eligibility: &Eligibility,
    exclude: &[PeerId],
    n: usize,
) -> Vec<PeerId> {
    let mut keyed: Vec<(f64, PeerId)> = candidates
        .iter()
        .filter(|c| eligibility.admits(c) && !exclude.contains(&c.peer))
        .map(|c| (rendezvous_key(task, attempt, &c.peer, c.score), c.peer))
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.to_bytes().cmp(&b.1.to_bytes())));
    keyed.dedup_by(|a, b| a.1 == b.1);
    keyed.into_iter().take(n).map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;
    use crate::ids::Hash32;

    fn cands(n: u8) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                peer: NodeKey::from_seed([i + 1; 32]).peer_id(),
                models: vec![ModelId(Hash32::of(b"m"))],
                price_per_1k: i as u64,
                free_slots: 1,
                score: 1.0,
                banned: false,
                probation: false,
                group: 0,
            })
            .collect()
    }

    fn elig() -> Eligibility {
        Eligibility { model: ModelId(Hash32::of(b"m")), max_price_per_1k: None }
    }

    #[test]
    fn sizes_and_quorums() {
        assert_eq!((committee_size(3, 0), committee_size(3, 1), committee_size(3, 2)), (3, 7, 15));
        assert_eq!((quorum(1), quorum(3), quorum(4), quorum(7)), (1, 2, 3, 4));
    }

    #[test]
    fn sampling_is_deterministic_and_order_free() {
        let c = cands(20);
        let t = TaskId(Hash32::of(b"t"));
        let a = sample(&t, 0, &c, &elig(), &[], 3);
        let mut rev = c.clone();
        rev.reverse();
        assert_eq!(a, sample(&t, 0, &rev, &elig(), &[], 3));
        assert_eq!(a.len(), 3);
        assert_ne!(a, sample(&TaskId(Hash32::of(b"u")), 0, &c, &elig(), &[], 3));
    }

    #[test]
    fn ineligible_and_excluded_are_never_sampled() {
        let mut c = cands(6);
        c[0].banned = true;
        c[1].free_slots = 0;
        c[2].models.clear();
        c[3].price_per_1k = 100;
        let e = Eligibility { model: ModelId(Hash32::of(b"m")), max_price_per_1k: Some(10) };
        let picked = sample(&TaskId(Hash32::of(b"t")), 0, &c, &e, &[c[4].peer], 5);
        assert_eq!(picked, vec![c[5].peer]);
    }

    #[test]
    fn weight_sets_the_odds() {
        let mut c = cands(10);
        c[0].score = 0.05;
        let mut low = 0;
        let mut high = 0;
        for i in 0..2000u32 {
            let t = TaskId(Hash32::of(&i.to_le_bytes()));
            let s = sample(&t, 0, &c, &elig(), &[], 3);
            low += s.contains(&c[0].peer) as u32;
            high += s.contains(&c[1].peer) as u32;
        }
        // Equal weights give each of 10 nodes ~600 of 2000 seats; a 20x lower weight, far fewer.
        assert!(high > 450 && high < 750, "{high}");
        assert!(low < 120, "{low}");
    }
}
