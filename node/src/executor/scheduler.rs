//! The continuous-batching loop: one thread holds the sequences in flight and, step
//! by step, admits waiting jobs (highest priority first) into free slots, samples each
//! sequence's next token, hands it to its stream, retires finished or cancelled
//! sequences, and runs one forward pass per model for every sequence that needs one —
//! a decode row for each decoding sequence and a prefill chunk for each newcomer.
//!
//! Sequences join and leave between steps, so a request arriving mid-batch starts at
//! the next step, not when the batch ends. The kernels compute every row the same
//! whatever else shares the pass (`DESIGN.md`), so each sequence's tokens are the bits
//! it would get alone; only the time it takes depends on its neighbours.
//!
//! Prefill is chunked: the newcomers of one step share a budget of `prefill_chunk`
//! prompt rows, so a decoding stream waits at most one chunk's worth of rows for its
//! next token, and a request arriving during a long prefill waits at most one chunk
//! to start, however long the prompt. A chunk is not a loss on the CPU, whose
//! multi-row products take up to 64 rows per weight pass anyway; what it costs is one
//! output-head row per chunk (the logits after a chunk that does not end the prompt
//! are thrown away). A GPU node, whose passes grow cheaper with more rows, raises it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sampo_kernels::{
    BatchItem, Engine, FinishReason, Generation, KernelError, ModelError, SamplingParams, Sequence, StreamDecoder,
};
use tokio::sync::mpsc;

use super::prefix::PrefixCache;
use super::{Executor, Job, JobError, TokenPiece, Work};

/// How long the loop sleeps when every sequence in flight waits on a slow reader (a new
/// job wakes it at once).
const BLOCKED_POLL: Duration = Duration::from_millis(2);

/// A sequence in flight.
struct Active {
    job: Job,
    seq: Sequence,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The last sampled token, the next one to feed while decoding.
    last: [u32; 1],
    /// Rows this sequence puts into the current step (0: sits it out).
    rows: usize,
    /// The token chosen after the last fed token (on the device where the backend
    /// samples there), not yet emitted.
    next: Option<u32>,
    out: Vec<u32>,
    text: String,
    decoder: StreamDecoder,
    /// A token its stream had no room for yet; no further token is sampled until it is
    /// taken, and the client is dropped if it stays unread past the write timeout.
    pending: Option<(TokenPiece, Instant)>,
    finish: Option<FinishReason>,
    started: Option<Instant>,
    prefilled: Option<Instant>,
}

impl Active {
    fn new(job: Job) -> Self {
        let seq = Sequence::new(&job.engine.model);
        Self {
            job,
            seq,
            fed: 0,
            last: [0],
            rows: 0,
            next: None,
            out: Vec::new(),
            text: String::new(),
            decoder: StreamDecoder::new(),
            pending: None,
            finish: None,
            started: None,
            prefilled: None,
        }
    }

    fn prefilling(&self) -> bool {
        self.fed < self.job.prompt.len()
    }

    /// Try to hand over the pending token. `false`: the client is gone or too slow.
    fn flush(&mut self, timeout: Duration) -> bool {
        let Some((piece, since)) = self.pending.take() else { return true };
        let Some(tx) = &self.job.stream else { return true };
        match tx.try_send(piece) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(piece)) => {
                self.pending = Some((piece, since));
                since.elapsed() < timeout
            }
        }
    }

    /// Emit the token the pass chose, as `Engine::generate` does.
    fn sample(&mut self, timeout: Duration) -> Result<(), KernelError> {
        let Some(id) = self.next.take() else { return Ok(()) };
        if self.job.params.stop.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        self.out.push(id);
        let text = self.decoder.push(self.job.engine.tokenizer(), id)?;
        self.text.push_str(&text);
        if self.job.stream.is_some() {
            self.pending = Some((TokenPiece { id, text }, Instant::now()));
            if !self.flush(timeout) {
                self.finish = Some(FinishReason::Cancelled);
                self.pending = None;
                return Ok(());
            }
        }
        if self.out.len() >= self.job.params.max_tokens as usize {
            self.finish = Some(FinishReason::Length);
        }
        self.last = [id];
        Ok(())
    }

    fn generation(mut self) -> (Job, Generation) {
        self.text.push_str(&self.decoder.finish());
        let now = Instant::now();
        let started = self.started.unwrap_or(now);
        let prefilled = self.prefilled.unwrap_or(now);
        let g = Generation {
            prompt_tokens: std::mem::take(&mut self.job.prompt),
            tokens: self.out,
            text: self.text,
            finish: self.finish.unwrap_or(FinishReason::Length),
            prefill_secs: prefilled.duration_since(started).as_secs_f64(),
            decode_secs: now.duration_since(prefilled).as_secs_f64(),
        };
        (self.job, g)
    }
}

