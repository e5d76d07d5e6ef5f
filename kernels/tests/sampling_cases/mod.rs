//! Logits and sampling parameters for checking the device sampler against the host's,
//! shared by the emulator tests (`cuda_sampling.rs`) and the GPU tests (`cuda_gpu.rs`).
#![allow(dead_code, unreachable_pub)]

use sampo_kernels::SamplingParams;
use sampo_kernels::cuda::{CudaBackend, Device};
use sampo_kernels::sampling;

/// SmolLM2's vocabulary size.
pub const SMOLLM2_VOCAB: usize = 49_152;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Rows of logits of the shapes a sampler meets, `vocab` wide.
pub fn logit_rows(vocab: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
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
pub fn param_mixes(vocab: usize, rng: &mut Rng) -> Vec<SamplingParams> {
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

/// Every row under every parameter mix, one device call for all of them (several
/// launches of 32 rows), against the host sampler.
pub fn check_vocab<D: Device>(gpu: &CudaBackend<D>, vocab: usize, seed: u64, steps: &[u64]) {
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
    let got = match gpu.sample_logits(&logits, vocab, &params) {
        Ok(got) => got,
        Err(e) => {
            // Name the rows that fail alone, so a device-only fault says which case.
            let failing: Vec<String> = (0..params.len())
                .filter_map(|i| {
                    let alone = gpu.sample_logits(&logits[i * vocab..][..vocab], vocab, &params[i..=i]);
                    match alone {
                        Ok(ids) if ids[0] == want[i] => None,
                        other => Some(format!("{} logits, {:?}, step {}: {other:?}", what[i].0, what[i].1, what[i].2)),
                    }
                })
                .collect();
            if let Some(i) = (0..params.len()).find(|&i| params[i].0.top_k == 1 && params[i].0.temperature > 0.0) {
                let row = &logits[i * vocab..][..vocab];
                let dump = gpu.sample_row_scratch(row, params[i]);
                let mut idx: Vec<usize> = (0..vocab).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                eprintln!(
                    "top_k 1 row {i}: want {} (top ids {:?}); device {:?}",
                    want[i],
                    &idx[..4],
                    dump.as_ref().map(|(id, _)| id)
                );
                if let Ok((_, aux)) = dump {
                    let t = (aux.len() - 64) / 16;
                    let slots = &aux[16 * t..];
                    eprintln!("slots[0..2] {:?} slots[32..48] {:?}", &slots[..2], &slots[32..48]);
                    let per_digit: Vec<u32> = (0..16).map(|d| aux[d * t..(d + 1) * t].iter().sum()).collect();
                    eprintln!("last level's counts summed on the host {per_digit:?}");
                }
            }
            panic!(
                "device sampler: {e}; vocab {vocab}; {} of {} rows fail alone: {failing:#?}",
                failing.len(),
                params.len()
            );
        }
    };
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "vocab {vocab}, {} logits, {:?}, step {}", what[i].0, what[i].1, what[i].2);
    }
}
