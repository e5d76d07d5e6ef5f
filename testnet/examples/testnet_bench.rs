//! Consensus overhead, saturation throughput and memory per node on a local testnet:
//! `cargo run -p sampo-testnet --example testnet_bench -- <sampo binary> [nodes] [tasks]`.
//! Uses the synthetic model, so inference is cheap and the protocol's cost shows.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sampo_testnet::{Testnet, TestnetConfig, cpu_ms, percentile, rss_mib};

fn latencies(net: &Testnet, k: usize, tasks: usize) -> Vec<f64> {
    (0..tasks)
        .map(|i| {
            let t = Instant::now();
            let v = net.chat(i % net.nodes.len(), &format!("bench {k} {i}"), 16, k).expect("chat");
            assert_eq!(v["sampo"]["verdict"], "finalized");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

/// Mean of each `sampo_round_phase_duration_seconds{phase}` over every node's /metrics.
fn phase_means(net: &Testnet) -> Vec<(String, f64, u64)> {
    let mut sums: std::collections::BTreeMap<String, (f64, u64)> = std::collections::BTreeMap::new();
    for n in &net.nodes {
        let Ok((_, text)) =
            sampo_testnet::http("GET", &format!("{}/metrics", n.api_url), None, Duration::from_secs(10))
        else {
            continue;
        };
        for line in text.lines() {
            for (suffix, is_sum) in [("_sum{", true), ("_count{", false)] {
                let Some(rest) = line.strip_prefix(&format!("sampo_round_phase_duration_seconds{suffix}")) else {
                    continue;
                };
                let Some((labels, value)) = rest.split_once("} ") else { continue };
                let phase = labels.trim_start_matches("phase=\"").trim_end_matches('"').to_owned();
                let v: f64 = value.trim().parse().unwrap_or(0.0);
                let e = sums.entry(phase).or_default();
                if is_sum {
                    e.0 += v;
                } else {
                    e.1 += v as u64;
                }
            }
        }
    }
    sums.into_iter().map(|(p, (s, c))| (p, s / c.max(1) as f64, c)).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sampo = PathBuf::from(args.get(1).expect("usage: testnet_bench <sampo binary> [nodes] [tasks]"));
    let nodes: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(8);
    let tasks: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(40);
    let dir = std::env::temp_dir().join(format!("sampo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let model = dir.join("synthetic.gguf");
    let ok = std::process::Command::new(&sampo).args(["model", "synth", "--out"]).arg(&model).status().expect("synth");
    assert!(ok.success());

    let single =
        Testnet::start(TestnetConfig::new(1, model.clone(), dir.join("single"), sampo.clone())).expect("single");
    let alone = latencies(&single, 1, tasks);
    drop(single);

    let t0 = Instant::now();
    let net = Testnet::start(TestnetConfig::new(nodes, model, dir.join("net"), sampo)).expect("testnet");
    let ready = t0.elapsed().as_secs_f64();
    let cpu = |net: &Testnet| net.nodes.iter().map(|n| cpu_ms(n.child.id())).sum::<f64>();
    let cpu_before = cpu(&net);
    let verified = latencies(&net, 3, tasks);
    let cpu_per_task = (cpu(&net) - cpu_before) / tasks as f64;
    let phases = phase_means(&net);

    // Saturation: 8 clients, each submitting to its own coordinator, for 20 s.
    let done = Arc::new(AtomicUsize::new(0));
    let net = Arc::new(net);
    let window = Duration::from_secs(20);
    let start = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (net, done) = (net.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while start.elapsed() < window {
                    if net.chat(c % net.nodes.len(), &format!("load {c} {i}"), 16, 3).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.join();
    }
    let tps = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let rss: Vec<f64> = net.nodes.iter().map(|n| rss_mib(n.child.id())).collect();
    let mean_rss = rss.iter().sum::<f64>() / rss.len() as f64;
    println!("testnet of {nodes} nodes ready (all see all) in {ready:.1} s");
    println!("| | p50 | p99 |");
    println!("| --- | ---: | ---: |");
    println!(
        "| one node alone (k = 1, 1-node network) | {:.1} ms | {:.1} ms |",
        percentile(&alone, 0.5),
        percentile(&alone, 0.99)
    );
    println!(
        "| verified, k = 3 on {nodes} nodes | {:.1} ms | {:.1} ms |",
        percentile(&verified, 0.5),
        percentile(&verified, 0.99)
    );
    println!("CPU per sequential verified task, all nodes together: {cpu_per_task:.1} ms");
    println!("where a verified round's time goes (means over all nodes, sequential tasks):");
    println!("| phase | mean | count |");
    println!("| --- | ---: | ---: |");
    for (phase, mean, count) in phases {
        println!("| {phase} | {:.2} ms | {count} |", mean * 1000.0);
    }
    println!("saturation: {tps:.1} verified tasks/s (8 clients, 20 s, k = 3, 16 tokens each)");
    println!(
        "memory: {mean_rss:.0} MiB RSS per node on average (min {:.0}, max {:.0})",
        rss.iter().cloned().fold(f64::MAX, f64::min),
        rss.iter().cloned().fold(0.0, f64::max)
    );
}
