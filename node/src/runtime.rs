//! The node's event loop: p2p events and API submissions feed the consensus state
//! machine; its actions go out as gossip, inference jobs and storage writes. The loop
//! never runs inference or blocks on a client: jobs go to the executor's threads and
//! come back as messages.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sampo_consensus::{
    Action, Candidate, Commit, Consensus, DeclineReason, FraudProof, Mark, MessageKind, ModelRef, NodeAnnouncement,
    Outcome, PeerId, ReputationParams, RoundError, SignedEnvelope, TaskId, TaskSpec, Topic, VerifiedVerdict, assess,
    committee_size, judge, needs_replay,
};
use sampo_p2p::{Acceptance, FetchRequest, FetchResponse, GossipTopic, P2pEvent, P2pHandle, Validation};
use sampo_storage::{Applied, Effects, Store};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, debug, info, warn};

use crate::audit::{PendingProofs, ReplayBudget, ReplayOutcome, ReplayReason, replay_verdict};
use crate::executor::{Executor, Job};
use crate::metrics::NodeMetrics;
use crate::models::Models;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the API can see of a task.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TaskState {
    pub task: String,
    /// "running", "finalized", "escalated" or "disputed".
    pub status: String,
    pub attempt: u8,
    pub committee: Vec<String>,
    pub marks: Vec<(String, String)>,
    #[serde(skip)]
    pub output: Option<Vec<u32>>,
    pub model: String,
    pub coordinator: String,
}

impl TaskState {
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "finalized" | "disputed" | "overturned" | "unrecorded")
    }
}

/// Each task's state channel, and the insertion order for pruning.
type BoardEntries = (HashMap<TaskId, watch::Sender<TaskState>>, VecDeque<TaskId>);

/// Streamed requests this node is running itself, by task: a seat this node holds on
/// the same task takes that run's output (the same prompt and parameters give the same
/// tokens, bit for bit) instead of decoding it a second time.
#[derive(Default)]
pub struct LocalRuns {
    inner: Mutex<HashMap<TaskId, LocalRun>>,
}

/// A registered run: its prompt, and its output once it finished (the sender is dropped
/// unsent when it did not: cancelled, failed, its client gone).
type LocalRun = (Vec<u32>, oneshot::Receiver<Vec<u32>>);

/// Local runs remembered at once (each is a streamed request in the executor).
pub const LOCAL_RUNS_CAPACITY: usize = 1024;

impl LocalRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, LocalRun>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the run of `task` on `prompt`; the sender takes its output if it
    /// finished. `None` (nothing registered) when full.
    pub fn register(&self, task: TaskId, prompt: Vec<u32>) -> Option<oneshot::Sender<Vec<u32>>> {
        let mut runs = self.lock();
        if runs.len() >= LOCAL_RUNS_CAPACITY {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        runs.insert(task, (prompt, rx));
        Some(tx)
    }

    /// The run is over and nobody took it (this node was not seated).
    pub fn forget(&self, task: &TaskId) {
        self.lock().remove(task);
    }

    /// The output of this node's own run of `task` on `prompt`, once it ends; `None`
    /// if there is none or it did not finish (then the seat runs the task itself).
    pub async fn take(&self, task: &TaskId, prompt: &[u32]) -> Option<Vec<u32>> {
        let (registered, rx) = self.lock().remove(task)?;
        if registered != prompt {
            return None;
        }
        rx.await.ok()
    }
}

/// Task states with waiters; bounded, oldest entries pruned first.
#[derive(Default)]
pub struct TaskBoard {
    inner: Mutex<BoardEntries>,
}

/// Tasks remembered in memory (the store keeps them all).
pub const BOARD_CAPACITY: usize = 4096;

