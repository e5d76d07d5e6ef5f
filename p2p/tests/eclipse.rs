//! Eclipse resistance on loopback: the per-IP connection cap, the outbound slots inbound
//! connections cannot take, and addresses learned from peers that are not globally
//! routable kept out of Kademlia and out of every dial. Port 0, every wait bounded; a
//! "never happens" is asserted only after an event shows it would have happened by then.

use std::collections::HashSet;
use std::time::Duration;

use prometheus_client::registry::Registry as Metrics;
use sampo_consensus::{NodeKey, PeerId};
use sampo_p2p::{Multiaddr, P2pConfig, P2pHandle};
use tokio::time::Instant;

mod common;

use common::WAIT;

struct Node {
    handle: P2pHandle,
    addr: Multiaddr,
    metrics: Metrics,
}

impl Node {
    fn peer(&self) -> PeerId {
        self.handle.peer_id()
    }

    async fn connected(&self) -> HashSet<PeerId> {
        self.handle.connected_peers().await.expect("peers").into_iter().collect()
    }

    /// The sum of the samples named `name` (any labels) whose labels contain `labels`.
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).expect("encode");
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (series, value) = rest.rsplit_once(' ')?;
                (series.is_empty() || series.starts_with('{')).then_some(())?;
                series.contains(labels).then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    fn ignored(&self, source: &str) -> f64 {
        self.metric("sampo_p2p_addresses_ignored_total", &format!("source=\"{source}\""))
    }

    /// Kademlia random walks (closest-peer queries) completed so far.
    fn walks(&self) -> f64 {
        self.metric("libp2p_kad_query_result_get_closest_peers_ok_count", "")
            + self.metric("libp2p_kad_query_result_get_closest_peers_error_total", "")
    }
}

fn key(i: u8) -> NodeKey {
    NodeKey::from_seed([i.wrapping_add(101); 32])
}

/// A loopback node; `private` = whether it uses private addresses learned from peers.
fn cfg(bootstrap: Option<&Multiaddr>, private: bool) -> P2pConfig {
    P2pConfig { allow_private_addresses: private, colocation_whitelist: Vec::new(), ..common::loopback(bootstrap) }
}

async fn start(key: NodeKey, cfg: P2pConfig) -> Node {
    let common::Started { handle, mut events, addr, metrics } = common::spawn_listening(&key, cfg).await;
    // Nobody reads the events from here on; a full queue only drops them.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Node { addr, handle, metrics }
}

/// Poll `cond` until it holds; the deadline fails the test.
async fn until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_connection_from_one_ip_is_refused_and_the_first_two_stay() {
    let hub = start(key(0), P2pConfig { max_connections_per_ip: 2, ..cfg(None, true) }).await;
    let n1 = start(key(1), cfg(Some(&hub.addr), true)).await;
    let n2 = start(key(2), cfg(Some(&hub.addr), true)).await;
    let both: HashSet<PeerId> = [n1.peer(), n2.peer()].into();
    until("two connections at the hub", async || hub.connected().await == both).await;
    assert_eq!(hub.metric("sampo_p2p_connections_denied_per_ip_total", ""), 0.0);

    let n3 = start(key(3), cfg(Some(&hub.addr), true)).await;
    until("the hub to refuse the third", async || hub.metric("sampo_p2p_connections_denied_per_ip_total", "") >= 1.0)
        .await;
    // Refused before the handshake: the third never got a connection to the hub.
    assert!(!n3.connected().await.contains(&hub.peer()), "the third is connected");
    assert_eq!(hub.connected().await, both, "the first two stay connected");
    for n in [&n1, &n2] {
        assert!(n.connected().await.contains(&hub.peer()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connections_cannot_take_the_reserved_outbound_slots() {
    // 4 connections, 2 of them for this node's own dials: inbound get 2.
    let hub = start(key(10), P2pConfig { max_connections: 4, reserved_outbound: 2, ..cfg(None, true) }).await;
    let n1 = start(key(11), cfg(Some(&hub.addr), true)).await;
    let n2 = start(key(12), cfg(Some(&hub.addr), true)).await;
    let both: HashSet<PeerId> = [n1.peer(), n2.peer()].into();
    until("two inbound connections at the hub", async || hub.connected().await == both).await;

    let n3 = start(key(13), cfg(Some(&hub.addr), true)).await;
    let denied = "libp2p_swarm_connections_incoming_error_total";
    until("the hub to refuse a third inbound", async || hub.metric(denied, "error=\"Denied\"") >= 1.0).await;
    assert_eq!(hub.connected().await, both, "the inbound slots are full");

    // The hub can still dial a peer of its choosing.
    hub.handle.dial(n3.addr.clone()).await.expect("dial");
    until("the hub's own dial to connect", async || hub.connected().await.contains(&n3.peer())).await;
    assert!(hub.connected().await.is_superset(&both), "the inbound peers stay");
}

/// a — b — c, each of a and c bootstrapping from b only. b (which uses private
/// addresses) learns both and tells each about the other in Kademlia responses: a
/// 127.0.0.1 address, which a and c, refusing private addresses, do not dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_heard_through_kademlia_are_not_dialled() {
    let b = start(key(20), cfg(None, true)).await;
    let a = start(key(21), cfg(Some(&b.addr), false)).await;
    let c = start(key(22), cfg(Some(&b.addr), false)).await;
    // Several random walks each heard of the other peer and dropped its address (or,
    // were the filter broken, a and c connect: then fail at once, saying so)...
    until("a and c to hear of each other and ignore it", async || {
        (a.ignored("kademlia") >= 3.0 && c.ignored("kademlia") >= 3.0) || a.connected().await.contains(&c.peer())
    })
    .await;
    // ...while gossip through b works.
    until("a to see c's announcement", async || a.handle.live_nodes().iter().any(|n| n.peer == c.peer())).await;
    assert_eq!(a.connected().await, HashSet::from([b.peer()]), "a dialled c");
    assert_eq!(c.connected().await, HashSet::from([b.peer()]), "c dialled a");
    assert_eq!(a.ignored("identify"), 0.0, "b's address is a's bootstrap address: trusted");
}

/// b refuses private addresses, so what identify tells it of a and c stays out of its
/// routing table: a and c, though they would dial anything, never hear of each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_heard_through_identify_stay_out_of_kademlia() {
    let b = start(key(30), cfg(None, false)).await;
    let a = start(key(31), cfg(Some(&b.addr), true)).await;
    let c = start(key(32), cfg(Some(&b.addr), true)).await;
    until("b to ignore a's and c's identify addresses", async || b.ignored("identify") >= 2.0).await;
    // Three walks each after that: each would have found the other through b.
    let (wa, wc) = (a.walks(), c.walks());
    until("a and c to walk Kademlia", async || a.walks() >= wa + 3.0 && c.walks() >= wc + 3.0).await;
    assert!(!a.connected().await.contains(&c.peer()), "a dialled c");
    assert!(!c.connected().await.contains(&a.peer()), "c dialled a");
}

/// The control for both: with private addresses allowed (a testnet on one host), a
/// and c find and dial each other through b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_dialled_when_allowed() {
    let b = start(key(40), cfg(None, true)).await;
    let a = start(key(41), cfg(Some(&b.addr), true)).await;
    let c = start(key(42), cfg(Some(&b.addr), true)).await;
    until("a and c to connect", async || a.connected().await.contains(&c.peer())).await;
    assert_eq!(a.ignored("kademlia") + a.ignored("identify") + b.ignored("identify"), 0.0);
}
