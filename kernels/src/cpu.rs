//! The CPU backend: the forward pass over a batch of sequences.
//!
//! Work is split across threads by output feature (matrix rows) and by attention
//! head; every output value is computed whole by one thread with the canonical order
//! of `math`/`quant`, so results do not depend on the thread count or on which other
//! sequences share the batch.

use rayon::prelude::*;

use crate::arch::{Activation, RopePairs};
use crate::math::{dot_f32, dot_f32_rows_scaled, gelu_mul, rms_norm, silu_mul, softmax, weighted_rows};
use crate::model::{Matrix, Model, ModelError};
use crate::quant::{
    ActScales, Q8Act, QK, RowPrep, WIDE, WideRows, dequantize_row, dot_row_each, dot_row_scaled, dot_rows,
    dot_rows_wide, quantize_act, scales_stride, wide_supported,
};

thread_local! {
    /// Set while a one-thread backend runs a pass on its caller's thread: the parallel
    /// loops below then run in order where they are, with no pool to hand each pass to
    /// (a wake-up and a switch each way) and no idle worker spinning after it.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with this thread's parallel loops in order on this thread. Each output is
/// still computed whole, in the canonical order, so the bits are those of any pool.
pub(crate) fn serially<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _reset = Reset(SERIAL.with(|s| s.replace(true)));
    f()
}

fn serial() -> bool {
    SERIAL.with(std::cell::Cell::get)
}

/// `items.par_iter().for_each_init(init, body)`, or in order on this thread.
fn each_init<T: Sync, S>(items: &[T], init: impl Fn() -> S + Sync + Send, body: impl Fn(&mut S, &T) + Sync + Send) {
    each_index_init(items.len(), init, |state, i| body(state, &items[i]));
}

/// `(0..n).into_par_iter().for_each_init(init, body)`, or in order on this thread.
fn each_index_init<S>(n: usize, init: impl Fn() -> S + Sync + Send, body: impl Fn(&mut S, usize) + Sync + Send) {
    if serial() {
        let mut state = init();
        (0..n).for_each(|i| body(&mut state, i));
    } else {
        (0..n).into_par_iter().for_each_init(init, body);
    }
}

/// One sequence's state: its KV cache (f32, per layer; on the device for a device
/// backend) and how many tokens it holds.
#[derive(Default)]
pub struct Sequence {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    /// A device backend's cache for this sequence, freed with it.
    pub(crate) device: Option<Box<dyn std::any::Any + Send + Sync>>,
    pub pos: usize,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence").field("pos", &self.pos).field("on_device", &self.device.is_some()).finish()
    }
}

impl Sequence {
    pub fn new(model: &Model) -> Self {
        Self { k: vec![Vec::new(); model.hp.n_layer], v: vec![Vec::new(); model.hp.n_layer], device: None, pos: 0 }
    }

    /// Forget everything after `pos` tokens (to reuse a prompt prefix).
    pub fn truncate(&mut self, pos: usize, kv_dim: usize) {
        if pos < self.pos {
            for l in self.k.iter_mut().chain(self.v.iter_mut()) {
                l.truncate(pos * kv_dim);
            }
            self.pos = pos;
        }
    }

    /// A new sequence holding this one's first `n` tokens: their keys and values
    /// copied. Every position's keys and values depend on the tokens up to it alone (the
    /// determinism contract), so another prompt that starts with the same `n` tokens
    /// may go on from it and get the bits it would get from scratch. `None` when the
    /// cache lives on a device or holds fewer than `n` tokens.
    pub fn fork_prefix(&self, n: usize) -> Option<Sequence> {
        if self.device.is_some() || n > self.pos {
            return None;
        }
        let cut = |l: &Vec<f32>| l[..l.len() / self.pos.max(1) * n].to_vec();
        Some(Sequence {
            k: self.k.iter().map(cut).collect(),
            v: self.v.iter().map(cut).collect(),
            device: None,
            pos: n,
        })
    }

    pub fn kv_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.capacity() * 4).sum()
    }
}

/// Activations in both forms a matrix product may need, and the quantized form's
/// block scales and sums laid out for the multi-row kernels.
struct Act {
    f: Vec<f32>,
    q: Vec<Q8Act>,
    sc: ActScales,
    cols: usize,
}

