//! The CUDA backend — its host code and the very kernel sources the GPU runs — on the
//! CPU emulator of the CUDA execution model (no GPU needed), against the CPU backend:
//! every logit must be the same bits. The GPU itself runs the same checks in
//! `cuda_gpu.rs`.

mod common;

use std::sync::Arc;

use sampo_kernels::cuda::emu::{EmuDevice, Fault, FaultWhen};
use sampo_kernels::cuda::{CudaBackend, CudaError, Kernel, known_answer_test};
use sampo_kernels::gguf::{GgmlType, GgufFile};
use sampo_kernels::synth::{SynthArch, SynthSpec, synthesize};
use sampo_kernels::{Backend, BatchItem, CpuBackend, Engine, Model, ModelError, SamplingParams, Sequence};

fn synth() -> Arc<Model> {
    let spec = SynthSpec { n_ctx: 256, ..SynthSpec::default() };
    Arc::new(Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 7919 + seed * 104_729 + 3) % model.hp.n_vocab as u64) as u32).collect()
}

#[test]
fn prefill_logits_are_the_cpu_bits() {
    let m = synth();
    let cpu = CpuBackend::new(1).expect("cpu");
    let gpu = CudaBackend::new(EmuDevice::new());
    for len in [1usize, 5, 33] {
        let p = tokens(&m, len, len as u64);
        let mut s1 = Sequence::new(&m);
        let mut s2 = Sequence::new(&m);
        let want = cpu.forward(&m, &mut [BatchItem { seq: &mut s1, tokens: &p }]).expect("cpu");
        let got = gpu.forward(&m, &mut [BatchItem { seq: &mut s2, tokens: &p }]).expect("emulated cuda");
        assert_eq!(bits(&got[0]), bits(&want[0]), "prompt of {len} tokens");
        assert_eq!(s2.pos, len);
    }
}

#[test]
fn batched_generation_with_graph_replay_is_the_cpu_tokens() {
    let m = synth();
    let cpu = Engine::new(m.clone(), Arc::new(CpuBackend::new(2).expect("cpu")));
    let backend = Arc::new(CudaBackend::new(EmuDevice::new()));
    let gpu = Engine::new(m.clone(), backend.clone());
    let greedy = |n| SamplingParams { max_tokens: n, ..SamplingParams::default() };
    let sampled = SamplingParams { temperature: 0.8, top_p: 0.9, seed: 7, max_tokens: 12, ..SamplingParams::default() };
    let requests = vec![(tokens(&m, 9, 1), greedy(12)), (tokens(&m, 3, 2), sampled), (tokens(&m, 17, 3), greedy(5))];
    let want = cpu.generate_batch(&requests, &mut |_, _, _| true).expect("cpu");
    let got = gpu.generate_batch(&requests, &mut |_, _, _| true).expect("emulated cuda");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g.tokens, w.tokens);
        assert_eq!(g.finish, w.finish);
    }
    let stats = backend.graph_stats();
    // Decode batches of 3 (then 2 once the short request ends): captured once each, replayed every step.
    assert!(stats.captured >= 1 && stats.replayed > stats.captured, "{stats:?}");
    assert_eq!(stats.direct_passes, 1, "the prefill runs directly: {stats:?}");
}

#[test]
fn graph_replay_equals_direct_launches() {
    let m = synth();
    let graphs = CudaBackend::new(EmuDevice::new());
    let direct = CudaBackend::new(EmuDevice::new()).without_graphs();
    let mut a = [Sequence::new(&m), Sequence::new(&m)];
    let mut b = [Sequence::new(&m), Sequence::new(&m)];
    let prompts = [tokens(&m, 4, 5), tokens(&m, 6, 6)];
    for step in 0..4 {
        let toks: Vec<Vec<u32>> = if step == 0 { prompts.to_vec() } else { vec![vec![step * 3], vec![step * 5]] };
        let [a0, a1] = &mut a;
        let [b0, b1] = &mut b;
        let x = graphs
            .forward(&m, &mut [BatchItem { seq: a0, tokens: &toks[0] }, BatchItem { seq: a1, tokens: &toks[1] }])
            .expect("graphs");
        let y = direct
            .forward(&m, &mut [BatchItem { seq: b0, tokens: &toks[0] }, BatchItem { seq: b1, tokens: &toks[1] }])
            .expect("direct");
        assert_eq!(x.iter().map(|v| bits(v)).collect::<Vec<_>>(), y.iter().map(|v| bits(v)).collect::<Vec<_>>());
    }
    assert_eq!(graphs.graph_stats().captured, 1);
    assert_eq!(graphs.graph_stats().replayed, 3);
    assert_eq!(direct.graph_stats().replayed, 0);
}

#[test]
fn multi_pass_prompts_and_cache_growth_keep_the_bits() {
    let m = synth();
    let cpu = CpuBackend::new(1).expect("cpu");
    // Five rows per pass: a 23-token prompt takes five passes; the cache starts at 64
    // positions and must grow (copying what it holds) as decoding passes them.
    let gpu = CudaBackend::new(EmuDevice::new()).with_max_rows(5);
    let p = tokens(&m, 60, 9);
    let mut c = Sequence::new(&m);
    let mut g = Sequence::new(&m);
    let want = cpu.forward(&m, &mut [BatchItem { seq: &mut c, tokens: &p[..23] }]).expect("cpu");
    let got = gpu.forward(&m, &mut [BatchItem { seq: &mut g, tokens: &p[..23] }]).expect("cuda");
    assert_eq!(bits(&got[0]), bits(&want[0]));
    let want = cpu.forward(&m, &mut [BatchItem { seq: &mut c, tokens: &p[23..] }]).expect("cpu");
    let got = gpu.forward(&m, &mut [BatchItem { seq: &mut g, tokens: &p[23..] }]).expect("cuda");
    assert_eq!(bits(&got[0]), bits(&want[0]));
    for t in 0..8u32 {
        let want = cpu.forward(&m, &mut [BatchItem { seq: &mut c, tokens: &[t] }]).expect("cpu");
        let got = gpu.forward(&m, &mut [BatchItem { seq: &mut g, tokens: &[t] }]).expect("cuda");
        assert_eq!(bits(&got[0]), bits(&want[0]), "decode step {t} at position {}", g.pos);
    }
    assert_eq!(g.pos, 68);
}

