//! Applying verified verdicts: reputation, credits, the task record and the evidence,
//! in one synced write batch, exactly once per (task, attempt).

use serde::{Deserialize, Serialize};

use sampo_consensus::{
    Mark, ModelId, Outcome, PeerId, Reputation, ReputationParams, SignedEnvelope, TaskId, VerifiedVerdict,
};

use crate::{Batch, Column, Record, StorageError, Store};

impl Record for Reputation {
    const COLUMN: Column = Column::Reputation;
}

/// A peer's credit balance, keyed by its peer id bytes in [`Column::Ledger`].
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
}

pub fn evidence_key(task: &TaskId, attempt: u8) -> Vec<u8> {
    let mut k = task.0.0.to_vec();
    k.push(attempt);
    k
}

impl Store {
    /// Apply a verified verdict at `now_ms`: every member's reputation, the payouts, the
    /// task record and the evidence land in one synced batch, or none of them does. A
    /// verdict seen twice changes nothing the second time.
    pub fn apply_verdict(
        &self,
        v: &VerifiedVerdict,
        now_ms: u64,
        params: &ReputationParams,
    ) -> Result<Applied, StorageError> {
        // A poisoned lock only means another applier panicked; the database is intact.
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let key = evidence_key(&v.task(), v.verdict.attempt);
        if self.get::<EvidenceRecord>(&key)?.is_some() {
            return Ok(Applied::AlreadyApplied);
        }
        let mut batch = Batch::new();
        let mut reputations: std::collections::BTreeMap<PeerId, Reputation> = std::collections::BTreeMap::new();
        for (peer, mark) in &v.verdict.marks {
            let mut rep = self.get::<Reputation>(&peer.to_bytes())?.unwrap_or_default();
            rep.record(*mark, now_ms, params);
            reputations.insert(*peer, rep);
        }
        for (first, _) in &v.verdict.evidence.equivocations {
            let peer = first.signer();
            let rep = match reputations.remove(&peer) {
                Some(r) => r,
                None => self.get::<Reputation>(&peer.to_bytes())?.unwrap_or_default(),
            };
            let mut rep = rep;
            rep.record_equivocation(now_ms, params);
            reputations.insert(peer, rep);
        }
        for (peer, rep) in &reputations {
            batch.put(&peer.to_bytes(), rep)?;
        }
        for (peer, credits) in &v.verdict.payouts {
            let mut acct = self.get::<CreditAccount>(&peer.to_bytes())?.unwrap_or_default();
            acct.balance = acct.balance.saturating_add(*credits);
            acct.tasks += 1;
            batch.put(&peer.to_bytes(), &acct)?;
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
            };
            batch.put(&v.task().0.0, &record)?;
        }
        batch.put(&key, &EvidenceRecord { verdict: v.envelope.clone(), applied_ms: now_ms })?;
        self.commit(batch)?;
        Ok(Applied::New)
    }

    pub fn reputation(&self, peer: &PeerId) -> Result<Option<Reputation>, StorageError> {
        self.get(&peer.to_bytes())
    }

    pub fn credits(&self, peer: &PeerId) -> Result<CreditAccount, StorageError> {
        Ok(self.get(&peer.to_bytes())?.unwrap_or_default())
    }

    pub fn task(&self, task: &TaskId) -> Result<Option<TaskRecord>, StorageError> {
        self.get(&task.0.0)
    }

    /// The verdict envelopes stored for a task, by attempt.
    pub fn evidence(&self, task: &TaskId) -> Result<Vec<EvidenceRecord>, StorageError> {
        Ok(self.iter_prefix::<EvidenceRecord>(&task.0.0)?.into_iter().map(|(_, r)| r).collect())
    }

    /// Every peer's reputation record.
    pub fn reputations(&self) -> Result<Vec<(PeerId, Reputation)>, StorageError> {
        Ok(self
            .iter_prefix::<Reputation>(&[])?
            .into_iter()
            .filter_map(|(k, r)| PeerId::from_bytes(&k).ok().map(|p| (p, r)))
            .collect())
    }
}