impl TaskBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoardEntries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update(&self, task: TaskId, f: impl FnOnce(&mut TaskState)) {
        let mut g = self.lock();
        if let Some(tx) = g.0.get(&task) {
            tx.send_modify(f);
            return;
        }
        let mut st = TaskState {
            task: task.to_string(),
            status: "running".into(),
            attempt: 0,
            committee: Vec::new(),
            marks: Vec::new(),
            output: None,
            model: String::new(),
            coordinator: String::new(),
        };
        f(&mut st);
        let (tx, _) = watch::channel(st);
        g.0.insert(task, tx);
        g.1.push_back(task);
        // Oldest first, but never an entry a client is waiting on: evicting it would
        // turn that client's request into a time-out.
        let mut scanned = 0;
        while g.1.len() > BOARD_CAPACITY && scanned < g.1.len() {
            let Some(old) = g.1.pop_front() else { break };
            if g.0.get(&old).is_some_and(|tx| tx.receiver_count() > 0) {
                g.1.push_back(old);
                scanned += 1;
            } else {
                g.0.remove(&old);
            }
        }
    }

    /// Update a task only if the board already tracks it (a verdict for someone else's
    /// task must not push out the entries of this node's clients).
    pub fn update_existing(&self, task: TaskId, f: impl FnOnce(&mut TaskState)) {
        if let Some(tx) = self.lock().0.get(&task) {
            tx.send_modify(f);
        }
    }

    pub fn get(&self, task: &TaskId) -> Option<TaskState> {
        self.lock().0.get(task).map(|tx| tx.borrow().clone())
    }

    pub fn subscribe(&self, task: &TaskId) -> Option<watch::Receiver<TaskState>> {
        self.lock().0.get(task).map(|tx| tx.subscribe())
    }

    /// Wait until the task is final, or `timeout`.
    pub async fn wait_final(&self, task: &TaskId, timeout: Duration) -> Option<TaskState> {
        let mut rx = self.subscribe(task)?;
        let fut = async {
            loop {
                if rx.borrow().is_final() {
                    return Some(rx.borrow().clone());
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.ok().flatten()
    }
}

pub enum LoopCmd {
    Submit {
        spec: Box<TaskSpec>,
        max_price: Option<u64>,
        reply: oneshot::Sender<Result<TaskId, RoundError>>,
    },
    Executed {
        task: TaskId,
        attempt: u8,
        tokens: Result<Vec<u32>, String>,
    },
    /// A seat this node committed to before: commit to the stored output again.
    Resume {
        task: TaskId,
        attempt: u8,
        tokens: Vec<u32>,
    },
    /// Refuse a seat, signed, with a checkable reason.
    Decline {
        task: TaskId,
        attempt: u8,
        reason: DeclineReason,
    },
    /// A replay of a verdict's outputs finished.
    Replayed(Box<ReplayDone>),
    /// A verdict's write to the store finished.
    Applied(Box<AppliedDone>),
    /// A fraud proof's verdict was looked up (off the loop).
    ProofChecked(Box<(SignedEnvelope, ProofCheck)>),
    /// The verifier thread checked a gossiped verdict.
    VerdictChecked(Box<(Validation, Result<VerifiedVerdict, sampo_consensus::VerifyError>)>),
}

/// Verdicts waiting for the verifier thread; beyond this they are not forwarded.
pub const VERIFY_QUEUE: usize = 64;

/// The verifier: checks gossiped verdicts (every nested signature, the quorum
/// arithmetic) on its own thread and hands the results back to the loop.
fn spawn_verifier(
    loop_tx: mpsc::Sender<LoopCmd>,
) -> std::io::Result<std::sync::mpsc::SyncSender<(SignedEnvelope, Validation)>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(SignedEnvelope, Validation)>(VERIFY_QUEUE);
    std::thread::Builder::new().name("sampo-verify".into()).spawn(move || {
        while let Ok((env, validation)) = rx.recv() {
            let result = sampo_consensus::verify(&env);
            if loop_tx.blocking_send(LoopCmd::VerdictChecked(Box::new((validation, result)))).is_err() {
                return;
            }
        }
    })?;
    Ok(tx)
}

pub struct AppliedDone {
    verdict: VerifiedVerdict,
    assessment: sampo_consensus::Assessment,
    result: Result<Applied, String>,
}

pub struct ReplayDone {
    verdict: VerifiedVerdict,
    reason: ReplayReason,
    /// The fraud proof the replay checked, if it checked one.
    proof: Option<SignedEnvelope>,
    outcome: Result<ReplayOutcome, String>,
}

/// Everything the loop needs.
pub struct LoopParts {
    pub consensus: Consensus,
    pub p2p: P2pHandle,
    pub p2p_events: mpsc::Receiver<P2pEvent>,
    pub commands: mpsc::Receiver<LoopCmd>,
    pub self_tx: mpsc::Sender<LoopCmd>,
    pub executor: Executor,
    pub models: Models,
    pub store: Arc<Store>,
    pub board: Arc<TaskBoard>,
    /// This node's own streamed runs, which its seats on the same tasks reuse.
    pub local_runs: Arc<LocalRuns>,
    pub metrics: Arc<NodeMetrics>,
    pub reputation: ReputationParams,
    /// Probation, trusted peers, prefix groups.
    pub trust: Arc<crate::trust::Trust>,
    pub announcement: NodeAnnouncement,
    pub announce_interval: Duration,
    pub max_tokens_per_task: u32,
    /// Fraction of finalized verdicts audited by replay.
    pub audit_rate: f64,
    pub replay_budget: ReplayBudget,
    /// Fraud proofs that arrived before the verdict they name (bounded).
    pub pending_proofs: PendingProofs,
    /// Replays queued or running, by (task, attempt): one at a time per verdict.
    pub replays_in_flight: std::collections::HashSet<(TaskId, u8)>,
    /// Verdict writes in flight at once (each a synced RocksDB batch).
    pub apply_slots: Arc<tokio::sync::Semaphore>,
    /// When the node started (ms since the epoch).
    pub started_ms: u64,
    /// When this node last announced no free slot (0: never).
    pub busy_announced_ms: u64,
    /// The minute each coordinator last left this node out (at most one record a minute).
    pub left_out_seen: HashMap<PeerId, u64>,
    pub shutdown: watch::Receiver<bool>,
}

/// How long a node announces itself before a coordinator is expected to know it.
pub const LEFT_OUT_GRACE: Duration = Duration::from_secs(30);

/// Whether a coordinator that created a task at `created_ms` should have listed this
/// node: it had been announcing for [`LEFT_OUT_GRACE`] by then, and no announcement of a
/// full house (no free slot) was recent enough for the coordinator to still go by it.
/// The verdict that says so arrives a whole round later, so the node's state now is no
/// guide.
fn could_have_been_listed(started_ms: u64, busy_announced_ms: u64, interval: Duration, created_ms: u64) -> bool {
    let known = started_ms.saturating_add(LEFT_OUT_GRACE.as_millis() as u64) <= created_ms;
    // A registry entry lives three announcements; one more for the gossip on its way.
    let busy_window = 4 * interval.as_millis() as u64;
    let busy = busy_announced_ms != 0 && busy_announced_ms.saturating_add(busy_window) >= created_ms;
    known && !busy
}

/// Replays queued or running at once: they never crowd paid work out of the queue.
pub const MAX_REPLAYS_IN_FLIGHT: usize = 4;

fn gossip_topic(t: Topic) -> GossipTopic {
    match t {
        Topic::Tasks(m) => GossipTopic::Tasks(m),
        Topic::Rounds => GossipTopic::Rounds,
    }
}

/// The registry as candidates for a committee, weighted by our reputation store, with
/// probation and network prefix groups as this node sees them.
pub fn candidates(p2p: &P2pHandle, store: &Store, trust: &crate::trust::Trust) -> Vec<Candidate> {
    let now = now_ms();
    p2p.live_nodes()
        .into_iter()
        .map(|n| {
            let rep = store.reputation(&n.peer).ok().flatten().unwrap_or_default();
            Candidate {
                peer: n.peer,
                models: n.announcement.models.iter().map(|m| m.id).collect(),
                price_per_1k: n.announcement.price_per_1k,
                free_slots: n.announcement.free_slots,
                score: trust.weight(&n.peer, &rep, now),
                banned: rep.is_banned(now),
                probation: !trust.established(&n.peer, &rep),
                group: trust.group(n.ip),
            }
        })
        .collect()
}

pub async fn run(mut p: LoopParts) {
    let me = p.consensus.peer_id();
    for m in &p.models.0 {
        let _ = p.p2p.subscribe(GossipTopic::Tasks(m.id)).await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut announce = tokio::time::interval(p.announce_interval);
    let mut started: HashMap<TaskId, Instant> = HashMap::new();
    let mut phase_clock: HashMap<TaskId, Instant> = HashMap::new();
    let verify_tx = match spawn_verifier(p.self_tx.clone()) {
        Ok(tx) => tx,
        Err(e) => {
            warn!(error = %e, "could not start the verifier thread; the event loop stops");
            return;
        }
    };
    loop {
        let actions: Vec<Action> = tokio::select! {
            _ = p.shutdown.changed() => break,
            ev = p.p2p_events.recv() => match ev {
                None => break,
                Some(P2pEvent::Message { envelope, from, validation }) if envelope.kind() == MessageKind::Verdict => {
                    // Every nested signature: checked on the verifier thread, not here.
                    if verify_tx.try_send((envelope, validation.clone())).is_err() {
                        p.p2p.report(validation, Acceptance::Ignore);
                        p.metrics.refused_messages.inc();
                        debug!(%from, "verifier busy; verdict not forwarded");
                    }
                    Vec::new()
                }
                Some(P2pEvent::Message { envelope, from, validation }) => {
                    debug!(target: "sampo::timeline", kind = ?envelope.kind(), task = ?envelope_task(&envelope), %from, "received");
                    match p.consensus.handle(&envelope, now_ms()) {
                        Ok(a) => {
                            p.p2p.report(validation, Acceptance::Accept);
                            if envelope.kind() == MessageKind::FraudProof {
                                check_fraud_proof(&p, &envelope);
                            }
                            a
                        }
                        Err(e) => {
                            debug!(%from, error = %e, "protocol message refused");
                            // The protocol's refusals reach the sender's gossip score.
                            p.p2p.report(validation, if e.merits_penalty() { Acceptance::Reject } else { Acceptance::Ignore });
                            p.metrics.refused_messages.inc();
                            Vec::new()
                        }
                    }
                }
                Some(P2pEvent::FetchRequested { id, request, .. }) => {
                    let resp = fetch_answer(&p.store, &request);
                    let _ = p.p2p.respond(id, resp).await;
                    Vec::new()
                }
                Some(P2pEvent::NodeJoined(peer)) => { info!(%peer, "node joined"); Vec::new() }
                Some(P2pEvent::NodeLeft(peer)) => { info!(%peer, "node left"); Vec::new() }
                Some(_) => Vec::new(),
            },
            cmd = p.commands.recv() => match cmd {
                None => break,
                Some(LoopCmd::Submit { spec, max_price, reply }) => {
                    let cands = candidates(&p.p2p, &p.store, &p.trust);
                    match p.consensus.submit(*spec.clone(), max_price, &cands, now_ms()) {
                        Ok((task, actions)) => {
                            started.insert(task, Instant::now());
                            phase_clock.insert(task, Instant::now());
                            let view = p.consensus.view(&task);
                            p.board.update(task, |s| {
                                s.model = spec.model.to_string();
                                s.coordinator = me.to_string();
                                if let Some(v) = view { s.committee = v.committee.iter().map(|c| c.to_string()).collect(); }
                            });
                            let _ = reply.send(Ok(task));
                            actions
                        }
                        Err(e) => { let _ = reply.send(Err(e)); Vec::new() }
                    }
                }
                Some(LoopCmd::Executed { task, attempt, tokens }) => match tokens {
                    Ok(tokens) => p.consensus.executed(task, attempt, tokens, now_ms()),
                    Err(e) => { warn!(%task, error = %e, "inference failed; the seat stays empty"); Vec::new() }
                },
                Some(LoopCmd::Resume { task, attempt, tokens }) => p.consensus.resume(task, attempt, tokens, now_ms()),
                Some(LoopCmd::Decline { task, attempt, reason }) => {
                    info!(%task, ?reason, "declining a seat");
                    p.consensus.decline(task, attempt, reason, now_ms())
                }
                Some(LoopCmd::VerdictChecked(checked)) => {
                    let (validation, result) = *checked;
                    match result {
                        Ok(v) => {
                            p.p2p.report(validation, Acceptance::Accept);
                            p.consensus.handle_verified(v, now_ms())
                        }
                        Err(e) => {
                            debug!(error = %e, "verdict refused");
                            p.p2p.report(validation, Acceptance::Reject);
                            p.metrics.refused_messages.inc();
                            Vec::new()
                        }
                    }
                }
                Some(LoopCmd::ProofChecked(checked)) => {
                    let (proof, check) = *checked;
                    match check {
                        ProofCheck::Applied(v) => schedule_replay(&mut p, *v, ReplayReason::FraudProof, Some(proof)),
                        ProofCheck::VerdictNotYet => {
                            if let Ok(f) = proof.open::<FraudProof>() {
                                p.pending_proofs.park((f.task, f.attempt), proof, now_ms());
                            }
                        }
                    }
                    Vec::new()
                }
                Some(LoopCmd::Applied(done)) => {
                    after_apply(&mut p, me, *done).await;
                    Vec::new()
                }
                Some(LoopCmd::Replayed(done)) => {
                    let ReplayDone { verdict, reason, proof, outcome } = *done;
                    replayed(&mut p, verdict, reason, proof, outcome).await
                }
            },
            _ = tick.tick() => {
                p.metrics.queue_depth.set(p.executor.queued() as i64);
                p.metrics.inference_sequences.set(p.executor.running() as i64);
                let reused = p.executor.reused_prompt_tokens();
                p.metrics.prompt_tokens_reused.inc_by(reused.saturating_sub(p.metrics.prompt_tokens_reused.get()));
                // Only coordinated rounds need candidates (substitutes, escalation): don't
                // read every peer's reputation five times a second for nothing.
                let cands = if p.consensus.load().0 > 0 { candidates(&p.p2p, &p.store, &p.trust) } else { Vec::new() };
                p.consensus.tick(now_ms(), &cands)
            }
            _ = announce.tick() => {
                let mut a = p.announcement.clone();
                a.free_slots = p.executor.free_slots();
                if a.free_slots == 0 {
                    p.busy_announced_ms = now_ms();
                }
                let _ = p.p2p.set_announcement(a).await;
                refresh_reputation_gauges(&p.store, &p.reputation, &p.metrics);
                // Established peers are never evicted from a full registry for a newcomer.
                if let Ok(all) = p.store.reputations() {
                    let trust = &p.trust;
                    p.p2p.set_valued(
                        all.into_iter().filter(|(peer, r)| trust.established(peer, r)).map(|(peer, _)| peer).collect(),
                    );
                }
                Vec::new()
            }
        };
        // A commit is published only once it is stored (synced): answering a
        // re-announcement with the same commit after a restart depends on it. The write
        // and the publish that waits for it run off the loop.
        let mut actions = actions;
        while !actions.is_empty() {
            let action = actions.remove(0);
            if let Action::StoreCommit { task, attempt, tokens } = action {
                let at = actions.iter().position(|a| {
                    matches!(a, Action::Publish { envelope, .. }
                        if envelope.open::<Commit>().is_ok_and(|c| c.task == task && c.attempt == attempt))
                });
                let commit = at.map(|i| actions.remove(i));
                let (store, p2p, metrics) = (p.store.clone(), p.p2p.clone(), p.metrics.clone());
                tokio::spawn(
                    async move {
                        let t0 = Instant::now();
                        let stored =
                            tokio::task::spawn_blocking(move || store.store_commit(&task, attempt, &tokens, now_ms()))
                                .await;
                        metrics.observe_phase("commit_store", t0);
                        if !matches!(stored, Ok(Ok(()))) {
                            warn!(%task, "could not store a commit; not publishing it");
                            return;
                        }
                        if let Some(Action::Publish { topic, envelope, to }) = commit {
                            deliver(&p2p, topic, envelope, to).await;
                        }
                    }
                    .instrument(tracing::info_span!("store-commit")),
                );
                continue;
            }
            act(&mut p, action, me, (&mut started, &mut phase_clock)).await;
        }
    }
    info!("event loop stopped");
}

fn fetch_answer(store: &Store, req: &FetchRequest) -> FetchResponse {
    let task = match req {
        FetchRequest::Evidence { task } | FetchRequest::Result { task } => task,
    };
    match store.evidence(task) {
        Ok(list) => match list.last() {
            Some(r) => FetchResponse::Found(r.verdict.to_bytes()),
            None => FetchResponse::NotFound,
        },
        Err(_) => FetchResponse::NotFound,
    }
}

/// How long a flooding node behaves before it floods.
pub const FLOOD_DELAY: Duration = Duration::from_secs(15);

/// Fault injection for soak tests: gossip `per_second` verdicts that are signed by this
/// node but whose evidence contradicts their claims, so every receiver rejects them.
pub async fn flood_loop(
    p2p: P2pHandle,
    key: sampo_consensus::NodeKey,
    per_second: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    // Join the mesh first (announce, be seen), as a real attacker would.
    tokio::select! {
        _ = shutdown.changed() => return,
        _ = tokio::time::sleep(FLOOD_DELAY) => {}
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let spec = TaskSpec {
            coordinator: key.peer_id(),
            nonce: n,
            created_ms: now_ms(),
            model: sampo_consensus::ModelId(sampo_consensus::Hash32::of(b"flood")),
            prompt: sampo_consensus::Prompt::Text("flood".into()),
            params: sampo_consensus::SamplingParams::default(),
            k: 1,
            max_escalations: 0,
            fee: 0,
            client_entropy: [7; 32],
        };
        let task = spec.id();
        let ann = sampo_consensus::TaskAnnouncement {
            spec,
            attempt: 0,
            revision: 0,
            committee: vec![key.peer_id()],
            commit_deadline_ms: 1,
            reveal_deadline_ms: 2,
            candidates: [key.peer_id()].iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
        };
        let Ok(announcement) = SignedEnvelope::seal(&key, &ann) else { continue };
        // Claims a finalized output that no reveal supports.
        let verdict = sampo_consensus::Verdict {
            task,
            attempt: 0,
            outcome: Outcome::Finalized { output: vec![1, 2, 3] },
            marks: vec![(key.peer_id(), Mark::Agreed)],
            payouts: Vec::new(),
            evidence: sampo_consensus::Evidence {
                announcement,
                reveal_request: None,
                commits: Vec::new(),
                reveals: Vec::new(),
                equivocations: Vec::new(),
                declines: Vec::new(),
            },
            decided_ms: now_ms(),
        };
        if let Ok(env) = SignedEnvelope::seal(&key, &verdict) {
            let _ = p2p.publish(GossipTopic::Rounds, env).await;
        }
    }
}

/// Retention passes, off the event loop, until shutdown.
/// Refund holds that no verdict closed within `max_age` (a round lost to a restart, a
/// task that never reached a verdict), at start-up and then every `every`.
pub async fn hold_sweep_loop(
    store: Arc<Store>,
    max_age: Duration,
    every: Duration,
    metrics: Arc<NodeMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let s = store.clone();
        let age = max_age.as_millis() as u64;
        let swept = tokio::task::spawn_blocking(move || {
            s.refund_stale(now_ms(), age).map(|tasks| {
                let returned: u64 =
                    tasks.iter().filter_map(|t| s.closed_of(t).ok().flatten()).map(|c| c.returned).sum();
                (tasks, returned)
            })
        });
        match swept.await {
            Ok(Ok((tasks, returned))) if !tasks.is_empty() => {
                info!(count = tasks.len(), returned, "refunded holds of tasks that reached no verdict");
                metrics.fees_settled.inc_by(returned);
                metrics.fees_returned.inc_by(returned);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "hold sweep failed"),
            Err(e) => warn!(error = %e, "hold sweep panicked"),
        }
    }
}

pub async fn prune_loop(
    store: Arc<Store>,
    retention: sampo_storage::Retention,
    rp: ReputationParams,
    every: Duration,
    metrics: Arc<NodeMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let (s, r, p) = (store.clone(), retention.clone(), rp.clone());
        match tokio::task::spawn_blocking(move || s.prune(now_ms(), &r, &p)).await {
            Ok(Ok(pruned)) => {
                for (kind, n) in [
                    ("evidence", pruned.evidence),
                    ("task", pruned.tasks),
                    ("commit", pruned.commits),
                    ("replay", pruned.replays),
                    ("reputation", pruned.reputations),
                ] {
                    metrics.pruned.get_or_create(&crate::metrics::KindLabel { kind: kind.into() }).inc_by(n as u64);
                }
                debug!(?pruned, "retention pass");
            }
            Ok(Err(e)) => warn!(error = %e, "retention pass failed"),
            Err(e) => warn!(error = %e, "retention pass panicked"),
        }
    }
}

