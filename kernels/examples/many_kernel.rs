//! Microbenchmark of the many-row kernel alone: `many_kernel [ROWS_W] [NB] [REPS]`.
//! Hot (weights in L2) and cold (weights larger than L3) ns per block-column.
use sampo_kernels::gguf::GgmlType;
use sampo_kernels::quant::*;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let nb = arg(1, 18);
    for (ty, name) in [(GgmlType::Q4_1, "q4_1"), (GgmlType::Q8_0, "q8_0")] {
        for rows_w in [256usize, 262144] {
            let bb = ty.block_bytes();
            let mut s = 0x1234_5678u64;
            let mut bytes: Vec<u8> = (0..rows_w * nb * bb)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            for b in 0..rows_w * nb {
                bytes[b * bb..b * bb + 2].copy_from_slice(&0x3c00u16.to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    bytes[b * bb + 2..b * bb + 4].copy_from_slice(&0x3c00u16.to_le_bytes());
                }
            }
            let kept = PreparedRows::new(ty, &bytes, nb * bb, nb);
            let x: Vec<f32> = (0..8 * nb * QK).map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0).collect();
            let mut xq = Vec::new();
            quantize_act(&x, &mut xq);
            let sc = ActScales::new(&xq, nb);
            let pack = ActPack::new(&xq, nb);
            let mut out = vec![0.0f32; 8 * COLS];
            let reps = (arg(2, 200_000_000) / (rows_w * nb)).max(1);
            let t = Instant::now();
            let mut sink = 0.0f32;
            for _ in 0..reps {
                for g in (0..rows_w).step_by(COLS) {
                    let ps: [PrepRef<'_>; COLS] = std::array::from_fn(|i| kept.row(g + i));
                    dot_rows_many(ty, ps, &pack, &sc, 0, 8, &mut out);
                    sink += out[0];
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (reps * rows_w * nb) as f64;
            println!("{name} rows {rows_w} nb {nb}: {ns:.2} ns per block-column (8 rows) {sink}");
            let wide = WideRows::new(ty, &bytes, nb * bb, nb);
            let mut out = vec![0.0f32; 8 * WIDE];
            let t = Instant::now();
            for _ in 0..reps {
                for g in 0..rows_w / WIDE {
                    dot_rows_wide(ty, wide.group(g), &xq, sc.rows(0, 8), &mut out);
                    sink += out[0];
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (reps * rows_w * nb) as f64;
            println!("{name} wide rows {rows_w} nb {nb}: {ns:.2} ns per block-column (8 rows) {sink}");
        }
    }
}
