//! The execution queue: a bounded priority queue (higher fee first, FIFO within a fee)
//! drained by one scheduler thread that decodes every sequence in flight — up to
//! `max_concurrent` of them — as one batch per step, off the async runtime
//! ([`scheduler`]).

mod prefix;
mod scheduler;

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sampo_kernels::{Engine, Generation, KernelError, SamplingParams};
use tokio::sync::{mpsc, oneshot};

/// A token as it is generated.
#[derive(Debug, Clone)]
pub struct TokenPiece {
    pub id: u32,
    pub text: String,
}

/// Why a job produced no generation.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request itself cannot run (bad parameters, too long for the context).
    #[error(transparent)]
    Rejected(#[from] KernelError),
    /// The forward pass it shared failed; every sequence in that pass gets this.
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// One inference to run.
pub struct Job {
    /// Higher runs first.
    pub priority: u64,
    pub engine: Engine,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens as they come; a closed receiver (a client gone) cancels the job.
    pub stream: Option<mpsc::Sender<TokenPiece>>,
    pub done: oneshot::Sender<Result<Generation, JobError>>,
}

/// Other CPU-bound work that shares the inference threads (replays).
pub type Call = Box<dyn FnOnce() + Send>;

enum Work {
    Generate(Job),
    Call(Call),
}

struct Queued {
    priority: u64,
    seq: u64,
    job: Work,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.seq) == (o.priority, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Max-heap: higher priority first, then the lower sequence number (FIFO).
        self.priority.cmp(&o.priority).then_with(|| o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct Inner {
    heap: BinaryHeap<Queued>,
    seq: u64,
    closed: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the execution queue is full ({0} jobs)")]
    Full(usize),
    #[error("the node is shutting down")]
    Closed,
}

/// How the executor runs; [`Default`] is the node's default configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// Sequences in flight at once, decoded together (the batch size).
    pub max_concurrent: usize,
    /// Jobs waiting for a slot; more are refused.
    pub queue_capacity: usize,
    /// Longest a streaming client may leave a token unread before it is dropped and
    /// its inference cancelled.
    pub stream_timeout: Duration,
    /// Prompt rows that newcomers may add to one step (a long prompt goes in chunks).
    pub prefill_chunk: usize,
    /// Bytes of prompt prefixes' keys and values kept for later prompts that start
    /// with them (CPU backends; 0: none).
    pub prefix_cache_bytes: usize,
}

/// Default for [`ExecutorConfig::stream_timeout`].
pub const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`ExecutorConfig::prefill_chunk`]: one multi-row weight pass of the CPU
/// kernels (`quant::dot_rows` takes up to 64 rows).
pub const PREFILL_CHUNK: usize = 64;

/// Default for [`ExecutorConfig::prefix_cache_bytes`]: a few hundred chat prompts'
/// openings on a small model.
pub const PREFIX_CACHE_BYTES: usize = 64 << 20;

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            queue_capacity: 64,
            stream_timeout: STREAM_WRITE_TIMEOUT,
            prefill_chunk: PREFILL_CHUNK,
            prefix_cache_bytes: PREFIX_CACHE_BYTES,
        }
    }
}

/// Shared handle on the queue and its scheduler thread.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<(Mutex<Inner>, Condvar)>,
    capacity: usize,
    max_batch: usize,
    prefill_chunk: usize,
    prefix_cache_bytes: usize,
    /// Prompt tokens not prefilled because a kept prefix held them.
    reused_prompt_tokens: Arc<AtomicU64>,
    /// Sequences (and calls) in flight.
    running: Arc<AtomicUsize>,
    /// Jobs stopped early because their client went away (or the node stopped).
    cancelled: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    stream_timeout: Duration,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").field("capacity", &self.capacity).field("max_batch", &self.max_batch).finish()
    }
}

