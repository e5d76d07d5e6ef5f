//! AVX2 dot products, bit-identical to the portable ones in [`super::chunk`].

use std::arch::x86_64::*;

use super::chunk::{self, Form};
use super::*;

/// Types whose quants may be negative: their dots use the sign trick
/// (`|w| · (x · sign(w))`), since `maddubs` takes its first operand unsigned.
fn signed(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q3_K | GgmlType::Q6_K)
}

/// Types with a scale per 16 elements inside the integer sum (`sc_0`, `sc_1`).
fn scaled(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q6_K)
}

/// The exact integer dot of one block at `w` (its first byte), as 8 partial i32; with
/// `V`, by AVX-512 VNNI (the same partial sums).
///
/// # Safety
/// `w` points at a whole block of type `ty`; the caller enables AVX2 and, with `V`,
/// AVX-512 VNNI + VL.
#[inline(always)]
unsafe fn block_partials<const V: bool>(ty: GgmlType, w: *const u8, x: &Q8Act) -> __m256i {
    // SAFETY: Q8Act::qs is 32 bytes; the block holds the bytes read (caller's contract).
    unsafe {
        let xv = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
        // Signed weights: |w| · (x · sign(w)).
        let sdot = |q: __m256i| dot4::<V>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
        match ty {
            GgmlType::Q4_1 => dot4::<V>(nibbles16(w.add(4)), xv),
            GgmlType::Q4_0 => sdot(_mm256_sub_epi8(nibbles16(w.add(2)), _mm256_set1_epi8(8))),
            GgmlType::Q5_0 => sdot(_mm256_sub_epi8(fives(w.add(2)), _mm256_set1_epi8(16))),
            GgmlType::Q5_1 => dot4::<V>(fives(w.add(4)), xv),
            _ => sdot(_mm256_loadu_si256(w.add(2) as *const __m256i)),
        }
    }
}

/// The 32 unsigned 5-bit quants of a Q5_0/Q5_1 block whose 4 high-bit bytes are at `p`
/// (16 bytes of nibbles follow).
///
/// # Safety
/// `p` points at 20 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fives(p: *const u8) -> __m256i {
    // SAFETY: caller's contract.
    let (qh, lo) = unsafe { (std::ptr::read_unaligned(p as *const u32), nibbles16(p.add(4))) };
    _mm256_or_si256(lo, _mm256_and_si256(bits32(qh), _mm256_set1_epi8(0x10)))
}

/// Byte `i` is 0xff where bit `i` of `h` is set, else 0.
#[inline]
#[target_feature(enable = "avx2")]
fn bits32(h: u32) -> __m256i {
    // Byte i takes byte i / 8 of h (each 128-bit lane shuffles within itself; every
    // 32-bit group of the broadcast holds all of h), then tests its bit i % 8.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let v = _mm256_shuffle_epi8(_mm256_set1_epi32(h as i32), spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit)
}

/// One K-quant super-block decoded for SIMD: its eight chunks' quants as bytes in
/// element order, the i16 multipliers of each chunk's pair sums (`sc_0` in the low
/// 128 bits, `sc_1` in the high; ones where the type has none), Q2_K's minimums alike,
/// and the chunks' f32 factors `dw`, `mw` (see [`chunk::Chunk`]).
struct KGroup {
    q: [__m256i; 8],
    sc: [__m256i; 8],
    mins: [__m256i; 8],
    dw: __m256,
    mw: __m256,
}

/// The pair multipliers of chunk `j` from 16 i8 per-16 scales: scale `2j` for the
/// chunk's first 16 elements, `2j + 1` for the rest.
#[inline]
#[target_feature(enable = "avx2")]
fn pair_scales(s: __m128i, j: usize) -> __m256i {
    let (a, b) = (2 * j as i64, 2 * j as i64 + 1);
    let pick = _mm_set_epi64x(b * 0x0101_0101_0101_0101, a * 0x0101_0101_0101_0101);
    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s, pick))
}

