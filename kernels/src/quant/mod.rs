//! Quantized blocks and their dot products.
//!
//! Activations are quantized per block of 32 to 8 bits (`Q8Act`), for every weight
//! type alike. A weight row is read as *chunks* of 32 elements, chunk `c` against
//! activation block `c`: a block of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, or one of the eight
//! 32-element chunks of a K-quant super-block of 256. Each chunk decodes ([`chunk`])
//! into integer quants `q_i`, integer scales `sc_0`, `sc_1` for its two halves of 16
//! (1 where the format has one scale for the chunk), and f32 factors `dw`, `mw`. Its dot
//! with the activation quants `x_i` is an exact integer sum (any order, any SIMD width:
//! integers don't round; every bound is below 2^24, so its conversion is exact too):
//!
//! `S = sc_0 · Σ_{i<16} q_i x_i + sc_1 · Σ_{i≥16} q_i x_i`,
//! `M = m_0 · Σ_{i<16} x_i + m_1 · Σ_{i≥16} x_i` (Q2_K only)
//!
//! and gives one f32 term, each operation rounded once in this order:
//!
//! - Q4_0, Q5_0, Q8_0, Q3_K, Q6_K: `t = (dw · dx) · S`
//! - Q4_1, Q5_1, Q4_K, Q5_K:       `t = (dw · dx) · S + mw · sx`   (`sx = dx · Σ x_i`, from `Q8Act`)
//! - Q2_K:                         `t = (dw · dx) · S − (mw · dx) · M`
//!
//! where `dw` is the block's f16 scale `d` widened exactly to f32 — for Q4_K/Q5_K the
//! product `d · sc_j` of the super-block scale and the chunk's 6-bit scale, which is
//! exact in f32 — and `mw` is Q4_1/Q5_1's f16 minimum `m`, Q4_K/Q5_K's `−(dmin · m_j)`
//! (exact, negated) or Q2_K's `dmin`. Q3_K/Q6_K/Q2_K keep their 16-element scales in
//! the integer sum. The row's result is the canonical sum (`math`) of its chunk terms:
//! chunk `c` goes to lane `c % 32`.
//!
//! Activation quantization of a block `x[0..32]`: `amax = max |x_i|`, `dx = amax / 127`,
//! `inv = dx == 0 ? 0 : 1 / dx`, `q_i = round_half_away(x_i · inv)`, `sx = dx · Σ q_i`.
//!
//! Dequantization (embeddings): element `i` of a chunk is `(dw · sc_h) · q_i`, plus `mw`
//! (Q4_1, Q5_1, Q4_K, Q5_K) or minus `mw · m_h` (Q2_K), `h = i / 16`: llama.cpp's values.

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
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        out.clear();
        out.reserve(x.len() / QK);
        for chunk in x.chunks_exact(QK) {
            // SAFETY: AVX2 is present; the chunk is 32 values.
            let b = unsafe { x86::quantize_block_avx2(chunk) };
            out.push(b.unwrap_or_else(|| quantize_block(chunk)));
        }
        return;
    }
    out.clear();
    out.extend(x.chunks_exact(QK).map(quantize_block));
}

/// [`quantize_act`] of one block of 32 (the reference; SIMD gives the same bits).
fn quantize_block(chunk: &[f32]) -> Q8Act {
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
    b
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

/// Canonical dot of a quantized weight row with quantized activations (portable
/// reference): chunk `c`'s term goes to lane `c % 32`, then the butterfly.
pub fn dot_row_scalar(ty: GgmlType, row: &[u8], x: &[Q8Act]) -> f32 {
    let form = chunk::form(ty);
    let mut l = [0.0f32; LANES];
    for (c, xc) in x.iter().enumerate() {
        l[c % LANES] += chunk::decode(ty, row, c).term(form, xc);
    }
    butterfly(&mut l)
}

/// Canonical dot, SIMD where the CPU has it. Bit-identical to [`dot_row_scalar`].
/// A convenience: it lays out the activation scales on every call; a hot loop calls
/// [`dot_row_scaled`] with [`act_scales`]' layout made once.
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[Q8Act]) -> f32 {
    let (mut d, mut s, mut n) = (Vec::new(), Vec::new(), Vec::new());
    act_scales(x, x.len(), &mut d, &mut s);
    act_sums(x, x.len(), &mut n);
    dot_row_scaled(ty, row, x, &d, &s, &n)
}

