//! Two `sampo` binaries compared on consensus overhead in one run, interleaved:
//! `cargo run -p sampo-testnet --example testnet_ab -- <sampo A> <sampo B> [nodes] [rounds] [tasks per block]`.
//!
//! On a shared machine whose speed drifts over minutes, runs of one binary after the
//! other compare the drift as much as the binaries. Here both testnets (and a one-node
//! network of each, for the alone figure) run side by side, idle but for their
//! background announcements, and take turns in short blocks of sequential tasks (A, B,
//! B, A, …), so each binary sees the same moments of the machine.

use std::path::PathBuf;
use std::time::Instant;

use sampo_testnet::{Testnet, TestnetConfig, cpu_ms, percentile};

struct Side {
    name: &'static str,
    single: Testnet,
    net: Testnet,
    alone: Vec<f64>,
    verified: Vec<f64>,
    cpu: f64,
}

fn block(net: &Testnet, k: usize, tasks: usize, tag: &str, out: &mut Vec<f64>) {
    for i in 0..tasks {
        let t = Instant::now();
        let v = net.chat(i % net.nodes.len(), &format!("ab {tag} {i}"), 16, k).expect("chat");
        assert_eq!(v["sampo"]["verdict"], "finalized");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: testnet_ab <sampo A> <sampo B> [nodes] [rounds] [tasks per block]";
    let bins = [PathBuf::from(args.get(1).expect(usage)), PathBuf::from(args.get(2).expect(usage))];
    let nodes: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(8);
    let rounds: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(10);
    let per_block: usize = args.get(5).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("sampo-ab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let model = dir.join("synthetic.gguf");
    let ok =
        std::process::Command::new(&bins[0]).args(["model", "synth", "--out"]).arg(&model).status().expect("synth");
    assert!(ok.success());

    let mut sides: Vec<Side> = bins
        .iter()
        .zip(["A", "B"])
        .map(|(bin, name)| {
            let sub = dir.join(name);
            let cfg = |n: usize, d: &str| TestnetConfig::new(n, model.clone(), sub.join(d), bin.clone());
            Side {
                name,
                single: Testnet::start(cfg(1, "single")).expect("single"),
                net: Testnet::start(cfg(nodes, "net")).expect("testnet"),
                alone: Vec::new(),
                verified: Vec::new(),
                cpu: 0.0,
            }
        })
        .collect();
    // Warm both (first connections, first seats) before anything is counted.
    for s in &sides {
        let mut scratch = Vec::new();
        block(&s.single, 1, 5, "warm", &mut scratch);
        block(&s.net, 3, 10, "warm", &mut scratch);
    }
    for r in 0..rounds {
        // A B then B A: neither binary always goes first.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for &i in &order {
            let s = &mut sides[i];
            block(&s.single, 1, per_block, &format!("{r}"), &mut s.alone);
            let cpu = |net: &Testnet| net.nodes.iter().map(|n| cpu_ms(n.child.id())).sum::<f64>();
            let before = cpu(&s.net);
            block(&s.net, 3, per_block, &format!("{r}"), &mut s.verified);
            s.cpu += cpu(&s.net) - before;
        }
    }
    println!("{nodes} nodes, k = 3, {rounds} interleaved rounds of {per_block} sequential tasks each");
    println!("| binary | alone p50 | verified p50 | verified p99 | overhead p50 | CPU per task (all nodes) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (s, bin) in sides.iter().zip(&bins) {
        let (alone, p50) = (percentile(&s.alone, 0.5), percentile(&s.verified, 0.5));
        println!(
            "| {} `{}` | {alone:.1} ms | {p50:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            s.name,
            bin.display(),
            percentile(&s.verified, 0.99),
            p50 - alone,
            s.cpu / s.verified.len() as f64
        );
    }
}
