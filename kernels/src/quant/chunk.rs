//! The portable definition of every quantized type: one 32-element chunk of a row
//! decoded into integer quants, integer scales and two f32 factors, and the canonical
//! f32 term of its dot product with one activation block (see the module docs of
//! [`super`]). The SIMD and CUDA code must give these bits.

use super::{Q8Act, QK, f16_at};
use crate::gguf::GgmlType;

/// How a chunk's integer sums become its f32 term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// `t = (dw · dx) · S` (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K).
    Plain,
    /// `t = (dw · dx) · S + mw · sx` (Q4_1, Q5_1, Q4_K, Q5_K).
    Min,
    /// `t = (dw · dx) · S − (mw · dx) · M` (Q2_K: its minimums change every 16).
    SubMin,
}

pub(crate) fn form(ty: GgmlType) -> Form {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => Form::Min,
        GgmlType::Q2_K => Form::SubMin,
        _ => Form::Plain,
    }
}

/// One 32-element chunk, decoded.
///
/// Element `i` of the chunk is, exactly as [`Chunk::value`] rounds it:
/// - `Plain`:  `(dw · sc[h]) · q[i]`
/// - `Min`:    `(dw · sc[h]) · q[i] + mw`
/// - `SubMin`: `(dw · sc[h]) · q[i] − mw · m[h]`
///
/// with `h = i / 16` (the half). Every `dw · sc[h]` and `mw` product is exact in f32
/// (an f16 times an integer of at most 8 bits), so these are llama.cpp's values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub(crate) q: [i8; QK],
    pub(crate) sc: [i32; 2],
    pub(crate) m: [i32; 2],
    pub(crate) dw: f32,
    pub(crate) mw: f32,
}

impl Chunk {
    /// The chunk's exact integer sums with activation quants `x`:
    /// `S = sc[0]·Σ_{i<16} q_i x_i + sc[1]·Σ_{i≥16} q_i x_i` and
    /// `M = m[0]·Σ_{i<16} x_i + m[1]·Σ_{i≥16} x_i`.
    #[inline]
    pub(crate) fn sums(&self, x: &[i8; QK]) -> (i32, i32) {
        let half = |h: usize| {
            let r = h * 16..h * 16 + 16;
            let s: i32 = r.clone().map(|i| i32::from(self.q[i]) * i32::from(x[i])).sum();
            let m: i32 = r.map(|i| i32::from(x[i])).sum();
            (s, m)
        };
        let ((s0, m0), (s1, m1)) = (half(0), half(1));
        (self.sc[0] * s0 + self.sc[1] * s1, self.m[0] * m0 + self.m[1] * m1)
    }

    /// The canonical f32 term of this chunk against one activation block.
    #[inline]
    pub(crate) fn term(&self, form: Form, x: &Q8Act) -> f32 {
        let (s, m) = self.sums(&x.qs);
        let t = (self.dw * x.d) * s as f32;
        match form {
            Form::Plain => t,
            Form::Min => t + self.mw * x.s,
            Form::SubMin => t - (self.mw * x.d) * m as f32,
        }
    }

    /// Element `i`, dequantized (see the type's docs).
    #[inline]
    pub(crate) fn value(&self, form: Form, i: usize) -> f32 {
        let h = i / 16;
        let v = (self.dw * self.sc[h] as f32) * f32::from(self.q[i]);
        match form {
            Form::Plain => v,
            Form::Min => v + self.mw,
            Form::SubMin => v - self.mw * self.m[h] as f32,
        }
    }
}