/// `v >> n` in each 16-bit lane, `n` not a constant.
#[inline]
#[target_feature(enable = "avx2")]
fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// Decode the super-block at `b` (see [`chunk::decode`] for the layouts).
///
/// # Safety
/// `b` points at a whole block of `ty`, a K-quant.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn kgroup(ty: GgmlType, b: *const u8) -> KGroup {
    // SAFETY: every offset read lies inside the block (caller's contract).
    unsafe {
        let ld = |o: usize| _mm256_loadu_si256(b.add(o) as *const __m256i);
        let f16 = |o: usize| f16_to_f32(u16::from_le_bytes([*b.add(o), *b.add(o + 1)]));
        let m4 = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut g = KGroup {
            q: [_mm256_setzero_si256(); 8],
            sc: [ones; 8],
            mins: [ones; 8],
            dw: _mm256_setzero_ps(),
            mw: _mm256_setzero_ps(),
        };
        match ty {
            GgmlType::Q4_K | GgmlType::Q5_K => {
                // The 12 packed 6-bit scales and minimums (chunk::k_scale_min), 8 bytes each.
                let u = [0, 4, 8].map(|o| std::ptr::read_unaligned(b.add(4 + o) as *const u32));
                let sc_hi = (u[2] & 0x0f0f_0f0f) | (((u[0] >> 6) & 0x0303_0303) << 4);
                let m_hi = ((u[2] >> 4) & 0x0f0f_0f0f) | (((u[1] >> 6) & 0x0303_0303) << 4);
                let sc = u64::from(u[0] & 0x3f3f_3f3f) | (u64::from(sc_hi) << 32);
                let m = u64::from(u[1] & 0x3f3f_3f3f) | (u64::from(m_hi) << 32);
                let widen = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
                // Exact products (11-bit significand times 6-bit integer).
                g.dw = _mm256_mul_ps(_mm256_set1_ps(f16(0)), widen(sc));
                g.mw = _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(f16(2)), widen(m)), _mm256_set1_ps(-0.0));
                let qs = if ty == GgmlType::Q5_K { 48 } else { 16 };
                let hb = ld(16);
                for c in 0..4 {
                    let v = ld(qs + 32 * c);
                    g.q[2 * c] = _mm256_and_si256(v, m4);
                    g.q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                if ty == GgmlType::Q5_K {
                    for (j, q) in g.q.iter_mut().enumerate() {
                        let h = _mm256_and_si256(srl16(hb, j), _mm256_set1_epi8(1));
                        *q = _mm256_or_si256(*q, _mm256_slli_epi16(h, 4));
                    }
                }
            }
            GgmlType::Q6_K => {
                g.dw = _mm256_set1_ps(f16(208));
                let s = _mm_loadu_si128(b.add(192) as *const __m128i);
                let m2 = _mm256_set1_epi8(3);
                for h in 0..2 {
                    let (l0, l1, hb) = (ld(64 * h), ld(64 * h + 32), ld(128 + 32 * h));
                    let lows = [
                        _mm256_and_si256(l0, m4),
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    ];
                    for (sft, lo) in lows.into_iter().enumerate() {
                        let hi = _mm256_slli_epi16(_mm256_and_si256(srl16(hb, 2 * sft), m2), 4);
                        g.q[4 * h + sft] = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
                    }
                }
                for (j, sc) in g.sc.iter_mut().enumerate() {
                    *sc = pair_scales(s, j);
                }
            }
            GgmlType::Q3_K => {
                g.dw = _mm256_set1_ps(f16(108));
                let hm = ld(0);
                let one = _mm256_set1_epi8(1);
                for h in 0..2 {
                    let v = ld(32 + 32 * h);
                    for sft in 0..4 {
                        let j = 4 * h + sft;
                        let lo = _mm256_and_si256(srl16(v, 2 * sft), _mm256_set1_epi8(3));
                        // A clear high bit means −4.
                        let neg = _mm256_xor_si256(_mm256_and_si256(srl16(hm, j), one), one);
                        g.q[j] = _mm256_sub_epi8(lo, _mm256_slli_epi16(neg, 2));
                    }
                }
                let sc = chunk::q3k_scales(std::slice::from_raw_parts(b.add(96), 12));
                let s = _mm_loadu_si128(sc.as_ptr() as *const __m128i);
                for (j, v) in g.sc.iter_mut().enumerate() {
                    *v = pair_scales(s, j);
                }
            }
            GgmlType::Q2_K => {
                g.dw = _mm256_set1_ps(f16(80));
                g.mw = _mm256_set1_ps(f16(82));
                let raw = _mm_loadu_si128(b as *const __m128i);
                let sc = _mm_and_si128(raw, _mm_set1_epi8(15));
                let m = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(15));
                for h in 0..2 {
                    let v = ld(16 + 32 * h);
                    for sft in 0..4 {
                        g.q[4 * h + sft] = _mm256_and_si256(srl16(v, 2 * sft), _mm256_set1_epi8(3));
                    }
                }
                for j in 0..8 {
                    g.sc[j] = pair_scales(sc, j);
                    g.mins[j] = pair_scales(m, j);
                }
            }
            _ => {}
        }
        g
    }
}

/// The 8 terms of one decoded super-block against its 8 activation blocks, in the
/// canonical operation order of [`chunk::Chunk::term`]. With `V` (AVX-512 VNNI, enabled by the caller), the unsigned types without scales in
/// the sum (Q4_K, Q5_K) take `vpdpbusd`: the same exact partial sums.
///
/// # Safety
/// The caller enables AVX2 and, with `V`, AVX-512 VNNI + VL.
#[inline(always)]
unsafe fn kgroup_terms<const V: bool>(ty: GgmlType, g: &KGroup, x: &[Q8Act], dx: __m256, sx: __m256) -> __m256 {
    // SAFETY: the instructions are enabled by the caller; Q8Act::qs is 32 bytes.
    unsafe {
        let sgn = signed(ty);
        let mut p = [_mm256_setzero_si256(); 8];
        let mut pm = [_mm256_setzero_si256(); 8];
        for j in 0..8 {
            let xv = _mm256_loadu_si256(x[j].qs.as_ptr() as *const __m256i);
            if V && !sgn && !scaled(ty) {
                p[j] = dot4::<true>(g.q[j], xv);
                continue;
            }
            let pairs = if sgn {
                _mm256_maddubs_epi16(_mm256_sign_epi8(g.q[j], g.q[j]), _mm256_sign_epi8(xv, g.q[j]))
            } else {
                _mm256_maddubs_epi16(g.q[j], xv)
            };
            p[j] = _mm256_madd_epi16(pairs, g.sc[j]);
            if ty == GgmlType::Q2_K {
                pm[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), xv), g.mins[j]);
            }
        }
        let s = _mm256_cvtepi32_ps(hsum8(&p));
        let t = _mm256_mul_ps(_mm256_mul_ps(g.dw, dx), s);
        match chunk::form(ty) {
            Form::Plain => t,
            Form::Min => _mm256_add_ps(t, _mm256_mul_ps(g.mw, sx)),
            Form::SubMin => {
                let m = _mm256_cvtepi32_ps(hsum8(&pm));
                _mm256_sub_ps(t, _mm256_mul_ps(_mm256_mul_ps(g.mw, dx), m))
            }
        }
    }
}

