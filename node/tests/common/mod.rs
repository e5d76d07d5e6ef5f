//! Start real `sampo node` processes and talk to them with curl, as a client would.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn sampo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sampo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SAMPO_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_BACKTRACE");
    c
}

pub struct TestNode {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn synth_model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    let out = sampo().args(["model", "synth", "--out"]).arg(&p).output().expect("synth");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p
}

/// The real SmolLM2 model; the test command fetches it first (scripts/setup.sh).
pub fn real_model() -> PathBuf {
    let dir = std::env::var("SAMPO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// Start a node serving `model` with `extra` TOML appended to a loopback config.
pub fn start_node(model: Option<&Path>, extra: &str) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("sampo.toml");
    let text = format!("data_dir = \"{}\"\n{extra}\n", dir.path().join("data").display(),);
    std::fs::write(&cfg, text).expect("config");
    let mut cmd = sampo();
    cmd.arg("node").arg("--config").arg(&cfg);
    cmd.args(["--api-listen", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("spawn node");
    let info = dir.path().join("data").join("node.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        if let Ok(s) = std::fs::read_to_string(&info)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&s)
            && let Some(u) = v["api_url"].as_str()
        {
            break u.to_owned();
        }
        assert!(Instant::now() < deadline, "node did not start: {}", log_of(dir.path()));
        std::thread::sleep(Duration::from_millis(50));
    };
    TestNode { child, url, dir }
}

pub fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
}

/// `curl` with the given arguments; returns (status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "120", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl (installed by scripts/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

pub fn post_json(url: &str, body: &str) -> (u16, serde_json::Value) {
    let (code, text) = curl(&["-H", "content-type: application/json", "-d", body, url]);
    (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

pub fn get_json(url: &str) -> (u16, serde_json::Value) {
    let (code, text) = curl(&[url]);
    (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}
