//! The CUDA backend on a real GPU against the CPU backend, on the real SmolLM2 model:
//! every logit the same bits, the same tokens, in single and batched (8-stream) decode.
//! Where no driver or device exists this checks that the reason is typed and stops —
//! unless `SAMPO_REQUIRE_CUDA=1`, as on the lent GPU machines, where that is a failure.

mod common;
mod sampling_cases;

use std::sync::Arc;
use std::time::Instant;

use common::{ids, real_model, reference};
use sampo_kernels::cuda::backend::GpuBackend;
use sampo_kernels::cuda::{CudaOptions, known_answer_test};
use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, SamplingParams, Sequence};

fn gpu() -> Option<Arc<GpuBackend>> {
    let required = std::env::var_os("SAMPO_REQUIRE_CUDA").is_some_and(|v| v == "1");
    if let Err(why) = sampo_kernels::cuda::detect::probe() {
        assert!(!required, "SAMPO_REQUIRE_CUDA=1 but: {why}");
        eprintln!("no GPU here ({why}); the GPU checks run on a machine with one");
        return None;
    }
    let cache = std::env::temp_dir().join("sampo-test-ptx");
    Some(GpuBackend::open(&CudaOptions { nvrtc: None, ptx_cache: Some(cache) }).expect("open the GPU backend"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn reference_prompts_give_the_cpu_bits_and_tokens() {
    let Some(gpu) = gpu() else { return };
    let m = real_model();
    let cpu = Engine::new(m.clone(), Arc::new(CpuBackend::new(0).expect("cpu")));
    let dev = Engine::new(m.clone(), gpu.clone());
    for case in reference()["greedy"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(bits(&dev.logits(&prompt).expect("gpu")), bits(&cpu.logits(&prompt).expect("cpu")), "{case}");
        let p = SamplingParams { max_tokens: 32, ..Default::default() };
        let want = cpu.generate(&prompt, &p, &mut |_, _| true).expect("cpu");
        let got = dev.generate(&prompt, &p, &mut |_, _| true).expect("gpu");
        assert_eq!(got.tokens, want.tokens, "{}", case["prompt"]);
        eprintln!("{:?} -> {:?}", case["prompt"].as_str(), got.text);
    }
    eprintln!("graphs: {:?}", gpu.graph_stats());
}

#[test]
fn eight_streams_batched_are_the_cpu_tokens() {
    let Some(gpu) = gpu() else { return };
    let m = real_model();
    let cpu = Engine::new(m.clone(), Arc::new(CpuBackend::new(0).expect("cpu")));
    let dev = Engine::new(m.clone(), gpu.clone());
    let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..8)
        .map(|i| {
            let text = format!("Question {i}: name a colour and a number.");
            let p = SamplingParams { temperature: 0.7, top_p: 0.9, seed: i, max_tokens: 24, ..Default::default() };
            (m.tokenizer.encode(&text, true), p)
        })
        .collect();
    let want = cpu.generate_batch(&reqs, &mut |_, _, _| true).expect("cpu");
    let got = dev.generate_batch(&reqs, &mut |_, _, _| true).expect("gpu");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g.tokens, w.tokens);
    }
    assert!(gpu.graph_stats().replayed > 0, "{:?}", gpu.graph_stats());
}

#[test]
fn known_answer_self_test_passes_and_reports_the_device() {
    let Some(gpu) = gpu() else { return };
    let m = real_model();
    let ka = known_answer_test(&*gpu, &m).expect("self-test");
    let status = gpu.device_status().expect("a GPU reports itself");
    assert!(status.memory_total_bytes > 0 && status.memory_free_bytes > 0, "{status:?}");
    eprintln!("{status:?}; known answer {ka:?}; kernels {:?}", gpu.device_handle().build);
    // A long prompt spans passes and grows the cache; still the CPU's bits.
    let text = "The printing press changed how books were made. ".repeat(60);
    let prompt = m.tokenizer.encode(&text, true);
    assert!(prompt.len() > 256);
    let (mut a, mut b) = (Sequence::new(&m), Sequence::new(&m));
    let cpu = CpuBackend::new(0).expect("cpu");
    let want = cpu.forward(&m, &mut [BatchItem { seq: &mut a, tokens: &prompt }]).expect("cpu");
    let got = gpu.forward(&m, &mut [BatchItem { seq: &mut b, tokens: &prompt }]).expect("gpu");
    assert_eq!(bits(&got[0]), bits(&want[0]));
}

