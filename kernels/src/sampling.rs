//! Token sampling: greedy, temperature, top-k, top-p, driven by a counter-based RNG
//! keyed by the request seed, so a (seed, step) pair always draws the same number.

use serde::{Deserialize, Serialize};

use crate::math::exp;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit.
    pub top_k: usize,
    /// 1.0 means no limit.
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: u32,
    /// Token ids that end generation (not emitted).
    pub stop: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, max_tokens: 128, stop: Vec::new() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature {0} must be a finite number in [0, 100]")]
    Temperature(f32),
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
    #[error("{params} sampling parameter sets for a batch of {items} sequences")]
    BatchMismatch { params: usize, items: usize },
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

/// What a batched sampler checks before any work: one parameter set per item, each
/// valid (the same check on every backend, so bad input fails the same way).
pub fn validate_batch(items: usize, params: &[(&SamplingParams, u64)]) -> Result<(), SamplingError> {
    if params.len() != items {
        return Err(SamplingError::BatchMismatch { params: params.len(), items });
    }
    params.iter().try_for_each(|(p, _)| p.validate())
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from (seed, counter): 24 random bits, exactly representable.
pub fn uniform(seed: u64, counter: u64) -> f32 {
    let x = splitmix64(splitmix64(seed) ^ counter.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    (x >> 40) as f32 / (1u64 << 24) as f32
}

/// Key for ordering logits: NaN sorts as -inf.
fn key(v: f32) -> f32 {
    if v.is_nan() { f32::NEG_INFINITY } else { v }
}

/// Highest logit, lowest index on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if key(v) > key(logits[best]) {
            best = i;
        }
    }
    best as u32
}

/// Choose the next token. `step` is the index of the token being generated.
pub fn sample(logits: &[f32], p: &SamplingParams, step: u64) -> u32 {
    if p.temperature == 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    // Candidates by descending logit, ascending id: a total order.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| key(logits[*b as usize]).total_cmp(&key(logits[*a as usize])).then(a.cmp(b));
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, cmp);
        idx.truncate(p.top_k);
    }
    idx.sort_unstable_by(cmp);
    let max = key(logits[idx[0] as usize]);
    // Weights exp((l - max) / T), summed in candidate order.
    let w: Vec<f32> = idx.iter().map(|&i| exp((key(logits[i as usize]) - max) / p.temperature)).collect();
    let total = w.iter().fold(0.0f32, |a, &b| a + b);
    let mut keep = w.len();
    if p.top_p < 1.0 {
        let target = p.top_p * total;
        let mut acc = 0.0f32;
        for (n, &wi) in w.iter().enumerate() {
            acc += wi;
            if acc >= target {
                keep = n + 1;
                break;
            }
        }
    }
    let kept = w[..keep].iter().fold(0.0f32, |a, &b| a + b);
    let r = uniform(p.seed, step) * kept;
    let mut acc = 0.0f32;
    for (n, &wi) in w[..keep].iter().enumerate() {
        acc += wi;
        if r < acc {
            return idx[n];
        }
    }
    idx[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(sample(&[0.0, 5.0, 1.0], &SamplingParams::default(), 0), 1);
    }

    #[test]
    fn same_seed_same_draws_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let a: Vec<u32> = (0..50).map(|s| sample(&logits, &p, s)).collect();
        let b: Vec<u32> = (0..50).map(|s| sample(&logits, &p, s)).collect();
        assert_eq!(a, b);
        let p2 = SamplingParams { seed: 43, ..p.clone() };
        let c: Vec<u32> = (0..50).map(|s| sample(&logits, &p2, s)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_and_top_p_restrict_candidates() {
        let logits = vec![10.0, 9.0, 0.0, -1.0, -2.0];
        let p = SamplingParams { temperature: 5.0, top_k: 2, seed: 1, ..Default::default() };
        assert!((0..200).all(|s| sample(&logits, &p, s) < 2));
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, seed: 1, ..Default::default() };
        assert!((0..200).all(|s| sample(&logits, &p, s) == 0));
    }

    #[test]
    fn validation() {
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
