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
