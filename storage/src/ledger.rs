//! Applying verified verdicts: reputation, credits, the task record and the evidence,
//! in one synced write batch, exactly once per (task, attempt). What a verdict may
//! change in this node's view is decided by the consensus crate's trust model
//! ([`sampo_consensus::assess`], [`sampo_consensus::judge`]); this module writes it.

use serde::{Deserialize, Serialize};

use sampo_consensus::{
    Mark, ModelId, Outcome, PeerId, ReplayJudgement, Reputation, ReputationParams, SignedEnvelope, TaskId,
    VerifiedVerdict,
};

use crate::accounts::LedgerError;
use crate::{Batch, Column, Record, StorageError, Store};

impl Record for Reputation {
    const COLUMN: Column = Column::Reputation;
}

/// A peer's credit balance, keyed by `peer/` and its peer id bytes in [`Column::Ledger`]
/// (see [`crate::accounts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditAccount {
    pub balance: u64,
    /// Finalized tasks it was paid for.
    pub tasks: u64,
}

impl Record for CreditAccount {
    const COLUMN: Column = Column::Ledger;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// A verdict without a quorum was applied; a larger committee is at work.
    Escalated,
    Finalized,
    Disputed,
    /// Finalized, then refuted by replay: the output is not what the model produces.
    Overturned,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Escalated => "escalated",
            TaskStatus::Finalized => "finalized",
            TaskStatus::Disputed => "disputed",
            TaskStatus::Overturned => "overturned",
        }
    }
}

/// What applying a verdict changes in this node's view (the trust model's assessment).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Marks to record.
    pub marks: Vec<(PeerId, Mark)>,
    /// Peers banned on proof they signed themselves.
    pub bans: Vec<PeerId>,
    /// Agreements that count towards the end of probation.
    pub vouched: Vec<PeerId>,
}

impl From<&sampo_consensus::Assessment> for Effects {
    fn from(a: &sampo_consensus::Assessment) -> Self {
        Self { marks: a.marks.clone(), bans: a.bans.clone(), vouched: a.vouched.clone() }
    }
}

/// A member's commit for a seat, stored (synced) before the commit is published, keyed
/// by task id and attempt in [`Column::Commits`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCommit {
    pub tokens: Vec<u32>,
    pub stored_ms: u64,
}

impl Record for StoredCommit {
    const COLUMN: Column = Column::Commits;
}

/// A replay's conclusions about a verdict, recorded once (in [`Column::Meta`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayRecord {
    pub wrong: Vec<PeerId>,
    pub liars: Vec<PeerId>,
    pub overturned: bool,
    /// The fraud proof this node published or checked, if the output was refuted.
    pub proof: Option<SignedEnvelope>,
    pub replayed_ms: u64,
}

impl Record for ReplayRecord {
    const COLUMN: Column = Column::Meta;
}

fn replay_key(task: &TaskId, attempt: u8) -> Vec<u8> {
    let mut k = b"replay/".to_vec();
    k.extend_from_slice(&evidence_key(task, attempt));
    k
}

/// What this node knows of a task from the verdicts it applied, keyed by task id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task: TaskId,
    pub coordinator: PeerId,
    pub model: ModelId,
    pub status: TaskStatus,
    /// The latest attempt applied.
    pub attempt: u8,
    pub committee: Vec<PeerId>,
    pub marks: Vec<(PeerId, Mark)>,
    pub output: Option<Vec<u32>>,
    pub fee: u64,
    pub decided_ms: u64,
    /// Set when a replay refuted the finalized output: by whom (this node, or the
    /// prover whose fraud proof this node re-checked) and where it diverges.
    pub overturned: Option<Overturn>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overturn {
    pub prover: PeerId,
    pub position: u32,
    pub at_ms: u64,
}

impl Record for TaskRecord {
    const COLUMN: Column = Column::Tasks;
}

/// The verdict envelope, evidence included, keyed by task id and attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    pub verdict: SignedEnvelope,
    pub applied_ms: u64,
}

impl Record for EvidenceRecord {
    const COLUMN: Column = Column::Evidence;
}

/// Whether applying changed anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    New,
    /// This verdict was applied before; nothing changed.
    AlreadyApplied,
    /// A different verdict for the same (task, attempt), signed by the same coordinator,
    /// was applied before: the coordinator equivocated and is banned; nothing else of
    /// the second verdict is applied.
    CoordinatorEquivocation,
}

/// Appended to an evidence key for a second, conflicting verdict of the same attempt.
const CONFLICT_SUFFIX: u8 = 0xC0;

pub fn evidence_key(task: &TaskId, attempt: u8) -> Vec<u8> {
    let mut k = task.0.0.to_vec();
    k.push(attempt);
    k
}