const KTYPES: [GgmlType; 5] = [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

/// [`dot_row_avx2`] for a K-quant: super-block `g` is group `g` of 8 chunks.
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_row_kquant(ty: GgmlType, row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32], vnni: bool) -> f32 {
    // One copy per type, so that the decoding's branches on the type fold away.
    // SAFETY: same contract (VNNI only where the caller found it).
    unsafe {
        match ty {
            GgmlType::Q2_K => dot_row_k::<0>(row, x, xd, xs),
            GgmlType::Q3_K => dot_row_k::<1>(row, x, xd, xs),
            GgmlType::Q4_K if vnni => dot_row_kv::<2>(row, x, xd, xs),
            GgmlType::Q4_K => dot_row_k::<2>(row, x, xd, xs),
            GgmlType::Q5_K if vnni => dot_row_kv::<3>(row, x, xd, xs),
            GgmlType::Q5_K => dot_row_k::<3>(row, x, xd, xs),
            _ => dot_row_k::<4>(row, x, xd, xs),
        }
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_row_k<const T: usize>(row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32]) -> f32 {
    // SAFETY: same contract.
    unsafe { dot_row_k_body::<T, false>(row, x, xd, xs) }
}

#[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
unsafe fn dot_row_kv<const T: usize>(row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32]) -> f32 {
    // SAFETY: same contract.
    unsafe { dot_row_k_body::<T, true>(row, x, xd, xs) }
}

/// The body of [`dot_row_k`] and [`dot_row_kv`], inlined into each.
///
/// # Safety
/// As [`dot_row_avx2`]; the caller enables AVX2, F16C and, with `V`, AVX-512 VNNI + VL.
#[inline(always)]
unsafe fn dot_row_k_body<const T: usize, const V: bool>(row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32]) -> f32 {
    let ty = KTYPES[T];
    let bb = ty.block_bytes();
    let groups = x.len() / 8;
    assert!(x.len().is_multiple_of(8) && row.len() >= groups * bb, "row of {} bytes for {} chunks", row.len(), x.len());
    assert!(xd.len() >= x.len() && xs.len() >= x.len(), "activation scales for {} blocks", x.len());
    // SAFETY: the instructions are enabled by the caller; super-block g lies inside the
    // row, scales 8g..8g + 8 inside xd, xs (asserted above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for g in 0..groups {
            let dec = kgroup(ty, row.as_ptr().add(g * bb));
            let (dx, sx) = (_mm256_loadu_ps(xd.as_ptr().add(8 * g)), _mm256_loadu_ps(xs.as_ptr().add(8 * g)));
            // Rotating the four keeps them in registers (see `dot_rows_t`).
            let t = kgroup_terms::<V>(ty, &dec, &x[8 * g..8 * g + 8], dx, sx);
            acc = [acc[1], acc[2], acc[3], _mm256_add_ps(acc[0], t)];
        }
        let k = groups % 4;
        butterfly4([acc[(4 - k) % 4], acc[(5 - k) % 4], acc[(6 - k) % 4], acc[(7 - k) % 4]])
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
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot_row_avx2(
    ty: GgmlType,
    row: &[u8],
    x: &[Q8Act],
    xd: &[f32],
    xs: &[f32],
    xn: &[i32],
    vnni: bool,
) -> f32 {
    // One copy per type, so that the branches on the type fold away (a shared copy
    // cost 20 % of decode on SmolLM2's Q4_1).
    // SAFETY: same contract.
    unsafe {
        match ty {
            GgmlType::Q4_0 if vnni => dot_row_bv::<0>(row, x, xd, xs, xn),
            GgmlType::Q4_0 => dot_row_b::<0>(row, x, xd, xs),
            GgmlType::Q4_1 if vnni => dot_row_bv::<1>(row, x, xd, xs, xn),
            GgmlType::Q4_1 => dot_row_b::<1>(row, x, xd, xs),
            GgmlType::Q5_0 if vnni => dot_row_bv::<2>(row, x, xd, xs, xn),
            GgmlType::Q5_0 => dot_row_b::<2>(row, x, xd, xs),
            GgmlType::Q5_1 if vnni => dot_row_bv::<3>(row, x, xd, xs, xn),
            GgmlType::Q5_1 => dot_row_b::<3>(row, x, xd, xs),
            GgmlType::Q8_0 if vnni => dot_row_bv::<4>(row, x, xd, xs, xn),
            GgmlType::Q8_0 => dot_row_b::<4>(row, x, xd, xs),
            _ => dot_row_kquant(ty, row, x, xd, xs, vnni),
        }
    }
}

