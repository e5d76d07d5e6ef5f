//! Local testnets: N real `sampo node` processes on loopback, driven only through the
//! CLI flags, config files and HTTP API an operator uses (this crate depends on no other
//! sampo crate).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error("I/O on {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("node {index} did not {what} within {secs} s; its log: {log}")]
    Timeout { index: usize, what: &'static str, secs: u64, log: String },
    #[error("node {index} exited: {log}")]
    Exited { index: usize, log: String },
    #[error("HTTP {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestnetError {
    let what = what.into();
    move |source| TestnetError::Io { what, source }
}

/// How to build a testnet.
#[derive(Debug, Clone)]
pub struct TestnetConfig {
    pub nodes: usize,
    pub model: PathBuf,
    /// The last `byzantine` nodes return wrong outputs.
    pub byzantine: usize,
    /// The `absent` nodes before them commit but never reveal.
    pub absent: usize,
    /// The `byzantine_coordinators` nodes before those attack others' standing when they
    /// coordinate (forged absences, dropped commits, re-announcements, two verdicts).
    pub byzantine_coordinators: usize,
    /// Fraction of finalized verdicts each node audits by replay.
    pub audit_rate: f64,
    /// The first honest-looking nodes after node 0 that flood the network with signed
    /// but invalid verdicts at this rate per second (0: none floods).
    pub flooders: usize,
    pub flood_per_second: u32,
    /// The byzantine nodes collude instead: they lie (all the same way) only when
    /// together they hold a quorum of a committee, and are honest otherwise.
    pub collude: bool,
    pub dir: PathBuf,
    /// The `sampo` binary to run.
    pub sampo: PathBuf,
    pub k: usize,
    pub commit_timeout_ms: u64,
    pub reveal_timeout_ms: u64,
    /// `api.api_keys` of every node (empty: open, the implicit local account).
    pub api_keys: Vec<String>,
    /// `api.admin_keys` of every node.
    pub admin_keys: Vec<String>,
}

impl TestnetConfig {
    pub fn new(nodes: usize, model: PathBuf, dir: PathBuf, sampo: PathBuf) -> Self {
        Self {
            nodes,
            model,
            byzantine: 0,
            absent: 0,
            byzantine_coordinators: 0,
            audit_rate: 0.05,
            collude: false,
            flooders: 0,
            flood_per_second: 50,
            dir,
            sampo,
            k: 3,
            commit_timeout_ms: 30_000,
            reveal_timeout_ms: 10_000,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
        }
    }
}

/// One running node.
#[derive(Debug)]
pub struct NodeProc {
    pub index: usize,
    pub child: Child,
    pub dir: PathBuf,
    pub peer_id: String,
    pub api_url: String,
    pub p2p_addr: String,
    pub role: &'static str,
    config: PathBuf,
}

/// A running testnet; dropping it kills every node.
#[derive(Debug)]
pub struct Testnet {
    pub cfg: TestnetConfig,
    pub nodes: Vec<NodeProc>,
    /// Peer ids of the colluders (when `cfg.collude`), made before they start.
    pub accomplices: Vec<String>,
    /// Peer ids of the testnet's own nodes (flooders aside): trusted by every node.
    pub founders: Vec<String>,
}

impl Drop for Testnet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 client over std (no extra dependency): returns status and body.
pub fn http(method: &str, url: &str, body: Option<&str>, timeout: Duration) -> Result<(u16, String), TestnetError> {
    http_as(method, url, body, None, timeout)
}

