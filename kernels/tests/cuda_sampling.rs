//! The device sampler (`kernels/cuda/sampling.cu`) on the CPU emulator against the
//! canonical host sampler (`sampling::sample`): the same token for every row, parameter
//! mix, seed and step — greedy and sampled, ties, infinities and NaN, SmolLM2's
//! vocabulary of 49,152 and odd sizes — and whole generations through
//! `Backend::forward_sample` token for token with the CPU backend.

use std::sync::Arc;

use sampo_kernels::cuda::emu::{EmuDevice, Fault};
use sampo_kernels::cuda::{CudaBackend, Kernel};
use sampo_kernels::gguf::GgufFile;
use sampo_kernels::sampling::{self, SamplingError};
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, KernelError, Model, SamplingParams, Sequence};

/// SmolLM2's vocabulary size.
const SMOLLM2_VOCAB: usize = 49_152;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Rows of logits of the shapes a sampler meets, `vocab` wide.
fn logit_rows(vocab: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Rng(seed);
    let mut rows = Vec::new();
    // Like a model's: a bell around 0, a few strong candidates.
    let mut model: Vec<f32> = (0..vocab).map(|_| 4.0 * (rng.unit() + rng.unit())).collect();
    for _ in 0..8.min(vocab) {
        let i = (rng.next() % vocab as u64) as usize;
        model[i] = 12.0 + 4.0 * rng.unit();
    }
    rows.push(("model-like", model));
    // Coarse values: long runs of equal logits, so ties decide the order; +0 and -0.
    rows.push((
        "ties",
        (0..vocab)
            .map(|_| match rng.next() % 7 {
                0 => 0.0,
                1 => -0.0,
                2 => 1.5,
                3 => 1.5,
                4 => -2.0,
                _ => ((rng.next() % 9) as f32) * 0.25,
            })
            .collect(),
    ));
    // -inf for most tokens (a mask), NaN here and there.
    rows.push((
        "masked",
        (0..vocab)
            .map(|i| match rng.next() % 10 {
                0..=6 => f32::NEG_INFINITY,
                7 => f32::NAN,
                _ => (i % 13) as f32 * 0.5,
            })
            .collect(),
    ));
    // Degenerate: nothing but -inf (every weight is NaN), and +inf present.
    rows.push(("all -inf", vec![f32::NEG_INFINITY; vocab]));
    let mut inf = rows[0].1.clone();
    inf[(rng.next() % vocab as u64) as usize] = f32::INFINITY;
    inf[(rng.next() % vocab as u64) as usize] = f32::INFINITY;
    rows.push(("+inf", inf));
    // Wide range: tiny and huge magnitudes, both signs (weights underflow to 0).
    rows.push(("wide", (0..vocab).map(|_| rng.unit() * 10f32.powi((rng.next() % 9) as i32 - 3)).collect()));
    rows
}

/// Parameter mixes: greedy, temperatures tiny to the maximum, top_k 0 / 1 / some /
/// vocab - 1 / beyond the vocabulary, top_p tiny to 1.
fn param_mixes(vocab: usize, rng: &mut Rng) -> Vec<SamplingParams> {
    let mut out = vec![SamplingParams::default()];
    let temps = [1e-3f32, 0.7, 1.0, 100.0];
    let top_ks = [0usize, 1, 40, vocab.saturating_sub(1), vocab + 5];
    let top_ps = [1e-6f32, 0.5, 0.9, 1.0];
    for &temperature in &temps {
        for &top_k in &top_ks {
            for &top_p in &top_ps {
                out.push(SamplingParams { temperature, top_k, top_p, seed: rng.next(), ..SamplingParams::default() });
            }
        }
    }
    out
}

fn emu() -> CudaBackend<EmuDevice> {
    CudaBackend::new(EmuDevice::new())
}

/// Every row under every parameter mix, one device call for all of them (several
/// launches of 32 rows), against the host sampler.
fn check_vocab(vocab: usize, seed: u64, steps: &[u64]) {
    let gpu = emu();
    let mut rng = Rng(seed ^ 0xABCD);
    let rows = logit_rows(vocab, seed);
    let mixes = param_mixes(vocab, &mut rng);
    let mut logits = Vec::new();
    let mut params: Vec<(&SamplingParams, u64)> = Vec::new();
    let mut what = Vec::new();
    for (name, row) in &rows {
        for (m, p) in mixes.iter().enumerate() {
            let step = steps[m % steps.len()];
            logits.extend_from_slice(row);
            params.push((p, step));
            what.push((*name, p, step));
        }
    }
    let want: Vec<u32> =
        params.iter().enumerate().map(|(i, &(p, s))| sampling::sample(&logits[i * vocab..][..vocab], p, s)).collect();
    let got = gpu.sample_logits(&logits, vocab, &params).expect("device sampler");
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "vocab {vocab}, {} logits, {:?}, step {}", what[i].0, what[i].1, what[i].2);
    }
}

