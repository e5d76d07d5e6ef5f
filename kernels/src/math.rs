//! Canonical arithmetic shared by every backend. The CUDA kernels follow this text.
//!
//! # Reduction order (the determinism contract)
//!
//! A reduction of `n` terms `t_0 .. t_{n-1}` is computed as:
//!
//! 1. 32 lanes `l_0 .. l_31`, each starting at `+0.0`. Term `t_i` is added to lane
//!    `i % 32`, in increasing `i` (`l = l + t_i`, one rounding per add).
//! 2. A fixed butterfly: for `off` in `16, 8, 4, 2, 1`: `l_j = l_j + l_{j+off}` for
//!    `j < off`. The result is `l_0`.
//!
//! This is what one CUDA warp does with lane-strided loads and `__shfl_xor_sync`
//! (f32 addition is commutative, so `a + b` and `b + a` are the same bits), and what
//! four 8-wide SIMD registers do on the CPU. Used for: dot products of f32 vectors,
//! the RMSNorm sum of squares, the softmax denominator, and the sum over blocks of a
//! quantized dot product (see `quant`).
//!
//! The attention-weighted sum of values `o[d] = Σ_t p_t · v_t[d]` is sequential in `t`
//! (one thread per `d` on CUDA, one SIMD lane per `d` on the CPU).
//!
//! No fused multiply-add anywhere (NVRTC gets `--fmad=false`; Rust never contracts);
//! no fast-math; division and square root are IEEE correctly rounded.

pub const LANES: usize = 32;

/// The butterfly of step 2 over 32 lane partials.
#[inline]
pub fn butterfly(l: &mut [f32; LANES]) -> f32 {
    let mut off = LANES / 2;
    while off > 0 {
        for j in 0..off {
            l[j] += l[j + off];
        }
        off /= 2;
    }
    l[0]
}

/// Canonical sum of `terms(i)` for `i < n`.
#[inline]
pub fn canonical_sum(n: usize, mut term: impl FnMut(usize) -> f32) -> f32 {
    let mut l = [0.0f32; LANES];
    for i in 0..n {
        l[i % LANES] += term(i);
    }
    butterfly(&mut l)
}

/// Canonical dot product of two f32 vectors (each product rounded, then summed canonically).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if a.len().is_multiple_of(LANES) && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; lengths checked.
        return unsafe { x86::dot_f32_avx(a, b) };
    }
    canonical_sum(a.len(), |i| a[i] * b[i])
}

/// `out[t] = dot_f32(q, row_t) * scale` with `row_t = rows[t·stride..][..q.len()]`:
/// attention's scores over a run of cached keys, in one call (one feature check, one
/// loop) instead of one per position; each the bits of its own [`dot_f32`].
pub fn dot_f32_rows_scaled(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let n = q.len();
    if let Some(last) = out.len().checked_sub(1) {
        assert!(rows.len() >= last * stride + n, "{} rows of {n} values", out.len());
    }
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(LANES) && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; every row's length is asserted above.
        unsafe { x86::dot_f32_rows_scaled_avx(q, rows, stride, scale, out) };
        return;
    }
    for (t, o) in out.iter_mut().enumerate() {
        *o = dot_f32(q, &rows[t * stride..t * stride + n]) * scale;
    }
}

/// Canonical sum of squares.
#[inline]
pub fn sum_sq(a: &[f32]) -> f32 {
    dot_f32(a, a)
}

/// `y_i = (x_i * scale) * w_i` with `scale = 1 / sqrt(sum_sq(x) / n + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = sum_sq(x);
    let mean = ss / x.len() as f32;
    let scale = 1.0f32 / (mean + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = (xi * scale) * wi;
    }
}

