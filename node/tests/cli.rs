//! The `sampo` binary as an operator uses it.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::sampo;

/// (status, body) of a GET, through the testnet crate's plain-std HTTP client.
fn http_get(url: &str) -> Result<(u16, String), sampo_testnet::TestnetError> {
    sampo_testnet::http("GET", url, None, Duration::from_secs(10))
}

fn wait_for_file(p: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && s.ends_with('}')
        {
            return s;
        }
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A user's error is the error and its causes, never a backtrace, even with
/// `RUST_BACKTRACE` set.
#[test]
fn user_errors_print_no_backtrace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[consensus]\nk = 0\n").expect("write");
    let out = sampo()
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env("RUST_BACKTRACE", "full")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("consensus.k"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    let out = sampo()
        .args(["model", "inspect"])
        .arg(tmp.path().join("missing.gguf"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.starts_with("error: ") && !err.to_lowercase().contains("backtrace"), "{err}");
}

#[test]
fn help_and_version() {
    let out = sampo().arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["node", "keys", "config"] {
        assert!(text.contains(sub), "--help lacks {sub}: {text}");
    }
    let out = sampo().arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn config_default_round_trips_through_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = sampo().args(["config", "default"]).output().expect("run");
    assert!(out.status.success());
    let p = dir.path().join("sampo.toml");
    std::fs::write(&p, &out.stdout).expect("write");
    let out = sampo().args(["config", "check", "--config"]).arg(&p).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn invalid_config_fails_with_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[consensus]\nk = 0\n").expect("write");
    let out = sampo().args(["node", "--config"]).arg(&p).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("consensus.k") && err.contains("outside"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = sampo().args(["config", "check"]).env("SAMPO_API__PORT", "1").output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SAMPO_API__PORT"));
}

#[test]
fn keys_generate_show_and_refuse_open_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = sampo().args(["keys", "generate", "--data-dir"]).arg(dir.path()).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let peer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(peer.starts_with("12D3KooW"), "{peer}");
    let key = dir.path().join("node.key");
    assert_eq!(std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777, 0o600);
    let out = sampo().args(["keys", "show", "--data-dir"]).arg(dir.path()).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&peer));
    let secret_hex: String = std::fs::read(&key).expect("read").iter().map(|b| format!("{b:02x}")).collect();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret_hex), "secret printed");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out =
        sampo().args(["node", "--api-listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path()).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn node_starts_reports_ready_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = sampo()
        .args(["node", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let info: serde_json::Value =
        serde_json::from_str(&wait_for_file(&dir.path().join("node.json"), Duration::from_secs(60))).expect("json");
    let api = info["api_url"].as_str().expect("api_url").to_owned();
    assert_eq!(http_get(&format!("{api}/health")).expect("health"), (200, "ok".into()));
    let (status, body) = http_get(&format!("{api}/ready")).expect("ready");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&format!("{api}/v1/node")).expect("node");
    assert_eq!(status, 200);
    let node: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(node["peer_id"], info["peer_id"]);
    let (status, body) = http_get(&format!("{api}/nope")).expect("404");
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""));

    // SAFETY: plain kill(2) on our own child.
    let rc = unsafe { libc_kill(child.id() as i32, 15) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read");
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("node ready") && err.contains("flushing storage"), "{err}");
    let secret_hex: String =
        std::fs::read(dir.path().join("node.key")).expect("key").iter().map(|b| format!("{b:02x}")).collect();
    assert!(!err.contains(&secret_hex), "key leaked into logs");

    // Restarted on the same data dir: same identity.
    let out = sampo().args(["keys", "show", "--data-dir"]).arg(dir.path()).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(info["peer_id"].as_str().expect("peer")));
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
