//! The conserved credit ledger (DESIGN.md, trust model promise 6): client accounts
//! (prepaid, keyed by a name), peer accounts (keyed by peer id bytes), holds per task,
//! and a running total of deposits. Every operation is one synced [`Batch`]; the only
//! operation that changes the sum of all balances and holds is [`Store::deposit`], and
//! [`Store::ledger_audit`] checks that sum against the deposits.
//!
//! Keys in [`Column::Ledger`]: `acct/<name>` (a [`ClientAccount`]), `peer/<peer id
//! bytes>` (a [`CreditAccount`]), `hold/<task id>` (a [`Hold`]), `closed/<task id>` (a
//! [`Closed`] marker: the task's hold was settled or refunded, once), `ledger/total`
//! (a [`LedgerTotal`]).

use serde::{Deserialize, Serialize};

use sampo_consensus::{PeerId, TaskId};

use crate::ledger::CreditAccount;
use crate::{Batch, Column, Record, StorageError, Store};

/// How many recent charges a client account keeps.
pub const RECENT_CHARGES: usize = 32;
/// Longest client account name, in bytes.
pub const MAX_ACCOUNT_NAME: usize = 256;

const ACCT_PREFIX: &[u8] = b"acct/";
const PEER_PREFIX: &[u8] = b"peer/";
const HOLD_PREFIX: &[u8] = b"hold/";
const CLOSED_PREFIX: &[u8] = b"closed/";
const TOTAL_KEY: &[u8] = b"ledger/total";

/// A client's prepaid account. `balance + held` never exceeds `u64::MAX` (deposits
/// that would make it are refused), so returning a hold cannot overflow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientAccount {
    /// Spendable credits.
    pub balance: u64,
    /// Credits held for tasks not yet settled or refunded.
    pub held: u64,
    /// The latest charges, oldest first, at most [`RECENT_CHARGES`].
    pub recent: Vec<Charge>,
}

impl Record for ClientAccount {
    const COLUMN: Column = Column::Ledger;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeKind {
    /// Moved from balance to held at submission.
    Hold,
    /// Paid out of the hold to the members at the verdict.
    Settle,
    /// Returned from the hold to the balance (a refund, or a settlement's unspent rest).
    Refund,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub task: TaskId,
    pub amount: u64,
    pub kind: ChargeKind,
    pub at_ms: u64,
}

/// Credits held from a client account for one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub account: String,
    pub amount: u64,
    pub at_ms: u64,
}

impl Record for Hold {
    const COLUMN: Column = Column::Ledger;
}

/// How a task's hold was closed (recorded once; later settles and refunds do nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub account: String,
    /// Credited to members.
    pub paid: u64,
    /// Returned to the client's balance.
    pub returned: u64,
    pub refunded: bool,
    pub at_ms: u64,
}

impl Record for Closed {
    const COLUMN: Column = Column::Ledger;
}

/// The sum of every deposit ever made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerTotal {
    pub deposits: u128,
}

impl Record for LedgerTotal {
    const COLUMN: Column = Column::Ledger;
}

/// What a hold, settle or refund did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerOutcome {
    Done,
    /// The same hold was placed before, or the task was already settled or refunded:
    /// nothing changed.
    AlreadyDone,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient balance: {balance} credits, {needed} needed")]
    InsufficientBalance { balance: u64, needed: u64 },
    #[error("payouts sum to {paid} credits, more than the fee of {fee}")]
    PayoutsExceedFee { paid: u128, fee: u64 },
    #[error("fee of {fee} credits is more than the {held} held for the task")]
    FeeExceedsHold { fee: u64, held: u64 },
    #[error("no hold for task {0}")]
    NoHold(TaskId),
    #[error("task {task} already has a different hold ({amount} credits from {account:?})")]
    HoldConflict { task: TaskId, account: String, amount: u64 },
    #[error("task {task}'s hold belongs to {holder:?}, not {account:?}")]
    WrongAccount { task: TaskId, holder: String, account: String },
    #[error("task {0} was already settled or refunded")]
    TaskClosed(TaskId),
    #[error("no client account named {0:?}")]
    NoAccount(String),
    #[error("account name must be 1..={MAX_ACCOUNT_NAME} bytes")]
    BadAccountName,
    #[error("credit amount overflows")]
    Overflow,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(rest);
    k
}

