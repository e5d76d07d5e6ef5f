//! The live set of nodes, from their signed announcements. Pure: time is passed in.

use std::collections::HashMap;

use sampo_consensus::{ModelId, NodeAnnouncement, PeerId};
use serde::Serialize;

/// Entries beyond this many are not admitted (a flood of fresh identities can't grow
/// memory without limit).
pub const MAX_REGISTRY_ENTRIES: usize = 10_000;
/// An entry expires after this many announcement intervals without a new one.
pub const MISSED_ANNOUNCEMENTS: u64 = 3;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveNode {
    pub peer: PeerId,
    pub announcement: NodeAnnouncement,
    /// Our clock when the latest announcement arrived.
    pub seen_ms: u64,
}

#[derive(Debug)]
pub struct Registry {
    interval_ms: u64,
    entries: HashMap<PeerId, LiveNode>,
}

impl Registry {
    pub fn new(interval_ms: u64) -> Self {
        Self { interval_ms: interval_ms.max(1), entries: HashMap::new() }
    }

    fn ttl_ms(&self) -> u64 {
        self.interval_ms * MISSED_ANNOUNCEMENTS
    }

    /// Record an announcement; older ones than the one held are ignored. Returns whether
    /// the peer is new to the live set.
    pub fn observe(&mut self, peer: PeerId, ann: NodeAnnouncement, now_ms: u64) -> bool {
        if let Some(e) = self.entries.get_mut(&peer) {
            if ann.sent_ms >= e.announcement.sent_ms {
                e.announcement = ann;
                e.seen_ms = now_ms;
            }
            return false;
        }
        if self.entries.len() >= MAX_REGISTRY_ENTRIES {
            self.expire(now_ms);
            if self.entries.len() >= MAX_REGISTRY_ENTRIES {
                return false;
            }
        }
        self.entries.insert(peer, LiveNode { peer, announcement: ann, seen_ms: now_ms });
        true
    }

    /// Drop entries that missed three announcements; returns who left.
    pub fn expire(&mut self, now_ms: u64) -> Vec<PeerId> {
        let ttl = self.ttl_ms();
        let gone: Vec<PeerId> =
            self.entries.values().filter(|e| now_ms.saturating_sub(e.seen_ms) > ttl).map(|e| e.peer).collect();
        for p in &gone {
            self.entries.remove(p);
        }
        gone
    }

    pub fn remove(&mut self, peer: &PeerId) {
        self.entries.remove(peer);
    }

    pub fn get(&self, peer: &PeerId) -> Option<&LiveNode> {
        self.entries.get(peer)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every live node, sorted by peer id.
    pub fn live(&self, now_ms: u64) -> Vec<LiveNode> {
        let ttl = self.ttl_ms();
        let mut v: Vec<LiveNode> =
            self.entries.values().filter(|e| now_ms.saturating_sub(e.seen_ms) <= ttl).cloned().collect();
        v.sort_by_key(|e| e.peer);
        v
    }

    /// Live nodes that serve `model` and have a free slot.
    pub fn serving(&self, model: &ModelId, now_ms: u64) -> Vec<LiveNode> {
        self.live(now_ms)
            .into_iter()
            .filter(|e| e.announcement.free_slots > 0 && e.announcement.models.iter().any(|m| m.id == *model))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sampo_consensus::{Hash32, ModelRef, NodeKey};

    fn ann(sent_ms: u64, free: u32, model: &[u8]) -> NodeAnnouncement {
        NodeAnnouncement {
            models: vec![ModelRef { id: ModelId(Hash32::of(model)), name: "m".into() }],
            price_per_1k: 1,
            free_slots: free,
            backend: "cpu".into(),
            device: "test".into(),
            version: "0".into(),
            addrs: Vec::new(),
            api_url: None,
            sent_ms,
        }
    }

    #[test]
    fn expires_after_three_missed_announcements() {
        let mut r = Registry::new(1000);
        let p = NodeKey::from_seed([1; 32]).peer_id();
        assert!(r.observe(p, ann(0, 1, b"a"), 0));
        assert_eq!(r.expire(3000), Vec::<PeerId>::new());
        assert_eq!(r.expire(3001), vec![p]);
        assert!(r.is_empty());
    }

    #[test]
    fn answers_who_serves_a_model_with_capacity() {
        let mut r = Registry::new(1000);
        let a = NodeKey::from_seed([1; 32]).peer_id();
        let b = NodeKey::from_seed([2; 32]).peer_id();
        let c = NodeKey::from_seed([3; 32]).peer_id();
        r.observe(a, ann(0, 2, b"m"), 0);
        r.observe(b, ann(0, 0, b"m"), 0);
        r.observe(c, ann(0, 2, b"other"), 0);
        let s = r.serving(&ModelId(Hash32::of(b"m")), 10);
        assert_eq!(s.iter().map(|e| e.peer).collect::<Vec<_>>(), vec![a]);
        // An older announcement does not overwrite a newer one.
        r.observe(a, ann(5, 3, b"m"), 10);
        r.observe(a, ann(4, 0, b"m"), 11);
        assert_eq!(r.get(&a).map(|e| e.announcement.free_slots), Some(3));
    }
}
