//! Soak under hostile input: a 5-node testnet where node 1 floods signed but invalid
//! gossip, a client holds 20 SSE streams on node 2 without reading them, and another
//! sends 128 KiB one-word prompts to node 3, while an honest client sends verified chat
//! requests through node 0. Compared with the same requests on a quiet testnet.
//!
//! `cargo run --release -p sampo-testnet --example soak -- <sampo binary> [requests]`
//!
//! Exits non-zero when an honest task does not finalize, the honest p99 is more than
//! twice the quiet one, a node's memory grows past a bound, or the flooder is still in
//! an honest node's mesh with a non-negative score.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sampo_testnet::{Testnet, TestnetConfig, get_json, http, percentile as pct, rss_mib};
use serde_json::Value;

/// `requests` verified chats through node 0; latency in ms of each, all must finalize.
fn honest(net: &Testnet, requests: usize, tag: &str) -> Vec<f64> {
    (0..requests)
        .map(|i| {
            let t = Instant::now();
            let v = net.chat(0, &format!("honest {tag} {i}"), 16, 3).expect("chat");
            assert_eq!(v["sampo"]["verdict"], "finalized", "honest task {i}: {v}");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

fn model_name(net: &Testnet, i: usize) -> String {
    let m = get_json(&format!("{}/v1/models", net.nodes[i].api_url)).expect("models");
    m["data"][0]["id"].as_str().unwrap_or_default().to_owned()
}

/// Open `n` streaming requests on node `i` and never read a byte of their answers.
fn slow_streams(net: &Testnet, i: usize, n: usize) -> Vec<TcpStream> {
    let addr = net.nodes[i].api_url.trim_start_matches("http://").to_owned();
    let body = serde_json::json!({
        "model": model_name(net, i),
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 64, "stream": true, "sampo": {"k": 1},
    })
    .to_string();
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect(&addr).ok()?;
            let req = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).ok()?;
            // Shrink our receive window: the node's writes stall as soon as it can.
            Some(s)
        })
        .collect()
}

fn peer_view(net: &Testnet, i: usize, peer: &str) -> Value {
    let v = get_json(&format!("{}/v1/peers", net.nodes[i].api_url)).unwrap_or(Value::Null);
    v["peers"].as_array().into_iter().flatten().find(|p| p["peer_id"] == peer).cloned().unwrap_or(Value::Null)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sampo = PathBuf::from(args.get(1).expect("usage: soak <sampo binary> [requests]"));
    let requests: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(40);
    let dir = std::env::temp_dir().join(format!("sampo-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let model = dir.join("synthetic.gguf");
    let ok = std::process::Command::new(&sampo).args(["model", "synth", "--out"]).arg(&model).status().expect("synth");
    assert!(ok.success());

    let quiet_net =
        Testnet::start(TestnetConfig::new(5, model.clone(), dir.join("quiet"), sampo.clone())).expect("quiet");
    let quiet = honest(&quiet_net, requests, "quiet");
    drop(quiet_net);

    let mut cfg = TestnetConfig::new(5, model, dir.join("attack"), sampo);
    cfg.flooders = 1;
    cfg.flood_per_second = 100;
    let net = Testnet::start(cfg).expect("attack testnet");
    let flooder = net.nodes[1].peer_id.clone();
    let rss_start: Vec<f64> = net.nodes.iter().map(|n| rss_mib(n.child.id())).collect();

    // The flood starts once the flooder has joined; wait until honest nodes feel it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let felt = |v: &Value| v.is_null() || v["gossip_score"].as_f64().is_some_and(|s| s < 0.0);
    while !felt(&peer_view(&net, 0, &flooder)) {
        assert!(Instant::now() < deadline, "the flood never started");
        std::thread::sleep(Duration::from_millis(250));
    }

    let streams = slow_streams(&net, 2, 20);
    let stop = Arc::new(AtomicBool::new(false));
    let big_sent = Arc::new(AtomicUsize::new(0));
    let big = {
        let (url, name, stop, sent) = (
            format!("{}/v1/chat/completions", net.nodes[3].api_url),
            model_name(&net, 3),
            stop.clone(),
            big_sent.clone(),
        );
        std::thread::spawn(move || {
            let word = "a".repeat(128 * 1024 - 64);
            let body =
                serde_json::json!({"model": name, "messages": [{"role": "user", "content": word}], "max_tokens": 8})
                    .to_string();
            let mut codes = std::collections::BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((code, _)) = http("POST", &url, Some(&body), Duration::from_secs(30)) {
                    *codes.entry(code).or_insert(0usize) += 1;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            codes
        })
    };

    let attacked = honest(&net, requests, "attack");
    stop.store(true, Ordering::Relaxed);
    let big_codes = big.join().expect("big prompts");
    let rss_end: Vec<f64> = net.nodes.iter().map(|n| rss_mib(n.child.id())).collect();
    let views: Vec<(usize, Value)> = net
        .nodes
        .iter()
        .filter(|n| n.role == "honest")
        .map(|n| (n.index, peer_view(&net, n.index, &flooder)))
        .collect();
    drop(streams);

    let (q50, q99, a50, a99) = (pct(&quiet, 0.5), pct(&quiet, 0.99), pct(&attacked, 0.5), pct(&attacked, 0.99));
    println!("| run | requests | p50 (ms) | p99 (ms) |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| quiet | {} | {q50:.1} | {q99:.1} |", quiet.len());
    println!("| under attack | {} | {a50:.1} | {a99:.1} |", attacked.len());
    println!("\np99 under attack / quiet: {:.2}", a99 / q99);
    println!(
        "128 KiB one-word prompts sent to node 3: {} (status codes {big_codes:?})",
        big_sent.load(Ordering::Relaxed)
    );
    println!("slow SSE streams held on node 2: 20");
    for (i, (a, b)) in rss_start.iter().zip(&rss_end).enumerate() {
        println!("node {i} ({}): RSS {a:.1} -> {b:.1} MiB", net.nodes[i].role);
    }
    let mut failed = Vec::new();
    for (i, v) in &views {
        if v.is_null() {
            println!("node {i}: the flooder is out of its registry (its gossip is ignored)");
        } else {
            println!(
                "node {i} sees the flooder: gossip score {}, in its rounds mesh: {}",
                v["gossip_score"], v["in_rounds_mesh"]
            );
        }
        // Gone from the registry (its announcements are ignored) counts as pruned.
        if !v.is_null() && (v["in_rounds_mesh"] == true || !v["gossip_score"].as_f64().is_some_and(|s| s < 0.0)) {
            failed.push(format!("node {i} still meshes with the flooder"));
        }
    }
    if a99 > 2.0 * q99 {
        failed.push(format!("p99 {a99:.1} ms is more than twice the quiet {q99:.1} ms"));
    }
    for (i, (a, b)) in rss_start.iter().zip(&rss_end).enumerate() {
        if *b > a + 256.0 {
            failed.push(format!("node {i} grew from {a:.1} to {b:.1} MiB"));
        }
    }
    // `exit` runs no destructors: stop the nodes first.
    drop(net);
    if failed.is_empty() {
        println!("\nsoak: ok");
    } else {
        println!("\nsoak: FAILED: {failed:?}");
        std::process::exit(1);
    }
}