/// The checks `Engine::generate` makes before it starts, made at admission so that one
/// bad request never fails the pass it would share.
fn check(job: &Job) -> Result<(), KernelError> {
    job.params.validate()?;
    if job.prompt.is_empty() {
        return Err(KernelError::EmptyPrompt);
    }
    let hp = &job.engine.model.hp;
    if job.prompt.len() + job.params.max_tokens as usize > hp.n_ctx {
        return Err(KernelError::TooLong {
            prompt: job.prompt.len(),
            max_tokens: job.params.max_tokens,
            ctx: hp.n_ctx,
        });
    }
    if let Some(&id) = job.prompt.iter().find(|&&t| t as usize >= hp.n_vocab) {
        return Err(ModelError::TokenOutOfRange { id, vocab: hp.n_vocab }.into());
    }
    Ok(())
}

/// Sequences of one model on one backend share a forward pass.
fn same_engine(a: &Engine, b: &Engine) -> bool {
    std::sync::Arc::ptr_eq(&a.model, &b.model) && std::ptr::addr_eq(a.backend(), b.backend())
}

impl Executor {
    /// The scheduler thread's body: runs until the executor is closed and drained.
    pub(super) fn schedule(&self) {
        let span = tracing::info_span!("executor");
        let _entered = span.enter();
        let mut active: Vec<Active> = Vec::new();
        let mut cache = PrefixCache::new(self.prefix_cache_bytes);
        loop {
            // Admit between steps, by priority, into free slots; block only when idle.
            let mut calls = Vec::new();
            {
                let mut g = self.lock();
                loop {
                    while active.len() + calls.len() < self.max_batch {
                        let Some(q) = g.heap.pop() else { break };
                        match q.job {
                            Work::Generate(job) => active.push(Active::new(job)),
                            Work::Call(call) => calls.push(call),
                        }
                    }
                    if !active.is_empty() || !calls.is_empty() {
                        break;
                    }
                    if g.closed {
                        return;
                    }
                    g = self.inner.1.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
            self.running.store(active.len() + calls.len(), Ordering::Relaxed);
            // Other work on the inference threads (a replay) runs between steps.
            for call in calls {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).is_err() {
                    tracing::error!("work on the inference threads panicked");
                }
            }
            self.step(&mut active, &mut cache);
            self.running.store(active.len(), Ordering::Relaxed);
        }
    }

    /// One step: sample, stream and retire; then one forward pass per model.
    fn step(&self, active: &mut Vec<Active>, cache: &mut PrefixCache) {
        let timeout = self.stream_timeout;
        let stopping = self.stopping.load(Ordering::Relaxed);
        let mut failed: Vec<(usize, JobError)> = Vec::new();
        for (i, a) in active.iter_mut().enumerate() {
            if a.started.is_none() {
                if let Err(e) = check(&a.job) {
                    failed.push((i, e.into()));
                    continue;
                }
                a.started = Some(Instant::now());
                // A checked job starts from the longest kept prefix of its prompt (off the
                // queue's lock: the copy may be megabytes).
                if let Some((seq, n)) = cache.take(&a.job.engine, &a.job.prompt) {
                    a.seq = seq;
                    a.fed = n;
                    self.reused_prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            let gone = a.job.stream.as_ref().is_some_and(|tx| tx.is_closed());
            if stopping || gone || !a.flush(timeout) {
                a.finish = Some(FinishReason::Cancelled);
                a.pending = None;
            }
            if a.finish.is_none()
                && a.pending.is_none()
                && let Err(e) = a.sample(timeout)
            {
                failed.push((i, e.into()));
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let _ = active.swap_remove(i).job.done.send(Err(e));
        }
        // Retire: finished sequences whose last token has been handed over.
        let mut k = 0;
        while k < active.len() {
            if active[k].finish.is_some() && active[k].pending.is_none() {
                let a = active.swap_remove(k);
                // Only a prompt that ran to its end is kept: a cancelled one may be a
                // stream whose task was never announced (its prompt never public).
                if a.finish != Some(FinishReason::Cancelled) && !a.prefilling() {
                    cache.put(&a.job.engine, &a.job.prompt, &a.seq);
                }
                let (job, g) = a.generation();
                if g.finish == FinishReason::Cancelled {
                    self.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                let _ = job.done.send(Ok(g));
            } else {
                k += 1;
            }
        }
        // Plan: every decoder feeds its last token; newcomers share the prefill budget.
        let mut budget = self.prefill_chunk;
        for a in active.iter_mut() {
            a.rows = 0;
            if a.finish.is_some() || a.next.is_some() {
                continue;
            }
            if a.prefilling() {
                a.rows = (a.job.prompt.len() - a.fed).min(budget);
                budget -= a.rows;
            } else {
                a.rows = 1;
            }
        }
        if active.iter().all(|a| a.rows == 0) {
            // Everyone waits on a reader: sleep a little, or until a new job comes.
            if !active.is_empty() {
                let g = self.lock();
                if g.heap.is_empty() || active.len() >= self.max_batch {
                    let _ = self.inner.1.wait_timeout(g, BLOCKED_POLL);
                }
            }
            return;
        }
        // One pass per model: every row of a pass shares each weight read.
        let mut done = vec![false; active.len()];
        let mut broken: Vec<(usize, String)> = Vec::new();
        for lead in 0..active.len() {
            if done[lead] || active[lead].rows == 0 {
                continue;
            }
            let engine = active[lead].job.engine.clone();
            let members: Vec<usize> = (lead..active.len())
                .filter(|&i| !done[i] && active[i].rows > 0 && same_engine(&active[i].job.engine, &engine))
                .collect();
            for &i in &members {
                done[i] = true;
            }
            let result = {
                let mut batch: Vec<BatchItem<'_>> = Vec::with_capacity(members.len());
                let mut params: Vec<(&SamplingParams, u64)> = Vec::with_capacity(members.len());
                for (_, a) in active.iter_mut().enumerate().filter(|(i, _)| members.binary_search(i).is_ok()) {
                    let tokens = if a.prefilling() { &a.job.prompt[a.fed..a.fed + a.rows] } else { &a.last[..] };
                    // A prefill chunk that does not end the prompt gets a token too,
                    // which is dropped (the step counter does not move for it).
                    params.push((&a.job.params, a.out.len() as u64));
                    batch.push(BatchItem { seq: &mut a.seq, tokens });
                }
                // A bug in a kernel fails the sequences of this pass, not the executor.
                // Parameters were validated at admission, so one request cannot fail a
                // shared pass; only the chosen ids come back from a device backend.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.backend().forward_sample(&engine.model, &mut batch, &params)
                }))
            };
            match result {
                Ok(Ok(ids)) if ids.len() == members.len() => {
                    for (&i, id) in members.iter().zip(ids) {
                        let a = &mut active[i];
                        if a.prefilling() {
                            a.fed += a.rows;
                            if a.prefilling() {
                                continue;
                            }
                            a.prefilled = Some(Instant::now());
                        }
                        a.next = Some(id);
                    }
                }
                other => {
                    let reason = match other {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(ids)) => {
                            format!("the backend chose {} tokens for {} sequences", ids.len(), members.len())
                        }
                        Err(_) => "the forward pass panicked".to_owned(),
                    };
                    tracing::error!(error = %reason, sequences = members.len(), "a batched forward pass failed");
                    broken.extend(members.iter().map(|&i| (i, reason.clone())));
                }
            }
        }
        // Their caches are in an unknown state: these sequences cannot go on.
        broken.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, reason) in broken {
            let _ = active.swap_remove(i).job.done.send(Err(JobError::Inference(reason)));
        }
    }
}
