//! A closed network (admission keys set) on loopback, port 0, every wait bounded: only
//! certified nodes enter the registry and have their gossip relayed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry as Metrics;
use sampo_consensus::{AdmissionCertificate, Commit, Hash32, NodeKey, PeerId, SignedEnvelope, TaskId};
use sampo_p2p::{GossipTopic, Multiaddr, P2pConfig, P2pError, P2pEvent, P2pHandle};
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout};

mod common;

use common::WAIT;
const DAY_MS: u64 = 86_400_000;

struct Node {
    key: NodeKey,
    handle: P2pHandle,
    events: Receiver<P2pEvent>,
    addr: Multiaddr,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

fn key(i: u8) -> NodeKey {
    NodeKey::from_seed([i.wrapping_add(100); 32])
}

fn cfg(bootstrap: Option<&Multiaddr>, admission_keys: Vec<[u8; 32]>, cert: Option<AdmissionCertificate>) -> P2pConfig {
    P2pConfig { admission_keys, certificate: cert, ..common::loopback(bootstrap) }
}

async fn start(key: NodeKey, cfg: P2pConfig) -> Node {
    let common::Started { handle, events, addr, .. } = common::spawn_listening(&key, cfg).await;
    Node { key, handle, events, addr }
}

async fn until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn commit(key: &NodeKey, n: u8) -> SignedEnvelope {
    SignedEnvelope::seal(key, &Commit { task: TaskId(Hash32::of(&[n])), attempt: 0, hash: Hash32::of(b"h") })
        .expect("seal")
}

fn live(h: &P2pHandle) -> Vec<PeerId> {
    h.live_nodes().into_iter().map(|n| n.peer).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certified_nodes_are_registered_and_relayed() {
    let issuer = NodeKey::from_seed([42; 32]);
    let rogue_issuer = NodeKey::from_seed([43; 32]);
    let keys = vec![issuer.public()];
    let cert = |k: &NodeKey| AdmissionCertificate::issue(&issuer, k.peer_id(), now_ms() + DAY_MS);

    let hub_key = key(0);
    let mut hub = start(hub_key.clone(), cfg(None, keys.clone(), Some(cert(&hub_key)))).await;
    assert_eq!(hub.handle.admission().issuers, 1);
    let member_key = key(1);
    let member = start(member_key.clone(), cfg(Some(&hub.addr), keys.clone(), Some(cert(&member_key)))).await;
    // An open-network node with no certificate, and one whose certificate an issuer
    // the network does not list signed.
    let outsider = start(key(2), cfg(Some(&hub.addr), Vec::new(), None)).await;
    let rogue_key = key(3);
    let rogue_cert = AdmissionCertificate::issue(&rogue_issuer, rogue_key.peer_id(), now_ms() + DAY_MS);
    let rogue = start(rogue_key, cfg(Some(&hub.addr), Vec::new(), Some(rogue_cert))).await;

    let h = hub.handle.clone();
    let m = member.key.peer_id();
    until("the certified member in the hub's registry", async || live(&h).contains(&m)).await;
    // The uncertified nodes' announcements are rejected: they pay in gossip score.
    for bad in [&outsider, &rogue] {
        let p = bad.key.peer_id();
        until("an uncertified node penalised", async || h.peer_score(p).await.expect("score").is_some_and(|s| s < 0.0))
            .await;
    }
    // Their commits are not handed to the hub's node nor relayed; the member's is.
    outsider.handle.publish(GossipTopic::Rounds, commit(&outsider.key, 1)).await.expect("publish");
    rogue.handle.publish(GossipTopic::Rounds, commit(&rogue.key, 2)).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let good = commit(&member.key, 3);
    let mh = member.handle.clone();
    until("the member meshed with the hub", async || {
        !mh.mesh_peers(GossipTopic::Rounds).await.expect("mesh").is_empty()
    })
    .await;
    member.handle.publish(GossipTopic::Rounds, good.clone()).await.expect("publish");
    let got = timeout(WAIT, async {
        loop {
            match hub.events.recv().await {
                Some(P2pEvent::Message { envelope, from, .. }) => {
                    assert_eq!(from, m, "only the certified member's message may arrive");
                    break envelope;
                }
                Some(P2pEvent::NodeJoined(p)) => {
                    assert!(p == m || p == hub.key.peer_id(), "an uncertified node joined the registry: {p}");
                }
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await
    .expect("the member's commit in time");
    assert_eq!(got, good);
    // Nothing from the outsiders trails behind.
    let tail = timeout(Duration::from_millis(1500), async {
        loop {
            match hub.events.recv().await {
                Some(P2pEvent::Message { from, .. }) => break Some(from),
                Some(P2pEvent::NodeJoined(p)) => break Some(p),
                Some(_) => {}
                None => break None,
            }
        }
    })
    .await;
    assert!(tail.is_err() || tail == Ok(None), "unexpected arrival from {tail:?}");
    let registered = live(&hub.handle);
    assert!(!registered.contains(&outsider.key.peer_id()) && !registered.contains(&rogue.key.peer_id()));
    assert!(registered.contains(&m));
    for n in [&hub, &member, &outsider, &rogue] {
        n.handle.shutdown().await;
    }
}

#[tokio::test]
async fn a_closed_node_needs_its_own_valid_certificate() {
    let issuer = NodeKey::from_seed([44; 32]);
    let k = key(9);
    let mut metrics = Metrics::default();
    let err = sampo_p2p::spawn(k.clone(), cfg(None, vec![issuer.public()], None), &mut metrics)
        .await
        .map(|_| ())
        .expect_err("no certificate");
    assert!(matches!(err, P2pError::Config(_)), "{err}");
    let expired = AdmissionCertificate::issue(&issuer, k.peer_id(), 1);
    let err = sampo_p2p::spawn(k.clone(), cfg(None, vec![issuer.public()], Some(expired)), &mut metrics)
        .await
        .map(|_| ())
        .expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");
    let someone_elses = AdmissionCertificate::issue(&issuer, key(8).peer_id(), now_ms() + DAY_MS);
    let err = sampo_p2p::spawn(k, cfg(None, vec![issuer.public()], Some(someone_elses)), &mut metrics)
        .await
        .map(|_| ())
        .expect_err("wrong subject");
    assert!(err.to_string().contains("not"), "{err}");
}
