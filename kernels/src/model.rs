//! A model loaded from GGUF: its architecture's description (`arch`),
//! hyper-parameters, weight views into the memory map (never copied), the tokenizer
//! and the host-computed RoPE tables.

use std::path::Path;
use std::sync::Arc;

use crate::arch::{ArchSpec, EmbedScale};
use crate::gguf::{GgmlType, GgufError, GgufFile, TensorInfo};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("unsupported architecture `{0}` (supported: {supported})", supported = crate::arch::supported())]
    UnsupportedArch(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { name: String, found: Vec<u64>, expected: Vec<u64> },
    #[error(
        "tensor `{name}` has type {}, which sampo cannot run (it runs {})",
        .ty.describe(),
        crate::gguf::SUPPORTED_TYPES.map(|t| t.name()).join(", ")
    )]
    UnsupportedType { name: String, ty: GgmlType },
    #[error("tensor `{name}` has type {ty}, which cannot be used as {role}")]
    TensorType { name: String, ty: GgmlType, role: &'static str },
    #[error("invalid hyper-parameter: {0}")]
    Hparams(String),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence would reach position {needed}, beyond the context length {ctx}")]
    ContextFull { needed: usize, ctx: usize },
    #[error("empty input for a sequence")]
    EmptyInput,
    #[error("compute device: {0}")]
    Device(String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hparams {
    pub arch: String,
    pub name: String,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub n_vocab: usize,
    /// Per head, of queries, keys and values alike (`attention.key_length`; else
    /// `n_embd / n_head`).
    pub head_dim: usize,
    pub rope_dim: usize,
    /// RoPE base of the global layers (`rope.freq_base`).
    pub rope_base: f32,
    pub rms_eps: f32,
    /// Positions a local layer sees, the current one included; 0 when no layer is local.
    pub sliding_window: usize,
    /// RoPE base of the local layers, when there are any.
    pub rope_base_local: Option<f32>,
    /// Scores are `(q · k) · attn_scale`, with `attn_scale = 1 / sqrt(head_dim)`.
    pub attn_scale: f32,
    /// Token embeddings are multiplied by this before the first layer, when set.
    pub embd_scale: Option<f32>,
}

impl Hparams {
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Bytes one token takes in a CPU sequence's cache: its keys and values, f32, in
    /// every layer.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layer * self.kv_dim() * 4
    }

    /// Width of the queries and of the attention output: `n_head · head_dim` (Gemma 3
    /// 270M: 4 · 256 = 1024 for a 640-wide residual stream).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// A 2-D weight: `rows` output features of `cols` inputs each, stored row-major in the file.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub row_bytes: usize,
}

impl Matrix {
    fn from_info(t: &TensorInfo, rows: usize, cols: usize) -> Result<Self, ModelError> {
        if t.dims != [cols as u64, rows as u64] {
            return Err(ModelError::Shape {
                name: t.name.clone(),
                found: t.dims.clone(),
                expected: vec![cols as u64, rows as u64],
            });
        }
        let row_bytes = t.ty.bytes_for(cols as u64).ok_or_else(|| ModelError::TensorType {
            name: t.name.clone(),
            ty: t.ty,
            role: "a matrix with this row length",
        })? as usize;
        Ok(Self { name: t.name.clone(), ty: t.ty, rows, cols, offset: t.offset as usize, row_bytes })
    }

    pub fn row<'a>(&self, bytes: &'a [u8], r: usize) -> &'a [u8] {
        let start = self.offset + r * self.row_bytes;
        &bytes[start..start + self.row_bytes]
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
    /// Per-head RMSNorm weights of queries and keys (`head_dim` each), for
    /// architectures with QK-norm.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm of the attention output and of the FFN output before their residual
    /// adds, for architectures with post-norms.
    pub post_attn_norm: Option<Vec<f32>>,
    pub post_ffn_norm: Option<Vec<f32>>,
    /// Sliding-window layer: attends to the last `hp.sliding_window` positions and
    /// rotates with `Model::rope_local`.
    pub local: bool,
}

pub struct Model {
    pub file: Arc<GgufFile>,
    /// The architecture's description, which the forward pass follows.
    pub spec: &'static ArchSpec,
    pub hp: Hparams,
    pub tokenizer: Tokenizer,
    pub token_embd: Matrix,
    pub output: Matrix,
    pub output_norm: Vec<f32>,
    pub layers: Vec<Layer>,
    /// `rope[p * rope_dim/2 + i] = (cos, sin)` of `p · base^(-2i/rope_dim)`, with the
    /// global layers' base.
    pub rope: Vec<(f32, f32)>,
    /// The same with the local layers' base; empty when no layer is local.
    pub rope_local: Vec<(f32, f32)>,
    /// blake3 of the whole file: the model id.
    pub file_hash: [u8; 32],
    /// The CPU's batched kernel's form of the weights, made on the first batched pass.
    pub(crate) prepared: std::sync::OnceLock<crate::cpu::Prepared>,
    /// The most bytes that form may take; over it, none is kept.
    pub(crate) prepared_budget: std::sync::atomic::AtomicUsize,
}