impl Act {
    fn new(f: Vec<f32>, cols: usize) -> Self {
        let rows = f.len() / cols;
        let mut q = Vec::new();
        if rows >= BATCHED_MIN_ROWS && cols >= QK && cols.is_multiple_of(QK) {
            // Each row's blocks on their own (the same bits as one call), rows in parallel.
            q.resize(f.len() / QK, Q8Act::default());
            let each = |tmp: &mut Vec<Q8Act>, (qr, fr): (&mut [Q8Act], &[f32])| {
                quantize_act(fr, tmp);
                qr.copy_from_slice(tmp);
            };
            if serial() {
                let mut tmp = Vec::new();
                q.chunks_mut(cols / QK).zip(f.chunks(cols)).for_each(|rows| each(&mut tmp, rows));
            } else {
                q.par_chunks_mut(cols / QK).zip(f.par_chunks(cols)).for_each_init(Vec::new, each);
            }
        } else {
            quantize_act(&f, &mut q);
        }
        let sc = ActScales::new(&q, cols / QK);
        Self { f, q, sc, cols }
    }
    fn rows(&self) -> usize {
        self.f.len() / self.cols
    }
}

/// Raw pointer that threads write disjoint elements through.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each index is written by exactly one task (disjoint row ranges).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, so closures capture the whole (Send) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows of a weight matrix each task computes: small enough to balance two cores,
/// large enough that scheduling is noise.
const ROWS_PER_TASK: usize = 32;

/// From this many activation rows on, a quantized weight row is unpacked once and
/// dotted with all of them ([`dot_rows`]); a decode step (one row) reads it directly.
/// Either way the bits are the same.
const BATCHED_MIN_ROWS: usize = 2;

/// Activation rows per tile of a batched product: a tile's quantized activations stay
/// in cache while a task's weight rows pass over them.
const ROW_TILE: usize = 64;

/// Every weight matrix the wide kernel takes, laid out for it ([`WideRows`]), by its
/// offset in the file: pieces of [`PREPARE_ROWS_PER_TASK`] rows, made in parallel and
/// kept as made (no copy, so no peak of twice the size).
pub(crate) struct Prepared(std::collections::HashMap<usize, Vec<WideRows>>);

/// Rows per piece of a prepared matrix.
const PREPARE_ROWS_PER_TASK: usize = 2048;

// A task's and a piece's rows start on a group of the wide kernel.
const _: () = assert!(ROWS_PER_TASK.is_multiple_of(WIDE) && PREPARE_ROWS_PER_TASK.is_multiple_of(ROWS_PER_TASK));

impl Prepared {
    /// `parallel`: over the current rayon pool. Never inside the `OnceLock`'s
    /// initializer: a worker waiting in a parallel loop may steal another forward pass
    /// of the same model, whose `get_or_init` on this thread would then wait for itself.
    fn build(model: &Model, parallel: bool) -> Self {
        let t0 = std::time::Instant::now();
        let built = Self::build_within_budget(model, parallel);
        tracing::info!(
            bytes = built.bytes(),
            ms = t0.elapsed().as_millis() as u64,
            "prepared the batched kernel's weight rows"
        );
        built
    }

