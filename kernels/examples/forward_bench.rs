//! Best-of-N timings of the CPU forward pass, for A/B runs of kernel changes on a busy
//! machine (the minimum over many repetitions is what other load disturbs least):
//!
//! `cargo run -p sampo-kernels --release --example forward_bench -- MODEL [THREADS] [REPS]`
//!
//! Prints prefill tok/s (a 128-token prompt) and decode tok/s (32 steps after it), each
//! the best of REPS (default 10), by the wall clock and by the process's CPU time (Linux:
//! the sum of its threads' on-CPU time, so time spent waiting for a core while other
//! jobs run is not counted; at 1 thread it is the better A/B figure on a shared machine).

use std::sync::Arc;
use std::time::Instant;

use sampo_kernels::{Backend, BatchItem, CpuBackend, Model, Sequence};

/// The process's on-CPU time in seconds (Linux schedstat of every thread; 0 elsewhere).
fn cpu_s() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ns as f64 * 1e-9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: forward_bench MODEL [THREADS] [REPS]");
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let m = Arc::new(Model::load(std::path::Path::new(path)).expect("model"));
    let be = CpuBackend::new(threads).expect("pool");
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 7).collect();
    let (mut pre, mut dec, mut pre_cpu, mut dec_cpu) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..reps {
        let mut seq = Sequence::new(&m);
        let (t, c) = (Instant::now(), cpu_s());
        be.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &prompt }]).expect("prefill");
        pre = pre.min(t.elapsed().as_secs_f64());
        pre_cpu = pre_cpu.min(cpu_s() - c);
        let (t, c) = (Instant::now(), cpu_s());
        for i in 0..32u32 {
            be.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &[200 + i] }]).expect("decode");
        }
        dec = dec.min(t.elapsed().as_secs_f64());
        dec_cpu = dec_cpu.min(cpu_s() - c);
    }
    println!(
        "prefill {:.1} tok/s ({:.1} per CPU-s)  decode {:.1} tok/s ({:.1} per CPU-s)  (best of {reps}, {threads} threads)",
        128.0 / pre,
        128.0 / pre_cpu,
        32.0 / dec,
        32.0 / dec_cpu
    );
}
