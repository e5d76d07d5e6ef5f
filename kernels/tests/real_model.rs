//! The real model against llama.cpp's reference outputs.

mod common;

use std::sync::Arc;

use common::{ids, real_model, reference};
use sampo_kernels::{CpuBackend, Engine, SamplingParams};

#[test]
fn tokenizer_matches_llama_cpp_exactly() {
    let m = real_model();
    for case in reference()["tokenize"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(m.tokenizer.encode(text, true), ids(&case["ids"]), "text {text:?}");
        assert_eq!(m.tokenizer.decode(&ids(&case["ids"])).expect("decode"), text);
    }
    for case in reference()["greedy"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(m.tokenizer.encode(prompt, true), ids(&case["prompt_ids"]), "prompt {prompt:?}");
    }
}

#[test]
fn greedy_continuations_agree_with_llama_cpp() {
    let m = real_model();
    let engine = Engine::new(m.clone(), Arc::new(CpuBackend::new(2).expect("pool")));
    let mut report = Vec::new();
    for case in reference()["greedy"].as_array().expect("cases") {
        let want = ids(&case["greedy_ids"]);
        let p = SamplingParams { max_tokens: want.len() as u32, ..Default::default() };
        let g = engine.generate(&ids(&case["prompt_ids"]), &p, &mut |_, _| true).expect("generate");
        let agree = g.tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
        report.push(format!("{:?}: {agree}/{} agree; ours {:?}", case["prompt"].as_str(), want.len(), g.text));
        assert!(agree >= 8.min(want.len()), "{}", report.join("\n"));
        // Top-1 of the first step must be llama.cpp's, with a similar log-probability.
        let logits = engine.logits(&ids(&case["prompt_ids"])).expect("logits");
        let top = &case["top3_first"][0];
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
        let lp = logits[top["id"].as_u64().expect("id") as usize] - lse;
        let want_lp = top["logprob"].as_f64().expect("lp") as f32;
        assert!((lp - want_lp).abs() < 0.15, "first-token logprob {lp} vs llama.cpp {want_lp}");
    }
    println!("{}", report.join("\n"));
}
