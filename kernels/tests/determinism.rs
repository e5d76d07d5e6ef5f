//! The determinism contract: bit-identical logits and tokens whatever the thread
//! count, batch composition or concurrent load.

mod common;

use std::sync::Arc;

use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, Model, SamplingParams, Sequence, gguf::GgufFile};

fn synth_model() -> Arc<Model> {
    Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&SynthSpec::default())).expect("gguf")).expect("model"))
}

/// The synthetic Gemma 3: local layers with a window of 8, so prompts of a few
/// dozen tokens slide it.
fn synth_gemma3() -> Arc<Model> {
    Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&SynthSpec::gemma3())).expect("gguf")).expect("model"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn engine(m: &Arc<Model>, threads: usize) -> Engine {
    Engine::new(m.clone(), Arc::new(CpuBackend::new(threads).expect("pool")))
}

fn check_threads(m: &Arc<Model>, prompt: &[u32]) {
    let one = engine(m, 1).logits(prompt).expect("1 thread");
    let two = engine(m, 2).logits(prompt).expect("2 threads");
    let three = engine(m, 3).logits(prompt).expect("3 threads");
    assert_eq!(bits(&one), bits(&two), "1 vs 2 threads");
    assert_eq!(bits(&one), bits(&three), "1 vs 3 threads");
}

#[test]
fn logits_identical_across_thread_counts_synthetic() {
    let m = synth_model();
    let p = m.tokenizer.encode("the quick brown fox", false);
    check_threads(&m, &p);
}

#[test]
fn logits_identical_across_thread_counts_gemma3() {
    let m = synth_gemma3();
    let p = m.tokenizer.encode_prompt("the quick brown fox jumps over the lazy dog, and then the other one");
    assert!(p.len() > 3 * m.hp.sliding_window, "the prompt slides the window");
    check_threads(&m, &p);
    let m = common::gemma3_model();
    check_threads(&m, &m.tokenizer.encode_prompt("The capital of France is"));
}

#[test]
fn logits_identical_across_thread_counts_real_model() {
    let m = common::real_model();
    let p = m.tokenizer.encode("The capital of France is", false);
    check_threads(&m, &p);
}

/// Logits of each sequence alone, then inside batches of different compositions,
/// prefill and decode steps, must be the same bits.
#[test]
fn logits_identical_across_batch_compositions() {
    check_batch_compositions(&[synth_model(), common::real_model()]);
}

#[test]
fn logits_identical_across_batch_compositions_gemma3() {
    check_batch_compositions(&[synth_gemma3(), common::gemma3_model()]);
}

fn check_batch_compositions(models: &[Arc<Model>]) {
    for m in models {
        let e = engine(m, 2);
        let prompts: Vec<Vec<u32>> =
            ["Hello world!", "Once upon a time, in a land far away, there lived", "12345 678901 3.14159"]
                .iter()
                .map(|t| m.tokenizer.encode_prompt(t))
                .collect();
        let alone: Vec<Vec<f32>> = prompts.iter().map(|p| e.logits(p).expect("alone")).collect();
        // All three in one prefill batch.
        let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::new(m)).collect();
        let mut batch: Vec<BatchItem<'_>> =
            seqs.iter_mut().zip(&prompts).map(|(seq, p)| BatchItem { seq, tokens: p }).collect();
        let together = e.backend().forward(m, &mut batch).expect("batch");
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(bits(a), bits(t), "batch of 3 vs alone");
        }
        // Prefill token by token (decode path, batch of one row) vs whole prompt.
        let mut seq = Sequence::new(m);
        let mut last = Vec::new();
        for &t in &prompts[1] {
            last = e.backend().forward(m, &mut [BatchItem { seq: &mut seq, tokens: &[t] }]).expect("step").remove(0);
        }
        assert_eq!(bits(&last), bits(&alone[1]), "incremental vs whole prompt");
        // Prefill in two chunks, the second inside a batch with another sequence.
        let (head, tail) = prompts[1].split_at(prompts[1].len() / 2);
        let mut seq = Sequence::new(m);
        e.backend().forward(m, &mut [BatchItem { seq: &mut seq, tokens: head }]).expect("first chunk");
        let mut other = Sequence::new(m);
        let out = e
            .backend()
            .forward(
                m,
                &mut [BatchItem { seq: &mut other, tokens: &prompts[0] }, BatchItem { seq: &mut seq, tokens: tail }],
            )
            .expect("second chunk");
        assert_eq!(bits(&out[1]), bits(&alone[1]), "chunked prefill in a batch vs whole prompt");
        // Every row of a teacher-forced pass equals the decode step at its position.
        let all = e.backend().forward_all(m, &mut Sequence::new(m), &prompts[1]).expect("forward_all");
        assert_eq!(bits(all.last().expect("rows")), bits(&alone[1]), "forward_all vs whole prompt");
    }
}

