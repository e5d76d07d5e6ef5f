//! Structured fuzzing of the HTTP API's request bodies, run by every `cargo test`.
//!
//! The node's real router (access control, body limit, JSON extraction, request
//! checks, prompt rendering and tokenizing) serves in process, on a synthetic model,
//! without a mesh: a request that passes every check ends at "not running tasks"
//! (503). Bodies are almost-right requests with fields of every type and edge value,
//! arbitrary JSON, damaged valid bodies and random bytes, with and without a JSON
//! content type, posted to `/v1/chat/completions`, `/v1/completions` and `/v1/tasks`.
//! Every answer must be a typed client error (4xx) with an OpenAI-style JSON error
//! body, or that 503: never a panic, never a 500. The case count is fixed.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use proptest::prelude::*;
use sampo_consensus::NodeKey;
use sampo_kernels::gguf::GgufFile;
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{CpuBackend, Model};
use sampo_node::api::{ApiPolicy, ApiState, NodeInfo, router};
use sampo_node::metrics::NodeMetrics;
use sampo_node::models::{LoadedModel, Models};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Cases per property (three properties): about 5 s of one core in all, dev profile.
const CASES: u32 = 2000;
/// The body limit of the node under test.
const MAX_BODY: usize = 16 * 1024;
const MODEL: &str = "synth";
const PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/tasks"];

struct Server {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let file = GgufFile::from_bytes(synthesize(&SynthSpec::default())).expect("gguf");
        let model = Arc::new(Model::from_gguf(file).expect("model"));
        let backend = Arc::new(CpuBackend::new(1).expect("cpu backend"));
        let loaded = LoadedModel::new(model, Some(MODEL.into()), 3, backend);
        let info = NodeInfo {
            peer_id: NodeKey::from_seed([1; 32]).peer_id().to_string(),
            version: "test",
            api_url: String::new(),
            listen: Vec::new(),
            models: Vec::new(),
            backend: "cpu".into(),
            device: "cpu".into(),
            backend_reason: None,
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(NodeMetrics::register(&mut registry));
        let policy = ApiPolicy {
            max_body_bytes: MAX_BODY,
            default_k: 1,
            max_escalations: 1,
            max_tokens_per_task: 256,
            verdict_timeout: Duration::from_secs(1),
            ..ApiPolicy::default()
        };
        let state =
            ApiState::new(info, Models(vec![Arc::new(loaded)]), Arc::new(Mutex::new(registry)), metrics, policy);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Server { rt, app: router(Arc::new(state)) }
    })
}

/// POST `body` to `path` and return the status and the body.
fn post(path: &str, content_type: Option<&str>, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let s = server();
    let mut req = Request::builder().method("POST").uri(path);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let req = req.body(Body::from(body)).expect("request");
    s.rt.block_on(async {
        let resp = s.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("response body");
        (status, bytes.to_vec())
    })
}

/// The promise: a 4xx with an OpenAI-style JSON error, or the 503 of a node without a
/// mesh (the request passed every check).
fn check(path: &str, content_type: Option<&str>, body: Vec<u8>) -> Result<(), TestCaseError> {
    let (status, out) = post(path, content_type, body);
    let v: Value = serde_json::from_slice(&out).map_err(|e| {
        TestCaseError::fail(format!("{status}: body is not JSON ({e}): {}", String::from_utf8_lossy(&out)))
    })?;
    let kind = v["error"]["type"].as_str().unwrap_or_default().to_owned();
    prop_assert!(!kind.is_empty(), "{} without an error type: {}", status, v);
    prop_assert_eq!(v["error"]["code"].as_u64(), Some(u64::from(status.as_u16())), "{}", v);
    let served = status == StatusCode::SERVICE_UNAVAILABLE && kind == "server_error";
    prop_assert!(status.is_client_error() || served, "{}: {}", status, v);
    Ok(())
}