/// [`http`] with `Authorization: Bearer <key>` when a key is given.
pub fn http_as(
    method: &str,
    url: &str,
    body: Option<&str>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), TestnetError> {
    let err = |reason: String| TestnetError::Http { url: url.to_owned(), reason };
    let rest = url.strip_prefix("http://").ok_or_else(|| err("not an http:// URL".into()))?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect(host).map_err(|e| err(e.to_string()))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len(),
        auth = bearer.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default()
    )
    .map_err(|e| err(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

pub fn get_json(url: &str) -> Result<Value, TestnetError> {
    get_json_as(url, None)
}

/// [`get_json`] as the client with API key `key`.
pub fn get_json_as(url: &str, key: Option<&str>) -> Result<Value, TestnetError> {
    let (status, body) = http_as("GET", url, None, key, Duration::from_secs(10))?;
    serde_json::from_str(&body)
        .map_err(|e| TestnetError::Http { url: url.into(), reason: format!("{status}: {e}: {body}") })
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Testnet {
    /// Start every node, bootstrapped through the first, and wait until each is ready
    /// and sees all the others.
    pub fn start(cfg: TestnetConfig) -> Result<Self, TestnetError> {
        if cfg.nodes == 0 {
            return Err(TestnetError::Invalid("a testnet needs at least one node".into()));
        }
        if cfg.byzantine + cfg.absent + cfg.byzantine_coordinators >= cfg.nodes {
            return Err(TestnetError::Invalid("at least one node must be honest".into()));
        }
        std::fs::create_dir_all(&cfg.dir).map_err(io(cfg.dir.display().to_string()))?;
        let mut net = Testnet { cfg, nodes: Vec::new(), accomplices: Vec::new(), founders: Vec::new() };
        // Every node's key first: the testnet's nodes are one operator's fleet, so each
        // counts the others as established (`consensus.trusted_peers`) from the start,
        // and colluders must know each other's peer ids.
        {
            for i in 0..net.cfg.nodes {
                let data = net.cfg.dir.join(format!("node{i}")).join("data");
                let out = Command::new(&net.cfg.sampo)
                    .args(["keys", "generate", "--force", "--data-dir"])
                    .arg(&data)
                    .output()
                    .map_err(io(net.cfg.sampo.display().to_string()))?;
                let peer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !out.status.success() || peer.is_empty() {
                    return Err(TestnetError::Invalid(format!(
                        "sampo keys generate failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )));
                }
                if net.role(i) == "colluder" {
                    net.accomplices.push(peer.clone());
                }
                if net.role(i) != "flooder" {
                    net.founders.push(peer);
                }
            }
        }
        for i in 0..net.cfg.nodes {
            let bootstrap = net.nodes.first().map(|n| n.p2p_addr.clone());
            let node = net.spawn(i, bootstrap.as_deref())?;
            net.nodes.push(node);
        }
        net.wait_mesh(Duration::from_secs(120))?;
        Ok(net)
    }

    fn role(&self, i: usize) -> &'static str {
        let n = self.cfg.nodes;
        if i >= n - self.cfg.byzantine {
            if self.cfg.collude { "colluder" } else { "byzantine" }
        } else if i >= n - self.cfg.byzantine - self.cfg.absent {
            "absent"
        } else if i >= n - self.cfg.byzantine - self.cfg.absent - self.cfg.byzantine_coordinators {
            "byz-coord"
        } else if i >= 1 && i <= self.cfg.flooders {
            "flooder"
        } else {
            "honest"
        }
    }

    fn spawn(&self, i: usize, bootstrap: Option<&str>) -> Result<NodeProc, TestnetError> {
        let dir = self.cfg.dir.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
        let role = self.role(i);
        let behaviour = match role {
            "byzantine" => "wrong_output",
            "colluder" => "collude",
            "absent" => "never_reveal",
            "byz-coord" => "byzantine_coordinator",
            _ => "honest",
        };
        let config = dir.join("sampo.toml");
        let text = format!(
            "data_dir = \"{data}\"\n\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nannounce_interval_secs = {announce}\n# Every node is on 127.0.0.1.\nallow_private_addresses = true\nmax_connections_per_ip = 256\ncolocation_whitelist = [\"127.0.0.1\"]\n\n[api]\nlisten = \"127.0.0.1:0\"\napi_keys = {api_keys:?}\nadmin_keys = {admin_keys:?}\n\n[execution]\nthreads = 1\nruntime_threads = 1\nmax_concurrent = 1\n\n[consensus]\nk = {k}\ncommit_timeout_ms = {c}\nreveal_timeout_ms = {r}\naudit_rate = {audit:?}\ntrusted_peers = {founders:?}\n\n[testing]\nbehaviour = \"{behaviour}\"\naccomplices = {accomplices:?}\nflood_per_second = {flood}\n",
            data = dir.join("data").display(),
            // N nodes announcing to all cost N² signed messages per interval: one host
            // carries 100 nodes at 10 s (a node is still heard at once when it joins).
            announce = (self.cfg.nodes / 10).max(1),
            k = self.cfg.k,
            c = self.cfg.commit_timeout_ms,
            r = self.cfg.reveal_timeout_ms,
            audit = self.cfg.audit_rate,
            accomplices = if role == "colluder" { self.accomplices.clone() } else { Vec::new() },
            flood = if role == "flooder" { self.cfg.flood_per_second } else { 0 },
            founders = self.founders,
            api_keys = self.cfg.api_keys,
            admin_keys = self.cfg.admin_keys,
        );
        std::fs::write(&config, text).map_err(io(config.display().to_string()))?;
        self.launch(i, dir, config, role, bootstrap)
    }

    fn launch(
        &self,
        i: usize,
        dir: PathBuf,
        config: PathBuf,
        role: &'static str,
        bootstrap: Option<&str>,
    ) -> Result<NodeProc, TestnetError> {
        let info_path = dir.join("data").join("node.json");
        let _ = std::fs::remove_file(&info_path);
        let mut cmd = Command::new(&self.cfg.sampo);
        cmd.arg("node").arg("--config").arg(&config).arg("--model").arg(&self.cfg.model);
        if role != "honest" {
            cmd.arg("--unsafe-allow-faults");
        }
        if let Some(b) = bootstrap {
            cmd.arg("--bootstrap").arg(b);
        }
        let log = std::fs::File::create(dir.join("node.log")).map_err(io("node.log"))?;
        let mut child =
            cmd.stdout(Stdio::null()).stderr(log).spawn().map_err(io(self.cfg.sampo.display().to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let info: Value = loop {
            if let Ok(s) = std::fs::read_to_string(&info_path)
                && let Ok(v) = serde_json::from_str::<Value>(&s)
            {
                break v;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return Err(TestnetError::Exited { index: i, log: log_tail(&dir) });
            }
            if Instant::now() > deadline {
                return Err(TestnetError::Timeout { index: i, what: "start", secs: 60, log: log_tail(&dir) });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let api_url = info["api_url"].as_str().unwrap_or_default().to_owned();
        let peer_id = info["peer_id"].as_str().unwrap_or_default().to_owned();
        // The mesh listener comes up a moment after the API: wait for its address.
        let addr = loop {
            let node = get_json_as(&format!("{api_url}/v1/node"), self.cfg.api_keys.first().map(String::as_str))?;
            let found = node["addresses"]
                .as_array()
                .and_then(|a| a.iter().filter_map(Value::as_str).find(|a| a.starts_with("/ip4/127.0.0.1/")))
                .map(str::to_owned);
            if let Some(a) = found {
                break a;
            }
            if Instant::now() > deadline {
                return Err(TestnetError::Timeout {
                    index: i,
                    what: "listen on the mesh",
                    secs: 60,
                    log: log_tail(&dir),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(NodeProc { index: i, child, p2p_addr: format!("{addr}/p2p/{peer_id}"), dir, peer_id, api_url, role, config })
    }

    /// Wait until every node is ready and its registry holds all nodes.
    pub fn wait_mesh(&self, timeout: Duration) -> Result<(), TestnetError> {
        let deadline = Instant::now() + timeout;
        for n in &self.nodes {
            loop {
                let seen =
                    get_json_as(&format!("{}/v1/peers", n.api_url), self.cfg.api_keys.first().map(String::as_str))
                        .ok()
                        .and_then(|v| v["peers"].as_array().map(Vec::len))
                        .unwrap_or(0);
                if seen >= self.nodes.len() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(TestnetError::Timeout {
                        index: n.index,
                        what: "see every other node",
                        secs: timeout.as_secs(),
                        log: log_tail(&n.dir),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Kill a node with SIGKILL (a crash).
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
    }

    /// Restart a node with its data dir (same key, same database).
    pub fn restart(&mut self, i: usize) -> Result<(), TestnetError> {
        let bootstrap = self.nodes.first().filter(|n| n.index != i).map(|n| n.p2p_addr.clone());
        let (dir, config, role) = (self.nodes[i].dir.clone(), self.nodes[i].config.clone(), self.nodes[i].role);
        let node = self.launch(i, dir, config, role, bootstrap.as_deref())?;
        self.nodes[i] = node;
        Ok(())
    }

    /// Ask every node to stop (SIGTERM) and wait for it.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            let _ = Command::new("kill").arg("-TERM").arg(n.child.id().to_string()).status();
        }
        for n in &mut self.nodes {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = n.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }

    /// A Prometheus scrape config for every node.
    pub fn prometheus_yml(&self) -> String {
        let targets: Vec<String> =
            self.nodes.iter().map(|n| format!("'{}'", n.api_url.trim_start_matches("http://"))).collect();
        format!(
            "global:\n  scrape_interval: 2s\nscrape_configs:\n  - job_name: sampo\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        )
    }

    pub fn table(&self) -> String {
        let mut s = format!("{:<5} {:<10} {:<54} {:<24} {}\n", "node", "role", "peer id", "api", "metrics");
        for n in &self.nodes {
            s.push_str(&format!(
                "{:<5} {:<10} {:<54} {:<24} {}/metrics\n",
                n.index, n.role, n.peer_id, n.api_url, n.api_url
            ));
        }
        s
    }

    /// A verified chat completion through node `via`.
    pub fn chat(&self, via: usize, prompt: &str, max_tokens: u32, k: usize) -> Result<Value, TestnetError> {
        let (status, v) = self.chat_as(via, None, prompt, max_tokens, k)?;
        if status != 200 {
            return Err(TestnetError::Http { url: self.nodes[via].api_url.clone(), reason: format!("{status}: {v}") });
        }
        Ok(v)
    }

    /// A chat as the client with API key `key` (None: no key); the status and the body,
    /// whatever the status.
    pub fn chat_as(
        &self,
        via: usize,
        key: Option<&str>,
        prompt: &str,
        max_tokens: u32,
        k: usize,
    ) -> Result<(u16, Value), TestnetError> {
        let (_, models) =
            http_as("GET", &format!("{}/v1/models", self.nodes[via].api_url), None, key, Duration::from_secs(10))?;
        let models: Value = serde_json::from_str(&models).unwrap_or(Value::Null);
        let model = models["data"][0]["id"].as_str().unwrap_or_default().to_owned();
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "sampo": {"k": k},
        });
        let url = format!("{}/v1/chat/completions", self.nodes[via].api_url);
        let (status, text) = http_as("POST", &url, Some(&body.to_string()), key, Duration::from_secs(300))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| TestnetError::Http { url: url.clone(), reason: format!("{status}: {e}: {text}") })?;
        Ok((status, v))
    }
}

/// Resident memory of a process, in MiB (0 when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time a process has used (user + system), in milliseconds (0 when it cannot be
/// read): fields 14 and 15 of `/proc/PID/stat`, in clock ticks of 10 ms.
pub fn cpu_ms(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it may not.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    (ticks(11) + ticks(12)) * 10.0
}

/// The `p` quantile (0..=1) of `v`, nearest rank; 0 for an empty slice.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize]
}