#[test]
fn known_answer_passes_and_a_faulty_device_is_refused() {
    let m = synth();
    let good = CudaBackend::new(EmuDevice::new());
    let ok = known_answer_test(&good, &m).expect("a correct device passes");
    assert!(ok.logits_compared >= 6 * m.hp.n_vocab, "{ok:?}");
    // Same device, same digest: the answer is a property of the model, not of the run.
    let again = known_answer_test(&CudaBackend::new(EmuDevice::new()), &m).expect("again");
    assert_eq!(ok.digest, again.digest);
    // A device whose Q4_1 matrix product flips one sign (argument 1 is the first output).
    let q4_1 = Kernel::matmul_q(GgmlType::Q4_1).expect("Q4_1 kernel");
    let bad = CudaBackend::new(EmuDevice::with_fault(Fault { kernel: q4_1, arg: 1 }));
    match known_answer_test(&bad, &m) {
        Err(CudaError::SelfTest(why)) => assert!(why.contains("logit"), "{why}"),
        other => panic!("a faulty device must fail the self-test: {other:?}"),
    }
}

#[test]
fn known_answer_covers_long_prompts_cache_growth_and_the_graphs_the_server_replays() {
    let m = synth();
    let ok = known_answer_test(&CudaBackend::new(EmuDevice::new()), &m).expect("a correct device passes");
    // A prefill of 5 prompts, 2 decode steps of the 5, 2 decode steps of one.
    assert_eq!(ok.logits_compared, 17 * m.hp.n_vocab, "{ok:?}");
    // Attention wrong only past position 64 (its second pass of 32 lanes, and the
    // cache grown past its first 64 positions): positions a short prompt never reaches.
    let late = Fault { kernel: Kernel::Attention, arg: 5 };
    let bad = CudaBackend::new(EmuDevice::with_fault_when(late, FaultWhen::PositionAbove { pos_arg: 4, pos: 64 }));
    match known_answer_test(&bad, &m) {
        Err(CudaError::SelfTest(why)) => assert!(why.contains("logit"), "{why}"),
        other => panic!("a fault past position 64 must fail the self-test: {other:?}"),
    }
    // Wrong only when the graph of a single sequence is replayed: what a server
    // decoding one stream runs at every step.
    let single = CudaBackend::new(EmuDevice::with_fault_when(late, FaultWhen::Replay { rows: 1 }));
    match known_answer_test(&single, &m) {
        Err(CudaError::SelfTest(why)) => assert!(why.contains("logit"), "{why}"),
        other => panic!("a fault in the batch-of-1 graph must fail the self-test: {other:?}"),
    }
    // …and in the graph of five.
    let five = CudaBackend::new(EmuDevice::with_fault_when(late, FaultWhen::Replay { rows: 5 }));
    assert!(matches!(known_answer_test(&five, &m), Err(CudaError::SelfTest(_))));
    // Without graphs, the replay-only fault never strikes: the self-test passes and
    // finds the same answer.
    let direct = CudaBackend::new(EmuDevice::with_fault_when(late, FaultWhen::Replay { rows: 1 })).without_graphs();
    assert_eq!(known_answer_test(&direct, &m).expect("no replay, no fault").digest, ok.digest);
}

#[test]
fn bad_input_is_a_typed_error_and_sequences_stay_on_their_backend() {
    let m = synth();
    let gpu = CudaBackend::new(EmuDevice::new());
    let cpu = CpuBackend::new(1).expect("cpu");
    let mut s = Sequence::new(&m);
    let bad = [m.hp.n_vocab as u32];
    let err = gpu.forward(&m, &mut [BatchItem { seq: &mut s, tokens: &bad }]).expect_err("out of range");
    assert!(matches!(err, ModelError::TokenOutOfRange { .. }), "{err}");
    let err = gpu.forward(&m, &mut [BatchItem { seq: &mut s, tokens: &[] }]).expect_err("empty");
    assert!(matches!(err, ModelError::EmptyInput), "{err}");
    let too_long = vec![1u32; m.hp.n_ctx + 1];
    let err = gpu.forward(&m, &mut [BatchItem { seq: &mut s, tokens: &too_long }]).expect_err("too long");
    assert!(matches!(err, ModelError::ContextFull { .. }), "{err}");
    assert_eq!(s.pos, 0, "refused input changes nothing");
    // A sequence begun on the CPU cannot continue on the device, nor the reverse.
    let mut on_cpu = Sequence::new(&m);
    cpu.forward(&m, &mut [BatchItem { seq: &mut on_cpu, tokens: &[1, 2] }]).expect("cpu");
    let err = gpu.forward(&m, &mut [BatchItem { seq: &mut on_cpu, tokens: &[3] }]).expect_err("foreign");
    assert!(matches!(err, ModelError::Device(_)), "{err}");
    let mut on_gpu = Sequence::new(&m);
    gpu.forward(&m, &mut [BatchItem { seq: &mut on_gpu, tokens: &[1, 2] }]).expect("gpu");
    let err = cpu.forward(&m, &mut [BatchItem { seq: &mut on_gpu, tokens: &[3] }]).expect_err("foreign");
    assert!(matches!(err, ModelError::Device(_)), "{err}");
    // …nor on another device backend.
    let other = CudaBackend::new(EmuDevice::new());
    let err = other.forward(&m, &mut [BatchItem { seq: &mut on_gpu, tokens: &[3] }]).expect_err("foreign");
    assert!(matches!(err, ModelError::Device(_)), "{err}");
}

