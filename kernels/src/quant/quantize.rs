//! Quantization of f32 values into each supported type: simple round-to-nearest
//! quantizers (not llama.cpp's error-minimizing search), enough for synthetic models
//! and tests. Inference never quantizes weights.

use half::f16;

use super::QK;
use crate::gguf::GgmlType;

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
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for c in x.chunks_exact(QK) {
                let q = if ty == GgmlType::Q5_0 {
                    let maxv = c.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                    let d = maxv / -16.0;
                    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    c.iter().map(|v| ((v * inv + 16.5) as i32).clamp(0, 31) as u8).collect::<Vec<_>>()
                } else {
                    let min = c.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 31.0;
                    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    c.iter().map(|v| (((v - min) * inv + 0.5) as i32).clamp(0, 31) as u8).collect()
                };
                let qh = q.iter().enumerate().fold(0u32, |h, (i, &v)| h | (u32::from(v >> 4) << i));
                out.extend_from_slice(&qh.to_le_bytes());
                for j in 0..16 {
                    out.push((q[j] & 15) | ((q[j + 16] & 15) << 4));
                }
            }
        }
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::Q5_K => {
            for c in x.chunks_exact(256) {
                out.extend(quantize_k_affine(ty, c));
            }
        }
        GgmlType::Q3_K | GgmlType::Q6_K => {
            for c in x.chunks_exact(256) {
                out.extend(quantize_k_symmetric(ty, c));
            }
        }
        // Nothing else is ever written by sampo.
        _ => {}
    }
    out
}

fn round_clamp(v: f32, lo: i32, hi: i32) -> i32 {
    (v.round() as i32).clamp(lo, hi)
}

fn inv(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// Q2_K, Q4_K, Q5_K: `x ≈ d·sc·q − dmin·m` per sub-block (16 or 32 elements).
fn quantize_k_affine(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let (sub, qmax, smax) = match ty {
        GgmlType::Q2_K => (16usize, 3i32, 15i32),
        GgmlType::Q4_K => (32, 15, 63),
        _ => (32, 31, 63),
    };
    let n = 256 / sub;
    let mut scale = vec![0.0f32; n];
    let mut mins = vec![0.0f32; n];
    for (k, c) in x.chunks_exact(sub).enumerate() {
        let lo = c.iter().copied().fold(0.0f32, f32::min);
        let hi = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[k] = (hi - lo) / qmax as f32;
        mins[k] = -lo;
    }
    let d = f16::from_f32(scale.iter().copied().fold(0.0, f32::max) / smax as f32);
    let dmin = f16::from_f32(mins.iter().copied().fold(0.0, f32::max) / smax as f32);
    let sc: Vec<i32> = scale.iter().map(|s| round_clamp(s * inv(d.to_f32()), 0, smax)).collect();
    let m: Vec<i32> = mins.iter().map(|v| round_clamp(v * inv(dmin.to_f32()), 0, smax)).collect();
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = i / sub;
            let step = d.to_f32() * sc[k] as f32;
            round_clamp((v + dmin.to_f32() * m[k] as f32) * inv(step), 0, qmax) as u8
        })
        .collect();
    let mut out = Vec::new();
    match ty {
        GgmlType::Q2_K => {
            out.extend((0..16).map(|k| (sc[k] | (m[k] << 4)) as u8));
            for i in 0..64 {
                let (h, l) = (i / 32, i % 32);
                out.push((0..4).fold(0u8, |b, s| b | (q[128 * h + 32 * s + l] << (2 * s))));
            }
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&dmin.to_le_bytes());
        }
        _ => {
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&dmin.to_le_bytes());
            let mut s = [0u8; 12];
            for j in 0..8 {
                let (a, b) = (sc[j] as u8, m[j] as u8);
                if j < 4 {
                    s[j] = a;
                    s[j + 4] = b;
                } else {
                    s[j + 4] = (a & 15) | ((b & 15) << 4);
                    s[j - 4] |= (a >> 4) << 6;
                    s[j] |= (b >> 4) << 6;
                }
            }
            out.extend_from_slice(&s);
            if ty == GgmlType::Q5_K {
                out.extend((0..32).map(|l| (0..8).fold(0u8, |b, j| b | ((q[32 * j + l] >> 4) << j))));
            }
            for i in 0..128 {
                let (c, l) = (i / 32, i % 32);
                out.push((q[64 * c + l] & 15) | ((q[64 * c + 32 + l] & 15) << 4));
            }
        }
    }
    out
}

/// Q3_K, Q6_K: `x ≈ d·sc·q` per sub-block of 16, `sc` and `q` signed.
fn quantize_k_symmetric(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let (qlo, qhi, smax) = if ty == GgmlType::Q3_K { (-4, 3, 31) } else { (-32, 31, 127) };
    let scale: Vec<f32> = x
        .chunks_exact(16)
        .map(|c| c.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m }) / qlo as f32)
        .collect();
    let d = f16::from_f32(scale.iter().fold(0.0f32, |m, s| m.max(s.abs())) / smax as f32);
    let sc: Vec<i32> = scale.iter().map(|s| round_clamp(s * inv(d.to_f32()), -smax, smax)).collect();
    let q: Vec<i32> =
        x.iter().enumerate().map(|(i, &v)| round_clamp(v * inv(d.to_f32() * sc[i / 16] as f32), qlo, qhi)).collect();
    let mut out = Vec::new();
    if ty == GgmlType::Q3_K {
        let u: Vec<u8> = q.iter().map(|&v| (v + 4) as u8).collect();
        out.extend((0..32).map(|l| (0..8).fold(0u8, |b, j| b | ((u[32 * j + l] >> 2) << j))));
        for i in 0..64 {
            let (h, l) = (i / 32, i % 32);
            out.push((0..4).fold(0u8, |b, s| b | ((u[128 * h + 32 * s + l] & 3) << (2 * s))));
        }
        let mut s = [0u8; 12];
        for (i, &v) in sc.iter().enumerate() {
            let v = (v + 32) as u8;
            s[i % 8] |= (v & 15) << (4 * (i / 8));
            s[8 + i % 4] |= (v >> 4) << (2 * (i / 4));
        }
        out.extend_from_slice(&s);
        out.extend_from_slice(&d.to_le_bytes());
    } else {
        let u: Vec<u8> = q.iter().map(|&v| (v + 32) as u8).collect();
        for i in 0..128 {
            let (h, r) = (i / 64, i % 64);
            // ql[64h + r]: low nibble element 128h + r, high nibble element 128h + 64 + r.
            out.push((u[128 * h + r] & 15) | ((u[128 * h + 64 + r] & 15) << 4));
        }
        for i in 0..64 {
            let (h, l) = (i / 32, i % 32);
            out.push((0..4).fold(0u8, |b, s| b | ((u[128 * h + 32 * s + l] >> 4) << (2 * s))));
        }
        out.extend(sc.iter().map(|&v| v as i8 as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}
