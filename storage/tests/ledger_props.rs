//! Property: whatever sequence of deposits, holds, settlements, refunds and reopens
//! runs, the sum of all balances and holds equals the sum of deposits after every step,
//! every refusal is a typed error, and the store agrees with a simple model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sampo_consensus::{Hash32, NodeKey, PeerId, TaskId};
use sampo_storage::{LedgerError, LedgerOutcome, Store};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];

#[derive(Clone, Debug)]
enum Op {
    Deposit {
        who: usize,
        amount: u64,
    },
    Hold {
        who: usize,
        task: u8,
        amount: u64,
    },
    /// Payouts split from `fee` (honest), or exceeding it by `extra`.
    Settle {
        task: u8,
        who: usize,
        fee: u64,
        members: Vec<usize>,
        extra: u64,
    },
    Refund {
        task: u8,
    },
    Reopen,
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..200, 1 => Just(u64::MAX), 1 => Just(u64::MAX - 1), 1 => any::<u64>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NAMES.len(), amount()).prop_map(|(who, amount)| Op::Deposit { who, amount }),
        4 => (0..NAMES.len(), 0u8..6, amount()).prop_map(|(who, task, amount)| Op::Hold { who, task, amount }),
        4 => (0u8..6, 0..NAMES.len(), amount(), prop::collection::vec(0usize..4, 0..4), prop_oneof![3 => Just(0u64), 1 => 1u64..5, 1 => Just(u64::MAX)])
            .prop_map(|(task, who, fee, members, extra)| Op::Settle { task, who, fee, members, extra }),
        2 => (0u8..6).prop_map(|task| Op::Refund { task }),
        1 => Just(Op::Reopen),
    ]
}

fn peer(i: usize) -> PeerId {
    NodeKey::from_seed([i as u8 + 1; 32]).peer_id()
}

fn task(i: u8) -> TaskId {
    TaskId(Hash32([i; 32]))
}

/// Split `fee` among `n` members, plus `extra` to the first.
fn split(fee: u64, members: &[usize], extra: u64) -> Vec<(PeerId, u64)> {
    let n = members.len() as u64;
    members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let share = fee / n + u64::from((i as u64) < fee % n);
            (peer(*m), if i == 0 { share.saturating_add(extra) } else { share })
        })
        .collect()
}

