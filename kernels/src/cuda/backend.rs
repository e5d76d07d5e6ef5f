//! The forward pass on a CUDA device: weights uploaded once per model, each sequence's
//! KV cache in its own device allocation, every operation one of the kernels in
//! `kernels/cuda`, which follow the CPU backend's canonical arithmetic so that logits
//! are bit-identical. A decode step (one token for each of `n` sequences) is captured
//! once as a graph and replayed: what changes between steps (tokens, positions, cache
//! addresses) lives in a staging buffer the graph reads.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::{Arg, CudaError, Device, Kernel, Shape, bytes_of, bytes_of_mut};
use crate::arch::{Activation, RopePairs};
use crate::cpu::{BatchItem, Sequence, plan_rows};
use crate::gguf::GgmlType;
use crate::model::{Matrix, Model, ModelError};
use crate::sampling::{self, SamplingParams};
use crate::{Backend, BackendKind, CpuBackend, DeviceStatus, KernelError};

/// Rows (tokens across the batch) per pass; longer prompts run in several passes.
pub const MAX_ROWS: usize = 256;
/// Decode batches up to this many sequences replay a captured graph.
pub const GRAPH_MAX_ROWS: usize = 64;

const TPB: u32 = 128;

/// Threads of an attention block (attention.cu SAMPO_ATTN_WARPS warps): one block per
/// (head, row); a head is at most this wide (one thread per output element).
const ATTN_THREADS: usize = 256;
/// Floats of an attention block's shared memory (attention.cu SAMPO_ATTN_SMEM): the
/// rotated q head, then the scores of as many positions as fit.
const ATTN_SMEM: usize = 11264;

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

struct Mat<D: Device> {
    /// The tensor's name, for errors.
    name: String,
    buf: D::Buffer,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

struct LayerW<D: Device> {
    attn_norm: D::Buffer,
    ffn_norm: D::Buffer,
    /// Per-head RMSNorm weights of Q and K (QK-norm), when the architecture has them.
    q_norm: Option<D::Buffer>,
    k_norm: Option<D::Buffer>,
    /// RMSNorm of the attention and FFN outputs before their residual adds.
    post_attn_norm: Option<D::Buffer>,
    post_ffn_norm: Option<D::Buffer>,
    /// Attends through the sliding window, rotating with the local RoPE table.
    local: bool,
    wq: Mat<D>,
    wk: Mat<D>,
    wv: Mat<D>,
    wo: Mat<D>,
    gate: Mat<D>,
    up: Mat<D>,
    down: Mat<D>,
}

struct Weights<D: Device> {
    embed: Mat<D>,
    /// The output head; `None` when it is tied to the embedding (one upload serves both).
    output: Option<Mat<D>>,
    output_norm: D::Buffer,
    rope: D::Buffer,
    /// The local layers' RoPE table, when some layers are local.
    rope_local: Option<D::Buffer>,
    layers: Vec<LayerW<D>>,
    /// The architecture's choices, as the kernels take them.
    plan: Plan,
}

/// What the architecture table decides for the kernels, read once at upload.
struct Plan {
    /// `glu_quant`'s activation: 0 SiLU, 1 GELU (ffn.cu).
    act: i32,
    /// RoPE (in `attention`) pairs `(i, i + rope_dim/2)` instead of `(2i, 2i+1)`.
    neox: bool,
    embd_scale: Option<f32>,
}

impl<D: Device> Weights<D> {
    fn output(&self) -> &Mat<D> {
        self.output.as_ref().unwrap_or(&self.embed)
    }
}

/// Activations for up to MAX_ROWS rows, allocated once per model so that captured
/// graphs stay valid.
struct Scratch<D: Device> {
    staging: D::Buffer,
    x: D::Buffer,
    xn: D::Buffer,
    q: D::Buffer,
    k: D::Buffer,
    v: D::Buffer,
    attn: D::Buffer,
    o: D::Buffer,
    g: D::Buffer,
    u: D::Buffer,
    down: D::Buffer,
    /// Quantized activations: the input of every matrix product but the down
    /// projection's…
    act: ActBufs<D>,
    /// …which reads these, written by the fused gate/up kernel while other blocks of it
    /// still read `act`.
    act_ffn: ActBufs<D>,
    scores: D::Buffer,
    logits: D::Buffer,
}

/// Quantized activation rows: int8 quants, and each block's scale and sum.
struct ActBufs<D: Device> {
    q: D::Buffer,
    d: D::Buffer,
    s: D::Buffer,
}

/// Offsets of the per-pass arrays inside the staging buffer.
struct StagingLayout {
    kptr: usize,
    vptr: usize,
    cap: usize,
    pos: usize,
    tokens: usize,
    idx: usize,
    /// Per row: the row of this pass where its sequence's rows begin (attention reads
    /// this pass's k and v from there, not from the cache it writes).
    run: usize,
    bytes: usize,
}

const STAGING: StagingLayout = StagingLayout {
    kptr: 0,
    vptr: 8 * MAX_ROWS,
    cap: 16 * MAX_ROWS,
    pos: 20 * MAX_ROWS,
    tokens: 24 * MAX_ROWS,
    idx: 28 * MAX_ROWS,
    run: 32 * MAX_ROWS,
    bytes: 36 * MAX_ROWS,
};

struct ModelState<D: Device> {
    w: Weights<D>,
    s: Scratch<D>,
    graphs: HashMap<usize, D::Graph>,
    /// The device sampler's scratch, made on the first `forward_sample`.
    sampler: Option<SamplerScratch<D>>,
}

/// A sequence's KV cache on the device: K and V, each `[layer][cap][kv_dim]` f32.
struct KvCache<D: Device> {
    k: D::Buffer,
    v: D::Buffer,
    cap: usize,
    backend: u64,
    model: [u8; 32],
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Decode statistics, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    pub captured: u64,
    pub replayed: u64,
    pub direct_passes: u64,
}

pub struct CudaBackend<D: Device> {
    dev: D,
    id: u64,
    models: Mutex<HashMap<[u8; 32], ModelState<D>>>,
    stats: Mutex<GraphStats>,
    use_graphs: bool,
    max_rows: usize,
    /// Positions whose attention scores stay in shared memory (more go to global
    /// scratch); lowered only by tests, to reach the global path with short contexts.
    shared_scores: usize,
}

impl<D: Device> CudaBackend<D> {
    pub fn new(dev: D) -> Self {
        Self {
            dev,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            models: Mutex::new(HashMap::new()),
            stats: Mutex::new(GraphStats::default()),
            use_graphs: true,
            max_rows: MAX_ROWS,
            shared_scores: ATTN_SMEM,
        }
    }