// ---- bodies -------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::string::string_regex(".{0,40}").expect("regex"),
        1 => Just(String::new()),
        1 => prop::sample::select(vec![
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\n", "{{ raise_exception('x') }}",
            "{% for m in messages %}", "\u{0}", "\u{feff}", "é\u{301}", "🦀", "\r\n", "Ġ", "\\u0000",
        ])
        .prop_map(str::to_owned),
        1 => (1usize..4000, prop::sample::select(vec!["a", "ab ", "é", "🦀", "<|im_end|>", " "]))
            .prop_map(|(n, s)| s.repeat(n)),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![0i64, -1, 1, 2, 15, 16, 255, 256, 257, 4096, 100_000, i64::MIN, i64::MAX])
            .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        prop::sample::select(vec![0.0f64, -0.0, 0.5, 1.0, 2.0, 2.000_001, 1e-46, 1e-300, 3.5e38, 1e39, f64::MAX, -1.0])
            .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        3 => number(),
        3 => text().prop_map(Value::from),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "model", "messages", "prompt", "role", "content", "max_tokens", "max_completion_tokens", "temperature",
            "top_p", "top_k", "seed", "stream", "n", "sampo", "k", "verified_only", "max_price", "stop",
        ])
        .prop_map(str::to_owned),
        1 => proptest::string::string_regex("[a-z_]{0,12}").expect("regex"),
    ]
}