/// [`dot_row`] with the row's activation scales `xd`, `xs` from [`act_scales`] and
/// quant sums `xn` from [`act_sums`] (one row of `x.len()` blocks): SIMD loads them
/// whole instead of gathering them per group.
#[inline]
pub fn dot_row_scaled(ty: GgmlType, row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32], xn: &[i32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    let vnni = has_vnni();
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    dot_row_with(ty, row, x, xd, xs, xn, vnni)
}

/// [`dot_row_scaled`] of `out.len()` consecutive weight rows of `row_bytes` bytes each:
/// `out[o] = rows[o] · x`, the same bits as one call per row.
#[allow(clippy::too_many_arguments)]
pub fn dot_row_each(
    ty: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    x: &[Q8Act],
    xd: &[f32],
    xs: &[f32],
    xn: &[i32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is present (VNNI only where found); the kernel asserts that
        // `rows` holds every row, and each row's shapes as `dot_row_avx2` does.
        return unsafe { x86::dot_row_each_avx2(ty, rows, row_bytes, x, xd, xs, xn, has_vnni(), out) };
    }
    for (o, v) in out.iter_mut().enumerate() {
        *v = dot_row_scaled(ty, &rows[o * row_bytes..(o + 1) * row_bytes], x, xd, xs, xn);
    }
}

/// [`dot_row_scaled`], with AVX-512 VNNI's integer dot or without (tests run both;
/// `vnni` only where the CPU has it).
#[inline]
fn dot_row_with(ty: GgmlType, row: &[u8], x: &[Q8Act], xd: &[f32], xs: &[f32], xn: &[i32], vnni: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is present (and VNNI where asked); `row` holds `x.len()` blocks
        // (checked by the caller's shapes, asserted by the kernels along with the
        // scales' and sums' lengths).
        return unsafe { x86::dot_row_avx2(ty, row, x, xd, xs, xn, vnni && has_vnni()) };
    }
    let _ = (xd, xs, xn, vnni);
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
/// [`dot_row_scaled`] loads with one instruction per group.
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

/// Each activation row's integer sums of its blocks' quants, in [`act_scales`]' layout
/// (the single-row kernels take a signed type's offset back with them).
pub fn act_sums(x: &[Q8Act], nb: usize, n: &mut Vec<i32>) {
    let stride = scales_stride(nb);
    let rows = x.len().checked_div(nb).unwrap_or(0);
    n.clear();
    n.resize(rows * stride, 0);
    for (r, xr) in x.chunks_exact(nb.max(1)).take(rows).enumerate() {
        for (b, xb) in xr.iter().enumerate() {
            n[r * stride + b] = xb.qs.iter().map(|&v| i32::from(v)).sum();
        }
    }
}

/// Rows per pass of the batched kernel: one row per SIMD lane.
pub const ROWS: usize = 8;

/// The activation scales of many rows in both layouts: per row ([`act_scales`], for
/// the one-row dot) and per pass of [`ROWS`] rows, block by block (`dt[(p·nb + b)·8 + k]`
/// is row `8p + k`'s `d` of block `b`, zero past the last row), which [`dot_rows`]
/// loads whole for the 8 rows of a pass.
#[derive(Default)]
pub struct ActScales {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    /// [`act_sums`].
    pub n: Vec<i32>,
    /// Each block's sum of its first 16 quants, in the same layout (the wide kernel's
    /// types with a scale per 16 take each half's offset back).
    pub h: Vec<i32>,
    pub dt: Vec<f32>,
    pub st: Vec<f32>,
    nb: usize,
}

impl ActScales {
    pub fn new(x: &[Q8Act], nb: usize) -> Self {
        let mut sc = Self { nb, ..Default::default() };
        act_scales(x, nb, &mut sc.d, &mut sc.s);
        act_sums(x, nb, &mut sc.n);
        let stride = scales_stride(nb);
        let rows = x.len().checked_div(nb).unwrap_or(0);
        let len = rows.div_ceil(ROWS) * ROWS * nb;
        sc.h.resize(sc.n.len(), 0);
        sc.dt.resize(len, 0.0);
        sc.st.resize(len, 0.0);
        for (r, xr) in x.chunks_exact(nb.max(1)).take(rows).enumerate() {
            let (p, k) = (r / ROWS, r % ROWS);
            for (b, xb) in xr.iter().enumerate() {
                sc.h[r * stride + b] = xb.qs[..16].iter().map(|&v| i32::from(v)).sum();
                sc.dt[(p * nb + b) * ROWS + k] = xb.d;
                sc.st[(p * nb + b) * ROWS + k] = xb.s;
            }
        }
        sc
    }

