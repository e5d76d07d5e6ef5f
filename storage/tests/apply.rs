//! Applying real verdicts (produced by the consensus simulator) to RocksDB.

use sampo_consensus::sim::{SimNet, reference_output};
use sampo_consensus::{
    Behaviour, Mark, Outcome, PeerId, ReputationParams, RoundParams, VerifiedVerdict, assess, judge,
};
use sampo_storage::{Applied, Effects, Store, TaskStatus};

/// The effects the trust model allows node `me` to draw from `v`.
fn effects(v: &VerifiedVerdict, me: &PeerId) -> Effects {
    Effects::from(&assess(v, me, true))
}

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
    let coordinator = net.peer(0);
    // This node is the coordinator the client submitted to: it holds the fee.
    store.deposit("client", v.spec.fee + 7, 4000).expect("deposit");
    store.hold("client", &v.task(), v.spec.fee + 7, 4000).expect("hold");
    assert_eq!(store.apply_verdict(v, &effects(v, &coordinator), 5000, &p).expect("apply"), Applied::New);
    let client = store.client_account("client").expect("read").expect("account");
    assert_eq!((client.balance, client.held), (7, 0), "the fee is paid, the rest returned");
    let (sum, deposits) = store.ledger_audit().expect("audit");
    assert_eq!(sum, deposits);
    // Outvoted is not proof: nothing is recorded against the liar until a replay.
    assert_eq!(store.reputation(&net.peer(1)).expect("read"), None);
    let expected = reference_output(&v.spec);
    let j = judge(v, &|o| Some(o == expected.as_slice()));
    assert_eq!(j.wrong, vec![net.peer(1)]);
    assert_eq!(store.apply_replay(v, &j, None, 0, 5000, &p).expect("replay"), Applied::New);
    assert_eq!(store.apply_replay(v, &j, None, 0, 5001, &p).expect("replay"), Applied::AlreadyApplied);

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
    assert_eq!(store.apply_verdict(v, &effects(v, &coordinator), 9000, &p).expect("apply"), Applied::AlreadyApplied);
    let again = store.reputation(&net.peer(1)).expect("read").expect("record");
    assert_eq!(again, liar);
    let paid_again: u64 = (0..3).map(|i| store.credits(&net.peer(i)).expect("credits").balance).sum();
    assert_eq!(paid_again, v.spec.fee);

    // And after a reopen, too.
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.apply_verdict(v, &effects(v, &coordinator), 9000, &p).expect("apply"), Applied::AlreadyApplied);
    assert_eq!(store.reputation(&net.peer(1)).expect("read").expect("record"), liar);
    assert_eq!(store.reputations().expect("all").len(), 3);
}

#[test]
fn a_verdict_without_a_local_hold_mints_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, vs) = verdicts();
    let v = &vs[0];
    let p = ReputationParams::default();
    let store = Store::open(dir.path()).expect("open");
    // A bystander (not the coordinator the client paid) applies the verdict.
    assert_eq!(store.apply_verdict(v, &effects(v, &net.peer(2)), 5000, &p).expect("apply"), Applied::New);
    for i in 0..3 {
        assert_eq!(store.credits(&net.peer(i)).expect("credits").balance, 0);
    }
    assert_eq!(store.ledger_audit().expect("audit"), (0, 0));
}

#[test]
fn a_verdict_the_hold_cannot_cover_leaves_the_hold_for_a_refund() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, vs) = verdicts();
    let v = &vs[0];
    assert!(v.spec.fee > 0);
    let p = ReputationParams::default();
    let store = Store::open(dir.path()).expect("open");
    store.deposit("client", v.spec.fee, 4000).expect("deposit");
    store.hold("client", &v.task(), v.spec.fee - 1, 4000).expect("short hold");
    assert_eq!(store.apply_verdict(v, &effects(v, &net.peer(0)), 5000, &p).expect("apply"), Applied::New);
    assert!(store.hold_of(&v.task()).expect("read").is_some(), "not settled");
    assert_eq!(store.credits(&net.peer(0)).expect("credits").balance, 0);
    store.refund(&v.task(), 6000).expect("refund");
    let client = store.client_account("client").expect("read").expect("account");
    assert_eq!((client.balance, client.held), (v.spec.fee, 0));
    assert_eq!(store.ledger_audit().expect("audit"), (u128::from(v.spec.fee), u128::from(v.spec.fee)));
}

#[test]
fn an_equivocator_is_banned_on_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, vs) = verdicts();
    let v = &vs[1];
    assert_eq!(v.verdict.evidence.equivocations.len(), 1);
    let p = ReputationParams::default();
    let store = Store::open(dir.path()).expect("open");
    // A bystander applies it too: the two commits are the equivocator's own signatures.
    let bystander = sampo_consensus::NodeKey::from_seed([99; 32]).peer_id();
    store.apply_verdict(v, &effects(v, &bystander), 5000, &p).expect("apply");
    let rep = store.reputation(&net.peer(2)).expect("read").expect("record");
    assert_eq!(rep.equivocations, 1);
    assert!(rep.is_banned(5000));
    let mark = v.verdict.marks.iter().find(|(peer, _)| *peer == net.peer(2)).map(|(_, m)| *m);
    assert_eq!(mark, Some(Mark::Wrong));
}