fn refresh_reputation_gauges(store: &Store, rp: &ReputationParams, m: &NodeMetrics) {
    let now = now_ms();
    let mut buckets = [0i64; 5];
    let mut banned = 0;
    for (_, r) in store.reputations().unwrap_or_default() {
        let s = r.score_at(now, rp);
        buckets[((s * 5.0) as usize).min(4)] += 1;
        banned += i64::from(r.is_banned(now));
    }
    for (i, n) in buckets.iter().enumerate() {
        m.reputation_peers
            .get_or_create(&crate::metrics::ScoreBucket { score_up_to: format!("{:.1}", (i + 1) as f64 / 5.0) })
            .set(*n);
    }
    m.banned_peers.set(banned);
}

/// The task a coordinator's reveal request is about.
fn envelope_task(env: &SignedEnvelope) -> Option<TaskId> {
    env.open::<sampo_consensus::RevealRequest>().ok().map(|r| r.task)
}

async fn act(
    p: &mut LoopParts,
    action: Action,
    me: PeerId,
    (started, phase_clock): (&mut HashMap<TaskId, Instant>, &mut HashMap<TaskId, Instant>),
) {
    match action {
        Action::Publish { topic, envelope, to } => {
            // A coordinator's phase boundaries: the reveal request closes the commits, the
            // verdict the reveals.
            let phase = match envelope.kind() {
                MessageKind::RevealRequest => Some("commits"),
                _ => None,
            };
            if let Some(phase) = phase
                && let Some(task) = envelope_task(&envelope)
                && let Some(clock) = phase_clock.get_mut(&task)
            {
                p.metrics.observe_phase(phase, *clock);
                *clock = Instant::now();
            }
            debug!(target: "sampo::timeline", kind = ?envelope.kind(), task = ?envelope_task(&envelope), direct = !to.is_empty(), "publish");
            deliver(&p.p2p, topic, envelope, to).await
        }
        // Stored by the loop before the commit it precedes is published.
        Action::StoreCommit { .. } => {}
        Action::Execute { task, attempt, spec, commit_deadline_ms } => {
            let Some(model) = p.models.by_id(&spec.model).cloned() else {
                debug!(%task, "seated for a model we do not serve");
                return;
            };
            // Everything that reads the store, tokenizes or waits runs off the loop; what
            // it decides comes back as a command.
            let (store, tx, executor, metrics, local_runs) =
                (p.store.clone(), p.self_tx.clone(), p.executor.clone(), p.metrics.clone(), p.local_runs.clone());
            let max_tokens_per_task = p.max_tokens_per_task;
            let seated = Instant::now();
            // One host's clock: the announcement's way from the coordinator's submission
            // to this seat (across hosts, this includes their clock skew).
            p.metrics
                .round_phase_seconds
                .get_or_create(&crate::metrics::PhaseLabel { phase: "announcement" })
                .observe(now_ms().saturating_sub(spec.created_ms) as f64 / 1000.0);
            tokio::spawn(
                async move {
                    let back = |cmd| async { tx.send(cmd).await.is_ok() };
                    let decline = |reason| LoopCmd::Decline { task, attempt, reason };
                    // Decided before any blocking work, acted on after the stored-commit
                    // check (a seat committed before commits the same whatever now holds).
                    let price = DeclineReason::Price { price_per_1k: model.price_per_1k };
                    let refusal = if price.holds_for(&spec, committee_size(spec.k, attempt)) {
                        Some(price)
                    } else if spec.params.max_tokens > max_tokens_per_task {
                        Some(DeclineReason::MaxTokens { limit: max_tokens_per_task })
                    } else {
                        None
                    };
                    // One trip to the blocking pool (each costs a thread wake-up, which a
                    // busy two-core machine pays for in milliseconds): the store read,
                    // then the prompt's tokens when the seat is to be run.
                    let (m, text) = (model.clone(), spec.prompt.clone());
                    let prepared = tokio::task::spawn_blocking(move || {
                        // Seated before (re-announced, or before a restart): the same commit.
                        if let Ok(Some(stored)) = store.stored_commit(&task, attempt) {
                            return SeatPrep::Stored(stored.tokens);
                        }
                        if let Some(reason) = refusal {
                            return SeatPrep::Refuse(reason);
                        }
                        SeatPrep::Prompt(m.prompt_tokens(&text))
                    })
                    .await;
                    let prompt = match prepared {
                        Ok(SeatPrep::Stored(tokens)) => {
                            back(LoopCmd::Resume { task, attempt, tokens }).await;
                            return;
                        }
                        Ok(SeatPrep::Refuse(reason)) => {
                            if matches!(reason, DeclineReason::MaxTokens { .. }) {
                                metrics.queue_rejections.inc();
                            }
                            back(decline(reason)).await;
                            return;
                        }
                        Ok(SeatPrep::Prompt(Ok(t))) => t,
                        Ok(SeatPrep::Prompt(Err(e))) => {
                            warn!(%task, error = %e, "cannot build the prompt");
                            return;
                        }
                        Err(_) => return,
                    };
                    let ctx = model.context_length();
                    if prompt.len() + spec.params.max_tokens as usize > ctx {
                        let limit = u32::try_from(ctx).unwrap_or(u32::MAX);
                        back(decline(DeclineReason::Context { limit })).await;
                        return;
                    }
                    metrics.observe_phase("seat_prepare", seated);
                    let queued = Instant::now();
                    // This node streams the same task to its own client: that run's tokens
                    // are this seat's (decoding them twice would halve its throughput).
                    // Never past the commit deadline (a run that is not done by then would
                    // make the seat absent anyway).
                    let until = Duration::from_millis(commit_deadline_ms.saturating_sub(now_ms()));
                    if let Ok(Some(tokens)) = tokio::time::timeout(until, local_runs.take(&task, &prompt)).await {
                        metrics.observe_phase("inference", queued);
                        back(LoopCmd::Executed { task, attempt, tokens: Ok(tokens) }).await;
                        return;
                    }
                    let (done, rx) = oneshot::channel();
                    let job = Job {
                        // +1: replays (priority 0) run behind all paid and unpaid work.
                        priority: spec.fee_per_1k_tokens().saturating_add(1),
                        engine: model.engine.clone(),
                        prompt,
                        params: model.sampling(&spec),
                        stream: None,
                        done,
                    };
                    if let Err(e) = executor.submit(job) {
                        metrics.queue_rejections.inc();
                        warn!(%task, error = %e, "declining a seat");
                        back(decline(DeclineReason::Full)).await;
                        return;
                    }
                    let tokens = match rx.await {
                        // Cut short (shutdown): not the model's output, so never committed.
                        Ok(Ok(g)) if g.finish == sampo_kernels::FinishReason::Cancelled => {
                            Err("the inference was cancelled".into())
                        }
                        Ok(Ok(g)) => {
                            metrics.observe_generation(&g);
                            Ok(g.tokens)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("executor dropped the job".into()),
                    };
                    metrics.observe_phase("inference", queued);
                    back(LoopCmd::Executed { task, attempt, tokens }).await;
                }
                .instrument(tracing::info_span!("seat", %task, attempt)),
            );
        }
        Action::Apply(v) => {
            // Only what the trust model allows this node to conclude is applied now.
            let coordinator_rep = p.store.reputation(&v.coordinator).ok().flatten().unwrap_or_default();
            let mut assessment = assess(&v, &me, p.trust.established(&v.coordinator, &coordinator_rep));
            // Members whose commit came in time, after this node closed the phase early.
            let excused = p.consensus.excused(&v.task(), v.verdict.attempt);
            assessment.marks.retain(|(peer, m)| !(*m == Mark::Absent && excused.contains(peer)));
            let effects = Effects::from(&assessment);
            // The synced write happens off the loop (bounded), which hears back when done.
            let (store, rp, tx, slots) =
                (p.store.clone(), p.reputation.clone(), p.self_tx.clone(), p.apply_slots.clone());
            let (metrics, board) = (p.metrics.clone(), p.board.clone());
            // Only a coordinator holds fees (at its API): nobody else reads the ledger here.
            let coordinating = v.coordinator == me;
            tokio::spawn(
                async move {
                    let Ok(_permit) = slots.acquire_owned().await else { return };
                    let vv = v.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        let held = coordinating && store.hold_of(&vv.task()).ok().flatten().is_some();
                        let t0 = Instant::now();
                        let r = store.apply_verdict(&vv, &effects, now_ms(), &rp);
                        metrics.observe_phase("apply", t0);
                        // A hold this verdict closed: what it paid out and returned.
                        if held && let Ok(Some(c)) = store.closed_of(&vv.task()) {
                            metrics.fees_settled.inc_by(c.paid.saturating_add(c.returned));
                            metrics.payouts.inc_by(c.paid);
                            metrics.fees_returned.inc_by(c.returned);
                        }
                        let r = r.map_err(|e| e.to_string());
                        record_applied(&board, &metrics, &me, &vv, &r);
                        r
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                    let _ = tx.send(LoopCmd::Applied(Box::new(AppliedDone { verdict: *v, assessment, result }))).await;
                }
                .instrument(tracing::info_span!("apply-verdict")),
            );
        }
        Action::LeftOut { coordinator, model, offered_per_1k, created_ms } => {
            // Only when this node was eligible when the task was created (serves the model
            // at that price, had been announcing long enough for the coordinator to know
            // it, announced no full house lately), and at most once a minute per
            // coordinator.
            let minute = now_ms() / 60_000;
            let eligible = p.models.by_id(&model).is_some_and(|m| m.price_per_1k <= offered_per_1k)
                && could_have_been_listed(p.started_ms, p.busy_announced_ms, p.announce_interval, created_ms);
            if !eligible || p.left_out_seen.get(&coordinator) == Some(&minute) {
                return;
            }
            if p.left_out_seen.len() >= 4096 {
                p.left_out_seen.retain(|_, m| *m == minute);
            }
            p.left_out_seen.insert(coordinator, minute);
            p.metrics.left_out.inc();
            let (store, rp) = (p.store.clone(), p.reputation.clone());
            tokio::spawn(
                async move {
                    let _ =
                        tokio::task::spawn_blocking(move || store.record_left_out(&coordinator, now_ms(), &rp)).await;
                }
                .instrument(tracing::info_span!("left-out")),
            );
        }
        Action::Finished { task, outcome } => {
            // The verdict follows in the same batch of actions.
            if let Some(clock) = phase_clock.remove(&task) {
                p.metrics.observe_phase("reveals", clock);
            }
            if let Some(t0) = started.remove(&task) {
                p.metrics.round_seconds.observe(t0.elapsed().as_secs_f64());
            }
            if outcome == Outcome::Disputed {
                p.board.update(task, |s| s.status = "disputed".into());
                // No verdict may follow (no larger committee could be seated): the
                // client's hold goes back; idempotent if a verdict already refunded it.
                let store = p.store.clone();
                tokio::spawn(
                    async move {
                        let _ = tokio::task::spawn_blocking(move || store.refund(&task, now_ms())).await;
                    }
                    .instrument(tracing::info_span!("refund")),
                );
            }
        }
    }
}

/// What a seat's one trip to the blocking pool found.
enum SeatPrep {
    /// A commit stored for this seat before.
    Stored(Vec<u32>),
    /// Not to be run, for a reason decided before the trip.
    Refuse(DeclineReason),
    /// The prompt's tokens, or why they could not be built.
    Prompt(Result<Vec<u32>, sampo_kernels::KernelError>),
}

/// A verdict's synced write finished: what follows needs the loop's state.
async fn after_apply(p: &mut LoopParts, me: PeerId, done: AppliedDone) {
    let AppliedDone { verdict: v, assessment, result } = done;
    if matches!(result, Ok(Applied::AlreadyApplied | Applied::CoordinatorEquivocation)) {
        return;
    }
    // Independent of any proof already parked for it: a bogus early proof must
    // not stand in for this node's own replay.
    if needs_replay(&v, &assessment, &me, p.audit_rate, rand::random::<f64>()) {
        let reason = if assessment.contested.is_empty() { ReplayReason::Audit } else { ReplayReason::Contested };
        schedule_replay(p, v.clone(), reason, None);
    }
    for proof in p.pending_proofs.take((v.task(), v.verdict.attempt), now_ms()) {
        check_fraud_proof(p, &proof);
    }
}

/// What a verdict's synced write means for the task board and the metrics, right where
/// the write finished: a client waiting on the board does not wait for the event loop.
fn record_applied(
    board: &TaskBoard,
    metrics: &NodeMetrics,
    me: &PeerId,
    v: &VerifiedVerdict,
    result: &Result<Applied, String>,
) {
    let role = if v.coordinator == *me {
        "coordinator"
    } else if v.committee.contains(me) {
        "member"
    } else {
        "observer"
    };
    match result {
        Ok(Applied::New) => {}
        Ok(Applied::AlreadyApplied) => return,
        Ok(Applied::CoordinatorEquivocation) => {
            metrics.coordinator_equivocations.inc();
            warn!(task = %v.task(), coordinator = %v.coordinator, "two verdicts for one attempt: coordinator banned");
            return;
        }
        Err(e) => {
            warn!(task = %v.task(), error = %e, "could not store a verdict");
            // No answer without a durable record: the hold stays unsettled (refunded as
            // stale), so handing out the output would give it away unpaid.
            board.update_existing(v.task(), |s| {
                if v.verdict.attempt >= s.attempt {
                    s.attempt = v.verdict.attempt;
                    s.status = "unrecorded".into();
                    s.output = None;
                }
            });
            return;
        }
    }
    metrics
        .tasks
        .get_or_create(&crate::metrics::TaskLabels { role: role.into(), outcome: v.verdict.outcome.as_str().into() })
        .inc();
    let mine = v.verdict.marks.iter().find(|(peer, _)| peer == me).map(|(_, m)| *m);
    if let Some(Mark::Wrong) = mine {
        warn!(task = %v.task(), "a verdict marked this node wrong");
    }
    let fill = |s: &mut TaskState| {
        // Verdicts of one task's attempts may be applied out of order: the latest stands.
        if v.verdict.attempt < s.attempt {
            return;
        }
        s.attempt = v.verdict.attempt;
        s.committee = v.committee.iter().map(|c| c.to_string()).collect();
        s.marks = v.verdict.marks.iter().map(|(peer, m)| (peer.to_string(), format!("{m:?}").to_lowercase())).collect();
        s.coordinator = v.coordinator.to_string();
        s.model = v.spec.model.to_string();
        match &v.verdict.outcome {
            Outcome::Finalized { output } => {
                s.status = "finalized".into();
                s.output = Some(output.clone());
            }
            Outcome::Escalated => s.status = "escalated".into(),
            Outcome::Disputed => s.status = "disputed".into(),
        }
    };
    if role == "observer" {
        board.update_existing(v.task(), fill);
    } else {
        board.update(v.task(), fill);
    }
}

/// Queue a replay of `v` at the lowest priority, within the budget of the peer that
/// caused it (the verdict's coordinator, or the fraud proof's sender).
fn schedule_replay(p: &mut LoopParts, v: VerifiedVerdict, reason: ReplayReason, proof: Option<SignedEnvelope>) {
    let Some(model) = p.models.by_id(&v.spec.model).cloned() else { return };
    let key = (v.task(), v.verdict.attempt);
    if p.replays_in_flight.contains(&key) || p.replays_in_flight.len() >= MAX_REPLAYS_IN_FLIGHT {
        p.metrics.replay(reason.as_str(), "skipped");
        return;
    }
    // Rounds this node coordinated or revealed in are work it chose to take on: no
    // budget applies to them. Everything else is charged to whoever caused it.
    let payer = proof.as_ref().map_or(v.coordinator, |e| e.signer());
    if !sampo_consensus::took_part(&v, &p.consensus.peer_id()) && !p.replay_budget.take(payer, now_ms()) {
        p.metrics.replay(reason.as_str(), "skipped");
        return;
    }
    let tx = p.self_tx.clone();
    let call = Box::new(move || {
        let outcome = replay_verdict(&model, &v);
        // The loop may be gone at shutdown; the replay is then moot.
        let _ = tx.blocking_send(LoopCmd::Replayed(Box::new(ReplayDone { verdict: v, reason, proof, outcome })));
    });
    if p.executor.submit_call(0, call).is_err() {
        p.metrics.replay(reason.as_str(), "skipped");
        return;
    }
    p.replays_in_flight.insert(key);
}

/// A fraud proof from the network: checked by this node's own replay before anything.
fn check_fraud_proof(p: &LoopParts, env: &SignedEnvelope) {
    let Ok(proof) = env.open::<FraudProof>() else { return };
    let (store, tx, env) = (p.store.clone(), p.self_tx.clone(), env.clone());
    let (task, attempt) = (proof.task, proof.attempt);
    // The proof names a verdict, but what convinces is this node's replay of the verdict
    // *it* applied for that attempt (a coordinator that signed two must not split the
    // network into halves that ignore each other's proofs). The store reads and the
    // verdict's signatures are checked off the loop, which hears back.
    tokio::spawn(
        async move {
            let found = tokio::task::spawn_blocking(move || {
                if store.replay_record(&task, attempt).ok().flatten().is_some() {
                    return None;
                }
                match store.verdict_of(&task, attempt).ok().flatten() {
                    None => Some(ProofCheck::VerdictNotYet),
                    Some(r) => sampo_consensus::verify(&r.verdict).ok().map(|v| ProofCheck::Applied(Box::new(v))),
                }
            })
            .await;
            if let Ok(Some(check)) = found {
                let _ = tx.send(LoopCmd::ProofChecked(Box::new((env, check)))).await;
            }
        }
        .instrument(tracing::info_span!("fraud-proof")),
    );
}

/// What the store holds for the attempt a fraud proof names.
pub enum ProofCheck {
    /// The verdict this node applied for it (verified again).
    Applied(Box<VerifiedVerdict>),
    /// Nothing yet: the verdict may still be on its way.
    VerdictNotYet,
}

/// A replay finished: record what it settled; a refuted finalized output is overturned
/// and, unless this replay checked someone else's proof, proven to everyone.
async fn replayed(
    p: &mut LoopParts,
    v: VerifiedVerdict,
    reason: ReplayReason,
    proof: Option<SignedEnvelope>,
    outcome: Result<ReplayOutcome, String>,
) -> Vec<Action> {
    p.replays_in_flight.remove(&(v.task(), v.verdict.attempt));
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            p.metrics.replay(reason.as_str(), "failed");
            warn!(task = %v.task(), error = %e, "replay failed; nothing concluded");
            return Vec::new();
        }
    };
    let j = judge(&v, &|o| outcome.produced.get(o).copied());
    p.metrics.replay(reason.as_str(), if j.overturned { "refuted" } else { "upheld" });
    let position = outcome.winner_divergence.as_ref().map_or(0, |d| d.position as u32);
    let mut actions = Vec::new();
    let proof = match (j.overturned, proof) {
        (true, Some(theirs)) => Some(theirs),
        (true, None) => {
            let msg = FraudProof {
                task: v.task(),
                attempt: v.verdict.attempt,
                verdict: v.envelope.id(),
                position,
                expected: outcome.winner_divergence.as_ref().and_then(|d| d.expected),
            };
            match p.consensus.sign(&msg) {
                Some(env) => {
                    p.metrics.fraud_proofs_sent.inc();
                    actions.push(Action::Publish { topic: Topic::Rounds, envelope: env.clone(), to: Vec::new() });
                    Some(env)
                }
                None => None,
            }
        }
        (false, theirs) => {
            if theirs.is_some() {
                info!(task = %v.task(), "a fraud proof did not hold up: the model produces the output");
            }
            None
        }
    };
    let store = p.store.clone();
    let rp = p.reputation.clone();
    let (vv, jj, pp) = (v.clone(), j.clone(), proof.clone());
    if j.overturned {
        warn!(task = %v.task(), liars = j.liars.len(), position, "finalized output refuted by replay: overturned");
    }
    // The synced write runs off the loop; the task shows as overturned once the record
    // saying by whom and where is stored, never before.
    let (board, overturned) = (p.board.clone(), j.overturned);
    tokio::spawn(
        async move {
            let task = vv.task();
            let applied =
                tokio::task::spawn_blocking(move || store.apply_replay(&vv, &jj, pp.as_ref(), position, now_ms(), &rp))
                    .await;
            if !matches!(applied, Ok(Ok(_))) {
                warn!(%task, "could not store a replay's conclusions");
            } else if overturned {
                board.update_existing(task, |s| s.status = "overturned".into());
            }
        }
        .instrument(tracing::info_span!("store-replay")),
    );
    actions
}

