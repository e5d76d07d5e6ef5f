//! An in-process network of [`Consensus`] machines with a stand-in model, a shared
//! clock and perfect gossip. Tests, the misbehaviour scenarios, the reputation
//! simulation and the round benchmark all run on it; it is deterministic, so a failing
//! case replays exactly.

use std::collections::{BTreeMap, VecDeque};

use crate::PeerId;
use crate::committee::Candidate;
use crate::envelope::{MessageKind, SignedEnvelope};
use crate::identity::NodeKey;
use crate::ids::{Hash32, ModelId, TaskId};
use crate::messages::{Mark, Outcome, Prompt, SamplingParams, TaskSpec};
use crate::reputation::{Reputation, ReputationParams};
use crate::round::{Action, Behaviour, Consensus, RoundParams};
use crate::verdict::VerifiedVerdict;

/// Hook that may replace (or drop, with `None`) an envelope a node publishes.
pub type Tamper = Box<dyn FnMut(usize, &SignedEnvelope) -> Option<SignedEnvelope>>;

pub struct SimNode {
    pub key: NodeKey,
    pub consensus: Consensus,
    /// Never runs its inference: holds seats and stays silent.
    pub offline: bool,
    /// Verdicts this node verified and applied.
    pub applied: Vec<VerifiedVerdict>,
    /// Outcomes of the tasks this node coordinated.
    pub finished: Vec<(TaskId, Outcome)>,
    /// This node's own view of every peer, built by the trust model's rules
    /// ([`crate::accountability`]) from the verdicts it applied, with replays by the
    /// stand-in model.
    pub view: BTreeMap<PeerId, Reputation>,
    /// Commits this node stored, by seat: answered again on a re-announcement.
    pub stored: BTreeMap<(TaskId, u8), Vec<u32>>,
    /// Content address of the first verdict applied per (task, attempt).
    seen: BTreeMap<(TaskId, u8), Hash32>,
    /// Forget the seats held in memory (a restart), keeping what was stored.
    pub restarts: u32,
}

pub struct SimNet {
    pub nodes: Vec<SimNode>,
    pub now_ms: u64,
    pub model: ModelId,
    pub reputation_params: ReputationParams,
    /// Deliver verdicts to every node (each verifies them), not only to the coordinator.
    pub verdicts_to_all: bool,
    pub tamper: Option<Tamper>,
    /// Deliver a message addressed to some peers (`Action::Publish::to`) to them alone,
    /// as the direct path does on a real network; by default everyone sees everything
    /// (the protocol must hold then too).
    pub as_addressed: bool,
    /// Gossip in flight: (publisher, envelope, addressed to; empty for everyone).
    queue: VecDeque<(usize, SignedEnvelope, Vec<PeerId>)>,
    /// Seats waiting for the stand-in model: (node, task, attempt, spec).
    pending_exec: Vec<(usize, TaskId, u8, TaskSpec)>,
    nonce: u64,
    /// Every envelope published, in order, for tests to inspect.
    pub log: Vec<(usize, SignedEnvelope)>,
    /// Errors raised by receivers: (receiver, message kind, error).
    pub rejections: Vec<(usize, MessageKind, crate::round::RoundError)>,
    /// Nodes every node counts as established from the start (the founders: the nodes
    /// [`SimNet::new`] makes); nodes added later start on probation.
    pub trusted: std::collections::BTreeSet<PeerId>,
}

/// A task announcement sealed by `key` for tests of the layers around the protocol
/// (gossip, direct sends): `prompt` for `model`, k = 1, fixed small nonce, fee and
/// deadlines, `committee` as given.
pub fn sealed_announcement(key: &NodeKey, model: ModelId, committee: Vec<PeerId>, prompt: &str) -> SignedEnvelope {
    let spec = TaskSpec {
        coordinator: key.peer_id(),
        nonce: 1,
        created_ms: 1,
        model,
        prompt: Prompt::Text(prompt.into()),
        params: SamplingParams::default(),
        k: 1,
        max_escalations: 0,
        fee: 1,
        client_entropy: [0; 32],
    };
    let ann = crate::messages::TaskAnnouncement {
        spec,
        attempt: 0,
        revision: 0,
        committee,
        commit_deadline_ms: 10,
        reveal_deadline_ms: 20,
        candidates: Vec::new(),
    };
    // A test fixture: an announcement of this size always seals.
    SignedEnvelope::seal(key, &ann).expect("a small announcement seals")
}