#[test]
fn gemma3_gives_the_cpu_bits_past_the_sliding_window() {
    let Some(gpu) = gpu() else { return };
    let m = common::gemma3_model();
    let ka = known_answer_test(&*gpu, &m).expect("Gemma 3 self-test");
    eprintln!("Gemma 3 known answer {ka:?}");
    // Past the local layers' 512-position window, over several passes of 256 rows.
    let text = "The printing press changed how books were made. ".repeat(70);
    let prompt = m.tokenizer.encode(&text, true);
    assert!(prompt.len() > m.hp.sliding_window + 256, "{} tokens", prompt.len());
    let (mut a, mut b) = (Sequence::new(&m), Sequence::new(&m));
    let cpu = CpuBackend::new(0).expect("cpu");
    let want = cpu.forward(&m, &mut [BatchItem { seq: &mut a, tokens: &prompt }]).expect("cpu");
    let got = gpu.forward(&m, &mut [BatchItem { seq: &mut b, tokens: &prompt }]).expect("gpu");
    assert_eq!(bits(&got[0]), bits(&want[0]));
    // Decode steps after it (graph capture, then replay).
    for t in [236761u32, 1018, 506] {
        let want = cpu.forward(&m, &mut [BatchItem { seq: &mut a, tokens: &[t] }]).expect("cpu");
        let got = gpu.forward(&m, &mut [BatchItem { seq: &mut b, tokens: &[t] }]).expect("gpu");
        assert_eq!(bits(&got[0]), bits(&want[0]), "decode at position {}", b.pos);
    }
}

#[test]
fn device_sampler_is_the_host_sampler() {
    let Some(gpu) = gpu() else { return };
    // Every vocabulary is checked before a failure is reported: which ones fail says
    // more about a device-only fault than the first does.
    let mut failed = Vec::new();
    let mut check = |vocab: usize, seed: u64, steps: &[u64]| {
        let steps = steps.to_vec();
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sampling_cases::check_vocab(&*gpu, vocab, seed, &steps)
        })) {
            failed.push((vocab, e.downcast_ref::<String>().map(|s| s.chars().take(400).collect::<String>())));
        }
    };
    check(sampling_cases::SMOLLM2_VOCAB, 1, &[0, 1, 17, u64::MAX]);
    for (k, vocab) in [1usize, 2, 3, 31, 33, 257, 1000, 4097].into_iter().enumerate() {
        check(vocab, 100 + k as u64, &[0, 5, 1 << 40]);
    }
    assert!(failed.is_empty(), "{failed:#?}");
    // For the record, not asserted: the sampler's time per row of SmolLM2's width
    // (upload of the logits included), greedy and over the whole vocabulary.
    let vocab = sampling_cases::SMOLLM2_VOCAB;
    let row = &sampling_cases::logit_rows(vocab, 3)[0].1;
    let logits: Vec<f32> = (0..64).flat_map(|_| row.iter().copied()).collect();
    for p in [
        SamplingParams::default(),
        SamplingParams { temperature: 0.7, top_k: 40, ..Default::default() },
        SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() },
    ] {
        let params: Vec<(&SamplingParams, u64)> = (0..64).map(|s| (&p, s)).collect();
        gpu.sample_logits(&logits, vocab, &params).expect("warm-up");
        let t = Instant::now();
        let ids = gpu.sample_logits(&logits, vocab, &params).expect("device sampler");
        let per_row = t.elapsed().as_secs_f64() * 1e3 / 64.0;
        let want: Vec<u32> = params.iter().map(|&(p, s)| sampo_kernels::sampling::sample(row, p, s)).collect();
        assert_eq!(ids, want);
        eprintln!("device sampler, vocab {vocab}, {p:?}: {per_row:.3} ms per row (64 rows a call)");
    }
}