#[test]
fn float_weights_and_embeddings_follow_the_cpu() {
    use sampo_kernels::cuda::device::{Arg, Device, Shape, bytes_of, bytes_of_mut};
    use sampo_kernels::math::dot_f32;
    use sampo_kernels::quant::{dequantize_row, quantize_row};
    let dev = EmuDevice::new();
    let (rows, cols) = (6usize, 96usize);
    let vals: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
    let x: Vec<f32> = (0..cols).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021).collect();
    let buf = |bytes: &[u8]| {
        let b = dev.alloc(bytes.len()).expect("alloc");
        dev.upload(dev.addr(&b), bytes).expect("upload");
        b
    };
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let w: Vec<u8> = vals.chunks(cols).flat_map(|r| quantize_row(ty, r)).collect();
        let row_bytes = w.len() / rows;
        let (wb, xb) = (buf(&w), buf(bytes_of(&x)));
        // Embedding of rows 4 and 1.
        let toks = buf(bytes_of(&[4u32, 1]));
        let out = dev.alloc(2 * cols * 4).expect("alloc");
        dev.launch(
            Kernel::Embed,
            Shape::new((1, 2), 128),
            &[
                Arg::Ptr(dev.addr(&wb)),
                Arg::I32(ty.to_u32() as i32),
                Arg::I32(row_bytes as i32),
                Arg::Ptr(dev.addr(&toks)),
                Arg::Ptr(dev.addr(&out)),
                Arg::I32(cols as i32),
                Arg::I32(2),
                Arg::I32(0),
                Arg::F32(1.0),
            ],
        )
        .expect("embed");
        let mut got = vec![0f32; 2 * cols];
        dev.download(dev.addr(&out), bytes_of_mut(&mut got)).expect("download");
        for (k, r) in [4usize, 1].into_iter().enumerate() {
            let mut want = vec![0f32; cols];
            dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut want);
            assert_eq!(bits(&got[k * cols..(k + 1) * cols]), bits(&want), "{ty} embedding row {r}");
        }
        if ty.block_len() == 1 {
            let out = dev.alloc(rows * 4).expect("alloc");
            dev.launch(
                Kernel::MatmulF,
                Shape::new((2, 1), 128),
                &[
                    Arg::Ptr(dev.addr(&wb)),
                    Arg::I32(ty.to_u32() as i32),
                    Arg::I32(rows as i32),
                    Arg::I32(cols as i32),
                    Arg::I32(row_bytes as i32),
                    Arg::Ptr(dev.addr(&xb)),
                    Arg::Ptr(dev.addr(&out)),
                    Arg::I32(1),
                ],
            )
            .expect("matmul_f");
            let mut got = vec![0f32; rows];
            dev.download(dev.addr(&out), bytes_of_mut(&mut got)).expect("download");
            for (r, g) in got.iter().enumerate() {
                let mut wr = vec![0f32; cols];
                dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut wr);
                assert_eq!(g.to_bits(), dot_f32(&wr, &x).to_bits(), "{ty} row {r}");
            }
        }
    }
}

