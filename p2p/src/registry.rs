//! The live set of nodes, from their signed announcements. Pure: time is passed in.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use sampo_consensus::{AdmissionError, ModelId, NodeAnnouncement, PeerId};
use serde::Serialize;

/// Most entries held: a newcomer beyond this evicts the least valuable entry (a flood of
/// fresh identities can't grow memory without limit, nor lock honest newcomers out).
pub const MAX_REGISTRY_ENTRIES: usize = 10_000;
/// An entry expires after this many announcement intervals without a new one.
pub const MISSED_ANNOUNCEMENTS: u64 = 3;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveNode {
    pub peer: PeerId,
    pub announcement: NodeAnnouncement,
    /// Our clock when the latest announcement arrived.
    pub seen_ms: u64,
    /// The address of our direct connection to the peer, if we have one: the IP as
    /// this node saw it, not as the peer claims.
    pub ip: Option<IpAddr>,
}

#[derive(Debug)]
pub struct Registry {
    interval_ms: u64,
    entries: HashMap<PeerId, LiveNode>,
    /// A closed network: an entry counts as live only while the certificate it was
    /// admitted with (checked before [`Registry::observe`]) is unexpired.
    closed: bool,
    /// Remote IPs of connected peers.
    ips: HashMap<PeerId, IpAddr>,
    /// Peers the node values (established in its reputation view): never evicted for
    /// a newcomer.
    valued: HashSet<PeerId>,
}

impl Registry {
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms: interval_ms.max(1),
            entries: HashMap::new(),
            closed: false,
            ips: HashMap::new(),
            valued: HashSet::new(),
        }
    }

    /// A registry of a closed network: entries whose certificate has expired (or that
    /// carry none) are never live, so never sampled, whatever else they announce.
    pub fn closed(interval_ms: u64) -> Self {
        Self { closed: true, ..Self::new(interval_ms) }
    }

    fn admitted(&self, e: &LiveNode, now_ms: u64) -> bool {
        !self.closed || e.announcement.certificate.as_ref().is_some_and(|c| now_ms < c.expires_ms)
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
            if self.entries.len() >= MAX_REGISTRY_ENTRIES && !self.evict_one() {
                return false;
            }
        }
        self.entries.insert(peer, LiveNode { peer, announcement: ann, seen_ms: now_ms, ip: None });
        true
    }

    /// Make room for a newcomer: drop the least valuable entry — not one the node values,
    /// preferring peers without a direct connection, then the longest unheard. Returns
    /// false when every entry is valued.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .values()
            .filter(|e| !self.valued.contains(&e.peer))
            .min_by_key(|e| (self.ips.contains_key(&e.peer), e.seen_ms, e.peer))
            .map(|e| e.peer);
        match victim {
            Some(p) => {
                self.entries.remove(&p);
                true
            }
            None => false,
        }
    }

    /// The peers the node values (replaces the previous set; at most
    /// [`MAX_REGISTRY_ENTRIES`] are kept).
    pub fn set_valued(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        self.valued = peers.into_iter().take(MAX_REGISTRY_ENTRIES).collect();
    }

    /// A connection to `peer` from or to `ip` was established.
    pub fn connected(&mut self, peer: PeerId, ip: IpAddr) {
        self.ips.insert(peer, ip);
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.ips.remove(peer);
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
        let mut v: Vec<LiveNode> = self
            .entries
            .values()
            .filter(|e| now_ms.saturating_sub(e.seen_ms) <= ttl && self.admitted(e, now_ms))
            .map(|e| LiveNode { ip: self.ips.get(&e.peer).copied(), ..e.clone() })
            .collect();
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

/// Admission certificates seen and checked, at most this many remembered.
pub const MAX_ADMISSION_CACHE: usize = 2 * MAX_REGISTRY_ENTRIES;

/// What this node knows of a peer's admission to a closed network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmissionStatus {
    /// Open network, or a verified certificate valid until then (unix ms).
    Admitted,
    /// No announcement with a certificate seen yet: its messages are not relayed, but
    /// it is not penalised either (its announcement may simply not have arrived).
    Unknown,
    /// Its announcement carried no valid certificate, or the certificate expired.
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Admitted { expires_ms: u64 },
    Refused,
}

/// The admission gate of a closed network: which issuers it trusts, and a cache of the
/// peers whose certificates were checked (so a message costs a map lookup, not a
/// signature check). Pure: time is passed in.
#[derive(Debug, Default)]
pub struct Admission {
    issuers: Vec<[u8; 32]>,
    seen: HashMap<PeerId, Seen>,
}

impl Admission {
    /// `issuers` empty: an open network that admits everyone.
    pub fn new(issuers: Vec<[u8; 32]>) -> Self {
        Self { issuers, seen: HashMap::new() }
    }

    pub fn is_closed(&self) -> bool {
        !self.issuers.is_empty()
    }

    pub fn issuers(&self) -> &[[u8; 32]] {
        &self.issuers
    }

    /// Check the certificate an announcement signed by `signer` carries, and remember
    /// the outcome. Always `Ok` on an open network.
    pub fn check_announcement(
        &mut self,
        signer: PeerId,
        ann: &NodeAnnouncement,
        now_ms: u64,
    ) -> Result<(), AdmissionError> {
        if !self.is_closed() {
            return Ok(());
        }
        // The same certificate as last time: already verified, only its expiry matters.
        if let (Some(Seen::Admitted { expires_ms }), Some(c)) = (self.seen.get(&signer), &ann.certificate)
            && *expires_ms == c.expires_ms
            && c.subject == signer
            && now_ms < c.expires_ms
        {
            return Ok(());
        }
        let outcome = match &ann.certificate {
            None => Err(AdmissionError::Missing),
            Some(c) => c.verify(&signer, &self.issuers, now_ms).map(|()| c.expires_ms),
        };
        self.remember(
            signer,
            match outcome {
                Ok(expires_ms) => Seen::Admitted { expires_ms },
                Err(_) => Seen::Refused,
            },
            now_ms,
        );
        outcome.map(|_| ())
    }