/// The stand-in model: a deterministic function of the task, so honest nodes agree.
pub fn reference_output(spec: &TaskSpec) -> Vec<u32> {
    let h = Hash32::of(&crate::envelope::encode_body(&(&spec.prompt, spec.params.seed)).unwrap_or_default());
    h.0.chunks(4)
        .take(spec.params.max_tokens.min(8) as usize)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 49152)
        .collect()
}

impl SimNode {
    fn new(i: usize, params: &RoundParams, behaviour: Behaviour) -> Self {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let key = NodeKey::from_seed(seed);
        let consensus = Consensus::new(key.clone(), params.clone()).with_behaviour(behaviour);
        SimNode {
            key,
            consensus,
            offline: false,
            applied: Vec::new(),
            finished: Vec::new(),
            view: BTreeMap::new(),
            stored: BTreeMap::new(),
            seen: BTreeMap::new(),
            restarts: 0,
        }
    }
}

impl SimNet {
    /// Add a node with a fresh key (on probation everywhere); returns its index.
    pub fn add_node(&mut self, behaviour: Behaviour) -> usize {
        let i = self.nodes.len();
        let params = self.nodes.first().map(|n| n.consensus.params().clone()).unwrap_or_default();
        self.nodes.push(SimNode::new(i, &params, behaviour));
        i
    }

    /// Whether node `viewer` counts `peer` as established.
    pub fn established(&self, viewer: usize, peer: &PeerId) -> bool {
        self.trusted.contains(peer)
            || self.nodes[viewer].view.get(peer).is_some_and(|r| !r.on_probation(&self.reputation_params))
    }

    /// `n` nodes with keys from fixed seeds; node `i` behaves as `behaviour(i)`.
    pub fn new(n: usize, params: RoundParams, behaviour: impl Fn(usize) -> Behaviour) -> Self {
        let nodes: Vec<SimNode> = (0..n).map(|i| SimNode::new(i, &params, behaviour(i))).collect();
        let trusted = nodes.iter().map(|n| n.key.peer_id()).collect();
        Self {
            trusted,
            nodes,
            now_ms: 1_000_000,
            model: ModelId(Hash32::of(b"sim-model")),
            reputation_params: ReputationParams::default(),
            verdicts_to_all: true,
            tamper: None,
            as_addressed: false,
            queue: VecDeque::new(),
            pending_exec: Vec::new(),
            nonce: 0,
            log: Vec::new(),
            rejections: Vec::new(),
        }
    }

    pub fn peer(&self, i: usize) -> PeerId {
        self.nodes[i].key.peer_id()
    }

    pub fn index_of(&self, p: &PeerId) -> Option<usize> {
        self.nodes.iter().position(|n| n.key.peer_id() == *p)
    }

    /// The registry as node `i` sees it: all nodes, weighted by `i`'s own view.
    pub fn candidates(&self, i: usize) -> Vec<Candidate> {
        self.nodes
            .iter()
            .map(|n| {
                let p = n.key.peer_id();
                let rep = self.nodes[i].view.get(&p).cloned().unwrap_or_default();
                let trusted = self.trusted.contains(&p);
                Candidate {
                    peer: p,
                    models: vec![self.model],
                    price_per_1k: 0,
                    free_slots: 4,
                    score: rep.weight_at(self.now_ms, &self.reputation_params, trusted),
                    banned: rep.is_banned(self.now_ms),
                    probation: !trusted && rep.on_probation(&self.reputation_params),
                    group: 0,
                }
            })
            .collect()
    }

    pub fn spec(&mut self, coordinator: usize, k: u8, max_escalations: u8) -> TaskSpec {
        self.nonce += 1;
        TaskSpec {
            coordinator: self.peer(coordinator),
            nonce: self.nonce,
            created_ms: self.now_ms,
            model: self.model,
            prompt: Prompt::Text(format!("task {}", self.nonce)),
            params: SamplingParams { max_tokens: 8, seed: self.nonce, ..SamplingParams::default() },
            k,
            max_escalations,
            fee: 1000,
            client_entropy: Hash32::of(&self.nonce.to_le_bytes()).0,
        }
    }