/// [`dot_row_avx2`] of `out.len()` consecutive rows of `row_bytes` bytes each, from
/// `rows`: the type's kernel chosen once, not per row (a decode step's output head is
/// 262,144 short rows, where a per-row dispatch cost ~10 % of the step).
///
/// # Safety
/// As [`dot_row_avx2`] for each row; `rows` holds `out.len() * row_bytes` bytes.
#[target_feature(enable = "avx2,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot_row_each_avx2(
    ty: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    x: &[Q8Act],
    xd: &[f32],
    xs: &[f32],
    xn: &[i32],
    vnni: bool,
    out: &mut [f32],
) {
    assert!(rows.len() >= out.len() * row_bytes, "{} rows of {row_bytes} bytes in {}", out.len(), rows.len());
    // SAFETY: same contract, per row.
    unsafe {
        match ty {
            GgmlType::Q4_0 if vnni => each_bv::<0>(rows, row_bytes, x, xd, xs, xn, out),
            GgmlType::Q4_1 if vnni => each_bv::<1>(rows, row_bytes, x, xd, xs, xn, out),
            GgmlType::Q5_0 if vnni => each_bv::<2>(rows, row_bytes, x, xd, xs, xn, out),
            GgmlType::Q5_1 if vnni => each_bv::<3>(rows, row_bytes, x, xd, xs, xn, out),
            GgmlType::Q8_0 if vnni => each_bv::<4>(rows, row_bytes, x, xd, xs, xn, out),
            GgmlType::Q4_K if vnni => each_kv::<2>(rows, row_bytes, x, xd, xs, out),
            GgmlType::Q5_K if vnni => each_kv::<3>(rows, row_bytes, x, xd, xs, out),
            _ => {
                for (o, v) in out.iter_mut().enumerate() {
                    *v = dot_row_avx2(ty, &rows[o * row_bytes..(o + 1) * row_bytes], x, xd, xs, xn, vnni);
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl,avx512bw")]
unsafe fn each_bv<const T: usize>(
    rows: &[u8],
    row_bytes: usize,
    x: &[Q8Act],
    xd: &[f32],
    xs: &[f32],
    xn: &[i32],
    out: &mut [f32],
) {
    for (row, v) in rows.chunks_exact(row_bytes).zip(out.iter_mut()) {
        // SAFETY: same contract as `dot_row_bv`.
        *v = unsafe { dot_row_b_body::<T, true>(row, x, xd, xs, xn) };
    }
}

#[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
unsafe fn each_kv<const T: usize>(rows: &[u8], row_bytes: usize, x: &[Q8Act], xd: &[f32], xs: &[f32], out: &mut [f32]) {
    for (row, v) in rows.chunks_exact(row_bytes).zip(out.iter_mut()) {
        // SAFETY: same contract as `dot_row_kv`.
        *v = unsafe { dot_row_k_body::<T, true>(row, x, xd, xs) };
    }
}

/// The 32-element block types, by the index [`dot_row_b`] and [`dot_rows_b`] take.
const BTYPES: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_row_b<const T: usize>(row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32]) -> f32 {
    // SAFETY: same contract.
    unsafe { dot_row_b_body::<T, false>(row, x, xd, xs, &[]) }
}

/// With VNNI, signed weights are offset to unsigned (`q + 2^s`, the offset times the
/// block's quant sum `xn` taken back from the exact integer sum), which spares the
/// sign trick; Q5_0's fifth bits are added under a byte mask (AVX-512 BW).
#[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl,avx512bw")]
unsafe fn dot_row_bv<const T: usize>(row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32], xn: &[i32]) -> f32 {
    // SAFETY: same contract.
    unsafe { dot_row_b_body::<T, true>(row, x, xd, xs, xn) }
}

/// The exact integer dot of one block at `w` as 8 partial i32, with signed quants
/// offset by `2^offset_shift(ty)` (the caller takes `offset · Σ x` back).
///
/// # Safety
/// `w` points at a whole block of `ty` (a 32-element type); AVX2, AVX-512 VNNI, VL and
/// BW are enabled by the caller.
#[inline(always)]
unsafe fn block_partials_offset(ty: GgmlType, w: *const u8, x: &Q8Act) -> __m256i {
    // SAFETY: Q8Act::qs is 32 bytes; the block holds the bytes read (caller's contract).
    unsafe {
        let xv = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
        let u = match ty {
            GgmlType::Q4_0 => nibbles16(w.add(2)),
            GgmlType::Q5_0 => {
                let qh = std::ptr::read_unaligned(w.add(2) as *const u32);
                let lo = nibbles16(w.add(6));
                _mm256_mask_add_epi8(lo, qh, lo, _mm256_set1_epi8(16))
            }
            GgmlType::Q8_0 => _mm256_xor_si256(_mm256_loadu_si256(w.add(2) as *const __m256i), _mm256_set1_epi8(-128)),
            GgmlType::Q4_1 => nibbles16(w.add(4)),
            _ => fives(w.add(4)),
        };
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xv)
    }
}

/// The body of [`dot_row_b`] and [`dot_row_bv`], inlined into each.
///
/// # Safety
/// As [`dot_row_avx2`]; the caller enables AVX2, F16C and, with `V`, AVX-512 VNNI + VL.
#[inline(always)]
unsafe fn dot_row_b_body<const T: usize, const V: bool>(
    row: &[u8],
    x: &[Q8Act],
    xd: &[f32],
    xs: &[f32],
    xn: &[i32],
) -> f32 {
    // SAFETY: the instructions are enabled by the caller; the reads are justified below.
    unsafe {
        let ty = BTYPES[T];
        let form = chunk::form(ty);
        let bb = ty.block_bytes();
        let nb = x.len();
        let groups = nb.div_ceil(GROUP);
        assert!(row.len() >= nb * bb, "row of {} bytes for {nb} blocks", row.len());
        assert!(xd.len() >= groups * GROUP && xs.len() >= groups * GROUP, "activation scales for {nb} blocks");
        // With VNNI, a signed type's quants are offset (see `dot_row_bv`).
        let sh = if V { offset_shift(ty) } else { None };
        assert!(sh.is_none() || xn.len() >= groups * GROUP, "activation sums for {nb} blocks");
        let base = row.as_ptr();
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // Byte offsets of 8 consecutive blocks' first 4 bytes: `d` and, for the types with
        // a minimum, `m` (the others' quants there are ignored).
        let offs = _mm256_mullo_epi32(lane, _mm256_set1_epi32(bb as i32));
        // Per 128-bit half: the four low f16 (`d`) first, then the four high (`m`).
        let split = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
        );
        // Group g goes to register g % 4; rotating the four after each group keeps them in
        // registers: the next one to take a group is always `acc[0]`.
        let mut acc = [_mm256_setzero_ps(); 4];
        for g in 0..groups {
            let b0 = g * GROUP;
            let cnt = (nb - b0).min(GROUP);
            let mut p = [_mm256_setzero_si256(); 8];
            let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt as i32), lane);
            // SAFETY: blocks b0 .. b0 + cnt lie inside the row; the gather reads only the
            // lanes of those blocks (the mask); scales b0 .. b0 + 8 lie inside xd, xs.
            let (raw, dx, sx) = {
                let at = base.add(b0 * bb);
                // (No closure here: it would not inherit the target features, and its
                // intrinsics would become calls.)
                if V && sh.is_some() {
                    if cnt == GROUP {
                        for (k, pk) in p.iter_mut().enumerate() {
                            *pk = block_partials_offset(ty, at.add(k * bb), &x[b0 + k]);
                        }
                    } else {
                        for (k, pk) in p.iter_mut().enumerate().take(cnt) {
                            *pk = block_partials_offset(ty, at.add(k * bb), &x[b0 + k]);
                        }
                    }
                } else if cnt == GROUP {
                    for (k, pk) in p.iter_mut().enumerate() {
                        *pk = block_partials::<V>(ty, at.add(k * bb), &x[b0 + k]);
                    }
                } else {
                    for (k, pk) in p.iter_mut().enumerate().take(cnt) {
                        *pk = block_partials::<V>(ty, at.add(k * bb), &x[b0 + k]);
                    }
                }
                let raw = _mm256_mask_i32gather_epi32::<1>(_mm256_setzero_si256(), at as *const i32, offs, live);
                (raw, _mm256_loadu_ps(xd.as_ptr().add(b0)), _mm256_loadu_ps(xs.as_ptr().add(b0)))
            };
            let mut isum = hsum8(&p);
            if let Some(sh) = sh {
                // SAFETY: sums b0 .. b0 + 8 lie inside xn (asserted above).
                let n = _mm256_loadu_si256(xn.as_ptr().add(b0) as *const __m256i);
                isum = _mm256_sub_epi32(isum, _mm256_sll_epi32(n, _mm_cvtsi32_si128(sh)));
            }
            let isum = _mm256_cvtepi32_ps(isum);
            // Low 128 bits: the eight `d`; high: the eight `m`.
            let h = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(raw, split));
            let dw = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
            let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, dx), isum);
            if form == Form::Min {
                let mw = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
                t = _mm256_add_ps(t, _mm256_mul_ps(mw, sx));
            }
            let sum = _mm256_add_ps(acc[0], t);
            // A partial group updates only its own lanes (a blend, not an add of zeros).
            let next = if cnt == GROUP { sum } else { _mm256_blendv_ps(acc[0], sum, _mm256_castsi256_ps(live)) };
            acc = [acc[1], acc[2], acc[3], next];
        }
        // Undo the rotation: register k must hold the groups with g % 4 == k.
        let k = groups % 4;
        butterfly4([acc[(4 - k) % 4], acc[(5 - k) % 4], acc[(6 - k) % 4], acc[(7 - k) % 4]])
    }
}