#[test]
fn device_sampler_is_the_host_sampler_on_smollm2_sized_rows() {
    check_vocab(SMOLLM2_VOCAB, 1, &[0, 1, 17, u64::MAX]);
}

#[test]
fn device_sampler_is_the_host_sampler_on_odd_sizes() {
    for (k, vocab) in [1usize, 2, 3, 31, 33, 257, 1000, 4097].into_iter().enumerate() {
        check_vocab(vocab, 100 + k as u64, &[0, 5, 1 << 40]);
    }
}

#[test]
fn device_draws_follow_the_host_over_many_seeds_and_steps() {
    // One row, many (seed, step) pairs: the draw, not only the candidate set, must agree.
    let vocab = 3001;
    let gpu = emu();
    let row = &logit_rows(vocab, 9)[0].1;
    let mixes: Vec<SamplingParams> = (0..8u64)
        .map(|seed| SamplingParams {
            temperature: [0.5, 1.0, 2.0, 0.9][seed as usize % 4],
            top_k: [0, 50][seed as usize % 2],
            top_p: [1.0, 0.95, 0.8][seed as usize % 3],
            seed: seed.wrapping_mul(0x1234_5678_9ABC_DEF1),
            ..SamplingParams::default()
        })
        .collect();
    let params: Vec<(&SamplingParams, u64)> = mixes.iter().flat_map(|p| (0..32u64).map(move |s| (p, s))).collect();
    let logits: Vec<f32> = params.iter().flat_map(|_| row.iter().copied()).collect();
    let got = gpu.sample_logits(&logits, vocab, &params).expect("device sampler");
    let want: Vec<u32> = params.iter().map(|&(p, s)| sampling::sample(row, p, s)).collect();
    assert_eq!(got, want);
    // The draws differ across steps: the test sees the RNG, not one fixed token.
    let distinct: std::collections::BTreeSet<u32> = got.iter().copied().collect();
    assert!(distinct.len() > 10, "only {} distinct tokens", distinct.len());
}

fn synth() -> Arc<Model> {
    let spec = SynthSpec { n_ctx: 256, ..SynthSpec::default() };
    Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model"))
}

fn tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 7919 + seed * 104_729 + 3) % model.hp.n_vocab as u64) as u32).collect()
}

/// Generate with `forward_sample` alone, decoding `params.len()` sequences in lockstep.
fn generate(
    backend: &dyn Backend,
    m: &Model,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    n: usize,
) -> Vec<Vec<u32>> {
    let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::new(m)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..n {
        let ps: Vec<(&SamplingParams, u64)> = params.iter().zip(&out).map(|(p, o)| (p, o.len() as u64)).collect();
        let mut batch: Vec<BatchItem<'_>> =
            seqs.iter_mut().zip(&feed).map(|(seq, t)| BatchItem { seq, tokens: t }).collect();
        let ids = backend.forward_sample(m, &mut batch, &ps).expect("forward_sample");
        for ((o, f), id) in out.iter_mut().zip(&mut feed).zip(ids) {
            o.push(id);
            *f = vec![id];
        }
    }
    out
}

#[test]
fn generation_through_forward_sample_is_the_cpu_tokens() {
    let m = synth();
    let cpu = CpuBackend::new(1).expect("cpu");
    let prompts = vec![tokens(&m, 9, 1), tokens(&m, 3, 2), tokens(&m, 17, 3), tokens(&m, 5, 4)];
    let params = vec![
        SamplingParams::default(),
        SamplingParams { temperature: 0.8, top_p: 0.9, seed: 7, ..SamplingParams::default() },
        SamplingParams { temperature: 1.3, top_k: 5, seed: 8, ..SamplingParams::default() },
        SamplingParams { temperature: 50.0, seed: 9, ..SamplingParams::default() },
    ];
    let want = generate(&cpu, &m, &prompts, &params, 14);
    // Graphs and direct launches; prompts longer than a pass (logits of one batch
    // sampled after different passes).
    for gpu in [emu(), emu().without_graphs().with_max_rows(7)] {
        let got = generate(&gpu, &m, &prompts, &params, 14);
        assert_eq!(got, want);
    }
    // The host path of the default method is the engine's own generation.
    let engine = Engine::new(m.clone(), Arc::new(CpuBackend::new(1).expect("cpu")));
    let reqs: Vec<(Vec<u32>, SamplingParams)> =
        prompts.iter().cloned().zip(params.iter().map(|p| SamplingParams { max_tokens: 14, ..p.clone() })).collect();
    let gens = engine.generate_batch(&reqs, &mut |_, _, _| true).expect("engine");
    for (g, w) in gens.iter().zip(&want) {
        assert_eq!(&g.tokens, w);
    }
}

