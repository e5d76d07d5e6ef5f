//! What the p2p tests share: a loopback node config and a started node.

use std::time::Duration;

use prometheus_client::registry::Registry as Metrics;
use sampo_consensus::{Hash32, ModelId, ModelRef, NodeAnnouncement, NodeKey};
use sampo_p2p::{Multiaddr, P2pConfig, P2pEvent, P2pHandle, Protocol};
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

/// The bound on every wait in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// A node on 127.0.0.1, port 0, with fast announcements and discovery; every other
/// node is on 127.0.0.1 too (private addresses allowed, loopback exempt from the IP
/// colocation penalty, many connections per IP).
pub(crate) fn loopback(bootstrap: Option<&Multiaddr>) -> P2pConfig {
    P2pConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap: bootstrap.into_iter().cloned().collect(),
        announce_interval: Duration::from_millis(500),
        discovery_interval: Duration::from_millis(500),
        allow_private_addresses: true,
        colocation_whitelist: vec!["127.0.0.1".parse().expect("ip")],
        max_connections_per_ip: 256,
        ..P2pConfig::default()
    }
}

/// A spawned node, listening, announcing one model: its handle, its events, its
/// address (with its peer id) and its metrics.
pub(crate) struct Started {
    pub(crate) handle: P2pHandle,
    pub(crate) events: Receiver<P2pEvent>,
    pub(crate) addr: Multiaddr,
    // Read by the tests that check metrics (eclipse.rs), not by every test crate.
    #[allow(dead_code)]
    pub(crate) metrics: Metrics,
}

pub(crate) async fn spawn_listening(key: &NodeKey, cfg: P2pConfig) -> Started {
    let mut metrics = Metrics::default();
    let (handle, mut events) = sampo_p2p::spawn(key.clone(), cfg, &mut metrics).await.expect("spawn");
    let addr = timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(P2pEvent::Listening(a)) => break a,
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await
    .expect("listening in time");
    handle
        .set_announcement(NodeAnnouncement {
            models: vec![ModelRef { id: ModelId(Hash32::of(b"m")), name: "m".into() }],
            price_per_1k: 1,
            free_slots: 1,
            backend: "cpu".into(),
            device: "test".into(),
            version: "test".into(),
            addrs: Vec::new(),
            api_url: None,
            sent_ms: 0,
            // The p2p layer attaches a configured admission certificate.
            certificate: None,
        })
        .await
        .expect("announce");
    Started { handle, events, addr: addr.with(Protocol::P2p(key.peer_id())), metrics }
}