    fn build_within_budget(model: &Model, parallel: bool) -> Self {
        let bytes = model.bytes();
        let mut mats: Vec<&Matrix> = model
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain(std::iter::once(&model.output))
            .filter(|w| wide_supported(w.ty) && w.cols.is_multiple_of(QK))
            .collect();
        mats.sort_by_key(|w| w.offset);
        mats.dedup_by_key(|w| w.offset);
        let need: usize = mats.iter().map(|w| WideRows::bytes_for(w.ty, w.rows, w.cols / QK)).sum();
        if need > model.prepared_budget.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(need, "prepared weight rows over budget: batched passes lay them out each time");
            return Self(std::collections::HashMap::new());
        }
        let pieces: Vec<(usize, usize)> = mats
            .iter()
            .enumerate()
            .flat_map(|(m, w)| (0..w.rows).step_by(PREPARE_ROWS_PER_TASK).map(move |o| (m, o)))
            .collect();
        let piece = |&(m, lo): &(usize, usize)| {
            let w = mats[m];
            let hi = (lo + PREPARE_ROWS_PER_TASK).min(w.rows);
            let rows = &bytes[w.offset + lo * w.row_bytes..w.offset + hi * w.row_bytes];
            WideRows::new(w.ty, rows, w.row_bytes, w.cols / QK)
        };
        // `collect` keeps the order of `pieces`: each matrix's pieces in row order.
        let done: Vec<WideRows> =
            if parallel { pieces.par_iter().map(piece).collect() } else { pieces.iter().map(piece).collect() };
        let mut by_offset: std::collections::HashMap<usize, Vec<WideRows>> = std::collections::HashMap::new();
        for (&(m, _), p) in pieces.iter().zip(done) {
            by_offset.entry(mats[m].offset).or_default().push(p);
        }
        Self(by_offset)
    }

    /// `w`'s rows, if `w` was prepared (every row of it, then).
    fn matrix(&self, w: &Matrix) -> Option<&[WideRows]> {
        self.0.get(&w.offset).map(Vec::as_slice).filter(|p| p.len() == w.rows.div_ceil(PREPARE_ROWS_PER_TASK))
    }

    /// Bytes held by every prepared matrix.
    pub(crate) fn bytes(&self) -> usize {
        self.0.values().flatten().map(WideRows::bytes).sum()
    }
}

/// `model`'s prepared weight rows (within its budget), made here if not made yet — on
/// this thread alone (see [`Prepared::build`]).
pub(crate) fn prepare(model: &Model) -> &Prepared {
    model.prepared.get_or_init(|| Prepared::build(model, false))
}

/// Make `model`'s prepared weight rows over the current pool, unless made already; a
/// pass that needs them meanwhile makes its own (one of the two is kept).
pub(crate) fn warm(model: &Model) {
    if model.prepared.get().is_none() {
        let _ = model.prepared.set(Prepared::build(model, !serial()));
    }
}