#[test]
fn real_model_on_the_emulator_is_the_cpu_bits() {
    // SmolLM2's shapes (GQA 9/3 heads, 49152-token head, 30 layers) through the very
    // kernels the GPU runs: a prefill of two sequences and one batched decode step.
    let m = common::real_model();
    let cpu = CpuBackend::new(2).expect("cpu");
    let gpu = CudaBackend::new(EmuDevice::new());
    let t0 = std::time::Instant::now();
    let prompts = [m.tokenizer.encode("The capital of France is", true), m.tokenizer.encode("2+2=", true)];
    let mut c = [Sequence::new(&m), Sequence::new(&m)];
    let mut g = [Sequence::new(&m), Sequence::new(&m)];
    for step in 0..2u32 {
        let toks: Vec<Vec<u32>> = if step == 0 { prompts.to_vec() } else { vec![vec![28], vec![29]] };
        let [c0, c1] = &mut c;
        let [g0, g1] = &mut g;
        let want = cpu
            .forward(&m, &mut [BatchItem { seq: c0, tokens: &toks[0] }, BatchItem { seq: c1, tokens: &toks[1] }])
            .expect("cpu");
        let got = gpu
            .forward(&m, &mut [BatchItem { seq: g0, tokens: &toks[0] }, BatchItem { seq: g1, tokens: &toks[1] }])
            .expect("emulated cuda");
        for k in 0..2 {
            assert_eq!(bits(&got[k]), bits(&want[k]), "step {step}, sequence {k}");
        }
    }
    eprintln!("real model on the emulator: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Every block type with the byte offsets of its f16 fields.
const BLOCK_TYPES: [(GgmlType, &[usize]); 10] = [
    (GgmlType::Q4_0, &[0]),
    (GgmlType::Q4_1, &[0, 2]),
    (GgmlType::Q5_0, &[0]),
    (GgmlType::Q5_1, &[0, 2]),
    (GgmlType::Q8_0, &[0]),
    (GgmlType::Q2_K, &[80, 82]),
    (GgmlType::Q3_K, &[108]),
    (GgmlType::Q4_K, &[0, 2]),
    (GgmlType::Q5_K, &[0, 2]),
    (GgmlType::Q6_K, &[208]),
];

/// `n` blocks of pseudo-random bytes whose f16 fields cycle through extreme finite
/// values (zero, ±max, smallest normal, subnormals) and ordinary ones; with `all_max`
/// every quant byte is 0xff.
fn raw_blocks(ty: GgmlType, f16s: &[usize], n: usize, seed: u64, all_max: bool) -> Vec<u8> {
    const F16: [u16; 10] = [0x0000, 0x8000, 0x7bff, 0xfbff, 0x0400, 0x0001, 0x03ff, 0x3c00, 0x2e66, 0xb266];
    let bb = ty.block_bytes();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out: Vec<u8> = (0..n * bb)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if all_max { 0xff } else { s as u8 }
        })
        .collect();
    for b in 0..n {
        for (k, &o) in f16s.iter().enumerate() {
            let h = F16[(b * 3 + k + seed as usize) % F16.len()];
            out[b * bb + o..b * bb + o + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    out
}

#[test]
fn quantized_matmul_and_embedding_of_every_block_type_are_the_cpu_bits() {
    use sampo_kernels::cuda::device::{Arg, Device, Shape, bytes_of, bytes_of_mut};
    use sampo_kernels::quant::{dequantize_row, dot_row, quantize_act};
    let dev = EmuDevice::new();
    let buf = |bytes: &[u8]| {
        let b = dev.alloc(bytes.len().max(1)).expect("alloc");
        dev.upload(dev.addr(&b), bytes).expect("upload");
        b
    };
    // 5 activation rows: one whole group of 4 and a partial one; 7 weight rows.
    let (rows, n_act) = (7usize, 5usize);
    for (ty, f16s) in BLOCK_TYPES {
        // Odd widths: 3 super-blocks (24 chunks) or 13 blocks; then 40 chunks, more than a warp.
        for (cols, all_max) in [(3 * 256, false), (13 * 32, false), (5 * 256, true), (40 * 32, false)] {
            if cols % ty.block_len() != 0 {
                continue;
            }
            let row_bytes = (cols / ty.block_len()) * ty.block_bytes();
            let w = raw_blocks(ty, f16s, rows * cols / ty.block_len(), cols as u64, all_max);
            let x: Vec<f32> = (0..n_act * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let mut xq = Vec::new();
            quantize_act(&x, &mut xq);
            // An extreme activation block.
            xq[1].qs = [-127; 32];
            let nb = cols / 32;
            let qs: Vec<u8> = xq.iter().flat_map(|b| b.qs.map(|v| v as u8)).collect();
            let (xd, xs): (Vec<f32>, Vec<f32>) = xq.iter().map(|b| (b.d, b.s)).unzip();
            let (wb, qb, db, sb) = (buf(&w), buf(&qs), buf(bytes_of(&xd)), buf(bytes_of(&xs)));
            let out = dev.alloc(n_act * rows * 4).expect("alloc");
            let z = || [Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0)];
            let mut args = vec![Arg::Ptr(dev.addr(&wb)), Arg::Ptr(dev.addr(&out)), Arg::I32(rows as i32)];
            args.extend(z());
            args.extend(z());
            args.extend([
                Arg::I32(cols as i32),
                Arg::Ptr(dev.addr(&qb)),
                Arg::Ptr(dev.addr(&db)),
                Arg::Ptr(dev.addr(&sb)),
                Arg::I32(n_act as i32),
            ]);
            let kernel = Kernel::matmul_q(ty).expect("a kernel for every block type");
            dev.launch(kernel, Shape::new((2, 2), 128), &args).expect("matmul_q");
            let mut got = vec![0f32; n_act * rows];
            dev.download(dev.addr(&out), bytes_of_mut(&mut got)).expect("download");
            for r in 0..n_act {
                for o in 0..rows {
                    let want = dot_row(ty, &w[o * row_bytes..(o + 1) * row_bytes], &xq[r * nb..(r + 1) * nb]);
                    assert_eq!(
                        got[r * rows + o].to_bits(),
                        want.to_bits(),
                        "{ty} cols {cols}: row {o}, activation {r}"
                    );
                }
            }
            // Embedding rows 6 and 2.
            let toks = buf(bytes_of(&[6u32, 2]));
            let emb = dev.alloc(2 * cols * 4).expect("alloc");
            dev.launch(
                Kernel::Embed,
                Shape::new((cols.div_ceil(128) as u32, 2), 128),
                &[
                    Arg::Ptr(dev.addr(&wb)),
                    Arg::I32(ty.to_u32() as i32),
                    Arg::I32(row_bytes as i32),
                    Arg::Ptr(dev.addr(&toks)),
                    Arg::Ptr(dev.addr(&emb)),
                    Arg::I32(cols as i32),
                    Arg::I32(2),
                    Arg::I32(0),
                    Arg::F32(1.0),
                ],
            )
            .expect("embed");
            let mut got = vec![0f32; 2 * cols];
            dev.download(dev.addr(&emb), bytes_of_mut(&mut got)).expect("download");
            for (k, r) in [6usize, 2].into_iter().enumerate() {
                let mut want = vec![0f32; cols];
                dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut want);
                assert_eq!(bits(&got[k * cols..(k + 1) * cols]), bits(&want), "{ty} cols {cols}: embedding row {r}");
            }
        }
    }
}

#[test]
fn models_of_every_new_type_run_the_cpu_bits_on_the_emulator() {
    // A whole forward pass (prefill of two sequences, then a batched decode step) with
    // every matrix, the embedding included, in one of the new types.
    let cpu = CpuBackend::new(2).expect("cpu");
    for ty in
        [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K]
    {
        let spec = SynthSpec {
            n_embd: 256,
            n_ff: 512,
            n_layer: 1,
            n_ctx: 64,
            weights: Some(ty),
            seed: u64::from(ty.to_u32()),
            ..SynthSpec::default()
        };
        let m = Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model");
        let gpu = CudaBackend::new(EmuDevice::new());
        let (mut c, mut g) = ([Sequence::new(&m), Sequence::new(&m)], [Sequence::new(&m), Sequence::new(&m)]);
        for step in 0..2u64 {
            let toks: Vec<Vec<u32>> =
                if step == 0 { vec![tokens(&m, 6, 1), tokens(&m, 3, 2)] } else { vec![vec![5], vec![9]] };
            let [c0, c1] = &mut c;
            let [g0, g1] = &mut g;
            let want = cpu
                .forward(&m, &mut [BatchItem { seq: c0, tokens: &toks[0] }, BatchItem { seq: c1, tokens: &toks[1] }])
                .expect("cpu");
            let got = gpu
                .forward(&m, &mut [BatchItem { seq: g0, tokens: &toks[0] }, BatchItem { seq: g1, tokens: &toks[1] }])
                .expect("emulated cuda");
            for k in 0..2 {
                assert_eq!(bits(&got[k]), bits(&want[k]), "{ty}: step {step}, sequence {k}");
                assert!(want[k].iter().all(|v| v.is_finite()), "{ty}: finite logits");
            }
        }
    }
}

/// The synthetic Gemma 3: six local layers (window of 8) around one global one, heads
/// of 32 (q_dim 128 over n_embd 64), one KV head; every Gemma step on short prompts.
fn synth_gemma3() -> Arc<Model> {
    let m = Model::from_gguf(GgufFile::from_bytes(synthesize(&SynthSpec::gemma3())).expect("gguf")).expect("model");
    assert!(m.hp.sliding_window == 8 && m.hp.q_dim() != m.hp.n_embd && m.hp.head_dim == 32);
    assert!(m.layers.iter().any(|l| l.local) && m.layers.iter().any(|l| !l.local));
    Arc::new(m)
}

/// Run `steps` (one token list per sequence each) on the CPU and on `gpu`, asserting
/// every logit's bits; the sequences' positions come out the same.
fn same_bits_over_steps(m: &Model, gpu: &dyn Backend, steps: &[Vec<Vec<u32>>], what: &str) {
    let cpu = CpuBackend::new(2).expect("cpu");
    let n = steps[0].len();
    let mut c: Vec<Sequence> = (0..n).map(|_| Sequence::new(m)).collect();
    let mut g: Vec<Sequence> = (0..n).map(|_| Sequence::new(m)).collect();
    for (step, toks) in steps.iter().enumerate() {
        let mut cb: Vec<BatchItem<'_>> = c.iter_mut().zip(toks).map(|(seq, t)| BatchItem { seq, tokens: t }).collect();
        let want = cpu.forward(m, &mut cb).expect("cpu");
        let mut gb: Vec<BatchItem<'_>> = g.iter_mut().zip(toks).map(|(seq, t)| BatchItem { seq, tokens: t }).collect();
        let got = gpu.forward(m, &mut gb).expect("emulated cuda");
        for k in 0..n {
            assert_eq!(bits(&got[k]), bits(&want[k]), "{what}: step {step}, sequence {k} at position {}", g[k].pos);
            assert!(want[k].iter().all(|v| v.is_finite()), "{what}: finite logits");
        }
    }
    assert_eq!(c.iter().map(|s| s.pos).collect::<Vec<_>>(), g.iter().map(|s| s.pos).collect::<Vec<_>>());
}

#[test]
fn gemma3_prefill_is_the_cpu_bits_within_and_beyond_the_window() {
    let m = synth_gemma3();
    let gpu = CudaBackend::new(EmuDevice::new());
    // Inside the window, at its edge, one past it, and well past it.
    for len in [1usize, 5, 8, 9, 33] {
        same_bits_over_steps(&m, &gpu, &[vec![tokens(&m, len, len as u64)]], &format!("prompt of {len}"));
    }
}

#[test]
fn gemma3_decode_steps_cross_the_window_edge_with_the_cpu_bits() {
    let m = synth_gemma3();
    let t0 = std::time::Instant::now();
    // A 6-token prompt, then decode steps at positions 6..=13: the local layers'
    // window starts sliding at position 8. Graph capture then replay.
    let mut steps = vec![vec![tokens(&m, 6, 4)]];
    steps.extend((0..8u32).map(|t| vec![vec![t * 11 + 2]]));
    let backend = CudaBackend::new(EmuDevice::new());
    same_bits_over_steps(&m, &backend, &steps, "decode");
    let stats = backend.graph_stats();
    assert_eq!((stats.captured, stats.replayed, stats.direct_passes), (1, 8, 1), "{stats:?}");
    eprintln!("Gemma 3 (synthetic) decode on the emulator: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn gemma3_batched_decode_of_several_sequences_is_the_cpu_bits() {
    let m = synth_gemma3();
    // Three sequences at different positions (one already past the window), decoded
    // together through a captured graph; then a pass mixing a prefill with decodes.
    let mut steps = vec![vec![tokens(&m, 3, 1), tokens(&m, 11, 2), tokens(&m, 7, 3)]];
    for s in 0..4u32 {
        steps.push(vec![vec![s + 1], vec![s + 40], vec![s + 90]]);
    }
    steps.push(vec![vec![5], tokens(&m, 4, 9), vec![6]]);
    same_bits_over_steps(&m, &CudaBackend::new(EmuDevice::new()), &steps, "batched");
    same_bits_over_steps(&m, &CudaBackend::new(EmuDevice::new()).without_graphs(), &steps, "batched, no graphs");
}

#[test]
fn gemma3_generation_and_multi_pass_prompts_are_the_cpu_tokens() {
    let m = synth_gemma3();
    // A 21-token prompt in passes of five rows: later passes read positions that
    // earlier passes cached, through the window.
    let mut steps = vec![vec![tokens(&m, 21, 5)]];
    steps.extend((0..3u32).map(|t| vec![vec![t + 7]]));
    same_bits_over_steps(&m, &CudaBackend::new(EmuDevice::new()).with_max_rows(5), &steps, "multi-pass");
    // Sampled and greedy generation of a batch, as the node runs it.
    let cpu = Engine::new(m.clone(), Arc::new(CpuBackend::new(2).expect("cpu")));
    let gpu = Engine::new(m.clone(), Arc::new(CudaBackend::new(EmuDevice::new())));
    let greedy = |n| SamplingParams { max_tokens: n, ..SamplingParams::default() };
    let sampled = SamplingParams { temperature: 0.8, top_p: 0.9, seed: 3, max_tokens: 10, ..SamplingParams::default() };
    let requests = vec![(tokens(&m, 5, 1), greedy(10)), (tokens(&m, 12, 2), sampled)];
    let want = cpu.generate_batch(&requests, &mut |_, _, _| true).expect("cpu");
    let got = gpu.generate_batch(&requests, &mut |_, _, _| true).expect("emulated cuda");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!((&g.tokens, g.finish), (&w.tokens, w.finish));
    }
}

#[test]
fn gemma3_known_answer_passes_and_a_faulty_attention_or_norm_is_refused() {
    let m = synth_gemma3();
    let ok = known_answer_test(&CudaBackend::new(EmuDevice::new()), &m).expect("a correct device passes");
    assert!(ok.logits_compared >= 6 * m.hp.n_vocab, "{ok:?}");
    // A device whose attention (QK-norm, RoPE and the cache append ride in it) or
    // post-norm (in add_norm_quant) flips a sign is caught: Gemma's own steps are part
    // of what the self-test checks. Heads of 32: attention quantizes its output, and the
    // output projection reads the quantized blocks (argument 15, their scales).
    for fault in [Fault { kernel: Kernel::Attention, arg: 15 }, Fault { kernel: Kernel::AddNormQuant, arg: 0 }] {
        let bad = CudaBackend::new(EmuDevice::with_fault(fault));
        match known_answer_test(&bad, &m) {
            Err(CudaError::SelfTest(why)) => assert!(why.contains("logit"), "{fault:?}: {why}"),
            other => panic!("a faulty device must fail the self-test ({fault:?}): {other:?}"),
        }
    }
}

#[test]
fn real_gemma3_prefill_on_the_emulator_is_the_cpu_bits() {
    // Gemma 3 270M Q4_K_M (Q5_0, Q4_K, Q6_K, Q8_0 matrices; heads of 256, 4 query
    // heads on 1 KV head; 262,144-token head tied to the Q8_0 embedding): a short
    // prefill through the very kernels the GPU runs.
    let m = common::gemma3_model();
    let t0 = std::time::Instant::now();
    let prompt = m.tokenizer.encode("The capital of France is", true);
    same_bits_over_steps(&m, &CudaBackend::new(EmuDevice::new()), &[vec![prompt]], "Gemma 3 270M");
    eprintln!("real Gemma 3 on the emulator: {:.1} s", t0.elapsed().as_secs_f64());
}

/// What a device was asked to do, in order.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Launch(Kernel),
    /// The host waited for everything queued (synchronize, or a download).
    Fence,
    Free(u64),
}

/// The emulator, recording every launch, wait and free, and failing the `fail_at`-th
/// launch as a GPU can (a bad launch, a lost device).
struct Recording {
    inner: EmuDevice,
    log: Arc<std::sync::Mutex<Vec<Op>>>,
    launches: std::sync::atomic::AtomicU64,
    fail_at: u64,
}

struct RecBuffer {
    inner: sampo_kernels::cuda::emu::EmuBuffer,
    addr: u64,
    log: Arc<std::sync::Mutex<Vec<Op>>>,
}

impl Drop for RecBuffer {
    fn drop(&mut self) {
        self.log.lock().expect("log").push(Op::Free(self.addr));
    }
}

impl Recording {
    fn push(&self, op: Op) {
        self.log.lock().expect("log").push(op);
    }
}

impl sampo_kernels::cuda::Device for Recording {
    type Buffer = RecBuffer;
    type Graph = sampo_kernels::cuda::emu::EmuGraph;

    fn alloc(&self, bytes: usize) -> Result<RecBuffer, CudaError> {
        let inner = self.inner.alloc(bytes)?;
        let addr = self.inner.addr(&inner);
        Ok(RecBuffer { inner, addr, log: self.log.clone() })
    }
    fn addr(&self, buf: &RecBuffer) -> u64 {
        self.inner.addr(&buf.inner)
    }
    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.inner.upload(dst, src)
    }
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        self.push(Op::Fence);
        self.inner.download(src, dst)
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        self.inner.copy(dst, src, bytes)
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        self.push(Op::Fence);
        self.inner.synchronize()
    }
    fn launch(
        &self,
        kernel: Kernel,
        shape: sampo_kernels::cuda::device::Shape,
        args: &[sampo_kernels::cuda::device::Arg],
    ) -> Result<(), CudaError> {
        if self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == self.fail_at {
            return Err(CudaError::Launch { kernel: kernel.name(), reason: "injected".into() });
        }
        self.push(Op::Launch(kernel));
        self.inner.launch(kernel, shape, args)
    }
    fn begin_capture(&self) -> Result<(), CudaError> {
        self.inner.begin_capture()
    }
    fn end_capture(&self) -> Result<Self::Graph, CudaError> {
        self.inner.end_capture()
    }
    fn replay(&self, graph: &Self::Graph) -> Result<(), CudaError> {
        self.inner.replay(graph)
    }
    fn memory(&self) -> Result<(u64, u64), CudaError> {
        self.inner.memory()
    }
    fn name(&self) -> String {
        "recording emulator".into()
    }
    fn compute_capability(&self) -> (i32, i32) {
        (0, 0)
    }
}

