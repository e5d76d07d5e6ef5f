//! The execution queue: a bounded priority queue (higher fee first, FIFO within a fee)
//! drained by `max_concurrent` dedicated inference threads, off the async runtime.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sampo_kernels::{Engine, Generation, SamplingParams};
use tokio::sync::{mpsc, oneshot};

/// A token as it is generated.
#[derive(Debug, Clone)]
pub struct TokenPiece {
    pub id: u32,
    pub text: String,
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
    pub done: oneshot::Sender<Result<Generation, String>>,
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

/// Shared handle on the queue and its workers.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<(Mutex<Inner>, Condvar)>,
    capacity: usize,
    running: Arc<AtomicUsize>,
    /// Jobs stopped early because their client went away (or the node stopped).
    cancelled: Arc<AtomicUsize>,
    workers: usize,
    stopping: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// Longest a worker waits for a streaming client to take a token; a client that
    /// reads slower than that is dropped and its inference cancelled.
    stream_timeout: Duration,
}

/// Default for [`Executor::with_stream_timeout`].
pub const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Hand a token to a streaming client, waiting at most `timeout` for room in its
/// bounded buffer. `false`: the client is gone or too slow; the job must stop.
fn send_within(tx: &mpsc::Sender<TokenPiece>, piece: TokenPiece, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut piece = piece;
    loop {
        match tx.try_send(piece) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(p)) => {
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                piece = p;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").field("capacity", &self.capacity).field("workers", &self.workers).finish()
    }
}

impl Executor {
    pub fn start(workers: usize, capacity: usize) -> std::io::Result<Self> {
        Self::start_with(workers, capacity, STREAM_WRITE_TIMEOUT)
    }

    /// [`Self::start`] with the slow-client timeout for streams.
    pub fn start_with(workers: usize, capacity: usize, stream_timeout: Duration) -> std::io::Result<Self> {
        let ex = Self {
            inner: Arc::new((Mutex::new(Inner::default()), Condvar::new())),
            capacity,
            running: Arc::new(AtomicUsize::new(0)),
            cancelled: Arc::new(AtomicUsize::new(0)),
            workers,
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Arc::new(Mutex::new(Vec::new())),
            stream_timeout,
        };
        for i in 0..workers {
            let me = ex.clone();
            let t = std::thread::Builder::new().name(format!("sampo-exec-{i}")).spawn(move || me.work())?;
            ex.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
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
    /// behind every paid task), or refuse it at once when the queue is full.
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

    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Free slots to advertise: queue room, never more than the capacity.
    pub fn free_slots(&self) -> u32 {
        let used = self.queued() + self.running();
        (self.capacity + self.workers).saturating_sub(used) as u32
    }

    fn work(&self) {
        loop {
            let job = {
                let mut g = self.lock();
                loop {
                    if let Some(q) = g.heap.pop() {
                        break q.job;
                    }
                    if g.closed {
                        return;
                    }
                    g = self.inner.1.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.running.fetch_add(1, Ordering::Relaxed);
            let job = match job {
                Work::Generate(job) => job,
                Work::Call(call) => {
                    call();
                    self.running.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            let stopping = self.stopping.clone();
            let stream = job.stream;
            let timeout = self.stream_timeout;
            let mut on_token = |id: u32, text: &str| {
                if stopping.load(Ordering::Relaxed) {
                    return false;
                }
                match &stream {
                    // Never blocked by a client: a gone or too slow one ends the job.
                    Some(tx) => send_within(tx, TokenPiece { id, text: text.to_owned() }, timeout),
                    None => true,
                }
            };
            let result = job.engine.generate(&job.prompt, &job.params, &mut on_token).map_err(|e| e.to_string());
            if matches!(&result, Ok(g) if g.finish == sampo_kernels::FinishReason::Cancelled) {
                self.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            let _ = job.done.send(result);
            self.running.fetch_sub(1, Ordering::Relaxed);
        }
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
                let _ = job.done.send(Err("the node is shutting down".into()));
            }
        }
        self.inner.1.notify_all();
        let deadline = std::time::Instant::now() + grace;
        while self.running() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stopping.store(true, Ordering::Relaxed);
        let threads: Vec<_> = self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_fee_first_then_fifo() {
        let q = |priority, seq| Queued {
            priority,
            seq,
            job: Work::Generate(Job {
                priority,
                engine: dummy_engine(),
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

    fn dummy_engine() -> Engine {
        let bytes = sampo_kernels::synth::synthesize(&sampo_kernels::synth::SynthSpec::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).expect("write");
        let model = Arc::new(sampo_kernels::Model::load(&p).expect("load"));
        let backend = Arc::new(sampo_kernels::CpuBackend::new(1).expect("cpu"));
        Engine::new(model, backend)
    }

    /// A client that never reads its stream cannot hold the only worker: its job is
    /// cancelled after the write timeout and the next job runs.
    #[test]
    fn a_client_that_stops_reading_is_dropped_not_waited_for() {
        let ex = Executor::start_with(1, 4, Duration::from_millis(200)).expect("start");
        let engine = dummy_engine();
        let (tx, _never_read) = mpsc::channel::<TokenPiece>(1);
        let (done, rx) = oneshot::channel();
        let params = SamplingParams { max_tokens: 64, ..SamplingParams::default() };
        let job = Job { priority: 5, engine: engine.clone(), prompt: vec![1, 2], params, stream: Some(tx), done };
        ex.submit(job).expect("submit");
        let g = rx.blocking_recv().expect("done").expect("generation");
        assert_eq!(g.finish, sampo_kernels::FinishReason::Cancelled);
        assert!(g.tokens.len() <= 2, "stopped at the full buffer: {}", g.tokens.len());
        assert_eq!(ex.cancelled(), 1);
        let (done, rx) = oneshot::channel();
        let params = SamplingParams { max_tokens: 4, ..SamplingParams::default() };
        ex.submit(Job { priority: 0, engine, prompt: vec![1], params, stream: None, done }).expect("submit");
        assert!(rx.blocking_recv().expect("done").is_ok(), "the worker is free again");
        ex.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn full_queue_refuses_and_jobs_complete() {
        let ex = Executor::start(1, 2).expect("start");
        let engine = dummy_engine();
        let mut dones = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            let (done, rx) = oneshot::channel();
            let job = Job {
                priority: 0,
                engine: engine.clone(),
                prompt: vec![1, 2, 3],
                params: SamplingParams { max_tokens: 4, ..SamplingParams::default() },
                stream: None,
                done,
            };
            match ex.submit(job) {
                Ok(()) => dones.push(rx),
                Err(SubmitError::Full(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0, "a queue of 2 cannot take 20 jobs at once");
        for rx in dones {
            let g = rx.blocking_recv().expect("done").expect("generation");
            assert!(g.tokens.len() <= 4);
        }
        ex.shutdown(Duration::from_secs(5));
        let (done, _rx) = oneshot::channel();
        let job = Job { priority: 0, engine, prompt: vec![1], params: SamplingParams::default(), stream: None, done };
        assert_eq!(ex.submit(job), Err(SubmitError::Closed));
    }
}
