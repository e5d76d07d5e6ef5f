//! `sampo model …` and `sampo bench`: try a model without a network, and measure it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use sampo_kernels::gguf::{GgmlType, GgufFile};
use sampo_kernels::synth::{SynthSpec, synthesize};
use sampo_kernels::{BatchItem, ChatMessage, CpuBackend, Engine, Generation, Model, SamplingParams, Sequence};
use sampo_node::executor::{Executor, ExecutorConfig, Job};

#[derive(Subcommand)]
pub(crate) enum ModelCmd {
    /// Write a small synthetic Llama model (valid GGUF, deterministic weights).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Print a model's architecture, tensor types and sizes.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of TEXT (special-token strings are parsed).
    Tokenize {
        file: PathBuf,
        text: String,
        /// Treat special-token strings as plain text.
        #[arg(long)]
        no_special: bool,
    },
    /// Generate a continuation, streamed to the terminal as it is made.
    Run(RunArgs),
}

#[derive(Args)]
pub(crate) struct RunArgs {
    file: PathBuf,
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    backend: String,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inference threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print prompt and output ids, text and timings as JSON instead of streaming.
    #[arg(long)]
    json: bool,
    /// Generate this many times in one process and report the fastest timings (the
    /// first run pays for paging the model in).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// GGUF model (default: the fetched SmolLM2 model, else a synthetic one).
    #[arg(long)]
    model: Option<PathBuf>,
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    backend: String,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: u32,
    /// Concurrent streams decoded as one batch.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Decode the streams through the node's executor (its batching scheduler, with
    /// `--streams` sequences in flight) instead of one `generate_batch` call.
    #[arg(long)]
    executor: bool,
    #[arg(long)]
    json: bool,
}

fn load(path: &Path) -> anyhow::Result<Arc<Model>> {
    Ok(Arc::new(Model::load(path).with_context(|| format!("loading {}", path.display()))?))
}

/// The model on the named backend. `cuda` compiles (or loads from the PTX cache) the
/// kernels and refuses a device whose known-answer self-test fails.
fn engine(model: Arc<Model>, backend: &str, threads: usize) -> anyhow::Result<Engine> {
    match backend {
        "cpu" => Ok(Engine::new(model, Arc::new(CpuBackend::new(threads)?))),
        "cuda" => {
            let cache = std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/sampo/ptx"))
                .unwrap_or_else(|| std::env::temp_dir().join("sampo-ptx"));
            let opts = sampo_kernels::cuda::CudaOptions { nvrtc: None, ptx_cache: Some(cache) };
            let gpu = sampo_node::backend::open_cuda(&opts, std::slice::from_ref(&model)).context("CUDA backend")?;
            Ok(Engine::new(model, gpu))
        }
        other => anyhow::bail!("unknown backend `{other}` (available: cpu, cuda)"),
    }
}

pub(crate) fn run(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Synth { out, seed } => {
            let bytes = synthesize(&SynthSpec { seed, ..Default::default() });
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            let m = Model::load(&out)?;
            println!("wrote {} ({} bytes, model id {})", out.display(), bytes.len(), m.model_id_hex());
        }
        ModelCmd::Inspect { file, json } => inspect(&file, json)?,
        ModelCmd::Tokenize { file, text, no_special } => {
            let m = load(&file)?;
            println!("{}", serde_json::to_string(&m.tokenizer.encode(&text, !no_special))?);
        }
        ModelCmd::Run(a) => run_model(a)?,
    }
    Ok(())
}

