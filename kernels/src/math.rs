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

/// Softmax in place: `p_t = exp(s_t - max) / Σ exp(s_u - max)` with the canonical sum.
pub fn softmax(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in s.iter_mut() {
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
        let mut l = [0.0f32; 32];
        for (k, r) in acc.iter().enumerate() {
            // SAFETY: 8 floats into a 32-float array at 8k.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr().add(8 * k), *r) };
        }
        super::butterfly(&mut l)
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
    fn softmax_sums_to_one() {
        let mut s = vec![1.0f32, 2.0, 3.0, -1.0];
        softmax(&mut s);
        let total: f32 = s.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }
}
