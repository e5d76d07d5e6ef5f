//! Retention: evidence, task records, stored commits and replay records older than the
//! retention period go, the evidence column is held under a size cap (oldest first),
//! and reputations that have decayed back to neutral are dropped. Ages are measured on
//! this node's clock (when it applied or stored a record), never on a timestamp a peer
//! signed, so no peer can make its records immortal.

use sampo_consensus::ReputationParams;

use crate::ledger::{EvidenceRecord, ReplayRecord, StoredCommit, TaskRecord};
use crate::{Batch, Record, StorageError, Store};

/// What to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Records older than this (on this node's clock) are dropped.
    pub max_age_ms: u64,
    /// The evidence column is kept under this many bytes of values, oldest dropped first.
    pub max_evidence_bytes: u64,
}

/// What one pass dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub evidence: usize,
    pub tasks: usize,
    pub commits: usize,
    pub replays: usize,
    pub reputations: usize,
}

/// Counts below this are noise: a reputation with nothing above it is neutral.
const NEUTRAL: f64 = 0.01;
/// Deletes per write batch, so one pass never builds a huge batch.
const BATCH: usize = 1024;

impl Store {
    /// Visit every record of kind `R` (key, encoded size, record) without loading the
    /// column into memory; undecodable records are skipped (and reported by reads).
    pub(crate) fn scan<R: Record>(&self, mut f: impl FnMut(&[u8], usize, R)) -> Result<(), StorageError> {
        let cf = self.cf(R::COLUMN)?;
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            if let Ok(r) = crate::decode::<R>(&k, &v) {
                f(&k, v.len(), r);
            }
        }
        Ok(())
    }

    fn delete_all<R: Record>(&self, keys: &[Vec<u8>]) -> Result<(), StorageError> {
        for chunk in keys.chunks(BATCH) {
            let mut b = Batch::new();
            for k in chunk {
                b.delete::<R>(k);
            }
            self.commit(b)?;
        }
        Ok(())
    }

    /// One retention pass at `now_ms`.
    pub fn prune(&self, now_ms: u64, r: &Retention, rp: &ReputationParams) -> Result<Pruned, StorageError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cutoff = now_ms.saturating_sub(r.max_age_ms);
        let mut out = Pruned::default();

        // Evidence: by age, then oldest first down to the size cap.
        let mut evidence: Vec<(u64, Vec<u8>, usize)> = Vec::new();
        self.scan::<EvidenceRecord>(|k, size, rec| evidence.push((rec.applied_ms, k.to_vec(), size)))?;
        evidence.sort();
        let mut total: u64 = evidence.iter().map(|e| e.2 as u64).sum();
        let mut gone: Vec<Vec<u8>> = Vec::new();
        for (applied, key, size) in &evidence {
            if *applied < cutoff || total > r.max_evidence_bytes {
                gone.push(key.clone());
                total = total.saturating_sub(*size as u64);
            }
        }
        self.delete_all::<EvidenceRecord>(&gone)?;
        out.evidence = gone.len();
        let gone_tasks: std::collections::BTreeSet<Vec<u8>> =
            gone.iter().map(|k| k[..k.len().min(32)].to_vec()).collect();

        // Task records: their evidence is gone, or they are past the age on every clock.
        let mut tasks = Vec::new();
        self.scan::<TaskRecord>(|k, _, rec| {
            let still_has_evidence = self.evidence(&rec.task).is_ok_and(|e| !e.is_empty());
            if !still_has_evidence && (gone_tasks.contains(k) || rec.decided_ms < cutoff) {
                tasks.push(k.to_vec());
            }
        })?;
        self.delete_all::<TaskRecord>(&tasks)?;
        out.tasks = tasks.len();

        let mut commits = Vec::new();
        self.scan::<StoredCommit>(|k, _, c| {
            if c.stored_ms < cutoff {
                commits.push(k.to_vec());
            }
        })?;
        self.delete_all::<StoredCommit>(&commits)?;
        out.commits = commits.len();

        let mut replays = Vec::new();
        for (k, rec) in self.iter_prefix::<ReplayRecord>(b"replay/")? {
            if rec.replayed_ms < cutoff {
                replays.push(k);
            }
        }
        self.delete_all::<ReplayRecord>(&replays)?;
        out.replays = replays.len();

        let mut neutral: Vec<Vec<u8>> = Vec::new();
        for (peer, rep) in self.reputations()? {
            let mut rep = rep;
            rep.decay_to(now_ms, rp);
            if rep.agreed < NEUTRAL
                && rep.wrong < NEUTRAL
                && rep.absent < NEUTRAL
                && rep.equivocations == 0
                && !rep.is_banned(now_ms)
            {
                neutral.push(peer.to_bytes());
            }
        }
        self.delete_all::<sampo_consensus::Reputation>(&neutral)?;
        out.reputations = neutral.len();
        Ok(out)
    }

    /// Evidence records held, and their total size (for metrics and tests).
    pub fn evidence_usage(&self) -> Result<(usize, u64), StorageError> {
        let (mut n, mut bytes) = (0usize, 0u64);
        self.scan::<EvidenceRecord>(|_, size, _| {
            n += 1;
            bytes += size as u64;
        })?;
        Ok((n, bytes))
    }
}