/// The K-quant part of both row unpackings ([`prepare_row_avx2`],
/// [`prepare_row_unsigned`]): each group of 8 blocks' factors `dw`, `mw` and (Q2_K,
/// Q3_K, Q6_K) pair multipliers into `prep`; each block's 32 quants, signed, to
/// `put(prep, block, q)`, which stores them as its kernel wants them.
///
/// # Safety
/// `row` holds `nb` blocks of the K-quant type `ty`; `prep`'s vectors hold
/// `scales_stride(nb)` entries (and `sc` too where `ty` has pair multipliers).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn unpack_kgroups(
    ty: GgmlType,
    row: &[u8],
    nb: usize,
    prep: &mut RowPrep,
    mut put: impl FnMut(&mut RowPrep, usize, __m256i),
) {
    let bb = ty.block_bytes();
    for g in 0..nb / 8 {
        // SAFETY: super-block g lies inside the row (caller's contract).
        let k = unsafe { kgroup(ty, row.as_ptr().add(g * bb)) };
        // SAFETY: 8 floats into entries 8g..8g + 8 < stride.
        unsafe {
            _mm256_storeu_ps(prep.dw.as_mut_ptr().add(8 * g), k.dw);
            _mm256_storeu_ps(prep.mw.as_mut_ptr().add(8 * g), k.mw);
        }
        for j in 0..8 {
            put(prep, 8 * g + j, k.q[j]);
            if scaled(ty) {
                // SAFETY: 16 i16 are 32 bytes.
                unsafe { _mm256_storeu_si256(prep.sc[8 * g + j].as_mut_ptr() as *mut __m256i, k.sc[j]) };
            }
        }
    }
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
    if scaled(ty) {
        prep.sc.resize(stride, [0; 16]);
    }
    // Padding is never summed (the partial group's lanes are blended out); zeroing it
    // keeps stale blocks of a longer row from lingering.
    for b in nb..stride {
        (prep.w[b], prep.abs[b], prep.dw[b], prep.mw[b]) = ([0; QK], [0; QK], 0.0, 0.0);
    }
    let store = |w: &mut [u8; QK], v: __m256i| {
        // SAFETY: the destination is 32 bytes.
        unsafe { _mm256_storeu_si256(w.as_mut_ptr() as *mut __m256i, v) }
    };
    if ty.is_k_quant() {
        // SAFETY: the row holds `nb` blocks (caller's contract); `prep` is sized above.
        unsafe {
            unpack_kgroups(ty, row, nb, prep, |prep, b, q| {
                store(&mut prep.w[b], q);
                store(&mut prep.abs[b], _mm256_sign_epi8(q, q));
            })
        };
        return;
    }
    let widen = |h: u16| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))));
    for b in 0..nb {
        let blk = &row[b * bb..(b + 1) * bb];
        prep.dw[b] = widen(u16::from_le_bytes([blk[0], blk[1]]));
        // SAFETY: the block holds the bytes read (caller's contract).
        let w = unsafe {
            match ty {
                GgmlType::Q4_1 | GgmlType::Q5_1 => {
                    prep.mw[b] = widen(u16::from_le_bytes([blk[2], blk[3]]));
                    if ty == GgmlType::Q4_1 { nibbles16(blk.as_ptr().add(4)) } else { fives(blk.as_ptr().add(4)) }
                }
                GgmlType::Q4_0 => _mm256_sub_epi8(nibbles16(blk.as_ptr().add(2)), _mm256_set1_epi8(8)),
                GgmlType::Q5_0 => _mm256_sub_epi8(fives(blk.as_ptr().add(2)), _mm256_set1_epi8(16)),
                _ => _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i),
            }
        };
        store(&mut prep.w[b], w);
        store(&mut prep.abs[b], _mm256_sign_epi8(w, w));
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
/// weight row, 8 rows at a time with one row per lane: the same exact integer sums
/// (transposed by [`hsum8`] so that a block's 8 rows share one vector), the same f32
/// operations per block in the same order, block `b` into lane accumulator `b % 32`,
/// and the butterfly run lane-wise over the 32 accumulators. With `vnni` (AVX-512 VNNI
/// with VL, checked by the caller) the integer dot of 4 byte pairs is one `vpdpbusd`
/// instead of `maddubs` + `madd`: exact either way, the same partial sums.
///
/// # Safety
/// `prep` was filled for `nb` blocks; `x` holds `out.len()` rows of `nb` blocks; `dt`,
/// `st` hold `out.len()` rounded up to 8 rows of transposed scales ([`ActScales`]);
/// with `vnni`, the CPU has AVX-512 VNNI and VL.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_rows_avx2(
    ty: GgmlType,
    x: &[Q8Act],
    nb: usize,
    dt: &[f32],
    st: &[f32],
    prep: &RowPrep,
    out: &mut [f32],
    vnni: bool,
) {
    macro_rules! by_type {
        ($f:ident) => {
            match ty {
                GgmlType::Q4_0 => $f::<0>(x, nb, dt, st, prep, out),
                GgmlType::Q4_1 => $f::<1>(x, nb, dt, st, prep, out),
                GgmlType::Q5_0 => $f::<2>(x, nb, dt, st, prep, out),
                GgmlType::Q5_1 => $f::<3>(x, nb, dt, st, prep, out),
                GgmlType::Q8_0 => $f::<4>(x, nb, dt, st, prep, out),
                GgmlType::Q3_K => $f::<5>(x, nb, dt, st, prep, out),
                GgmlType::Q4_K => $f::<6>(x, nb, dt, st, prep, out),
                GgmlType::Q5_K => $f::<7>(x, nb, dt, st, prep, out),
                GgmlType::Q6_K => $f::<8>(x, nb, dt, st, prep, out),
                _ => $f::<9>(x, nb, dt, st, prep, out),
            }
        };
    }
    // One copy per type and instruction set, as for one row.
    // SAFETY: same contract.
    unsafe { if vnni { by_type!(dot_rows_vnni) } else { by_type!(dot_rows_t) } }
}

