//! Verification by replay: teacher-forced logits are the decode bits, generated
//! outputs replay as valid, and every kind of tampering is a divergence at exactly the
//! right position (never an error or a panic).

mod common;

use std::sync::Arc;

use sampo_kernels::cuda::CudaBackend;
use sampo_kernels::cuda::emu::EmuDevice;
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{
    Backend, BackendKind, BatchItem, CpuBackend, Divergence, Engine, KernelError, Model, ModelError, Replay,
    SamplingParams, Sequence, gguf::GgufFile,
};

fn synth_model() -> Arc<Model> {
    Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&SynthSpec::default())).expect("gguf")).expect("model"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn engine(m: &Arc<Model>, threads: usize) -> Engine {
    Engine::new(m.clone(), Arc::new(CpuBackend::new(threads).expect("pool")))
}

/// Deterministic pseudo-random token ids of the model's vocabulary.
fn tokens(m: &Model, n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 7919 + seed * 104_729 + 3) % m.hp.n_vocab as u64) as u32).collect()
}

/// Logits after each of `tokens`, fed one decode step at a time after `prefix`.
fn decode_logits(b: &dyn Backend, m: &Model, prefix: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = Sequence::new(m);
    if !prefix.is_empty() {
        b.forward(m, &mut [BatchItem { seq: &mut seq, tokens: prefix }]).expect("prefix");
    }
    tokens
        .iter()
        .map(|&t| b.forward(m, &mut [BatchItem { seq: &mut seq, tokens: &[t] }]).expect("step").remove(0))
        .collect()
}

/// Logits after each of `tokens` from one `forward_all` after `prefix`.
fn all_logits(b: &dyn Backend, m: &Model, prefix: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = Sequence::new(m);
    if !prefix.is_empty() {
        b.forward(m, &mut [BatchItem { seq: &mut seq, tokens: prefix }]).expect("prefix");
    }
    let out = b.forward_all(m, &mut seq, tokens).expect("forward_all");
    assert_eq!(seq.pos, prefix.len() + tokens.len(), "the cache holds every token");
    out
}

fn assert_same_bits(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: row count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "{what}: row {i} length");
        assert!(bits(x) == bits(y), "{what}: logits after token {i} differ");
    }
}

/// A backend that only knows `forward`, so it gets the trait's token-at-a-time
/// `forward_all`.
struct DecodeOnly(CpuBackend);

impl Backend for DecodeOnly {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }
    fn device(&self) -> String {
        format!("decode-only {}", self.0.device())
    }
    fn forward(&self, model: &Model, batch: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.0.forward(model, batch)
    }
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { max_tokens, ..Default::default() }
}

/// The sampling configurations every valid-replay test runs: greedy, then nucleus and
/// plain high-temperature sampling with several seeds.
fn configs(max_tokens: u32) -> Vec<SamplingParams> {
    let mut out = vec![greedy(max_tokens)];
    for seed in [1, 7, 12345] {
        out.push(SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, seed, max_tokens, stop: vec![] });
        out.push(SamplingParams { temperature: 1.3, seed, max_tokens, ..Default::default() });
    }
    out
}

fn generate(e: &Engine, prompt: &[u32], p: &SamplingParams) -> sampo_kernels::Generation {
    e.generate(prompt, p, &mut |_, _| true).expect("generate")
}

fn replay(e: &Engine, prompt: &[u32], output: &[u32], p: &SamplingParams) -> Replay {
    e.replay(prompt, output, p).expect("replay returns a verdict")
}

fn assert_valid(r: &Replay, what: &str) {
    assert!(r.is_valid(), "{what}: {}", r.divergence.map(|d| d.to_string()).unwrap_or_default());
}

fn assert_diverges(r: &Replay, want: Divergence, what: &str) {
    assert_eq!(r.divergence, Some(want), "{what}");
    assert_eq!(r.positions, want.position + 1, "{what}: stops at the first divergence");
}

/// A different in-vocabulary, non-stop token.
fn other(t: u32, m: &Model, p: &SamplingParams) -> u32 {
    let v = m.hp.n_vocab as u32;
    let mut x = (t + 1) % v;
    while p.stop.contains(&x) {
        x = (x + 1) % v;
    }
    x
}

// ---- forward_all ----