#[test]
fn engine_generation_on_the_emulated_device_sampler_is_the_cpu_tokens() {
    let m = synth();
    let cpu = Engine::new(m.clone(), Arc::new(CpuBackend::new(2).expect("cpu")));
    let gpu = Engine::new(m.clone(), Arc::new(emu()));
    let requests = vec![
        (
            tokens(&m, 6, 11),
            SamplingParams {
                temperature: 0.7,
                top_k: 20,
                top_p: 0.95,
                seed: 3,
                max_tokens: 10,
                ..SamplingParams::default()
            },
        ),
        (tokens(&m, 2, 12), SamplingParams { max_tokens: 6, ..SamplingParams::default() }),
        (
            tokens(&m, 11, 13),
            SamplingParams { temperature: 1.0, seed: u64::MAX, max_tokens: 12, ..SamplingParams::default() },
        ),
    ];
    let want = cpu.generate_batch(&requests, &mut |_, _, _| true).expect("cpu");
    let got = gpu.generate_batch(&requests, &mut |_, _, _| true).expect("emulated cuda");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g.tokens, w.tokens);
        assert_eq!(g.finish, w.finish);
    }
    // The engine's tokens come from the device sampler: a device whose sampler writes
    // a corrupt id (its sign bit flipped) fails generation with a typed error.
    let faulty = CudaBackend::new(EmuDevice::with_fault(Fault { kernel: Kernel::SampleRows, arg: 2 }));
    let err = Engine::new(m.clone(), Arc::new(faulty))
        .generate_batch(&requests, &mut |_, _, _| true)
        .expect_err("a corrupt id must not pass");
    assert!(err.to_string().contains("sample_rows") && err.to_string().contains("chose token"), "{err}");
}

#[test]
fn bad_parameters_are_the_hosts_typed_errors_and_nothing_runs() {
    let m = synth();
    let cpu = CpuBackend::new(1).expect("cpu");
    let gpu = emu();
    let bad = [
        (SamplingParams { temperature: -1.0, ..SamplingParams::default() }, SamplingError::Temperature(-1.0)),
        (SamplingParams { temperature: 101.0, ..SamplingParams::default() }, SamplingError::Temperature(101.0)),
        (SamplingParams { top_p: 0.0, ..SamplingParams::default() }, SamplingError::TopP(0.0)),
        (SamplingParams { top_p: 1.5, ..SamplingParams::default() }, SamplingError::TopP(1.5)),
    ];
    let ok = SamplingParams::default();
    let prompt = tokens(&m, 4, 1);
    for (p, want) in &bad {
        for backend in [&cpu as &dyn Backend, &gpu] {
            let mut a = Sequence::new(&m);
            let mut b = Sequence::new(&m);
            let mut batch = [BatchItem { seq: &mut a, tokens: &prompt }, BatchItem { seq: &mut b, tokens: &prompt }];
            let err = backend.forward_sample(&m, &mut batch, &[(&ok, 0), (p, 0)]).expect_err("bad parameters");
            match err {
                KernelError::Sampling(e) => assert_eq!(&e, want, "{:?}", backend.kind()),
                other => panic!("{:?}: {other}", backend.kind()),
            }
            assert_eq!((a.pos, b.pos), (0, 0), "{:?}: nothing may run on bad parameters", backend.kind());
        }
        let err = gpu.sample_logits(&[0.0, 1.0], 2, &[(p, 0)]).expect_err("bad parameters");
        assert!(matches!(&err, KernelError::Sampling(e) if e == want), "{err}");
    }
    // NaN: its own message (NaN != NaN, so compare the text).
    let nan = SamplingParams { temperature: f32::NAN, ..SamplingParams::default() };
    for backend in [&cpu as &dyn Backend, &gpu] {
        let mut a = Sequence::new(&m);
        let err = backend
            .forward_sample(&m, &mut [BatchItem { seq: &mut a, tokens: &prompt }], &[(&nan, 0)])
            .expect_err("NaN temperature");
        assert_eq!(err.to_string(), "temperature NaN must be a finite number in [0, 100]");
    }
    // One parameter set per sequence.
    for backend in [&cpu as &dyn Backend, &gpu] {
        let mut a = Sequence::new(&m);
        let err = backend
            .forward_sample(&m, &mut [BatchItem { seq: &mut a, tokens: &prompt }], &[(&ok, 0), (&ok, 1)])
            .expect_err("two parameter sets for one sequence");
        assert!(matches!(err, KernelError::Sampling(SamplingError::BatchMismatch { params: 2, items: 1 })), "{err}");
        assert_eq!(a.pos, 0);
    }
    let err = gpu.sample_logits(&[0.0; 5], 2, &[(&ok, 0), (&ok, 0)]).expect_err("5 logits are not rows of 2");
    assert!(matches!(err, KernelError::Sampling(SamplingError::BatchMismatch { .. })), "{err}");
}