/// The types [`dot_rows_t`] is instantiated for (the last one: any other).
const RTYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q2_K,
];

#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_rows_t<const T: usize>(x: &[Q8Act], nb: usize, dt: &[f32], st: &[f32], prep: &RowPrep, out: &mut [f32]) {
    // SAFETY: same contract.
    unsafe { dot_rows_body::<T, false>(x, nb, dt, st, prep, out) }
}

#[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
unsafe fn dot_rows_vnni<const T: usize>(
    x: &[Q8Act],
    nb: usize,
    dt: &[f32],
    st: &[f32],
    prep: &RowPrep,
    out: &mut [f32],
) {
    // SAFETY: same contract.
    unsafe { dot_rows_body::<T, true>(x, nb, dt, st, prep, out) }
}

/// The 8 i32 partial sums of 32 byte products `u_i · s_i` (`u` unsigned, `s` signed,
/// no pair above 2^15 in magnitude), 4 consecutive products per lane. Inlined into
/// callers that have the instructions it uses (AVX2; with `V`, AVX-512 VNNI and VL).
///
/// # Safety
/// The CPU has those instructions.
#[inline(always)]
unsafe fn dot4<const V: bool>(u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: caller's contract.
    unsafe {
        if V {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }
}

/// The body of [`dot_rows_t`] and [`dot_rows_vnni`], inlined into each.
///
/// # Safety
/// As [`dot_rows_avx2`]; the caller enables AVX2, F16C and, with `V`, AVX-512 VNNI + VL.
#[inline(always)]
unsafe fn dot_rows_body<const T: usize, const V: bool>(
    x: &[Q8Act],
    nb: usize,
    dt: &[f32],
    st: &[f32],
    prep: &RowPrep,
    out: &mut [f32],
) {
    let ty = RTYPES[T];
    let (sgn, scl, form) = (signed(ty), scaled(ty), chunk::form(ty));
    let wp = prep.w.as_ptr() as *const __m256i;
    let ap = prep.abs.as_ptr() as *const __m256i;
    let sp = prep.sc.as_ptr() as *const __m256i;
    let xp = x.as_ptr();
    // SAFETY: b < nb <= prep's padded length; rows pass·8 + k < out.len() hold nb
    // blocks each; the scales of block b of a pass are 8 floats at t0 + 8b (caller's
    // contract); the instructions are enabled by the caller.
    unsafe {
        for (pass, o8) in out.chunks_mut(ROWS).enumerate() {
            let cnt = o8.len();
            // Lane accumulators of the 8 rows: `acc[j]` holds lane j of each row.
            let mut acc = [_mm256_setzero_ps(); LANES];
            let x0 = pass * ROWS * nb;
            let t0 = pass * nb * ROWS;
            for b in 0..nb {
                let w = _mm256_loadu_si256(wp.add(b));
                let a = if sgn { _mm256_loadu_si256(ap.add(b)) } else { w };
                let sc = if scl { _mm256_loadu_si256(sp.add(b)) } else { _mm256_set1_epi16(1) };
                let block = |k: usize| {
                    let xv = _mm256_loadu_si256((*xp.add(x0 + k * nb + b)).qs.as_ptr() as *const __m256i);
                    let xs = if sgn { _mm256_sign_epi8(xv, w) } else { xv };
                    if scl { _mm256_madd_epi16(_mm256_maddubs_epi16(a, xs), sc) } else { dot4::<V>(a, xs) }
                };
                let mut p = [_mm256_setzero_si256(); ROWS];
                if cnt == ROWS {
                    for (k, pk) in p.iter_mut().enumerate() {
                        *pk = block(k);
                    }
                } else {
                    for (k, pk) in p.iter_mut().enumerate().take(cnt) {
                        *pk = block(k);
                    }
                }
                let isum = _mm256_cvtepi32_ps(hsum8(&p));
                let dx = _mm256_loadu_ps(dt.as_ptr().add(t0 + ROWS * b));
                let mut t = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(*prep.dw.get_unchecked(b)), dx), isum);
                if form == Form::Min {
                    let sx = _mm256_loadu_ps(st.as_ptr().add(t0 + ROWS * b));
                    t = _mm256_add_ps(t, _mm256_mul_ps(_mm256_set1_ps(*prep.mw.get_unchecked(b)), sx));
                }
                let l = &mut acc[b % LANES];
                *l = _mm256_add_ps(*l, t);
            }
            // The butterfly, lane-wise: the same additions of the same pairs for each row.
            let mut off = LANES / 2;
            while off > 0 {
                for j in 0..off {
                    acc[j] = _mm256_add_ps(acc[j], acc[j + off]);
                }
                off /= 2;
            }
            let mut r = [0.0f32; ROWS];
            _mm256_storeu_ps(r.as_mut_ptr(), acc[0]);
            o8.copy_from_slice(&r[..cnt]);
        }
    }
}