#[derive(Default)]
struct Model {
    balance: BTreeMap<usize, u64>,
    held: BTreeMap<usize, u64>,
    holds: BTreeMap<u8, (usize, u64)>,
    closed: BTreeMap<u8, ()>,
    peers: BTreeMap<PeerId, u64>,
    deposits: u128,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn credits_are_conserved(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Some(Store::open(dir.path()).expect("open"));
        let mut m = Model::default();
        for (step, op) in ops.iter().enumerate() {
            let s = store.as_ref().expect("store");
            let now = step as u64;
            match op {
                Op::Deposit { who, amount } => {
                    let r = s.deposit(NAMES[*who], *amount, now);
                    let held = m.held.get(who).copied().unwrap_or(0);
                    let b = m.balance.entry(*who).or_default();
                    match b.checked_add(*amount).filter(|nb| nb.checked_add(held).is_some()) {
                        Some(nb) => {
                            prop_assert!(r.is_ok(), "{r:?}");
                            *b = nb;
                            m.deposits += u128::from(*amount);
                        }
                        None => prop_assert!(matches!(r, Err(LedgerError::Overflow)), "{r:?}"),
                    }
                }
                Op::Hold { who, task: t, amount } => {
                    let r = s.hold(NAMES[*who], &task(*t), *amount, now);
                    if m.closed.contains_key(t) {
                        prop_assert!(matches!(r, Err(LedgerError::TaskClosed(_))), "{r:?}");
                    } else if let Some((hw, ha)) = m.holds.get(t) {
                        if hw == who && ha == amount {
                            prop_assert_eq!(r.expect("same hold"), LedgerOutcome::AlreadyDone);
                        } else {
                            prop_assert!(matches!(r, Err(LedgerError::HoldConflict { .. })), "{r:?}");
                        }
                    } else if !m.balance.contains_key(who) {
                        prop_assert!(matches!(r, Err(LedgerError::NoAccount(_))), "{r:?}");
                    } else if m.balance[who] < *amount {
                        let ok = matches!(r, Err(LedgerError::InsufficientBalance { balance, needed })
                            if balance == m.balance[who] && needed == *amount);
                        prop_assert!(ok, "{r:?}");
                    } else {
                        prop_assert_eq!(r.expect("hold"), LedgerOutcome::Done);
                        *m.balance.get_mut(who).expect("acct") -= amount;
                        *m.held.entry(*who).or_default() += amount;
                        m.holds.insert(*t, (*who, *amount));
                    }
                }
                Op::Settle { task: t, who, fee, members, extra } => {
                    let payouts = split(*fee, members, *extra);
                    let r = s.settle(&task(*t), NAMES[*who], &payouts, *fee, now);
                    if m.closed.contains_key(t) {
                        prop_assert_eq!(r.expect("closed"), LedgerOutcome::AlreadyDone);
                        continue;
                    }
                    let Some((hw, ha)) = m.holds.get(t).copied() else {
                        prop_assert!(matches!(r, Err(LedgerError::NoHold(_))), "{r:?}");
                        continue;
                    };
                    let paid: u128 = payouts.iter().map(|(_, c)| u128::from(*c)).sum();
                    let mut credited = m.peers.clone();
                    let mut overflow = false;
                    for (p, c) in &payouts {
                        let e = credited.entry(*p).or_default();
                        match e.checked_add(*c) { Some(v) => *e = v, None => overflow = true }
                    }
                    if hw != *who {
                        prop_assert!(matches!(r, Err(LedgerError::WrongAccount { .. })), "{r:?}");
                    } else if *fee > ha {
                        prop_assert!(matches!(r, Err(LedgerError::FeeExceedsHold { .. })), "{r:?}");
                    } else if paid > u128::from(*fee) {
                        prop_assert!(*extra > 0 || members.is_empty());
                        prop_assert!(matches!(r, Err(LedgerError::PayoutsExceedFee { .. })), "{r:?}");
                    } else if overflow {
                        prop_assert!(matches!(r, Err(LedgerError::Overflow)), "{r:?}");
                    } else {
                        prop_assert_eq!(r.expect("settle"), LedgerOutcome::Done);
                        m.peers = credited;
                        let paid = u64::try_from(paid).expect("paid fits");
                        *m.held.get_mut(who).expect("held") -= ha;
                        *m.balance.get_mut(who).expect("acct") += ha - paid;
                        m.holds.remove(t);
                        m.closed.insert(*t, ());
                    }
                }
                Op::Refund { task: t } => {
                    let r = s.refund(&task(*t), now);
                    if m.closed.contains_key(t) {
                        prop_assert_eq!(r.expect("closed"), LedgerOutcome::AlreadyDone);
                    } else if let Some((hw, ha)) = m.holds.remove(t) {
                        prop_assert_eq!(r.expect("refund"), LedgerOutcome::Done);
                        *m.held.get_mut(&hw).expect("held") -= ha;
                        *m.balance.get_mut(&hw).expect("acct") += ha;
                        m.closed.insert(*t, ());
                    } else {
                        prop_assert!(matches!(r, Err(LedgerError::NoHold(_))), "{r:?}");
                    }
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open(dir.path()).expect("reopen"));
                }
            }
            let s = store.as_ref().expect("store");
            let (sum, deposits) = s.ledger_audit().expect("audit");
            prop_assert_eq!(sum, deposits, "audit after step {} ({:?})", step, op);
            prop_assert_eq!(deposits, m.deposits);
            for (who, name) in NAMES.iter().enumerate() {
                let a = s.client_account(name).expect("read");
                match m.balance.get(&who) {
                    None => prop_assert!(a.is_none()),
                    Some(b) => {
                        let a = a.expect("account");
                        prop_assert_eq!((a.balance, a.held), (*b, m.held.get(&who).copied().unwrap_or(0)));
                    }
                }
            }
            for i in 0..4 {
                prop_assert_eq!(s.credits(&peer(i)).expect("c").balance, m.peers.get(&peer(i)).copied().unwrap_or(0));
            }
        }
    }
}
