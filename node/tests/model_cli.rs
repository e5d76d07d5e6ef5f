//! `sampo model …` and `sampo bench` on the synthetic model, as a user runs them.

mod common;

use common::{sampo, synth_model as synth};

#[test]
fn synth_is_deterministic_and_inspectable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = synth(dir.path());
    let again = dir.path().join("again.gguf");
    sampo().args(["model", "synth", "--out"]).arg(&again).output().expect("run");
    assert_eq!(std::fs::read(&p).expect("read"), std::fs::read(&again).expect("read"), "same seed, same bytes");
    let out = sampo().args(["model", "inspect"]).arg(&p).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in ["llama", "Q4_1", "Q8_0", "F32", "2 layers"] {
        assert!(text.contains(want), "inspect lacks {want}: {text}");
    }
    let out = sampo().args(["model", "inspect", "--json"]).arg(&p).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["hparams"]["n_layer"], 2);
}

/// The synthetic model with one tensor's type number and the architecture replaced.
fn retyped(dir: &std::path::Path, ty: sampo_kernels::gguf::GgmlType, arch: &str) -> std::path::PathBuf {
    use sampo_kernels::gguf::{GgufFile, GgufWriter, MetaValue};
    let f = GgufFile::open(&synth(dir)).expect("parse");
    let mut w = GgufWriter::new();
    for (k, v) in &f.metadata {
        let v = if k == "general.architecture" { MetaValue::String(arch.into()) } else { v.clone() };
        w.meta(k, v);
    }
    for t in &f.tensors {
        // attn_v is Q4_0, whose block size IQ4_NL shares: only the type number changes.
        let tt = if t.name == "blk.0.attn_v.weight" { ty } else { t.ty };
        w.tensor(&t.name, &t.dims, tt, f.tensor_data(t).to_vec());
    }
    let p = dir.join(format!("{arch}-{ty}.gguf"));
    std::fs::write(&p, w.to_bytes()).expect("write");
    p
}

#[test]
fn inspect_describes_files_sampo_cannot_run() {
    use sampo_kernels::gguf::GgmlType;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = retyped(dir.path(), GgmlType::IQ4_NL, "llama");
    let out = sampo().args(["model", "inspect"]).arg(&p).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["Q4_1 (type 3)", "IQ4_NL (type 20)", "NOT supported", "runs on sampo: no", "blk.0.attn_v.weight"] {
        assert!(text.contains(want), "inspect lacks {want}: {text}");
    }
    let out = sampo().args(["model", "inspect", "--json"]).arg(&p).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["runnable"], false);
    assert_eq!(v["unsupported_types"][0], "IQ4_NL (type 20)");
    assert_eq!(v["tensor_types"]["IQ4_NL"]["supported"], false);
    assert_eq!(v["tensor_types"]["Q4_1"]["supported"], true);
    // An architecture sampo does not run: said by name, every type still listed.
    let p = retyped(dir.path(), GgmlType::Q4_0, "mamba");
    let out = sampo().args(["model", "inspect"]).arg(&p).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in ["architecture:  mamba", "Q4_0 (type 2)", "runs on sampo: no", "`mamba`"] {
        assert!(text.contains(want), "inspect lacks {want}: {text}");
    }
}

#[test]
fn tokenize_and_run_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = synth(dir.path());
    let out = sampo().args(["model", "tokenize"]).arg(&p).arg("<|im_start|> the").output().expect("run");
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).expect("ids");
    assert_eq!(ids[0], 1, "special token parsed");
    assert_eq!(ids.len(), 2, "` the` is one merged token: {ids:?}");
    let run = |seed: &str| {
        let out = sampo()
            .args(["model", "run"])
            .arg(&p)
            .args(["--prompt", "hello", "--max-tokens", "12", "--temperature", "0.9", "--seed", seed, "--json"])
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let a = run("5");
    assert_eq!(a["output_ids"], run("5")["output_ids"], "same seed, same output");
    assert!(a["output_ids"].as_array().expect("ids").len() <= 12);
    assert!(a["timings"]["decode_tokens_per_s"].as_f64().is_some());
    assert!(a["prompt_ids"].as_array().expect("prompt").len() >= 2);
}

#[test]
fn run_rejects_bad_input_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = synth(dir.path());
    let out = sampo().args(["model", "run"]).arg(&p).args(["--prompt", "x", "--top-p", "0"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    let out =
        sampo().args(["model", "run"]).arg(&p).args(["--prompt", "x", "--max-tokens", "5000"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("context length"));
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"GGUF\x03\x00\x00\x00").expect("write");
    let out = sampo().args(["model", "inspect"]).arg(&bogus).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated") && !err.contains("panicked"), "{err}");
}

#[test]
fn bench_reports_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = synth(dir.path());
    let out = sampo()
        .args(["bench", "--model"])
        .arg(&p)
        .args(["--prompt-tokens", "16", "--gen-tokens", "8", "--reps", "1", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["prefill_tokens_per_s"].as_f64().expect("prefill") > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().expect("decode") > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().expect("rss") > 0);
}

#[test]
fn bench_on_cuda_without_a_device_is_a_clear_error() {
    if sampo_kernels::cuda::detect::probe().is_ok() {
        return; // a GPU machine runs the real thing (kernels/tests/cuda_gpu.rs)
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = synth(dir.path());
    let out = sampo().args(["bench", "--backend", "cuda", "--model"]).arg(&p).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA is not available") && !err.contains("panicked"), "{err}");
}