impl Executor {
    /// Start the scheduler thread. `max_concurrent`, `queue_capacity` and
    /// `prefill_chunk` of at least 1 (0 counts as 1).
    pub fn start(cfg: ExecutorConfig) -> std::io::Result<Self> {
        let ex = Self {
            inner: Arc::new((Mutex::new(Inner::default()), Condvar::new())),
            capacity: cfg.queue_capacity.max(1),
            max_batch: cfg.max_concurrent.max(1),
            prefill_chunk: cfg.prefill_chunk.max(1),
            prefix_cache_bytes: cfg.prefix_cache_bytes,
            reused_prompt_tokens: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            cancelled: Arc::new(AtomicUsize::new(0)),
            stopping: Arc::new(AtomicBool::new(false)),
            thread: Arc::new(Mutex::new(None)),
            stream_timeout: cfg.stream_timeout,
        };
        let me = ex.clone();
        let t = std::thread::Builder::new().name("sampo-exec".into()).spawn(move || me.schedule())?;
        *ex.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(ex)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job, or refuse it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.enqueue(job.priority, Work::Generate(job))
    }

    /// Queue other work for the inference threads at `priority` (a replay runs at 0,
    /// behind every paid task), or refuse it at once when the queue is full. It runs
    /// between two batch steps, taking a slot while it runs.
    pub fn submit_call(&self, priority: u64, call: Call) -> Result<(), SubmitError> {
        self.enqueue(priority, Work::Call(call))
    }

    fn enqueue(&self, priority: u64, job: Work) -> Result<(), SubmitError> {
        let mut g = self.lock();
        if g.closed {
            return Err(SubmitError::Closed);
        }
        if g.heap.len() >= self.capacity {
            return Err(SubmitError::Full(g.heap.len()));
        }
        g.seq += 1;
        let seq = g.seq;
        g.heap.push(Queued { priority, seq, job });
        drop(g);
        self.inner.1.notify_one();
        Ok(())
    }

    /// Jobs waiting (not running).
    pub fn queued(&self) -> usize {
        self.lock().heap.len()
    }

    /// Prompt tokens taken from kept prefixes instead of prefilled.
    pub fn reused_prompt_tokens(&self) -> u64 {
        self.reused_prompt_tokens.load(Ordering::Relaxed)
    }

    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Sequences in flight (the current batch).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Free slots to advertise: queue room, never more than the capacity.
    pub fn free_slots(&self) -> u32 {
        let used = self.queued() + self.running();
        (self.capacity + self.max_batch).saturating_sub(used) as u32
    }

    /// Refuse new jobs, fail the queued ones, let running ones finish for up to `grace`
    /// and then cancel them.
    pub fn shutdown(&self, grace: Duration) {
        let drained: Vec<Queued> = {
            let mut g = self.lock();
            g.closed = true;
            g.heap.drain().collect()
        };
        for q in drained {
            if let Work::Generate(job) = q.job {
                let _ = job.done.send(Err(JobError::ShuttingDown));
            }
        }
        self.inner.1.notify_all();
        let deadline = std::time::Instant::now() + grace;
        while self.running() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stopping.store(true, Ordering::Relaxed);
        self.inner.1.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sampo_kernels::FinishReason;
    use sampo_kernels::synth::{SynthSpec, synthesize};
    use std::time::Instant;

    #[test]
    fn higher_fee_first_then_fifo() {
        let engine = dummy_engine();
        let q = |priority, seq| Queued {
            priority,
            seq,
            job: Work::Generate(Job {
                priority,
                engine: engine.clone(),
                prompt: vec![],
                params: SamplingParams::default(),
                stream: None,
                done: oneshot::channel().0,
            }),
        };
        let mut heap = BinaryHeap::new();
        for (p, s) in [(1, 1), (5, 2), (1, 3), (5, 4)] {
            heap.push(q(p, s));
        }
        let popped: Vec<(u64, u64)> = std::iter::from_fn(|| heap.pop().map(|q| (q.priority, q.seq))).collect();
        assert_eq!(popped, vec![(5, 2), (5, 4), (1, 1), (1, 3)]);
    }

    fn engine_of(spec: &SynthSpec) -> Engine {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, synthesize(spec)).expect("write");
        let model = Arc::new(sampo_kernels::Model::load(&p).expect("load"));
        let backend = Arc::new(sampo_kernels::CpuBackend::new(2).expect("cpu"));
        Engine::new(model, backend)
    }

