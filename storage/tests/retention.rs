//! Retention: old records go by this node's clock, evidence stays under its size cap,
//! neutral reputations are dropped, and the in-memory reputation mirror follows.

use sampo_consensus::sim::SimNet;
use sampo_consensus::{Behaviour, Mark, ReputationParams, RoundParams, assess};
use sampo_storage::{Effects, Retention, Store};

fn verdicts(n: usize) -> (SimNet, Vec<sampo_consensus::VerifiedVerdict>) {
    let mut net = SimNet::new(4, RoundParams::default(), |_| Behaviour::Honest);
    let mut out = Vec::new();
    for _ in 0..n {
        let spec = net.spec(0, 3, 0);
        let task = net.submit(0, spec).expect("submit");
        net.run(60_000);
        out.extend(net.verdicts(0, &task).into_iter().cloned());
    }
    (net, out)
}

#[test]
fn old_records_go_by_local_time_and_evidence_stays_under_its_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let (net, vs) = verdicts(6);
    let p = ReputationParams::default();
    let me = net.peer(0);
    // Three verdicts applied at t = 1,000, three at t = 100,000.
    for (i, v) in vs.iter().enumerate() {
        let at = if i < 3 { 1_000 } else { 100_000 };
        store.apply_verdict(v, &Effects::from(&assess(v, &me, true)), at, &p).expect("apply");
    }
    store.store_commit(&vs[0].task(), 0, &[1, 2], 1_000).expect("commit");
    store.store_commit(&vs[5].task(), 0, &[1, 2], 100_000).expect("commit");
    let (n, bytes) = store.evidence_usage().expect("usage");
    assert_eq!(n, 6);
    let keep_all = Retention { max_age_ms: 50_000, max_evidence_bytes: u64::MAX };
    let pruned = store.prune(110_000, &keep_all, &p).expect("prune");
    assert_eq!((pruned.evidence, pruned.tasks, pruned.commits), (3, 3, 1), "{pruned:?}");
    assert!(store.task(&vs[0].task()).expect("read").is_none());
    assert!(store.task(&vs[5].task()).expect("read").is_some());
    assert!(store.stored_commit(&vs[5].task(), 0).expect("read").is_some());
    // Size cap: keep only about two verdicts' worth, newest first.
    let per = bytes / 6;
    let capped = Retention { max_age_ms: u64::MAX, max_evidence_bytes: 2 * per + per / 2 };
    let pruned = store.prune(110_000, &capped, &p).expect("prune");
    assert_eq!(pruned.evidence, 1);
    let (n, left) = store.evidence_usage().expect("usage");
    assert!(n == 2 && left <= capped.max_evidence_bytes, "{n} records, {left} bytes");
    assert!(store.task(&vs[5].task()).expect("read").is_some(), "the newest stays");
}

#[test]
fn neutral_reputations_are_dropped_and_the_mirror_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, vs) = verdicts(1);
    let p = ReputationParams::default();
    {
        let store = Store::open(dir.path()).expect("open");
        let me = net.peer(0);
        store.apply_verdict(&vs[0], &Effects::from(&assess(&vs[0], &me, true)), 1_000, &p).expect("apply");
        let peers = store.reputations().expect("all");
        assert_eq!(peers.len(), 3, "three agreed members");
        // A banned peer stays, whatever its counts.
        let mut banned = store.reputation(&net.peer(1)).expect("read").expect("record");
        banned.record(Mark::Wrong, 1_000, &p);
        banned.record_equivocation(1_000, &p);
        store.put(&net.peer(1).to_bytes(), &banned).expect("put");
    }
    // The mirror is rebuilt from the database on open.
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.reputations().expect("all").len(), 3);
    let far = 1_000 + 40 * p.half_life_ms;
    let retention = Retention { max_age_ms: u64::MAX, max_evidence_bytes: u64::MAX };
    let pruned = store.prune(far, &retention, &p).expect("prune");
    assert_eq!(pruned.reputations, 2, "decayed to nothing");
    let left = store.reputations().expect("all");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, net.peer(1), "the proven liar is kept");
}
