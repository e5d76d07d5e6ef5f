//! Who this node counts as established, and how it weighs and groups candidates
//! (DESIGN.md, "Trust model", promise 5).

use std::collections::HashSet;
use std::net::IpAddr;

use sampo_consensus::{PeerId, Reputation, ReputationParams};

/// The node's standing rules: configured trust, a closed network's admission, the
/// prefix-grouping whitelist, and the reputation parameters.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    pub params: ReputationParams,
    /// `consensus.trusted_peers`: established from the start.
    pub trusted: HashSet<PeerId>,
    /// A closed network: every admitted node is vouched for by an issuer's certificate
    /// (and nothing unadmitted reaches the registry or the rounds topic).
    pub closed: bool,
    /// `network.colocation_whitelist`: IPs whose peers are not grouped by prefix.
    pub whitelist: Vec<IpAddr>,
}

impl Trust {
    pub fn is_trusted(&self, peer: &PeerId) -> bool {
        self.closed || self.trusted.contains(peer)
    }

    /// Off probation: trusted, or enough vouched agreements.
    pub fn established(&self, peer: &PeerId, rep: &Reputation) -> bool {
        self.is_trusted(peer) || !rep.on_probation(&self.params)
    }

    /// Sampling weight at `now`.
    pub fn weight(&self, peer: &PeerId, rep: &Reputation, now_ms: u64) -> f64 {
        rep.weight_at(now_ms, &self.params, self.is_trusted(peer))
    }

    /// Prefix group of a peer's connection IP; 0 (ungrouped) when not connected or
    /// whitelisted.
    pub fn group(&self, ip: Option<IpAddr>) -> u32 {
        ip.map_or(0, |ip| sampo_p2p::prefix_group(ip, &self.whitelist))
    }
}