    fn dummy_engine() -> Engine {
        engine_of(&SynthSpec::default())
    }

    /// A model with room for long generations, so that one job is still decoding while
    /// the test does something else.
    fn long_engine() -> Engine {
        engine_of(&SynthSpec { n_ctx: 4096, ..SynthSpec::default() })
    }

    fn config(max_concurrent: usize, queue_capacity: usize) -> ExecutorConfig {
        ExecutorConfig { max_concurrent, queue_capacity, ..ExecutorConfig::default() }
    }

    type Done = oneshot::Receiver<Result<Generation, JobError>>;

    fn job(engine: &Engine, priority: u64, prompt: Vec<u32>, params: SamplingParams) -> (Job, Done) {
        let (done, rx) = oneshot::channel();
        (Job { priority, engine: engine.clone(), prompt, params, stream: None, done }, rx)
    }

    fn streamed(engine: &Engine, prompt: Vec<u32>, params: SamplingParams) -> (Job, Done, mpsc::Receiver<TokenPiece>) {
        let (tx, tokens) = mpsc::channel(params.max_tokens as usize + 1);
        let (mut j, rx) = job(engine, 1, prompt, params);
        j.stream = Some(tx);
        (j, rx, tokens)
    }

    fn finished(rx: Done) -> Generation {
        rx.blocking_recv().expect("done").expect("generation")
    }

    /// Prompts of different lengths and sampling settings: some greedy, some sampled.
    fn requests(n: usize) -> Vec<(Vec<u32>, SamplingParams)> {
        (0..n)
            .map(|i| {
                let prompt: Vec<u32> =
                    (0..(1 + 7 * i as u32 % 23)).map(|t| (t * 13 + i as u32 * 5) % 200 + 1).collect();
                let temperature = if i % 2 == 0 { 0.0 } else { 0.8 };
                let params = SamplingParams {
                    temperature,
                    top_k: 40,
                    seed: i as u64,
                    max_tokens: 24,
                    ..SamplingParams::default()
                };
                (prompt, params)
            })
            .collect()
    }