/// Gemma 3's local layers see the last `sliding_window` positions only: a prompt
/// within the window gives the same logits whatever the window, a longer one does not.
#[test]
fn gemma3_sliding_window_limits_local_layers() {
    let with_window = |w: usize| {
        let spec = SynthSpec {
            arch: sampo_kernels::synth::SynthArch::Gemma3 { head_dim: 32, sliding_window: w },
            ..SynthSpec::gemma3()
        };
        let m = Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model"));
        engine(&m, 2)
    };
    let (narrow, wide) = (with_window(8), with_window(1024));
    let short = narrow.tokenizer().encode_prompt("the ant");
    let long = narrow.tokenizer().encode_prompt("the ant and the heron went on and on, then the tern");
    assert!(short.len() <= 8 && long.len() > 8);
    assert_eq!(bits(&narrow.logits(&short).expect("narrow")), bits(&wide.logits(&short).expect("wide")));
    assert_ne!(bits(&narrow.logits(&long).expect("narrow")), bits(&wide.logits(&long).expect("wide")));
}

#[test]
fn token_streams_identical_across_runs_batches_and_load() {
    let m = common::real_model();
    let e = engine(&m, 2);
    let prompt = m.tokenizer.encode("Once upon a time, there was a little", false);
    let sampled = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7, max_tokens: 16, stop: vec![] };
    let greedy = SamplingParams { max_tokens: 16, ..Default::default() };
    let a = e.generate(&prompt, &sampled, &mut |_, _| true).expect("run 1").tokens;
    let b = e.generate(&prompt, &sampled, &mut |_, _| true).expect("run 2").tokens;
    assert_eq!(a, b, "same seed, same tokens");
    let other = e.generate(&prompt, &SamplingParams { seed: 8, ..sampled.clone() }, &mut |_, _| true).expect("seed 8");
    assert_ne!(a, other.tokens, "a different seed should (here) differ");
    // The same request inside a batch of mixed requests.
    let other_prompt = m.tokenizer.encode("The year 2026 had 365 days.", false);
    let batch = e
        .generate_batch(
            &[
                (other_prompt.clone(), greedy.clone()),
                (prompt.clone(), sampled.clone()),
                (other_prompt, sampled.clone()),
            ],
            &mut |_, _, _| true,
        )
        .expect("batch");
    assert_eq!(batch[1].tokens, a, "inside a batch");
    // Under concurrent load from another engine on other threads.
    let e2 = engine(&m, 2);
    let p2 = prompt.clone();
    let load = std::thread::spawn(move || {
        for _ in 0..3 {
            let _ = e2.generate(&p2, &SamplingParams { max_tokens: 8, ..Default::default() }, &mut |_, _| true);
        }
    });
    let c = e.generate(&prompt, &sampled, &mut |_, _| true).expect("under load").tokens;
    load.join().expect("load thread");
    assert_eq!(a, c, "under load");
}