/// The key of a peer's [`CreditAccount`].
pub fn peer_key(peer: &PeerId) -> Vec<u8> {
    key(PEER_PREFIX, &peer.to_bytes())
}

fn acct_key(name: &str) -> Vec<u8> {
    key(ACCT_PREFIX, name.as_bytes())
}

fn hold_key(task: &TaskId) -> Vec<u8> {
    key(HOLD_PREFIX, &task.0.0)
}

fn closed_key(task: &TaskId) -> Vec<u8> {
    key(CLOSED_PREFIX, &task.0.0)
}

fn check_name(name: &str) -> Result<(), LedgerError> {
    if name.is_empty() || name.len() > MAX_ACCOUNT_NAME { Err(LedgerError::BadAccountName) } else { Ok(()) }
}

fn push_charge(acct: &mut ClientAccount, charge: Charge) {
    acct.recent.push(charge);
    if acct.recent.len() > RECENT_CHARGES {
        let extra = acct.recent.len() - RECENT_CHARGES;
        acct.recent.drain(..extra);
    }
}

impl Store {
    /// A client account, if it exists.
    pub fn client_account(&self, name: &str) -> Result<Option<ClientAccount>, StorageError> {
        self.get(&acct_key(name))
    }

    /// The open hold of a task, if any.
    pub fn hold_of(&self, task: &TaskId) -> Result<Option<Hold>, StorageError> {
        self.get(&hold_key(task))
    }

    /// How a task's hold was closed, if it was.
    pub fn closed_of(&self, task: &TaskId) -> Result<Option<Closed>, StorageError> {
        self.get(&closed_key(task))
    }

    /// Add `amount` credits to a client account (created if absent). The only operation
    /// that changes the ledger's total.
    pub fn deposit(&self, name: &str, amount: u64, _now_ms: u64) -> Result<ClientAccount, LedgerError> {
        check_name(name)?;
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut acct = self.client_account(name)?.unwrap_or_default();
        // balance + held stays within u64, so returning a hold can never overflow.
        acct.held.checked_add(acct.balance).and_then(|v| v.checked_add(amount)).ok_or(LedgerError::Overflow)?;
        acct.balance += amount;
        let mut total = self.get::<LedgerTotal>(TOTAL_KEY)?.unwrap_or_default();
        total.deposits = total.deposits.checked_add(u128::from(amount)).ok_or(LedgerError::Overflow)?;
        let mut batch = Batch::new();
        batch.put(&acct_key(name), &acct)?;
        batch.put(TOTAL_KEY, &total)?;
        self.commit(batch)?;
        Ok(acct)
    }

    /// Move `amount` from a client's balance to held for `task` (at API submission).
    /// Placing the same hold again does nothing; a different hold for the task, or a
    /// hold for a task already settled or refunded, is refused.
    pub fn hold(&self, name: &str, task: &TaskId, amount: u64, now_ms: u64) -> Result<LedgerOutcome, LedgerError> {
        self.hold_with(name, task, amount, now_ms, true)
    }

    /// [`Self::hold`], durable with the node's next synced write instead of at once (one
    /// write-ahead log: syncing a later write syncs this one). A coordinator's hold at
    /// submission: the task's verdict or refund is such a write, made before the hold is
    /// settled or refunded. A crash before it loses the hold with the round (rounds live
    /// in memory): the balances are as if the task had not been submitted, where the
    /// synced hold ended too (refunded as stale). Saves a disk sync on the way to every
    /// announcement.
    pub fn hold_with_next_sync(
        &self,
        name: &str,
        task: &TaskId,
        amount: u64,
        now_ms: u64,
    ) -> Result<LedgerOutcome, LedgerError> {
        self.hold_with(name, task, amount, now_ms, false)
    }

