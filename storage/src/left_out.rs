//! First-hand records that are not verdicts: this node left off a coordinator's
//! candidate list.

use sampo_consensus::{PeerId, Reputation, ReputationParams};

use crate::{StorageError, Store};

impl Store {
    /// Record that `coordinator` left this node off a candidate list, at `now_ms`.
    pub fn record_left_out(&self, coordinator: &PeerId, now_ms: u64, p: &ReputationParams) -> Result<(), StorageError> {
        // The same lock as verdicts: a read-modify-write of one reputation at a time.
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut rep: Reputation = self.get(&coordinator.to_bytes())?.unwrap_or_default();
        rep.record_left_out(now_ms, p);
        self.put(&coordinator.to_bytes(), &rep)
    }
}