// exp(x) from basic operations. Every inexact constant is written as its f32 bit
// pattern, here and in the CUDA header (`#define SAMPO_<NAME> __int_as_float(0x…)`), so
// that no decimal-to-binary conversion by any compiler can make the two differ;
// [`CONSTANT_BITS`] lists them under the header's names and a test compares the texts.
const EXP_HI: f32 = f32::from_bits(0x42B1_7217); // 88.72283: above, +inf
const EXP_LO: f32 = f32::from_bits(0xC2CF_F1B4); // -103.97208: below, 0
const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B); // log2(e) = 1.442695…
// ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
const LN2_HI: f32 = f32::from_bits(0x3F31_7200); // 0.69314575
const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E); // 1.4286068e-6
// Taylor coefficients 1/k! (each the correctly rounded f32 quotient), Horner order:
// 1/5040, 1/720, 1/120, 1/24, 1/6, 1/2, 1.
const P: [f32; 7] = [
    f32::from_bits(0x3950_0D01),
    f32::from_bits(0x3AB6_0B61),
    f32::from_bits(0x3C08_8889),
    f32::from_bits(0x3D2A_AAAB),
    f32::from_bits(0x3E2A_AAAB),
    f32::from_bits(0x3F00_0000),
    f32::from_bits(0x3F80_0000),
];

/// Every canonical constant of the transcendentals as `(name, f32 bits)`: the name is
/// the CUDA header's `SAMPO_<name>` (`kernels/cuda/common.cuh`), which must define it as
/// `__int_as_float(<the same bits>)`.
pub const CONSTANT_BITS: [(&str, u32); 14] = [
    ("EXP_HI", EXP_HI.to_bits()),
    ("EXP_LO", EXP_LO.to_bits()),
    ("LOG2E", LOG2E.to_bits()),
    ("LN2_HI", LN2_HI.to_bits()),
    ("LN2_LO", LN2_LO.to_bits()),
    ("EXP_P0", P[0].to_bits()),
    ("EXP_P1", P[1].to_bits()),
    ("EXP_P2", P[2].to_bits()),
    ("EXP_P3", P[3].to_bits()),
    ("EXP_P4", P[4].to_bits()),
    ("EXP_P5", P[5].to_bits()),
    ("EXP_P6", P[6].to_bits()),
    ("GELU_A", GELU_A.to_bits()),
    ("GELU_K", GELU_K.to_bits()),
];

/// Deterministic `e^x`: `n = floor(x·log2 e + 0.5)`, `r = (x − n·LN2_HI) − n·LN2_LO`,
/// `p(r) = 1 + r·(1 + r·(1/2 + r·(1/6 + …)))` (Horner, degree 7), result `p · 2^n`
/// (scaled in two steps so subnormal results are exact multiplications).
/// Relative error below 2 ulp over the whole range.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    if x < EXP_LO {
        return 0.0;
    }
    let n = floor_small(x * LOG2E + 0.5);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    p = p * r + 1.0;
    let n = n as i32;
    // 2^n split as 2^a · 2^b with both exponents representable as normal floats.
    let a = n / 2;
    let b = n - a;
    p * pow2(a) * pow2(b)
}

/// `y.floor()` for `|y| < 2^31`, without a libm call (Rust's `floor` is one unless the
/// build targets SSE4.1): truncation is exact there, and a truncation above `y` is
/// one too high. `y` is never `-0.0` here (`exp`'s `x·log2 e + 0.5`), so the sign of a
/// zero result cannot differ either.
#[inline]
fn floor_small(y: f32) -> f32 {
    let t = y as i32 as f32;
    if t > y { t - 1.0 } else { t }
}

#[inline]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `silu(x) = x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

// GELU (tanh approximation) constants, as f32 bit patterns (see [`CONSTANT_BITS`]):
// 0.044715 and 2·sqrt(2/π) = 1.5957691216…
const GELU_A: f32 = f32::from_bits(0x3D37_2713);
const GELU_K: f32 = f32::from_bits(0x3FCC_422A);