    /// Rows `r0..r1`; `r0` is a multiple of [`ROWS`].
    pub fn rows(&self, r0: usize, r1: usize) -> ActScalesRef<'_> {
        assert!(r0.is_multiple_of(ROWS) && r0 <= r1, "rows {r0}..{r1}");
        let stride = scales_stride(self.nb);
        let t = (r0 * self.nb).min(self.dt.len())..(r1.div_ceil(ROWS) * ROWS * self.nb).min(self.dt.len());
        ActScalesRef {
            d: &self.d[r0 * stride..r1 * stride],
            s: &self.s[r0 * stride..r1 * stride],
            n: &self.n[r0 * stride..r1 * stride],
            h: &self.h[r0 * stride..r1 * stride],
            dt: &self.dt[t.clone()],
            st: &self.st[t],
        }
    }
}

/// A range of rows of [`ActScales`].
#[derive(Clone, Copy)]
pub struct ActScalesRef<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub n: &'a [i32],
    /// [`ActScales::h`].
    pub h: &'a [i32],
    pub dt: &'a [f32],
    pub st: &'a [f32],
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
    /// Q3_K/Q6_K: each chunk's pair multipliers (`sc_0` ×8, `sc_1` ×8, as i16).
    sc: Vec<[i16; 16]>,
}

/// Canonical dots of one quantized weight row with several activation rows:
/// `out[r] = dot_row(ty, row, x[r*nb..(r+1)*nb])` bit for bit, where `nb = x.len() /
/// out.len()`; `sc` holds the same rows' scales ([`ActScales`]). The weight row is
/// unpacked once for all rows (batched prefill and replay), then dotted with 8 rows at
/// a time, one per SIMD lane: every block's 8 exact integer sums become one vector, its
/// f32 terms are computed lane-wise in the canonical operation order, and block `b`'s
/// terms go to lane accumulator `b % 32` of all 8 rows at once.
pub fn dot_rows(ty: GgmlType, row: &[u8], x: &[Q8Act], sc: ActScalesRef<'_>, prep: &mut RowPrep, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    let vnni = has_vnni();
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    dot_rows_with(ty, row, x, sc, prep, out, vnni);
}

/// [`dot_rows`], with AVX-512 VNNI's integer dot or without (tests run both; `vnni`
/// only where the CPU has it).
fn dot_rows_with(
    ty: GgmlType,
    row: &[u8],
    x: &[Q8Act],
    sc: ActScalesRef<'_>,
    prep: &mut RowPrep,
    out: &mut [f32],
    vnni: bool,
) {
    let n = out.len();
    if n == 0 {
        return;
    }
    let nb = x.len() / n;
    let stride = scales_stride(nb);
    assert!(sc.d.len() >= n * stride && sc.s.len() >= n * stride, "activation scales for {n} rows");
    // Q2_K (rare) has a second integer sum per chunk; it takes the one-row path.
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && ty != GgmlType::Q2_K {
        let need = ty.bytes_for((nb * QK) as u64).unwrap_or(u64::MAX);
        assert!(row.len() as u64 >= need, "row of {} bytes for {nb} chunks of {ty}", row.len());
        let tl = n.div_ceil(ROWS) * ROWS * nb;
        assert!(sc.dt.len() >= tl && sc.st.len() >= tl, "transposed activation scales for {n} rows");
        // SAFETY: AVX2 and F16C are present; the lengths read are asserted above.
        unsafe {
            x86::prepare_row_avx2(ty, row, nb, prep);
            x86::dot_rows_avx2(ty, x, nb, sc.dt, sc.st, prep, out, vnni && has_vnni());
        }
        return;
    }
    let _ = (prep, vnni);
    for (r, o) in out.iter_mut().enumerate() {
        let (d, s) = (&sc.d[r * stride..(r + 1) * stride], &sc.s[r * stride..(r + 1) * stride]);
        *o = dot_row_scaled(ty, row, &x[r * nb..(r + 1) * nb], d, s, &sc.n[r * stride..(r + 1) * stride]);
    }
}

/// Weight rows per group of [`dot_rows_wide`]: one row per 32-bit lane.
pub const WIDE: usize = 8;

