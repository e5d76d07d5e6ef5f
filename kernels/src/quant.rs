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

/// Blocks per SIMD group: the padding unit of [`RowPrep`] and [`act_scales`].
const GROUP: usize = 8;

/// Entries per row of [`act_scales`]' output: `nb` rounded up to whole groups of 8.
pub fn scales_stride(nb: usize) -> usize {
    nb.div_ceil(GROUP) * GROUP
}

/// Each activation row's block scales `d` and sums `s` (`x` holds rows of `nb`
/// blocks), every row padded with zeros to whole groups of 8 blocks: the layout
/// [`dot_rows`] loads with one instruction per group.
pub fn act_scales(x: &[Q8Act], nb: usize, d: &mut Vec<f32>, s: &mut Vec<f32>) {
    let stride = scales_stride(nb);
    let rows = x.len().checked_div(nb).unwrap_or(0);
    d.clear();
    s.clear();
    d.resize(rows * stride, 0.0);
    s.resize(rows * stride, 0.0);
    for (r, xr) in x.chunks_exact(nb.max(1)).take(rows).enumerate() {
        for (b, xb) in xr.iter().enumerate() {
            d[r * stride + b] = xb.d;
            s[r * stride + b] = xb.s;
        }
    }
}

/// One quantized weight row unpacked for [`dot_rows`]: each block's 32 weights as
/// bytes in activation order (their magnitudes too, for signed types), its scale and
/// minimum widened to f32, padded with zero blocks to whole groups of 8. Done once per
/// weight row, it saves every activation row the nibble unpacking and f16 widening.
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct RowPrep {
    w: Vec<[u8; QK]>,
    abs: Vec<[u8; QK]>,
    dw: Vec<f32>,
    mw: Vec<f32>,
}