/// Deterministic GELU, tanh approximation:
/// `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`, computed as the identical
/// `x / (1 + exp(-t))` with `t = GELU_K · (x + GELU_A · ((x·x)·x))` (since
/// `(1 + tanh(u))/2 = 1/(1 + e^(-2u))`), each operation rounded once, in this order,
/// with [`exp`] — no tanh from a platform libm.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let t = GELU_K * (x + GELU_A * ((x * x) * x));
    x / (1.0 + exp(-t))
}

/// `out_i = Σ_t w_t · row_t[i]`, summed in order of `t` from +0.0 (each product
/// rounded, then added), where `row_t = base[t·stride..][..out.len()]`: attention's
/// weighted sum of values. SIMD where the CPU has it (the same operations per element).
pub fn weighted_rows(out: &mut [f32], w: &[f32], base: &[f32], stride: usize) {
    let n = out.len();
    if let Some(last) = w.len().checked_sub(1) {
        assert!(base.len() >= last * stride + n, "{} rows of {n} values", w.len());
    }
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        done = n / 8 * 8;
        // SAFETY: AVX is present; the rows' lengths are asserted above.
        unsafe { x86::weighted_rows_avx(&mut out[..done], w, base, stride) };
    }
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        *o = 0.0;
        for (t, &p) in w.iter().enumerate() {
            *o += p * base[t * stride + i];
        }
    }
}

/// `g_i = silu(g_i) · u_i` (SwiGLU), bit for bit [`silu`] then one multiplication; SIMD
/// where the CPU has it (the same operations lane-wise).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    glu::<false>(g, u);
}

/// `g_i = gelu_tanh(g_i) · u_i` (GeGLU), bit for bit [`gelu_tanh`] then one
/// multiplication; SIMD where the CPU has it.
pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
    glu::<true>(g, u);
}

fn glu<const GELU: bool>(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gate and up lengths");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        done = g.len() / 8 * 8;
        // SAFETY: AVX2 is present; both slices hold `done` values.
        unsafe { x86::glu_avx2::<GELU>(&mut g[..done], &u[..done]) };
    }
    for (gi, ui) in g[done..].iter_mut().zip(&u[done..]) {
        *gi = if GELU { gelu_tanh(*gi) } else { silu(*gi) } * ui;
    }
}

