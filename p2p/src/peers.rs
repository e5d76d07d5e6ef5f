//! The bounded peer set: which connections a node keeps once it has more than it needs.
//!
//! A node dials discovered peers while it has fewer than `target` connections; inbound
//! connections may push it above that. Above the high watermark (`target × 3 / 2`) the
//! surplus is closed, so a network of N nodes holds ~N·target connections instead of N²
//! — what lets 100 nodes share one machine. The gap between the two marks keeps a node
//! that was just pruned from redialling at once (no churn). Kademlia still learns every
//! peer; the registry learns them from gossip, which only needs a connected mesh.
//!
//! Never closed: peers in a gossipsub mesh (the gossip path itself), peers the operator
//! named (bootstrap, explicit dials), peers with a fetch in flight, and connections
//! younger than a grace period (a Kademlia query may be using it). Among the rest, the lowest gossipsub score
//! goes first, then inbound before outbound (this node chose its outbound peers; an
//! attacker who floods inbound connections cannot push them out), then the youngest.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sampo_consensus::PeerId;

/// A connection younger than this is never pruned.
pub const PRUNE_GRACE: Duration = Duration::from_secs(5);

/// A peer this node was connected to is not redialled by discovery for this long: a
/// well-known peer (a bootstrap node everyone dials first) prunes its surplus, and
/// without a pause the pruned would dial it straight back, round and round.
pub const REDIAL_BACKOFF: Duration = Duration::from_secs(60);

/// Peers remembered for [`REDIAL_BACKOFF`], at most (the oldest are forgotten first).
pub const MAX_RECENT: usize = 4096;

/// The prune threshold for a dial target.
pub fn high_watermark(target: u32) -> usize {
    (target as usize).saturating_mul(3) / 2
}

/// What the actor knows of one connected peer.
#[derive(Clone, Debug)]
pub struct Connected {
    pub since: Instant,
    /// This node dialled it.
    pub outbound: bool,
}

/// Peers this node is connected to (one entry per peer, whatever its connection count).
#[derive(Default)]
pub struct PeerSet {
    peers: HashMap<PeerId, Connected>,
    /// When each recent peer's last connection closed (bounded by [`MAX_RECENT`]).
    recent: HashMap<PeerId, Instant>,
}

impl PeerSet {
    /// The first connection to `peer` (later ones keep the first one's age).
    pub fn connected(&mut self, peer: PeerId, outbound: bool, now: Instant) {
        self.peers.entry(peer).or_insert(Connected { since: now, outbound });
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, peer: &PeerId, now: Instant) {
        self.peers.remove(peer);
        if self.recent.len() >= MAX_RECENT {
            self.recent.retain(|_, at| now.saturating_duration_since(*at) < REDIAL_BACKOFF);
            if self.recent.len() >= MAX_RECENT
                && let Some(oldest) = self.recent.iter().min_by_key(|(_, at)| **at).map(|(p, _)| *p)
            {
                self.recent.remove(&oldest);
            }
        }
        self.recent.insert(*peer, now);
    }