impl Store {
    /// Apply a verified verdict at `now_ms` with the `effects` the trust model allows:
    /// those marks and bans, the payouts, the task record and the evidence land in one
    /// synced batch, or none of them does. A verdict seen twice changes nothing the
    /// second time; a *different* verdict for an attempt already applied bans its
    /// coordinator (both are signed by it) and changes nothing else.
    pub fn apply_verdict(
        &self,
        v: &VerifiedVerdict,
        effects: &Effects,
        now_ms: u64,
        params: &ReputationParams,
    ) -> Result<Applied, StorageError> {
        // A poisoned lock only means another applier panicked; the database is intact.
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let key = evidence_key(&v.task(), v.verdict.attempt);
        if let Some(first) = self.get::<EvidenceRecord>(&key)? {
            if first.verdict == v.envelope {
                return Ok(Applied::AlreadyApplied);
            }
            let mut conflict_key = key.clone();
            conflict_key.push(CONFLICT_SUFFIX);
            if self.get::<EvidenceRecord>(&conflict_key)?.is_some() {
                return Ok(Applied::AlreadyApplied);
            }
            let mut batch = Batch::new();
            let mut rep = self.get::<Reputation>(&v.coordinator.to_bytes())?.unwrap_or_default();
            rep.record_equivocation(now_ms, params);
            batch.put(&v.coordinator.to_bytes(), &rep)?;
            // The second verdict is kept beside the first: together they are the proof.
            batch.put(&conflict_key, &EvidenceRecord { verdict: v.envelope.clone(), applied_ms: now_ms })?;
            self.commit(batch)?;
            return Ok(Applied::CoordinatorEquivocation);
        }
        let mut batch = Batch::new();
        let mut reputations: std::collections::BTreeMap<PeerId, Reputation> = std::collections::BTreeMap::new();
        for (peer, mark) in &effects.marks {
            let rep = self.reputation_in(&reputations, peer)?;
            let mut rep = rep;
            rep.record(*mark, now_ms, params);
            reputations.insert(*peer, rep);
        }
        for peer in &effects.bans {
            let mut rep = self.reputation_in(&reputations, peer)?;
            rep.record_equivocation(now_ms, params);
            reputations.insert(*peer, rep);
        }
        for peer in &effects.vouched {
            let mut rep = self.reputation_in(&reputations, peer)?;
            rep.record_vouched();
            reputations.insert(*peer, rep);
        }
        for (peer, rep) in &reputations {
            batch.put(&peer.to_bytes(), rep)?;
        }
        // No verdict mints credits: payouts are paid only out of a hold this node placed
        // for the task (it is the coordinator the client submitted to), in this batch.
        // A finalized verdict settles it, a disputed one refunds it, an escalation leaves
        // it open. A settlement the hold cannot cover leaves it open too (for a refund).
        if self.closed_of(&v.task())?.is_none()
            && let Some(hold) = self.hold_of(&v.task())?
        {
            let planned = match &v.verdict.outcome {
                Outcome::Finalized { .. } => {
                    self.plan_settle(&mut batch, &v.task(), Some(&hold.account), &v.verdict.payouts, v.spec.fee, now_ms)
                }
                Outcome::Disputed => self.plan_settle(&mut batch, &v.task(), None, &[], 0, now_ms),
                Outcome::Escalated => Ok(()),
            };
            match planned {
                Ok(()) => {}
                Err(LedgerError::Storage(e)) => return Err(e),
                Err(_) => {}
            }
        }
        let (status, output) = match &v.verdict.outcome {
            Outcome::Finalized { output } => (TaskStatus::Finalized, Some(output.clone())),
            Outcome::Escalated => (TaskStatus::Escalated, None),
            Outcome::Disputed => (TaskStatus::Disputed, None),
        };
        let previous = self.get::<TaskRecord>(&v.task().0.0)?;
        // Verdicts of one task may arrive out of order; the latest attempt wins.
        if previous.as_ref().is_none_or(|p| p.attempt <= v.verdict.attempt) {
            let record = TaskRecord {
                task: v.task(),
                coordinator: v.coordinator,
                model: v.spec.model,
                status,
                attempt: v.verdict.attempt,
                committee: v.committee.clone(),
                marks: v.verdict.marks.clone(),
                output,
                fee: v.spec.fee,
                decided_ms: v.verdict.decided_ms,
                overturned: None,
            };
            batch.put(&v.task().0.0, &record)?;
        }
        batch.put(&key, &EvidenceRecord { verdict: v.envelope.clone(), applied_ms: now_ms })?;
        self.commit(batch)?;
        Ok(Applied::New)
    }

    fn reputation_in(
        &self,
        pending: &std::collections::BTreeMap<PeerId, Reputation>,
        peer: &PeerId,
    ) -> Result<Reputation, StorageError> {
        match pending.get(peer) {
            Some(r) => Ok(r.clone()),
            None => Ok(self.get::<Reputation>(&peer.to_bytes())?.unwrap_or_default()),
        }
    }

