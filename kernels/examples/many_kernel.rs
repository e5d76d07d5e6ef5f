//! Microbenchmark of the wide batched kernel alone (`quant::dot_rows_wide`):
//! `many_kernel [NB] [WORK]` — ns per weight block and weight row against 8 activation
//! rows, over 256 weight rows (they stay in L2: compute-bound) and 262,144 (they do not).
use std::time::Instant;

use sampo_kernels::gguf::GgmlType;
use sampo_kernels::quant::{ActScales, QK, WIDE, WideRows, dot_rows_wide, quantize_act, wide_supported};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let nb = arg(1, 18);
    for (ty, name) in
        [(GgmlType::Q4_1, "q4_1"), (GgmlType::Q8_0, "q8_0"), (GgmlType::Q4_K, "q4_k"), (GgmlType::Q6_K, "q6_k")]
    {
        let per = ty.block_len() / QK;
        if !wide_supported(ty) || !nb.is_multiple_of(per) {
            continue;
        }
        for rows_w in [256usize, 262144] {
            let row_bytes = (nb / per) * ty.block_bytes();
            let mut s = 0x1234_5678u64;
            let mut bytes: Vec<u8> = (0..rows_w * row_bytes)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            // Finite f16 scales (1.0) where the simple types keep them.
            if per == 1 {
                let bb = ty.block_bytes();
                for b in 0..rows_w * nb {
                    bytes[b * bb..b * bb + 2].copy_from_slice(&0x3c00u16.to_le_bytes());
                }
            }
            let wide = WideRows::new(ty, &bytes, row_bytes, nb);
            let x: Vec<f32> = (0..8 * nb * QK).map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0).collect();
            let mut xq = Vec::new();
            quantize_act(&x, &mut xq);
            let sc = ActScales::new(&xq, nb);
            let mut out = vec![0.0f32; 8 * WIDE];
            let reps = (arg(2, 100_000_000) / (rows_w * nb)).max(1);
            let t = Instant::now();
            let mut sink = 0.0f32;
            for _ in 0..reps {
                for g in 0..rows_w / WIDE {
                    dot_rows_wide(wide.group(g), &xq, sc.rows(0, 8), &mut out);
                    sink += out[0];
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (reps * rows_w * nb) as f64;
            println!("{name} rows {rows_w} nb {nb}: {ns:.2} ns per block and weight row (8 activation rows) [{sink}]");
        }
    }
}