/// Softmax in place: `p_t = exp(s_t - max) / Σ exp(s_u - max)` with the canonical sum.
pub fn softmax(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        done = s.len() / 8 * 8;
        // SAFETY: AVX2 is present; `done` is a multiple of 8.
        unsafe { x86::exp_shifted_avx2(&mut s[..done], max) };
    }
    for v in &mut s[done..] {
        *v = exp(*v - max);
    }
    let sum = canonical_sum(s.len(), |i| s[i]);
    for v in s.iter_mut() {
        *v /= sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Four 8-wide registers are the 32 lanes: register `k`, element `e` is lane `8k + e`.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn dot_f32_avx(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < a.len() {
            for (k, r) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8k + 8 <= len since len % 32 == 0.
                let x = unsafe { _mm256_loadu_ps(a.as_ptr().add(i + 8 * k)) };
                let y = unsafe { _mm256_loadu_ps(b.as_ptr().add(i + 8 * k)) };
                *r = _mm256_add_ps(*r, _mm256_mul_ps(x, y));
            }
            i += 32;
        }
        butterfly4(acc)
    }

    /// [`super::dot_f32_rows_scaled`] on AVX: [`dot_f32_avx`] per row.
    ///
    /// # Safety
    /// AVX is present; `q.len() % 32 == 0`; `rows` holds `(out.len() - 1) * stride +
    /// q.len()` values.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn dot_f32_rows_scaled_avx(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        let n = q.len();
        for (t, o) in out.iter_mut().enumerate() {
            // SAFETY: the caller's contract: row t lies inside `rows`.
            let row = unsafe { std::slice::from_raw_parts(rows.as_ptr().add(t * stride), n) };
            // SAFETY: AVX is enabled here; the lengths are equal multiples of 32.
            *o = unsafe { dot_f32_avx(q, row) } * scale;
        }
    }

    /// [`super::butterfly`] of 32 lanes held in 4 registers (lane `8k + i` in lane `i`
    /// of register `k`): the same additions of the same pairs, several at a time.
    #[inline]
    #[target_feature(enable = "avx")]
    fn butterfly4(a: [__m256; 4]) -> f32 {
        let s16a = _mm256_add_ps(a[0], a[2]); // off 16, lanes 0..8
        let s16b = _mm256_add_ps(a[1], a[3]); // off 16, lanes 8..16
        let s8 = _mm256_add_ps(s16a, s16b); // off 8
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8)); // off 4
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // off 2 (lanes 0, 1)
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) // off 1
    }

    /// [`super::softmax`]'s exponentials, `s_i = exp(s_i − max)`, 8 at a time.
    ///
    /// # Safety
    /// AVX2 is present; `s.len()` is a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn exp_shifted_avx2(s: &mut [f32], max: f32) {
        let m = _mm256_set1_ps(max);
        for c in s.chunks_exact_mut(8) {
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m))) };
        }
    }

    /// [`super::weighted_rows`] for the first `out.len()` (a multiple of 8) values.
    ///
    /// # Safety
    /// AVX is present; `base` holds `w.len()` rows of `stride` values (the last at least
    /// `out.len()`).
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn weighted_rows_avx(out: &mut [f32], w: &[f32], base: &[f32], stride: usize) {
        const R: usize = 8;
        let mut c0 = 0;
        while c0 < out.len() {
            let regs = ((out.len() - c0) / 8).min(R);
            let mut acc = [_mm256_setzero_ps(); R];
            for (t, &p) in w.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                // SAFETY: row t holds values c0 .. c0 + 8·regs (caller's contract).
                let row = unsafe { base.as_ptr().add(t * stride + c0) };
                for (k, a) in acc.iter_mut().enumerate().take(regs) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, unsafe { _mm256_loadu_ps(row.add(8 * k)) }));
                }
            }
            for (k, a) in acc.iter().enumerate().take(regs) {
                // SAFETY: 8 floats inside `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * k), *a) };
            }
            c0 += 8 * regs;
        }
    }

    /// [`super::exp`] lane-wise: the same operations in the same order (the range
    /// checks as blends, `floor_small` by truncation, `n / 2` truncating toward zero).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn exp8(x: __m256) -> __m256 {
        use super::{EXP_HI, EXP_LO, LN2_HI, LN2_LO, LOG2E, P};
        let y = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _mm256_set1_ps(0.5));
        let t = _mm256_cvtepi32_ps(_mm256_cvttps_epi32(y));
        let above = _mm256_cmp_ps::<_CMP_GT_OQ>(t, y);
        let n = _mm256_sub_ps(t, _mm256_and_ps(above, _mm256_set1_ps(1.0)));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0));
        let ni = _mm256_cvttps_epi32(n);
        let a = _mm256_srai_epi32::<1>(_mm256_add_epi32(ni, _mm256_srli_epi32::<31>(ni)));
        let b = _mm256_sub_epi32(ni, a);
        let pow2 =
            |e: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(e, _mm256_set1_epi32(127))));
        let v = _mm256_mul_ps(_mm256_mul_ps(p, pow2(a)), pow2(b));
        let hi = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_HI));
        let lo = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let v = _mm256_blendv_ps(v, _mm256_set1_ps(f32::INFINITY), hi);
        let v = _mm256_blendv_ps(v, _mm256_setzero_ps(), lo);
        _mm256_blendv_ps(v, x, nan)
    }

    /// [`super::glu`] for lengths that are multiples of 8.
    ///
    /// # Safety
    /// AVX2 is present; `g.len() == u.len()`, a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn glu_avx2<const GELU: bool>(g: &mut [f32], u: &[f32]) {
        use super::{GELU_A, GELU_K};
        let neg = _mm256_set1_ps(-0.0);
        for (gc, uc) in g.chunks_exact_mut(8).zip(u.chunks_exact(8)) {
            // SAFETY: 8 floats each.
            let (x, uv) = unsafe { (_mm256_loadu_ps(gc.as_ptr()), _mm256_loadu_ps(uc.as_ptr())) };
            let e = if GELU {
                let cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                let t = _mm256_mul_ps(
                    _mm256_set1_ps(GELU_K),
                    _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(GELU_A), cube)),
                );
                exp8(_mm256_xor_ps(t, neg))
            } else {
                exp8(_mm256_xor_ps(x, neg))
            };
            let act = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(gc.as_mut_ptr(), _mm256_mul_ps(act, uv)) };
        }
    }
}

