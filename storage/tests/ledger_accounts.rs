//! The conserved credit ledger: each typed error, idempotency, the audit.

use sampo_consensus::{Hash32, NodeKey, PeerId, TaskId};
use sampo_storage::{ChargeKind, LedgerError, LedgerOutcome, RECENT_CHARGES, Store};

fn peer(i: u8) -> PeerId {
    NodeKey::from_seed([i; 32]).peer_id()
}

fn task(i: u8) -> TaskId {
    TaskId(Hash32([i; 32]))
}

fn balanced(s: &Store) {
    let (sum, deposits) = s.ledger_audit().expect("audit");
    assert_eq!(sum, deposits, "credits are conserved");
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path()).expect("open");
    (dir, s)
}

#[test]
fn deposit_hold_settle_pays_members_and_returns_the_rest() {
    let (_d, s) = open();
    s.deposit("alice", 100, 1).expect("deposit");
    balanced(&s);
    assert_eq!(s.hold("alice", &task(1), 60, 2).expect("hold"), LedgerOutcome::Done);
    let a = s.client_account("alice").expect("read").expect("acct");
    assert_eq!((a.balance, a.held), (40, 60));
    balanced(&s);
    let payouts = [(peer(1), 30), (peer(2), 20)];
    assert_eq!(s.settle(&task(1), "alice", &payouts, 50, 3).expect("settle"), LedgerOutcome::Done);
    let a = s.client_account("alice").expect("read").expect("acct");
    assert_eq!((a.balance, a.held), (50, 0));
    assert_eq!(s.credits(&peer(1)).expect("c").balance, 30);
    assert_eq!(s.credits(&peer(2)).expect("c").balance, 20);
    assert_eq!(s.credits(&peer(2)).expect("c").tasks, 1);
    let kinds: Vec<ChargeKind> = a.recent.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, vec![ChargeKind::Hold, ChargeKind::Settle, ChargeKind::Refund]);
    assert!(s.hold_of(&task(1)).expect("read").is_none());
    let closed = s.closed_of(&task(1)).expect("read").expect("closed");
    assert_eq!((closed.paid, closed.returned, closed.refunded), (50, 10, false));
    balanced(&s);
    assert_eq!(s.ledger_audit().expect("audit"), (100, 100));
}

#[test]
fn settle_and_refund_happen_at_most_once() {
    let (_d, s) = open();
    s.deposit("alice", 100, 1).expect("deposit");
    s.hold("alice", &task(1), 50, 2).expect("hold");
    assert_eq!(s.hold("alice", &task(1), 50, 3).expect("same hold"), LedgerOutcome::AlreadyDone);
    assert_eq!(s.client_account("alice").expect("r").expect("a").held, 50, "held once");
    s.settle(&task(1), "alice", &[(peer(1), 50)], 50, 4).expect("settle");
    assert_eq!(s.settle(&task(1), "alice", &[(peer(1), 50)], 50, 5).expect("again"), LedgerOutcome::AlreadyDone);
    assert_eq!(s.refund(&task(1), 6).expect("refund after settle"), LedgerOutcome::AlreadyDone);
    assert_eq!(s.credits(&peer(1)).expect("c").balance, 50);
    assert!(matches!(s.hold("alice", &task(1), 50, 7), Err(LedgerError::TaskClosed(t)) if t == task(1)));

    s.hold("alice", &task(2), 50, 8).expect("hold");
    assert_eq!(s.refund(&task(2), 9).expect("refund"), LedgerOutcome::Done);
    assert_eq!(s.refund(&task(2), 10).expect("again"), LedgerOutcome::AlreadyDone);
    assert_eq!(s.settle(&task(2), "alice", &[(peer(1), 1)], 1, 11).expect("late"), LedgerOutcome::AlreadyDone);
    let a = s.client_account("alice").expect("r").expect("a");
    assert_eq!((a.balance, a.held), (50, 0));
    assert!(s.closed_of(&task(2)).expect("r").expect("closed").refunded);
    balanced(&s);
}