/// Default cap on the CPU's kept prepared weights ([`Model::set_prepared_budget`]).
pub const DEFAULT_PREPARED_BUDGET: usize = 1 << 30;

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("hp", &self.hp).finish_non_exhaustive()
    }
}

fn u(f: &GgufFile, key: &str) -> Result<usize, ModelError> {
    Ok(f.get_u64(key)? as usize)
}

impl Model {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::from_gguf(GgufFile::open(path)?.into_resident())
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?.to_owned();
        let spec = crate::arch::lookup(&arch).ok_or_else(|| ModelError::UnsupportedArch(arch.clone()))?;
        let k = |s: &str| format!("{arch}.{s}");
        let n_embd = u(&file, &k("embedding_length"))?;
        let n_layer = u(&file, &k("block_count"))?;
        let n_head = u(&file, &k("attention.head_count"))?;
        let n_head_kv = match file.get(&k("attention.head_count_kv")) {
            Some(_) => u(&file, &k("attention.head_count_kv"))?,
            None => n_head,
        };
        let n_ff = u(&file, &k("feed_forward_length"))?;
        let n_ctx = u(&file, &k("context_length"))?;
        let rope_base = file.get_f32(&k("rope.freq_base")).unwrap_or(spec.default_rope_base);
        let rms_eps = file.get_f32(&k("attention.layer_norm_rms_epsilon")).unwrap_or(spec.default_rms_eps);
        let bad = |m: String| Err(ModelError::Hparams(m));
        if n_embd == 0 || n_layer == 0 || n_head == 0 || n_head_kv == 0 || n_ff == 0 || n_ctx == 0 {
            return bad("a dimension is zero".into());
        }
        if n_embd > 1 << 16 || n_ff > 1 << 18 || n_layer > 1024 || n_head > 1024 {
            return bad("dimensions are implausibly large".into());
        }
        if n_head % n_head_kv != 0 {
            return bad(format!("{n_head} heads, {n_head_kv} kv heads do not divide"));
        }
        // Gemma's heads are wider than n_embd / n_head; the file then says how wide.
        let head_dim = match file.get(&k("attention.key_length")) {
            Some(_) => u(&file, &k("attention.key_length"))?,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => return bad(format!("{n_embd} dims do not divide into {n_head} heads")),
        };
        if file.get(&k("attention.value_length")).is_some() && u(&file, &k("attention.value_length"))? != head_dim {
            return bad("value length differs from key length".into());
        }
        if head_dim == 0 || head_dim > 1 << 12 {
            return bad(format!("head dim {head_dim}"));
        }
        let rope_dim = match file.get(&k("rope.dimension_count")) {
            Some(_) => u(&file, &k("rope.dimension_count"))?,
            None => head_dim,
        };
        if head_dim % 2 != 0 || rope_dim % 2 != 0 || rope_dim > head_dim {
            return bad(format!("head dim {head_dim}, rope dim {rope_dim}"));
        }
        let n_ctx = n_ctx.min(1 << 17);
        let (sliding_window, rope_base_local) = match spec.layers {
            crate::arch::LayerPattern::AllGlobal => (0, None),
            crate::arch::LayerPattern::LocalThenGlobal { local_rope_base, .. } => {
                let w = u(&file, &k("attention.sliding_window"))?;
                if w == 0 {
                    return bad("sliding window of 0 positions".into());
                }
                (w, Some(local_rope_base))
            }
        };
        let embd =
            file.tensor("token_embd.weight").ok_or_else(|| GgufError::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = *embd.dims.get(1).unwrap_or(&0) as usize;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.vocab_size() != n_vocab {
            return bad(format!("tokenizer has {} tokens, embedding has {n_vocab}", tokenizer.vocab_size()));
        }
        let hp = Hparams {
            name: file.get_str("general.name").unwrap_or("unnamed").to_owned(),
            arch,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            n_ff,
            n_ctx,
            n_vocab,
            head_dim,
            rope_dim,
            rope_base,
            rms_eps,
            sliding_window,
            rope_base_local,
            attn_scale: 1.0f32 / (head_dim as f32).sqrt(),
            embd_scale: match spec.embed_scale {
                EmbedScale::None => None,
                EmbedScale::SqrtEmbd => Some((n_embd as f32).sqrt()),
            },
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Matrix, ModelError> {
            let t = file.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
            if !t.ty.is_supported() {
                return Err(ModelError::UnsupportedType { name: name.into(), ty: t.ty });
            }
            if t.ty.block_len() > 1 && !cols.is_multiple_of(32) {
                return Err(ModelError::TensorType {
                    name: name.into(),
                    ty: t.ty,
                    role: "a matrix with this row length",
                });
            }
            Matrix::from_info(t, rows, cols)
        };
        let vec = |name: &str, n: usize| -> Result<Vec<f32>, ModelError> {
            let t = file.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
            if t.dims != [n as u64] {
                return Err(ModelError::Shape { name: name.into(), found: t.dims.clone(), expected: vec![n as u64] });
            }
            if !t.ty.is_supported() {
                return Err(ModelError::UnsupportedType { name: name.into(), ty: t.ty });
            }
            if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(ModelError::TensorType { name: name.into(), ty: t.ty, role: "a norm weight" });
            }
            let mut out = vec![0.0; n];
            crate::quant::dequantize_row(t.ty, file.tensor_data(t), &mut out);
            Ok(out)
        };
        let (kvd, qd) = (hp.kv_dim(), hp.q_dim());
        // A tensor the architecture has: required, with its shape.
        let opt_vec = |has: bool, name: &str, n: usize| if has { vec(name, n).map(Some) } else { Ok(None) };
        let token_embd = mat("token_embd.weight", n_vocab, n_embd)?;
        let output = match file.tensor("output.weight") {
            Some(_) => mat("output.weight", n_vocab, n_embd)?,
            None => token_embd.clone(),
        };
        let output_norm = vec("output_norm.weight", n_embd)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vec(&p("attn_norm"), n_embd)?,
                wq: mat(&p("attn_q"), qd, n_embd)?,
                wk: mat(&p("attn_k"), kvd, n_embd)?,
                wv: mat(&p("attn_v"), kvd, n_embd)?,
                wo: mat(&p("attn_output"), n_embd, qd)?,
                ffn_norm: vec(&p("ffn_norm"), n_embd)?,
                w_gate: mat(&p("ffn_gate"), n_ff, n_embd)?,
                w_up: mat(&p("ffn_up"), n_ff, n_embd)?,
                w_down: mat(&p("ffn_down"), n_embd, n_ff)?,
                q_norm: opt_vec(spec.qk_norm, &p("attn_q_norm"), head_dim)?,
                k_norm: opt_vec(spec.qk_norm, &p("attn_k_norm"), head_dim)?,
                post_attn_norm: opt_vec(spec.post_norms, &p("post_attention_norm"), n_embd)?,
                post_ffn_norm: opt_vec(spec.post_norms, &p("post_ffw_norm"), n_embd)?,
                local: spec.layers.is_local(i),
            });
        }
        let rope = rope_table(n_ctx, rope_dim, rope_base);
        let rope_local = rope_base_local.map_or_else(Vec::new, |b| rope_table(n_ctx, rope_dim, b));
        let file_hash = *blake3::hash(file.bytes()).as_bytes();
        Ok(Self {
            file: Arc::new(file),
            spec,
            hp,
            tokenizer,
            token_embd,
            output,
            output_norm,
            layers,
            rope,
            rope_local,
            file_hash,
            prepared: std::sync::OnceLock::new(),
            prepared_budget: std::sync::atomic::AtomicUsize::new(DEFAULT_PREPARED_BUDGET),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    /// Bytes of weights read per decoded token (every matrix once).
    pub fn weight_bytes(&self) -> usize {
        let m = |w: &Matrix| w.rows * w.row_bytes;
        self.layers
            .iter()
            .map(|l| m(&l.wq) + m(&l.wk) + m(&l.wv) + m(&l.wo) + m(&l.w_gate) + m(&l.w_up) + m(&l.w_down))
            .sum::<usize>()
            + m(&self.output)
    }

    /// Cap the memory the CPU backend may keep for this model's prepared weight rows
    /// (made on its first batched pass; about 1.2x a 4-bit model's weights). A model
    /// whose prepared rows would need more keeps none, and every batched pass lays out
    /// the rows it needs: the same bits, slower batches. Takes effect only before the
    /// first batched pass.
    pub fn set_prepared_budget(&self, bytes: usize) {
        self.prepared_budget.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of the CPU's prepared weights (made on the first batched pass), if made.
    pub fn prepared_bytes(&self) -> Option<usize> {
        self.prepared.get().map(crate::cpu::Prepared::bytes)
    }

    pub fn model_id_hex(&self) -> String {
        self.file_hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Host-computed RoPE table. `libm` (a port of musl) gives the same bits on every
/// platform, which the system libm does not promise.
pub fn rope_table(n_ctx: usize, rope_dim: usize, base: f32) -> Vec<(f32, f32)> {
    let half = rope_dim / 2;
    let inv: Vec<f64> = (0..half).map(|i| libm::pow(base as f64, -(2.0 * i as f64) / rope_dim as f64)).collect();
    let mut t = Vec::with_capacity(n_ctx * half);
    for p in 0..n_ctx {
        for &f in &inv {
            let a = p as f64 * f;
            t.push((libm::cos(a) as f32, libm::sin(a) as f32));
        }
    }
    t
}
