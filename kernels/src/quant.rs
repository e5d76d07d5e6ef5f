//! Quantized blocks and their dot products.
//!
//! Activations are quantized per block of 32 to 8 bits (`Q8Act`), so that a dot
//! product with a Q4_0/Q4_1/Q8_0 weight block is an exact integer sum `isum` (any
//! order, any SIMD width: integers don't round). Each block then gives one f32 term:
//!
//! - Q8_0, Q4_0: `t = (dw · dx) · isum`
//! - Q4_1:       `t = (dw · dx) · isum + mw · sx`   (`sx = dx · Σ qx`, from `Q8Act`)
//!
//! each operation rounded once in that order (`dw`, `mw` are the block's f16 values
//! widened exactly to f32). The row's result is the canonical sum (`math`) of its
//! block terms: block `b` goes to lane `b % 32`.
//!
//! Activation quantization of a block `x[0..32]`: `amax = max |x_i|`, `dx = amax / 127`,
//! `inv = dx == 0 ? 0 : 1 / dx`, `q_i = round_half_away(x_i · inv)`, `sx = dx · Σ q_i`.

use half::f16;

use crate::gguf::GgmlType;
use crate::math::{LANES, butterfly};

pub const QK: usize = 32;

/// One activation block quantized to 8 bits.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
pub struct Q8Act {
    pub qs: [i8; QK],
    pub d: f32,
    /// `d · Σ qs`.
    pub s: f32,
}

impl Default for Q8Act {
    fn default() -> Self {
        Self { qs: [0; QK], d: 0.0, s: 0.0 }
    }
}

/// Quantize `x` (length a multiple of 32) into `out`.
pub fn quantize_act(x: &[f32], out: &mut Vec<Q8Act>) {
    out.clear();
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        let mut b = Q8Act { d, ..Default::default() };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
            *q = r;
            sum += i32::from(r);
        }
        b.s = d * sum as f32;
        out.push(b);
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Exact integer dot of one weight block with one activation block (portable).
#[inline]
fn isum_scalar(ty: GgmlType, w: &[u8], x: &[i8; QK]) -> i32 {
    match ty {
        GgmlType::Q8_0 => (0..QK).map(|i| i32::from(w[2 + i] as i8) * i32::from(x[i])).sum(),
        GgmlType::Q4_0 => (0..16)
            .map(|j| {
                let q = w[2 + j];
                (i32::from(q & 15) - 8) * i32::from(x[j]) + (i32::from(q >> 4) - 8) * i32::from(x[j + 16])
            })
            .sum(),
        GgmlType::Q4_1 => (0..16)
            .map(|j| {
                let q = w[4 + j];
                i32::from(q & 15) * i32::from(x[j]) + i32::from(q >> 4) * i32::from(x[j + 16])
            })
            .sum(),
        _ => 0,
    }
}

/// The f32 term of one block, given its exact integer dot.
#[inline]
fn block_term(ty: GgmlType, w: &[u8], x: &Q8Act, isum: i32) -> f32 {
    let dw = f16_at(w, 0);
    let t = (dw * x.d) * isum as f32;
    if ty == GgmlType::Q4_1 {
        let mw = f16_at(w, 2);
        t + mw * x.s
    } else {
        t
    }
}

/// Canonical dot of a quantized weight row with quantized activations (portable reference).
pub fn dot_row_scalar(ty: GgmlType, row: &[u8], x: &[Q8Act]) -> f32 {
    let bb = ty.block_bytes();
    let mut l = [0.0f32; LANES];
    for (b, xb) in x.iter().enumerate() {
        let w = &row[b * bb..(b + 1) * bb];
        let isum = isum_scalar(ty, w, &xb.qs);
        l[b % LANES] += block_term(ty, w, xb, isum);
    }
    butterfly(&mut l)
}

/// Canonical dot, SIMD where the CPU has it. Bit-identical to [`dot_row_scalar`].
#[inline]
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[Q8Act]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is present; `row` holds `x.len()` blocks (checked by the caller's shapes).
        return unsafe { x86::dot_row_avx2(ty, row, x) };
    }
    dot_row_scalar(ty, row, x)
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// Dequantize one row of `n` elements to f32 (embedding lookup, tests).
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, w) in out.chunks_exact_mut(QK).zip(row.chunks_exact(34)) {
                let d = f16_at(w, 0);
                for i in 0..QK {
                    o[i] = d * f32::from(w[2 + i] as i8);
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, w) in out.chunks_exact_mut(QK).zip(row.chunks_exact(18)) {
                let d = f16_at(w, 0);
                for j in 0..16 {
                    o[j] = d * (f32::from(w[2 + j] & 15) - 8.0);
                    o[j + 16] = d * (f32::from(w[2 + j] >> 4) - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, w) in out.chunks_exact_mut(QK).zip(row.chunks_exact(20)) {
                let d = f16_at(w, 0);
                let m = f16_at(w, 2);
                for j in 0..16 {
                    o[j] = d * f32::from(w[4 + j] & 15) + m;
                    o[j + 16] = d * f32::from(w[4 + j] >> 4) + m;
                }
            }
        }
    }
}