    /// Keep at most `n` positions' attention scores in shared memory (tests: the path
    /// of long contexts, whose scores spill to global memory, with short ones).
    pub fn with_shared_scores(mut self, n: usize) -> Self {
        self.shared_scores = n.min(ATTN_SMEM);
        self
    }

    /// Fewer rows per pass (at most [`MAX_ROWS`]): tests exercise multi-pass prompts
    /// with short ones.
    pub fn with_max_rows(mut self, rows: usize) -> Self {
        self.max_rows = rows.clamp(1, MAX_ROWS);
        self
    }

    /// Launch every kernel directly, never through a graph (to compare the two).
    pub fn without_graphs(mut self) -> Self {
        self.use_graphs = false;
        self
    }

    pub fn device_handle(&self) -> &D {
        &self.dev
    }

    pub fn graph_stats(&self) -> GraphStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Upload a model's weights now (otherwise its first forward pass does).
    pub fn load(&self, model: &Model) -> Result<(), CudaError> {
        let mut models = self.models.lock().map_err(|_| poisoned())?;
        let out = self.state(&mut models, model).map(|_| ());
        if out.is_err() {
            self.fence_after_error();
        }
        out
    }

    /// The model's device state, uploading its weights on first use.
    fn state<'m>(
        &self,
        models: &'m mut HashMap<[u8; 32], ModelState<D>>,
        model: &Model,
    ) -> Result<&'m mut ModelState<D>, CudaError> {
        match models.entry(model.file_hash) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(slot) => Ok(slot.insert(self.upload_model(model)?)),
        }
    }

    fn buf_f32(&self, v: &[f32]) -> Result<D::Buffer, CudaError> {
        let b = self.dev.alloc(v.len() * 4)?;
        self.dev.upload(self.dev.addr(&b), bytes_of(v))?;
        Ok(b)
    }

    fn mat(&self, model: &Model, m: &Matrix) -> Result<Mat<D>, CudaError> {
        let len = m.rows * m.row_bytes;
        let src = model.bytes().get(m.offset..m.offset + len).ok_or_else(|| CudaError::Driver {
            call: "upload",
            reason: format!("tensor {} lies outside the file", m.name),
        })?;
        let buf = self.dev.alloc(len)?;
        self.dev.upload(self.dev.addr(&buf), src)?;
        Ok(Mat { name: m.name.clone(), buf, ty: m.ty, rows: m.rows, cols: m.cols, row_bytes: m.row_bytes })
    }

    fn upload_model(&self, model: &Model) -> Result<ModelState<D>, CudaError> {
        let hp = &model.hp;
        if !model.spec.on_cuda {
            return Err(CudaError::UnsupportedArch(model.spec.name));
        }
        let (d, kvd, ff, qd) = (hp.n_embd, hp.kv_dim(), hp.n_ff, hp.q_dim());
        // Each warp of the fused norm/quantize kernels owns whole blocks of 32.
        if !d.is_multiple_of(32) || !ff.is_multiple_of(32) || !qd.is_multiple_of(32) {
            return Err(CudaError::UnsupportedShape(format!("n_embd {d}, n_ff {ff} and q_dim {qd}")));
        }
        // An attention block has a thread per element of a head; RoPE rotates pairs.
        let hd = hp.head_dim;
        if hd == 0 || hd > ATTN_THREADS || !hd.is_multiple_of(2) || hp.rope_dim > hd {
            return Err(CudaError::UnsupportedShape(format!(
                "head_dim {hd} (rope_dim {}): attention takes even widths up to {ATTN_THREADS}",
                hp.rope_dim
            )));
        }
        let flat = |t: &[(f32, f32)]| -> Vec<f32> { t.iter().flat_map(|&(c, s)| [c, s]).collect() };
        let opt = |v: &Option<Vec<f32>>| v.as_deref().map(|v| self.buf_f32(v)).transpose();
        let mut layers = Vec::with_capacity(hp.n_layer);
        for l in &model.layers {
            layers.push(LayerW {
                attn_norm: self.buf_f32(&l.attn_norm)?,
                ffn_norm: self.buf_f32(&l.ffn_norm)?,
                wq: self.mat(model, &l.wq)?,
                wk: self.mat(model, &l.wk)?,
                wv: self.mat(model, &l.wv)?,
                wo: self.mat(model, &l.wo)?,
                gate: self.mat(model, &l.w_gate)?,
                up: self.mat(model, &l.w_up)?,
                down: self.mat(model, &l.w_down)?,
                q_norm: opt(&l.q_norm)?,
                k_norm: opt(&l.k_norm)?,
                post_attn_norm: opt(&l.post_attn_norm)?,
                post_ffn_norm: opt(&l.post_ffn_norm)?,
                local: l.local,
            });
        }
        if layers.iter().any(|l| l.local) && model.rope_local.is_empty() {
            return Err(CudaError::UnsupportedShape("local layers without a local RoPE table".into()));
        }
        let (e, o) = (&model.token_embd, &model.output);
        let tied = (o.offset, o.ty, o.rows, o.cols) == (e.offset, e.ty, e.rows, e.cols);
        let w = Weights {
            embed: self.mat(model, e)?,
            output: if tied { None } else { Some(self.mat(model, o)?) },
            output_norm: self.buf_f32(&model.output_norm)?,
            rope: self.buf_f32(&flat(&model.rope))?,
            rope_local: if model.rope_local.is_empty() { None } else { Some(self.buf_f32(&flat(&model.rope_local))?) },
            layers,
            plan: Plan {
                act: match model.spec.activation {
                    Activation::Silu => 0,
                    Activation::GeluTanh => 1,
                },
                neox: model.spec.rope_pairs == RopePairs::Halves,
                embd_scale: hp.embd_scale,
            },
        };
        let r = self.max_rows;
        let wide = d.max(ff).max(qd);
        let f = |n: usize| self.dev.alloc(n * 4);
        let s = Scratch {
            staging: self.dev.alloc(STAGING.bytes)?,
            x: f(r * d)?,
            xn: f(r * d)?,
            q: f(r * qd)?,
            k: f(r * kvd)?,
            v: f(r * kvd)?,
            attn: f(r * qd)?,
            o: f(r * d)?,
            g: f(r * ff)?,
            u: f(r * ff)?,
            down: f(r * d)?,
            act: ActBufs { q: self.dev.alloc(r * wide)?, d: f(r * wide / 32)?, s: f(r * wide / 32)? },
            act_ffn: ActBufs { q: self.dev.alloc(r * ff)?, d: f(r * ff / 32)?, s: f(r * ff / 32)? },
            scores: f(r * hp.n_head * hp.n_ctx)?,
            logits: f(r * hp.n_vocab)?,
        };
        Ok(ModelState { w, s, graphs: HashMap::new(), sampler: None })
    }

    /// Make `seq`'s device cache hold at least `need` positions, keeping what it has.
    fn ensure_cache(&self, model: &Model, seq: &mut Sequence, need: usize) -> Result<(), CudaError> {
        let hp = &model.hp;
        let kvd = hp.kv_dim();
        if seq.device.is_none() {
            if seq.pos > 0 {
                // Its cache is in host memory: it was run on another backend.
                return Err(CudaError::ForeignSequence);
            }
            let cap = need.next_multiple_of(64).min(hp.n_ctx);
            let bytes = hp.n_layer * cap * kvd * 4;
            let cache: KvCache<D> = KvCache {
                k: self.dev.alloc(bytes)?,
                v: self.dev.alloc(bytes)?,
                cap,
                backend: self.id,
                model: model.file_hash,
            };
            seq.device = Some(Box::new(cache));
            return Ok(());
        }
        let cache = seq
            .device
            .as_mut()
            .and_then(|b| (b.as_mut() as &mut dyn Any).downcast_mut::<KvCache<D>>())
            .filter(|c| c.backend == self.id && c.model == model.file_hash)
            .ok_or(CudaError::ForeignSequence)?;
        if cache.cap >= need {
            return Ok(());
        }
        let cap = need.max(cache.cap * 2).next_multiple_of(64).min(hp.n_ctx);
        let bytes = hp.n_layer * cap * kvd * 4;
        let (k, v) = (self.dev.alloc(bytes)?, self.dev.alloc(bytes)?);
        let used = seq.pos * kvd * 4;
        if used > 0 {
            for l in 0..hp.n_layer {
                let (dst, src) = (l * cap * kvd * 4, l * cache.cap * kvd * 4);
                self.dev.copy(self.dev.addr(&k) + dst as u64, self.dev.addr(&cache.k) + src as u64, used)?;
                self.dev.copy(self.dev.addr(&v) + dst as u64, self.dev.addr(&cache.v) + src as u64, used)?;
            }
        }
        // The old buffers are freed on another stream: the copies must be done first.
        self.dev.synchronize()?;
        *cache = KvCache { k, v, cap, backend: self.id, model: model.file_hash };
        Ok(())
    }

    fn launch(&self, k: Kernel, shape: Shape, args: &[Arg]) -> Result<(), CudaError> {
        self.dev.launch(k, shape, args)
    }

    fn a(&self, b: &D::Buffer) -> Arg {
        Arg::Ptr(self.dev.addr(b))
    }

    fn act_args(&self, a: &ActBufs<D>) -> [Arg; 3] {
        [self.a(&a.q), self.a(&a.d), self.a(&a.s)]
    }

    fn quantize(&self, x: &D::Buffer, act: &ActBufs<D>, cols: usize, n: usize) -> Result<(), CudaError> {
        let nb = n * cols / 32;
        let mut args = vec![self.a(x)];
        args.extend(self.act_args(act));
        args.push(Arg::I32(nb as i32));
        self.launch(Kernel::QuantizeAct, Shape::new((blocks(nb, 4), 1), TPB), &args)
    }

    /// `out_j[r] = m_j · x[r]` for `n` rows and each (matrix, output) pair, all sharing
    /// the input. Quantized weights use the activations just quantized from `x`; runs of
    /// up to three of one type go in one launch. Float weights use `x` itself.
    fn matmul(
        &self,
        act: &ActBufs<D>,
        jobs: &[(&Mat<D>, &D::Buffer)],
        x: &D::Buffer,
        n: usize,
    ) -> Result<(), CudaError> {
        let mut i = 0;
        while i < jobs.len() {
            let (m, out) = jobs[i];
            if !m.ty.is_quantized() {
                self.launch(
                    Kernel::MatmulF,
                    Shape::new((blocks(m.rows, 4), n as u32), TPB),
                    &[
                        self.a(&m.buf),
                        Arg::I32(m.ty.to_u32() as i32),
                        Arg::I32(m.rows as i32),
                        Arg::I32(m.cols as i32),
                        Arg::I32(m.row_bytes as i32),
                        self.a(x),
                        self.a(out),
                        Arg::I32(n as i32),
                    ],
                )?;
                i += 1;
                continue;
            }
            let kernel = Kernel::matmul_q(m.ty).ok_or_else(|| CudaError::UnsupportedType(m.ty, m.name.clone()))?;
            let run: Vec<(&Mat<D>, &D::Buffer)> =
                jobs[i..].iter().take(3).take_while(|(o, _)| o.ty == m.ty && o.cols == m.cols).copied().collect();
            i += run.len();
            let mut args = Vec::with_capacity(15);
            let mut total = 0;
            for k in 0..3 {
                match run.get(k) {
                    Some((w, o)) => {
                        args.extend([self.a(&w.buf), self.a(o), Arg::I32(w.rows as i32)]);
                        total += w.rows;
                    }
                    None => args.extend([Arg::Ptr(0), Arg::Ptr(0), Arg::I32(0)]),
                }
            }
            args.push(Arg::I32(m.cols as i32));
            args.extend(self.act_args(act));
            args.push(Arg::I32(n as i32));
            self.launch(kernel, Shape::new((blocks(total, 4), blocks(n, 4)), TPB), &args)?;
        }
        Ok(())
    }

    /// Residual add (when `add` is given, RMS-normed first with `add_w` when that is
    /// given), RMSNorm into `xn` and its quantization into `act`, for `n` rows of width
    /// `cols`: input row `idx[j]` for output row `j` when `idx` is given.
    #[allow(clippy::too_many_arguments)]
    fn add_norm_quant(
        &self,
        s: &Scratch<D>,
        add: Option<&D::Buffer>,
        add_w: Option<&D::Buffer>,
        idx: Option<Arg>,
        w: &D::Buffer,
        cols: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let mut args = vec![
            self.a(&s.x),
            add.map_or(Arg::Ptr(0), |b| self.a(b)),
            add_w.map_or(Arg::Ptr(0), |b| self.a(b)),
            idx.unwrap_or(Arg::Ptr(0)),
            self.a(w),
            self.a(&s.xn),
        ];
        args.extend(self.act_args(&s.act));
        args.extend([Arg::I32(cols as i32), Arg::I32(n as i32), Arg::F32(eps)]);
        self.launch(Kernel::AddNormQuant, Shape::new((blocks(n, 4), 1), TPB), &args)
    }

    /// The gated FFN's first half: `g = act(gate · xn) * (up · xn)` and its quantization
    /// into `act_ffn` for the down projection. One fused launch when gate and up share
    /// a quantized type; otherwise the products, then `glu_quant`.
    fn gate_up_glu(&self, s: &Scratch<D>, l: &LayerW<D>, ff: usize, n: usize, act: i32) -> Result<(), CudaError> {
        let fused = (l.gate.ty == l.up.ty).then(|| Kernel::matmul_glu(l.gate.ty)).flatten();
        if let Some(kernel) = fused {
            let mut args = vec![
                self.a(&l.gate.buf),
                self.a(&l.up.buf),
                self.a(&s.g),
                Arg::I32(ff as i32),
                Arg::I32(l.gate.cols as i32),
            ];
            args.extend(self.act_args(&s.act));
            args.extend([Arg::I32(n as i32), Arg::I32(act)]);
            args.extend(self.act_args(&s.act_ffn));
            // 32 warps per block: one quantization block of 32 outputs.
            return self.launch(kernel, Shape::new(((ff / 32) as u32, blocks(n, 4)), 1024), &args);
        }
        self.matmul(&s.act, &[(&l.gate, &s.g), (&l.up, &s.u)], &s.xn, n)?;
        let nb = n * ff / 32;
        let mut args = vec![self.a(&s.g), self.a(&s.u)];
        args.extend(self.act_args(&s.act_ffn));
        args.extend([Arg::I32(nb as i32), Arg::I32(act)]);
        self.launch(Kernel::GluQuant, Shape::new((blocks(nb, 4), 1), TPB), &args)
    }

    /// Queue the whole pass for `n` staged rows, `n_last` of which want logits. What
    /// differs between architectures comes from the uploaded weights and their plan.
    fn encode(
        &self,
        hp: &crate::Hparams,
        w: &Weights<D>,
        s: &Scratch<D>,
        n: usize,
        n_last: usize,
    ) -> Result<(), CudaError> {
        let (d, ff, hd, qd) = (hp.n_embd, hp.n_ff, hp.head_dim, hp.q_dim());
        let half = hp.rope_dim / 2;
        let st = self.dev.addr(&s.staging);
        let at = |off: usize| Arg::Ptr(st + off as u64);
        let ni = Arg::I32(n as i32);
        let eps = hp.rms_eps;
        self.launch(
            Kernel::Embed,
            Shape::new((blocks(d, TPB as usize), n as u32), TPB),
            &[
                self.a(&w.embed.buf),
                Arg::I32(w.embed.ty.to_u32() as i32),
                Arg::I32(w.embed.row_bytes as i32),
                at(STAGING.tokens),
                self.a(&s.x),
                Arg::I32(d as i32),
                ni,
                // Gemma's embedding scale, in the same launch.
                Arg::I32(i32::from(w.plan.embd_scale.is_some())),
                Arg::F32(w.plan.embd_scale.unwrap_or(1.0)),
            ],
        )?;
        // attention quantizes its own output when each warp holds whole blocks of 32.
        let attn_quantizes = hd.is_multiple_of(32);
        for (li, l) in w.layers.iter().enumerate() {
            // The previous layer's FFN output (post-normed, for Gemma) joins the residual
            // stream here.
            let prev = li.checked_sub(1).map(|p| &w.layers[p]);
            let post = prev.and_then(|p| p.post_ffn_norm.as_ref());
            self.add_norm_quant(s, prev.map(|_| &s.down), post, None, &l.attn_norm, d, n, eps)?;
            self.matmul(&s.act, &[(&l.wq, &s.q), (&l.wk, &s.k), (&l.wv, &s.v)], &s.xn, n)?;
            let (table, window) = match (l.local, &w.rope_local) {
                (true, Some(t)) => (t, hp.sliding_window),
                _ => (&w.rope, 0),
            };
            // QK-norm, RoPE, the cache append and attention: one launch.
            let (q_norm, k_norm) = match (&l.q_norm, &l.k_norm) {
                (Some(qn), Some(kn)) => (self.a(qn), self.a(kn)),
                _ => (Arg::Ptr(0), Arg::Ptr(0)),
            };
            let attention = |quant: &[Arg; 3]| {
                let mut args = vec![
                    self.a(&s.q),
                    at(STAGING.kptr),
                    at(STAGING.vptr),
                    at(STAGING.cap),
                    at(STAGING.pos),
                    self.a(&s.attn),
                    self.a(&s.scores),
                    Arg::I32(li as i32),
                    Arg::I32(hp.n_head as i32),
                    Arg::I32(hp.n_head_kv as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(hp.n_ctx as i32),
                    Arg::F32(hp.attn_scale),
                    // 0: every position so far (a window wider than i32 means the same).
                    Arg::I32(i32::try_from(window).unwrap_or(0)),
                ];
                args.extend(quant);
                args.extend([
                    self.a(&s.k),
                    self.a(&s.v),
                    at(STAGING.run),
                    self.a(table),
                    Arg::I32(half as i32),
                    Arg::I32(i32::from(w.plan.neox)),
                    q_norm,
                    k_norm,
                    Arg::F32(eps),
                    Arg::I32(self.shared_scores as i32),
                ]);
                self.launch(Kernel::Attention, Shape::new((hp.n_head as u32, n as u32), ATTN_THREADS as u32), &args)
            };
            let [aq, ad, asum] = self.act_args(&s.act);
            let none = Arg::Ptr(0);
            if attn_quantizes {
                attention(&[aq, ad, asum])?;
            } else {
                attention(&[none, none, none])?;
                self.quantize(&s.attn, &s.act, qd, n)?;
            }
            self.matmul(&s.act, &[(&l.wo, &s.o)], &s.attn, n)?;
            // The attention output (post-normed, for Gemma) joins the residual stream.
            self.add_norm_quant(s, Some(&s.o), l.post_attn_norm.as_ref(), None, &l.ffn_norm, d, n, eps)?;
            self.gate_up_glu(s, l, ff, n, w.plan.act)?;
            self.matmul(&s.act_ffn, &[(&l.down, &s.down)], &s.g, n)?;
        }
        if n_last == 0 {
            // Nothing reads the residual stream after the last layer's caches are written.
            return Ok(());
        }
        // The last layer's output joins the residual stream, only in the rows whose
        // logits are wanted, gathered and normed in the same launch.
        let last = w.layers.last();
        self.add_norm_quant(
            s,
            last.map(|_| &s.down),
            last.and_then(|l| l.post_ffn_norm.as_ref()),
            Some(at(STAGING.idx)),
            &w.output_norm,
            d,
            n_last,
            eps,
        )?;
        self.matmul(&s.act, &[(w.output(), &s.logits)], &s.xn, n_last)
    }

    /// One forward pass. With `sample`, the rows that want logits are sampled on the
    /// device (`sample[i]` for item `i`) and only their ids come back (the second
    /// result); without it, their logits do (the first).
    fn forward_inner(
        &self,
        model: &Model,
        batch: &mut [BatchItem<'_>],
        sample: Option<&[(&SamplingParams, u64)]>,
    ) -> Result<(Vec<Vec<f32>>, Vec<u32>), ModelError> {
        let rows = plan_rows(model, batch)?;
        // One pass at a time, from the first allocation to the last copy: the stream is
        // shared, and nothing may touch it from another thread while a graph is captured.
        let mut models = self.models.lock().map_err(|_| poisoned())?;
        let out = self.pass(&mut models, model, batch, &rows, sample);
        if out.is_err() {
            self.fence_after_error();
        }
        out
    }

    /// After a failed pass or upload, wait for whatever it queued (still under the lock,
    /// so no graph is being captured). Frees go to another stream that does not wait
    /// for the compute stream: without this, a sequence the caller drops now could have
    /// its cache freed and handed out again while queued kernels still read it. A
    /// successful pass ends with a download, which waits the same way.
    fn fence_after_error(&self) {
        if let Err(e) = self.dev.synchronize() {
            tracing::warn!(error = %e, "could not wait for a failed pass's queued work");
        }
    }

    fn pass(
        &self,
        models: &mut HashMap<[u8; 32], ModelState<D>>,
        model: &Model,
        batch: &mut [BatchItem<'_>],
        rows: &[(usize, usize, u32)],
        sample: Option<&[(&SamplingParams, u64)]>,
    ) -> Result<(Vec<Vec<f32>>, Vec<u32>), ModelError> {
        let hp = &model.hp;
        let ms = self.state(models, model)?;
        for it in batch.iter_mut() {
            let need = it.seq.pos + it.tokens.len();
            self.ensure_cache(model, it.seq, need)?;
        }
        // Per-item cache addresses and capacities.
        let caches: Vec<(u64, u64, i32)> = batch
            .iter()
            .map(|it| {
                let c = it
                    .seq
                    .device
                    .as_ref()
                    .and_then(|b| (b.as_ref() as &dyn Any).downcast_ref::<KvCache<D>>())
                    .ok_or(CudaError::ForeignSequence)?;
                Ok((self.dev.addr(&c.k), self.dev.addr(&c.v), c.cap as i32))
            })
            .collect::<Result<_, CudaError>>()?;
        let decode = self.use_graphs
            && batch.len() <= GRAPH_MAX_ROWS.min(self.max_rows)
            && batch.iter().all(|it| it.tokens.len() == 1);
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
        let mut ids: Vec<u32> = vec![0; if sample.is_some() { batch.len() } else { 0 }];
        let mut last_of: Vec<usize> = vec![0; batch.len()];
        let mut r0 = 0;
        for (i, it) in batch.iter().enumerate() {
            r0 += it.tokens.len();
            last_of[i] = r0 - 1;
        }
        for (c, chunk) in rows.chunks(self.max_rows).enumerate() {
            let base = c * self.max_rows;
            let n = chunk.len();
            let mut staging = vec![0u8; STAGING.bytes];
            let mut wants = Vec::new();
            // Where each item's rows of this pass begin (plan_rows keeps them together).
            let mut run_of: HashMap<usize, i32> = HashMap::new();
            for (j, &(i, pos, tok)) in chunk.iter().enumerate() {
                let run = *run_of.entry(i).or_insert(j as i32);
                staging[STAGING.run + 4 * j..][..4].copy_from_slice(&run.to_le_bytes());
                let (kp, vp, cap) = caches[i];
                staging[STAGING.kptr + 8 * j..][..8].copy_from_slice(&kp.to_le_bytes());
                staging[STAGING.vptr + 8 * j..][..8].copy_from_slice(&vp.to_le_bytes());
                staging[STAGING.cap + 4 * j..][..4].copy_from_slice(&cap.to_le_bytes());
                staging[STAGING.pos + 4 * j..][..4].copy_from_slice(&(pos as i32).to_le_bytes());
                staging[STAGING.tokens + 4 * j..][..4].copy_from_slice(&tok.to_le_bytes());
                if last_of[i] == base + j {
                    staging[STAGING.idx + 4 * wants.len()..][..4].copy_from_slice(&(j as i32).to_le_bytes());
                    wants.push(i);
                }
            }
            self.dev.upload(self.dev.addr(&ms.s.staging), &staging)?;
            let n_last = wants.len();
            if decode {
                if !ms.graphs.contains_key(&n) {
                    self.dev.begin_capture()?;
                    let queued = self.encode(hp, &ms.w, &ms.s, n, n_last);
                    let graph = self.dev.end_capture();
                    queued?;
                    ms.graphs.insert(n, graph?);
                    if let Ok(mut st) = self.stats.lock() {
                        st.captured += 1;
                    }
                }
                let graph = ms.graphs.get(&n).ok_or(CudaError::Driver { call: "graph", reason: "missing".into() })?;
                self.dev.replay(graph)?;
                if let Ok(mut st) = self.stats.lock() {
                    st.replayed += 1;
                }
            } else {
                self.encode(hp, &ms.w, &ms.s, n, n_last)?;
                if let Ok(mut st) = self.stats.lock() {
                    st.direct_passes += 1;
                }
            }
            if let (false, Some(params)) = (wants.is_empty(), sample) {
                let rows: Vec<(&SamplingParams, u64)> = wants.iter().map(|&i| params[i]).collect();
                let at = self.dev.addr(&ms.s.logits);
                let sc = match &mut ms.sampler {
                    Some(sc) => sc,
                    None => ms.sampler.insert(self.sampler_scratch(hp.n_vocab)?),
                };
                for (&i, id) in wants.iter().zip(self.sample_on_device(sc, at, &rows)?) {
                    ids[i] = id;
                }
            } else if !wants.is_empty() {
                let mut out = vec![0.0f32; wants.len() * hp.n_vocab];
                self.dev.download(self.dev.addr(&ms.s.logits), bytes_of_mut(&mut out))?;
                // The GPU's NaN is not the CPU's: one pattern leaves every backend.
                crate::math::canonicalize_nans(&mut out);
                for (k, &i) in wants.iter().enumerate() {
                    logits[i] = out[k * hp.n_vocab..(k + 1) * hp.n_vocab].to_vec();
                }
            }
        }
        for it in batch.iter_mut() {
            it.seq.pos += it.tokens.len();
        }
        Ok((logits, ids))
    }

    fn sampler_scratch(&self, vocab: usize) -> Result<SamplerScratch<D>, CudaError> {
        if vocab == 0 || i32::try_from(vocab).is_err() {
            return Err(CudaError::UnsupportedShape(format!("a vocabulary of {vocab} tokens for the device sampler")));
        }
        Ok(SamplerScratch {
            vocab,
            staging: self.dev.alloc(SAMPLE_STAGING_BYTES)?,
            keys: self.dev.alloc(SAMPLE_ROWS * 2 * vocab * 4)?,
            aux: self.dev.alloc(SAMPLE_ROWS * SAMPLE_AUX_WORDS * 4)?,
            words: Vec::with_capacity(MAX_ROWS * SAMPLE_WORDS),
        })
    }

    /// Choose a token for each of `params.len()` (at most [`MAX_ROWS`]) rows of logits
    /// at device address `logits`, with the `sample_rows` kernel; only the ids are
    /// copied back.
    fn sample_on_device(
        &self,
        sc: &mut SamplerScratch<D>,
        logits: u64,
        params: &[(&SamplingParams, u64)],
    ) -> Result<Vec<u32>, CudaError> {
        let rows = params.len();
        if rows > MAX_ROWS {
            return Err(CudaError::UnsupportedShape(format!(
                "{rows} rows for the device sampler (at most {MAX_ROWS})"
            )));
        }
        let vocab = sc.vocab;
        sc.words.clear();
        for &(p, step) in params {
            sc.words.extend(sample_words(p, step, vocab));
        }
        let st = self.dev.addr(&sc.staging);
        let ids_at = st + SAMPLE_IDS_OFFSET as u64;
        self.dev.upload(st, bytes_of(&sc.words))?;
        // The keys and aux scratch hold SAMPLE_ROWS rows: groups run one after another
        // on the stream.
        for g in (0..rows).step_by(SAMPLE_ROWS) {
            let n = SAMPLE_ROWS.min(rows - g);
            self.launch(
                Kernel::SampleRows,
                Shape::new((n as u32, 1), SAMPLE_TPB as u32),
                &[
                    Arg::Ptr(logits + (g * vocab * 4) as u64),
                    Arg::Ptr(st + (g * SAMPLE_WORDS * 4) as u64),
                    Arg::Ptr(ids_at + (g * 4) as u64),
                    self.a(&sc.keys),
                    self.a(&sc.aux),
                    Arg::I32(vocab as i32),
                    Arg::I32(n as i32),
                ],
            )?;
        }
        let mut ids = vec![0u32; rows];
        self.dev.download(ids_at, bytes_of_mut(&mut ids))?;
        // The kernel always writes an id; anything else is a device fault.
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(CudaError::Launch {
                kernel: Kernel::SampleRows.name(),
                reason: format!("chose token {bad} of a vocabulary of {vocab}"),
            });
        }
        Ok(ids)
    }

    /// Diagnostics for a device-only sampler fault: one row sampled alone, with the id
    /// and the row's `aux` scratch as the kernel left it (16 radix counts per thread, then
    /// the slots).
    #[doc(hidden)]
    pub fn sample_row_scratch(
        &self,
        row: &[f32],
        params: (&SamplingParams, u64),
    ) -> Result<(u32, Vec<u32>), CudaError> {
        let vocab = row.len();
        let mut sc = self.sampler_scratch(vocab)?;
        let buf = self.dev.alloc(vocab * 4)?;
        self.dev.upload(self.dev.addr(&buf), bytes_of(row))?;
        let id = self.sample_on_device(&mut sc, self.dev.addr(&buf), &[params]).or_else(|e| match e {
            CudaError::Launch { .. } => Ok(vec![u32::MAX]),
            e => Err(e),
        })?;
        let mut aux = vec![0u32; SAMPLE_AUX_WORDS];
        self.dev.download(self.dev.addr(&sc.aux), bytes_of_mut(&mut aux))?;
        Ok((id[0], aux))
    }

    /// Choose a token for each row of `logits` (`params.len()` rows of `vocab`) with the
    /// device sampler, as [`Backend::forward_sample`] does after a pass: the tests hold
    /// it to [`sampling::sample`]; tools can time it.
    pub fn sample_logits(
        &self,
        logits: &[f32],
        vocab: usize,
        params: &[(&SamplingParams, u64)],
    ) -> Result<Vec<u32>, KernelError> {
        let items = logits.len().checked_div(vocab).unwrap_or(0);
        if items * vocab != logits.len() {
            return Err(sampling::SamplingError::BatchMismatch { params: params.len(), items }.into());
        }
        sampling::validate_batch(items, params)?;
        let mut sc = self.sampler_scratch(vocab).map_err(ModelError::from)?;
        let buf = self.dev.alloc(items.min(MAX_ROWS) * vocab * 4).map_err(ModelError::from)?;
        let mut ids = Vec::with_capacity(items);
        for (rows, ps) in logits.chunks(MAX_ROWS * vocab).zip(params.chunks(MAX_ROWS)) {
            self.dev.upload(self.dev.addr(&buf), bytes_of(rows)).map_err(ModelError::from)?;
            ids.extend(self.sample_on_device(&mut sc, self.dev.addr(&buf), ps).map_err(ModelError::from)?);
        }
        Ok(ids)
    }
}

/// Threads of the sampler's block (one block per row): a multiple of 32, at most 1024.
const SAMPLE_TPB: usize = 512;
/// Rows whose sorting scratch the sampler holds at once; more take several launches.
const SAMPLE_ROWS: usize = 32;
/// Words of parameters per row (sampling.cu `sample_rows`).
const SAMPLE_WORDS: usize = 8;
/// Words of `aux` scratch per row: 16 radix counts per thread and 64 slots (sampling.cu).
const SAMPLE_AUX_WORDS: usize = 16 * SAMPLE_TPB + 64;
/// The sampler's one staging buffer: every row's parameters, then every row's id.
const SAMPLE_IDS_OFFSET: usize = MAX_ROWS * SAMPLE_WORDS * 4;
const SAMPLE_STAGING_BYTES: usize = SAMPLE_IDS_OFFSET + MAX_ROWS * 4;

/// The device sampler's memory for rows of `vocab` logits.
struct SamplerScratch<D: Device> {
    vocab: usize,
    staging: D::Buffer,
    /// 2 * vocab words per row: the candidates' codes and the radix sort's other half.
    keys: D::Buffer,
    aux: D::Buffer,
    /// The parameter words on the host, reused between steps.
    words: Vec<u32>,
}

/// `sample_rows`' parameter words for one row: the host sampler's decisions that
/// depend only on the parameters and the vocabulary size are made here, as it makes
/// them (greedy when the temperature is 0 or there is at most one token; top_k only
/// when it is in (0, vocab)).
fn sample_words(p: &SamplingParams, step: u64, vocab: usize) -> [u32; SAMPLE_WORDS] {
    let greedy = p.temperature == 0.0 || vocab <= 1;
    let k = if p.top_k > 0 && p.top_k < vocab { p.top_k } else { vocab };
    [
        u32::from(greedy),
        p.temperature.to_bits(),
        // vocab fits an i32 (sampler_scratch), so k does too.
        k as u32,
        p.top_p.to_bits(),
        p.seed as u32,
        (p.seed >> 32) as u32,
        step as u32,
        (step >> 32) as u32,
    ]
}

fn poisoned() -> CudaError {
    CudaError::Driver { call: "lock", reason: "a previous pass panicked".into() }
}

impl<D: Device> Backend for CudaBackend<D> {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device(&self) -> String {
        let (a, b) = self.dev.compute_capability();
        format!("{} (compute {a}.{b})", self.dev.name())
    }

    fn device_status(&self) -> Option<DeviceStatus> {
        let (a, b) = self.dev.compute_capability();
        let (free, total) = self.dev.memory().unwrap_or((0, 0));
        Some(DeviceStatus {
            name: self.dev.name(),
            compute_capability: format!("{a}.{b}"),
            memory_total_bytes: total,
            memory_free_bytes: free,
        })
    }

    fn forward(&self, model: &Model, batch: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_inner(model, batch, None).map(|(logits, _)| logits)
    }

    /// Samples on the device right after the logits; only the ids are copied back.
    fn forward_sample(
        &self,
        model: &Model,
        batch: &mut [BatchItem<'_>],
        params: &[(&SamplingParams, u64)],
    ) -> Result<Vec<u32>, KernelError> {
        sampling::validate_batch(batch.len(), params)?;
        Ok(self.forward_inner(model, batch, Some(params)).map(|(_, ids)| ids)?)
    }
}

/// What a passing known-answer test checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KnownAnswer {
    pub logits_compared: usize,
    /// blake3 of every compared logit's bits, in order (the same on every good device).
    pub digest: String,
}

/// The known-answer self-test, on `backend` and on the CPU reference; every logit must
/// be the same bits. A device that fails must not serve. It runs the paths a server
/// runs: a batched prefill of five prompts, one of at least 70 tokens (attention's
/// second pass of 32 lanes, positions past 64) and one of 63 (its cache, 64 positions,
/// must grow during decoding); two decode steps of the five (a graph captured, then
/// replayed); two decode steps of the long one alone (the batch-of-1 graph a server
/// decoding one stream replays at every step).
pub fn known_answer_test(backend: &dyn Backend, model: &Model) -> Result<KnownAnswer, CudaError> {
    // The host's arithmetic is half the comparison: sampling and the CPU reference
    // assume IEEE subnormals.
    crate::fpenv::check()?;
    // The reference's thread count does not change its bits, only how long this takes.
    let cpu = CpuBackend::new(0).map_err(|e| CudaError::SelfTest(e.to_string()))?;
    let vocab = model.hp.n_vocab as u64;
    let tok = |i: u64| ((i * 7919 + 13) % vocab) as u32;
    // Room for the prompts and four decode steps, in a model of any context length.
    let fit = |n: usize| n.min(model.hp.n_ctx.saturating_sub(4)).max(1);
    let lens = [fit(72), fit(63), 7, 3, 1].map(fit);
    let mut next = 0u64;
    let mut take = |n: usize| -> Vec<u32> {
        next += n as u64;
        (next - n as u64..next).map(tok).collect()
    };
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| take(n)).collect();
    let mut steps: Vec<Vec<Vec<u32>>> = vec![prompts];
    for _ in 0..2 {
        steps.push((0..5).map(|_| take(1)).collect());
    }
    for _ in 0..2 {
        steps.push(vec![take(1)]);
    }
    let mut seqs: [Vec<Sequence>; 2] = std::array::from_fn(|_| (0..5).map(|_| Sequence::new(model)).collect());
    let mut digest = blake3::Hasher::new();
    let mut compared = 0;
    for (step, tokens) in steps.iter().enumerate() {
        let mut out = Vec::new();
        for (which, b) in [&cpu as &dyn Backend, backend].into_iter().enumerate() {
            let mut batch: Vec<BatchItem<'_>> =
                seqs[which].iter_mut().zip(tokens).map(|(seq, t)| BatchItem { seq, tokens: t }).collect();
            out.push(b.forward(model, &mut batch).map_err(|e| CudaError::SelfTest(format!("step {step}: {e}")))?);
        }
        for (item, (want, got)) in out[0].iter().zip(&out[1]).enumerate() {
            if want.len() != got.len() {
                return Err(CudaError::SelfTest(format!(
                    "step {step}, sequence {item}: {} logits, want {}",
                    got.len(),
                    want.len()
                )));
            }
            if let Some(i) = (0..want.len()).find(|&i| want[i].to_bits() != got[i].to_bits()) {
                return Err(CudaError::SelfTest(format!(
                    "step {step}, sequence {item} (position {}): logit {i} is {} on the device, {} on the CPU",
                    seqs[1][item].pos - 1,
                    got[i],
                    want[i]
                )));
            }
            for v in got {
                digest.update(&v.to_bits().to_le_bytes());
            }
            compared += got.len();
        }
    }
    Ok(KnownAnswer { logits_compared: compared, digest: digest.finalize().to_hex()[..16].to_owned() })
}

impl From<CudaError> for ModelError {
    fn from(e: CudaError) -> Self {
        ModelError::Device(e.to_string())
    }
}

/// A CUDA backend on the GPU, its kernels built (or loaded from the PTX cache).
pub type GpuBackend = CudaBackend<super::driver::CudarcDevice>;

impl GpuBackend {
    pub fn open(opts: &super::driver::CudaOptions) -> Result<Arc<Self>, CudaError> {
        // Sampling and the host-side tables run on the host's floats.
        crate::fpenv::check()?;
        Ok(Arc::new(Self::new(super::driver::CudarcDevice::open(opts)?)))
    }
}
