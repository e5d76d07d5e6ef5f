//! In-process meshes on loopback, port 0, every wait bounded by a timeout.

use std::time::Duration;

use prometheus_client::registry::Registry as Metrics;
use sampo_consensus::{Commit, Hash32, ModelId, NodeAnnouncement, NodeKey, PeerId, SignedEnvelope, TaskId};
use sampo_p2p::gossip::{NODES_TOPIC, ROUNDS_TOPIC};
use sampo_p2p::{
    DIRECT_RESERVE, FetchRequest, FetchResponse, GossipTopic, Multiaddr, P2pConfig, P2pEvent, P2pHandle, QUEUE_DEPTH,
};
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout};

mod common;

use common::WAIT;

struct Node {
    key: NodeKey,
    handle: P2pHandle,
    events: Receiver<P2pEvent>,
    addr: Multiaddr,
}

fn key(i: u8) -> NodeKey {
    NodeKey::from_seed([i.wrapping_add(1); 32])
}

fn cfg(bootstrap: Option<&Multiaddr>) -> P2pConfig {
    common::loopback(bootstrap)
}

async fn start(key: NodeKey, cfg: P2pConfig) -> Node {
    let common::Started { handle, events, addr, .. } = common::spawn_listening(&key, cfg).await;
    Node { key, handle, events, addr }
}

