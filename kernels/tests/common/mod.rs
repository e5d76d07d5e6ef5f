//! Shared helpers: the real model (fetched with the project's script when missing)
//! and the llama.cpp reference outputs.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use sampo_kernels::Model;

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The checkout; `SAMPO_REPO_ROOT` overrides it for a test binary run elsewhere (the
/// GPU machines get binaries built here, see scripts/gpu-pack.sh).
fn repo_root() -> PathBuf {
    // Cargo sets CARGO_MANIFEST_DIR when it runs a test too: that one names this
    // checkout even when the binary was built from another one sharing the target dir.
    std::env::var_os("SAMPO_REPO_ROOT").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("..")
    })
}

/// Path of the real model, downloading it with `scripts/fetch-model.sh` if needed.
/// Never skips: a test that needs the model fails loudly when it can't be had.
pub fn real_model_path() -> PathBuf {
    let dir = std::env::var_os("SAMPO_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("models"));
    let path = dir.join(MODEL_FILE);
    if !path.exists() {
        let status = std::process::Command::new(repo_root().join("scripts/fetch-model.sh"))
            .env("SAMPO_MODEL_DIR", &dir)
            .status()
            .expect("run scripts/fetch-model.sh");
        assert!(status.success(), "scripts/fetch-model.sh failed; the real-model tests need {}", path.display());
    }
    path
}

pub fn real_model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Model::load(&real_model_path()).expect("load real model"))).clone()
}

pub fn reference() -> serde_json::Value {
    read_reference("smollm2-llamacpp.json")
}

fn read_reference(name: &str) -> serde_json::Value {
    let p = repo_root().join("kernels/tests/data").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("reference file")).expect("reference json")
}

/// The Gemma 3 270M file llama.cpp's reference outputs were made with.
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

pub fn gemma3_reference() -> serde_json::Value {
    read_reference("gemma3-270m-llamacpp.json")
}

/// Path of the real Gemma 3 file (`SAMPO_MODEL_DIR`, else `models/`), fetched with
/// `scripts/fetch-model.sh gemma3` when missing; never skips.
pub fn gemma3_path() -> PathBuf {
    let dir = std::env::var_os("SAMPO_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("models"));
    let path = dir.join(GEMMA3_FILE);
    if !path.exists() {
        let status = std::process::Command::new(repo_root().join("scripts/fetch-model.sh"))
            .arg("gemma3")
            .env("SAMPO_MODEL_DIR", &dir)
            .status()
            .expect("run scripts/fetch-model.sh gemma3");
        assert!(status.success(), "scripts/fetch-model.sh gemma3 failed; the Gemma 3 tests need {}", path.display());
    }
    path
}

/// Gemma 3 270M Q4_K_M, loaded once.
pub fn gemma3_model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Model::load(&gemma3_path()).expect("load Gemma 3 270M Q4_K_M"))).clone()
}

/// The Gemma 3 tokenizer, from the real file.
pub fn gemma3_tokenizer() -> Arc<sampo_kernels::Tokenizer> {
    static T: OnceLock<Arc<sampo_kernels::Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let file = sampo_kernels::gguf::GgufFile::open(&gemma3_path()).expect("open Gemma 3");
        Arc::new(sampo_kernels::Tokenizer::from_gguf(&file).expect("Gemma 3 tokenizer"))
    })
    .clone()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