#[test]
fn a_failed_pass_is_fenced_before_its_sequences_can_be_freed() {
    // On a GPU, frees go to their own stream and do not wait for the compute stream:
    // if a pass fails half-way and the caller drops its sequence, the cache must not be
    // freed (and handed out again) while the kernels already queued still read it. So
    // a failed pass waits for what it queued before it returns.
    let m = synth();
    for fail_at in [3u64, 15] {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let dev = Recording { inner: EmuDevice::new(), log: log.clone(), launches: 0.into(), fail_at };
        let gpu = CudaBackend::new(dev);
        gpu.load(&m).expect("weights");
        log.lock().expect("log").clear();
        let mut seq = Sequence::new(&m);
        let p = tokens(&m, 9, 1);
        let err = gpu.forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &p }]).expect_err("launch fails");
        assert!(err.to_string().contains("injected"), "{err}");
        drop(seq);
        let log = log.lock().expect("log").clone();
        let last_launch = log.iter().rposition(|o| matches!(o, Op::Launch(_))).expect("some work was queued");
        let first_free = log.iter().position(|o| matches!(o, Op::Free(_))).expect("the cache was freed");
        assert!(first_free > last_launch, "{log:?}");
        assert!(
            log[last_launch..first_free].contains(&Op::Fence),
            "failing at launch {fail_at}: a free with no wait after the last launch: {:?}",
            &log[last_launch..]
        );
    }
}