#[test]
fn forward_all_is_the_decode_bits_synthetic() {
    let m = synth_model();
    for threads in [1, 2, 3] {
        let b = CpuBackend::new(threads).expect("pool");
        for len in [1usize, 3, 7, 33, 65] {
            let toks = tokens(&m, len, len as u64);
            let want = decode_logits(&b, &m, &[], &toks);
            assert_same_bits(&all_logits(&b, &m, &[], &toks), &want, &format!("{threads} threads, {len} tokens"));
            // After a prefix already in the cache, as replay feeds the output.
            let prefix = tokens(&m, 5, 99);
            let want = decode_logits(&b, &m, &prefix, &toks);
            let got = all_logits(&b, &m, &prefix, &toks);
            assert_same_bits(&got, &want, &format!("{threads} threads, {len} tokens after a prefix"));
        }
    }
    // And the same bits whatever the thread count.
    let toks = tokens(&m, 21, 4);
    let one = all_logits(&CpuBackend::new(1).expect("pool"), &m, &[], &toks);
    let three = all_logits(&CpuBackend::new(3).expect("pool"), &m, &[], &toks);
    assert_same_bits(&one, &three, "1 vs 3 threads");
}

#[test]
fn forward_all_is_the_decode_bits_real_model() {
    let m = common::real_model();
    let b = CpuBackend::new(2).expect("pool");
    let toks = m.tokenizer.encode("The capital of France is Paris, and", true);
    assert_same_bits(&all_logits(&b, &m, &[], &toks), &decode_logits(&b, &m, &[], &toks), "real model");
    let (prefix, rest) = toks.split_at(3);
    assert_same_bits(
        &all_logits(&b, &m, prefix, rest),
        &decode_logits(&b, &m, prefix, rest),
        "real model after a prefix",
    );
}

#[test]
fn default_forward_all_agrees_with_the_cpu_override() {
    let m = synth_model();
    let cpu = CpuBackend::new(2).expect("pool");
    let slow = DecodeOnly(CpuBackend::new(2).expect("pool"));
    let prefix = tokens(&m, 4, 1);
    for len in [1usize, 2, 17] {
        let toks = tokens(&m, len, 2);
        assert_same_bits(&all_logits(&slow, &m, &[], &toks), &all_logits(&cpu, &m, &[], &toks), "fresh");
        assert_same_bits(&all_logits(&slow, &m, &prefix, &toks), &all_logits(&cpu, &m, &prefix, &toks), "prefix");
    }
    // Both refuse bad input the same way, before the cache grows.
    for b in [&cpu as &dyn Backend, &slow] {
        let mut seq = Sequence::new(&m);
        let bad = [5, m.hp.n_vocab as u32, 6];
        let err = b.forward_all(&m, &mut seq, &bad).expect_err("out of vocabulary");
        assert!(matches!(err, ModelError::TokenOutOfRange { .. }), "{err}");
        assert!(matches!(b.forward_all(&m, &mut seq, &[]), Err(ModelError::EmptyInput)));
        assert_eq!(seq.pos, 0);
    }
    // Replay verdicts are the same through either.
    let fast = engine(&m, 2);
    let slow = Engine::new(m.clone(), Arc::new(slow));
    let prompt = tokens(&m, 6, 3);
    let p = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, seed: 5, max_tokens: 30, stop: vec![] };
    let mut out = generate(&fast, &prompt, &p).tokens;
    assert_valid(&replay(&slow, &prompt, &out, &p), "default forward_all");
    out[20] = other(out[20], &m, &p);
    assert_eq!(replay(&slow, &prompt, &out, &p).divergence, replay(&fast, &prompt, &out, &p).divergence);
}

/// The CUDA backend (on its CPU emulator) uses the default `forward_all`: replaying a
/// CPU-generated output there gives the same verdicts.
#[test]
fn replay_on_the_emulated_cuda_backend() {
    let m = Arc::new(
        Model::from_gguf(
            GgufFile::from_bytes(synthesize(&SynthSpec { n_ctx: 256, ..SynthSpec::default() })).expect("gguf"),
        )
        .expect("model"),
    );
    let cpu = engine(&m, 2);
    let gpu = Engine::new(m.clone(), Arc::new(CudaBackend::new(EmuDevice::new())));
    let prompt = tokens(&m, 5, 8);
    let p = SamplingParams { temperature: 0.8, top_p: 0.9, seed: 3, max_tokens: 12, ..Default::default() };
    let mut out = generate(&cpu, &prompt, &p).tokens;
    assert_valid(&replay(&gpu, &prompt, &out, &p), "emulated cuda");
    let want = out[4];
    out[4] = other(want, &m, &p);
    let d = Divergence { position: 4, revealed: Some(out[4]), expected: Some(want) };
    assert_diverges(&replay(&gpu, &prompt, &out, &p), d, "emulated cuda, corrupted");
}

// ---- valid outputs ----