/// `out_m[r * w.rows + o] = W_m[o] · x[r]` for several matrices sharing one input,
/// in one parallel region.
fn matmul_many(model: &Model, x: &Act, jobs: &mut [(&Matrix, &mut Vec<f32>)]) {
    let bytes = model.bytes();
    // One row (a decode step of one sequence) reads the file's blocks directly.
    let prepared = (x.rows() >= BATCHED_MIN_ROWS).then(|| prepare(model));
    let n = x.rows();
    let nb = x.cols / QK;
    let mut tasks = Vec::new();
    for (j, (w, out)) in jobs.iter_mut().enumerate() {
        debug_assert_eq!(w.cols, x.cols);
        out.clear();
        out.resize(n * w.rows, 0.0);
        let ptr = OutPtr(out.as_mut_ptr());
        let mut o = 0;
        while o < w.rows {
            tasks.push((j, o, (o + ROWS_PER_TASK).min(w.rows), ptr));
            o += ROWS_PER_TASK;
        }
    }
    let mats: Vec<&Matrix> = jobs.iter().map(|(w, _)| &**w).collect();
    let stride = scales_stride(nb);
    each_init(
        &tasks,
        || (Vec::new(), RowPrep::default(), Vec::new()),
        |(scratch, prep, tile): &mut (Vec<f32>, RowPrep, Vec<f32>), &(j, lo, hi, ptr)| {
            let w = mats[j];
            if n >= BATCHED_MIN_ROWS && wide_supported(w.ty) {
                // WIDE weight rows at a time (laid out once and kept, or here for the
                // task) against every activation row of a tile.
                // Pieces of the kept layout and the row they start at (the task's own
                // rows make one piece: fewer than a kept piece holds).
                let own;
                let (pieces, base) = match prepared.and_then(|p| p.matrix(w)) {
                    Some(kept) => (kept, 0),
                    None => {
                        own = [WideRows::new(
                            w.ty,
                            &bytes[w.offset + lo * w.row_bytes..w.offset + hi * w.row_bytes],
                            w.row_bytes,
                            nb,
                        )];
                        (&own[..], lo)
                    }
                };
                for r0 in (0..n).step_by(ROW_TILE) {
                    let r1 = (r0 + ROW_TILE).min(n);
                    tile.resize((r1 - r0) * WIDE, 0.0);
                    for g0 in (lo..hi).step_by(WIDE) {
                        let at = g0 - base;
                        let group = pieces[at / PREPARE_ROWS_PER_TASK].group(at % PREPARE_ROWS_PER_TASK / WIDE);
                        dot_rows_wide(group, &x.q[r0 * nb..r1 * nb], x.sc.rows(r0, r1), tile);
                        let m = (hi - g0).min(WIDE);
                        for (r, vals) in (r0..r1).zip(tile.chunks_exact(WIDE)) {
                            for (i, &v) in vals[..m].iter().enumerate() {
                                // SAFETY: (r, o) pairs are disjoint across tasks and in bounds.
                                unsafe { *ptr.get().add(r * w.rows + g0 + i) = v };
                            }
                        }
                    }
                }
                return;
            }
            if w.ty.is_quantized() && n >= BATCHED_MIN_ROWS {
                for r0 in (0..n).step_by(ROW_TILE) {
                    let r1 = (r0 + ROW_TILE).min(n);
                    tile.resize(r1 - r0, 0.0);
                    let sc = x.sc.rows(r0, r1);
                    for o in lo..hi {
                        dot_rows(w.ty, w.row(bytes, o), &x.q[r0 * nb..r1 * nb], sc, prep, tile);
                        for (r, &v) in (r0..r1).zip(tile.iter()) {
                            // SAFETY: (r, o) pairs are disjoint across tasks and in bounds.
                            unsafe { *ptr.get().add(r * w.rows + o) = v };
                        }
                    }
                }
                return;
            }
            if w.ty.is_quantized() && n == 1 {
                // A decode step: the task's rows in one call.
                let rows = &bytes[w.offset + lo * w.row_bytes..w.offset + hi * w.row_bytes];
                // SAFETY: the task's outputs lo..hi of row 0 are its own and in bounds.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(lo), hi - lo) };
                dot_row_each(
                    w.ty,
                    rows,
                    w.row_bytes,
                    &x.q[..nb],
                    &x.sc.d[..stride],
                    &x.sc.s[..stride],
                    &x.sc.n[..stride],
                    out,
                );
                return;
            }
            for o in lo..hi {
                let row = w.row(bytes, o);
                for r in 0..n {
                    let v = if w.ty.is_quantized() {
                        let rs = r * stride..(r + 1) * stride;
                        let (xd, xs, xn) = (&x.sc.d[rs.clone()], &x.sc.s[rs.clone()], &x.sc.n[rs]);
                        dot_row_scaled(w.ty, row, &x.q[r * nb..(r + 1) * nb], xd, xs, xn)
                    } else {
                        scratch.resize(w.cols, 0.0);
                        dequantize_row(w.ty, row, scratch);
                        dot_f32(scratch, &x.f[r * x.cols..(r + 1) * x.cols])
                    };
                    // SAFETY: (r, o) pairs are disjoint across tasks and in bounds.
                    unsafe { *ptr.get().add(r * w.rows + o) = v };
                }
            }
        },
    );
}

/// Rotate the pairs of each head's first `rope_dim` dimensions — `(x[2i], x[2i+1])`
/// or `(x[i], x[i + rope_dim/2])`, as the architecture pairs them — by the angles of
/// `pos` in the layer's table: `(x0·c − x1·s, x0·s + x1·c)`.
fn rope(model: &Model, local: bool, x: &mut [f32], n_heads: usize, pos: usize) {
    let hd = model.hp.head_dim;
    let half = model.hp.rope_dim / 2;
    let table = if local { &model.rope_local } else { &model.rope };
    let table = &table[pos * half..(pos + 1) * half];
    for h in 0..n_heads {
        let v = &mut x[h * hd..(h + 1) * hd];
        for (i, &(c, s)) in table.iter().enumerate() {
            let (a, b) = match model.spec.rope_pairs {
                RopePairs::Adjacent => (2 * i, 2 * i + 1),
                RopePairs::Halves => (i, i + half),
            };
            let (x0, x1) = (v[a], v[b]);
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    }
}

/// RMSNorm of each `w.len()`-wide piece of `x` in place (rows of the residual width,
/// or heads for QK-norm).
fn norm_each(x: &mut [f32], w: &[f32], eps: f32, tmp: &mut Vec<f32>) {
    for piece in x.chunks_exact_mut(w.len()) {
        tmp.clear();
        tmp.extend_from_slice(piece);
        rms_norm(tmp, w, eps, piece);
    }
}

/// A sequence's share of a batch.
pub struct BatchItem<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
}