/// Whether [`dot_rows_wide`] has a kernel for `ty` on this CPU (x86 with AVX-512 VNNI;
/// every quantized type but Q2_K, whose minimums change every 16 quants).
pub fn wide_supported(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_vnni() && ty.is_quantized() && ty != GgmlType::Q2_K
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// Whether [`dot_rows_wide`] keeps `ty`'s quants as 4-bit values, two per byte (quant
/// `i` of a 32-chunk in the low nibble of byte `i`, quant `i + 16` in its high nibble)
/// and unpacks them in registers.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn nibble_packed(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K)
}

/// The offset that makes `ty`'s quants unsigned bytes for `vpdpbusd`, as a power of two
/// (`q + 2^s`); the kernels take `2^s · Σx` back.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn offset_shift(ty: GgmlType) -> Option<i32> {
    match ty {
        GgmlType::Q3_K => Some(2),
        GgmlType::Q4_0 => Some(3),
        GgmlType::Q5_0 => Some(4),
        GgmlType::Q6_K => Some(5),
        GgmlType::Q8_0 => Some(7),
        _ => None,
    }
}

/// 32-byte vectors per block of a [`WideRows`] group: 4 words of packed nibbles or 8 of
/// bytes, for each of the [`WIDE`] rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn wide_vectors(ty: GgmlType) -> usize {
    if nibble_packed(ty) { 4 } else { 8 }
}

/// One 32-byte vector, aligned for whole-vector loads.
#[derive(Clone, Copy, Default)]
#[repr(C, align(32))]
pub struct V32(pub [u8; 32]);

/// Rows of one weight matrix (a [`wide_supported`] type) laid out for [`dot_rows_wide`],
/// [`WIDE`] rows per group, the last group padded with zero rows: per 32-chunk, the
/// rows' quant words interleaved (lane `r` of vector `v` is row `r`'s word `v`) as
/// unsigned bytes (nibbles for the 4-bit types), their factors as f32 and (Q3_K, Q6_K)
/// their multipliers per half. Made once per matrix at the first batched pass and kept
/// (a batched decode step would otherwise lay out every weight row again for a handful
/// of activation rows), or per task when over the budget. Per 32 weights: 20 bytes for
/// Q4_0, 24 for Q4_1 and Q4_K, 36 for Q8_0 and Q5_0, 40 for Q5_1 and Q5_K, 44 for Q3_K
/// and Q6_K.
pub struct WideRows {
    ty: GgmlType,
    q: Vec<V32>,
    d: Vec<f32>,
    m: Vec<f32>,
    /// Q3_K and Q6_K: per block, the 8 rows' scales of the first half, then the second.
    sc: Vec<i32>,
    nb: usize,
    rows: usize,
}

/// One group of [`WideRows`].
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct WideRef<'a> {
    ty: GgmlType,
    q: &'a [V32],
    d: &'a [f32],
    m: &'a [f32],
    sc: &'a [i32],
    nb: usize,
}

impl WideRows {
    /// Lay out the consecutive rows of `row_bytes` bytes in `rows`, each `nb` blocks of
    /// `ty` (a type [`wide_supported`] accepts).
    pub fn new(ty: GgmlType, rows: &[u8], row_bytes: usize, nb: usize) -> Self {
        assert!(wide_supported(ty), "no wide kernel for {ty}");
        let need = ty.bytes_for((nb * QK) as u64).unwrap_or(u64::MAX);
        assert!(row_bytes as u64 >= need, "rows of {row_bytes} bytes for {nb} chunks of {ty}");
        let n = rows.len() / row_bytes.max(1);
        let groups = n.div_ceil(WIDE);
        let vecs = wide_vectors(ty);
        let (min, paired) = (chunk::form(ty) == chunk::Form::Min, pair_scaled(ty));
        let mut out = Self {
            ty,
            q: vec![V32::default(); groups * nb * vecs],
            d: vec![0.0; groups * nb * WIDE],
            m: if min { vec![0.0; groups * nb * WIDE] } else { Vec::new() },
            sc: if paired { vec![0; groups * nb * 2 * WIDE] } else { Vec::new() },
            nb,
            rows: n,
        };
        // Each chunk as the reference decodes it (its factors are the reference's bits),
        // its quants offset to unsigned bytes.
        let off = offset_shift(ty).map_or(0, |s| 1i32 << s);
        for o in 0..n {
            let (g, r) = (o / WIDE, o % WIDE);
            let row = &rows[o * row_bytes..(o + 1) * row_bytes];
            for c in 0..nb {
                let ch = chunk::decode(ty, row, c);
                let at = (g * nb + c) * WIDE + r;
                out.d[at] = ch.dw;
                if min {
                    out.m[at] = ch.mw;
                }
                if paired {
                    let sc = (g * nb + c) * 2 * WIDE + r;
                    (out.sc[sc], out.sc[sc + WIDE]) = (ch.sc[0], ch.sc[1]);
                }
                let u: [u8; QK] = std::array::from_fn(|i| (i32::from(ch.q[i]) + off) as u8);
                let mut bytes = u;
                if vecs == 4 {
                    for i in 0..QK / 2 {
                        bytes[i] = u[i] | (u[i + 16] << 4);
                    }
                }
                for v in 0..vecs {
                    out.q[(g * nb + c) * vecs + v].0[4 * r..4 * r + 4].copy_from_slice(&bytes[4 * v..4 * v + 4]);
                }
            }
        }
        out
    }