/// [`super::quantize_block`] in SIMD, the same operations lane-wise: `amax` by
/// `max` (exact, in any order), `d = amax / 127`, `inv = 1 / d` (0 when `d` is 0),
/// `round_half_away(v · inv)` as truncation plus one away from zero where the exact
/// remainder is at least one half, clamped to ±127. `None` where a value is NaN or
/// infinite or `1 / d` overflows: those blocks take the reference path (its saturating
/// casts decide them).
///
/// # Safety
/// `x` holds 32 values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_block_avx2(x: &[f32]) -> Option<Q8Act> {
    debug_assert_eq!(x.len(), QK);
    // SAFETY: 32 values (caller's contract).
    let v = unsafe { [0, 8, 16, 24].map(|o| _mm256_loadu_ps(x.as_ptr().add(o))) };
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|a| _mm256_andnot_ps(sign, a));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    // Finite everywhere: |v| <= f32::MAX, false for NaN.
    let fin = abs.map(|a| _mm256_cmp_ps::<_CMP_LE_OQ>(a, _mm256_set1_ps(f32::MAX)));
    let all = _mm256_and_ps(_mm256_and_ps(fin[0], fin[1]), _mm256_and_ps(fin[2], fin[3]));
    if _mm256_movemask_ps(all) != 0xff {
        return None;
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    if !inv.is_finite() {
        // A subnormal scale: `0 · inf` would be NaN in a lane.
        return None;
    }
    let invv = _mm256_set1_ps(inv);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let lim = _mm256_set1_ps(127.0);
    let q = v.map(|a| {
        let y = _mm256_mul_ps(a, invv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
        let away = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), _mm256_or_ps(one, _mm256_and_ps(sign, y)));
        let r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, away), _mm256_set1_ps(-127.0)), lim);
        _mm256_cvtps_epi32(r)
    });
    // i32 -> i8 in element order: the packs interleave 128-bit halves, the permute undoes it.
    let p16a = _mm256_packs_epi32(q[0], q[1]);
    let p16b = _mm256_packs_epi32(q[2], q[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256::<1>(s32));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2)));
    let mut b = Q8Act { d, ..Default::default() };
    // SAFETY: 32 bytes into the 32-byte array.
    unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, ordered) };
    b.s = d * sum as f32;
    Some(b)
}

/// The types [`dot_rows_wide_vnni`] has a body for.
const WTYPES: [GgmlType; 9] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q3_K,
];

/// [`super::dot_rows_wide`]'s kernel: activation rows `x` (`rows` of `nb` blocks, their
/// quant sums `xn` and first-half sums `xh` at `stride` per row) against the [`WIDE`]
/// weight rows of `w`;
/// `out[r·WIDE + i]`. Per block the weight words are loaded (and the nibbles unpacked)
/// once, as 8 vectors with one weight row per lane, and serve every activation row:
/// each activation word is broadcast against them, so `vpdpbusd` leaves the 8 rows'
/// exact integer sums lane-wise; then the same f32 operations per block as
/// [`super::dot_row`], into lane accumulator `b % 32`, and the butterfly lane-wise.
///
/// # Safety
/// The CPU has AVX2, F16C, AVX-512 VNNI and VL; `w` holds `nb` blocks; `x` holds
/// `rows·nb` blocks, `xn` and `xh` `rows·stride` sums (`stride ≥ nb`); `out` holds
/// `rows·WIDE` values; `w`'s type is one of [`WTYPES`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_rows_wide_vnni(
    w: WideRef<'_>,
    x: &[Q8Act],
    xn: &[i32],
    xh: &[i32],
    nb: usize,
    stride: usize,
    rows: usize,
    out: &mut [f32],
) {
    macro_rules! by_type {
        ($($i:literal),*) => {
            match w.ty {
                $(t if t == WTYPES[$i] => wide_body::<$i>(w, x, xn, xh, nb, stride, rows, out),)*
                t => unreachable!("no wide kernel for {t}"),
            }
        };
    }
    // One copy per type, so that the branches on the type fold away.
    // SAFETY: same contract.
    unsafe { by_type!(0, 1, 2, 3, 4, 5, 6, 7, 8) }
}

