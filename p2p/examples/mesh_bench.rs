//! Gossip propagation latency and time to full discovery on loopback:
//! `cargo run --release -p sampo-p2p --example mesh_bench [sizes...]` (default 10 25 50).
//! Every node knows only the previous node's address; discovery is Kademlia plus the
//! node announcements. Announcement interval max(1, N / 10) s; `MESH_TARGET` sets the
//! dial target (default 24).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use sampo_consensus::{Commit, Hash32, ModelId, ModelRef, NodeAnnouncement, NodeKey, SignedEnvelope, TaskId};
use sampo_p2p::{GossipTopic, P2pConfig, P2pEvent, P2pHandle, Protocol};

type Arrivals = Arc<Mutex<HashMap<Hash32, Vec<Instant>>>>;

async fn start(
    i: usize,
    n: usize,
    bootstrap: Option<sampo_p2p::Multiaddr>,
    arrivals: Arrivals,
) -> (P2pHandle, sampo_p2p::Multiaddr) {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    let key = NodeKey::from_seed(seed);
    let cfg = P2pConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap: bootstrap.into_iter().collect(),
        // Every node re-announces itself to all: N² signed messages per interval, so
        // the interval grows with N (as a testnet's does); a new node is heard at once
        // all the same (its first announcement goes out to its first listener).
        announce_interval: Duration::from_secs((n as u64 / 10).max(1)),
        discovery_interval: Duration::from_secs(1),
        // Every node is on 127.0.0.1.
        allow_private_addresses: true,
        max_connections_per_ip: u32::MAX,
        colocation_whitelist: vec!["127.0.0.1".parse().expect("ip")],
        // MESH_TARGET overrides the dial target (to compare with dialing everyone).
        target_connections: std::env::var("MESH_TARGET").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..P2pConfig::default()
    };
    let mut metrics = Registry::default();
    let (handle, mut events) = sampo_p2p::spawn(key.clone(), cfg, &mut metrics).await.expect("spawn");
    let addr = loop {
        if let Some(P2pEvent::Listening(a)) = events.recv().await {
            break a.with(Protocol::P2p(key.peer_id()));
        }
    };
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let P2pEvent::Message { envelope, .. } = ev {
                arrivals.lock().expect("lock").entry(envelope.id()).or_default().push(Instant::now());
            }
        }
    });
    handle
        .set_announcement(NodeAnnouncement {
            models: vec![ModelRef { id: ModelId(Hash32::of(b"m")), name: "m".into() }],
            price_per_1k: 1,
            free_slots: 1,
            backend: "cpu".into(),
            device: "bench".into(),
            version: "bench".into(),
            addrs: Vec::new(),
            api_url: None,
            sent_ms: 0,
            certificate: None,
        })
        .await
        .expect("announce");
    (handle, addr)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10, 25, 50] } else { sizes };
    println!(
        "| nodes | full discovery | gossip p50 | gossip p99 | messages × receivers | connections per node (mean / max) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in sizes {
        let arrivals: Arrivals = Arc::default();
        let t0 = Instant::now();
        let mut nodes = Vec::new();
        let mut prev = None;
        for i in 0..n {
            let (h, a) = start(i, n, prev.take(), arrivals.clone()).await;
            prev = Some(a);
            nodes.push(h);
        }
        loop {
            if nodes.iter().all(|h| h.live_nodes().len() == n) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let seen: Vec<usize> = nodes.iter().map(|h| h.live_nodes().len()).collect();
                let mut mesh = Vec::new();
                let mut conns = Vec::new();
                let mut negative = Vec::new();
                for h in &nodes {
                    mesh.push(h.mesh_peers(GossipTopic::Nodes).await.map_or(0, |p| p.len()));
                    let peers = h.connected_peers().await.unwrap_or_default();
                    conns.push(peers.len());
                    let mut neg = 0;
                    for p in peers {
                        if h.peer_score(p).await.ok().flatten().is_some_and(|s| s < 0.0) {
                            neg += 1;
                        }
                    }
                    negative.push(neg);
                }
                eprintln!("peers with a negative score: {negative:?}");
                panic!(
                    "discovery did not complete in 60 s: registry sizes {seen:?}, nodes-topic mesh sizes {mesh:?}, connections {conns:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let discovery = t0.elapsed();
        // Gossip latency of the settled mesh: past the start-up storm of handshakes and
        // past pruning's grace period, so the peer sets have shrunk to their bound.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let mut lat = Vec::new();
        let messages = 20;
        for m in 0..messages {
            let from = (m * 7) % n;
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(from as u64 + 1).to_le_bytes());
            let key = NodeKey::from_seed(seed);
            let env = SignedEnvelope::seal(
                &key,
                &Commit { task: TaskId(Hash32::of(&[m as u8, n as u8])), attempt: 0, hash: Hash32::of(b"x") },
            )
            .expect("seal");
            let id = env.id();
            let sent = Instant::now();
            nodes[from].publish(GossipTopic::Rounds, env).await.expect("publish");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got = arrivals.lock().expect("lock").get(&id).map_or(0, Vec::len);
                if got >= n - 1 || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Some(times) = arrivals.lock().expect("lock").get(&id) {
                lat.extend(times.iter().map(|t| t.duration_since(sent).as_secs_f64() * 1000.0));
            }
        }
        lat.sort_by(f64::total_cmp);
        let mut conns = Vec::new();
        for h in &nodes {
            conns.push(h.connected_peers().await.map_or(0, |p| p.len()));
        }
        println!(
            "| {n} | {:.1} s | {:.1} ms | {:.1} ms | {} / {} | {:.1} / {} |",
            discovery.as_secs_f64(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat.len(),
            messages * (n - 1),
            conns.iter().sum::<usize>() as f64 / n as f64,
            conns.iter().max().unwrap_or(&0)
        );
        for h in &nodes {
            h.shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
