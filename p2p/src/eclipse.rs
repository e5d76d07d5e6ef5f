//! Eclipse resistance: which addresses learned from peers may be dialled, and a cap on
//! the connections to or from one IP address.
//!
//! An attacker who controls every connection of a node controls what it sees. Three
//! things make that expensive: the per-IP cap here ([`IpLimits`]), outbound slots that
//! inbound connections cannot take (libp2p's `connection_limits`, set up in the service),
//! and [`AddrPolicy`], which keeps addresses that are not globally routable — and that a
//! peer could use to point this node at its own LAN, or at nothing — out of Kademlia and
//! out of every dial that discovery makes.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionEstablished, ListenFailure};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Whether `ip` is reachable from the public internet: not private, loopback,
/// link-local, unspecified, shared (CGNAT), documentation, benchmarking, multicast,
/// broadcast or reserved. An IPv4-mapped IPv6 address is judged as its IPv4 address.
pub fn is_global_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_global_v4(v4),
            None => is_global_v6(v6),
        },
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network", 0.0.0.0 included
        || ip.is_private() // 10/8, 172.16/12, 192.168/16
        || ip.is_loopback() // 127/8
        || ip.is_link_local() // 169.254/16
        || (a == 100 && (b & 0xc0) == 64) // 100.64/10, shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24, IETF protocol assignments
        || ip.is_documentation() // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (a == 198 && (b & 0xfe) == 18) // 198.18/15, benchmarking
        || ip.is_multicast() // 224/4
        || a >= 240) // 240/4 reserved, 255.255.255.255 broadcast
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || s[..6] == [0; 6] // ::/96, the deprecated IPv4-compatible addresses
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48, local-use NAT64
        || (s[0] == 0x100 && s[1..4] == [0; 3]) // 100::/64, discard-only
        || (s[0] == 0x2001 && s[1] == 0xdb8) // 2001:db8::/32, documentation
        || (s[0] & 0xfff0) == 0x3ff0 // 3fff::/20, documentation
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7, unique local
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10, link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, deprecated site-local
        || ip.is_multicast()) // ff00::/8
}

/// Whether `addr` names a globally routable IP. DNS names are not: what they resolve
/// to is not known here (and a peer could name its victim's LAN), and neither are
/// addresses without an IP (`/unix`, `/memory`).
pub fn is_global_addr(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => is_global_ip(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => is_global_ip(IpAddr::V6(ip)),
        _ => false,
    }
}

/// The IP an address starts with, if any.
/// The network prefix a seat-spreading rule groups `ip` by (DESIGN.md, "Trust model",
/// promise 5): its /24 (IPv4, IPv4-mapped included) or /48 (IPv6), as a nonzero tag;
/// 0 (not grouped) for an address in `whitelist` (a testnet on one host).
pub fn prefix_group(ip: IpAddr, whitelist: &[IpAddr]) -> u32 {
    if whitelist.contains(&ip) {
        return 0;
    }
    let mut h = blake3::Hasher::new();
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            h.update(b"6");
            h.update(&v6.octets()[..6]);
        }
        IpAddr::V6(v6) => {
            h.update(b"4");
            h.update(&v6.to_ipv4_mapped().map(|v4| v4.octets()).unwrap_or_default()[..3]);
        }
        IpAddr::V4(v4) => {
            h.update(b"4");
            h.update(&v4.octets()[..3]);
        }
    }
    let b = h.finalize();
    u32::from_le_bytes([b.as_bytes()[0], b.as_bytes()[1], b.as_bytes()[2], b.as_bytes()[3]]).max(1)
}

pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// What the per-IP cap counts: an IPv4 address, or the /64 an IPv6 address is in (one
/// host routinely holds a whole /64, so per-address counting would cap nothing).
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// `addr` without a trailing `/p2p/<peer id>`.
fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// Which peer-supplied addresses may go into Kademlia and be dialled.
#[derive(Clone, Debug, Default)]
pub struct AddrPolicy {
    allow_private: bool,
    /// Addresses this node was told to use (bootstrap, explicit dials): always allowed.
    trusted: HashSet<Multiaddr>,
}

impl AddrPolicy {
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private, trusted: HashSet::new() }
    }

    /// Allow `addr` whatever it is (an address the operator chose).
    pub fn trust(&mut self, addr: &Multiaddr) {
        self.trusted.insert(without_peer(addr));
    }

    pub fn permits(&self, addr: &Multiaddr) -> bool {
        self.allow_private || is_global_addr(addr) || self.trusted.contains(&without_peer(addr))
    }
}

/// Where an ignored address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSource {
    /// A peer's own listen addresses, from identify.
    Identify,
    /// Addresses of other peers, from Kademlia responses.
    Kademlia,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    /// identify or kademlia.
    source: &'static str,
}