/// Poll `cond` until it holds; the deadline fails the test.
async fn until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next_message(n: &mut Node) -> SignedEnvelope {
    timeout(WAIT, async {
        loop {
            match n.events.recv().await {
                Some(P2pEvent::Message { envelope, .. }) => break envelope,
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await
    .expect("message in time")
}

fn commit(key: &NodeKey, n: u8) -> SignedEnvelope {
    SignedEnvelope::seal(key, &Commit { task: TaskId(Hash32::of(&[n])), attempt: 0, hash: Hash32::of(b"h") })
        .expect("seal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_nodes_discover_each_other_and_gossip_reaches_all() {
    let mut nodes = vec![start(key(0), cfg(None)).await];
    for i in 1..12u8 {
        // Each knows one bootstrap address only: the previous node's.
        let prev = nodes[i as usize - 1].addr.clone();
        nodes.push(start(key(i), cfg(Some(&prev))).await);
    }
    for n in &nodes {
        let h = n.handle.clone();
        until("full discovery", async || h.live_nodes().len() == 12).await;
    }
    for n in &nodes {
        let h = n.handle.clone();
        until("a gossip mesh", async || !h.mesh_peers(GossipTopic::Rounds).await.expect("mesh").is_empty()).await;
    }
    let env = commit(&nodes[5].key, 1);
    nodes[5].handle.publish(GossipTopic::Rounds, env.clone()).await.expect("publish");
    for (i, n) in nodes.iter_mut().enumerate() {
        if i != 5 {
            assert_eq!(next_message(n).await, env, "node {i}");
        }
    }
    for n in &nodes {
        n.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_stay_bounded_while_discovery_and_gossip_reach_everyone() {
    // A star: all bootstrap through node 0, which so gets every other node's dial.
    const N: usize = 16;
    let target = 4;
    let bounded = |b: Option<&Multiaddr>| P2pConfig {
        target_connections: target,
        announce_interval: Duration::from_secs(1),
        ..cfg(b)
    };
    let mut nodes = vec![start(key(0), bounded(None)).await];
    let hub = nodes[0].addr.clone();
    for i in 1..N as u8 {
        nodes.push(start(key(i), bounded(Some(&hub))).await);
    }
    for n in &nodes {
        let h = n.handle.clone();
        until("full discovery", async || h.live_nodes().len() == N).await;
    }
    // Pruning starts once connections outlive their grace period: the hub, dialled by
    // all, sheds every connection that is neither in one of its meshes nor above the
    // high watermark; nobody else grows past it either.
    let high = sampo_p2p::peers::high_watermark(target);
    for (i, n) in nodes.iter().enumerate() {
        let h = n.handle.clone();
        let hub_id = nodes[0].key.peer_id();
        until("a bounded peer set", async || {
            let connected = h.connected_peers().await.expect("peers");
            let mut kept: std::collections::HashSet<_> =
                h.mesh_peers(GossipTopic::Nodes).await.expect("mesh").into_iter().collect();
            kept.extend(h.mesh_peers(GossipTopic::Rounds).await.expect("mesh"));
            if i != 0 {
                kept.insert(hub_id);
            }
            connected.len() <= high.max(kept.len())
        })
        .await;
    }
    let env = commit(&nodes[7].key, 2);
    nodes[7].handle.publish(GossipTopic::Rounds, env.clone()).await.expect("publish");
    for (i, n) in nodes.iter_mut().enumerate() {
        if i != 7 {
            assert_eq!(next_message(n).await, env, "node {i}");
        }
    }
    for n in &nodes {
        n.handle.shutdown().await;
    }
}

/// A line a — b — c (nobody dials what it discovers), so everything c hears from a
/// passes through b; returned once a and c each have a rounds mesh.
async fn line() -> (Node, Node, Node) {
    let line = |b: Option<&Multiaddr>| P2pConfig { dial_discovered: false, ..cfg(b) };
    let b = start(key(1), line(None)).await;
    let a = start(key(0), line(Some(&b.addr))).await;
    let c = start(key(2), line(Some(&b.addr))).await;
    for h in [a.handle.clone(), c.handle.clone()] {
        until("a rounds mesh", async || !h.mesh_peers(GossipTopic::Rounds).await.expect("mesh").is_empty()).await;
    }
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_rejected_not_forwarded_and_cost_score() {
    let (a, b, mut c) = line().await;
    let forger = key(9);
    // A bad signature, a signer swapped for another key, an oversized announcement,
    // plain junk.
    let mut flipped = commit(&a.key, 1).to_bytes();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    a.handle.publish_raw(ROUNDS_TOPIC, flipped).await.expect("raw");
    let mut renamed = commit(&a.key, 2).to_bytes();
    renamed[last - 95..last - 63].copy_from_slice(&forger.public());
    a.handle.publish_raw(ROUNDS_TOPIC, renamed).await.expect("raw");
    let big = NodeAnnouncement {
        models: Vec::new(),
        price_per_1k: 0,
        free_slots: 1,
        backend: "cpu".into(),
        device: "x".repeat(40_000),
        version: "0".into(),
        addrs: Vec::new(),
        api_url: None,
        sent_ms: 0,
        certificate: None,
    };
    a.handle.publish_raw(NODES_TOPIC, SignedEnvelope::seal(&a.key, &big).expect("seal").to_bytes()).await.expect("raw");
    a.handle.publish_raw(ROUNDS_TOPIC, b"junk".to_vec()).await.expect("raw");
    // b rejects them all; its score for a falls (far enough to graylist a).
    let (bh, ap) = (b.handle.clone(), a.key.peer_id());
    until("a's score at b to fall", async || bh.peer_score(ap).await.expect("score").is_some_and(|s| s < 0.0)).await;
    // Then b publishes a valid message on the b — c link: had b forwarded any of the
    // junk, c would have received that first.
    let good = commit(&b.key, 3);
    b.handle.publish(GossipTopic::Rounds, good.clone()).await.expect("publish");
    assert_eq!(next_message(&mut c).await, good);
    let score = b.handle.peer_score(a.key.peer_id()).await.expect("score");
    let honest = b.handle.peer_score(c.key.peer_id()).await.expect("score");
    assert!(score < honest, "junk sender {score:?} vs honest {honest:?}");
}

/// A round message for a few peers goes straight to them: nobody relays it, and to a
/// peer this node has no connection to it goes out as gossip instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_reaches_its_peer_only_and_falls_back_to_gossip() {
    let (a, mut b, mut c) = line().await;
    let direct = commit(&a.key, 6);
    a.handle.send(vec![a.key.peer_id(), b.key.peer_id()], GossipTopic::Rounds, direct.clone()).await.expect("send");
    assert_eq!(next_message(&mut b).await, direct);
    // Then b publishes on the b — c link: had b relayed the direct message, c would
    // have heard that first.
    let after = commit(&b.key, 7);
    b.handle.publish(GossipTopic::Rounds, after.clone()).await.expect("publish");
    assert_eq!(next_message(&mut c).await, after);
    // To a peer nobody is connected to: gossiped, so b and c hear it.
    let far = commit(&a.key, 8);
    a.handle.send(vec![key(9).peer_id()], GossipTopic::Rounds, far.clone()).await.expect("send");
    assert_eq!(next_message(&mut b).await, far);
    assert_eq!(next_message(&mut c).await, far);
    for n in [a, b, c] {
        n.handle.shutdown().await;
    }
}

fn task_announcement(key: &NodeKey, model: ModelId, committee: Vec<PeerId>, prompt: String) -> SignedEnvelope {
    sampo_consensus::sim::sealed_announcement(key, model, committee, &prompt)
}

/// A task's announcement goes straight to its committee, unless it is longer than a
/// direct request may be: then it is gossiped on its model's topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_announcement_goes_to_its_committee_and_a_long_one_is_gossiped() {
    let (a, mut b, mut c) = line().await;
    let model = ModelId(Hash32::of(b"m"));
    for n in [&a, &b, &c] {
        n.handle.subscribe(GossipTopic::Tasks(model)).await.expect("subscribe");
    }
    for h in [a.handle.clone(), c.handle.clone()] {
        until("a tasks mesh", async || !h.mesh_peers(GossipTopic::Tasks(model)).await.expect("mesh").is_empty()).await;
    }
    let committee = vec![b.key.peer_id()];
    let short = task_announcement(&a.key, model, committee.clone(), "hi".into());
    a.handle.send(committee.clone(), GossipTopic::Tasks(model), short.clone()).await.expect("send");
    assert_eq!(next_message(&mut b).await, short);
    // Had b relayed it, c would hear it before what b publishes next.
    let after = commit(&b.key, 11);
    b.handle.publish(GossipTopic::Rounds, after.clone()).await.expect("publish");
    assert_eq!(next_message(&mut c).await, after);
    // A prompt too long for a direct request: gossiped, so c hears it too.
    let long = task_announcement(&a.key, model, committee.clone(), "x".repeat(40_000));
    a.handle.send(committee, GossipTopic::Tasks(model), long.clone()).await.expect("send");
    assert_eq!(next_message(&mut b).await, long);
    assert_eq!(next_message(&mut c).await, long);
    for n in [a, b, c] {
        n.handle.shutdown().await;
    }
}

/// A direct request over 32 KiB is refused as it is read (the codec buffers a whole
/// request first): it never reaches the node, and the connection still carries the
/// next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_request_over_the_cap_never_gets_in() {
    let (a, mut b, c) = line().await;
    let model = ModelId(Hash32::of(b"m"));
    let big = task_announcement(&a.key, model, vec![b.key.peer_id()], "x".repeat(40_000));
    a.handle.send_direct_raw(b.key.peer_id(), big.clone()).await.expect("send");
    let small = commit(&a.key, 12);
    a.handle.send_direct_raw(b.key.peer_id(), small.clone()).await.expect("send");
    let found = timeout(WAIT, async {
        loop {
            match b.events.recv().await {
                Some(P2pEvent::Message { envelope, .. }) if envelope == small => break,
                Some(P2pEvent::Message { envelope, .. }) => assert_ne!(envelope, big, "an oversized request got in"),
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "the small request after it never got in");
    assert!(a.handle.connected_peers().await.expect("peers").contains(&b.key.peer_id()), "still connected");
    for n in [a, b, c] {
        n.handle.shutdown().await;
    }
}

/// A flood of valid gossip cannot take the whole event queue: a round message sent
/// directly still reaches a node whose loop has fallen behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_get_in_when_gossip_has_filled_the_queue() {
    let (a, mut b, c) = line().await;
    // b's loop reads nothing while a floods it with gossip until only the reserve is left.
    let filled = QUEUE_DEPTH - DIRECT_RESERVE;
    let mut n: u32 = 0;
    let deadline = Instant::now() + WAIT;
    while b.events.len() < filled {
        assert!(Instant::now() < deadline, "b's queue never filled ({} events)", b.events.len());
        for _ in 0..64 {
            n += 1;
            let env = SignedEnvelope::seal(
                &a.key,
                &Commit { task: TaskId(Hash32::of(&n.to_le_bytes())), attempt: 0, hash: Hash32::of(b"f") },
            )
            .expect("seal");
            a.handle.publish(GossipTopic::Rounds, env).await.expect("publish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A task announcement (any key may sign one) does not take the reserve: sent first,
    // it is refused, and the commit after it is what gets in.
    let model = ModelId(Hash32::of(b"m"));
    let ann = task_announcement(&a.key, model, vec![b.key.peer_id()], "hi".into());
    a.handle.send(vec![b.key.peer_id()], GossipTopic::Tasks(model), ann.clone()).await.expect("send");
    let direct = commit(&a.key, 200);
    a.handle.send(vec![b.key.peer_id()], GossipTopic::Rounds, direct.clone()).await.expect("send");
    // In while b still reads nothing (no gossip gets past the reserve, so this is it).
    let before = b.events.len();
    while b.events.len() <= before {
        assert!(Instant::now() < deadline + WAIT, "the direct message never got into b's queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let found = timeout(WAIT, async {
        loop {
            match b.events.recv().await {
                Some(P2pEvent::Message { envelope, .. }) if envelope == direct => break,
                Some(P2pEvent::Message { envelope, .. }) => {
                    assert_ne!(envelope, ann, "the announcement took the reserve")
                }
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "the direct message never got in");
    for n in [a, b, c] {
        n.handle.shutdown().await;
    }
}

/// Honest nodes send only their own messages directly: a peer that sends another
/// key's is cut off (it cannot be charged in gossip score: nothing was gossiped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_others_messages_directly_is_disconnected() {
    let (a, mut b, c) = line().await;
    let theirs = commit(&key(9), 10);
    a.handle.send(vec![b.key.peer_id()], GossipTopic::Rounds, theirs).await.expect("send");
    let a_id = a.key.peer_id();
    timeout(WAIT, async {
        loop {
            match b.events.recv().await {
                Some(P2pEvent::PeerDisconnected(p)) if p == a_id => break,
                // (a then gossips it, as a sender does with what was refused: a relay's
                // copy of someone's message is fine as gossip.)
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await
    .expect("a disconnected in time");
    for n in [a, b, c] {
        n.handle.shutdown().await;
    }
}

/// Gossip frames carry no author of their own: a message's author is its envelope's
/// signer, whoever published or relayed it, and a re-published envelope is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_its_signers_whoever_relays_it() {
    let (a, b, mut c) = line().await;
    let signer = key(9);
    let env = commit(&signer, 4);
    a.handle.publish_raw(ROUNDS_TOPIC, env.to_bytes()).await.expect("raw");
    // Again, from a: the same content is the same message, dropped as a duplicate.
    a.handle.publish_raw(ROUNDS_TOPIC, env.to_bytes()).await.ok();
    let first = timeout(WAIT, async {
        loop {
            match c.events.recv().await {
                Some(P2pEvent::Message { envelope, from, .. }) => break (envelope, from),
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await
    .expect("message in time");
    assert_eq!(first, (env.clone(), signer.peer_id()), "attributed to its signer, not to a or b");
    // The next message c hears is a new one, not the copy.
    let next = commit(&b.key, 5);
    b.handle.publish(GossipTopic::Rounds, next.clone()).await.expect("publish");
    assert_eq!(next_message(&mut c).await, next);
    for n in [a, b, c] {
        n.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_key_keeps_the_peer_id_and_registry_expires_stopped_nodes() {
    let mut hub = start(key(0), cfg(None)).await;
    let leaf = start(key(1), cfg(Some(&hub.addr))).await;
    let hh = hub.handle.clone();
    until("the leaf to announce", async || hh.live_nodes().iter().any(|n| n.peer == key(1).peer_id())).await;
    leaf.handle.shutdown().await;
    // Three missed announcements (500 ms each) later, the hub forgets the leaf.
    timeout(WAIT, async {
        loop {
            match hub.events.recv().await {
                Some(P2pEvent::NodeLeft(p)) if p == key(1).peer_id() => break,
                Some(_) => {}
                None => panic!("p2p stopped"),
            }
        }
    })
    .await
    .expect("leaf expired");
    assert!(hub.handle.live_nodes().iter().all(|n| n.peer != key(1).peer_id()));
    let again = start(key(1), cfg(Some(&hub.addr))).await;
    assert_eq!(again.handle.peer_id(), key(1).peer_id());
    until("the restarted leaf to come back", async || hh.live_nodes().iter().any(|n| n.peer == key(1).peer_id())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_can_be_fetched_by_task_id() {
    let mut server = start(key(0), cfg(None)).await;
    let client = start(key(1), cfg(Some(&server.addr))).await;
    let task = TaskId(Hash32::of(b"task"));
    let answer = tokio::spawn(async move {
        loop {
            match server.events.recv().await {
                Some(P2pEvent::FetchRequested { id, request: FetchRequest::Evidence { task: t }, .. }) => {
                    let resp =
                        if t == task { FetchResponse::Found(b"bundle".to_vec()) } else { FetchResponse::NotFound };
                    server.handle.respond(id, resp).await.expect("respond");
                }
                Some(_) => {}
                None => break,
            }
        }
    });
    let ch = client.handle.clone();
    until("a connection", async || !ch.connected_peers().await.expect("peers").is_empty()).await;
    let got = timeout(WAIT, client.handle.fetch(key(0).peer_id(), FetchRequest::Evidence { task }))
        .await
        .expect("in time")
        .expect("fetch");
    assert_eq!(got, FetchResponse::Found(b"bundle".to_vec()));
    let missing = client.handle.fetch(key(0).peer_id(), FetchRequest::Evidence { task: TaskId(Hash32::of(b"no")) });
    assert_eq!(timeout(WAIT, missing).await.expect("in time").expect("fetch"), FetchResponse::NotFound);
    answer.abort();
}

/// Fetches a node never answers (its loop busy, or the events dropped) time out and
/// free their slots: they cannot pile up until every later fetch is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_fetches_do_not_exhaust_the_inbound_slots() {
    let quick = || P2pConfig { fetch_timeout: Duration::from_millis(500), ..cfg(None) };
    let mut server = start(key(0), quick()).await;
    let client =
        start(key(1), P2pConfig { fetch_timeout: Duration::from_millis(500), ..cfg(Some(&server.addr)) }).await;
    let answering = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on = answering.clone();
    let task = TaskId(Hash32::of(b"task"));
    let answer = tokio::spawn(async move {
        while let Some(ev) = server.events.recv().await {
            if let P2pEvent::FetchRequested { id, .. } = ev
                && on.load(std::sync::atomic::Ordering::SeqCst)
            {
                server.handle.respond(id, FetchResponse::Found(b"bundle".to_vec())).await.expect("respond");
            }
        }
    });
    let ch = client.handle.clone();
    until("a connection", async || !ch.connected_peers().await.expect("peers").is_empty()).await;
    // More unanswered fetches than there are slots; each fails on its own.
    let flood: Vec<_> = (0..(sampo_p2p::MAX_PENDING_FETCHES + 44))
        .map(|_| client.handle.fetch(key(0).peer_id(), FetchRequest::Evidence { task }))
        .collect();
    for r in futures::future::join_all(flood).await {
        assert!(!matches!(r, Ok(FetchResponse::Found(_))), "nobody answered");
    }
    answering.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = timeout(WAIT, async {
        loop {
            if let Ok(FetchResponse::Found(b)) =
                client.handle.fetch(key(0).peer_id(), FetchRequest::Evidence { task }).await
            {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a slot frees up once the unanswered requests time out");
    assert_eq!(got, b"bundle".to_vec());
    answer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libp2p_metrics_land_in_the_given_registry() {
    let mut metrics = Metrics::default();
    let a = start(key(0), cfg(None)).await;
    let (handle, _events) = sampo_p2p::spawn(key(1), cfg(Some(&a.addr)), &mut metrics).await.expect("spawn");
    until("a connection", async || !handle.connected_peers().await.expect("peers").is_empty()).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).expect("encode");
    for family in ["libp2p_swarm_", "libp2p_bandwidth_", "libp2p_gossipsub_", "libp2p_kad_", "libp2p_identify_"] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
}

/// Many identities behind one IP lose gossip score (one host minting Sybils); the
/// whitelist (a testnet's loopback, by configuration) exempts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_crowded_on_one_ip_lose_gossip_score() {
    let crowded = |b: Option<&Multiaddr>| P2pConfig { colocation_whitelist: Vec::new(), ..cfg(b) };
    let hub = start(key(0), crowded(None)).await;
    let mut others = Vec::new();
    for i in 1..=6u8 {
        others.push(start(key(i), crowded(Some(&hub.addr))).await);
    }
    let h = hub.handle.clone();
    let peer = others[0].key.peer_id();
    until("a colocation penalty", async || h.peer_score(peer).await.ok().flatten().is_some_and(|s| s < 0.0)).await;
    // The same crowd, whitelisted: no penalty.
    let calm = start(key(20), cfg(None)).await;
    let mut friends = Vec::new();
    for i in 21..=26u8 {
        friends.push(start(key(i), cfg(Some(&calm.addr))).await);
    }
    let c = calm.handle.clone();
    let friend = friends[0].key.peer_id();
    // The score is computed when asked (colocation included), so no wait for a heartbeat.
    until("a score", async || c.peer_score(friend).await.ok().flatten().is_some()).await;
    assert!(c.peer_score(friend).await.ok().flatten().is_some_and(|s| s >= 0.0));
}
