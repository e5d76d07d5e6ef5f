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

/// `sampo keys certify` signs a peer id with an issuer's node key into a certificate
/// that verifies for that peer and that issuer, and refuses a readable issuer key.
#[test]
fn keys_certify_issues_a_verifying_certificate() {
    let issuer_dir = tempfile::tempdir().expect("tempdir");
    let node_dir = tempfile::tempdir().expect("tempdir");
    let out = sampo().args(["keys", "generate", "--data-dir"]).arg(issuer_dir.path()).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let issuer_key = issuer_dir.path().join("node.key");
    let out = sampo().args(["keys", "show", "--data-dir"]).arg(issuer_dir.path()).output().expect("run");
    let show = String::from_utf8_lossy(&out.stdout).into_owned();
    let issuer_pub = show
        .lines()
        .find_map(|l| l.strip_prefix("public_key: "))
        .map(|h| <[u8; 32]>::try_from(hex_bytes(h.trim())).expect("32 bytes"))
        .expect("public key shown");
    let out = sampo().args(["keys", "generate", "--data-dir"]).arg(node_dir.path()).output().expect("run");
    let subject: sampo_consensus::PeerId = String::from_utf8_lossy(&out.stdout).trim().parse().expect("peer id");

    let cert_path = node_dir.path().join("admission.cert");
    let out = sampo()
        .args(["keys", "certify", "--days", "30", "--subject", &subject.to_string(), "--issuer-key"])
        .arg(&issuer_key)
        .arg("--out")
        .arg(&cert_path)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cert = sampo_consensus::AdmissionCertificate::from_bytes(&std::fs::read(&cert_path).expect("read"))
        .expect("a certificate");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    assert_eq!(cert.verify(&subject, &[issuer_pub], now), Ok(()));
    assert!(cert.expires_ms > now + 29 * 86_400_000 && cert.expires_ms <= now + 31 * 86_400_000);
    // It admits only its subject.
    let other: sampo_consensus::PeerId = sampo_consensus::NodeKey::from_seed([5; 32]).peer_id();
    assert!(cert.verify(&other, &[issuer_pub], now).is_err());

    // Without --out: hex on stdout, the same certificate format.
    let out = sampo()
        .args(["keys", "certify", "--subject", &subject.to_string(), "--issuer-key"])
        .arg(&issuer_key)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed =
        sampo_consensus::AdmissionCertificate::from_bytes(&hex_bytes(String::from_utf8_lossy(&out.stdout).trim()))
            .expect("hex certificate");
    assert_eq!(printed.verify(&subject, &[issuer_pub], now), Ok(()));

    // A node configured with the certificate passes `config check`.
    let cfg = node_dir.path().join("closed.toml");
    std::fs::write(
        &cfg,
        format!(
            "[network]\nadmission_keys = [\"{}\"]\ncertificate = \"{}\"\n",
            show.lines().find_map(|l| l.strip_prefix("public_key: ")).expect("key").trim(),
            cert_path.display()
        ),
    )
    .expect("write");
    let out = sampo().args(["config", "check", "--config"]).arg(&cfg).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A bad subject, and an issuer key others can read, are refused.
    let out =
        sampo().args(["keys", "certify", "--subject", "nope", "--issuer-key"]).arg(&issuer_key).output().expect("run");
    assert!(!out.status.success());
    std::fs::set_permissions(&issuer_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let refused = node_dir.path().join("refused.cert");
    let out = sampo()
        .args(["keys", "certify", "--subject", &subject.to_string(), "--issuer-key"])
        .arg(&issuer_key)
        .arg("--out")
        .arg(&refused)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!refused.exists(), "no certificate from a readable key");
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex")).collect()
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