/// Canonical dots of one quantized weight row with several activation rows:
/// `out[r] = dot_row(ty, row, x[r*nb..(r+1)*nb])` bit for bit, where `nb = x.len() /
/// out.len()`; `xd`/`xs` come from [`act_scales`] for the same rows. The weight row is
/// unpacked once for all rows (batched prefill and replay).
pub fn dot_rows(ty: GgmlType, row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32], prep: &mut RowPrep, out: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    let nb = x.len() / n;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let stride = scales_stride(nb);
        assert!(row.len() >= nb * ty.block_bytes(), "row of {} bytes for {nb} blocks", row.len());
        assert!(xd.len() >= n * stride && xs.len() >= n * stride, "activation scales for {n} rows");
        // SAFETY: AVX2 and F16C are present; the lengths read are asserted above.
        unsafe {
            x86::prepare_row_avx2(ty, row, nb, prep);
            x86::dot_rows_avx2(ty, x, xd, xs, prep, out);
        }
        return;
    }
    let _ = (xd, xs, prep);
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_row_scalar(ty, row, &x[r * nb..(r + 1) * nb]);
    }
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

    /// Unpack a weight row of `nb` blocks into `prep` (see [`RowPrep`]).
    ///
    /// # Safety
    /// `row` holds `nb` blocks of type `ty` (a 32-element quantized type).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn prepare_row_avx2(ty: GgmlType, row: &[u8], nb: usize, prep: &mut RowPrep) {
        let stride = scales_stride(nb);
        let bb = ty.block_bytes();
        prep.w.resize(stride, [0; QK]);
        prep.abs.resize(stride, [0; QK]);
        prep.dw.resize(stride, 0.0);
        prep.mw.resize(stride, 0.0);
        // Padding is never summed (the partial group's lanes are blended out); zeroing it
        // keeps stale blocks of a longer row from lingering.
        for b in nb..stride {
            (prep.w[b], prep.abs[b], prep.dw[b], prep.mw[b]) = ([0; QK], [0; QK], 0.0, 0.0);
        }
        let widen = |h: u16| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))));
        for b in 0..nb {
            let blk = &row[b * bb..(b + 1) * bb];
            prep.dw[b] = widen(u16::from_le_bytes([blk[0], blk[1]]));
            // SAFETY: the block holds the bytes read (caller's contract); the
            // destinations are 32 bytes each.
            unsafe {
                let w = match ty {
                    GgmlType::Q4_1 => {
                        prep.mw[b] = widen(u16::from_le_bytes([blk[2], blk[3]]));
                        nibbles16(blk.as_ptr().add(4))
                    }
                    GgmlType::Q4_0 => _mm256_sub_epi8(nibbles16(blk.as_ptr().add(2)), _mm256_set1_epi8(8)),
                    _ => _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i),
                };
                _mm256_storeu_si256(prep.w[b].as_mut_ptr() as *mut __m256i, w);
                _mm256_storeu_si256(prep.abs[b].as_mut_ptr() as *mut __m256i, _mm256_sign_epi8(w, w));
            }
        }
    }

    /// [`butterfly`] of 32 lanes held in 4 registers (lane `8k + i` in lane `i` of
    /// register `k`): the same additions of the same pairs, several at a time.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn butterfly4(a: [__m256; 4]) -> f32 {
        let s16a = _mm256_add_ps(a[0], a[2]); // off 16, lanes 0..8
        let s16b = _mm256_add_ps(a[1], a[3]); // off 16, lanes 8..16
        let s8 = _mm256_add_ps(s16a, s16b); // off 8
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)); // off 4
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // off 2 (lanes 0, 1)
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) // off 1
    }

    /// [`dot_row_avx2`]'s arithmetic for several activation rows against one prepared
    /// weight row: the same integer sums, the same f32 operations per block in the same
    /// order, the same lanes. The last, partial group is computed like a whole one and
    /// only its own lanes are updated (a blend, not an add of zeros: no bit may change).
    ///
    /// # Safety
    /// `prep` was filled for `nb = x.len() / out.len()` blocks; `xd`, `xs` hold
    /// `out.len()` rows of `nb` rounded up to a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_rows_avx2(
        ty: GgmlType,
        x: &[Q8Act],
        xd: &[f32],
        xs: &[f32],
        prep: &RowPrep,
        out: &mut [f32],
    ) {
        let n = out.len();
        let nb = x.len() / n;
        let stride = scales_stride(nb);
        let groups = stride / GROUP;
        let rem = nb % GROUP;
        let signed = ty != GgmlType::Q4_1;
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let partial = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rem as i32), lane));
        let wp = prep.w.as_ptr() as *const __m256i;
        let ap = prep.abs.as_ptr() as *const __m256i;
        // The exact integer dot of block b as 8 partial i32.
        let block = |b: usize, xb: &Q8Act| {
            // SAFETY: b < nb <= prep's padded length; each entry is 32 bytes.
            unsafe {
                let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                if signed {
                    let w = _mm256_loadu_si256(wp.add(b));
                    udot8(_mm256_loadu_si256(ap.add(b)), _mm256_sign_epi8(xv, w))
                } else {
                    udot8(_mm256_loadu_si256(wp.add(b)), xv)
                }
            }
        };
        for (r, o) in out.iter_mut().enumerate() {
            let xr = &x[r * nb..(r + 1) * nb];
            let (xd, xs) = (&xd[r * stride..(r + 1) * stride], &xs[r * stride..(r + 1) * stride]);
            // Group g goes to register g % 4; rotating the four after each group keeps
            // them in registers: the next one to take a group is always `acc[0]`.
            let mut acc = [_mm256_setzero_ps(); 4];
            for g in 0..groups {
                let b0 = g * GROUP;
                let cnt = (nb - b0).min(GROUP);
                let mut p = [_mm256_setzero_si256(); 8];
                if cnt == GROUP {
                    for (k, pk) in p.iter_mut().enumerate() {
                        *pk = block(b0 + k, &xr[b0 + k]);
                    }
                } else {
                    for (k, pk) in p.iter_mut().enumerate().take(cnt) {
                        *pk = block(b0 + k, &xr[b0 + k]);
                    }
                }
                let isum = _mm256_cvtepi32_ps(hsum8(&p));
                // SAFETY: b0 + 8 <= stride, the padded length of every array read.
                let (dw, dx) =
                    unsafe { (_mm256_loadu_ps(prep.dw.as_ptr().add(b0)), _mm256_loadu_ps(xd.as_ptr().add(b0))) };
                let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, dx), isum);
                if ty == GgmlType::Q4_1 {
                    // SAFETY: as above.
                    let (mw, sx) =
                        unsafe { (_mm256_loadu_ps(prep.mw.as_ptr().add(b0)), _mm256_loadu_ps(xs.as_ptr().add(b0))) };
                    t = _mm256_add_ps(t, _mm256_mul_ps(mw, sx));
                }
                let sum = _mm256_add_ps(acc[0], t);
                let next = if cnt == GROUP { sum } else { _mm256_blendv_ps(acc[0], sum, partial) };
                acc = [acc[1], acc[2], acc[3], next];
            }
            // Undo the rotation: register k must hold the groups with g % 4 == k.
            let k = groups % 4;
            *o = butterfly4([acc[(4 - k) % 4], acc[(5 - k) % 4], acc[(6 - k) % 4], acc[(7 - k) % 4]]);
        }
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
    fn batched_dots_match_scalar_bits_for_every_type_and_tail() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            // Every remainder of blocks modulo the group of 8, fewer blocks than a group,
            // and more groups than the 4 accumulators.
            for nb in [1usize, 2, 7, 8, 9, 15, 18, 33, 48] {
                let n = nb * QK;
                let w = quantize_row(ty, &vals(n, 5));
                for rows in [1usize, 2, 5] {
                    let mut xq = Vec::new();
                    quantize_act(&vals(n * rows, 6), &mut xq);
                    // A zero block: exercises +0.0 terms in the lanes.
                    xq[0] = Q8Act::default();
                    let (mut d, mut s) = (Vec::new(), Vec::new());
                    act_scales(&xq, nb, &mut d, &mut s);
                    let mut out = vec![0.0; rows];
                    dot_rows(ty, &w, &xq, &d, &s, &mut RowPrep::default(), &mut out);
                    for (r, o) in out.iter().enumerate() {
                        let want = dot_row_scalar(ty, &w, &xq[r * nb..(r + 1) * nb]);
                        assert_eq!(o.to_bits(), want.to_bits(), "{ty} nb={nb} rows={rows} row {r}");
                    }
                }
            }
        }
        // Extreme Q8_0 weights (-128 included) and activations.
        let mut w = quantize_row(GgmlType::Q8_0, &vals(64, 7));
        w[2] = 0x80;
        w[36] = 0x80;
        let mut xq = Vec::new();
        quantize_act(&[vec![-1.0; 32], vec![1.0; 32]].concat(), &mut xq);
        let (mut d, mut s) = (Vec::new(), Vec::new());
        act_scales(&xq, 2, &mut d, &mut s);
        let mut out = [0.0];
        dot_rows(GgmlType::Q8_0, &w, &xq, &d, &s, &mut RowPrep::default(), &mut out);
        assert_eq!(out[0].to_bits(), dot_row_scalar(GgmlType::Q8_0, &w, &xq).to_bits());
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