    /// Submit a task at `coordinator`; the round then runs with [`Self::run`].
    pub fn submit(&mut self, coordinator: usize, spec: TaskSpec) -> Result<TaskId, crate::round::RoundError> {
        let candidates = self.candidates(coordinator);
        let now = self.now_ms;
        let (task, actions) = self.nodes[coordinator].consensus.submit(spec, None, &candidates, now)?;
        self.act(coordinator, actions);
        Ok(task)
    }

    /// Carry out a node's actions.
    pub fn act(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                // Delivered to every node, whoever it is for (`to`), unless
                // `as_addressed`: the protocol must hold when anyone sees anything.
                Action::Publish { envelope, to, .. } => {
                    let env = match &mut self.tamper {
                        Some(t) => t(i, &envelope),
                        None => Some(envelope),
                    };
                    if let Some(env) = env {
                        self.log.push((i, env.clone()));
                        self.queue.push_back((i, env, to));
                    }
                }
                Action::Execute { task, attempt, spec, .. } => {
                    if let Some(tokens) = self.nodes[i].stored.get(&(task, attempt)).cloned() {
                        let now = self.now_ms;
                        let actions = self.nodes[i].consensus.resume(task, attempt, tokens, now);
                        self.act(i, actions);
                    } else if !self.nodes[i].offline {
                        self.pending_exec.push((i, task, attempt, *spec));
                    }
                }
                Action::StoreCommit { task, attempt, tokens } => {
                    self.nodes[i].stored.insert((task, attempt), tokens);
                }
                Action::Apply(v) => self.apply(i, *v),
                Action::Finished { task, outcome } => self.nodes[i].finished.push((task, outcome)),
                // Every simulated node serves the model and is known to all.
                Action::LeftOut { coordinator, .. } => {
                    let (now, p) = (self.now_ms, self.reputation_params.clone());
                    self.nodes[i].view.entry(coordinator).or_default().record_left_out(now, &p);
                }
            }
        }
    }

    fn apply(&mut self, i: usize, v: VerifiedVerdict) {
        let now = self.now_ms;
        let p = self.reputation_params.clone();
        // Without per-node delivery, the coordinator's verdict still reaches every view
        // (as gossip would carry it), without verifying it again at every node.
        let viewers: Vec<usize> = if self.verdicts_to_all { vec![i] } else { (0..self.nodes.len()).collect() };
        for j in viewers {
            let me = self.peer(j);
            let established = self.established(j, &v.coordinator);
            let node = &mut self.nodes[j];
            let excused = node.consensus.excused(&v.task(), v.verdict.attempt);
            apply_to_view(&mut node.view, &mut node.seen, &v, (&me, established), &excused, now, p.clone());
        }
        self.nodes[i].applied.push(v);
    }

    /// Node `i` restarts: every seat it held in memory is forgotten; its store is kept.
    pub fn restart(&mut self, i: usize) {
        let key = self.nodes[i].key.clone();
        let params = self.nodes[i].consensus.params().clone();
        self.nodes[i].consensus = Consensus::new(key, params);
        self.nodes[i].restarts += 1;
    }

    /// Deliver all gossip and run all pending inferences until nothing moves.
    pub fn settle(&mut self) {
        loop {
            if let Some((from, env, to)) = self.queue.pop_front() {
                for j in 0..self.nodes.len() {
                    if j == from || (self.as_addressed && !to.is_empty() && !to.contains(&self.peer(j))) {
                        continue;
                    }
                    if env.kind() == MessageKind::Verdict && !self.verdicts_to_all {
                        continue;
                    }
                    let now = self.now_ms;
                    match self.nodes[j].consensus.handle(&env, now) {
                        Ok(actions) => self.act(j, actions),
                        Err(e) => self.rejections.push((j, env.kind(), e)),
                    }
                }
                continue;
            }
            if self.pending_exec.is_empty() {
                return;
            }
            for (i, task, attempt, spec) in std::mem::take(&mut self.pending_exec) {
                let now = self.now_ms;
                let actions = self.nodes[i].consensus.executed(task, attempt, reference_output(&spec), now);
                self.act(i, actions);
            }
        }
    }

    /// Advance the clock by `step_ms` and tick every node.
    pub fn tick(&mut self, step_ms: u64) {
        self.now_ms += step_ms;
        for i in 0..self.nodes.len() {
            let now = self.now_ms;
            let candidates = self.candidates(i);
            let actions = self.nodes[i].consensus.tick(now, &candidates);
            self.act(i, actions);
        }
        self.settle();
    }

    /// Run until no node coordinates a task any more, or `max_ms` of simulated time.
    pub fn run(&mut self, max_ms: u64) {
        self.settle();
        let end = self.now_ms + max_ms;
        while self.nodes.iter().any(|n| n.consensus.load().0 > 0) && self.now_ms < end {
            self.tick(1000);
        }
    }

    /// The last outcome of `task` at its coordinator.
    pub fn outcome(&self, coordinator: usize, task: &TaskId) -> Option<&Outcome> {
        self.nodes[coordinator].finished.iter().rev().find(|(t, _)| t == task).map(|(_, o)| o)
    }

    /// Every verdict the coordinator applied for `task`, by attempt.
    pub fn verdicts(&self, coordinator: usize, task: &TaskId) -> Vec<&VerifiedVerdict> {
        self.nodes[coordinator].applied.iter().filter(|v| v.task() == *task).collect()
    }

    /// The mark of `peer` in the last verdict on `task`.
    pub fn mark(&self, coordinator: usize, task: &TaskId, peer: &PeerId) -> Option<Mark> {
        self.verdicts(coordinator, task)
            .last()
            .and_then(|v| v.verdict.marks.iter().find(|(p, _)| p == peer).map(|(_, m)| *m))
    }
}