    /// Whether discovery may dial `peer` now (not disconnected within the backoff).
    pub fn may_dial(&self, peer: &PeerId, now: Instant) -> bool {
        self.recent.get(peer).is_none_or(|at| now.saturating_duration_since(*at) >= REDIAL_BACKOFF)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peers to disconnect now: as many as the set exceeds `high_watermark(target)`
    /// by, chosen among the prunable ones (see the module docs). `protected` says whether
    /// a peer must stay; `score` gives its gossipsub score.
    pub fn surplus(
        &self,
        target: u32,
        now: Instant,
        protected: impl Fn(&PeerId) -> bool,
        score: impl Fn(&PeerId) -> f64,
    ) -> Vec<PeerId> {
        let excess = self.peers.len().saturating_sub(high_watermark(target));
        if excess == 0 {
            return Vec::new();
        }
        let mut candidates: Vec<(f64, bool, Instant, PeerId)> = self
            .peers
            .iter()
            .filter(|(p, c)| now.saturating_duration_since(c.since) >= PRUNE_GRACE && !protected(p))
            .map(|(p, c)| (score(p), c.outbound, c.since, *p))
            .collect();
        // Lowest score, then inbound (false < true), then youngest (latest `since`);
        // the peer id makes the order total.
        candidates.sort_by(|a, b| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)).then(a.3.to_bytes().cmp(&b.3.to_bytes()))
        });
        candidates.into_iter().take(excess).map(|c| c.3).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn peer(i: u8) -> PeerId {
        sampo_consensus::NodeKey::from_seed([i; 32]).peer_id()
    }

    #[test]
    fn nothing_is_pruned_up_to_the_high_watermark() {
        let t0 = Instant::now();
        let mut set = PeerSet::default();
        for i in 0..18 {
            set.connected(peer(i), false, t0);
        }
        assert_eq!(high_watermark(12), 18);
        assert!(set.surplus(12, t0 + PRUNE_GRACE, |_| false, |_| 0.0).is_empty());
        set.connected(peer(18), false, t0);
        assert_eq!(set.surplus(12, t0 + PRUNE_GRACE, |_| false, |_| 0.0).len(), 1);
    }

    #[test]
    fn an_inbound_flood_cannot_push_out_outbound_or_mesh_peers() {
        let t0 = Instant::now();
        let mut set = PeerSet::default();
        // 8 peers this node chose, 4 of them in its mesh.
        for i in 0..8 {
            set.connected(peer(i), true, t0);
        }
        // 40 attacker connections, all inbound, all older than the grace period.
        for i in 100..140 {
            set.connected(peer(i), false, t0);
        }
        let mesh: HashSet<PeerId> = (0..4).map(peer).collect();
        let gone = set.surplus(24, t0 + PRUNE_GRACE, |p| mesh.contains(p), |_| 0.0);
        assert_eq!(gone.len(), 48 - 36);
        let ours: HashSet<PeerId> = (0..8).map(peer).collect();
        assert!(gone.iter().all(|p| !ours.contains(p)), "an outbound peer was pruned while inbound ones remained");
    }

    #[test]
    fn low_scores_go_first_and_young_connections_stay() {
        let t0 = Instant::now();
        let mut set = PeerSet::default();
        for i in 0..20 {
            set.connected(peer(i), true, t0);
        }
        // Two fresh ones: inside the grace period, whatever their score.
        set.connected(peer(50), false, t0 + PRUNE_GRACE);
        set.connected(peer(51), false, t0 + PRUNE_GRACE);
        let bad = peer(7);
        let now = t0 + PRUNE_GRACE;
        let gone = set.surplus(12, now, |_| false, |p| if *p == bad { -20.0 } else { 1.0 });
        assert_eq!(gone.len(), 22 - 18);
        assert_eq!(gone[0], bad);
        assert!(!gone.contains(&peer(50)) && !gone.contains(&peer(51)));
    }

    #[test]
    fn everything_protected_means_nothing_pruned() {
        let t0 = Instant::now();
        let mut set = PeerSet::default();
        for i in 0..40 {
            set.connected(peer(i), false, t0);
        }
        assert!(set.surplus(8, t0 + PRUNE_GRACE, |_| true, |_| 0.0).is_empty());
        set.disconnected(&peer(0), t0);
        assert_eq!(set.len(), 39);
    }

    #[test]
    fn a_peer_just_left_is_not_redialled_until_the_backoff_ends() {
        let t0 = Instant::now();
        let mut set = PeerSet::default();
        set.connected(peer(1), true, t0);
        assert!(set.may_dial(&peer(2), t0), "a peer never seen");
        set.disconnected(&peer(1), t0);
        assert!(!set.may_dial(&peer(1), t0 + REDIAL_BACKOFF / 2));
        assert!(set.may_dial(&peer(1), t0 + REDIAL_BACKOFF));
    }

    #[test]
    fn the_memory_of_recent_peers_is_bounded() {
        let t0 = Instant::now();
        let mut set = PeerSet::default();
        for i in 0..(MAX_RECENT + 50) {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let p = sampo_consensus::NodeKey::from_seed(seed).peer_id();
            set.disconnected(&p, t0 + Duration::from_millis(i as u64));
        }
        assert!(set.recent.len() <= MAX_RECENT);
    }
}