#[test]
fn nan_logits_are_one_bit_pattern_on_every_backend() {
    // Float weights throughout; two rows of the (tied) output head poisoned: one holds a
    // NaN with a sign and a payload, the other +inf everywhere (inf - inf: x86 makes the
    // negative "default NaN" 0xFFC00000, a GPU makes 0x7FFFFFFF).
    let spec = SynthSpec { weights: Some(GgmlType::F32), n_ctx: 64, ..SynthSpec::default() };
    let mut bytes = synthesize(&spec);
    let clean = Model::from_gguf(GgufFile::from_bytes(bytes.clone()).expect("gguf")).expect("model");
    let e = &clean.token_embd;
    assert_eq!(e.ty, GgmlType::F32);
    let (nan_row, inf_row) = (11usize, 17usize);
    let start = e.offset;
    for c in 0..e.cols {
        let at = start + nan_row * e.row_bytes + 4 * c;
        bytes[at..at + 4].copy_from_slice(&0xFFC0_0001u32.to_le_bytes());
        let at = start + inf_row * e.row_bytes + 4 * c;
        bytes[at..at + 4].copy_from_slice(&f32::INFINITY.to_bits().to_le_bytes());
    }
    let m = Model::from_gguf(GgufFile::from_bytes(bytes).expect("gguf")).expect("model");
    // A prompt that never reads the poisoned rows as input.
    let prompt: Vec<u32> = [3u32, 40, 5, 70, 9].to_vec();
    let cpu = CpuBackend::new(1).expect("cpu");
    let gpu = CudaBackend::new(EmuDevice::new());
    let mut per_backend = Vec::new();
    for (name, b) in [("cpu", &cpu as &dyn Backend), ("emulated cuda", &gpu)] {
        let mut s = Sequence::new(&m);
        let mut logits = b.forward(&m, &mut [BatchItem { seq: &mut s, tokens: &prompt }]).expect("forward");
        let mut decoded = b.forward(&m, &mut [BatchItem { seq: &mut s, tokens: &[8] }]).expect("decode");
        logits.append(&mut decoded);
        let mut s = Sequence::new(&m);
        logits.append(&mut b.forward_all(&m, &mut s, &prompt[..2]).expect("forward_all"));
        for (k, l) in logits.iter().enumerate() {
            for row in [nan_row, inf_row] {
                assert_eq!(l[row].to_bits(), 0x7FC0_0000, "{name}, output {k}: logit {row} is {:#x}", l[row].to_bits());
            }
            assert_eq!(l.iter().filter(|v| v.is_nan()).count(), 2, "{name}: only the poisoned rows");
        }
        per_backend.push(logits.iter().map(|l| bits(l)).collect::<Vec<_>>());
    }
    // And the two backends agree on every bit.
    assert_eq!(per_backend[0], per_backend[1]);
}

