//! `sampo bench`'s measurement without the node crate, for side-by-side runs against
//! `llama-bench` (see `scripts/bench_vs_llamacpp.sh`):
//!
//! `cargo run -p sampo-kernels --release --example bench_model -- MODEL [THREADS] [REPS] [PROMPT] [GEN] [STREAMS]`
//!
//! Prefill: one `forward` of a PROMPT-token prompt (default 128) on a fresh sequence,
//! tokenized from the same text `sampo bench` uses. Decode: one `generate_batch` of GEN
//! tokens (default 128, greedy) after an 8-token prompt, tokens over the decode span;
//! STREAMS (default 1) sequences decoded as one batch, each prompt ending in its own
//! token, as `sampo bench --streams` does.
//! Each the median of REPS (default 3), after one unmeasured prefill (llama-bench warms up too). Prints one JSON line, with the peak RSS.

use std::sync::Arc;
use std::time::Instant;

use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, Model, SamplingParams, Sequence};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set size of this process, from /proc (Linux; 0 elsewhere).
fn peak_rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: bench_model MODEL [THREADS] [REPS] [PROMPT] [GEN]");
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (threads, reps, prompt_tokens, gen_tokens) = (arg(2, 1), arg(3, 3).max(1), arg(4, 128), arg(5, 128));
    let streams = arg(6, 1).max(1);
    let m = Arc::new(Model::load(std::path::Path::new(path)).expect("model"));
    let be = Arc::new(CpuBackend::new(threads).expect("pool"));
    let engine = Engine::new(m.clone(), be.clone());
    let text = "The history of the printing press begins in the fifteenth century, when movable type changed how books were made and read across Europe. ".repeat(64);
    let mut prompt = m.tokenizer.encode(&text, false);
    prompt.truncate(prompt_tokens.max(1));
    // One unmeasured prefill first, as llama-bench warms up: the weights' pages are
    // mapped in, the pool's threads started.
    let mut seq = Sequence::new(&m);
    be.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &prompt }]).expect("warm-up");
    let mut prefill = Vec::new();
    for _ in 0..reps {
        let mut seq = Sequence::new(&m);
        let t = Instant::now();
        be.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &prompt }]).expect("prefill");
        prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut decode = Vec::new();
    let short: Vec<u32> = prompt.iter().copied().take(8).collect();
    for _ in 0..reps {
        let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..streams)
            .map(|s| {
                let mut p = short.clone();
                if streams > 1 {
                    p.push(s as u32 % m.hp.n_vocab as u32);
                }
                (p, SamplingParams { max_tokens: gen_tokens as u32, ..Default::default() })
            })
            .collect();
        let gens = engine.generate_batch(&reqs, &mut |_, _, _| true).expect("decode");
        let tokens: usize = gens.iter().map(|g| g.tokens.len().saturating_sub(1)).sum();
        let span = gens.iter().map(|g| g.decode_secs).fold(0.0, f64::max);
        decode.push(tokens as f64 / span.max(1e-9));
    }
    println!(
        "{{\"threads\": {threads}, \"streams\": {streams}, \"prompt_tokens\": {}, \"gen_tokens\": {gen_tokens}, \"prefill_tokens_per_s\": {:.2}, \"decode_tokens_per_s\": {:.2}, \"peak_rss_bytes\": {}, \"prepared_bytes\": {}}}",
        prompt.len(),
        median(prefill),
        median(decode),
        peak_rss_bytes(),
        m.prepared_bytes().unwrap_or(0)
    );
}
