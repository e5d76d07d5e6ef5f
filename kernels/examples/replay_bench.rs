//! Generation vs verification by replay on the CPU backend.
//!
//! `cargo run -p sampo-kernels --release --example replay_bench -- [MODEL.gguf] [--threads N]`
//!
//! For each output length, greedy generation without stop tokens (prefill + decode)
//! and the replay of its output; the median of 3 runs each, as a markdown table.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use sampo_kernels::{Backend, ChatMessage, CpuBackend, Engine, Model, SamplingParams};

const LENGTHS: [u32; 3] = [32, 128, 512];
const REPS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().ok_or("--threads needs a number")?.parse()?,
            "-h" | "--help" => {
                println!("replay_bench [MODEL.gguf] [--threads N]");
                return Ok(());
            }
            _ => path = PathBuf::from(a),
        }
    }
    let model = Arc::new(Model::load(&path)?);
    let backend = Arc::new(CpuBackend::new(threads)?);
    let device = backend.device();
    let engine = Engine::new(model.clone(), backend);
    let prompt = engine.chat_prompt(&[
        ChatMessage { role: "system".into(), content: "You are a helpful assistant who answers in detail.".into() },
        ChatMessage {
            role: "user".into(),
            content: "Explain how a lighthouse works, its history, and why lighthouses matter to ships at night."
                .into(),
        },
    ])?;
    println!(
        "model {} ({}), {device}, prompt {} tokens, median of {REPS}\n",
        model.hp.name,
        path.display(),
        prompt.len()
    );
    println!("| output tokens | generate (s) | replay (s) | replay / generate |");
    println!("|---:|---:|---:|---:|");
    for n in LENGTHS {
        let p = SamplingParams { max_tokens: n, ..Default::default() };
        let (mut gen_secs, mut replay_secs) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            let g = engine.generate(&prompt, &p, &mut |_, _| true)?;
            if g.tokens.len() != n as usize {
                return Err(format!("generated {} tokens, wanted {n}", g.tokens.len()).into());
            }
            gen_secs.push(g.prefill_secs + g.decode_secs);
            let r = engine.replay(&prompt, &g.tokens, &p)?;
            if let Some(d) = r.divergence {
                return Err(format!("replay of a generated output diverged: {d}").into());
            }
            replay_secs.push(r.secs);
        }
        let (g, r) = (median(gen_secs), median(replay_secs));
        println!("| {n} | {g:.3} | {r:.3} | {:.3} |", r / g);
    }
    Ok(())
}