/// Rows of the flattened batch, `(item, position, token)`, after checking every item
/// (shared by every backend: the same input is refused the same way everywhere).
pub(crate) fn plan_rows(model: &Model, batch: &[BatchItem<'_>]) -> Result<Vec<(usize, usize, u32)>, ModelError> {
    let hp = &model.hp;
    let mut rows = Vec::new();
    for (i, it) in batch.iter().enumerate() {
        if it.tokens.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let end = it.seq.pos + it.tokens.len();
        if end > hp.n_ctx {
            return Err(ModelError::ContextFull { needed: end, ctx: hp.n_ctx });
        }
        for (k, &t) in it.tokens.iter().enumerate() {
            if t as usize >= hp.n_vocab {
                return Err(ModelError::TokenOutOfRange { id: t, vocab: hp.n_vocab });
            }
            rows.push((i, it.seq.pos + k, t));
        }
    }
    Ok(rows)
}

/// Run the tokens of every item through the model, appending to each sequence's
/// cache; returns the logits after the last token of each item.
pub fn forward(model: &Model, batch: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
    forward_rows(model, batch, Head::LastOfEachItem)
}

/// Run `tokens` through the model after what `seq` holds, appending to its cache;
/// returns the logits after every token, in order (teacher forcing, for replay). Each
/// row's logits are the bits a one-token decode step at that position gives.
pub fn forward_all(model: &Model, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
    forward_rows(model, &mut [BatchItem { seq, tokens }], Head::EveryRow)
}

/// Which rows the output norm and head run for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    LastOfEachItem,
    EveryRow,
}

