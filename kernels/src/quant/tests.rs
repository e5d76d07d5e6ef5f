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
                let sc = ActScales::new(&xq, nb);
                let mut out = vec![0.0; rows];
                dot_rows(ty, &w, &xq, sc.rows(0, rows), &mut RowPrep::default(), &mut out);
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
    let sc = ActScales::new(&xq, 2);
    let mut out = [0.0];
    dot_rows(GgmlType::Q8_0, &w, &xq, sc.rows(0, 1), &mut RowPrep::default(), &mut out);
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

#[test]
fn f16_widening_matches_half_for_every_value() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = super::f16_to_f32(h);
        assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
    }
}

// ---- the new types: random raw blocks against straightforward references ------------

/// The types added with the K-quants, and every supported block type.
const NEW_TYPES: [GgmlType; 7] =
    [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];
const BLOCK_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

struct Xs(u64);
impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Byte offsets of a block's f16 fields.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q5_K => match ty {
            GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            _ => &[0],
        },
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Finite f16 scales: zero, ±max, smallest normal, subnormals, one, and random ones.
const EXTREME_F16: [u16; 9] = [0x0000, 0x8000, 0x7bff, 0xfbff, 0x0400, 0x0001, 0x03ff, 0x3c00, 0xbc00];

/// `nb` blocks of random bytes; block `b`'s f16 fields from [`EXTREME_F16`] (cycling)
/// or random finite values; with `all_max`, every quant byte is 0xff.
fn random_blocks(ty: GgmlType, nb: usize, seed: u64, all_max: bool) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut r = Xs(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out: Vec<u8> = (0..nb * bb).map(|_| if all_max { 0xff } else { r.next() as u8 }).collect();
    for b in 0..nb {
        for (k, &o) in f16_fields(ty).iter().enumerate() {
            let h = if (b + k) % 3 == 0 {
                EXTREME_F16[(b + 7 * k + seed as usize) % EXTREME_F16.len()]
            } else {
                // A random finite f16 of moderate size (exponent 5..20).
                let e = 5 + (r.next() % 16) as u16;
                ((r.next() as u16) & 0x83ff) | (e << 10)
            };
            out[b * bb + o..b * bb + o + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    out
}

fn h(b: &[u8], o: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f32()
}

/// Dequantization written the way llama.cpp's reference loops (ggml-quants.c) walk
/// each block, independently of `chunk::decode`.
fn reference_dequant(ty: GgmlType, row: &[u8]) -> Vec<f32> {
    let mut y = Vec::new();
    for b in row.chunks_exact(ty.block_bytes()) {
        match ty {
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (d, m, qh_at) = if ty == GgmlType::Q5_0 { (h(b, 0), 0.0, 2) } else { (h(b, 0), h(b, 2), 4) };
                let qh = u32::from_le_bytes(b[qh_at..qh_at + 4].try_into().unwrap());
                let qs = &b[qh_at + 4..];
                let off = if ty == GgmlType::Q5_0 { 16 } else { 0 };
                let mut out = [0.0f32; 32];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((u32::from(qs[j]) & 0xf) | xh0) as i32 - off;
                    let x1 = ((u32::from(qs[j]) >> 4) | xh1) as i32 - off;
                    if ty == GgmlType::Q5_0 {
                        out[j] = x0 as f32 * d;
                        out[j + 16] = x1 as f32 * d;
                    } else {
                        out[j] = x0 as f32 * d + m;
                        out[j + 16] = x1 as f32 * d + m;
                    }
                }
                y.extend_from_slice(&out);
            }
            GgmlType::Q2_K => {
                let (sc, qs, d, min) = (&b[0..16], &b[16..80], h(b, 80), h(b, 82));
                let mut is = 0;
                for n in 0..2 {
                    let q = &qs[32 * n..];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let s = sc[is];
                            is += 1;
                            let dl = d * f32::from(s & 0xf);
                            let ml = min * f32::from(s >> 4);
                            for l in 0..16 {
                                y.push(dl * f32::from((q[l + 16 * half] >> shift) & 3) - ml);
                            }
                        }
                    }
                }
            }
            GgmlType::Q3_K => {
                let (hm, qs, d) = (&b[0..32], &b[32..96], h(b, 108));
                let mut aux = [0u32; 4];
                for (k, a) in aux.iter_mut().take(3).enumerate() {
                    *a = u32::from_le_bytes(b[96 + 4 * k..100 + 4 * k].try_into().unwrap());
                }
                let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
                let tmp = aux[2];
                aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
                aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
                aux[0] = (aux[0] & k2) | ((tmp & k1) << 4);
                aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
                let scales: Vec<i32> =
                    aux.iter().flat_map(|a| a.to_le_bytes()).map(|v| i32::from(v as i8) - 32).collect();
                let (mut is, mut m) = (0, 1u8);
                for n in 0..2 {
                    let q = &qs[32 * n..];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let dl = d * scales[is] as f32;
                            is += 1;
                            for l in 16 * half..16 * half + 16 {
                                let v = i32::from((q[l] >> shift) & 3) - if hm[l] & m != 0 { 0 } else { 4 };
                                y.push(dl * v as f32);
                            }
                        }
                        m <<= 1;
                    }
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                // gguf-py's get_scale_min: bytes 0..4 (d), 4..8 (m), 8..12 (m_d).
                let s = &b[4..16];
                let scm = |j: usize| -> (f32, f32) {
                    if j < 4 {
                        (f32::from(s[j] & 0x3f), f32::from(s[4 + j] & 0x3f))
                    } else {
                        let k = j - 4;
                        (
                            f32::from((s[8 + k] & 0x0f) | ((s[k] >> 2) & 0x30)),
                            f32::from((s[8 + k] >> 4) | ((s[4 + k] >> 2) & 0x30)),
                        )
                    }
                };
                let (d, min) = (h(b, 0), h(b, 2));
                let (qh, ql) = if ty == GgmlType::Q5_K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                let (mut u1, mut u2) = (1u8, 2u8);
                for j in 0..4 {
                    let (sc1, m1) = scm(2 * j);
                    let (sc2, m2) = scm(2 * j + 1);
                    let (d1, m1, d2, m2) = (d * sc1, min * m1, d * sc2, min * m2);
                    let q = &ql[32 * j..];
                    for l in 0..32 {
                        let hb = if ty == GgmlType::Q5_K && qh[l] & u1 != 0 { 16 } else { 0 };
                        y.push(d1 * f32::from((q[l] & 0xf) + hb) - m1);
                    }
                    for l in 0..32 {
                        let hb = if ty == GgmlType::Q5_K && qh[l] & u2 != 0 { 16 } else { 0 };
                        y.push(d2 * f32::from((q[l] >> 4) + hb) - m2);
                    }
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
            GgmlType::Q6_K => {
                let d = h(b, 208);
                let mut out = [0.0f32; 256];
                for n in 0..2 {
                    let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
                    let y = &mut out[128 * n..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = i32::from((ql[l] & 0xf) | ((qh[l] & 3) << 4)) - 32;
                        let q2 = i32::from((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        let s = |k: usize| f32::from(sc[k] as i8);
                        y[l] = d * s(is) * q1 as f32;
                        y[l + 32] = d * s(is + 2) * q2 as f32;
                        y[l + 64] = d * s(is + 4) * q3 as f32;
                        y[l + 96] = d * s(is + 6) * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
            _ => unreachable!("{ty}"),
        }
    }
    y
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn dequantization_matches_the_reference_for_random_and_extreme_blocks() {
    for ty in NEW_TYPES {
        for (seed, all_max) in [(1u64, false), (2, false), (3, false), (4, true)] {
            let nb = 12;
            let row = random_blocks(ty, nb, seed, all_max);
            let mut got = vec![0.0f32; nb * ty.block_len()];
            dequantize_row(ty, &row, &mut got);
            let want = reference_dequant(ty, &row);
            assert_eq!(bits(&got), bits(&want), "{ty} seed {seed} all_max {all_max}");
        }
    }
}

/// Activation rows: random, all ±127 (extreme), and a zero block.
fn acts(n: usize, seed: u32) -> Vec<Q8Act> {
    let mut xq = Vec::new();
    quantize_act(&vals(n, seed), &mut xq);
    if xq.len() > 2 {
        xq[1] = Q8Act { qs: [127; QK], d: 3.0e4, s: 3.0e4 * 127.0 * 32.0 };
        xq[2] = Q8Act { qs: [-127; QK], d: 1.0e-30, s: -1.0e-30 * 127.0 * 32.0 };
    }
    if let Some(x) = xq.first_mut() {
        *x = Q8Act::default();
    }
    xq
}

#[test]
fn simd_dots_are_the_scalar_bits_for_every_block_type() {
    for ty in BLOCK_TYPES {
        let per = ty.block_len() / QK;
        for blocks in [1usize, 2, 3, 5, 9] {
            for (seed, all_max) in [(11u64, false), (12, false), (13, true)] {
                let row = random_blocks(ty, blocks, seed, all_max);
                let xq = acts(blocks * ty.block_len(), seed as u32);
                let (got, want) = (dot_row(ty, &row, &xq), dot_row_scalar(ty, &row, &xq));
                assert_eq!(got.to_bits(), want.to_bits(), "{ty} {blocks} blocks ({} chunks) seed {seed}", blocks * per);
            }
        }
    }
}

#[test]
fn scalar_dot_is_the_exact_dot_of_the_dequantized_values() {
    // The canonical dot rounds a few times per chunk; against the f64 dot of the
    // dequantized weights and activations it must agree to a few ulp of the magnitude.
    for ty in BLOCK_TYPES {
        for seed in 21..25u64 {
            let blocks = 4;
            let mut row = random_blocks(ty, blocks, seed, false);
            // Moderate scales only: this compares values, not edge cases.
            for b in 0..blocks {
                for &o in f16_fields(ty) {
                    let at = b * ty.block_bytes() + o;
                    row[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01 * (1 + b) as f32).to_le_bytes());
                }
            }
            let n = blocks * ty.block_len();
            let mut xq = Vec::new();
            quantize_act(&vals(n, seed as u32), &mut xq);
            let mut w = vec![0.0f32; n];
            dequantize_row(ty, &row, &mut w);
            let (mut exact, mut mag) = (0.0f64, 0.0f64);
            for (i, wi) in w.iter().enumerate() {
                let xb = &xq[i / QK];
                let xi = f64::from(xb.d) * f64::from(xb.qs[i % QK]);
                exact += f64::from(*wi) * xi;
                mag += (f64::from(*wi) * xi).abs();
            }
            let got = f64::from(dot_row_scalar(ty, &row, &xq));
            assert!(
                (got - exact).abs() <= 1e-5 * mag.max(1e-30),
                "{ty} seed {seed}: {got} vs {exact} (magnitude {mag})"
            );
        }
    }
}

#[test]
fn batched_dots_are_the_one_row_bits_for_every_block_type() {
    for ty in BLOCK_TYPES {
        let blocks_list: &[usize] = if ty.is_k_quant() { &[1, 2, 3, 5] } else { &[1, 7, 9, 15, 33] };
        for &blocks in blocks_list {
            let row = random_blocks(ty, blocks, blocks as u64 + 40, false);
            let nb = blocks * ty.block_len() / QK;
            for rows in 1..=9usize {
                let xq = acts(nb * QK * rows, rows as u32);
                let sc = ActScales::new(&xq, nb);
                let mut out = vec![0.0; rows];
                let mut prep = RowPrep::default();
                dot_rows(ty, &row, &xq, sc.rows(0, rows), &mut prep, &mut out);
                for (r, o) in out.iter().enumerate() {
                    let want = dot_row_scalar(ty, &row, &xq[r * nb..(r + 1) * nb]);
                    assert_eq!(o.to_bits(), want.to_bits(), "{ty} {blocks} blocks, {rows} rows, row {r}");
                }
            }
        }
    }
}

#[test]
fn quantize_row_round_trips_every_new_type_closely() {
    for ty in NEW_TYPES {
        let n = 512;
        let x = vals(n, 9);
        let q = quantize_row(ty, &x);
        assert_eq!(q.len() as u64, ty.bytes_for(n as u64).expect("whole blocks"), "{ty}");
        let mut back = vec![0.0f32; n];
        dequantize_row(ty, &q, &mut back);
        let err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        // Step sizes: 2/31 (5-bit), 2/15 (4-bit), 2/7 (3-bit), 2/3 (2-bit), 2/63 (6-bit).
        let bound = match ty {
            GgmlType::Q2_K => 0.45,
            GgmlType::Q3_K => 0.3,
            GgmlType::Q4_K => 0.12,
            _ => 0.07,
        };
        assert!(err < bound, "{ty}: max error {err}");
    }
}

#[test]
fn one_row_and_batched_dots_are_the_scalar_bits_for_every_width() {
    // Every row length from 1 to 41 chunks (all remainders of the group of 8, one to
    // five groups and more than the 4 accumulators), 1 to 9 activation rows.
    for ty in BLOCK_TYPES {
        let per = ty.block_len() / QK;
        for blocks in 1..=41usize.div_ceil(per) {
            let row = random_blocks(ty, blocks, blocks as u64 + 70, blocks % 5 == 0);
            let nb = blocks * per;
            for rows in 1..=9usize {
                let xq = acts(nb * QK * rows, (rows + blocks) as u32);
                let sc = ActScales::new(&xq, nb);
                let (d, s, xn) = (&sc.d, &sc.s, &sc.n);
                let stride = scales_stride(nb);
                let mut out = vec![0.0; rows];
                dot_rows(ty, &row, &xq, sc.rows(0, rows), &mut RowPrep::default(), &mut out);
                // Without VNNI too, where the CPU has it (the same bits either way).
                let mut plain = vec![0.0; rows];
                dot_rows_with(ty, &row, &xq, sc.rows(0, rows), &mut RowPrep::default(), &mut plain, false);
                assert_eq!(bits(&out), bits(&plain), "{ty} {nb} chunks, {rows} rows, without VNNI");
                for (r, o) in out.iter().enumerate() {
                    let x = &xq[r * nb..(r + 1) * nb];
                    let want = dot_row_scalar(ty, &row, x);
                    let rs = r * stride..(r + 1) * stride;
                    let one = dot_row_scaled(ty, &row, x, &d[rs.clone()], &s[rs.clone()], &xn[rs.clone()]);
                    assert_eq!(one.to_bits(), want.to_bits(), "{ty} {nb} chunks, one row");
                    let plain = dot_row_with(
                        ty,
                        &row,
                        x,
                        &d[r * stride..(r + 1) * stride],
                        &s[r * stride..(r + 1) * stride],
                        &xn[rs],
                        false,
                    );
                    assert_eq!(plain.to_bits(), want.to_bits(), "{ty} {nb} chunks, one row without VNNI");
                    assert_eq!(dot_row(ty, &row, x).to_bits(), want.to_bits(), "{ty} {nb} chunks, dot_row");
                    assert_eq!(o.to_bits(), want.to_bits(), "{ty} {nb} chunks, {rows} rows, row {r}");
                }
            }
        }
    }
}

#[test]
fn simd_activation_quantization_is_the_reference_bits() {
    let mut blocks: Vec<Vec<f32>> =
        (0..200u32).map(|s| vals(QK, s).iter().map(|v| v * (s as f32 + 0.5)).collect()).collect();
    // Exact halves after scaling (amax 127 makes inv 1), ties both ways, zeros, -0.0,
    // subnormals, huge values, infinities and NaN.
    let mut halves: Vec<f32> = (0..QK).map(|i| i as f32 - 15.5).collect();
    halves[0] = 127.0;
    blocks.push(halves.clone());
    blocks.push(halves.iter().map(|v| -v).collect());
    blocks.push(vec![0.0; QK]);
    blocks.push(vec![-0.0; QK]);
    blocks.push((0..QK).map(|i| f32::from_bits(i as u32 + 1)).collect());
    blocks.push((0..QK).map(|i| f32::MAX / (i as f32 + 1.0)).collect());
    blocks.push((0..QK).map(|i| if i == 3 { f32::INFINITY } else { i as f32 }).collect());
    blocks.push((0..QK).map(|i| if i == 9 { f32::NAN } else { -(i as f32) }).collect());
    blocks.push((0..QK).map(|i| (i as f32 - 16.0) * 1.0e-39).collect());
    blocks.push((0..QK).map(|i| 0.49999997 * if i % 2 == 0 { 1.0 } else { -1.0 } + (i / 31) as f32 * 126.0).collect());
    for b in &blocks {
        let mut got = Vec::new();
        quantize_act(b, &mut got);
        let want = quantize_block(b);
        assert_eq!(got[0].qs, want.qs, "{b:?}");
        assert_eq!((got[0].d.to_bits(), got[0].s.to_bits()), (want.d.to_bits(), want.s.to_bits()), "{b:?}");
    }
}

#[test]
fn wide_dots_are_the_scalar_bits_for_every_width_and_row_count() {
    // Every row length from 1 to 41 chunks (lane accumulators reused past 32), 1 to 17
    // weight rows (groups padded with zero rows), 1 to 17 activation rows from every
    // tile start, extreme blocks (all bits set) and activations (±127, huge and tiny
    // scales) included.
    for ty in BLOCK_TYPES {
        if !wide_supported(ty) {
            assert!(ty == GgmlType::Q2_K || !has_vnni(), "{ty} has no wide kernel");
            continue;
        }
        let per = ty.block_len() / QK;
        for blocks in 1..=41usize.div_ceil(per) {
            let nb = blocks * per;
            let n_w = 1 + (nb + blocks) % 17;
            let rows_w: Vec<Vec<u8>> = (0..n_w)
                .map(|i| random_blocks(ty, blocks, (nb * 11 + i) as u64 + 7, (nb + i).is_multiple_of(6)))
                .collect();
            let wide = WideRows::new(ty, &rows_w.concat(), rows_w[0].len(), nb);
            assert_eq!(wide.rows(), n_w);
            assert_eq!(wide.bytes(), WideRows::bytes_for(ty, n_w, nb));
            for rows in [1usize, 2, 7, 8, 9, 16, 17] {
                let xq = acts(nb * QK * rows, (5 * rows + nb) as u32);
                let sc = ActScales::new(&xq, nb);
                for r0 in (0..rows).step_by(ROWS) {
                    for g in 0..n_w.div_ceil(WIDE) {
                        let mut out = vec![f32::NAN; (rows - r0) * WIDE];
                        dot_rows_wide(wide.group(g), &xq[r0 * nb..], sc.rows(r0, rows), &mut out);
                        for r in r0..rows {
                            for i in 0..WIDE {
                                let o = g * WIDE + i;
                                let got = out[(r - r0) * WIDE + i];
                                if o >= n_w {
                                    assert_eq!(got.to_bits(), 0, "{ty} padding row {o}");
                                    continue;
                                }
                                let want = dot_row_scalar(ty, &rows_w[o], &xq[r * nb..(r + 1) * nb]);
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{ty} {nb} chunks, row {r} from {r0}, weight row {o}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn consecutive_weight_rows_in_one_call_are_the_scalar_bits() {
    // A decode step's task: 1 to 9 consecutive weight rows against one activation row,
    // every row length from 1 to 41 chunks, each row's dot as the reference's.
    for ty in BLOCK_TYPES {
        let per = ty.block_len() / QK;
        for blocks in 1..=41usize.div_ceil(per) {
            let nb = blocks * per;
            let xq = acts(nb * QK, blocks as u32 + 5);
            let sc = ActScales::new(&xq, nb);
            for count in 1..=9usize {
                let rows: Vec<u8> = (0..count)
                    .flat_map(|o| random_blocks(ty, blocks, (blocks * 16 + o) as u64, (o + blocks) % 4 == 0))
                    .collect();
                let row_bytes = rows.len() / count;
                let mut out = vec![f32::NAN; count];
                dot_row_each(ty, &rows, row_bytes, &xq, &sc.d, &sc.s, &sc.n, &mut out);
                for (o, got) in out.iter().enumerate() {
                    let want = dot_row_scalar(ty, &rows[o * row_bytes..(o + 1) * row_bytes], &xq);
                    assert_eq!(got.to_bits(), want.to_bits(), "{ty} {nb} chunks, row {o} of {count}");
                }
            }
        }
    }
}