/// blake3 of the logits' bits, as hex.
fn hash_bits(rows: &[Vec<f32>]) -> String {
    let mut h = blake3::Hasher::new();
    for v in rows.iter().flatten() {
        h.update(&v.to_bits().to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The CPU's bits themselves, pinned: the real models' logits after a prefill of the
/// prompt (multi-row kernels) and after each step of feeding it one token at a time
/// (one-row kernels), at 1 and 3 threads, hashed. The values were recorded before the
/// CPU speed work; a faster kernel must give these same bits (the CUDA kernels follow
/// the same canonical orders, so a change here would split CPU from CUDA nodes too).
#[test]
fn real_model_logits_bits_are_pinned() {
    let cases = [
        (
            common::real_model(),
            "23a383869eac2818e8bfcf9638cc367d4b6beb526e02c57186df5e2e61e722f9",
            "78a978740c4afee09cd1d66a3044bac3938afed0739c8bc458322ec9b510bdc2",
        ),
        (
            common::gemma3_model(),
            "1dc178efaa80ed6bf4aadce9d9c11d17d926d4488d9d0536c7cde489c372bf5c",
            "26b732dab0b28205e1a26adad42cb10b94b854ed6e8dc4d77ac98e7b684a03c4",
        ),
    ];
    for (m, want_prefill, want_decode) in cases {
        let p = m.tokenizer.encode_prompt("The capital of France is");
        for threads in [1, 3] {
            let be = CpuBackend::new(threads).expect("pool");
            let mut seq = Sequence::new(&m);
            let prefill = be.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &p }]).expect("prefill");
            let mut seq = Sequence::new(&m);
            let steps: Vec<Vec<f32>> = p
                .iter()
                .map(|t| {
                    let mut out = be
                        .forward(&m, &mut [BatchItem { seq: &mut seq, tokens: std::slice::from_ref(t) }])
                        .expect("decode step");
                    out.pop().expect("logits")
                })
                .collect();
            assert_eq!(bits(&prefill[0]), bits(steps.last().expect("steps")), "prefill vs decode");
            let (hp, hd) = (hash_bits(&prefill), hash_bits(&steps));
            assert_eq!((hp.as_str(), hd.as_str()), (want_prefill, want_decode), "{} threads", threads);
        }
    }
}

/// Every weight type's matrix products, through every kernel path a CPU has (one row
/// for decode; the multi-row kernels for prefill, batches and replay): for widths of
/// odd block counts (and past 32 blocks, where the lane accumulators wrap) and 1 to 9
/// rows (and 70, past one tile of 64), at 1 to 3 threads, teacher-forced logits are
/// the decode bits, and a batch of two prompts gives each prompt's own bits.
#[test]
fn every_weight_type_prefill_is_the_decode_bits_for_every_row_count_and_thread_count() {
    for ty in sampo_kernels::gguf::SUPPORTED_TYPES.into_iter().filter(|t| t.is_quantized()) {
        // 3 and 33 blocks of 32; 8 and 40 chunks of K-quant super-blocks.
        let (n_embd, n_ff) = if ty.is_k_quant() { (256, 1280) } else { (96, 1056) };
        let spec = SynthSpec { weights: Some(ty), n_embd, n_ff, n_ctx: 128, ..SynthSpec::default() };
        let m = Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model"));
        let toks: Vec<u32> = (0..70u64).map(|i| ((i * 7919 + 3) % m.hp.n_vocab as u64) as u32).collect();
        let one = CpuBackend::new(1).expect("pool");
        let mut seq = Sequence::new(&m);
        let decode: Vec<Vec<f32>> = toks
            .iter()
            .map(|&t| one.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &[t] }]).expect("step").remove(0))
            .collect();
        for threads in 1..=3 {
            let b = CpuBackend::new(threads).expect("pool");
            for rows in (1..=9).chain([70]) {
                let all = b.forward_all(&m, &mut Sequence::new(&m), &toks[..rows]).expect("forward_all");
                for (r, (got, want)) in all.iter().zip(&decode).enumerate() {
                    assert_eq!(bits(got), bits(want), "{ty}: {threads} threads, {rows} rows, row {r}");
                }
            }
            let (mut s1, mut s2) = (Sequence::new(&m), Sequence::new(&m));
            let out = b
                .forward(
                    &m,
                    &mut [
                        BatchItem { seq: &mut s1, tokens: &toks[..3] },
                        BatchItem { seq: &mut s2, tokens: &toks[..6] },
                    ],
                )
                .expect("batch");
            assert_eq!(bits(&out[0]), bits(&decode[2]), "{ty}: {threads} threads, batch item 0");
            assert_eq!(bits(&out[1]), bits(&decode[5]), "{ty}: {threads} threads, batch item 1");
        }
    }
}