fn forward_rows(model: &Model, batch: &mut [BatchItem<'_>], head: Head) -> Result<Vec<Vec<f32>>, ModelError> {
    let hp = &model.hp;
    let (d, kvd, hd, qd) = (hp.n_embd, hp.kv_dim(), hp.head_dim, hp.q_dim());
    let bytes = model.bytes();
    let rows = plan_rows(model, batch)?;
    if batch.iter().any(|it| it.seq.device.is_some()) {
        return Err(ModelError::Device("a sequence's cache is on a device; continue it on that backend".into()));
    }
    let n = rows.len();
    let mut x = vec![0.0f32; n * d];
    for (r, &(_, _, t)) in rows.iter().enumerate() {
        dequantize_row(model.token_embd.ty, model.token_embd.row(bytes, t as usize), &mut x[r * d..(r + 1) * d]);
    }
    if let Some(scale) = hp.embd_scale {
        for xi in &mut x {
            *xi *= scale;
        }
    }
    let mut tmp = Vec::new();
    let mut xn = vec![0.0f32; n * d];
    let (mut q, mut k, mut v, mut o, mut g, mut u, mut down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut attn = vec![0.0f32; n * qd];
    let group = hp.n_head / hp.n_head_kv;
    let scale = hp.attn_scale;
    for (li, layer) in model.layers.iter().enumerate() {
        for r in 0..n {
            rms_norm(&x[r * d..(r + 1) * d], &layer.attn_norm, hp.rms_eps, &mut xn[r * d..(r + 1) * d]);
        }
        let act = Act::new(std::mem::take(&mut xn), d);
        matmul_many(model, &act, &mut [(&layer.wq, &mut q), (&layer.wk, &mut k), (&layer.wv, &mut v)]);
        xn = act.f;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            norm_each(&mut q, qn, hp.rms_eps, &mut tmp);
            norm_each(&mut k, kn, hp.rms_eps, &mut tmp);
        }
        for (r, &(i, pos, _)) in rows.iter().enumerate() {
            rope(model, layer.local, &mut q[r * qd..(r + 1) * qd], hp.n_head, pos);
            rope(model, layer.local, &mut k[r * kvd..(r + 1) * kvd], hp.n_head_kv, pos);
            let seq = &mut *batch[i].seq;
            debug_assert_eq!(seq.k[li].len(), pos * kvd);
            seq.k[li].extend_from_slice(&k[r * kvd..(r + 1) * kvd]);
            seq.v[li].extend_from_slice(&v[r * kvd..(r + 1) * kvd]);
        }
        // Attention: one task per (row, head), over the positions the layer sees.
        let window = if layer.local { hp.sliding_window } else { usize::MAX };
        let caches: Vec<(&[f32], &[f32])> = batch.iter().map(|it| (&it.seq.k[li][..], &it.seq.v[li][..])).collect();
        let attn_ptr = OutPtr(attn.as_mut_ptr());
        each_index_init(n * hp.n_head, Vec::new, |scores: &mut Vec<f32>, task| {
            let (r, h) = (task / hp.n_head, task % hp.n_head);
            let (i, pos, _) = rows[r];
            let (kc, vc) = caches[i];
            let kh = h / group;
            let qh = &q[r * qd + h * hd..r * qd + (h + 1) * hd];
            let first = (pos + 1).saturating_sub(window);
            scores.clear();
            scores.resize(pos + 1 - first, 0.0);
            dot_f32_rows_scaled(qh, &kc[first * kvd + kh * hd..], kvd, scale, scores);
            softmax(scores);
            // SAFETY: each (r, h) task owns attn[r*qd + h*hd ..][..hd].
            let out = unsafe { std::slice::from_raw_parts_mut(attn_ptr.get().add(r * qd + h * hd), hd) };
            weighted_rows(out, scores, &vc[first * kvd + kh * hd..], kvd);
        });
        let act = Act::new(std::mem::take(&mut attn), qd);
        matmul_many(model, &act, &mut [(&layer.wo, &mut o)]);
        attn = act.f;
        if let Some(w) = &layer.post_attn_norm {
            norm_each(&mut o, w, hp.rms_eps, &mut tmp);
        }
        for (xi, oi) in x.iter_mut().zip(&o) {
            *xi += oi;
        }
        for r in 0..n {
            rms_norm(&x[r * d..(r + 1) * d], &layer.ffn_norm, hp.rms_eps, &mut xn[r * d..(r + 1) * d]);
        }
        let act = Act::new(std::mem::take(&mut xn), d);
        matmul_many(model, &act, &mut [(&layer.w_gate, &mut g), (&layer.w_up, &mut u)]);
        xn = act.f;
        let glu = match model.spec.activation {
            Activation::Silu => silu_mul,
            Activation::GeluTanh => gelu_mul,
        };
        if serial() {
            g.chunks_mut(hp.n_ff).zip(u.chunks(hp.n_ff)).for_each(|(gr, ur)| glu(gr, ur));
        } else {
            g.par_chunks_mut(hp.n_ff).zip(u.par_chunks(hp.n_ff)).for_each(|(gr, ur)| glu(gr, ur));
        }
        let act = Act::new(std::mem::take(&mut g), hp.n_ff);
        matmul_many(model, &act, &mut [(&layer.w_down, &mut down)]);
        g = act.f;
        if let Some(w) = &layer.post_ffn_norm {
            norm_each(&mut down, w, hp.rms_eps, &mut tmp);
        }
        for (xi, di) in x.iter_mut().zip(&down) {
            *xi += di;
        }
    }
    // The head is the costliest matrix for a large vocabulary: run it only where asked.
    let head_rows: Vec<usize> = match head {
        Head::EveryRow => (0..n).collect(),
        Head::LastOfEachItem => batch
            .iter()
            .scan(0, |r0, it| {
                *r0 += it.tokens.len();
                Some(*r0 - 1)
            })
            .collect(),
    };
    for it in batch.iter_mut() {
        it.seq.pos += it.tokens.len();
    }
    let mut h = vec![0.0f32; head_rows.len() * d];
    for (hr, &r) in h.chunks_exact_mut(d).zip(&head_rows) {
        rms_norm(&x[r * d..(r + 1) * d], &model.output_norm, hp.rms_eps, hr);
    }
    let act = Act::new(h, d);
    let mut logits = Vec::new();
    matmul_many(model, &act, &mut [(&model.output, &mut logits)]);
    if head_rows.len() == 1 {
        // One sequence's step: its logits as they are, not a copy.
        return Ok(vec![logits]);
    }
    Ok(logits.chunks_exact(hp.n_vocab).map(<[f32]>::to_vec).collect())
}
