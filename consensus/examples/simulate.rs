//! The reputation simulation and the round benchmark, for docs/BENCHMARKS.md:
//! `cargo run --release -p sampo-consensus --example simulate [nodes liars tasks k]`.

use std::time::Instant;

use sampo_consensus::sim::{SimNet, reputation_simulation, sybil_farm};
use sampo_consensus::{Behaviour, RoundParams};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let get = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (nodes, liars, tasks, k) = (get(0, 20), get(1, 4), get(2, 1000), get(3, 3));
    println!("reputation simulation: {nodes} nodes, {liars} colluding liars, {tasks} tasks, k = {k}");
    println!("| tasks | liars' seat share | finalized honest | finalized wrong | liars banned |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for w in reputation_simulation(nodes, liars, tasks, k as u8, 10)
        .into_iter()
        .filter(|w| w.first_task < 100 || (w.first_task + 10) % 100 == 0)
    {
        println!(
            "| {}–{} | {:.1} % | {} | {} | {} |",
            w.first_task + 1,
            w.first_task + w.tasks,
            100.0 * w.liar_seat_share,
            w.finalized_honest,
            w.finalized_wrong,
            w.liars_banned_at_end
        );
    }

    // A Sybil farm: 30 % of identities are fresh keys (on probation) that lie together
    // whenever they hold a quorum; tasks are submitted at the honest nodes.
    let (honest, sybils) = (nodes * 7 / 10, nodes - nodes * 7 / 10);
    println!();
    println!("Sybil farm: {honest} honest nodes, {sybils} fresh colluding keys, {tasks} tasks, k = {k}");
    println!("| tasks | Sybils' seat share | finalized honest | finalized wrong | Sybils off probation |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for w in sybil_farm(honest, sybils, tasks, k as u8, 100) {
        println!(
            "| {}–{} | {:.1} % | {} | {} | {} |",
            w.first_task + 1,
            w.first_task + w.tasks,
            100.0 * w.sybil_seat_share,
            w.finalized_honest,
            w.finalized_wrong,
            w.sybils_established
        );
    }

    // Rounds per second through the state machines alone: 5 honest nodes, k = 3, every
    // message signed, every verdict verified by all five nodes.
    let mut net = SimNet::new(5, RoundParams::default(), |_| Behaviour::Honest);
    let n = 2000;
    let start = Instant::now();
    for i in 0..n {
        let spec = net.spec(i % 5, 3, 0);
        if net.submit(i % 5, spec).is_ok() {
            net.settle();
        }
        // Keep memory flat: the benchmark measures rounds, not the log.
        net.log.clear();
        for node in &mut net.nodes {
            node.applied.clear();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "\nround benchmark: {n} rounds (k = 3, 5 nodes, all verdicts verified by all) in {secs:.2} s = {:.0} rounds/s",
        n as f64 / secs
    );
}