async fn publish(p2p: &P2pHandle, topic: Topic, envelope: SignedEnvelope) {
    if let Err(e) = p2p.publish(gossip_topic(topic), envelope).await {
        warn!(error = %e, "publish failed");
    }
}

/// Gossip to everyone (`to` empty), or send straight to the peers in `to` (the p2p
/// layer gossips it to any it cannot reach that way).
async fn deliver(p2p: &P2pHandle, topic: Topic, envelope: SignedEnvelope, to: Vec<PeerId>) {
    if to.is_empty() {
        return publish(p2p, topic, envelope).await;
    }
    if let Err(e) = p2p.send(to, gossip_topic(topic), envelope).await {
        warn!(error = %e, "send failed");
    }
}

/// A handle for the API: submit tasks, see their state.
#[derive(Clone)]
pub struct Runtime {
    pub tx: mpsc::Sender<LoopCmd>,
    pub board: Arc<TaskBoard>,
    pub local_runs: Arc<LocalRuns>,
}

impl Runtime {
    pub async fn submit(&self, spec: TaskSpec, max_price: Option<u64>) -> Result<TaskId, SubmitTaskError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(LoopCmd::Submit { spec: Box::new(spec), max_price, reply })
            .map_err(|_| SubmitTaskError::Busy)?;
        rx.await.map_err(|_| SubmitTaskError::Stopped)?.map_err(SubmitTaskError::Round)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitTaskError {
    #[error("the node's event loop is busy")]
    Busy,
    #[error("the node is shutting down")]
    Stopped,
    #[error(transparent)]
    Round(RoundError),
}

/// The announcement template for this node's models.
pub fn announcement(models: &Models, backend: &str, device: &str, api_url: &str) -> NodeAnnouncement {
    NodeAnnouncement {
        models: models.0.iter().map(|m| ModelRef { id: m.id, name: m.name.clone() }).collect(),
        price_per_1k: models.0.iter().map(|m| m.price_per_1k).min().unwrap_or(0),
        free_slots: 0,
        backend: backend.into(),
        device: device.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        addrs: Vec::new(),
        api_url: Some(api_url.into()),
        sent_ms: now_ms(),
        certificate: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sampo_consensus::Hash32;

    fn id(i: u64) -> TaskId {
        TaskId(Hash32::of(&i.to_le_bytes()))
    }

    /// A finalized verdict that could not be written gives its waiting client no output
    /// (the fee's hold was not settled); one that was written does.
    #[test]
    fn a_verdict_the_store_could_not_write_answers_nobody_with_its_output() {
        let mut net = sampo_consensus::sim::SimNet::new(5, sampo_consensus::RoundParams::default(), |_| {
            sampo_consensus::Behaviour::Honest
        });
        let spec = net.spec(0, 3, 0);
        let task = net.submit(0, spec).expect("submit");
        net.run(60_000);
        let v = net.verdicts(0, &task)[0].clone();
        let me = net.peer(0);
        let metrics = NodeMetrics::register(&mut prometheus_client::registry::Registry::default());
        for (result, status, output) in
            [(Err("disk full".to_owned()), "unrecorded", false), (Ok(Applied::New), "finalized", true)]
        {
            let board = TaskBoard::default();
            board.update(task, |s| s.status = "running".into());
            record_applied(&board, &metrics, &me, &v, &result);
            let st = board.get(&task).expect("on the board");
            assert!(st.is_final(), "{status}");
            assert_eq!((st.status.as_str(), st.output.is_some()), (status, output));
        }
    }

    /// A flood of other tasks (e.g. forged verdicts) cannot evict the entry a client is
    /// waiting on; the board stays bounded otherwise.
    #[tokio::test]
    async fn a_seat_takes_its_own_streamed_run_only_when_it_finished_on_the_same_prompt() {
        let runs = LocalRuns::default();
        // Finished: the seat gets its tokens, once.
        let tx = runs.register(id(1), vec![1, 2]).expect("room");
        tx.send(vec![7, 8, 9]).expect("send");
        assert_eq!(runs.take(&id(1), &[1, 2]).await, Some(vec![7, 8, 9]));
        assert_eq!(runs.take(&id(1), &[1, 2]).await, None, "taken once");
        // Another prompt (whatever the reason): not this seat's output.
        let tx = runs.register(id(2), vec![1, 2]).expect("room");
        tx.send(vec![7]).expect("send");
        assert_eq!(runs.take(&id(2), &[1, 3]).await, None);
        // Not finished (cancelled, failed, its client gone): the seat runs it itself.
        let tx = runs.register(id(4), vec![1]).expect("room");
        drop(tx);
        assert_eq!(runs.take(&id(4), &[1]).await, None);
        // Waits for a run still going.
        let tx = runs.register(id(5), vec![1]).expect("room");
        let finish = async move {
            tokio::task::yield_now().await;
            tx.send(vec![4]).expect("send");
        };
        let five = id(5);
        let (taken, ()) = tokio::join!(runs.take(&five, &[1]), finish);
        assert_eq!(taken, Some(vec![4]));
        // Forgotten when its request ends, and bounded.
        let _tx = runs.register(id(6), vec![1]).expect("room");
        runs.forget(&id(6));
        assert_eq!(runs.take(&id(6), &[1]).await, None);
        let held: Vec<_> = (0..LOCAL_RUNS_CAPACITY as u64).map(|i| runs.register(id(100 + i), vec![])).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(runs.register(id(99), vec![]).is_none(), "full");
    }

    #[test]
    fn a_flood_never_evicts_an_awaited_task() {
        let board = TaskBoard::default();
        board.update(id(0), |s| s.status = "running".into());
        let waiter = board.subscribe(&id(0)).expect("entry");
        for i in 1..(3 * BOARD_CAPACITY as u64) {
            board.update(id(i), |_| {});
        }
        assert!(board.get(&id(0)).is_some(), "the awaited task is still there");
        assert!(board.lock().0.len() <= BOARD_CAPACITY);
        board.update(id(0), |s| s.status = "finalized".into());
        assert_eq!(waiter.borrow().status, "finalized");
        // Observers' verdicts only touch tasks already on the board.
        board.update_existing(id(u64::MAX), |_| {});
        assert!(board.get(&id(u64::MAX)).is_none());
    }

    /// A node learns it was left out a whole round after the task was created: what
    /// counts is whether the coordinator could have listed it then.
    #[test]
    fn left_out_only_where_the_coordinator_could_have_listed_the_node() {
        let interval = Duration::from_secs(5);
        let grace = LEFT_OUT_GRACE.as_millis() as u64;
        let start = 1_000_000;
        // Created before the node had announced itself for the grace period.
        assert!(!could_have_been_listed(start, 0, interval, start + grace - 1));
        assert!(could_have_been_listed(start, 0, interval, start + grace));
        // A full house announced shortly before the task: rightly left out, even if
        // the node has a free slot by the time the verdict comes.
        let busy = start + 2 * grace;
        assert!(!could_have_been_listed(start, busy, interval, busy + 19_000));
        assert!(could_have_been_listed(start, busy, interval, busy + 21_000));
    }
}