/// Counters of what the eclipse defences refused.
#[derive(Clone, Debug, Default)]
pub(crate) struct EclipseMetrics {
    addresses_ignored: Family<SourceLabel, Counter>,
    denied_per_ip: Counter,
}

impl EclipseMetrics {
    /// Registers `sampo_p2p_addresses_ignored_total{source}` and
    /// `sampo_p2p_connections_denied_per_ip_total`.
    pub(crate) fn register(root: &mut Registry) -> Self {
        let m = Self::default();
        let r = root.sub_registry_with_prefix("sampo_p2p");
        r.register(
            "addresses_ignored",
            "Peer addresses learned from identify or Kademlia and not used: not globally routable",
            m.addresses_ignored.clone(),
        );
        r.register(
            "connections_denied_per_ip",
            "Connections refused because their IP (IPv6: /64) already had the most allowed",
            m.denied_per_ip.clone(),
        );
        m
    }

    fn ignored(&self, source: AddrSource, n: u64) {
        let source = match source {
            AddrSource::Identify => "identify",
            AddrSource::Kademlia => "kademlia",
        };
        self.addresses_ignored.get_or_create(&SourceLabel { source }).inc_by(n);
    }
}

/// Wraps a behaviour that supplies addresses for dials (Kademlia: its routing table and
/// the peers its queries hear of) and drops those the [`AddrPolicy`] does not permit.
/// Dereferences to the inner behaviour.
pub(crate) struct Filtered<B> {
    inner: B,
    policy: AddrPolicy,
    source: AddrSource,
    metrics: EclipseMetrics,
}

impl<B> Filtered<B> {
    pub(crate) fn new(inner: B, policy: AddrPolicy, source: AddrSource, metrics: EclipseMetrics) -> Self {
        Self { inner, policy, source, metrics }
    }

    pub(crate) fn trust(&mut self, addr: &Multiaddr) {
        self.policy.trust(addr);
    }

    /// Whether an address learned from `source` may be used; counts it if not.
    pub(crate) fn admit(&self, addr: &Multiaddr, source: AddrSource) -> bool {
        let ok = self.policy.permits(addr);
        if !ok {
            tracing::debug!(%addr, ?source, "address not globally routable; ignored");
            self.metrics.ignored(source, 1);
        }
        ok
    }
}

impl<B> Deref for Filtered<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> DerefMut for Filtered<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Filtered<B> {
    type ConnectionHandler = B::ConnectionHandler;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let mut extra = self.inner.handle_pending_outbound_connection(id, peer, addresses, role)?;
        let before = extra.len();
        extra.retain(|a| self.policy.permits(a));
        let dropped = (before - extra.len()) as u64;
        if dropped > 0 {
            tracing::debug!(?peer, dropped, "addresses not globally routable; not dialled");
            self.metrics.ignored(self.source, dropped);
        }
        Ok(extra)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        // Other behaviours' reports of a peer's addresses pass the same filter.
        if let FromSwarm::NewExternalAddrOfPeer(e) = &event
            && !self.policy.permits(e.addr)
        {
            return;
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// A connection refused by [`IpLimits`].
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {limit} connections, the most one IP may have")]
pub struct TooManyFromIp {
    pub ip: IpAddr,
    pub limit: u32,
}

/// Caps the connections to or from one IP (IPv6: one /64), both directions counted;
/// inbound ones are refused before their handshake when the cap is already reached.
pub(crate) struct IpLimits {
    max: u32,
    pending_inbound: HashMap<ConnectionId, IpAddr>,
    established: HashMap<ConnectionId, IpAddr>,
    /// Per IP key: pending inbound plus established connections.
    counts: HashMap<IpAddr, u32>,
    metrics: EclipseMetrics,
}

impl IpLimits {
    pub(crate) fn new(max: u32, metrics: EclipseMetrics) -> Self {
        Self { max, pending_inbound: HashMap::new(), established: HashMap::new(), counts: HashMap::new(), metrics }
    }

    fn check(&self, ip: IpAddr) -> Result<(), ConnectionDenied> {
        if self.counts.get(&ip).copied().unwrap_or(0) >= self.max {
            self.metrics.denied_per_ip.inc();
            tracing::debug!(%ip, limit = self.max, "connection refused: too many from one IP");
            return Err(ConnectionDenied::new(TooManyFromIp { ip, limit: self.max }));
        }
        Ok(())
    }

    fn add(&mut self, ip: IpAddr) {
        *self.counts.entry(ip).or_insert(0) += 1;
    }

    fn remove(&mut self, ip: IpAddr) {
        if let Some(n) = self.counts.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&ip);
            }
        }
    }

    fn forget_pending(&mut self, id: ConnectionId) {
        if let Some(ip) = self.pending_inbound.remove(&id) {
            self.remove(ip);
        }
    }
}