/// Describe any GGUF file: its architecture and tensor types, whether sampo can run it
/// and, if not, what is missing by name. Loading the model is tried last, so a file
/// sampo cannot run is still described.
fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    let f = GgufFile::open(file)?;
    let arch = f.get_str("general.architecture").map(str::to_owned).ok();
    let mut by_type: std::collections::BTreeMap<GgmlType, (usize, u64, u64)> = Default::default();
    for t in &f.tensors {
        let e = by_type.entry(t.ty).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.n_bytes;
    }
    let unsupported: Vec<String> = by_type.keys().filter(|t| !t.is_supported()).map(|t| t.describe()).collect();
    let tensors: Vec<serde_json::Value> = f
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "type": t.ty.name(), "type_id": t.ty.to_u32(), "dims": t.dims, "bytes": t.n_bytes}))
        .collect();
    let loaded = Model::from_gguf(f);
    let m = loaded.as_ref().ok();
    let load_error = loaded.as_ref().err().map(|e| e.to_string());
    if json {
        let types: serde_json::Map<String, serde_json::Value> = by_type
            .iter()
            .map(|(t, (n, el, b))| {
                let v = serde_json::json!({"type_id": t.to_u32(), "tensors": n, "elements": el, "bytes": b, "supported": t.is_supported()});
                (t.to_string(), v)
            })
            .collect();
        let v = serde_json::json!({
            "architecture": arch,
            "tensor_types": types,
            "unsupported_types": unsupported,
            "runnable": m.is_some(),
            "load_error": load_error,
            "model_id": m.map(|m| m.model_id_hex()),
            "hparams": m.map(|m| &m.hp),
            "tensors": tensors,
            "vocab": m.map(|m| m.tokenizer.vocab_size()),
            "chat_template": m.map(|m| m.tokenizer.chat_template.is_some()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:          {}", file.display());
    match m {
        Some(m) => {
            let h = &m.hp;
            println!(
                "architecture:  {} ({} layers, {} dims, {} heads / {} kv heads, head dim {})",
                h.arch, h.n_layer, h.n_embd, h.n_head, h.n_head_kv, h.head_dim
            );
        }
        None => println!("architecture:  {}", arch.as_deref().unwrap_or("(none given)")),
    }
    println!("tensors:");
    for (ty, (n, el, bytes)) in &by_type {
        let support = if ty.is_supported() { "supported" } else { "NOT supported" };
        let size = if ty.layout().is_some() {
            format!("{:>10.2} MiB", *bytes as f64 / (1 << 20) as f64)
        } else {
            format!("{:>14}", "size unknown")
        };
        println!("  {:<20} {n:>4} tensors {el:>12} elements {size}  {support}", ty.describe());
    }
    let Some(m) = m else {
        let mut why = Vec::new();
        if !unsupported.is_empty() {
            why.push(format!("tensor types {} are not supported", unsupported.join(", ")));
        }
        if let Some(e) = &load_error {
            why.push(e.clone());
        }
        println!("runs on sampo: no — {}", why.join("; "));
        return Ok(());
    };
    let h = &m.hp;
    println!("runs on sampo: yes");
    println!("model id:      {}", m.model_id_hex());
    println!("name:          {}", h.name);
    println!("feed-forward:  {}", h.n_ff);
    println!("context:       {}", h.n_ctx);
    println!(
        "vocabulary:    {} tokens, chat template: {}",
        h.n_vocab,
        if m.tokenizer.chat_template.is_some() { "yes" } else { "no" }
    );
    println!("rope:          base {}, {} dims; rms eps {}", h.rope_base, h.rope_dim, h.rms_eps);
    println!("weights read per token: {:.1} MB", m.weight_bytes() as f64 / 1e6);
    Ok(())
}

fn run_model(a: RunArgs) -> anyhow::Result<()> {
    let m = load(&a.file)?;
    let engine = engine(m.clone(), &a.backend, a.threads)?;
    let prompt = if a.chat {
        engine.chat_prompt(&[ChatMessage { role: "user".into(), content: a.prompt.clone() }])?
    } else {
        m.tokenizer.encode_prompt(&a.prompt)
    };
    let p = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: m.tokenizer.eot.clone(),
    };
    let stream = !a.json;
    let mut out = std::io::stdout();
    let mut best: Option<(f64, f64)> = None;
    for _ in 1..a.repeat.max(1) {
        let g = engine.generate(&prompt, &p, &mut |_, _| true)?;
        best =
            Some(best.map_or((g.prefill_secs, g.decode_secs), |(a, b)| (a.min(g.prefill_secs), b.min(g.decode_secs))));
    }
    let mut g = engine.generate(&prompt, &p, &mut |_, text| {
        if stream {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        true
    })?;
    if let Some((pf, dc)) = best {
        g.prefill_secs = g.prefill_secs.min(pf);
        g.decode_secs = g.decode_secs.min(dc);
    }
    let n = g.tokens.len().max(1);
    if a.json {
        let v = serde_json::json!({
            "prompt_ids": g.prompt_tokens,
            "output_ids": g.tokens,
            "text": g.text,
            "finish_reason": g.finish,
            "timings": {
                "prefill_ms": g.prefill_secs * 1e3,
                "decode_ms": g.decode_secs * 1e3,
                "prefill_tokens_per_s": g.prompt_tokens.len() as f64 / g.prefill_secs,
                "decode_tokens_per_s": (n.saturating_sub(1)) as f64 / g.decode_secs.max(1e-9),
            },
            "backend": engine.backend().device(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens in {:.0} ms, {} tokens in {:.0} ms ({:.1} tokens/s), {:?}]",
            g.prompt_tokens.len(),
            g.prefill_secs * 1e3,
            g.tokens.len(),
            g.decode_secs * 1e3,
            n.saturating_sub(1) as f64 / g.decode_secs.max(1e-9),
            g.finish
        );
    }
    Ok(())
}

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let path = match a.model {
        Some(p) => p,
        None => {
            let fetched = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
            if fetched.exists() {
                fetched
            } else {
                let p = std::env::temp_dir().join("sampo-bench-synth.gguf");
                std::fs::write(&p, synthesize(&SynthSpec::default()))?;
                p
            }
        }
    };
    let m = load(&path)?;
    let engine = engine(m.clone(), &a.backend, a.threads)?;
    let reps = a.reps.max(1);
    // A deterministic prompt of exactly `prompt_tokens` tokens.
    let text = "The history of the printing press begins in the fifteenth century, when movable type changed how books were made and read across Europe. ".repeat(64);
    let mut prompt = m.tokenizer.encode(&text, false);
    prompt.truncate(a.prompt_tokens.max(1));
    let bar = indicatif::ProgressBar::new((reps * 2) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut prefill = Vec::new();
    bar.set_message("prefill");
    for _ in 0..reps {
        let mut seq = Sequence::new(&m);
        let t = Instant::now();
        engine.backend().forward(&m, &mut [BatchItem { seq: &mut seq, tokens: &prompt }])?;
        prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        bar.inc(1);
    }
    let mut decode = Vec::new();
    bar.set_message("decode");
    let short: Vec<u32> = prompt.iter().copied().take(8).collect();
    for _ in 0..reps {
        let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..a.streams.max(1))
            .map(|s| {
                let mut p = short.clone();
                p.push(s as u32 % m.hp.n_vocab as u32);
                (p, SamplingParams { max_tokens: a.gen_tokens, ..Default::default() })
            })
            .collect();
        let gens = if a.executor {
            through_executor(&engine, reqs)?
        } else {
            engine.generate_batch(&reqs, &mut |_, _, _| true)?
        };
        let tokens: usize = gens.iter().map(|g| g.tokens.len().saturating_sub(1)).sum();
        // The decode span: from the first sequence's first token to the last one's end.
        let span = gens.iter().map(|g| g.decode_secs).fold(0.0, f64::max);
        decode.push(tokens as f64 / span.max(1e-9));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (pf, dc) = (median(prefill), median(decode));
    let rss = peak_rss_bytes().unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": path, "backend": engine.backend().device(), "prompt_tokens": prompt.len(),
                "gen_tokens": a.gen_tokens, "streams": a.streams, "executor": a.executor, "prefill_tokens_per_s": pf, "decode_tokens_per_s": dc, "peak_rss_bytes": rss})
        );
    } else {
        println!("model:   {}", path.display());
        println!("backend: {}", engine.backend().device());
        println!("prefill: {pf:.1} tokens/s ({} prompt tokens, median of {reps})", prompt.len());
        let how = if a.executor { ", through the executor" } else { "" };
        println!("decode:  {dc:.1} tokens/s ({} streams x {} tokens{how}, median of {reps})", a.streams, a.gen_tokens);
        println!("peak RSS: {:.1} MiB", rss as f64 / (1 << 20) as f64);
    }
    Ok(())
}

/// Run `reqs` as concurrent jobs on the node's executor, all submitted at once.
fn through_executor(engine: &Engine, reqs: Vec<(Vec<u32>, SamplingParams)>) -> anyhow::Result<Vec<Generation>> {
    let ex = Executor::start(ExecutorConfig { max_concurrent: reqs.len(), ..ExecutorConfig::default() })?;
    let mut dones = Vec::new();
    for (prompt, params) in reqs {
        let (done, rx) = tokio::sync::oneshot::channel();
        ex.submit(Job { priority: 1, engine: engine.clone(), prompt, params, stream: None, done })?;
        dones.push(rx);
    }
    let gens = dones.into_iter().map(|rx| Ok(rx.blocking_recv().context("the executor dropped a job")??)).collect();
    ex.shutdown(std::time::Duration::from_secs(1));
    gens
}