    /// Group `g` (rows `8g..8g + 8`).
    pub fn group(&self, g: usize) -> WideRef<'_> {
        let (nb, vecs) = (self.nb, wide_vectors(self.ty));
        let m = if self.m.is_empty() { &self.m[..] } else { &self.m[g * nb * WIDE..(g + 1) * nb * WIDE] };
        let sc = if self.sc.is_empty() { &self.sc[..] } else { &self.sc[g * nb * 2 * WIDE..(g + 1) * nb * 2 * WIDE] };
        WideRef {
            ty: self.ty,
            q: &self.q[g * nb * vecs..(g + 1) * nb * vecs],
            d: &self.d[g * nb * WIDE..(g + 1) * nb * WIDE],
            m,
            sc,
            nb,
        }
    }

    /// Rows held (without the padding).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes `rows` rows of `nb` blocks of `ty` take.
    pub fn bytes_for(ty: GgmlType, rows: usize, nb: usize) -> usize {
        let min = chunk::form(ty) == chunk::Form::Min;
        let factors = 1 + usize::from(min) + if pair_scaled(ty) { 2 } else { 0 };
        rows.div_ceil(WIDE) * nb * (wide_vectors(ty) * 32 + WIDE * 4 * factors)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() * 32 + (self.d.len() + self.m.len() + self.sc.len()) * 4
    }
}

/// Canonical dots of the [`WIDE`] weight rows of `w` (a group of [`WideRows`]) with
/// activation rows `x` (`rows` of `nb` blocks; `sc` their scales from [`ActScales`], any
/// rows `r0..` of it): `out[r·WIDE + i] = dot_row(ty, row_i, x_r)` bit for bit (a
/// padding row's values mean nothing). The weights of a block are loaded and unpacked
/// once for every activation row, each activation word broadcast against the 8 rows'
/// words.
pub fn dot_rows_wide(w: WideRef<'_>, x: &[Q8Act], sc: ActScalesRef<'_>, out: &mut [f32]) {
    let (ty, nb) = (w.ty, w.nb);
    let rows = x.len().checked_div(nb).unwrap_or(0);
    let stride = scales_stride(nb);
    assert!(
        x.len() == rows * nb && sc.n.len() >= rows * stride && sc.h.len() >= rows * stride,
        "activations for {rows} rows"
    );
    assert!(out.len() >= rows * WIDE, "output for {rows} rows");
    let min = chunk::form(ty) == chunk::Form::Min;
    assert!(
        w.q.len() >= nb * wide_vectors(ty)
            && w.d.len() >= nb * WIDE
            && (!min || w.m.len() >= nb * WIDE)
            && (!pair_scaled(ty) || w.sc.len() >= nb * 2 * WIDE),
        "weights laid out for {nb} blocks"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: VNNI (with AVX2, F16C) is present (a `WideRows` is only made where
    // `wide_supported`); the lengths read are asserted above.
    unsafe {
        x86::dot_rows_wide_vnni(w, x, sc.n, sc.h, nb, stride, rows, out)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, x, sc, out, stride);
}

/// Types with a scale per 16 elements inside the integer sum.
fn pair_scaled(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q6_K)
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c"))
}

/// AVX-512 VNNI with 256-bit vectors (VL) and byte masks (BW): `vpdpbusd` for the
/// integer dots.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2()
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
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
        ty if ty.is_quantized() => {
            let form = chunk::form(ty);
            for (c, o) in out.chunks_exact_mut(QK).enumerate() {
                let ch = chunk::decode(ty, row, c);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = ch.value(form, i);
                }
            }
        }
        // Unsupported types never reach here: `Model` refuses them at load.
        _ => {}
    }
}

mod chunk;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use quantize::quantize_row;

#[cfg(test)]
mod tests;
