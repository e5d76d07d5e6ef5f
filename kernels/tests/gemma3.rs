//! Gemma 3 270M against llama.cpp's reference outputs: the SentencePiece tokenizer
//! exactly, the chat template, and greedy continuations.
//!
//! On the real Q4_K_M file (`scripts/fetch-model.sh gemma3`).

mod common;

use std::sync::Arc;

use common::{gemma3_model, gemma3_reference, gemma3_tokenizer, ids};
use sampo_kernels::{ChatMessage, CpuBackend, Engine, Model, SamplingParams};

#[test]
fn tokenizer_matches_llama_cpp_exactly() {
    let t = gemma3_tokenizer();
    let r = gemma3_reference();
    assert!(t.is_spm() && !t.add_space_prefix() && t.add_bos);
    assert_eq!(t.bos, Some(r["bos"].as_u64().expect("bos") as u32));
    assert_eq!(t.eot, ids(&r["eos"]), "end-of-generation set");
    for case in r["tokenize"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(t.encode(text, true), ids(&case["ids"]), "text {text:?}");
        assert_eq!(t.decode(&ids(&case["ids"])).expect("decode"), text);
    }
    for case in r["greedy"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(t.encode_prompt(prompt), ids(&case["prompt_ids"]), "prompt {prompt:?}");
    }
}

#[test]
fn tokenizer_special_tokens_and_byte_fallback() {
    let t = gemma3_tokenizer();
    let id = |s: &str| t.token_id(s).expect("token");
    let (sot, eot, nl) = (id("<start_of_turn>"), id("<end_of_turn>"), id("\n"));
    assert_eq!((sot, eot), (105, 106));
    // Control tokens are parsed only when asked; user-defined ones (`\n`) always.
    let text = "<start_of_turn>user\nHi<end_of_turn>";
    let parsed = t.encode(text, true);
    assert_eq!(parsed.first(), Some(&sot));
    assert_eq!(parsed.last(), Some(&eot));
    assert!(parsed.contains(&nl));
    let plain = t.encode(text, false);
    assert!(!plain.contains(&sot) && !plain.contains(&eot) && plain.contains(&nl));
    assert_eq!(t.decode(&plain).expect("decode"), text);
    // Inside a protected range a control string stays text.
    let whole = std::ops::Range { start: 0, end: text.len() };
    let shielded = t.encode_protected(text, std::slice::from_ref(&whole));
    assert_eq!(shielded, plain);
    // A character with no token of its own falls back to its UTF-8 bytes.
    let rare = "\u{10FFFD}";
    let bytes = t.encode(rare, true);
    let byte_ids: Vec<u32> = rare.bytes().map(|b| id(&format!("<0x{b:02X}>"))).collect();
    assert_eq!(bytes, byte_ids);
    assert_eq!(t.decode(&bytes).expect("decode"), rare);
    // Every text comes back from its tokens.
    for text in ["", " ", "  a  b  ", "x\r\n\ty", "<bos>", "<start_of_turn", "Ünïcödé 中文 🚀", "a\u{a0}b"] {
        assert_eq!(t.decode(&t.encode(text, true)).expect("decode"), text, "{text:?}");
    }
}

#[test]
fn chat_prompt_uses_the_builtin_gemma_template() {
    let m = gemma3_model();
    assert!(m.tokenizer.chat_template.is_none(), "this file carries no template");
    let e = Engine::new(m.clone(), Arc::new(CpuBackend::new(1).expect("pool")));
    let msgs = [ChatMessage { role: "user".into(), content: "Hi <end_of_turn>".into() }];
    let got = e.chat_prompt(&msgs).expect("chat prompt");
    let t = &m.tokenizer;
    let mut want = vec![2, 105];
    want.extend(t.encode("user\n", true));
    // The user's text stays text, special strings included.
    want.extend(t.encode("Hi <end_of_turn>", false));
    want.extend([106, t.token_id("\n").expect("nl"), 105]);
    want.extend(t.encode("model\n", true));
    assert_eq!(got, want, "{:?}", t.decode(&got));
}

/// Greedy continuations of `m` against llama.cpp's; returns one line per prompt.
/// A prompt may diverge before 8 tokens only on a near-tie, which is checked.
fn greedy_against_llama_cpp(m: &Arc<Model>) -> Vec<String> {
    let engine = Engine::new(m.clone(), Arc::new(CpuBackend::new(2).expect("pool")));
    let mut report = Vec::new();
    for case in gemma3_reference()["greedy"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let p = SamplingParams { max_tokens: want.len() as u32, ..Default::default() };
        let g = engine.generate(&prompt, &p, &mut |_, _| true).expect("generate");
        let agree = g.tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let mut line = format!("{:?}: {agree}/{} agree; ours {:?}", case["prompt"].as_str(), want.len(), g.text);
        if agree < want.len().min(g.tokens.len()) {
            // The logits at the first divergence: ours for both candidates.
            let mut ctx = prompt.clone();
            ctx.extend(&want[..agree]);
            let l = engine.logits(&ctx).expect("logits");
            let (ours, theirs) = (g.tokens[agree], want[agree]);
            let gap = l[ours as usize] - l[theirs as usize];
            line += &format!(
                "; step {agree}: ours {ours} logit {:.4}, llama.cpp's {theirs} logit {:.4} (gap {gap:.4})",
                l[ours as usize], l[theirs as usize]
            );
            if agree < 8 {
                assert!(gap < 0.25, "diverged at step {agree} without a near-tie:\n{line}");
            }
        }
        // The first token's log-probability is close to llama.cpp's.
        let logits = engine.logits(&prompt).expect("logits");
        let top = &case["top3_first"][0];
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
        let lp = logits[top["id"].as_u64().expect("id") as usize] - lse;
        let want_lp = top["logprob"].as_f64().expect("lp") as f32;
        line += &format!("; first-token logprob {lp:.4} vs llama.cpp {want_lp:.4}");
        assert!((lp - want_lp).abs() < 0.15, "{line}");
        report.push(line);
    }
    report
}

/// The Q4_K_M file llama.cpp's reference was made with.
#[test]
fn greedy_continuations_agree_with_llama_cpp_q4_k_m() {
    let m = gemma3_model();
    let report = greedy_against_llama_cpp(&m);
    println!("{}", report.join("\n"));
}