/// Quantize f32 values into `ty` blocks (the synthetic model writer uses this).
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => x.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for c in x.chunks_exact(QK) {
                let amax = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(c.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for c in x.chunks_exact(QK) {
                let (mut amax, mut maxv) = (0.0f32, 0.0f32);
                for &v in c {
                    if v.abs() > amax {
                        amax = v.abs();
                        maxv = v;
                    }
                }
                let d = maxv / -8.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(c[j]) | (q(c[j + 16]) << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for c in x.chunks_exact(QK) {
                let min = c.iter().copied().fold(f32::INFINITY, f32::min);
                let max = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(c[j]) | (q(c[j + 16]) << 4));
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 i32 (exact).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum_i32(v: __m256i) -> i32 {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256(v, 1);
        let s = _mm_add_epi32(lo, hi);
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// Sum of products of 32 unsigned 4/8-bit weights with 32 signed activations.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn udot(w: __m256i, x: __m256i) -> i32 {
        // maddubs: u8 × i8 pairs into i16; |15·127·2| and |(127+... )| never saturate for our formats.
        let p = _mm256_maddubs_epi16(w, x);
        hsum_i32(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn nibbles(qs: &[u8]) -> __m256i {
        // SAFETY: callers pass 16 bytes.
        let v = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
        let lo = _mm_and_si128(v, _mm_set1_epi8(15));
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
        _mm256_set_m128i(hi, lo)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_row_avx2(ty: GgmlType, row: &[u8], x: &[Q8Act]) -> f32 {
        let bb = ty.block_bytes();
        let mut l = [0.0f32; LANES];
        for (b, xb) in x.iter().enumerate() {
            let w = &row[b * bb..(b + 1) * bb];
            // SAFETY: Q8Act::qs is 32 bytes.
            let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            let isum = match ty {
                GgmlType::Q4_1 => udot(nibbles(&w[4..20]), xv),
                GgmlType::Q4_0 => {
                    // Σ (q - 8)·x = Σ q·x − 8·Σ x, both exact.
                    let sx = udot(_mm256_set1_epi8(1), xv);
                    udot(nibbles(&w[2..18]), xv) - 8 * sx
                }
                GgmlType::Q8_0 => {
                    // SAFETY: 32 weight bytes follow the scale.
                    let wv = unsafe { _mm256_loadu_si256(w[2..34].as_ptr() as *const __m256i) };
                    // |w|·sign(x) trick: maddubs needs an unsigned left operand.
                    let aw = _mm256_sign_epi8(wv, wv);
                    let sx = _mm256_sign_epi8(xv, wv);
                    udot(aw, sx)
                }
                _ => 0,
            };
            l[b % LANES] += block_term(ty, w, xb, isum);
        }
        butterfly(&mut l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn simd_matches_scalar_bits_for_every_type() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for n in [32usize, 576, 1536, 2048] {
                let w = quantize_row(ty, &vals(n, 1));
                let mut xq = Vec::new();
                quantize_act(&vals(n, 2), &mut xq);
                assert_eq!(dot_row(ty, &w, &xq).to_bits(), dot_row_scalar(ty, &w, &xq).to_bits(), "{ty} n={n}");
            }
        }
    }

    #[test]
    fn quantized_dot_is_close_to_float_dot() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let n = 576;
            let wf = vals(n, 3);
            let xf = vals(n, 4);
            let w = quantize_row(ty, &wf);
            let mut wd = vec![0.0; n];
            dequantize_row(ty, &w, &mut wd);
            let exact: f32 = wd.iter().zip(&xf).map(|(a, b)| a * b).sum();
            let mut xq = Vec::new();
            quantize_act(&xf, &mut xq);
            let got = dot_row(ty, &w, &xq);
            assert!((got - exact).abs() < 0.05 * exact.abs().max(1.0), "{ty}: {got} vs {exact}");
        }
    }

    #[test]
    fn q8_extremes_do_not_saturate() {
        let n = 64;
        let w = quantize_row(GgmlType::Q8_0, &vec![-1.0; n]);
        let mut xq = Vec::new();
        quantize_act(&vec![-1.0; n], &mut xq);
        assert_eq!(dot_row(GgmlType::Q8_0, &w, &xq).to_bits(), dot_row_scalar(GgmlType::Q8_0, &w, &xq).to_bits());
        assert!((dot_row(GgmlType::Q8_0, &w, &xq) - 64.0).abs() < 0.1);
    }
}
