//! Committees nobody picks: the seed is the client's entropy (the coordinator's own
//! fields cannot grind it), the announcement lists the candidates it sampled from, and
//! members and verifiers recompute the committee from them.

use sampo_consensus::sim::SimNet;
use sampo_consensus::*;

fn spec(coordinator: &NodeKey, nonce: u64, entropy: [u8; 32]) -> TaskSpec {
    TaskSpec {
        coordinator: coordinator.peer_id(),
        nonce,
        created_ms: nonce * 7,
        model: ModelId(Hash32::of(b"m")),
        prompt: Prompt::Text("p".into()),
        params: SamplingParams::default(),
        k: 3,
        max_escalations: 0,
        fee: 0,
        client_entropy: entropy,
    }
}

fn peers(n: u8) -> Vec<Listed> {
    (0..n).map(|i| Listed::new(NodeKey::from_seed([i + 50; 32]).peer_id(), 1.0)).collect()
}

/// The coordinator's verdict on a round nobody committed in: every member absent (in
/// peer order), the task disputed.
fn nobody_committed(
    coordinator: &NodeKey,
    spec: &TaskSpec,
    announcement: SignedEnvelope,
    committee: &[PeerId],
    decided_ms: u64,
) -> SignedEnvelope {
    let mut marks: Vec<(PeerId, Mark)> = committee.iter().map(|p| (*p, Mark::Absent)).collect();
    marks.sort_by_key(|(p, _)| *p);
    let verdict = Verdict {
        task: spec.id(),
        attempt: 0,
        outcome: Outcome::Disputed,
        marks,
        payouts: Vec::new(),
        evidence: Evidence {
            announcement,
            reveal_request: None,
            commits: Vec::new(),
            reveals: Vec::new(),
            equivocations: Vec::new(),
            declines: Vec::new(),
        },
        decided_ms,
    };
    SignedEnvelope::seal(coordinator, &verdict).expect("seal")
}

#[test]
fn the_coordinator_cannot_grind_the_seed() {
    let c = NodeKey::from_seed([1; 32]);
    let seeds: std::collections::BTreeSet<TaskId> =
        (0..1000).map(|nonce| spec(&c, nonce, [9; 32]).committee_seed()).collect();
    assert_eq!(seeds.len(), 1, "nonce and time do not move the seed");
    assert_ne!(spec(&c, 0, [9; 32]).committee_seed(), spec(&c, 0, [10; 32]).committee_seed());
    assert_ne!(spec(&c, 0, [9; 32]).id(), spec(&c, 1, [9; 32]).id(), "task ids still differ");
}

#[test]
fn only_the_best_ranked_candidates_make_a_committee() {
    let c = NodeKey::from_seed([1; 32]);
    let s = spec(&c, 1, [3; 32]);
    let seed = s.committee_seed();
    let list = peers(20);
    let honest = select(&seed, 0, &list, 3, 1);
    assert_eq!(check_committee(&seed, 0, &list, 1, &honest), Ok(()));
    // Substitutes are the next best: the extended committee still checks.
    let mut extended = honest.clone();
    extended.extend(next_from_list(&seed, 0, &list, honest.len(), 2, 1));
    assert_eq!(check_committee(&seed, 0, &list, 1, &extended), Ok(()));
    // A coordinator's own pick among the candidates, or someone not on the list, fails.
    let worst = next_from_list(&seed, 0, &list, honest.len(), 17, 1);
    let chosen = vec![honest[0], honest[1], worst[16]];
    assert!(matches!(check_committee(&seed, 0, &list, 1, &chosen), Err(CommitteeError::NotSampled(3))));
    let stranger = NodeKey::from_seed([200; 32]).peer_id();
    assert!(matches!(
        check_committee(&seed, 0, &list, 1, &[honest[0], honest[1], stranger]),
        Err(CommitteeError::NotACandidate(p)) if p == stranger
    ));
    let mut bad = list.clone();
    bad[0].weight = f64::NAN;
    assert!(matches!(check_committee(&seed, 0, &bad, 1, &honest), Err(CommitteeError::BadCandidate(_))));
    let too_many: Vec<Listed> = (0..(MAX_CANDIDATES as u32 + 1))
        .map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            Listed::new(NodeKey::from_seed(k).peer_id(), 1.0)
        })
        .collect();
    assert!(matches!(check_committee(&seed, 0, &too_many, 1, &honest), Err(CommitteeError::TooManyCandidates(_))));
}