#[test]
fn generated_outputs_replay_as_valid_synthetic() {
    let m = synth_model();
    let e = engine(&m, 2);
    let prompt = m.tokenizer.encode("the quick brown fox", false);
    // 150 tokens: three teacher-forced passes, the last one partial.
    for p in configs(150) {
        let g = generate(&e, &prompt, &p);
        assert_eq!(g.tokens.len(), 150);
        let r = replay(&e, &prompt, &g.tokens, &p);
        assert_valid(&r, &format!("{p:?}"));
        assert_eq!(r.positions, 150);
    }
    // max_tokens 0: generation still samples one token before it looks at the length.
    let p = greedy(0);
    let g = generate(&e, &prompt, &p);
    assert_eq!(g.tokens.len(), 1);
    assert_valid(&replay(&e, &prompt, &g.tokens, &p), "max_tokens 0");
    assert!(!replay(&e, &prompt, &[], &p).is_valid(), "max_tokens 0, empty output");
}

#[test]
fn outputs_ended_by_a_stop_token_replay_as_valid() {
    let m = synth_model();
    let e = engine(&m, 2);
    let prompt = m.tokenizer.encode("Once upon a time", false);
    for base in configs(100) {
        let full = generate(&e, &prompt, &base).tokens;
        // Stop at the first occurrence of the token at position 37: generation before it
        // is unchanged, and it ends there.
        let k = full.iter().position(|&t| t == full[37]).expect("present");
        let p = SamplingParams { stop: vec![full[37], m.hp.n_vocab as u32 + 7], ..base.clone() };
        let g = generate(&e, &prompt, &p);
        assert_eq!(g.finish, sampo_kernels::FinishReason::Stop);
        assert_eq!(g.tokens, full[..k]);
        let r = replay(&e, &prompt, &g.tokens, &p);
        assert_valid(&r, &format!("stop-ended {p:?}"));
        assert_eq!(r.positions, k + 1, "the final stop is a checked step");
        // Without the stop token, the same output is cut short.
        let d = Divergence { position: k, revealed: None, expected: Some(full[k]) };
        assert_diverges(&replay(&e, &prompt, &g.tokens, &base), d, "no stop configured");
        // Anything appended after the stop diverges there.
        let mut longer = g.tokens.clone();
        longer.push(full[k + 1]);
        let d = Divergence { position: k, revealed: Some(full[k + 1]), expected: None };
        assert_diverges(&replay(&e, &prompt, &longer, &p), d, "token after the stop");
    }
    // A stop sampled at the very first step: the valid output is empty.
    let p0 = greedy(10);
    let first = generate(&e, &prompt, &p0).tokens[0];
    let p = SamplingParams { stop: vec![first], ..p0 };
    assert!(generate(&e, &prompt, &p).tokens.is_empty());
    let r = replay(&e, &prompt, &[], &p);
    assert_valid(&r, "empty output");
    assert_eq!(r.positions, 1);
}

#[test]
fn generated_outputs_replay_as_valid_real_model() {
    let m = common::real_model();
    let e = engine(&m, 2);
    let prompt = e
        .chat_prompt(&[sampo_kernels::ChatMessage {
            role: "user".into(),
            content: "Write a short poem about the sea.".into(),
        }])
        .expect("chat prompt");
    let stop: Vec<u32> = m.tokenizer.eos.into_iter().collect();
    let configs = [
        greedy(32),
        SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, seed: 11, max_tokens: 32, stop: stop.clone() },
        SamplingParams { temperature: 1.3, seed: 2, max_tokens: 32, stop, ..Default::default() },
    ];
    for p in configs {
        let g = generate(&e, &prompt, &p);
        assert!(!g.tokens.is_empty());
        let r = replay(&e, &prompt, &g.tokens, &p);
        assert_valid(&r, &format!("real model {p:?}"));
        assert!(r.secs > 0.0);
        // Tampering at the first and the last position.
        for i in [0, g.tokens.len() - 1] {
            let mut bad = g.tokens.clone();
            bad[i] = other(bad[i], &m, &p);
            let d = Divergence { position: i, revealed: Some(bad[i]), expected: Some(g.tokens[i]) };
            assert_diverges(&replay(&e, &prompt, &bad, &p), d, "real model, corrupted");
        }
        let cut = g.tokens.len() / 2;
        let d = Divergence { position: cut, revealed: None, expected: Some(g.tokens[cut]) };
        assert_diverges(&replay(&e, &prompt, &g.tokens[..cut], &p), d, "real model, truncated");
    }
}

// ---- tampering ----

