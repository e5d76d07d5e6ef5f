//! The device sampler (`kernels/cuda/sampling.cu`) on the CPU emulator against the
//! canonical host sampler (`sampling::sample`): the same token for every row, parameter
//! mix, seed and step — greedy and sampled, ties, infinities and NaN, SmolLM2's
//! vocabulary of 49,152 and odd sizes — and whole generations through
//! `Backend::forward_sample` token for token with the CPU backend.

mod sampling_cases;

use std::sync::Arc;

use sampling_cases::{SMOLLM2_VOCAB, check_vocab, logit_rows};

use sampo_kernels::cuda::emu::{EmuDevice, Fault};
use sampo_kernels::cuda::{CudaBackend, Kernel};
use sampo_kernels::gguf::GgufFile;
use sampo_kernels::sampling::{self, SamplingError};
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, KernelError, Model, SamplingParams, Sequence};

fn emu() -> CudaBackend<EmuDevice> {
    CudaBackend::new(EmuDevice::new())
}

#[test]
fn device_sampler_is_the_host_sampler_on_smollm2_sized_rows() {
    check_vocab(&emu(), SMOLLM2_VOCAB, 1, &[0, 1, 17, u64::MAX]);
}

#[test]
fn device_sampler_is_the_host_sampler_on_odd_sizes() {
    for (k, vocab) in [1usize, 2, 3, 31, 33, 257, 1000, 4097].into_iter().enumerate() {
        check_vocab(&emu(), vocab, 100 + k as u64, &[0, 5, 1 << 40]);
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
