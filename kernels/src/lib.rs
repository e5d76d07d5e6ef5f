//! sampo's model runtime: GGUF loading, the tokenizers, the forward pass of each
//! architecture in [`arch`] (Llama family, Gemma 3), sampling, and the compute
//! backends behind one trait. Knows nothing of networks.
//!
//! The determinism contract (`DESIGN.md`): for the same model file, prompt and
//! sampling parameters, every backend produces the same tokens, bit for bit, whatever
//! the thread count, batch composition or load. The canonical arithmetic is written
//! down in [`math`] and [`quant`]; backends must follow it exactly.

pub mod arch;
pub mod chat;
pub mod cpu;
pub mod cuda;
pub mod fpenv;
pub mod gguf;
pub mod math;
pub mod model;
pub mod quant;
pub mod replay;
pub mod sampling;
pub mod synth;
pub mod tokenizer;

use std::sync::Arc;
use std::time::Instant;

pub use chat::ChatMessage;
pub use cpu::{BatchItem, Sequence};
pub use model::{DEFAULT_PREPARED_BUDGET, Hparams, Model, ModelError};
pub use replay::{Divergence, Replay};
pub use sampling::SamplingParams;
pub use tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] sampling::SamplingError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error("could not start {threads} inference threads: {reason}")]
    Threads { threads: usize, reason: String },
    #[error(transparent)]
    FloatEnv(#[from] fpenv::FlushToZero),
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("message {0} contains a special token string the chat template would not keep as text")]
    SpecialInMessage(usize),
    #[error("prompt of {prompt} tokens plus {max_tokens} new tokens exceeds the context length {ctx}")]
    TooLong { prompt: usize, max_tokens: u32, ctx: usize },
}

/// Which kind of device a backend computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Cpu,
    Cuda,
}