    /// Record what a replay of an applied verdict settled, once: wrong marks for refuted
    /// minority outputs, bans for the members who revealed a refuted finalized output,
    /// and the task overturned. `position` is where the output leaves the model's.
    pub fn apply_replay(
        &self,
        v: &VerifiedVerdict,
        j: &ReplayJudgement,
        proof: Option<&SignedEnvelope>,
        position: u32,
        now_ms: u64,
        params: &ReputationParams,
    ) -> Result<Applied, StorageError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let key = replay_key(&v.task(), v.verdict.attempt);
        if self.get::<ReplayRecord>(&key)?.is_some() {
            return Ok(Applied::AlreadyApplied);
        }
        let mut batch = Batch::new();
        let mut reputations = std::collections::BTreeMap::new();
        for peer in &j.wrong {
            let mut rep = self.reputation_in(&reputations, peer)?;
            rep.record(Mark::Wrong, now_ms, params);
            reputations.insert(*peer, rep);
        }
        for peer in &j.liars {
            let mut rep = self.reputation_in(&reputations, peer)?;
            rep.record(Mark::Wrong, now_ms, params);
            rep.record_equivocation(now_ms, params);
            reputations.insert(*peer, rep);
        }
        for (peer, rep) in &reputations {
            batch.put(&peer.to_bytes(), rep)?;
        }
        if j.overturned
            && let Some(mut record) = self.task(&v.task())?
            && record.attempt == v.verdict.attempt
        {
            record.status = TaskStatus::Overturned;
            record.overturned =
                Some(Overturn { prover: proof.map_or(v.coordinator, |p| p.signer()), position, at_ms: now_ms });
            batch.put(&v.task().0.0, &record)?;
        }
        let record = ReplayRecord {
            wrong: j.wrong.clone(),
            liars: j.liars.clone(),
            overturned: j.overturned,
            proof: proof.cloned(),
            replayed_ms: now_ms,
        };
        batch.put(&key, &record)?;
        self.commit(batch)?;
        Ok(Applied::New)
    }

    /// What a replay of (task, attempt) settled, if one was recorded.
    pub fn replay_record(&self, task: &TaskId, attempt: u8) -> Result<Option<ReplayRecord>, StorageError> {
        self.get(&replay_key(task, attempt))
    }

    /// Store a seat's commit before it is published (synced, like every write).
    pub fn store_commit(&self, task: &TaskId, attempt: u8, tokens: &[u32], now_ms: u64) -> Result<(), StorageError> {
        self.put(&evidence_key(task, attempt), &StoredCommit { tokens: tokens.to_vec(), stored_ms: now_ms })
    }

    /// The commit stored for a seat, if this node committed to it before.
    pub fn stored_commit(&self, task: &TaskId, attempt: u8) -> Result<Option<StoredCommit>, StorageError> {
        self.get(&evidence_key(task, attempt))
    }

    /// The stored verdict of (task, attempt), if applied.
    pub fn verdict_of(&self, task: &TaskId, attempt: u8) -> Result<Option<EvidenceRecord>, StorageError> {
        self.get(&evidence_key(task, attempt))
    }

    /// A peer's reputation, from the in-memory mirror (no database read).
    pub fn reputation(&self, peer: &PeerId) -> Result<Option<Reputation>, StorageError> {
        Ok(self.reputations.read().unwrap_or_else(|e| e.into_inner()).get(peer).cloned())
    }

    /// A peer's credit account (paid out of settled holds).
    pub fn credits(&self, peer: &PeerId) -> Result<CreditAccount, StorageError> {
        Ok(self.get(&crate::accounts::peer_key(peer))?.unwrap_or_default())
    }

    pub fn task(&self, task: &TaskId) -> Result<Option<TaskRecord>, StorageError> {
        self.get(&task.0.0)
    }

    /// The verdict envelopes stored for a task, by attempt.
    pub fn evidence(&self, task: &TaskId) -> Result<Vec<EvidenceRecord>, StorageError> {
        // Only (task, attempt) keys: a conflicting second verdict is kept under a longer key.
        Ok(self
            .iter_prefix::<EvidenceRecord>(&task.0.0)?
            .into_iter()
            .filter(|(k, _)| k.len() == task.0.0.len() + 1)
            .map(|(_, r)| r)
            .collect())
    }

    /// Every peer's reputation record.
    pub fn reputations(&self) -> Result<Vec<(PeerId, Reputation)>, StorageError> {
        let mut all: Vec<(PeerId, Reputation)> =
            self.reputations.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(p, r)| (*p, r.clone())).collect();
        all.sort_by_key(|a| a.0.to_bytes());
        Ok(all)
    }
}