    fn hold_with(
        &self,
        name: &str,
        task: &TaskId,
        amount: u64,
        now_ms: u64,
        synced: bool,
    ) -> Result<LedgerOutcome, LedgerError> {
        check_name(name)?;
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed_of(task)?.is_some() {
            return Err(LedgerError::TaskClosed(*task));
        }
        if let Some(h) = self.hold_of(task)? {
            if h.account == name && h.amount == amount {
                return Ok(LedgerOutcome::AlreadyDone);
            }
            return Err(LedgerError::HoldConflict { task: *task, account: h.account, amount: h.amount });
        }
        let mut acct = self.client_account(name)?.ok_or_else(|| LedgerError::NoAccount(name.to_owned()))?;
        if acct.balance < amount {
            return Err(LedgerError::InsufficientBalance { balance: acct.balance, needed: amount });
        }
        acct.balance -= amount;
        acct.held = acct.held.checked_add(amount).ok_or(LedgerError::Overflow)?;
        push_charge(&mut acct, Charge { task: *task, amount, kind: ChargeKind::Hold, at_ms: now_ms });
        let mut batch = Batch::new();
        batch.put(&acct_key(name), &acct)?;
        batch.put(&hold_key(task), &Hold { account: name.to_owned(), amount, at_ms: now_ms })?;
        if synced {
            self.commit(batch)?;
        } else {
            self.commit_with_next_sync(batch)?;
        }
        Ok(LedgerOutcome::Done)
    }