/// The one NaN every backend returns as a logit: the positive quiet NaN with no payload.
pub const CANONICAL_NAN: u32 = 0x7FC0_0000;

/// Replace every NaN logit by [`CANONICAL_NAN`]; both backends call this at the logits
/// boundary. NaN-ness follows from the canonical arithmetic, but a NaN's sign and
/// payload do not: x86 makes the negative "default NaN" 0xFFC00000 and passes payloads
/// through, a GPU makes 0x7FFFFFFF. Canonicalizing (rather than refusing NaN with an
/// error) keeps a model serving that has one poisoned row in its output head — the
/// sampler already ranks a NaN as -inf — while every byte that leaves a backend (the
/// self-test's comparison and digest, evidence, replay) is the same on every machine.
pub fn canonicalize_nans(logits: &mut [f32]) {
    for v in logits.iter_mut().filter(|v| v.is_nan()) {
        *v = f32::from_bits(CANONICAL_NAN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_of_a_run_of_rows_are_each_rows_dot() {
        // Head dims on and off the 32-lane path, 0 to 9 rows, a stride wider than a row.
        let val = |i: usize| ((i * 2_654_435_761) % 1000) as f32 / 97.0 - 5.0;
        for n in [32usize, 64, 96, 7, 40] {
            let stride = n + 13;
            let q: Vec<f32> = (0..n).map(|i| val(i + 3)).collect();
            let rows: Vec<f32> = (0..9 * stride + n).map(val).collect();
            for count in 0..=9usize {
                let mut out = vec![f32::NAN; count];
                dot_f32_rows_scaled(&q, &rows, stride, 0.125, &mut out);
                for (t, o) in out.iter().enumerate() {
                    let want = dot_f32(&q, &rows[t * stride..t * stride + n]) * 0.125;
                    assert_eq!(o.to_bits(), want.to_bits(), "n {n}, row {t} of {count}");
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut x = -100.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            if want >= f32::MIN_POSITIVE as f64 {
                let rel = ((got - want) / want).abs();
                assert!(rel < 3e-7, "exp({x}) = {got}, want {want}, rel {rel}");
            } else {
                // Subnormal: within two steps of the subnormal grid.
                assert!((got - want).abs() <= 2.0 * 1.4e-45, "exp({x}) = {got}, want {want}");
            }
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn floor_small_is_floor_on_exps_range() {
        // `x·log2 e + 0.5` is never -0.0 (a sum that is exactly zero rounds to +0.0).
        assert_eq!((-0.5f32 + 0.5).to_bits(), 0);
        // Every f32 within a few ulps of each integer in exp's range, and a stride
        // through all the values between.
        for n in -151i32..=130 {
            let c = n as f32;
            let mut y = c;
            for _ in 0..64 {
                y = y.next_down();
            }
            for _ in 0..129 {
                // -0.0 is the one exception, and exp never asks for it.
                if y.to_bits() != (-0.0f32).to_bits() {
                    assert_eq!(floor_small(y).to_bits(), y.floor().to_bits(), "{y}");
                }
                y = y.next_up();
            }
        }
        let (lo, hi) = ((-151.0f32).to_bits(), 131.0f32.to_bits());
        for b in (0..hi).step_by(997).chain((0x8000_0001..lo).step_by(997)) {
            let y = f32::from_bits(b);
            assert_eq!(floor_small(y).to_bits(), y.floor().to_bits(), "{y}");
        }
    }

    #[test]
    fn silu_matches_definition() {
        for x in [-10.0f32, -1.0, 0.0, 0.5, 3.0, 20.0] {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!((silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
        }
    }

    #[test]
    fn exp_constants_are_the_documented_values() {
        // The bit patterns are these decimals (as rustc rounds them) and these quotients.
        assert_eq!(EXP_HI, 88.72283f32);
        assert_eq!(EXP_LO, -103.97208f32);
        assert_eq!(LOG2E, std::f32::consts::LOG2_E);
        assert_eq!(LN2_HI, 0.693_145_75f32);
        assert_eq!(LN2_LO, 1.428_606_8e-6f32);
        // LN2_HI has 9 low zero bits: n * LN2_HI is exact for |n| < 2^9.
        assert_eq!(LN2_HI.to_bits() & 0x1ff, 0);
        let fact = [5040.0f32, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0];
        for (p, f) in P.iter().zip(fact) {
            assert_eq!(p.to_bits(), (1.0f32 / f).to_bits(), "1/{f}");
        }
    }

    #[test]
    fn gelu_constants_are_the_documented_values() {
        assert_eq!(GELU_A, 0.044715f32);
        assert_eq!(GELU_K, (2.0 * (2.0 / std::f64::consts::PI).sqrt()) as f32);
    }

    #[test]
    fn gelu_tanh_matches_definition() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
            let want = 0.5 * xd * (1.0 + u.tanh());
            let got = gelu_tanh(x) as f64;
            assert!((got - want).abs() <= 2e-6 * want.abs().max(1e-3), "gelu({x}) = {got}, want {want}");
            x += 0.0173;
        }
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert_eq!(gelu_tanh(1e30), 1e30);
        assert_eq!(gelu_tanh(-1e30), 0.0);
        assert!(gelu_tanh(f32::NAN).is_nan());
    }

    #[test]
    fn simd_dot_matches_canonical_scalar_bits() {
        let a: Vec<f32> = (0..576).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let b: Vec<f32> = (0..576).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021).collect();
        let scalar = canonical_sum(a.len(), |i| a[i] * b[i]);
        assert_eq!(dot_f32(&a, &b).to_bits(), scalar.to_bits());
    }

    #[test]
    fn simd_glu_is_the_scalar_bits() {
        // Ordinary values, both range ends of exp (and past them), zeros, subnormals,
        // infinities and large magnitudes, with a tail that is not a multiple of 8.
        let mut g: Vec<f32> = (0..2000).map(|i| (i as f32 - 1000.0) * 0.013).collect();
        g.extend([0.0, -0.0, 1e-40, -1e-40, 88.0, 89.0, -103.0, -104.0, -110.0, 1e30, -1e30]);
        g.extend([f32::INFINITY, f32::NEG_INFINITY, 30.0, -30.0, 5.5, -5.5, 1e-3]);
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for gelu in [false, true] {
            let mut got = g.clone();
            if gelu {
                gelu_mul(&mut got, &u)
            } else {
                silu_mul(&mut got, &u)
            }
            for (i, (&x, &y)) in g.iter().zip(&got).enumerate() {
                let want = if gelu { gelu_tanh(x) } else { silu(x) } * u[i];
                assert_eq!(y.to_bits(), want.to_bits(), "gelu={gelu} x={x:e}");
            }
        }
    }

    #[test]
    fn simd_softmax_is_the_scalar_bits() {
        for n in [1usize, 7, 8, 9, 31, 64, 100] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 1.7).collect();
            let mut got = v.clone();
            softmax(&mut got);
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = v.iter().map(|x| exp(x - max)).collect();
            let sum = canonical_sum(n, |i| e[i]);
            let want: Vec<u32> = e.iter().map(|x| (x / sum).to_bits()).collect();
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "n={n}");
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut s = vec![1.0f32, 2.0, 3.0, -1.0];
        softmax(&mut s);
        let total: f32 = s.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }
}