    fn remember(&mut self, peer: PeerId, seen: Seen, now_ms: u64) {
        if self.seen.len() >= MAX_ADMISSION_CACHE && !self.seen.contains_key(&peer) {
            self.seen.retain(|_, s| matches!(s, Seen::Admitted { expires_ms } if now_ms < *expires_ms));
            if self.seen.len() >= MAX_ADMISSION_CACHE {
                // Full of valid certificates: this one is checked again next time.
                return;
            }
        }
        self.seen.insert(peer, seen);
    }

    /// May a message signed by `peer` be relayed and handed to the node?
    pub fn status(&self, peer: &PeerId, now_ms: u64) -> AdmissionStatus {
        if !self.is_closed() {
            return AdmissionStatus::Admitted;
        }
        match self.seen.get(peer) {
            Some(Seen::Admitted { expires_ms }) if now_ms < *expires_ms => AdmissionStatus::Admitted,
            Some(_) => AdmissionStatus::Refused,
            None => AdmissionStatus::Unknown,
        }
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
            certificate: None,
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

    #[test]
    fn closed_network_admits_only_certified_peers_until_expiry() {
        use sampo_consensus::AdmissionCertificate;
        let issuer = NodeKey::from_seed([9; 32]);
        let rogue_issuer = NodeKey::from_seed([8; 32]);
        let good = NodeKey::from_seed([1; 32]).peer_id();
        let bare = NodeKey::from_seed([2; 32]).peer_id();
        let forged = NodeKey::from_seed([3; 32]).peer_id();
        let mut gate = Admission::new(vec![issuer.public()]);
        let mut with_cert = ann(0, 1, b"m");
        with_cert.certificate = Some(AdmissionCertificate::issue(&issuer, good, 1000));
        let mut rogue = ann(0, 1, b"m");
        rogue.certificate = Some(AdmissionCertificate::issue(&rogue_issuer, forged, 1000));
        assert_eq!(gate.status(&good, 0), AdmissionStatus::Unknown);
        assert_eq!(gate.check_announcement(good, &with_cert, 0), Ok(()));
        assert_eq!(gate.check_announcement(good, &with_cert, 10), Ok(()), "cached");
        assert_eq!(gate.status(&good, 999), AdmissionStatus::Admitted);
        assert_eq!(gate.status(&good, 1000), AdmissionStatus::Refused, "expired");
        assert!(gate.check_announcement(good, &with_cert, 1000).is_err());
        assert_eq!(gate.check_announcement(bare, &ann(0, 1, b"m"), 0), Err(AdmissionError::Missing));
        assert_eq!(gate.status(&bare, 0), AdmissionStatus::Refused);
        assert!(matches!(gate.check_announcement(forged, &rogue, 0), Err(AdmissionError::UnknownIssuer(_))));
        // Someone else's certificate does not admit its presenter.
        assert!(matches!(gate.check_announcement(bare, &with_cert, 0), Err(AdmissionError::WrongSubject { .. })));
        // Open: everyone.
        let mut open = Admission::new(Vec::new());
        assert_eq!(open.check_announcement(bare, &ann(0, 1, b"m"), 0), Ok(()));
        assert_eq!(open.status(&bare, 0), AdmissionStatus::Admitted);

        // A closed registry stops listing an entry when its certificate expires.
        let mut r = Registry::closed(1000);
        r.observe(good, with_cert, 0);
        assert_eq!(r.live(999).len(), 1);
        assert!(r.live(1000).is_empty());
        assert!(r.serving(&ModelId(Hash32::of(b"m")), 1000).is_empty());
    }

    fn key(i: u32) -> PeerId {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        seed[31] = 0x5b;
        NodeKey::from_seed(seed).peer_id()
    }

    /// A flood of fresh identities fills the registry; an honest newcomer still gets in,
    /// and the peers the node values stay.
    #[test]
    fn a_full_registry_evicts_instead_of_locking_newcomers_out() {
        let mut r = Registry::new(1_000_000);
        let valued: Vec<PeerId> = (0..10).map(key).collect();
        let connected = key(10);
        for (i, p) in valued.iter().chain([&connected]).enumerate() {
            assert!(r.observe(*p, ann(0, 1, b"a"), i as u64));
        }
        r.set_valued(valued.clone());
        r.connected(connected, "203.0.113.7".parse().expect("ip"));
        for i in 11..MAX_REGISTRY_ENTRIES as u32 {
            assert!(r.observe(key(i), ann(0, 1, b"a"), 100 + u64::from(i)));
        }
        assert_eq!(r.len(), MAX_REGISTRY_ENTRIES);
        let newcomer = NodeKey::from_seed([9; 32]).peer_id();
        assert!(r.observe(newcomer, ann(0, 1, b"a"), 1_000_000));
        assert_eq!(r.len(), MAX_REGISTRY_ENTRIES);
        assert!(r.get(&newcomer).is_some());
        // The flood's oldest unconnected entry went, not a valued or connected peer.
        assert!(r.get(&key(11)).is_none());
        assert!(valued.iter().all(|p| r.get(p).is_some()));
        assert!(r.get(&connected).is_some());
        assert_eq!(
            r.live(1_000_000).iter().find(|e| e.peer == connected).and_then(|e| e.ip),
            Some("203.0.113.7".parse().expect("ip"))
        );
    }
}