/// Scale and minimum `j` (0..8) of a Q4_K/Q5_K super-block's 12 packed 6-bit values:
/// bytes 0..4 hold scales 0..4 (low 6 bits), 4..8 minimums 0..4; scales and minimums
/// 4..8 take their low 4 bits from bytes 8..12 (low and high nibble) and their high 2
/// bits from the top of bytes 0..4 and 4..8.
#[inline]
pub(crate) fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q3_K's sixteen 6-bit scales (each minus 32), from their 12 packed bytes: low 4 bits
/// of scale `i` in byte `i % 8` (low nibble for `i < 8`), high 2 bits in byte
/// `8 + i % 4` at bit `2 · (i / 4)`.
#[inline]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0xf;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// Decode chunk `c` (elements `32c..32c + 32`) of a row of type `ty`.
///
/// The row must hold that chunk's whole block (callers check shapes).
pub(crate) fn decode(ty: GgmlType, row: &[u8], c: usize) -> Chunk {
    let mut ch = Chunk { q: [0; QK], sc: [1, 1], m: [0, 0], dw: 0.0, mw: 0.0 };
    let bb = ty.block_bytes();
    if !ty.is_k_quant() {
        let b = &row[c * bb..(c + 1) * bb];
        ch.dw = f16_at(b, 0);
        let nib = |q: &[u8], i: usize| if i < 16 { q[i] & 15 } else { q[i - 16] >> 4 };
        match ty {
            GgmlType::Q8_0 => (0..QK).for_each(|i| ch.q[i] = b[2 + i] as i8),
            GgmlType::Q4_0 => (0..QK).for_each(|i| ch.q[i] = nib(&b[2..], i) as i8 - 8),
            GgmlType::Q4_1 => {
                ch.mw = f16_at(b, 2);
                (0..QK).for_each(|i| ch.q[i] = nib(&b[4..], i) as i8);
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                // d [, m], 32 high bits (bit i for element i), then 16 bytes of nibbles.
                let at = if ty == GgmlType::Q5_1 { 4 } else { 2 };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let off = if ty == GgmlType::Q5_1 { 0 } else { 16 };
                if ty == GgmlType::Q5_1 {
                    ch.mw = f16_at(b, 2);
                }
                for i in 0..QK {
                    let q = nib(&b[at + 4..], i) | (((qh >> i) & 1) as u8) << 4;
                    ch.q[i] = q as i8 - off;
                }
            }
            _ => {}
        }
        return ch;
    }
    // K-quants: chunk j of super-block `c / 8`.
    let b = &row[(c / 8) * bb..(c / 8 + 1) * bb];
    let j = c % 8;
    let (h, s) = (j / 4, j % 4);
    match ty {
        GgmlType::Q2_K => {
            // scales[16] (low nibble scale, high nibble minimum, one per 16), qs[64], d, dmin.
            // Element 128h + 32s + l is bits 2s..2s+2 of qs[32h + l].
            ch.dw = f16_at(b, 80);
            ch.mw = f16_at(b, 82);
            for l in 0..QK {
                ch.q[l] = ((b[16 + 32 * h + l] >> (2 * s)) & 3) as i8;
            }
            for k in 0..2 {
                ch.sc[k] = i32::from(b[2 * j + k] & 15);
                ch.m[k] = i32::from(b[2 * j + k] >> 4);
            }
        }
        GgmlType::Q3_K => {
            // hmask[32], qs[64], scales[12], d. Element 128h + 32s + l: low bits 2s..2s+2
            // of qs[32h + l]; bit j of hmask[l] set means +0, clear means −4.
            ch.dw = f16_at(b, 108);
            for l in 0..QK {
                let lo = ((b[32 + 32 * h + l] >> (2 * s)) & 3) as i8;
                let hi = (b[l] >> j) & 1;
                ch.q[l] = lo - if hi == 1 { 0 } else { 4 };
            }
            let sc = q3k_scales(&b[96..108]);
            ch.sc = [i32::from(sc[2 * j]), i32::from(sc[2 * j + 1])];
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // d, dmin, scales[12], [qh[32],] qs[128]. Element 64c + 32k + l (j = 2c + k)
            // is nibble k of qs[32c + l] [plus bit j of qh[l] as 16].
            let (sc, m) = k_scale_min(&b[4..16], j);
            // d·sc and dmin·m are exact (11-bit significand times 6-bit integer).
            ch.dw = f16_at(b, 0) * f32::from(sc);
            ch.mw = -(f16_at(b, 2) * f32::from(m));
            let qs = if ty == GgmlType::Q5_K { 48 } else { 16 };
            for l in 0..QK {
                let mut q = (b[qs + 32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                if ty == GgmlType::Q5_K {
                    q |= ((b[16 + l] >> j) & 1) << 4;
                }
                ch.q[l] = q as i8;
            }
        }
        GgmlType::Q6_K => {
            // ql[128], qh[64], scales[16] (i8, one per 16), d. Element 128h + 32s + l:
            // nibble s/2 of ql[64h + 32(s%2) + l], high bits 2s..2s+2 of qh[32h + l].
            ch.dw = f16_at(b, 208);
            for l in 0..QK {
                let lo = (b[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 15;
                let hi = (b[128 + 32 * h + l] >> (2 * s)) & 3;
                ch.q[l] = (lo | (hi << 4)) as i8 - 32;
            }
            ch.sc = [i32::from(b[192 + 2 * j] as i8), i32::from(b[192 + 2 * j + 1] as i8)];
        }
        _ => {}
    }
    ch
}