    /// The determinism contract at the executor: whoever shares the batch, and however
    /// a prompt is cut into prefill chunks, every job gets the tokens it gets alone.
    #[test]
    fn concurrent_jobs_get_the_tokens_they_get_alone() {
        let a = dummy_engine();
        // A second copy of the model: its sequences run in a pass of their own.
        let b = dummy_engine();
        let reqs = requests(12);
        let alone: Vec<Vec<u32>> = reqs
            .iter()
            .map(|(prompt, params)| a.generate(prompt, params, &mut |_, _| true).expect("alone").tokens)
            .collect();
        let ex = Executor::start(ExecutorConfig { prefill_chunk: 3, ..config(5, 64) }).expect("start");
        let mut dones = Vec::new();
        for (i, (prompt, params)) in reqs.iter().enumerate() {
            let engine = if i % 3 == 0 { &b } else { &a };
            let (j, rx) = job(engine, 1, prompt.clone(), params.clone());
            ex.submit(j).expect("submit");
            dones.push(rx);
            // Some arrive while others are mid-generation.
            if i % 4 == 3 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        for (i, (rx, want)) in dones.into_iter().zip(&alone).enumerate() {
            let g = finished(rx);
            assert_eq!(&g.tokens, want, "request {i}");
            assert_eq!(g.finish, FinishReason::Length);
        }
        ex.shutdown(Duration::from_secs(5));
    }

    /// A prompt that starts like an earlier one goes on from its kept keys and values:
    /// the tokens it gets alone, with the shared rows not prefilled again; a prompt for
    /// another model (a second copy) never takes them, and a zero budget keeps none.
    #[test]
    fn a_shared_prompt_prefix_is_reused_with_the_tokens_it_gets_alone() {
        let a = dummy_engine();
        let b = dummy_engine();
        let base: Vec<u32> = (1..=40).collect();
        let mut branch = base[..30].to_vec();
        branch.extend([77, 78, 79]);
        let params = SamplingParams { max_tokens: 8, ..SamplingParams::default() };
        let alone = |e: &Engine, p: &[u32]| e.generate(p, &params, &mut |_, _| true).expect("alone").tokens;
        for (budget, reuse) in [(PREFIX_CACHE_BYTES, true), (0, false)] {
            let ex = Executor::start(ExecutorConfig { prefix_cache_bytes: budget, ..config(2, 8) }).expect("start");
            let run = |e: &Engine, p: &[u32]| {
                let (j, rx) = job(e, 1, p.to_vec(), params.clone());
                ex.submit(j).expect("submit");
                finished(rx).tokens
            };
            assert_eq!(run(&a, &base), alone(&a, &base));
            assert_eq!(ex.reused_prompt_tokens(), 0, "nothing kept yet");
            assert_eq!(run(&a, &branch), alone(&a, &branch));
            assert_eq!(ex.reused_prompt_tokens(), if reuse { 30 } else { 0 }, "the shared 30 tokens");
            // The same prompt again: all but its last token (fed for the logits).
            assert_eq!(run(&a, &base), alone(&a, &base));
            assert_eq!(ex.reused_prompt_tokens(), if reuse { 30 + 39 } else { 0 });
            assert_eq!(run(&b, &base), alone(&b, &base));
            assert_eq!(ex.reused_prompt_tokens(), if reuse { 30 + 39 } else { 0 }, "another model's cache");
            // A cancelled request (a stream whose client left) keeps nothing.
            let secret: Vec<u32> = (100..140).collect();
            let long = SamplingParams { max_tokens: 200, ..params.clone() };
            let (j, rx, tokens) = streamed(&a, secret.clone(), long);
            ex.submit(j).expect("submit");
            drop(tokens);
            assert_eq!(finished(rx).finish, FinishReason::Cancelled);
            assert_eq!(run(&a, &secret), alone(&a, &secret));
            assert_eq!(ex.reused_prompt_tokens(), if reuse { 30 + 39 } else { 0 }, "nothing kept from a cancelled run");
            ex.shutdown(Duration::from_secs(5));
        }
    }

    /// A request that arrives while another one decodes starts at the next step: it is
    /// served to the end while the first is still generating.
    #[test]
    fn a_request_arriving_mid_batch_does_not_wait_for_the_batch() {
        let engine = long_engine();
        let ex = Executor::start(config(4, 8)).expect("start");
        let long = SamplingParams { max_tokens: 4000, ..SamplingParams::default() };
        let (j, long_done, mut long_tokens) = streamed(&engine, vec![1, 2, 3], long);
        ex.submit(j).expect("submit");
        assert!(long_tokens.blocking_recv().is_some(), "the long job decodes");
        let short = SamplingParams { max_tokens: 4, ..SamplingParams::default() };
        let (j, short_done, mut short_tokens) = streamed(&engine, vec![7, 8], short);
        ex.submit(j).expect("submit");
        assert!(short_tokens.blocking_recv().is_some(), "the newcomer's first token");
        let g = finished(short_done);
        assert_eq!(g.tokens.len(), 4);
        let mut seen = 1;
        while long_tokens.try_recv().is_ok() {
            seen += 1;
        }
        assert!(seen < 4000, "the long job was still decoding when the newcomer finished ({seen} tokens)");
        let g = finished(long_done);
        assert_eq!(g.tokens.len(), 4000);
        ex.shutdown(Duration::from_secs(5));
    }

    /// One client hanging up cancels its own sequence only.
    #[test]
    fn cancelling_one_sequence_leaves_the_others_intact() {
        let engine = long_engine();
        let reqs = requests(3);
        let params = |p: &SamplingParams| SamplingParams { max_tokens: 400, ..p.clone() };
        let alone: Vec<Vec<u32>> = reqs
            .iter()
            .map(|(prompt, p)| engine.generate(prompt, &params(p), &mut |_, _| true).expect("alone").tokens)
            .collect();
        let ex = Executor::start(config(4, 8)).expect("start");
        let mut jobs = Vec::new();
        for (prompt, p) in &reqs {
            let (j, rx, tokens) = streamed(&engine, prompt.clone(), params(p));
            ex.submit(j).expect("submit");
            jobs.push((rx, tokens));
        }
        let (gone_done, mut gone_tokens) = jobs.remove(1);
        assert!(gone_tokens.blocking_recv().is_some());
        drop(gone_tokens);
        let g = finished(gone_done);
        assert_eq!(g.finish, FinishReason::Cancelled);
        assert!(g.tokens.len() < 400, "stopped early: {}", g.tokens.len());
        assert_eq!(g.tokens[..], alone[1][..g.tokens.len()], "what it made before is its own output");
        for ((rx, mut tokens), want) in jobs.into_iter().zip([&alone[0], &alone[2]]) {
            let g = finished(rx);
            assert_eq!(g.finish, FinishReason::Length);
            assert_eq!(&g.tokens, want);
            let mut ids = Vec::new();
            while let Ok(p) = tokens.try_recv() {
                ids.push(p.id);
            }
            assert_eq!(&ids, want, "every token was streamed");
        }
        assert_eq!(ex.cancelled(), 1);
        ex.shutdown(Duration::from_secs(5));
    }

    /// With the batch full, waiting jobs are admitted highest fee first, FIFO within a fee.
    #[test]
    fn admission_follows_priority() {
        let engine = long_engine();
        let ex = Executor::start(config(1, 8)).expect("start");
        let (j, first_done, mut first_tokens) =
            streamed(&engine, vec![1], SamplingParams { max_tokens: 3000, ..SamplingParams::default() });
        ex.submit(j).expect("submit");
        assert!(first_tokens.blocking_recv().is_some(), "the batch is full");
        // Streams of one slot: a job cannot finish before this thread reads it, so the
        // job in the only slot stays there while the others' streams are checked (no
        // race with how fast waiting threads are scheduled).
        let mut streams = std::collections::HashMap::new();
        for (name, priority) in [("low", 1), ("high", 9), ("mid", 5), ("high2", 9)] {
            let (tx, tokens) = mpsc::channel(1);
            let (mut j, done) =
                job(&engine, priority, vec![2, 3], SamplingParams { max_tokens: 2, ..SamplingParams::default() });
            j.stream = Some(tx);
            ex.submit(j).expect("submit");
            streams.insert(name, (tokens, done));
        }
        assert_eq!(ex.queued(), 4, "all wait for the only slot");
        drop(first_tokens);
        assert_eq!(finished(first_done).finish, FinishReason::Cancelled);
        let expected = ["high", "high2", "mid", "low"];
        for (i, name) in expected.iter().enumerate() {
            let (tokens, _) = streams.get_mut(name).expect("stream");
            assert!(tokens.blocking_recv().is_some(), "{name} runs");
            for later in &expected[i + 1..] {
                let (t, _) = streams.get_mut(later).expect("stream");
                assert!(t.try_recv().is_err(), "{later} ran before {name}");
            }
            let (mut tokens, done) = streams.remove(name).expect("stream");
            while tokens.blocking_recv().is_some() {}
            assert_eq!(finished(done).tokens.len(), 2, "{name}");
        }
        ex.shutdown(Duration::from_secs(5));
    }

    /// A bad request is refused alone, with its reason, and never fails its neighbours.
    #[test]
    fn a_bad_request_fails_alone() {
        let engine = dummy_engine();
        let ex = Executor::start(config(4, 8)).expect("start");
        let (good, good_done) =
            job(&engine, 1, vec![1, 2], SamplingParams { max_tokens: 8, ..SamplingParams::default() });
        let (bad, bad_done) = job(&engine, 1, vec![1, 1 << 30], SamplingParams::default());
        let (long, long_done) =
            job(&engine, 1, vec![1], SamplingParams { max_tokens: 5000, ..SamplingParams::default() });
        for j in [good, bad, long] {
            ex.submit(j).expect("submit");
        }
        assert!(matches!(bad_done.blocking_recv(), Ok(Err(JobError::Rejected(_)))));
        assert!(matches!(long_done.blocking_recv(), Ok(Err(JobError::Rejected(KernelError::TooLong { .. })))));
        assert_eq!(finished(good_done).tokens.len(), 8);
        ex.shutdown(Duration::from_secs(5));
    }

    /// A client that never reads its stream cannot hold the batch: its job is cancelled
    /// after the write timeout, and the others decode on meanwhile.
    #[test]
    fn a_client_that_stops_reading_is_dropped_not_waited_for() {
        let cfg = ExecutorConfig { stream_timeout: Duration::from_millis(300), ..config(2, 4) };
        let ex = Executor::start(cfg).expect("start");
        let engine = dummy_engine();
        let (tx, _never_read) = mpsc::channel::<TokenPiece>(1);
        let (done, rx) = oneshot::channel();
        let params = SamplingParams { max_tokens: 64, ..SamplingParams::default() };
        let job_ = Job { priority: 5, engine: engine.clone(), prompt: vec![1, 2], params, stream: Some(tx), done };
        let t0 = Instant::now();
        ex.submit(job_).expect("submit");
        let (j, other) = job(&engine, 0, vec![1], SamplingParams { max_tokens: 32, ..SamplingParams::default() });
        ex.submit(j).expect("submit");
        assert_eq!(finished(other).tokens.len(), 32);
        assert!(t0.elapsed() < Duration::from_millis(300), "the other job did not wait for the slow reader");
        let g = finished(rx);
        assert_eq!(g.finish, FinishReason::Cancelled);
        assert!(g.tokens.len() <= 2, "stopped at the full buffer: {}", g.tokens.len());
        assert_eq!(ex.cancelled(), 1);
        let (j, rx) = job(&engine, 0, vec![1], SamplingParams { max_tokens: 4, ..SamplingParams::default() });
        ex.submit(j).expect("submit");
        assert!(rx.blocking_recv().expect("done").is_ok(), "the slot is free again");
        ex.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn full_queue_refuses_and_jobs_complete() {
        let ex = Executor::start(config(1, 2)).expect("start");
        let engine = dummy_engine();
        let mut dones = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            let (j, rx) = job(&engine, 0, vec![1, 2, 3], SamplingParams { max_tokens: 4, ..SamplingParams::default() });
            match ex.submit(j) {
                Ok(()) => dones.push(rx),
                Err(SubmitError::Full(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0, "a queue of 2 cannot take 20 jobs at once");
        for rx in dones {
            let g = finished(rx);
            assert!(g.tokens.len() <= 4);
        }
        ex.shutdown(Duration::from_secs(5));
        let (j, _rx) = job(&engine, 0, vec![1], SamplingParams::default());
        assert_eq!(ex.submit(j), Err(SubmitError::Closed));
    }

    /// Shutdown fails what waits and cancels what runs past the grace period.
    #[test]
    fn shutdown_drains_then_cancels() {
        let engine = dummy_engine();
        let ex = Executor::start(config(1, 4)).expect("start");
        // A reader that stops after the first token keeps the job in flight (up to the
        // ten-second write timeout).
        let (mut j, running, _) =
            streamed(&engine, vec![1], SamplingParams { max_tokens: 64, ..SamplingParams::default() });
        let (tx, mut tokens) = mpsc::channel(1);
        j.stream = Some(tx);
        ex.submit(j).expect("submit");
        assert!(tokens.blocking_recv().is_some());
        let (j, waiting) = job(&engine, 0, vec![1], SamplingParams::default());
        ex.submit(j).expect("submit");
        ex.shutdown(Duration::from_millis(50));
        assert!(matches!(waiting.blocking_recv(), Ok(Err(JobError::ShuttingDown))));
        assert_eq!(finished(running).finish, FinishReason::Cancelled);
    }
}
