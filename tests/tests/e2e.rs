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

fn gemma3_model() -> PathBuf {
    let dir = std::env::var("SAMPO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let p = dir.join("gemma-3-270m-q4_k_m.gguf");
    assert!(p.exists(), "{} missing: run scripts/fetch-model.sh gemma3", p.display());
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
    wait_applied_everywhere(&net, v["sampo"]["task_id"].as_str().expect("task"));
}

fn wait_applied_everywhere(net: &Testnet, task: &str) {
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
    let mut tasks_after_ban = 0;
    // Committees are sampled, so how often the liar sits varies (more so on a loaded
    // machine, where announcements arrive late): run tasks until it has been caught
    // twice, then ten more to see that it is never seated again.
    let mut ban_seen = false;
    for i in 0..60 {
        if wrong >= 2 && !ban_seen {
            // Outvoted is not proof: the liar's wrong marks land once node 0's replay
            // refutes its output, a moment after each verdict.
            wait_banned(&net, 0, &liar);
            ban_seen = true;
        }
        if wrong >= 2 {
            tasks_after_ban += 1;
            if tasks_after_ban > 10 {
                break;
            }
        }
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
    assert!(wrong >= 2, "the liar sat on at least two of sixty committees");
    assert_eq!(seated_after_ban, 0, "a banned node is not sampled again");
    let peers = get_json(&format!("{}/v1/peers", net.nodes[0].api_url)).expect("peers");
    let me = peers["peers"].as_array().into_iter().flatten().find(|p| p["peer_id"] == liar.as_str()).cloned();
    let rep = me.expect("liar in registry")["reputation"].clone();
    assert_eq!(rep["banned"], true, "{rep}");
    assert_eq!(rep["agreed"].as_f64(), Some(0.0));
}

/// node `i`'s view of `peer`'s reputation (`Null` when it has none).
fn reputation_of(net: &Testnet, i: usize, peer: &str) -> Value {
    let v = get_json(&format!("{}/v1/peers", net.nodes[i].api_url)).unwrap_or(Value::Null);
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["peer_id"] == peer)
        .map(|p| p["reputation"].clone())
        .unwrap_or(Value::Null)
}

fn wait_banned(net: &Testnet, i: usize, peer: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rep = reputation_of(net, i, peer);
        if rep["banned"] == true {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "node {i} never banned {peer}: {rep}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every honest node holds every honest node blameless.
fn assert_honest_untouched(net: &Testnet) {
    let honest: Vec<usize> = net.nodes.iter().filter(|n| n.role == "honest").map(|n| n.index).collect();
    for &h in &honest {
        for &q in &honest {
            let rep = reputation_of(net, h, &net.nodes[q].peer_id);
            if rep.is_null() {
                continue;
            }
            assert!(
                rep["wrong"].as_f64() == Some(0.0)
                    && rep["absent"].as_f64() == Some(0.0)
                    && rep["equivocations"] == 0
                    && rep["banned"] == false,
                "node {h} holds honest node {q} at {rep}"
            );
        }
    }
}

/// A byzantine coordinator forges absences, drops a member's commit, re-announces a
/// finished attempt to fish for a second commit and signs a second verdict: no honest
/// node's standing falls anywhere, and every honest node bans the coordinator.
#[test]
fn a_byzantine_coordinator_harms_no_honest_node_and_is_banned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = TestnetConfig::new(5, synthetic(tmp.path()), tmp.path().join("net"), sampo_bin());
    cfg.byzantine_coordinators = 1;
    cfg.commit_timeout_ms = 3_000;
    cfg.reveal_timeout_ms = 2_000;
    let net = Testnet::start(cfg).expect("testnet");
    let liar = net.nodes.iter().find(|n| n.role == "byz-coord").expect("role").index;
    for i in 0..2 {
        let v = net.chat(liar, &format!("framing attempt {i}"), 8, 3).expect("chat");
        assert_eq!(v["sampo"]["verdict"], "finalized", "{v}");
    }
    for n in net.nodes.iter().filter(|n| n.role == "honest") {
        wait_banned(&net, n.index, &net.nodes[liar].peer_id);
    }
    assert_honest_untouched(&net);
    let (_, metrics) =
        http("GET", &format!("{}/metrics", net.nodes[0].api_url), None, Duration::from_secs(10)).expect("metrics");
    let seen = metrics
        .lines()
        .find(|l| l.starts_with("sampo_coordinator_equivocations_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(seen.is_some_and(|n| n >= 1.0), "{seen:?}");
}

/// Two colluders of a k = 3 committee reveal the same wrong output, so it finalizes:
/// every honest node's replay refutes it, the task shows as overturned, both liars are
/// banned everywhere, and `sampo verify --replay` on the saved bundle names them and the
/// position where their output leaves the model's.
#[test]
fn a_colluding_majority_is_overturned_by_replay() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = synthetic(tmp.path());
    // Five nodes, so that honest nodes outside the committee learn of the lie only from
    // a fraud proof, which they check by their own replay.
    let mut cfg = TestnetConfig::new(5, model.clone(), tmp.path().join("net"), sampo_bin());
    cfg.byzantine = 2;
    cfg.collude = true;
    cfg.audit_rate = 0.0;
    cfg.commit_timeout_ms = 10_000;
    cfg.reveal_timeout_ms = 5_000;
    let net = Testnet::start(cfg).expect("testnet");
    let liars: Vec<String> = net.nodes.iter().filter(|n| n.role == "colluder").map(|n| n.peer_id.clone()).collect();
    let mut committee: Vec<String> = Vec::new();
    let task = (0..40)
        .find_map(|i| {
            let v = net.chat(0, &format!("collusion {i}"), 8, 3).expect("chat");
            let m = marks(&v);
            // Alone among honest members a colluder tells the truth: it is never caught.
            assert!(m.iter().all(|(_, mark)| mark == "agreed" || mark == "wrong"), "{m:?}");
            let seated = m.iter().filter(|(p, mark)| liars.contains(p) && mark == "agreed").count();
            committee = m.iter().map(|(p, _)| p.clone()).collect();
            (v["sampo"]["verdict"] == "finalized" && seated == 2)
                .then(|| v["sampo"]["task_id"].as_str().expect("task").to_owned())
        })
        .expect("the colluders sat together within 40 tasks");
    let mut learned_from_proof = 0;
    for n in net.nodes.iter().filter(|n| n.role == "honest") {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let st = get_json(&format!("{}/v1/tasks/{task}", n.api_url)).unwrap_or(Value::Null);
            if st["task"]["status"] == "overturned" {
                assert_eq!(st["overturned"]["first_divergent_position"], 7, "{st}");
                if n.index != 0 && !committee.contains(&n.peer_id) {
                    // A bystander: it replayed because of someone else's fraud proof.
                    assert_ne!(st["overturned"]["prover"], n.peer_id.as_str(), "{st}");
                    learned_from_proof += 1;
                }
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {} never overturned: {st}", n.index);
            std::thread::sleep(Duration::from_millis(200));
        }
        for l in &liars {
            wait_banned(&net, n.index, l);
        }
    }
    assert_honest_untouched(&net);
    assert!(learned_from_proof >= 1, "at least one honest bystander (committee {committee:?})");

    let url = format!("{}/v1/tasks/{task}/evidence", net.nodes[0].api_url);
    let (status, bundle) = http("GET", &url, None, Duration::from_secs(10)).expect("evidence");
    assert_eq!(status, 200);
    let file = tmp.path().join("bundle.json");
    std::fs::write(&file, &bundle).expect("write");
    let out = Command::new(sampo_bin())
        .args(["verify", "--json", "--replay", "--model"])
        .arg(&model)
        .arg(&file)
        .output()
        .expect("verify");
    assert!(!out.status.success(), "a refuted output fails the check");
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["overturned"], true, "{report}");
    for l in &liars {
        assert_eq!(report["replay"][l]["produced_by_model"], false, "{report}");
        assert_eq!(report["replay"][l]["divergence"]["position"], 7, "{report}");
    }
    let honest_member = report["replay"]
        .as_object()
        .expect("replay")
        .iter()
        .find(|(p, _)| !liars.contains(p))
        .expect("the honest member");
    assert_eq!(honest_member.1["produced_by_model"], true, "{report}");
}

/// A peer gossiping signed but invalid verdicts: the protocol's refusal reaches its
/// gossip score (it is not forwarded, and its score falls below zero at every honest
/// node), while honest work goes on.
#[test]
fn a_flooding_peer_pays_in_gossip_score_and_honest_work_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = TestnetConfig::new(4, synthetic(tmp.path()), tmp.path().join("net"), sampo_bin());
    cfg.flooders = 1;
    cfg.flood_per_second = 50;
    let net = Testnet::start(cfg).expect("testnet");
    let flooder = net.nodes.iter().find(|n| n.role == "flooder").expect("role").peer_id.clone();
    for n in net.nodes.iter().filter(|n| n.role == "honest") {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = get_json(&format!("{}/v1/peers", n.api_url)).unwrap_or(Value::Null);
            let entry = v["peers"].as_array().into_iter().flatten().find(|p| p["peer_id"] == flooder.as_str()).cloned();
            // Rejected messages cost it gossip score and its registry entry (so any seat).
            let score = entry.as_ref().and_then(|p| p["gossip_score"].as_f64());
            if entry.is_none() || score.is_some_and(|s| s < 0.0) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {} still scores the flooder at {score:?}", n.index);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for i in 0..3 {
        let v = net.chat(0, &format!("under a flood {i}"), 8, 3).expect("chat");
        assert_eq!(v["sampo"]["verdict"], "finalized", "{v}");
    }
}

fn peers_view(net: &Testnet, i: usize) -> Vec<(String, f64, u64)> {
    let v = get_json(&format!("{}/v1/peers", net.nodes[i].api_url)).expect("peers");
    let mut out: Vec<(String, f64, u64)> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["peer_id"].as_str().unwrap_or("").to_owned(),
                p["reputation"]["agreed"].as_f64().unwrap_or(-1.0),
                p["credits"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn a_member_killed_mid_task_is_replaced_and_comes_back_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = TestnetConfig::new(5, real_model(), tmp.path().join("net"), sampo_bin());
    cfg.commit_timeout_ms = 8_000;
    cfg.reveal_timeout_ms = 4_000;
    let mut net = Testnet::start(cfg).expect("testnet");
    // Some history first, so the victim has reputation and ledger state to lose.
    let v = net.chat(0, "Name a colour.", 8, 3).expect("warm-up");
    assert_eq!(v["sampo"]["verdict"], "finalized");
    wait_applied_everywhere(&net, v["sampo"]["task_id"].as_str().expect("task"));
    let body = r#"{"model":"MODEL","messages":[{"role":"user","content":"Write a short poem about the sea."}],"max_tokens":48,"temperature":0,"sampo":{"k":3}}"#;
    let models = get_json(&format!("{}/v1/models", net.nodes[0].api_url)).expect("models");
    let body = body.replace("MODEL", models["data"][0]["id"].as_str().expect("model"));
    let (status, text) =
        http("POST", &format!("{}/v1/tasks", net.nodes[0].api_url), Some(&body), Duration::from_secs(30))
            .expect("task");
    assert_eq!(status, 202, "{text}");
    let task = serde_json::from_str::<Value>(&text).expect("json")["task_id"].as_str().expect("id").to_owned();
    let st = get_json(&format!("{}/v1/tasks/{task}", net.nodes[0].api_url)).expect("status");
    let committee: Vec<String> = st["task"]["committee"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    let victim =
        net.nodes.iter().position(|n| n.index != 0 && committee.contains(&n.peer_id)).expect("a member besides node 0");
    let victim_id = net.nodes[victim].peer_id.clone();
    let before = peers_view(&net, victim);
    net.kill(victim);

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let final_state = loop {
        let st = get_json(&format!("{}/v1/tasks/{task}", net.nodes[0].api_url)).unwrap_or(Value::Null);
        if st["task"]["status"] == "finalized" || st["task"]["status"] == "disputed" {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "task never finished: {st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(final_state["task"]["status"], "finalized", "{final_state}");
    let marks = final_state["task"]["marks"].as_array().cloned().unwrap_or_default();
    let mark_of = |p: &str| marks.iter().find(|m| m[0] == p).and_then(|m| m[1].as_str().map(str::to_owned));
    assert_eq!(mark_of(&victim_id).as_deref(), Some("absent"), "{marks:?}");
    assert!(marks.iter().filter(|m| m[1] == "agreed").count() >= 2, "finalized through a substitute: {marks:?}");

    net.restart(victim).expect("restart");
    assert_eq!(net.nodes[victim].peer_id, victim_id, "same key, same peer id");
    let after = peers_view(&net, victim);
    // Its stored reputation view and ledger are what they were (the registry may
    // still be filling up after the restart, so compare the peers it sees again).
    for (peer, agreed, credits) in &after {
        if let Some((_, a, c)) = before.iter().find(|(p, _, _)| p == peer) {
            assert_eq!((agreed, credits), (a, c), "state of {peer} changed across the crash");
        }
    }
    // Credits are paid out of the coordinator's holds, in the coordinator's ledger; what
    // a member's store keeps is its reputation view.
    assert!(before.iter().any(|(_, a, _)| *a > 0.0), "there was state to keep: {before:?}");
}

#[test]
fn prometheus_scrapes_every_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Testnet::start(TestnetConfig::new(3, synthetic(tmp.path()), tmp.path().join("net"), sampo_bin()))
        .expect("testnet");
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(&cfg, net.prometheus_yml()).expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus, installed by scripts/setup.sh)");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let result = loop {
        let up = get_json(&format!("{base}/api/v1/query?query=up")).ok();
        let series = get_json(&format!("{base}/api/v1/query?query=sampo_queue_depth")).ok();
        let n_up = up
            .as_ref()
            .and_then(|v| v["data"]["result"].as_array().map(|r| r.iter().filter(|s| s["value"][1] == "1").count()))
            .unwrap_or(0);
        let n_series = series.as_ref().and_then(|v| v["data"]["result"].as_array().map(Vec::len)).unwrap_or(0);
        if n_up == 3 && n_series == 3 {
            break Ok(());
        }
        if std::time::Instant::now() > deadline {
            break Err(format!("up: {up:?}\nseries: {series:?}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    if let Err(e) = result {
        panic!("prometheus did not see all three nodes up with sampo_ series: {e}");
    }
}

/// Credits on a testnet with API keys: a client deposits 1,000, runs tasks, and its
/// balance and the members' credits move by exactly the payouts the verdicts state;
/// nothing is minted; an account without credits gets 402.
#[test]
fn balances_move_by_exactly_the_verdicts_payouts() {
    use sampo_testnet::http_as;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = TestnetConfig::new(4, synthetic(tmp.path()), tmp.path().join("net"), sampo_bin());
    cfg.api_keys = vec!["client-alpha-key".into(), "client-empty-key".into()];
    cfg.admin_keys = vec!["admin-secret-key".into()];
    let net = Testnet::start(cfg).expect("testnet");
    let api = net.nodes[0].api_url.clone();
    let t = Duration::from_secs(10);
    let json = |r: (u16, String)| -> (u16, Value) { (r.0, serde_json::from_str(&r.1).unwrap_or(Value::Null)) };

    let (status, me) =
        json(http_as("GET", &format!("{api}/v1/account"), None, Some("client-alpha-key"), t).expect("acct"));
    assert_eq!(status, 200, "{me}");
    let name = me["account"].as_str().expect("name").to_owned();
    assert_eq!(me["balance"], 0);
    // Only an admin key deposits.
    let deposit = |key: &str| {
        json(
            http_as("POST", &format!("{api}/v1/accounts/{name}/deposit"), Some(r#"{"amount":1000}"#), Some(key), t)
                .expect("deposit"),
        )
    };
    assert_eq!(deposit("client-alpha-key").0, 403);
    let (status, d) = deposit("admin-secret-key");
    assert_eq!((status, d["balance"].as_u64()), (200, Some(1000)), "{d}");

    let credits = || -> std::collections::BTreeMap<String, u64> {
        let (_, v) =
            json(http_as("GET", &format!("{api}/v1/peers"), None, Some("client-alpha-key"), t).expect("peers"));
        v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (p["peer_id"].as_str().unwrap_or("").to_owned(), p["credits"].as_u64().unwrap_or(0)))
            .collect()
    };
    let before = credits();
    let mut paid: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for i in 0..3 {
        let (status, v) = net.chat_as(0, Some("client-alpha-key"), &format!("count to {i}"), 8, 3).expect("chat");
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["sampo"]["verdict"], "finalized", "{v}");
        // What the verdict states, from its signed evidence.
        let url = format!("{api}{}", v["sampo"]["evidence_url"].as_str().expect("url"));
        let (_, bundle) = http_as("GET", &url, None, Some("client-alpha-key"), t).expect("evidence");
        let file = tmp.path().join(format!("bundle{i}.json"));
        std::fs::write(&file, &bundle).expect("write");
        let out = Command::new(sampo_bin()).args(["verify", "--json"]).arg(&file).output().expect("verify");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).expect("json");
        let payouts = report["payouts"].as_object().expect("payouts");
        assert!(!payouts.is_empty());
        for (peer, c) in payouts {
            *paid.entry(peer.clone()).or_default() += c.as_u64().expect("amount");
        }
    }
    let total_paid: u64 = paid.values().sum();
    assert!(total_paid > 0);
    let (_, me) = json(http_as("GET", &format!("{api}/v1/account"), None, Some("client-alpha-key"), t).expect("acct"));
    assert_eq!(me["held"], 0, "{me}");
    assert_eq!(me["balance"].as_u64(), Some(1000 - total_paid), "{me}");
    let after = credits();
    for (peer, c) in &paid {
        let was = before.get(peer).copied().unwrap_or(0);
        assert_eq!(after.get(peer).copied().unwrap_or(0), was + c, "{peer}");
    }
    let others: u64 = after.iter().filter(|(p, _)| !paid.contains_key(*p)).map(|(_, c)| c).sum();
    assert_eq!(others, before.iter().filter(|(p, _)| !paid.contains_key(*p)).map(|(_, c)| c).sum::<u64>());

    // An account with nothing in it: 402, OpenAI-style, and nothing held.
    let (status, v) = net.chat_as(0, Some("client-empty-key"), "hello", 8, 3).expect("chat");
    assert_eq!(status, 402, "{v}");
    assert_eq!(v["error"]["type"], "insufficient_quota", "{v}");
}

/// Gemma 3 (Q4_K_M, SentencePiece, sliding-window layers) served by a committee: every
/// member produces the same bits, so the verdict finalizes.
#[test]
fn a_gemma3_committee_reaches_a_verdict() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = TestnetConfig::new(4, gemma3_model(), tmp.path().join("net"), sampo_bin());
    let net = Testnet::start(cfg).expect("testnet");
    let v = net.chat(0, "What is the capital of France?", 12, 3).expect("chat");
    assert_eq!(v["sampo"]["verdict"], "finalized", "{v}");
    let m = marks(&v);
    assert_eq!(m.len(), 3, "a committee of three");
    assert!(m.iter().all(|(_, mark)| mark == "agreed"), "{m:?}");
    assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
}