#[test]
fn each_refusal_is_a_typed_error_and_changes_nothing() {
    let (_d, s) = open();
    s.deposit("alice", 10, 1).expect("deposit");
    let err = s.hold("alice", &task(1), 11, 2).expect_err("short");
    assert!(matches!(err, LedgerError::InsufficientBalance { balance: 10, needed: 11 }), "{err}");
    let err = s.hold("alice", &task(1), u64::MAX, 2).expect_err("short");
    assert!(matches!(err, LedgerError::InsufficientBalance { balance: 10, needed: u64::MAX }), "{err}");
    assert!(matches!(s.hold("bob", &task(1), 1, 2), Err(LedgerError::NoAccount(n)) if n == "bob"));
    assert!(matches!(s.hold("", &task(1), 1, 2), Err(LedgerError::BadAccountName)));
    assert!(matches!(s.deposit(&"x".repeat(300), 1, 2), Err(LedgerError::BadAccountName)));
    assert!(matches!(s.settle(&task(1), "alice", &[], 0, 2), Err(LedgerError::NoHold(_))));
    assert!(matches!(s.refund(&task(1), 2), Err(LedgerError::NoHold(_))));

    s.hold("alice", &task(1), 8, 3).expect("hold");
    let err = s.hold("alice", &task(1), 9, 3).expect_err("different");
    assert!(matches!(err, LedgerError::HoldConflict { amount: 8, .. }), "{err}");
    let err = s.settle(&task(1), "alice", &[(peer(1), 5), (peer(2), 4)], 8, 4).expect_err("over");
    assert!(matches!(err, LedgerError::PayoutsExceedFee { paid: 9, fee: 8 }), "{err}");
    let err = s.settle(&task(1), "alice", &[(peer(1), u64::MAX), (peer(2), u64::MAX)], 8, 4).expect_err("over");
    assert!(matches!(err, LedgerError::PayoutsExceedFee { fee: 8, .. }), "{err}");
    let err = s.settle(&task(1), "alice", &[], u64::MAX, 4).expect_err("fee over hold");
    assert!(matches!(err, LedgerError::FeeExceedsHold { fee: u64::MAX, held: 8 }), "{err}");
    let err = s.settle(&task(1), "mallory", &[], 1, 4).expect_err("not theirs");
    assert!(matches!(err, LedgerError::WrongAccount { .. }), "{err}");
    // Nothing moved.
    let a = s.client_account("alice").expect("r").expect("a");
    assert_eq!((a.balance, a.held), (2, 8));
    assert_eq!(s.credits(&peer(1)).expect("c").balance, 0);
    balanced(&s);

    s.deposit("rich", u64::MAX, 5).expect("deposit max");
    assert!(matches!(s.deposit("rich", 1, 6), Err(LedgerError::Overflow)));
    balanced(&s);
    // A member whose balance would overflow: the whole settlement is refused.
    s.hold("rich", &task(2), u64::MAX, 7).expect("hold max");
    // balance + held may not pass u64::MAX, or the hold could never be returned.
    assert!(matches!(s.deposit("rich", 1, 7), Err(LedgerError::Overflow)));
    s.settle(&task(2), "rich", &[(peer(3), u64::MAX)], u64::MAX, 8).expect("settle max");
    s.deposit("carol", 5, 9).expect("deposit");
    s.hold("carol", &task(3), 5, 9).expect("hold");
    assert!(matches!(s.settle(&task(3), "carol", &[(peer(3), 1)], 5, 10), Err(LedgerError::Overflow)));
    assert_eq!(s.client_account("carol").expect("r").expect("a").held, 5);
    balanced(&s);
}

#[test]
fn recent_charges_are_bounded_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path()).expect("open");
        s.deposit("alice", 1000, 1).expect("deposit");
        for i in 0..40u8 {
            s.hold("alice", &task(i), 1, u64::from(i)).expect("hold");
        }
    }
    let s = Store::open(dir.path()).expect("reopen");
    let a = s.client_account("alice").expect("r").expect("a");
    assert_eq!(a.recent.len(), RECENT_CHARGES);
    assert_eq!(a.recent.last().expect("last").task, task(39));
    assert_eq!((a.balance, a.held), (960, 40));
    balanced(&s);
}

/// A task that reaches no verdict (its coordinator restarted, the round was lost) gets
/// its hold back once it is old enough; a verdict after that pays nobody twice.
#[test]
fn holds_no_verdict_closed_are_refunded_when_stale() {
    let (_d, s) = open();
    s.deposit("alice", 100, 0).expect("deposit");
    s.hold("alice", &task(1), 30, 1_000).expect("hold");
    s.hold("alice", &task(2), 20, 5_000).expect("hold");
    assert_eq!(s.refund_stale(1_500, 1_000).expect("sweep"), Vec::<TaskId>::new(), "too young");
    assert_eq!(s.refund_stale(2_000, 1_000).expect("sweep"), vec![task(1)]);
    let a = s.client_account("alice").expect("read").expect("acct");
    assert_eq!((a.balance, a.held), (80, 20));
    assert!(s.closed_of(&task(1)).expect("read").expect("closed").refunded);
    assert_eq!(s.settle(&task(1), "alice", &[(peer(1), 30)], 30, 3_000).expect("late"), LedgerOutcome::AlreadyDone);
    assert_eq!(s.credits(&peer(1)).expect("c").balance, 0);
    assert_eq!(s.refund_stale(2_000, 1_000).expect("again"), Vec::<TaskId>::new());
    balanced(&s);
}

/// The coordinator's hold at submission is written without its own disk sync (the
/// verdict's synced write covers it): the same ledger entry, the same checks, and
/// durable once a later synced write has been made.
#[test]
fn a_hold_durable_with_the_next_sync_is_the_same_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path()).expect("open");
        s.deposit("alice", 100, 1).expect("deposit");
        assert_eq!(s.hold_with_next_sync("alice", &task(1), 60, 2).expect("hold"), LedgerOutcome::Done);
        assert_eq!(s.hold_with_next_sync("alice", &task(1), 60, 3).expect("again"), LedgerOutcome::AlreadyDone);
        assert!(matches!(
            s.hold_with_next_sync("alice", &task(2), 60, 3),
            Err(LedgerError::InsufficientBalance { balance: 40, needed: 60 })
        ));
        let a = s.client_account("alice").expect("read").expect("acct");
        assert_eq!((a.balance, a.held), (40, 60));
        balanced(&s);
        // A synced write after it (as the task's verdict is).
        s.deposit("bob", 1, 4).expect("deposit");
    }
    let s = Store::open(dir.path()).expect("reopen");
    assert_eq!(s.hold_of(&task(1)).expect("read").expect("hold").amount, 60);
    balanced(&s);
}