#[test]
fn tampering_diverges_at_exactly_the_position() {
    let m = synth_model();
    let e = engine(&m, 2);
    let prompt = m.tokenizer.encode("12345 678901", false);
    let v = m.hp.n_vocab as u32;
    for p in configs(100) {
        let g = generate(&e, &prompt, &p).tokens;
        assert_eq!(g.len(), 100);
        let last = g.len() - 1;
        // A different token, including on both sides of a pass boundary (64).
        for i in [0, 1, 37, 62, 63, 64, 65, last] {
            let mut bad = g.clone();
            bad[i] = other(g[i], &m, &p);
            let d = Divergence { position: i, revealed: Some(bad[i]), expected: Some(g[i]) };
            assert_diverges(&replay(&e, &prompt, &bad, &p), d, &format!("corrupted at {i}"));
        }
        // Cut short.
        for cut in [0, 1, 64, last] {
            let d = Divergence { position: cut, revealed: None, expected: Some(g[cut]) };
            assert_diverges(&replay(&e, &prompt, &g[..cut], &p), d, &format!("cut at {cut}"));
        }
        // Longer than max_tokens, by one or by many.
        for extra in [1usize, 50] {
            let mut long = g.clone();
            long.extend(tokens(&m, extra, 3));
            let d = Divergence { position: g.len(), revealed: Some(long[g.len()]), expected: None };
            assert_diverges(&replay(&e, &prompt, &long, &p), d, &format!("{extra} appended"));
        }
        // Out of the vocabulary.
        for (i, t) in [(0, v), (40, u32::MAX), (last, v + 1)] {
            let mut bad = g.clone();
            bad[i] = t;
            let d = Divergence { position: i, revealed: Some(t), expected: Some(g[i]) };
            assert_diverges(&replay(&e, &prompt, &bad, &p), d, &format!("id {t} at {i}"));
        }
        // A stop token inside the output. A stop the output never samples leaves
        // generation unchanged.
        let s = (0..v).find(|t| !g.contains(t)).expect("an unused token");
        let ps = SamplingParams { stop: vec![s], ..p.clone() };
        assert_eq!(generate(&e, &prompt, &ps).tokens, g);
        assert_valid(&replay(&e, &prompt, &g, &ps), "unused stop");
        for i in [0, 50, last] {
            let mut bad = g.clone();
            bad[i] = s;
            let d = Divergence { position: i, revealed: Some(s), expected: Some(g[i]) };
            assert_diverges(&replay(&e, &prompt, &bad, &ps), d, &format!("stop token at {i}"));
        }
    }
}

#[test]
fn bad_tasks_are_errors_like_generation() {
    let m = synth_model();
    let e = engine(&m, 1);
    let ctx = m.hp.n_ctx;
    assert!(matches!(e.replay(&[], &[5], &greedy(4)), Err(KernelError::EmptyPrompt)));
    let long = tokens(&m, ctx - 3, 1);
    assert!(matches!(e.replay(&long, &[5], &greedy(4)), Err(KernelError::TooLong { .. })));
    assert!(matches!(
        e.replay(&[1, 2], &[], &SamplingParams { top_p: 0.0, ..greedy(4) }),
        Err(KernelError::Sampling(_))
    ));
    assert!(matches!(
        e.replay(&[1, m.hp.n_vocab as u32], &[], &greedy(4)),
        Err(KernelError::Model(ModelError::TokenOutOfRange { .. }))
    ));
    // A prompt that fills the context exactly with its max_tokens still replays.
    let prompt = tokens(&m, ctx - 4, 2);
    let g = generate(&e, &prompt, &greedy(4)).tokens;
    assert_valid(&replay(&e, &prompt, &g, &greedy(4)), "full context");
    let mut long = g.clone();
    long.extend([1, 2, 3]);
    assert_eq!(replay(&e, &prompt, &long, &greedy(4)).divergence.map(|d| d.position), Some(4));
}

#[test]
fn verdicts_serialize_and_read_well() {
    let d = Divergence { position: 17, revealed: Some(99), expected: Some(1234) };
    assert_eq!(d.to_string(), "at output position 17 the model gives token 1234, the output has 99");
    assert!(Divergence { revealed: None, ..d }.to_string().contains("ends at position 17"));
    assert!(Divergence { expected: None, ..d }.to_string().contains("generation stops"));
    let r = Replay { divergence: Some(d), positions: 18, secs: 0.5 };
    let j = serde_json::to_value(&r).expect("json");
    assert_eq!(j["divergence"]["position"], 17);
    assert_eq!(j["divergence"]["expected"], 1234);
    assert_eq!(j["positions"], 18);
    assert!(!r.is_valid());
}
