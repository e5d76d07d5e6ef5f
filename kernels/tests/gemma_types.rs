//! The real Gemma 3 270M Q4_K_M file (F32, Q5_0, Q8_0, Q4_K, Q6_K): it reads, every
//! quantized tensor dequantizes to finite, plausible values, and a tensor of each type
//! dequantizes to exactly gguf-py's values (`scripts/fetch-model.sh gemma3` fetches it).

mod common;

use std::collections::BTreeMap;

use sampo_kernels::gguf::{GgmlType, GgufFile};
use sampo_kernels::quant::dequantize_row;

fn open() -> GgufFile {
    GgufFile::open(&common::gemma3_path()).expect("the Gemma file reads")
}

fn dequantize(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).expect("tensor");
    let mut out = vec![0.0f32; t.n_elements() as usize];
    dequantize_row(t.ty, f.tensor_data(t), &mut out);
    out
}

#[test]
fn gemma_tensors_dequantize_as_gguf_py_does() {
    let f = open();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for t in &f.tensors {
        *counts.entry(t.ty.name().to_owned()).or_default() += 1;
        assert!(t.ty.is_supported(), "{} is {}", t.name, t.ty.describe());
    }
    let want: BTreeMap<String, usize> =
        [("F32", 109), ("Q4_K", 27), ("Q5_0", 81), ("Q6_K", 9), ("Q8_0", 10)].map(|(k, v)| (k.to_owned(), v)).into();
    assert_eq!(counts, want);
    // blake3 of the little-endian f32 values from gguf-py 0.19's
    // `gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)`.
    for (name, ty, hash) in [
        ("blk.0.attn_k.weight", GgmlType::Q5_0, "76a414a5967f78e992edd0d1b0b07b511a9df6be50674e004524cb234d706728"),
        (
            "blk.0.attn_output.weight",
            GgmlType::Q4_K,
            "ce0c02d741133629a893a1ab4e7b6b1b21ce1478d390e319a96860de4aaa4494",
        ),
        (
            "blk.5.attn_output.weight",
            GgmlType::Q4_K,
            "dd180a386986080b82d5c2c668d32507f0212c4f2210f2b3dc76cdd59da15c40",
        ),
        ("blk.0.ffn_down.weight", GgmlType::Q6_K, "1cfc1de178f7b6949865bf194354ccc2c2ed4c582bb3352385c0f8512235fe85"),
        ("blk.17.ffn_down.weight", GgmlType::Q6_K, "581140fa93d2d0753ac5f64727d8621e89f7965975d58219ba73a2297629583e"),
        ("blk.0.attn_v.weight", GgmlType::Q8_0, "66c177495fed3dfd20c50b25b7e21a62e271b04128c28ae094932e0f17edd356"),
    ] {
        assert_eq!(f.tensor(name).expect("tensor").ty, ty, "{name}");
        let v = dequantize(&f, name);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), hash, "{name} ({ty}) differs from gguf-py");
    }
    // Every quantized matrix but the 167M-element embedding: finite, and within gguf-py's
    // largest magnitude (1.59375) — a misread scale would be far off.
    let mut max = 0.0f32;
    for t in f.tensors.iter().filter(|t| t.ty != GgmlType::F32 && t.name != "token_embd.weight") {
        let v = dequantize(&f, &t.name);
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
        max = v.iter().fold(max, |m, x| m.max(x.abs()));
    }
    assert_eq!(max, 1.59375);
}