/// The body of [`dot_rows_wide_vnni`] for type `WTYPES[T]`.
///
/// # Safety
/// As [`dot_rows_wide_vnni`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn wide_body<const T: usize>(
    w: WideRef<'_>,
    x: &[Q8Act],
    xn: &[i32],
    xh: &[i32],
    nb: usize,
    stride: usize,
    rows: usize,
    out: &mut [f32],
) {
    let ty = WTYPES[T];
    let (packed, min, sh) = (nibble_packed(ty), chunk::form(ty) == Form::Min, offset_shift(ty));
    let paired = pair_scaled(ty);
    let vecs = wide_vectors(ty);
    let qp = w.q.as_ptr() as *const __m256i;
    // SAFETY: the instructions are enabled by the caller; every pointer read stays
    // inside the lengths of the caller's contract (block b < nb, row r < rows).
    unsafe {
        // Lanes `nb..32` would stay +0.0 and the lanes written are never −0.0 (each
        // starts as +0.0 + t), so adding them is the identity: only the first
        // `min(nb, 32)` lanes are kept and summed.
        let live = nb.min(LANES);
        for (p, o8) in out[..rows * WIDE].chunks_mut(ROWS * WIDE).enumerate() {
            let pr = o8.len() / WIDE;
            let mut acc = [[std::mem::MaybeUninit::<__m256>::uninit(); LANES]; ROWS];
            for b in 0..nb {
                let v = qp.add(b * vecs);
                _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(WIDE_PF * vecs) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().wrapping_add((b + WIDE_PF) * WIDE) as *const i8);
                if min {
                    _mm_prefetch::<_MM_HINT_T0>(w.m.as_ptr().wrapping_add((b + WIDE_PF) * WIDE) as *const i8);
                }
                // Word j of the block's 32 quants, for the 8 weight rows.
                let wv: [__m256i; 8] = if packed {
                    let m4 = _mm256_set1_epi8(0x0f);
                    let raw: [__m256i; 4] = std::array::from_fn(|k| _mm256_load_si256(v.add(k)));
                    // Word k's low nibbles are quants 4k.., its high nibbles 16 + 4k...
                    std::array::from_fn(|j| {
                        if j < 4 {
                            _mm256_and_si256(raw[j], m4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16(raw[j - 4], 4), m4)
                        }
                    })
                } else {
                    std::array::from_fn(|j| _mm256_load_si256(v.add(j)))
                };
                let dw = _mm256_loadu_ps(w.d.as_ptr().add(b * WIDE));
                let mw = if min { _mm256_loadu_ps(w.m.as_ptr().add(b * WIDE)) } else { dw };
                // Q3_K/Q6_K: each half's multiplier, per weight row.
                let (s0, s1) = if paired {
                    let sp = w.sc.as_ptr().add(b * 2 * WIDE) as *const __m256i;
                    (_mm256_loadu_si256(sp), _mm256_loadu_si256(sp.add(1)))
                } else {
                    (_mm256_setzero_si256(), _mm256_setzero_si256())
                };
                for k in 0..pr {
                    let r = p * ROWS + k;
                    let xb = &*x.as_ptr().add(r * nb + b);
                    let xw = xb.qs.as_ptr() as *const i32;
                    let dp = |acc: __m256i, j: usize| {
                        _mm256_dpbusd_epi32(acc, wv[j], _mm256_set1_epi32(std::ptr::read_unaligned(xw.add(j))))
                    };
                    // Minus the offset times the row's quant sum: the integer chains start
                    // from it (exact, in any order).
                    let isum = if paired {
                        // Each half's sum (less its offset), times its multiplier.
                        let (lo, hi) = match sh {
                            Some(s) => {
                                let h = *xh.as_ptr().add(r * stride + b);
                                let n = *xn.as_ptr().add(r * stride + b);
                                (_mm256_set1_epi32(-(h << s)), _mm256_set1_epi32(-((n - h) << s)))
                            }
                            None => (_mm256_setzero_si256(), _mm256_setzero_si256()),
                        };
                        let lo = dp(dp(dp(dp(lo, 0), 1), 2), 3);
                        let hi = dp(dp(dp(dp(hi, 4), 5), 6), 7);
                        _mm256_add_epi32(_mm256_mullo_epi32(lo, s0), _mm256_mullo_epi32(hi, s1))
                    } else {
                        let init = match sh {
                            Some(s) => _mm256_set1_epi32(-(*xn.as_ptr().add(r * stride + b) << s)),
                            None => _mm256_setzero_si256(),
                        };
                        // Two independent chains of four.
                        let a = dp(dp(dp(dp(init, 0), 2), 4), 6);
                        let c = dp(dp(dp(dp(_mm256_setzero_si256(), 1), 3), 5), 7);
                        _mm256_add_epi32(a, c)
                    };
                    let isum = _mm256_cvtepi32_ps(isum);
                    let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xb.d)), isum);
                    if min {
                        t = _mm256_add_ps(t, _mm256_mul_ps(mw, _mm256_set1_ps(xb.s)));
                    }
                    let l = &mut acc[k][b % LANES];
                    let prev = if b < LANES { _mm256_setzero_ps() } else { l.assume_init() };
                    l.write(_mm256_add_ps(prev, t));
                }
            }
            // The butterfly, lane-wise: the same additions of the same pairs for each
            // weight row (those with a +0.0 lane skipped, see above).
            for (a, ok) in acc.iter_mut().zip(o8.chunks_exact_mut(WIDE)) {
                let (mut off, mut n) = (LANES / 2, live);
                while off > 0 {
                    for j in 0..n.saturating_sub(off) {
                        a[j].write(_mm256_add_ps(a[j].assume_init(), a[j + off].assume_init()));
                    }
                    n = n.min(off);
                    off /= 2;
                }
                let sum = if live == 0 { _mm256_setzero_ps() } else { a[0].assume_init() };
                _mm256_storeu_ps(ok.as_mut_ptr(), sum);
            }
        }
    }
}

/// Blocks ahead that [`wide_body`] prefetches.
const WIDE_PF: usize = 4;
