//! A real node, driven over HTTP with curl: the OpenAI-compatible API, streaming, the
//! task API, bad input, access control, the queue and the metrics.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// This crate's directory in the checkout running the test (cargo sets it at run time
/// too; the compile-time one names wherever a reused test binary was built).
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

const SINGLE: &str = "[consensus]\nk = 1\n[network]\nannounce_interval_secs = 1\n";

#[test]
fn openai_endpoints_streaming_and_task_api() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = synth_model(tmp.path());
    let node = start_node(Some(&model), SINGLE);
    let u = &node.url;

    let (code, models) = get_json(&format!("{u}/v1/models"));
    assert_eq!(code, 200);
    let name = models["data"][0]["id"].as_str().expect("a model").to_owned();

    let body =
        format!(r#"{{"model":"{name}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":8,"temperature":0}}"#);
    let (code, v) = post_json(&format!("{u}/v1/chat/completions"), &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["sampo"]["verdict"], "finalized");
    assert_eq!(v["usage"]["completion_tokens"].as_u64().map(|n| n <= 8), Some(true));
    let content = v["choices"][0]["message"]["content"].as_str().expect("content").to_owned();

    // The same request streamed: chunks as tokens come, then the verdict, then [DONE].
    let tokens_made = || {
        let (_, text) = curl(&[&format!("{u}/metrics")]);
        text.lines()
            .find(|l| l.starts_with("sampo_inference_tokens_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .expect("sampo_inference_tokens_total")
    };
    let before = tokens_made();
    let sbody = body.replace("\"max_tokens\":8", "\"max_tokens\":8,\"stream\":true");
    let (code, sse) =
        curl(&["-N", "-H", "content-type: application/json", "-d", &sbody, &format!("{u}/v1/chat/completions")]);
    assert_eq!(code, 200);
    let events: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");
    let chunks: Vec<serde_json::Value> =
        events.iter().filter(|e| **e != "[DONE]").map(|e| serde_json::from_str(e).expect("chunk json")).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, content, "greedy stream equals the verified answer");
    let last = chunks.last().expect("final chunk");
    assert_eq!(last["sampo"]["verdict"], "finalized");
    assert_eq!(last["sampo"]["streamed_tokens_match_verdict"], true);
    // Decoded once: the node's own seat on the task took the streamed run's tokens.
    let completion = v["usage"]["completion_tokens"].as_f64().expect("usage");
    assert_eq!(tokens_made() - before, completion, "the stream and the seat decoded it once between them");

    // Plain completions.
    let (code, v) =
        post_json(&format!("{u}/v1/completions"), &format!(r#"{{"model":"{name}","prompt":"the","max_tokens":4}}"#));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "text_completion");

    // Task API: submit, poll, fetch the evidence, verify it offline.
    let (code, v) =
        post_json(&format!("{u}/v1/tasks"), &format!(r#"{{"model":"{name}","prompt":"hello","max_tokens":4}}"#));
    assert_eq!(code, 202, "{v}");
    let task = v["task_id"].as_str().expect("task id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, st) = get_json(&format!("{u}/v1/tasks/{task}"));
        if st["task"]["status"] == "finalized" {
            break;
        }
        assert!(Instant::now() < deadline, "task never finalized: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, bundle) = curl(&[&format!("{u}/v1/tasks/{task}/evidence")]);
    assert_eq!(code, 200);
    let file = tmp.path().join("bundle.json");
    std::fs::write(&file, bundle).expect("write");
    let out = sampo().arg("verify").arg(&file).output().expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (code, v) = get_json(&format!("{u}/v1/peers"));
    assert_eq!(code, 200);
    assert_eq!(v["peers"].as_array().map(Vec::len), Some(1));
    assert!(v["peers"][0]["reputation"]["agreed"].as_f64().is_some_and(|a| a > 0.0), "{v}");
    let (code, v) = get_json(&format!("{u}/v1/node"));
    assert_eq!(code, 200);
    assert_eq!(v["backend"], "cpu");
    // The node's filesystem layout is nobody's business over the API.
    let dir = tmp.path().display().to_string();
    assert!(v.get("data_dir").is_none() && !v.to_string().contains(&dir), "{v}");
    // No GPU here: `auto` says why it serves on the CPU, and reports no accelerator.
    if sampo_kernels::cuda::detect::probe().is_err() {
        assert!(v["backend_reason"].as_str().is_some_and(|r| r.contains("CUDA")), "{v}");
        assert!(v["device_status"].is_null(), "{v}");
    }
}

#[test]
fn bad_input_gets_a_typed_json_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = synth_model(tmp.path());
    let node = start_node(Some(&model), &format!("{SINGLE}[api]\nmax_body_bytes = 4096\n"));
    let chat = format!("{}/v1/chat/completions", node.url);
    let (_, models) = get_json(&format!("{}/v1/models", node.url));
    let name = models["data"][0]["id"].as_str().expect("a model").to_owned();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid_request_error"),
        (r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.into(), 404, "model_not_found"),
        (
            format!(r#"{{"model":"{name}","messages":[{{"role":"user","content":"x"}}],"temperature":50}}"#),
            400,
            "invalid_request_error",
        ),
        (
            format!(r#"{{"model":"{name}","messages":[{{"role":"user","content":"x"}}],"max_tokens":100000}}"#),
            400,
            "invalid_request_error",
        ),
        (format!(r#"{{"model":"{name}","messages":[]}}"#), 400, "invalid_request_error"),
        (
            format!(
                r#"{{"model":"{name}","messages":[{{"role":"user","content":"{}"}}],"max_tokens":100}}"#,
                "a b ".repeat(1200)
            ),
            413,
            "request_too_large",
        ),
        (
            format!(
                r#"{{"model":"{name}","messages":[{{"role":"user","content":"{}"}}],"max_tokens":500}}"#,
                "ab ".repeat(1500)
            ),
            413,
            "request_too_large",
        ),
    ];
    for (body, status, kind) in cases {
        let (code, v) = post_json(&chat, &body);
        assert_eq!(code, status, "{body:.80}: {v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A prompt that fits the body limit but not the context.
    let node2 = start_node(Some(&model), SINGLE);
    let long = format!(
        r#"{{"model":"{name}","messages":[{{"role":"user","content":"{}"}}],"max_tokens":500}}"#,
        "ab ".repeat(1300)
    );
    let (code, v) = post_json(&format!("{}/v1/chat/completions", node2.url), &long);
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["type"], "context_length_exceeded");
    let (code, v) = curl(&["-d", "{}", &chat]);
    assert_eq!(code, 415, "{v}");
    let (code, v) = get_json(&format!("{}/v1/nothing", node.url));
    assert_eq!(code, 404);
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[test]
fn api_keys_ip_allowlist_and_rate_limits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = synth_model(tmp.path());
    let node = start_node(
        Some(&model),
        &format!(
            "{SINGLE}[api]\napi_keys = [\"secret-key-1\"]\nrate_limit_per_minute = 3\nallow_ips = [\"127.0.0.0/8\"]\n"
        ),
    );
    let models = format!("{}/v1/models", node.url);
    let (code, v) = curl(&[&models]);
    assert_eq!(code, 401, "{v}");
    let (code, _) = curl(&["-H", "Authorization: Bearer wrong-key-0", &models]);
    assert_eq!(code, 401);
    for _ in 0..3 {
        let (code, _) = curl(&["-H", "Authorization: Bearer secret-key-1", &models]);
        assert_eq!(code, 200);
    }
    let out = Command::new("curl")
        .args(["-s", "-i", "-H", "Authorization: Bearer secret-key-1", &models])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 429"), "{text}");
    assert!(text.contains("retry-after:"), "{text}");
    // Health probes need no key.
    assert_eq!(curl(&[&format!("{}/health", node.url)]).0, 200);

    let closed = start_node(Some(&model), &format!("{SINGLE}[api]\nallow_ips = [\"10.0.0.0/8\"]\n"));
    let (code, v) = curl(&[&format!("{}/v1/models", closed.url)]);
    assert_eq!(code, 403, "{v}");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // The real model is slow enough that one job holds the only worker for seconds.
    let node =
        start_node(Some(&real_model()), &format!("{SINGLE}[execution]\nmax_concurrent = 1\nqueue_capacity = 1\n"));
    let chat = format!("{}/v1/chat/completions", node.url);
    let body = r#"{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"Tell me a long story."}],"max_tokens":400,"stream":true,"temperature":0}"#;
    let (_, models) = get_json(&format!("{}/v1/models", node.url));
    let name = models["data"][0]["id"].as_str().expect("model").to_owned();
    let body = body.replace("smollm2-135m-instruct", &name);
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new("curl")
                .args(["-s", "-i", "-N", "-m", "120", "-H", "content-type: application/json", "-d", &body, &chat])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("curl")
        })
        .collect();
    let outputs: Vec<String> = children
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.wait_with_output().expect("curl").stdout).to_lowercase())
        .collect();
    let refused: Vec<&String> = outputs.iter().filter(|o| o.starts_with("http/1.1 429")).collect();
    let served = outputs.iter().filter(|o| o.starts_with("http/1.1 200")).count();
    assert!(!refused.is_empty(), "four 400-token streams on one worker and a queue of one: {outputs:?}");
    assert!(served >= 1);
    assert!(refused.iter().all(|o| o.contains("retry-after:")));
    let (_, metrics) = curl(&[&format!("{}/metrics", node.url)]);
    assert!(metrics.contains("sampo_queue_rejections_total"), "{metrics}");
}

#[test]
fn metrics_pass_promtool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = synth_model(tmp.path());
    let node = start_node(Some(&model), SINGLE);
    let (_, models) = get_json(&format!("{}/v1/models", node.url));
    let name = models["data"][0]["id"].as_str().expect("model").to_owned();
    let (code, _) = post_json(
        &format!("{}/v1/chat/completions", node.url),
        &format!(r#"{{"model":"{name}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}"#),
    );
    assert_eq!(code, 200);
    let (code, text) = curl(&[&format!("{}/metrics", node.url)]);
    assert_eq!(code, 200);
    for family in [
        "sampo_tasks_total",
        "sampo_api_requests_total",
        "sampo_inference_tokens_total",
        "sampo_inference_sequences",
        "libp2p_swarm_",
        "sampo_round_duration_seconds",
        "sampo_device_info{backend=\"cpu\"",
        "sampo_device_memory_free_bytes",
    ] {
        assert!(text.contains(family), "{family} missing");
    }
    let file = tmp.path().join("metrics.txt");
    std::fs::write(&file, &text).expect("write");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool (Debian package prometheus, installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_official_openai_client_works() {
    let node = start_node(Some(&real_model()), SINGLE);
    let script = manifest_dir().join("tests/clients/openai_chat.py");
    let out = Command::new("python3").arg(&script).arg(format!("{}/v1", node.url)).output().expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log_of(node.dir.path())
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("non-streaming ok") && stdout.contains("streaming ok"), "{stdout}");
}

/// Concurrent clients share one batch: each gets the answer it gets alone, and a
/// request sent while a long stream decodes joins the batch instead of waiting for it
/// (prompts of 30-odd tokens in chunks of 16: chunked prefill on the real model).
#[test]
fn concurrent_openai_clients_share_a_batch_and_get_their_own_answers() {
    let node = start_node(
        Some(&real_model()),
        &format!("{SINGLE}[execution]\nmax_concurrent = 8\nprefill_chunk_tokens = 16\n"),
    );
    let script = manifest_dir().join("tests/clients/openai_concurrent.py");
    let out = Command::new("python3").arg(&script).arg(format!("{}/v1", node.url)).arg("6").output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), log_of(node.dir.path()));
    assert!(stdout.contains("concurrent ok") && stdout.contains("mid-batch ok"), "{stdout}");
}

#[test]
fn a_client_that_disconnects_mid_stream_stops_its_inference() {
    let node = start_node(Some(&real_model()), &format!("{SINGLE}[execution]\nmax_tokens_per_task = 4096\n"));
    let (_, models) = get_json(&format!("{}/v1/models", node.url));
    let name = models["data"][0]["id"].as_str().expect("model").to_owned();
    let body = format!(
        r#"{{"model":"{name}","messages":[{{"role":"user","content":"Count from one to a thousand."}}],"max_tokens":2000,"temperature":0,"stream":true}}"#
    );
    let mut child = Command::new("curl")
        .args([
            "-s",
            "-N",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &format!("{}/v1/chat/completions", node.url),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    // Read until the first token arrives, then hang up.
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains("\"content\"") {
        let n = std::io::Read::read(&mut out, &mut buf).expect("read");
        assert!(n > 0 && Instant::now() < deadline, "no token before the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().expect("kill curl");
    let _ = child.wait();
    drop(out);
    // 2,000 tokens would take half a minute; the worker must notice the hang-up at its
    // next token and stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = get_json(&format!("{}/v1/node", node.url));
        if v["queue"]["cancelled"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the streamed inference kept running: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backend_cuda_without_a_usable_device_fails_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = sampo()
        .arg("node")
        .args(["--api-listen", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("SAMPO_DATA_DIR", dir.path().join("d"))
        .env("SAMPO_EXECUTION__BACKEND", "cuda")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("execution.backend = \"cuda\""), "{err}");
    if sampo_kernels::cuda::detect::probe().is_err() {
        assert!(err.contains("no CUDA driver") || err.contains("no device"), "the reason, not just a refusal: {err}");
    }
}

/// Client accounts: a bearer key's empty account gets 402 (as an `APIStatusError` from
/// the official client); an admin key credits it; a task holds, then settles its fee,
/// and the ledger's balances still equal its deposits.
#[test]
fn accounts_hold_and_settle_fees_and_an_empty_one_gets_402() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = synth_model(tmp.path());
    let node = start_node(
        Some(&model),
        &format!("{SINGLE}[api]\napi_keys = [\"client-key\"]\nadmin_keys = [\"admin-key\"]\n"),
    );
    let auth = |k: &str| format!("Authorization: Bearer {k}");
    let (code, acct) = curl(&["-H", &auth("client-key"), &format!("{}/v1/account", node.url)]);
    assert_eq!(code, 200, "{acct}");
    let acct: serde_json::Value = serde_json::from_str(&acct).expect("json");
    assert_eq!(acct["balance"], 0);
    let name = acct["account"].as_str().expect("name").to_owned();
    assert!(name.starts_with("key-") && !name.contains("client-key"), "{name}");

    let script = manifest_dir().join("tests/clients/openai_quota.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("{}/v1", node.url))
        .arg("client-key")
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    let deposit = format!("{}/v1/accounts/{name}/deposit", node.url);
    let body = r#"{"amount": 1000}"#;
    let (code, _) = curl(&["-H", &auth("client-key"), "-H", "content-type: application/json", "-d", body, &deposit]);
    assert_eq!(code, 403, "only an admin key deposits");
    let (code, v) = curl(&["-H", &auth("admin-key"), "-H", "content-type: application/json", "-d", body, &deposit]);
    assert_eq!(code, 200, "{v}");

    let (_, models) = curl(&["-H", &auth("client-key"), &format!("{}/v1/models", node.url)]);
    let models: serde_json::Value = serde_json::from_str(&models).expect("json");
    let model_name = models["data"][0]["id"].as_str().expect("model").to_owned();
    let chat = format!(
        r#"{{"model":"{model_name}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":8,"temperature":0}}"#
    );
    let (code, v) = curl(&[
        "-H",
        &auth("client-key"),
        "-H",
        "content-type: application/json",
        "-d",
        &chat,
        &format!("{}/v1/chat/completions", node.url),
    ]);
    assert_eq!(code, 200, "{v}");
    let (_, acct) = curl(&["-H", &auth("client-key"), &format!("{}/v1/account", node.url)]);
    let acct: serde_json::Value = serde_json::from_str(&acct).expect("json");
    let charges = acct["recent_charges"].as_array().cloned().unwrap_or_default();
    let fee = charges.iter().find(|c| c["kind"] == "hold").and_then(|c| c["amount"].as_u64()).expect("a hold");
    assert!(fee > 0, "{acct}");
    // Settled: the fee paid out, nothing left held, the rest of the deposit still there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, a) = curl(&["-H", &auth("client-key"), &format!("{}/v1/account", node.url)]);
        let a: serde_json::Value = serde_json::from_str(&a).expect("json");
        if a["held"] == 0 {
            assert_eq!(a["balance"].as_u64(), Some(1000 - fee), "{a}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never settled: {a}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The ledger in /metrics: what was deposited, held, and paid out of the hold.
    let counter = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    loop {
        let (_, text) = curl(&[&format!("{}/metrics", node.url)]);
        if counter(&text, "sampo_ledger_payouts_total") >= 1.0 {
            assert!(counter(&text, "sampo_ledger_deposits_total") >= 1000.0, "{text}");
            assert!(counter(&text, "sampo_ledger_fees_held_total") >= fee as f64, "{text}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ledger metrics: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, info) = curl(&["-H", &auth("client-key"), &format!("{}/v1/node", node.url)]);
    assert!(info.contains("\"accounts\":\"per_key\""), "{info}");
    // A price above what the client will pay per seat is refused before anything is held.
    let dear = chat.replace("\"temperature\":0", "\"temperature\":0,\"sampo\":{\"max_price\":0}");
    let (code, v) = curl(&[
        "-H",
        &auth("client-key"),
        "-H",
        "content-type: application/json",
        "-d",
        &dear,
        &format!("{}/v1/chat/completions", node.url),
    ]);
    assert_eq!(code, 400, "{v}");
    // Client entropy that is not 64 hex digits, and a deposit that would overflow.
    let bad_entropy = chat.replace("\"temperature\":0", "\"temperature\":0,\"sampo\":{\"entropy\":\"zz\"}");
    let (code, v) = curl(&[
        "-H",
        &auth("client-key"),
        "-H",
        "content-type: application/json",
        "-d",
        &bad_entropy,
        &format!("{}/v1/chat/completions", node.url),
    ]);
    assert_eq!(code, 400, "{v}");
    let huge = format!(r#"{{"amount": {}}}"#, u64::MAX);
    let (code, v) = curl(&["-H", &auth("admin-key"), "-H", "content-type: application/json", "-d", &huge, &deposit]);
    assert_eq!(code, 400, "overflow is refused, the balance kept: {v}");
    let (_, a) = curl(&["-H", &auth("client-key"), &format!("{}/v1/account", node.url)]);
    let a: serde_json::Value = serde_json::from_str(&a).expect("json");
    assert_eq!(a["balance"].as_u64(), Some(1000 - fee), "{a}");
}