/// Any JSON, its object keys mostly the API's own field names.
fn json_value() -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((field_name(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// An optional field of the right type (in range or at an edge of it).
fn field(right: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    // Boxed, like the other composite strategies here: in the dev profile the fully
    // nested strategy types take frames big enough to overflow a test thread's stack.
    prop_oneof![1 => Just(None), 2 => right.prop_map(Some)].boxed()
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        3 => prop::sample::select(vec!["user", "system", "assistant", "tool"]).prop_map(str::to_owned),
        1 => text(),
    ];
    (role, text()).prop_map(|(role, content)| json!({"role": role, "content": content}))
}

fn uint(max: u64, edges: Vec<u64>) -> impl Strategy<Value = Value> {
    prop_oneof![3 => (0..=max).prop_map(Value::from), 1 => prop::sample::select(edges).prop_map(Value::from)]
}

fn float(edges: Vec<f64>) -> impl Strategy<Value = Value> {
    prop_oneof![3 => (0.0f64..=1.0).prop_map(Value::from), 1 => prop::sample::select(edges).prop_map(Value::from)]
}

/// A request for `path`, every field of the right type, the prompt in the form the
/// endpoint takes (mostly); then, in a third of the cases, one field replaced by any
/// JSON at all (the wrong type, out of range, a nested mess) or an unknown field added
/// where none is allowed.
fn request(path: &'static str) -> BoxedStrategy<Value> {
    let model = prop_oneof![8 => Just(Value::from(MODEL)), 1 => text().prop_map(Value::from)];
    let messages = prop::collection::vec(message(), 0..5).prop_map(Value::Array);
    let tokens = || uint(300, vec![0, 1, 255, 256, 257, 4096, u32::MAX as u64]);
    let unit = || float(vec![0.0, -0.0, -1.0, 1.0, 2.0, 2.000_001, 1e-46, 1e-300, 3.5e38, 1e39, f64::MAX]);
    let sampo = (
        field(uint(20, vec![0, 15, 16, 255])),
        field(any::<bool>().prop_map(Value::from)),
        field(uint(1000, vec![0, u64::MAX])),
    )
        .prop_map(|(k, v, p)| {
            let mut o = serde_json::Map::new();
            for (name, val) in [("k", k), ("verified_only", v), ("max_price", p)] {
                if let Some(val) = val {
                    o.insert(name.into(), val);
                }
            }
            Value::Object(o)
        })
        .boxed();
    let generation = (
        field(tokens()),
        field(tokens()),
        field(unit()),
        field(unit()),
        field(uint(100, vec![0, u32::MAX as u64])),
        field(any::<u64>().prop_map(Value::from)),
        field(any::<bool>().prop_map(Value::from)),
        field(prop_oneof![4 => Just(Value::from(1)), 1 => uint(2, vec![0, u32::MAX as u64])]),
        field(sampo),
    )
        .boxed();
    let spoil = prop::option::weighted(0.35, (prop::sample::select(FIELDS.to_vec()), json_value()));
    // Which prompt fields the request has: the endpoint's own, now and then the other
    // or both or neither.
    let (chat, text_prompt) = match path {
        "/v1/chat/completions" => (0.95, 0.1),
        "/v1/completions" => (0.1, 0.95),
        _ => (0.7, 0.25),
    };
    let prompts =
        (prop::option::weighted(chat, messages), prop::option::weighted(text_prompt, text().prop_map(Value::from)));
    (model, prompts, generation, spoil)
        .prop_map(|(model, (messages, prompt), (mt, mct, temperature, top_p, top_k, seed, stream, n, sampo), spoil)| {
            let mut o = serde_json::Map::new();
            o.insert("model".into(), model);
            for (name, val) in [
                ("messages", messages),
                ("prompt", prompt),
                ("max_tokens", mt),
                ("max_completion_tokens", mct),
                ("temperature", temperature),
                ("top_p", top_p),
                ("top_k", top_k),
                ("seed", seed),
                ("stream", stream),
                ("n", n),
                ("sampo", sampo),
            ] {
                if let Some(val) = val {
                    o.insert(name.into(), val);
                }
            }
            if let Some((name, val)) = spoil {
                match name.split_once('.') {
                    Some((outer, inner)) => {
                        let slot = o.entry(outer).or_insert_with(|| json!({}));
                        match slot {
                            Value::Object(m) => {
                                m.insert(inner.into(), val);
                            }
                            Value::Array(a) if !a.is_empty() => a[0] = json!({inner: val}),
                            _ => {}
                        }
                    }
                    None => {
                        o.insert(name.into(), val);
                    }
                }
            }
            Value::Object(o)
        })
        .boxed()
}

/// Where a spoiled value goes: a top-level field, a field of `sampo`, of the first
/// message, or an unknown one.
const FIELDS: [&str; 18] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stream",
    "n",
    "sampo",
    "sampo.k",
    "sampo.max_price",
    "sampo.unknown",
    "messages.role",
    "messages.content",
    "user",
];

fn path_and_request() -> impl Strategy<Value = (&'static str, Value)> {
    prop_oneof![
        request(PATHS[0]).prop_map(|r| (PATHS[0], r)),
        request(PATHS[1]).prop_map(|r| (PATHS[1], r)),
        request(PATHS[2]).prop_map(|r| (PATHS[2], r)),
    ]
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    let idx = any::<prop::sample::Index>;
    prop_oneof![
        (idx(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        (idx(), prop::sample::select(b"{}[]\",:0-.e\\ \x00\xff".to_vec())).prop_map(|(i, b)| Damage::Insert(i, b)),
        idx().prop_map(Damage::Delete),
        idx().prop_map(Damage::Truncate),
    ]
}

fn apply(body: &mut Vec<u8>, d: &Damage) {
    let n = body.len();
    match d {
        Damage::Flip(i, b) if n > 0 => body[i.index(n)] ^= b,
        Damage::Insert(i, b) => body.insert(i.index(n + 1), *b),
        Damage::Delete(i) if n > 0 => {
            body.remove(i.index(n));
        }
        Damage::Truncate(i) => body.truncate(i.index(n + 1)),
        _ => {}
    }
}

fn content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        24 => Just(Some("application/json")),
        1 => Just(Some("application/json; charset=utf-8")),
        1 => Just(Some("text/plain")),
        1 => Just(Some("application/x-www-form-urlencoded")),
        1 => Just(None),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn almost_right_requests((path, req) in path_and_request(), ct in content_type()) {
        check(path, ct, serde_json::to_vec(&req).expect("json"))?;
    }

    #[test]
    fn any_json(path in prop::sample::select(PATHS.to_vec()), ct in content_type(), v in json_value()) {
        check(path, ct, serde_json::to_vec(&v).expect("json"))?;
    }

    #[test]
    fn damaged_and_random_bodies(
        (path, req) in path_and_request(),
        ct in content_type(),
        damage in prop::collection::vec(damage(), 1..5),
        random in prop::option::weighted(0.2, prop::collection::vec(any::<u8>(), 0..200)),
    ) {
        let body = match random {
            Some(bytes) => bytes,
            None => {
                let mut b = serde_json::to_vec(&req).expect("json");
                for d in &damage {
                    apply(&mut b, d);
                }
                b
            }
        };
        check(path, ct, body)?;
    }
}

// ---- fixed cases ------------------------------------------------------------------------------

/// The generator reaches the end of the checks: a right request is a 503 here.
#[test]
fn a_right_request_passes_every_check() {
    for (path, body) in [
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})),
        ("/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 4, "stream": true})),
        ("/v1/tasks", json!({"model": MODEL, "prompt": "the", "sampo": {"k": 3, "verified_only": true}})),
    ] {
        let (status, out) = post(path, Some("application/json"), serde_json::to_vec(&body).expect("json"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {}", String::from_utf8_lossy(&out));
    }
}

/// A body over the limit is a 413 with a JSON error, whatever it holds.
#[test]
fn an_oversized_body_is_a_typed_413() {
    let body = json!({"model": MODEL, "prompt": "x".repeat(MAX_BODY)});
    let (status, out) = post("/v1/completions", Some("application/json"), serde_json::to_vec(&body).expect("json"));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&out));
    check("/v1/completions", Some("application/json"), vec![b' '; MAX_BODY + 1]).expect("typed");
}