/// Apply a verified verdict to one node's view by the trust model's rules, with replays
/// by the stand-in model (the simulation audits every finalized verdict).
pub fn apply_to_view(
    view: &mut BTreeMap<PeerId, Reputation>,
    seen: &mut BTreeMap<(TaskId, u8), Hash32>,
    v: &VerifiedVerdict,
    (me, coordinator_established): (&PeerId, bool),
    excused: &std::collections::BTreeSet<PeerId>,
    now: u64,
    p: ReputationParams,
) {
    let p = &p;
    let id = v.envelope.id();
    match seen.get(&(v.task(), v.verdict.attempt)) {
        Some(first) if *first == id => return,
        Some(_) => {
            // Two verdicts for one attempt, both signed by the coordinator.
            view.entry(v.coordinator).or_default().record_equivocation(now, p);
            return;
        }
        None => {
            seen.insert((v.task(), v.verdict.attempt), id);
        }
    }
    let mut a = crate::accountability::assess(v, me, coordinator_established);
    a.marks.retain(|(peer, m)| !(*m == Mark::Absent && excused.contains(peer)));
    for (peer, mark) in &a.marks {
        view.entry(*peer).or_default().record(*mark, now, p);
    }
    for peer in &a.bans {
        view.entry(*peer).or_default().record_equivocation(now, p);
    }
    for peer in &a.vouched {
        view.entry(*peer).or_default().record_vouched();
    }
    if crate::accountability::needs_replay(v, &a, me, 1.0, 0.0) {
        let expected = reference_output(&v.spec);
        let j = crate::accountability::judge(v, &|o| Some(o == expected.as_slice()));
        for peer in &j.wrong {
            view.entry(*peer).or_default().record(Mark::Wrong, now, p);
        }
        for peer in &j.liars {
            let r = view.entry(*peer).or_default();
            r.record(Mark::Wrong, now, p);
            r.record_equivocation(now, p);
        }
    }
}

/// One window of the reputation simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct SimWindow {
    pub first_task: usize,
    pub tasks: usize,
    /// Seats held by liars / all seats, in this window.
    pub liar_seat_share: f64,
    pub finalized_honest: usize,
    pub finalized_wrong: usize,
    pub liars_banned_at_end: usize,
}