#[test]
fn kept_prepared_rows_and_a_zero_budget_give_the_same_bits() {
    // The batched kernel reads weight rows kept from the first batched pass, or (over
    // the budget) unpacks them on every pass: a prompt, then a batch of decode steps.
    let run = |budget: Option<usize>| {
        let m = synth_model();
        if let Some(b) = budget {
            m.set_prepared_budget(b);
        }
        let be = CpuBackend::new(2).expect("pool");
        let prompts: Vec<Vec<u32>> = (0..3u32).map(|s| vec![1, 2 + s, 3, 4 + s, 5]).collect();
        let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::new(&m)).collect();
        let mut out = Vec::new();
        let mut batch: Vec<BatchItem<'_>> =
            seqs.iter_mut().zip(&prompts).map(|(seq, p)| BatchItem { seq, tokens: p }).collect();
        out.extend(be.forward(&m, &mut batch).expect("prefill"));
        for step in 0..4u32 {
            let next: Vec<[u32; 1]> = (0..3u32).map(|s| [7 + s + step]).collect();
            let mut batch: Vec<BatchItem<'_>> =
                seqs.iter_mut().zip(&next).map(|(seq, t)| BatchItem { seq, tokens: &t[..] }).collect();
            out.extend(be.forward(&m, &mut batch).expect("decode"));
        }
        (out.iter().map(|r| bits(r)).collect::<Vec<_>>(), m.prepared_bytes())
    };
    let (kept, kept_bytes) = run(None);
    let (unpacked, none) = run(Some(0));
    assert_eq!(kept, unpacked, "kept rows vs unpacked each pass");
    // (The multi-row kernel, and so the kept rows, exist only with AVX-512 VNNI.)
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") {
        assert!(kept_bytes.is_some_and(|b| b > 0), "rows kept under the default budget: {kept_bytes:?}");
    }
    assert_eq!(none, Some(0), "nothing kept over the budget");
}

#[test]
fn warming_the_cpu_backend_prepares_the_rows_once() {
    let m = synth_model();
    assert_eq!(m.prepared_bytes(), None, "made lazily");
    let be = CpuBackend::new(1).expect("pool");
    be.warm(&m);
    let made = m.prepared_bytes();
    assert!(made.is_some(), "made by warm");
    // A batched pass afterwards reuses them (same size) and gets the same bits as a
    // cold model's.
    let cold = synth_model();
    let p: Vec<u32> = vec![1, 2, 3, 4];
    let a = Engine::new(m.clone(), Arc::new(CpuBackend::new(1).expect("pool"))).logits(&p).expect("warm");
    let b = Engine::new(cold, Arc::new(CpuBackend::new(1).expect("pool"))).logits(&p).expect("cold");
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(m.prepared_bytes(), made);
}

#[test]
fn warming_beside_forward_passes_never_deadlocks() {
    // A worker running the warm-up's parallel loop may steal a forward pass of the same
    // model; that pass must not wait for the warm-up (which waits for it). Each round a
    // fresh model, warmed while two threads run batched passes on the same pool.
    let be = Arc::new(CpuBackend::new(2).expect("pool"));
    for round in 0..30 {
        let m = synth_model();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for who in 0..3 {
            let (be, m, tx) = (be.clone(), m.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                if who == 0 {
                    be.warm(&m);
                } else {
                    let mut seq = Sequence::new(&m);
                    let tokens = [1u32, 2, 3 + who];
                    be.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &tokens }]).expect("forward");
                }
                let _ = tx.send(who);
            }));
        }
        drop(tx);
        for _ in 0..3 {
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("round {round}: a pass or the warm-up never finished"));
        }
        for t in threads {
            t.join().expect("thread");
        }
    }
}

#[test]
fn a_forked_prompt_prefix_gives_the_bits_of_a_fresh_prefill() {
    // The prefix cache's premise: a sequence that starts from another's first n tokens
    // (copied) and feeds the rest of its own prompt gets the logits of a fresh prefill,
    // on both architectures (Gemma 3's local layers slide their window over the fork).
    for m in [synth_model(), synth_gemma3()] {
        let be = CpuBackend::new(2).expect("pool");
        let a = m.tokenizer.encode("the quick brown fox jumps over the lazy dog and then some more", false);
        let mut b = a[..a.len() - 3].to_vec();
        b.extend(m.tokenizer.encode(" a different ending entirely", false));
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(shared > 8 && shared < b.len(), "{shared} of {}", b.len());
        let mut first = Sequence::new(&m);
        be.forward(&m, &mut [BatchItem { seq: &mut first, tokens: &a }]).expect("a");
        for n in [0, 1, shared / 2, shared] {
            let mut fork = first.fork_prefix(n).expect("held on the host");
            assert_eq!(fork.pos, n);
            let got = be.forward(&m, &mut [BatchItem { seq: &mut fork, tokens: &b[n..] }]).expect("fork");
            let mut fresh = Sequence::new(&m);
            let want = be.forward(&m, &mut [BatchItem { seq: &mut fresh, tokens: &b }]).expect("fresh");
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(bits(g), bits(w), "forked at {n}");
            }
        }
        assert!(first.fork_prefix(a.len() + 1).is_none(), "more tokens than held");
    }
}