    /// Settle `task`'s hold (the coordinator, at a finalized verdict): credit `payouts`
    /// to the members' peer accounts and debit them from the hold, in one batch; the
    /// rest of the hold returns to the client's balance. `account` must be the hold's
    /// account; `payouts` must sum to at most `fee`, and `fee` must not exceed the hold.
    /// A task is settled or refunded once; later calls do nothing.
    pub fn settle(
        &self,
        task: &TaskId,
        account: &str,
        payouts: &[(PeerId, u64)],
        fee: u64,
        now_ms: u64,
    ) -> Result<LedgerOutcome, LedgerError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed_of(task)?.is_some() {
            return Ok(LedgerOutcome::AlreadyDone);
        }
        let mut batch = Batch::new();
        self.plan_settle(&mut batch, task, Some(account), payouts, fee, now_ms)?;
        self.commit(batch)?;
        Ok(LedgerOutcome::Done)
    }

    /// Return `task`'s whole hold to the client's balance (a disputed or timed-out task).
    /// A task is settled or refunded once; later calls do nothing.
    pub fn refund(&self, task: &TaskId, now_ms: u64) -> Result<LedgerOutcome, LedgerError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed_of(task)?.is_some() {
            return Ok(LedgerOutcome::AlreadyDone);
        }
        let mut batch = Batch::new();
        self.plan_settle(&mut batch, task, None, &[], 0, now_ms)?;
        self.commit(batch)?;
        Ok(LedgerOutcome::Done)
    }

    /// Refund every hold placed more than `max_age_ms` before `now_ms` that no verdict
    /// closed: a task whose round was lost (a restart of its coordinator) or never
    /// reached a verdict gives the client its credits back. Returns the tasks refunded.
    pub fn refund_stale(&self, now_ms: u64, max_age_ms: u64) -> Result<Vec<TaskId>, LedgerError> {
        let stale: Vec<TaskId> = self
            .iter_prefix::<Hold>(HOLD_PREFIX)?
            .into_iter()
            .filter(|(k, h)| k.len() == HOLD_PREFIX.len() + 32 && h.at_ms.saturating_add(max_age_ms) <= now_ms)
            .filter_map(|(k, _)| <[u8; 32]>::try_from(&k[k.len().saturating_sub(32)..]).ok())
            .map(|id| TaskId(sampo_consensus::Hash32(id)))
            .collect();
        let mut refunded = Vec::new();
        for task in stale {
            if self.refund(&task, now_ms)? == LedgerOutcome::Done {
                refunded.push(task);
            }
        }
        Ok(refunded)
    }

    /// Add to `batch` the settlement of `task`'s open hold (a refund when `account` is
    /// `None`). The caller holds `apply_lock` and has checked the task is not closed.
    pub(crate) fn plan_settle(
        &self,
        batch: &mut Batch,
        task: &TaskId,
        account: Option<&str>,
        payouts: &[(PeerId, u64)],
        fee: u64,
        now_ms: u64,
    ) -> Result<(), LedgerError> {
        let hold = self.hold_of(task)?.ok_or(LedgerError::NoHold(*task))?;
        if let Some(account) = account
            && account != hold.account
        {
            return Err(LedgerError::WrongAccount { task: *task, holder: hold.account, account: account.to_owned() });
        }
        if fee > hold.amount {
            return Err(LedgerError::FeeExceedsHold { fee, held: hold.amount });
        }
        let paid: u128 = payouts.iter().map(|(_, c)| u128::from(*c)).sum();
        if paid > u128::from(fee) {
            return Err(LedgerError::PayoutsExceedFee { paid, fee });
        }
        // paid <= fee <= hold.amount, all u64.
        let paid = u64::try_from(paid).map_err(|_| LedgerError::Overflow)?;
        let returned = hold.amount - paid;
        // Credit members (a member may appear twice: accumulate before writing).
        let mut credited: std::collections::BTreeMap<PeerId, CreditAccount> = std::collections::BTreeMap::new();
        for (peer, credits) in payouts {
            let mut acct = match credited.remove(peer) {
                Some(a) => a,
                None => self.credits(peer)?,
            };
            acct.balance = acct.balance.checked_add(*credits).ok_or(LedgerError::Overflow)?;
            acct.tasks = acct.tasks.saturating_add(1);
            credited.insert(*peer, acct);
        }
        let mut client =
            self.client_account(&hold.account)?.ok_or_else(|| LedgerError::NoAccount(hold.account.clone()))?;
        client.held = client.held.checked_sub(hold.amount).ok_or(LedgerError::Overflow)?;
        client.balance = client.balance.checked_add(returned).ok_or(LedgerError::Overflow)?;
        if paid > 0 {
            push_charge(&mut client, Charge { task: *task, amount: paid, kind: ChargeKind::Settle, at_ms: now_ms });
        }
        if returned > 0 {
            push_charge(&mut client, Charge { task: *task, amount: returned, kind: ChargeKind::Refund, at_ms: now_ms });
        }
        for (peer, acct) in &credited {
            batch.put(&peer_key(peer), acct)?;
        }
        batch.put(&acct_key(&hold.account), &client)?;
        batch.delete::<Hold>(&hold_key(task));
        batch.put(
            &closed_key(task),
            &Closed { account: hold.account, paid, returned, refunded: account.is_none(), at_ms: now_ms },
        )?;
        Ok(())
    }

    /// The double-entry check: (sum of every client balance and hold and every peer
    /// balance, sum of every deposit). The two are equal after every operation.
    pub fn ledger_audit(&self) -> Result<(u128, u128), StorageError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum: u128 = 0;
        for (_, a) in self.iter_prefix::<ClientAccount>(ACCT_PREFIX)? {
            sum += u128::from(a.balance) + u128::from(a.held);
        }
        for (_, a) in self.iter_prefix::<CreditAccount>(PEER_PREFIX)? {
            sum += u128::from(a.balance);
        }
        let deposits = self.get::<LedgerTotal>(TOTAL_KEY)?.unwrap_or_default().deposits;
        Ok((sum, deposits))
    }
}