/// `tasks` tasks over `nodes` nodes of which the first `liars` return a wrong output
/// (all the same wrong output: colluding liars are the hard case), committees of `k`,
/// coordinators taking turns. Returns the liars' share of seats per window of `window`
/// tasks.
pub fn reputation_simulation(nodes: usize, liars: usize, tasks: usize, k: u8, window: usize) -> Vec<SimWindow> {
    let params = RoundParams { commit_window_ms: 5_000, reveal_window_ms: 5_000, ..RoundParams::default() };
    let mut net = SimNet::new(nodes, params, |i| if i < liars { Behaviour::WrongOutput } else { Behaviour::Honest });
    net.verdicts_to_all = false;
    let liar_peers: Vec<PeerId> = (0..liars).map(|i| net.peer(i)).collect();
    let mut out = Vec::new();
    let (mut seats, mut liar_seats, mut honest, mut wrong) = (0usize, 0usize, 0usize, 0usize);
    for t in 0..tasks {
        // Honest coordinators only: a lying coordinator's verdicts are rejected anyway.
        let coordinator = liars + t % (nodes - liars);
        let spec = net.spec(coordinator, k, 0);
        let expected = reference_output(&spec);
        if let Ok(task) = net.submit(coordinator, spec) {
            net.run(120_000);
            for v in net.verdicts(coordinator, &task) {
                seats += v.committee.len();
                liar_seats += v.committee.iter().filter(|p| liar_peers.contains(p)).count();
            }
            match net.outcome(coordinator, &task) {
                Some(Outcome::Finalized { output }) if *output == expected => honest += 1,
                Some(Outcome::Finalized { .. }) => wrong += 1,
                _ => {}
            }
        }
        // Tasks arrive one simulated second apart.
        net.now_ms += 1000;
        if (t + 1) % window == 0 {
            let now = net.now_ms;
            out.push(SimWindow {
                first_task: t + 1 - window,
                tasks: window,
                liar_seat_share: liar_seats as f64 / seats.max(1) as f64,
                finalized_honest: honest,
                finalized_wrong: wrong,
                liars_banned_at_end: liar_peers
                    .iter()
                    .filter(|p| net.nodes[liars].view.get(p).is_some_and(|r| r.is_banned(now)))
                    .count(),
            });
            (seats, liar_seats, honest, wrong) = (0, 0, 0, 0);
        }
    }
    out
}

/// One window of the Sybil-farm simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct SybilWindow {
    pub first_task: usize,
    pub tasks: usize,
    /// Seats held by Sybils / all seats, in this window.
    pub sybil_seat_share: f64,
    pub finalized_honest: usize,
    pub finalized_wrong: usize,
    /// Sybils off probation in the first honest node's view at the window's end.
    pub sybils_established: usize,
}

/// `honest` founders and `sybils` fresh identities (on probation, colluding: they lie
/// together whenever they hold a quorum of a committee), `tasks` tasks submitted at the
/// honest nodes in turn, committees of `k`. Returns the Sybils' share of seats and the
/// finalized outputs per window of `window` tasks.
pub fn sybil_farm(honest: usize, sybils: usize, tasks: usize, k: u8, window: usize) -> Vec<SybilWindow> {
    let params = RoundParams { commit_window_ms: 5_000, reveal_window_ms: 5_000, ..RoundParams::default() };
    let mut net = SimNet::new(honest, params.clone(), |_| Behaviour::Honest);
    net.verdicts_to_all = false;
    let first = net.nodes.len();
    for _ in 0..sybils {
        net.add_node(Behaviour::Collude);
    }
    let farm: Vec<PeerId> = (first..net.nodes.len()).map(|i| net.peer(i)).collect();
    for i in first..net.nodes.len() {
        let key = net.nodes[i].key.clone();
        net.nodes[i].consensus =
            Consensus::new(key, params.clone()).with_behaviour(Behaviour::Collude).with_accomplices(farm.clone());
    }
    let mut out = Vec::new();
    let (mut seats, mut sybil_seats, mut good, mut wrong) = (0usize, 0usize, 0usize, 0usize);
    for t in 0..tasks {
        let coordinator = t % honest;
        let spec = net.spec(coordinator, k, 1);
        let expected = reference_output(&spec);
        if let Ok(task) = net.submit(coordinator, spec) {
            net.run(120_000);
            for v in net.verdicts(coordinator, &task) {
                seats += v.committee.len();
                sybil_seats += v.committee.iter().filter(|p| farm.contains(p)).count();
            }
            match net.outcome(coordinator, &task) {
                Some(Outcome::Finalized { output }) if *output == expected => good += 1,
                Some(Outcome::Finalized { .. }) => wrong += 1,
                _ => {}
            }
        }
        net.now_ms += 1000;
        if (t + 1) % window == 0 {
            out.push(SybilWindow {
                first_task: t + 1 - window,
                tasks: window,
                sybil_seat_share: sybil_seats as f64 / seats.max(1) as f64,
                finalized_honest: good,
                finalized_wrong: wrong,
                sybils_established: farm.iter().filter(|p| net.established(0, p)).count(),
            });
            (seats, sybil_seats, good, wrong) = (0, 0, 0, 0);
        }
    }
    out
}
