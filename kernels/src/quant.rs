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

/// Exact f16 → f32 widening (same result as F16C's `vcvtph2ps`).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalize.
            let shift = man.leading_zeros() - 21;
            let man = (man << shift) & 0x3ff;
            sign | ((113 - shift) << 23) | (man << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
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
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c"))
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
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
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

    /// Sum of products of 32 unsigned weights (< 128) with 32 signed activations, as 8 i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn udot8(w: __m256i, x: __m256i) -> __m256i {
        // maddubs pairs: |2·127·127| < 2^15, so no saturation for our formats.
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// Signed weights: |w| · (x · sign(w)).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sdot8(w: __m256i, x: __m256i) -> __m256i {
        udot8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    }

    /// The exact integer dot of one block at `w` (its first byte), as 8 partial i32.
    ///
    /// # Safety
    /// `w` points at a whole block of type `ty`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_partials(ty: GgmlType, w: *const u8, x: &Q8Act) -> __m256i {
        // SAFETY: Q8Act::qs is 32 bytes; the block holds the bytes read (caller's contract).
        unsafe {
            let xv = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
            match ty {
                GgmlType::Q4_1 => udot8(nibbles16(w.add(4)), xv),
                GgmlType::Q4_0 => sdot8(_mm256_sub_epi8(nibbles16(w.add(2)), _mm256_set1_epi8(8)), xv),
                _ => sdot8(_mm256_loadu_si256(w.add(2) as *const __m256i), xv),
            }
        }
    }

    /// # Safety
    /// `p` points at 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles16(p: *const u8) -> __m256i {
        // SAFETY: caller's contract.
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let lo = _mm_and_si128(v, _mm_set1_epi8(15));
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
        _mm256_set_m128i(hi, lo)
    }

    /// Horizontal sums of 8 vectors: lane k of the result is the sum of `p[k]`'s lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum8(p: &[__m256i; 8]) -> __m256i {
        let s01 = _mm256_hadd_epi32(p[0], p[1]);
        let s23 = _mm256_hadd_epi32(p[2], p[3]);
        let s45 = _mm256_hadd_epi32(p[4], p[5]);
        let s67 = _mm256_hadd_epi32(p[6], p[7]);
        let s0123 = _mm256_hadd_epi32(s01, s23);
        let s4567 = _mm256_hadd_epi32(s45, s67);
        let lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
        let hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
        _mm256_add_epi32(lo, hi)
    }

    /// Eight blocks at a time: their exact integer sums become one vector, and the
    /// per-block f32 terms are computed lane-wise in the canonical operation order.
    /// Blocks `8g..8g+8` land in lanes `8(g % 4)..`, i.e. register `g % 4`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_row_avx2(ty: GgmlType, row: &[u8], x: &[Q8Act]) -> f32 {
        let bb = ty.block_bytes();
        let nb = x.len();
        assert!(row.len() >= nb * bb, "row of {} bytes for {nb} blocks", row.len());
        let base = row.as_ptr();
        let rd16 = |off: usize| -> i16 {
            // SAFETY: off + 2 <= nb * bb <= row.len() (asserted above).
            unsafe { std::ptr::read_unaligned(base.add(off) as *const i16) }
        };
        // The f16 at byte `o` of 8 consecutive blocks, widened in one F16C instruction.
        let f16x8 = |o: usize| {
            _mm256_cvtph_ps(_mm_set_epi16(
                rd16(o + 7 * bb),
                rd16(o + 6 * bb),
                rd16(o + 5 * bb),
                rd16(o + 4 * bb),
                rd16(o + 3 * bb),
                rd16(o + 2 * bb),
                rd16(o + bb),
                rd16(o),
            ))
        };
        let mut acc = [_mm256_setzero_ps(); 4];
        let groups = nb / 8;
        for g in 0..groups {
            let b0 = g * 8;
            let mut p = [_mm256_setzero_si256(); 8];
            for (k, pk) in p.iter_mut().enumerate() {
                // SAFETY: block b0 + k < nb lies inside the row.
                *pk = unsafe { block_partials(ty, base.add((b0 + k) * bb), &x[b0 + k]) };
            }
            let isum = _mm256_cvtepi32_ps(hsum8(&p));
            let o = b0 * bb;
            let dw = f16x8(o);
            let xs = &x[b0..b0 + 8];
            let dx = _mm256_set_ps(xs[7].d, xs[6].d, xs[5].d, xs[4].d, xs[3].d, xs[2].d, xs[1].d, xs[0].d);
            let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, dx), isum);
            if ty == GgmlType::Q4_1 {
                let mw = f16x8(o + 2);
                let sx = _mm256_set_ps(xs[7].s, xs[6].s, xs[5].s, xs[4].s, xs[3].s, xs[2].s, xs[1].s, xs[0].s);
                t = _mm256_add_ps(t, _mm256_mul_ps(mw, sx));
            }
            acc[g % 4] = _mm256_add_ps(acc[g % 4], t);
        }
        let mut l = [0.0f32; LANES];
        for (k, r) in acc.iter().enumerate() {
            // SAFETY: 8 floats at lane 8k of a 32-float array.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr().add(8 * k), *r) };
        }
        // Remaining blocks, in order, into their lanes.
        for b in groups * 8..nb {
            let w = &row[b * bb..(b + 1) * bb];
            // SAFETY: `w` is a whole block.
            let p = unsafe { block_partials(ty, w.as_ptr(), &x[b]) };
            let mut v = [0i32; 8];
            // SAFETY: 8 i32 into an 8-element array.
            unsafe { _mm256_storeu_si256(v.as_mut_ptr() as *mut __m256i, p) };
            l[b % LANES] += block_term(ty, w, &x[b], v.iter().sum());
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

#[cfg(test)]
mod f16_tests {
    #[test]
    fn f16_widening_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = super::f16_to_f32(h);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }
}