/// An accelerator's identity and memory, as an operator wants to see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub compute_capability: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// A compute backend. Every implementation follows the canonical arithmetic.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Human-readable device, e.g. "x86_64 (avx2), 2 threads".
    fn device(&self) -> String;
    /// The accelerator, for backends that have one.
    fn device_status(&self) -> Option<DeviceStatus> {
        None
    }
    /// Make what this backend builds lazily for `model` now (the CPU's prepared weight
    /// rows), so that no request waits for it. Nothing by default.
    fn warm(&self, model: &Model) {
        let _ = model;
    }
    /// Run `batch` through `model`; logits after each item's last token.
    fn forward(&self, model: &Model, batch: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// Run `batch` through `model` and choose each item's next token as
    /// [`sampling::sample`] does on the logits [`Backend::forward`] returns, with the
    /// item's parameters and step (`params[i]` for `batch[i]`). Parameters are checked
    /// first ([`sampling::validate_batch`]); on bad ones nothing runs.
    ///
    /// This default samples on the host; a device backend overrides it to sample where
    /// the logits are and copy back only the ids.
    fn forward_sample(
        &self,
        model: &Model,
        batch: &mut [BatchItem<'_>],
        params: &[(&SamplingParams, u64)],
    ) -> Result<Vec<u32>, KernelError> {
        sampling::validate_batch(batch.len(), params)?;
        let logits = self.forward(model, batch)?;
        Ok(logits.iter().zip(params).map(|(l, &(p, step))| sampling::sample(l, p, step)).collect())
    }
    /// Run `tokens` through `model` after what `seq` holds, appending to its cache;
    /// logits after every token, each the bits a one-token decode step gives there
    /// (replay teacher-forces a revealed output with this).
    ///
    /// This default feeds one token at a time, which is right on any backend but pays a
    /// decode step per token; a backend overrides it with one batched pass.
    fn forward_all(&self, model: &Model, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        // Refuse bad input before the cache grows, as a one-pass backend does.
        cpu::plan_rows(model, &[BatchItem { seq: &mut *seq, tokens }])?;
        tokens
            .iter()
            .map(|t| {
                let mut out =
                    self.forward(model, &mut [BatchItem { seq: &mut *seq, tokens: std::slice::from_ref(t) }])?;
                out.pop().ok_or_else(|| ModelError::Device("the backend returned no logits for a token".into()))
            })
            .collect()
    }
}

/// The CPU backend on its own thread pool, or with one thread on the caller's own.
pub struct CpuBackend {
    /// `None` for one thread: each pass runs on the thread that asks for it.
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl CpuBackend {
    /// `threads == 0` means one per available core. Refuses to start where this thread
    /// or a worker flushes subnormals (see [`fpenv`]).
    pub fn new(threads: usize) -> Result<Self, KernelError> {
        fpenv::check()?;
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        if threads == 1 {
            return Ok(Self { pool: None, threads });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sampo-cpu-{i}"))
            .build()
            .map_err(|e| KernelError::Threads { threads, reason: e.to_string() })?;
        fpenv::check_pool(&pool)?;
        Ok(Self { pool: Some(pool), threads })
    }

    /// `f` over the pool, or in order on this thread (checked for subnormal flushing
    /// first: it is not one the backend made).
    fn run<R: Send>(&self, f: impl FnOnce() -> Result<R, ModelError> + Send) -> Result<R, ModelError> {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => {
                fpenv::check().map_err(|e| ModelError::Device(e.to_string()))?;
                cpu::serially(f)
            }
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn device(&self) -> String {
        let simd =
            if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx2") { "avx2" } else { "scalar" };
        format!("{} ({simd}), {} threads", std::env::consts::ARCH, self.threads)
    }

    fn warm(&self, model: &Model) {
        let _ = self.run(|| {
            cpu::warm(model);
            Ok(())
        });
    }

    fn forward(&self, model: &Model, batch: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = self.run(|| cpu::forward(model, batch))?;
        out.iter_mut().for_each(|l| math::canonicalize_nans(l));
        Ok(out)
    }

    fn forward_all(&self, model: &Model, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = self.run(|| cpu::forward_all(model, seq, tokens))?;
        out.iter_mut().for_each(|l| math::canonicalize_nans(l));
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller asked to stop (e.g. its client went away).
    Cancelled,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Where each message's content sits in the rendered template, in order (the content
/// itself, or trimmed, as templates often trim); `None` for a message whose text the
/// template changed so that it cannot be found verbatim.
fn content_ranges(text: &str, messages: &[ChatMessage]) -> Vec<Option<std::ops::Range<usize>>> {
    let mut ranges = Vec::new();
    let mut cursor = 0;
    for m in messages {
        let mut found = None;
        for candidate in [m.content.as_str(), m.content.trim()] {
            if candidate.is_empty() {
                break;
            }
            if let Some(i) = text[cursor..].find(candidate) {
                let start = cursor + i;
                found = Some(start..start + candidate.len());
                cursor = start + candidate.len();
                break;
            }
        }
        ranges.push(found);
    }
    ranges
}

/// A model on a backend.
#[derive(Clone)]
pub struct Engine {
    pub model: Arc<Model>,
    backend: Arc<dyn Backend>,
}

impl Engine {
    pub fn new(model: Arc<Model>, backend: Arc<dyn Backend>) -> Self {
        Self { model, backend }
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.model.tokenizer
    }

    /// Render chat messages with the model's template (the file's, else its
    /// architecture's built-in) and tokenize (specials parsed), with `bos` first when
    /// the file asks for it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, KernelError> {
        let t = &self.model.tokenizer;
        let name =
            |id: Option<u32>| id.and_then(|i| t.token_bytes(i).ok()).map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = chat::render(
            Some(t.chat_template.as_deref().unwrap_or(self.model.spec.default_chat_template)),
            messages,
            true,
            &name(t.bos).unwrap_or_default(),
            &name(t.eos).unwrap_or_default(),
        )?;
        // The template's own markers are special tokens; the messages' text never is.
        let ranges = content_ranges(&text, messages);
        if let Some(i) = ranges.iter().zip(messages).position(|(r, m)| r.is_none() && t.contains_special(&m.content)) {
            // Transformed by the template beyond recognition: its token strings cannot
            // be told from the template's, so the message is refused.
            return Err(KernelError::SpecialInMessage(i));
        }
        let protected: Vec<std::ops::Range<usize>> = ranges.into_iter().flatten().collect();
        Ok(t.with_bos(t.encode_protected(&text, &protected)))
    }

    /// Logits after feeding `tokens` to a fresh sequence.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, KernelError> {
        let mut seq = Sequence::new(&self.model);
        let mut out = self.backend.forward(&self.model, &mut [BatchItem { seq: &mut seq, tokens }])?;
        Ok(out.pop().unwrap_or_default())
    }

    fn check(&self, prompt: &[u32], p: &SamplingParams) -> Result<(), KernelError> {
        p.validate()?;
        if prompt.is_empty() {
            return Err(KernelError::EmptyPrompt);
        }
        let ctx = self.model.hp.n_ctx;
        if prompt.len() + p.max_tokens as usize > ctx {
            return Err(KernelError::TooLong { prompt: prompt.len(), max_tokens: p.max_tokens, ctx });
        }
        Ok(())
    }

    /// Generate a continuation; `on_token(id, text)` sees each token as it is made
    /// (text is complete UTF-8 only) and returns `false` to stop early.
    pub fn generate(
        &self,
        prompt: &[u32],
        p: &SamplingParams,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<Generation, KernelError> {
        let mut gens = self.generate_batch(&[(prompt.to_vec(), p.clone())], &mut |_, id, s| on_token(id, s))?;
        Ok(gens.remove(0))
    }

    /// Generate for several requests at once, decoding them in lockstep as one batch.
    /// Each request's tokens are the same as if it ran alone.
    pub fn generate_batch(
        &self,
        requests: &[(Vec<u32>, SamplingParams)],
        on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
    ) -> Result<Vec<Generation>, KernelError> {
        for (prompt, p) in requests {
            self.check(prompt, p)?;
        }
        let tok = &self.model.tokenizer;
        let n = requests.len();
        let mut seqs: Vec<Sequence> = (0..n).map(|_| Sequence::new(&self.model)).collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut text: Vec<String> = vec![String::new(); n];
        let mut decoders: Vec<StreamDecoder> = (0..n).map(|_| StreamDecoder::new()).collect();
        let mut finish: Vec<Option<FinishReason>> = vec![None; n];
        let t0 = Instant::now();
        // Each pass samples where its logits are (on the device, for a device backend).
        let mut chosen = {
            let mut batch: Vec<BatchItem<'_>> =
                seqs.iter_mut().zip(requests).map(|(seq, (prompt, _))| BatchItem { seq, tokens: prompt }).collect();
            let params: Vec<(&SamplingParams, u64)> = requests.iter().map(|(_, p)| (p, 0)).collect();
            self.backend.forward_sample(&self.model, &mut batch, &params)?
        };
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        loop {
            let mut next: Vec<(usize, u32)> = Vec::new();
            for (i, (_, p)) in requests.iter().enumerate() {
                if finish[i].is_some() {
                    continue;
                }
                let id = chosen[i];
                if p.stop.contains(&id) {
                    finish[i] = Some(FinishReason::Stop);
                    continue;
                }
                out[i].push(id);
                let piece = decoders[i].push(tok, id)?;
                text[i].push_str(&piece);
                if !on_token(i, id, &piece) {
                    finish[i] = Some(FinishReason::Cancelled);
                    continue;
                }
                if out[i].len() >= p.max_tokens as usize {
                    finish[i] = Some(FinishReason::Length);
                    continue;
                }
                next.push((i, id));
            }
            if next.is_empty() {
                break;
            }
            let ids: Vec<[u32; 1]> = next.iter().map(|&(_, id)| [id]).collect();
            let mut batch: Vec<BatchItem<'_>> = Vec::with_capacity(next.len());
            let mut rest: &mut [Sequence] = &mut seqs;
            let mut base = 0;
            for (k, &(i, _)) in next.iter().enumerate() {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (seq, tail) = tail.split_first_mut().ok_or(KernelError::EmptyPrompt)?;
                batch.push(BatchItem { seq, tokens: &ids[k] });
                rest = tail;
                base = i + 1;
            }
            // The step of the token each pass chooses is the count generated so far.
            let params: Vec<(&SamplingParams, u64)> =
                next.iter().map(|&(i, _)| (&requests[i].1, out[i].len() as u64)).collect();
            let new = self.backend.forward_sample(&self.model, &mut batch, &params)?;
            for (&(i, _), id) in next.iter().zip(new) {
                chosen[i] = id;
            }
        }
        let decode_secs = t1.elapsed().as_secs_f64();
        Ok((0..n)
            .map(|i| {
                text[i].push_str(&decoders[i].finish());
                Generation {
                    prompt_tokens: requests[i].0.clone(),
                    tokens: std::mem::take(&mut out[i]),
                    text: std::mem::take(&mut text[i]),
                    finish: finish[i].unwrap_or(FinishReason::Length),
                    prefill_secs,
                    decode_secs,
                }
            })
            .collect())
    }
}