#[test]
fn activations_on_the_emulator_are_math_rs_bits() {
    // A known-answer check of the transcendentals' shared constants and steps: glu_quant
    // with u = 1 writes act(g) * 1 = act(g) back into g, for SiLU (act 0) and GELU
    // (act 1), over a sweep and the edges of exp's range (exp(-x) for x near -EXP_HI
    // and -EXP_LO, NaN, infinities, zeros, subnormals).
    use sampo_kernels::cuda::device::{Arg, Device, Shape, bytes_of, bytes_of_mut};
    use sampo_kernels::math::{gelu_tanh, silu};
    let dev = EmuDevice::new();
    let mut xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0517).collect();
    for e in [88.72283f32, 103.97208, 87.3, 104.5, 1e-3, 1e30] {
        for x in [e, -e, e.next_up(), e.next_down(), -e.next_up(), -e.next_down()] {
            xs.push(x);
        }
    }
    xs.extend([0.0, -0.0, f32::MIN_POSITIVE, -f32::from_bits(1), f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    xs.resize(xs.len().next_multiple_of(32), 0.25);
    let nb = xs.len() / 32;
    let ones = vec![1.0f32; xs.len()];
    for (act, f) in [(0, silu as fn(f32) -> f32), (1, gelu_tanh)] {
        let g = dev.alloc(xs.len() * 4).expect("alloc");
        dev.upload(dev.addr(&g), bytes_of(&xs)).expect("upload");
        let u = dev.alloc(xs.len() * 4).expect("alloc");
        dev.upload(dev.addr(&u), bytes_of(&ones)).expect("upload");
        let (q, d, s) = (dev.alloc(xs.len()).expect("q"), dev.alloc(nb * 4).expect("d"), dev.alloc(nb * 4).expect("s"));
        dev.launch(
            Kernel::GluQuant,
            Shape::new((nb.div_ceil(4) as u32, 1), 128),
            &[
                Arg::Ptr(dev.addr(&g)),
                Arg::Ptr(dev.addr(&u)),
                Arg::Ptr(dev.addr(&q)),
                Arg::Ptr(dev.addr(&d)),
                Arg::Ptr(dev.addr(&s)),
                Arg::I32(nb as i32),
                Arg::I32(act),
            ],
        )
        .expect("glu_quant");
        let mut got = vec![0f32; xs.len()];
        dev.download(dev.addr(&g), bytes_of_mut(&mut got)).expect("download");
        for (x, y) in xs.iter().zip(&got) {
            let want = f(*x);
            // NaN in, NaN out; otherwise the very bits.
            assert!(
                y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                "act {act}({x:e} = {:#010x}): emulator {y:e}, math.rs {want:e}",
                x.to_bits()
            );
        }
    }
}

/// Launch one of the emulator's test-only kernels (`kernels/cuda/emu/faults.cu`) on one
/// block of `threads`, with an output buffer of `threads` floats; its result and output.
fn run_fault_kernel(
    dev: &EmuDevice,
    name: &'static str,
    threads: u32,
    extra: &[sampo_kernels::cuda::device::Arg],
) -> (Result<(), CudaError>, Vec<f32>) {
    use sampo_kernels::cuda::device::{Arg, Device, Shape, bytes_of_mut};
    let out = dev.alloc(threads as usize * 4).expect("alloc");
    let mut args = vec![Arg::Ptr(dev.addr(&out))];
    args.extend_from_slice(extra);
    let r = dev.launch_named(name, Shape::new((1, 1), threads), &args);
    let mut got = vec![0f32; threads as usize];
    dev.download(dev.addr(&out), bytes_of_mut(&mut got)).expect("download");
    (r, got)
}

fn launch_reason(r: Result<(), CudaError>) -> String {
    match r {
        Err(CudaError::Launch { reason, .. }) => reason,
        other => panic!("the emulator must refuse the launch: {other:?}"),
    }
}

#[test]
fn emulator_refuses_a_full_mask_shuffle_after_a_lane_exited() {
    let dev = EmuDevice::new();
    let why = launch_reason(run_fault_kernel(&dev, "emu_fault_exited_lane", 64, &[]).0);
    assert!(why.contains("exited") && why.contains("31 of the warp's 32 lanes"), "{why}");
    // The legal pattern, whole warps leaving, runs (on the same device, right after the
    // failed launch): the live warps' butterfly of 0..31 is 496 in every lane.
    use sampo_kernels::cuda::device::Arg;
    let (r, got) = run_fault_kernel(&dev, "emu_ok_whole_warp_exits", 128, &[Arg::I32(2)]);
    r.expect("whole warps may exit");
    assert_eq!(&got[..64], &[496.0; 64][..]);
    assert_eq!(&got[64..], &[0.0; 64][..], "the exited warps wrote nothing");
}

#[test]
fn emulator_refuses_divergent_shuffles_and_deadlocks() {
    let dev = EmuDevice::new();
    let why = launch_reason(run_fault_kernel(&dev, "emu_fault_divergent_shuffle", 32, &[]).0);
    assert!(why.contains("divergent") && why.contains("faults.cu"), "{why}");
    let why = launch_reason(run_fault_kernel(&dev, "emu_fault_deadlock", 32, &[]).0);
    assert!(why.contains("deadlock"), "{why}");
}

#[test]
fn emulator_runs_blocks_out_of_order_so_inter_block_races_show() {
    use sampo_kernels::cuda::device::{Arg, Device, Shape, bytes_of_mut};
    const BLOCKS: usize = 64;
    // seen[b] = buf[b] read by block b, which block b - 1 writes: correct only in order.
    let run = |dev: &EmuDevice| -> Vec<i32> {
        let buf = dev.alloc((BLOCKS + 1) * 4).expect("alloc");
        let seen = dev.alloc(BLOCKS * 4).expect("alloc");
        dev.launch_named(
            "emu_race_between_blocks",
            Shape::new((BLOCKS as u32, 1), 32),
            &[Arg::Ptr(dev.addr(&buf)), Arg::Ptr(dev.addr(&seen))],
        )
        .expect("launch");
        let mut got = vec![0i32; BLOCKS];
        dev.download(dev.addr(&seen), bytes_of_mut(&mut got)).expect("download");
        got
    };
    let in_order: Vec<i32> = (0..BLOCKS as i32).collect();
    assert_eq!(run(&EmuDevice::new().with_block_order(None)), in_order, "one after another, the race is hidden");
    // Shuffled, the race shows, differently from launch to launch; the same seed
    // reproduces the same orders.
    let dev = EmuDevice::new();
    let (a, b) = (run(&dev), run(&dev));
    assert_ne!(a, in_order, "the default block order must not be the index order");
    assert_ne!(a, b, "each launch has its own order");
    let again = EmuDevice::new();
    assert_eq!((run(&again), run(&again)), (a, b), "the orders are reproducible");
}

/// Kernel launches of one decode step (two sequences, one token each, replayed from a
/// captured graph) of `spec` with `n_layer` layers.
fn decode_launches(spec: &SynthSpec, n_layer: usize) -> u64 {
    let spec = SynthSpec { n_layer, n_ctx: 64, ..spec.clone() };
    let m = Model::from_gguf(GgufFile::from_bytes(synthesize(&spec)).expect("gguf")).expect("model");
    let gpu = CudaBackend::new(EmuDevice::new());
    let mut s = [Sequence::new(&m), Sequence::new(&m)];
    let step = |gpu: &CudaBackend<EmuDevice>, s: &mut [Sequence; 2], t: [&[u32]; 2]| {
        let [a, b] = s;
        gpu.forward(&m, &mut [BatchItem { seq: a, tokens: t[0] }, BatchItem { seq: b, tokens: t[1] }]).expect("step");
    };
    step(&gpu, &mut s, [&[1, 2, 3], &[4, 5]]);
    // The first decode step captures the graph; count the second, a replay.
    step(&gpu, &mut s, [&[6], &[7]]);
    let before = gpu.device_handle().launches();
    step(&gpu, &mut s, [&[8], &[9]]);
    assert_eq!((gpu.graph_stats().captured, gpu.graph_stats().replayed), (1, 2));
    gpu.device_handle().launches() - before
}

/// (per layer, fixed) launches of a decode step: measured at 1 and 3 layers.
fn launches_per_layer_and_fixed(spec: &SynthSpec) -> (u64, u64) {
    let (one, three) = (decode_launches(spec, 1), decode_launches(spec, 3));
    let per_layer = (three - one) / 2;
    (per_layer, one - per_layer)
}

#[test]
fn decode_step_launch_counts_are_pinned() {
    // Fewer, fuller launches: each is a kernel the GPU must start and drain. A fusion
    // that is undone (or a new launch) shows here; update the numbers on purpose only.
    // SmolLM2-like (Llama): heads of 64, every matrix Q4_1 (q/k/v in one launch).
    // Per layer: add_norm_quant, matmul_q (q/k/v), attention (RoPE, the cache append,
    // and quantizing its output), matmul_q (o), add_norm_quant, matmul_glu
    // (gate/up/SiLU/quantize), matmul_q (down). Fixed: embed, add_norm_quant (last add,
    // gather, output norm), matmul_q (head). Before the fusions: 10 per layer and 5
    // fixed; 8 with rope_store a launch of its own.
    let llama =
        SynthSpec { n_embd: 128, n_head: 2, n_head_kv: 1, weights: Some(GgmlType::Q4_1), ..SynthSpec::default() };
    // The synthetic Gemma 3 (heads of 32; q/k Q4_1 but v Q4_0, so q/k/v take two
    // launches): Llama's 7, plus the second q/k/v launch; QK-norm rides in attention,
    // the post-norms in add_norm_quant and the embedding scale in embed. Before: 15 per
    // layer and 6 fixed; 11 with QK-norm's two rms_norm_rows and rope_store.
    let gemma = SynthSpec::gemma3();
    let got = (launches_per_layer_and_fixed(&llama), launches_per_layer_and_fixed(&gemma));
    eprintln!("decode launches (per layer, fixed): Llama {:?}, Gemma 3 {:?}", got.0, got.1);
    assert_eq!(got, ((7, 3), (8, 3)));
}

/// One sequence prefilled to each length (passes of at most MAX_ROWS rows, so 600 takes
/// three: positions of earlier passes come from the cache, this pass's from its own k/v
/// rows), then two decode steps (a graph captured, then replayed): every logit the CPU's
/// bits.
fn lengths_are_the_cpu_bits(m: &Model, gpu: &dyn Backend, lengths: &[usize], what: &str) {
    let t0 = std::time::Instant::now();
    for &len in lengths {
        let steps = vec![vec![tokens(m, len, len as u64)], vec![vec![5]], vec![vec![9]]];
        same_bits_over_steps(m, gpu, &steps, &format!("{what}, context of {len}"));
    }
    eprintln!("{what}: contexts of {lengths:?} in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Attention's paths by context length: fewer than the 32 lanes of the softmax sum,
/// exactly 32, one more (a lane's second term), 64/65, and long contexts (200, 600:
/// several positions per warp of the scores, many terms per lane); scores in shared memory and, with that
/// room cut to 40 positions, in global memory; a sliding window narrower and wider than
/// 32. Heads of 64 (Llama-like, GQA 2:1, output quantized in the kernel) and of 32
/// (Gemma-like: QK-norm, neox RoPE, local and global layers).
#[test]
fn attention_across_context_lengths_is_the_cpu_bits() {
    let t0 = std::time::Instant::now();
    let model = |spec: SynthSpec| {
        Model::from_gguf(GgufFile::from_bytes(synthesize(&SynthSpec { n_ctx: 640, ..spec })).expect("gguf"))
            .expect("model")
    };
    let all = [1usize, 31, 32, 33, 64, 65, 200, 600];
    let llama = model(SynthSpec { n_embd: 128, n_head: 2, n_head_kv: 1, n_layer: 1, ..SynthSpec::default() });
    assert_eq!(llama.hp.head_dim, 64);
    lengths_are_the_cpu_bits(&llama, &CudaBackend::new(EmuDevice::new()), &all, "llama");
    // Scores past 40 positions spill to global memory.
    let spill = CudaBackend::new(EmuDevice::new()).with_shared_scores(40);
    lengths_are_the_cpu_bits(&llama, &spill, &[40, 41, 65], "llama, scores in global memory");
    // Rows of one sequence split over passes of 7: each pass reads the cache for the
    // positions before it and its own rows for the rest.
    lengths_are_the_cpu_bits(
        &llama,
        &CudaBackend::new(EmuDevice::new()).with_max_rows(7),
        &[33, 65],
        "llama, passes of 7",
    );
    // The synthetic Gemma 3 (window 8) and one whose window (40) is wider than 32; six
    // layers: five local, the last global.
    let gemma = model(SynthSpec { n_layer: 6, ..SynthSpec::gemma3() });
    lengths_are_the_cpu_bits(&gemma, &CudaBackend::new(EmuDevice::new()), &[1, 32, 33, 65], "gemma, window 8");
    let wide =
        SynthSpec { n_layer: 6, arch: SynthArch::Gemma3 { head_dim: 32, sliding_window: 40 }, ..SynthSpec::gemma3() };
    let wide = model(wide);
    assert!(wide.layers.iter().any(|l| l.local) && wide.layers.iter().any(|l| !l.local));
    lengths_are_the_cpu_bits(&wide, &CudaBackend::new(EmuDevice::new()), &[31, 33, 41, 65], "gemma, window 40");
    eprintln!("attention across context lengths on the emulator: {:.1} s", t0.elapsed().as_secs_f64());
}