/// A coordinator that seats members of its choosing is refused by those members (with
/// a gossip penalty) and its verdict by every verifier.
#[test]
fn a_chosen_committee_is_refused_by_members_and_verifiers() {
    let coordinator = NodeKey::from_seed([1; 32]);
    let s = spec(&coordinator, 1, [4; 32]);
    let seed = s.committee_seed();
    let keys: Vec<NodeKey> = (0..10u8).map(|i| NodeKey::from_seed([i + 50; 32])).collect();
    let list: Vec<Listed> = keys.iter().map(|k| Listed::new(k.peer_id(), 1.0)).collect();
    let fair = select(&seed, 0, &list, 3, 1);
    // The coordinator's friends: the three worst-ranked candidates.
    let mut ranked = select(&seed, 0, &list, 10, 1);
    let friends: Vec<PeerId> = ranked.split_off(7);
    assert!(friends.iter().all(|f| !fair.contains(f)));
    let ann = TaskAnnouncement {
        spec: s.clone(),
        attempt: 0,
        revision: 0,
        committee: friends.clone(),
        commit_deadline_ms: 5_000,
        reveal_deadline_ms: 6_000,
        candidates: list.clone(),
    };
    let env = SignedEnvelope::seal(&coordinator, &ann).expect("seal");
    let friend_key = keys.iter().find(|k| k.peer_id() == friends[0]).expect("key").clone();
    let mut member = Consensus::new(friend_key, RoundParams::default());
    let err = member.handle(&env, 1_000).expect_err("a seat nobody sampled");
    assert!(matches!(err, RoundError::Committee(CommitteeError::NotSampled(3))) && err.merits_penalty(), "{err}");
    assert_eq!(member.load().1, 0);
    // The verdict of such a round does not verify either.
    let v = nobody_committed(&coordinator, &s, env, &friends, 0);
    assert!(matches!(verify(&v), Err(VerifyError::Committee(CommitteeError::NotSampled(3)))));
}

/// Whole rounds on the simulator: every committee (and every substitute) a coordinator
/// seats is the one its candidates give, and every node verifies it.
#[test]
fn simulated_rounds_seat_recomputable_committees() {
    let mut net = SimNet::new(9, RoundParams::default(), |_| Behaviour::Honest);
    for c in 0..6 {
        let spec = net.spec(c % 9, 3, 1);
        net.submit(c % 9, spec).expect("submit");
        net.run(120_000);
    }
    let applied: usize = net.nodes.iter().map(|n| n.applied.len()).sum();
    assert!(applied >= 6 * 9, "every node verified every verdict: {applied}");
    assert!(net.rejections.is_empty(), "{:?}", net.rejections);
}

/// A node that reads a verdict whose announcement's (not full) candidate list leaves it
/// out is told so, once, to record first-hand against the coordinator; listed or
/// outranked, it is not. The announcement itself goes to the committee only, and one
/// that reaches a non-member anyway (gossiped) tells it nothing.
#[test]
fn a_node_left_off_the_list_notices() {
    let coordinator = NodeKey::from_seed([1; 32]);
    let me = NodeKey::from_seed([77; 32]);
    let s = spec(&coordinator, 1, [5; 32]);
    let list = peers(5);
    let seed = s.committee_seed();
    let committee = select(&seed, 0, &list, 3, 1);
    let ann = |candidates: Vec<Listed>| TaskAnnouncement {
        spec: s.clone(),
        attempt: 0,
        revision: 0,
        committee: committee.clone(),
        commit_deadline_ms: 5_000,
        reveal_deadline_ms: 6_000,
        candidates,
    };
    let left_out_at = |candidates: Vec<Listed>, now: u64| {
        let mut node = Consensus::new(me.clone(), RoundParams::default());
        let env = SignedEnvelope::seal(&coordinator, &ann(candidates)).expect("seal");
        assert!(node.handle(&env, 1_000).expect("handled").is_empty(), "an announcement that does not seat it");
        let v = nobody_committed(&coordinator, &s, env, &committee, 7_000);
        let count = |actions: Vec<Action>| actions.iter().filter(|a| matches!(a, Action::LeftOut { .. })).count();
        let first = count(node.handle(&v, now).expect("a verdict that verifies"));
        assert_eq!(count(node.handle(&v, now + 1).expect("again")), 0, "one verdict, one notice at most");
        first == 1
    };
    let left_out = |candidates: Vec<Listed>| left_out_at(candidates, 7_000);
    // An old verdict gossiped again tells nobody anything: a node that forgot it would
    // count it once more.
    assert!(left_out_at(list.clone(), 7_000 + LEFT_OUT_FRESH_MS));
    assert!(!left_out_at(list.clone(), 7_001 + LEFT_OUT_FRESH_MS), "a stale verdict");
    assert!(left_out(list.clone()), "not on a short list");
    let mut with_me = list.clone();
    with_me.push(Listed::new(me.peer_id(), 1e-9));
    assert!(!left_out(with_me), "listed, just outranked");
    let full: Vec<Listed> = list
        .iter()
        .copied()
        .chain((0..(MAX_CANDIDATES as u32 - 5)).map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 0xAB;
            Listed::new(NodeKey::from_seed(k).peer_id(), 1e-9)
        }))
        .collect();
    assert!(!left_out(full), "a full list may outrank anyone");
}
