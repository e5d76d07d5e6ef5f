//! Applying real verdicts (produced by the consensus simulator) to RocksDB.

use sampo_consensus::sim::SimNet;
use sampo_consensus::{Behaviour, Mark, Outcome, ReputationParams, RoundParams, VerifiedVerdict};
use sampo_storage::{Applied, Store, TaskStatus};

/// A finalized verdict in which node 1 lied, and one in which node 2 equivocated.
fn verdicts() -> (SimNet, Vec<VerifiedVerdict>) {
    let mut net = SimNet::new(3, RoundParams::default(), |i| match i {
        1 => Behaviour::WrongOutput,
        _ => Behaviour::Honest,
    });
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec).expect("submit");
    net.run(120_000);
    let mut out: Vec<VerifiedVerdict> = net.verdicts(0, &task).into_iter().cloned().collect();
    let key = net.nodes[2].key.clone();
    net.nodes[2].consensus =
        sampo_consensus::Consensus::new(key, RoundParams::default()).with_behaviour(Behaviour::Equivocate);
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec).expect("submit");
    net.run(120_000);
    out.extend(net.verdicts(0, &task).into_iter().cloned());
    (net, out)
}

#[test]
fn a_verdict_lands_whole_and_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, vs) = verdicts();
    let v = &vs[0];
    let p = ReputationParams::default();
    let store = Store::open(dir.path()).expect("open");
    assert_eq!(store.apply_verdict(v, 5000, &p).expect("apply"), Applied::New);

    let liar = store.reputation(&net.peer(1)).expect("read").expect("record");
    assert_eq!((liar.wrong, liar.agreed, liar.rounds), (1.0, 0.0, 1));
    let honest = store.reputation(&net.peer(0)).expect("read").expect("record");
    assert_eq!((honest.agreed, honest.wrong), (1.0, 0.0));
    let paid: u64 = (0..3).map(|i| store.credits(&net.peer(i)).expect("credits").balance).sum();
    assert_eq!(paid, v.spec.fee);
    assert_eq!(store.credits(&net.peer(1)).expect("credits").balance, 0, "the liar earns nothing");
    let rec = store.task(&v.task()).expect("read").expect("task record");
    assert_eq!(rec.status, TaskStatus::Finalized);
    assert!(matches!(&v.verdict.outcome, Outcome::Finalized { output } if Some(output) == rec.output.as_ref()));
    assert_eq!(store.evidence(&v.task()).expect("evidence").len(), 1);

    // Seen again (a gossip duplicate, a restart replaying): nothing changes.
    assert_eq!(store.apply_verdict(v, 9000, &p).expect("apply"), Applied::AlreadyApplied);
    let again = store.reputation(&net.peer(1)).expect("read").expect("record");
    assert_eq!(again, liar);
    let paid_again: u64 = (0..3).map(|i| store.credits(&net.peer(i)).expect("credits").balance).sum();
    assert_eq!(paid_again, v.spec.fee);

    // And after a reopen, too.
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.apply_verdict(v, 9000, &p).expect("apply"), Applied::AlreadyApplied);
    assert_eq!(store.reputation(&net.peer(1)).expect("read").expect("record"), liar);
    assert_eq!(store.reputations().expect("all").len(), 3);
}

#[test]
fn an_equivocator_is_banned_on_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, vs) = verdicts();
    let v = &vs[1];
    assert_eq!(v.verdict.evidence.equivocations.len(), 1);
    let p = ReputationParams::default();
    let store = Store::open(dir.path()).expect("open");
    store.apply_verdict(v, 5000, &p).expect("apply");
    let rep = store.reputation(&net.peer(2)).expect("read").expect("record");
    assert_eq!(rep.equivocations, 1);
    assert!(rep.is_banned(5000));
    let mark = v.verdict.marks.iter().find(|(peer, _)| *peer == net.peer(2)).map(|(_, m)| *m);
    assert_eq!(mark, Some(Mark::Wrong));
}