impl NetworkBehaviour for IpLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote).map(ip_key) else { return Ok(()) };
        self.check(ip)?;
        self.pending_inbound.insert(id, ip);
        self.add(ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Its pending slot becomes the established one (counted again on
        // `ConnectionEstablished`, which follows at once).
        self.forget_pending(id);
        if let Some(ip) = ip_of(remote).map(ip_key) {
            self.check(ip)?;
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: PeerId,
        addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if let Some(ip) = ip_of(addr).map(ip_key) {
            self.check(ip)?;
        }
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished { connection_id, endpoint, .. }) => {
                if let Some(ip) = ip_of(endpoint.get_remote_address()).map(ip_key) {
                    self.established.insert(connection_id, ip);
                    self.add(ip);
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                if let Some(ip) = self.established.remove(&connection_id) {
                    self.remove(ip);
                }
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => self.forget_pending(connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _peer: PeerId, _id: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> bool {
        is_global_ip(s.parse().expect("ipv4"))
    }

    fn v6(s: &str) -> bool {
        is_global_ip(s.parse().expect("ipv6"))
    }

    #[test]
    fn ipv4_classes() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.10.20",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.200",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!v4(private), "{private} is not global");
        }
        for global in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "93.184.216.34",
            "198.20.0.1",
            "223.255.255.255",
        ] {
            assert!(v4(global), "{global} is global");
        }
    }

    #[test]
    fn ipv6_classes() {
        for private in [
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd12:3456:789a::1",
            "fec0::1",
            "2001:db8::1",
            "2001:db8:ffff::1",
            "3fff::1",
            "ff02::1",
            "ff0e::1",
            "100::1",
            "64:ff9b:1::1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "::10.0.0.1",
        ] {
            assert!(!v6(private), "{private} is not global");
        }
        for global in [
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(v6(global), "{global} is global");
        }
    }

    #[test]
    fn multiaddrs() {
        let global = |s: &str| is_global_addr(&s.parse().expect("multiaddr"));
        assert!(global("/ip4/8.8.8.8/tcp/4001"));
        assert!(global("/ip6/2606:4700:4700::1111/tcp/4001/p2p/12D3KooWGzh5vS2ZB8ThWfm56fRtcYJm6E8QxvMZLNRbEu5q3hMV"));
        assert!(!global("/ip4/127.0.0.1/tcp/4001"));
        assert!(!global("/ip6/fd00::1/tcp/4001"));
        assert!(!global("/dns4/localhost/tcp/4001"));
        assert!(!global("/dns/example.com/tcp/4001"));
        assert!(!global("/p2p/12D3KooWGzh5vS2ZB8ThWfm56fRtcYJm6E8QxvMZLNRbEu5q3hMV"));
    }

    #[test]
    fn policy_trusts_chosen_addresses_and_private_when_allowed() {
        let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("addr");
        let mut p = AddrPolicy::new(false);
        assert!(!p.permits(&loopback));
        assert!(p.permits(&"/ip4/8.8.8.8/tcp/1".parse().expect("addr")));
        // A bootstrap address with its /p2p suffix trusts the bare address too.
        let peer = PeerId::random();
        p.trust(&loopback.clone().with(Protocol::P2p(peer)));
        assert!(p.permits(&loopback));
        assert!(p.permits(&loopback.clone().with(Protocol::P2p(peer))));
        assert!(!p.permits(&"/ip4/127.0.0.1/tcp/4002".parse().expect("addr")));
        assert!(AddrPolicy::new(true).permits(&"/ip4/10.0.0.1/tcp/1".parse().expect("addr")));
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let a: IpAddr = "2001:4860:1:2:aaaa::1".parse().expect("v6");
        let b: IpAddr = "2001:4860:1:2:bbbb::2".parse().expect("v6");
        let c: IpAddr = "2001:4860:1:3::1".parse().expect("v6");
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let mapped: IpAddr = "::ffff:1.2.3.4".parse().expect("v6");
        assert_eq!(ip_key(mapped), "1.2.3.4".parse::<IpAddr>().expect("v4"));
    }

    #[test]
    fn prefix_groups_are_slash24_and_slash48() {
        let g = |s: &str| super::prefix_group(s.parse().expect("ip"), &["127.0.0.1".parse().expect("ip")]);
        assert_eq!(g("203.0.113.7"), g("203.0.113.200"));
        assert_ne!(g("203.0.113.7"), g("203.0.114.7"));
        assert_eq!(g("::ffff:203.0.113.9"), g("203.0.113.7"));
        assert_eq!(g("2001:db8:aa:1::1"), g("2001:db8:aa:ffff::2"));
        assert_ne!(g("2001:db8:aa::1"), g("2001:db8:ab::1"));
        assert_eq!(g("127.0.0.1"), 0, "whitelisted: not grouped");
        assert_ne!(g("127.0.0.2"), 0);
    }
}
