//! End to end on real multi-node testnets: every test starts fresh `sampo node`
//! processes on loopback and talks to them only over HTTP and the CLI.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sampo_testnet::{Testnet, TestnetConfig, get_json, http};
use serde_json::Value;

/// The `sampo` binary cargo built for this workspace (beside this test's deps dir).
fn sampo_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = debug.join("sampo");
    assert!(
        bin.exists(),
        "{} missing: run the workspace tests (cargo test --workspace) so cargo builds it",
        bin.display()
    );
    bin
}

fn synthetic(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("synthetic.gguf");
    std::fs::write(&p, sampo_kernels::synth::synthesize(&sampo_kernels::synth::SynthSpec::default())).expect("write");
    p
}

fn real_model() -> PathBuf {
    let dir = std::env::var("SAMPO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} missing: run scripts/fetch-model.sh", p.display());
    p
}

fn marks(v: &Value) -> Vec<(String, String)> {
    v["sampo"]["marks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["peer_id"].as_str().unwrap_or("").to_owned(), m["mark"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[test]
fn verified_chat_on_five_nodes_with_evidence_that_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = TestnetConfig::new(5, real_model(), tmp.path().join("net"), sampo_bin());
    let net = Testnet::start(cfg).expect("testnet");
    let v = net.chat(0, "What is the capital of France?", 32, 3).expect("chat");
    let answer = v["choices"][0]["message"]["content"].as_str().expect("answer");
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(v["sampo"]["verdict"], "finalized");
    let m = marks(&v);
    assert_eq!(m.len(), 3, "a committee of three");
    assert!(m.iter().all(|(_, mark)| mark == "agreed"), "{m:?}");

    // The evidence: every member's signed commit and reveal, and it verifies offline.
    let url = format!("{}{}", net.nodes[0].api_url, v["sampo"]["evidence_url"].as_str().expect("url"));
    let (status, bundle) = http("GET", &url, None, Duration::from_secs(10)).expect("evidence");
    assert_eq!(status, 200);
    let file = tmp.path().join("bundle.json");
    std::fs::write(&file, &bundle).expect("write");
    let out = Command::new(sampo_bin()).args(["verify", "--json"]).arg(&file).output().expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["outcome"], "finalized");
    // Every node (not only the coordinator) applied the verdict after checking it.
    let task = v["sampo"]["task_id"].as_str().expect("task");
    for n in &net.nodes {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = get_json(&format!("{}/v1/tasks/{task}", n.api_url)).unwrap_or(Value::Null);
            if st["task"]["status"] == "finalized" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {} never applied the verdict: {st}", n.index);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_byzantine_node_is_outvoted_marked_wrong_and_banned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = TestnetConfig::new(5, synthetic(tmp.path()), tmp.path().join("net"), sampo_bin());
    cfg.byzantine = 1;
    cfg.commit_timeout_ms = 10_000;
    cfg.reveal_timeout_ms = 5_000;
    let net = Testnet::start(cfg).expect("testnet");
    let liar = net.nodes[4].peer_id.clone();
    let mut wrong = 0;
    let mut seated_after_ban = 0;
    for i in 0..12 {
        // Each task has its own prompt, so each has its own committee.
        let v = net.chat(0, &format!("task number {i}"), 8, 3).expect("chat");
        assert_eq!(v["sampo"]["verdict"], "finalized", "task {i}: {v}");
        let m = marks(&v);
        for (peer, mark) in &m {
            if *peer == liar {
                assert_eq!(mark, "wrong", "the liar is caught every time it sits");
                if wrong >= 2 {
                    seated_after_ban += 1;
                }
                wrong += 1;
            } else {
                assert_eq!(mark, "agreed", "an honest member is never marked wrong");
            }
        }
    }
    assert!(wrong >= 2, "the liar sat on at least two of twelve committees");
    assert_eq!(seated_after_ban, 0, "a banned node is not sampled again");
    let peers = get_json(&format!("{}/v1/peers", net.nodes[0].api_url)).expect("peers");
    let me = peers["peers"].as_array().into_iter().flatten().find(|p| p["peer_id"] == liar.as_str()).cloned();
    let rep = me.expect("liar in registry")["reputation"].clone();
    assert_eq!(rep["banned"], true, "{rep}");
    assert_eq!(rep["agreed"].as_f64(), Some(0.0));
}