/// Every verdict a byzantine coordinator gets honest nodes to verify, applied by an
/// honest bystander's store: honest reputations stay untouched, the coordinator is
/// banned for its two verdicts of one attempt, and that survives a reopen.
#[test]
fn a_byzantine_coordinators_verdicts_leave_honest_peers_untouched() {
    let params = RoundParams { commit_window_ms: 5_000, reveal_window_ms: 5_000, ..RoundParams::default() };
    let mut net = SimNet::new(5, params, |i| if i == 0 { Behaviour::ByzantineCoordinator } else { Behaviour::Honest });
    for _ in 0..3 {
        let spec = net.spec(0, 3, 0);
        net.submit(0, spec).expect("submit");
        net.run(120_000);
    }
    let verdicts = net.nodes[1].applied.clone();
    assert!(verdicts.len() >= 6, "forged and duplicate verdicts: {}", verdicts.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ReputationParams::default();
    let me = net.peer(1);
    let mut equivocations = 0;
    {
        let store = Store::open(dir.path()).expect("open");
        for v in &verdicts {
            if store.apply_verdict(v, &effects(v, &me), 5000, &p).expect("apply") == Applied::CoordinatorEquivocation {
                equivocations += 1;
            }
        }
    }
    assert_eq!(equivocations, 3, "one per task: the re-announced attempt's second verdict");
    let store = Store::open(dir.path()).expect("reopen");
    for i in 1..5 {
        if let Some(r) = store.reputation(&net.peer(i)).expect("read") {
            assert!(r.wrong == 0.0 && r.absent == 0.0 && r.equivocations == 0 && !r.is_banned(5000), "{i}: {r:?}");
        }
    }
    let coordinator = store.reputation(&net.peer(0)).expect("read").expect("record");
    assert!(coordinator.is_banned(5000) && coordinator.equivocations == 3, "{coordinator:?}");
}

/// A finalized lie (two colluders of three) is overturned: the liars are banned, the
/// honest minority untouched, the task record says overturned.
#[test]
fn an_overturned_task_bans_its_liars_and_says_so() {
    let mut net =
        SimNet::new(3, RoundParams::default(), |i| if i == 0 { Behaviour::Honest } else { Behaviour::WrongOutput });
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec.clone()).expect("submit");
    net.run(120_000);
    let v = net.verdicts(0, &task)[0].clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let p = ReputationParams::default();
    let me = net.peer(0);
    store.apply_verdict(&v, &effects(&v, &me), 5000, &p).expect("apply");
    assert_eq!(store.reputation(&me).expect("read"), None, "the honest minority's wrong mark is contested");
    let expected = reference_output(&spec);
    let j = judge(&v, &|o| Some(o == expected.as_slice()));
    store.apply_replay(&v, &j, None, 7, 6000, &p).expect("replay");
    let rec = store.task(&task).expect("read").expect("record");
    assert_eq!(rec.status, TaskStatus::Overturned);
    assert_eq!(rec.overturned.as_ref().map(|o| o.position), Some(7));
    for liar in [1, 2] {
        assert!(store.reputation(&net.peer(liar)).expect("read").expect("record").is_banned(6000));
    }
    assert_eq!(store.reputation(&me).expect("read"), None);
    assert!(store.replay_record(&task, 0).expect("read").is_some_and(|r| r.overturned));
}

#[test]
fn a_stored_commit_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let task = sampo_consensus::TaskId(sampo_consensus::Hash32::of(b"t"));
    {
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.stored_commit(&task, 0).expect("read"), None);
        store.store_commit(&task, 0, &[1, 2, 3], 10).expect("store");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.stored_commit(&task, 0).expect("read").map(|c| c.tokens), Some(vec![1, 2, 3]));
    assert_eq!(store.stored_commit(&task, 1).expect("read"), None);
}

/// Being left off a coordinator's candidate list is recorded first-hand against it and
/// lowers its weight in this node's view, bounded (half an absence each time).
#[test]
fn a_left_out_record_weighs_on_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let p = ReputationParams::default();
    let coordinator = sampo_consensus::NodeKey::from_seed([3; 32]).peer_id();
    store.record_left_out(&coordinator, 1_000, &p).expect("record");
    store.record_left_out(&coordinator, 2_000, &p).expect("record");
    let rep = store.reputation(&coordinator).expect("read").expect("record");
    assert!((rep.left_out - 2.0).abs() < 1e-3, "{rep:?}");
    assert!(rep.score(&p) < 1.0 && !rep.is_banned(2_000), "{}", rep.score(&p));
}
