//! Seats cannot be held hostage: deadlines are capped on the receiver's clock, one
//! coordinator holds a bounded share of a node's seats, and an expired seat frees itself.

use sampo_consensus::*;

fn announce(coordinator: &NodeKey, member: &PeerId, nonce: u64, reveal_deadline_ms: u64) -> SignedEnvelope {
    announce_by(coordinator, member, nonce, 5_000, reveal_deadline_ms)
}

fn announce_by(
    coordinator: &NodeKey,
    member: &PeerId,
    nonce: u64,
    commit_deadline_ms: u64,
    reveal_deadline_ms: u64,
) -> SignedEnvelope {
    let spec = TaskSpec {
        coordinator: coordinator.peer_id(),
        nonce,
        created_ms: 0,
        model: ModelId(Hash32::of(b"m")),
        prompt: Prompt::Text("p".into()),
        params: SamplingParams::default(),
        k: 1,
        max_escalations: 0,
        fee: 0,
        client_entropy: [7; 32],
    };
    let ann = TaskAnnouncement {
        spec,
        attempt: 0,
        revision: 0,
        committee: vec![*member],
        commit_deadline_ms,
        reveal_deadline_ms,
        candidates: [*member].iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
    };
    SignedEnvelope::seal(coordinator, &ann).expect("seal")
}

#[test]
fn a_seat_with_an_endless_deadline_frees_itself() {
    let params = RoundParams::default();
    let mut member = Consensus::new(NodeKey::from_seed([1; 32]), params.clone());
    let me = member.peer_id();
    let attacker = NodeKey::from_seed([2; 32]);
    let acts = member.handle(&announce(&attacker, &me, 1, u64::MAX), 1_000).expect("seated");
    assert!(acts.iter().any(|a| matches!(a, Action::Execute { .. })));
    assert_eq!(member.load().1, 1);
    member.tick(1_000 + params.max_seat_ms - 1, &[]);
    assert_eq!(member.load().1, 1, "still within the cap");
    member.tick(1_000 + params.max_seat_ms, &[]);
    assert_eq!(member.load().1, 0, "freed on this node's clock, whatever the announcement says");
}

#[test]
fn one_coordinator_cannot_take_every_seat() {
    let params = RoundParams::default();
    let mut member = Consensus::new(NodeKey::from_seed([1; 32]), params.clone());
    let me = member.peer_id();
    let attacker = NodeKey::from_seed([2; 32]);
    for nonce in 0..(params.max_duties as u64) {
        member.handle(&announce(&attacker, &me, nonce, u64::MAX), 1_000).expect("handled");
    }
    assert_eq!(member.load().1, params.max_duties_per_coordinator);
    let honest = NodeKey::from_seed([3; 32]);
    let acts = member.handle(&announce(&honest, &me, 0, 50_000), 1_000).expect("seated");
    assert!(acts.iter().any(|a| matches!(a, Action::Execute { .. })), "an honest coordinator still gets a seat");
}

/// A verdict nesting thousands of envelopes (each a signature to check) is refused at
/// the cap, before its signatures are paid for.
#[test]
fn a_verdict_cannot_nest_thousands_of_envelopes() {
    let key = NodeKey::from_seed([5; 32]);
    let task = TaskId(Hash32::of(b"t"));
    let commit = SignedEnvelope::seal(&key, &Commit { task, attempt: 0, hash: Hash32::of(b"h") }).expect("seal");
    let ann = announce(&key, &key.peer_id(), 1, 10);
    let verdict = Verdict {
        task,
        attempt: 0,
        outcome: Outcome::Disputed,
        marks: Vec::new(),
        payouts: Vec::new(),
        evidence: Evidence {
            announcement: ann,
            reveal_request: None,
            commits: vec![commit.clone(); 5000],
            reveals: Vec::new(),
            equivocations: Vec::new(),
            declines: Vec::new(),
        },
        decided_ms: 0,
    };
    let env = SignedEnvelope::seal(&key, &verdict).expect("fits in one envelope");
    let back = SignedEnvelope::from_bytes(&env.to_bytes()).expect("the outer envelope is fine");
    let err = back.open::<Verdict>().expect_err("over the cap");
    assert!(err.to_string().contains("nested envelopes"), "{err}");
    assert!(matches!(verify(&back), Err(VerifyError::Envelope { .. })));
    // At the cap's size, an honest-sized verdict still opens.
    let mut fine = verdict.clone();
    fine.evidence.commits.truncate(MAX_NESTED_ENVELOPES - 1);
    let env = SignedEnvelope::seal(&key, &fine).expect("seal");
    assert!(env.open::<Verdict>().is_ok());
}

/// Deadlines out of order, or a commit deadline past the seat cap, are refused with a
/// penalty: they are how one key would queue work that outlives its seats.
#[test]
fn nonsense_deadlines_are_refused() {
    let params = RoundParams::default();
    let mut member = Consensus::new(NodeKey::from_seed([1; 32]), params.clone());
    let me = member.peer_id();
    let attacker = NodeKey::from_seed([2; 32]);
    let ann = announce(&attacker, &me, 1, 4_000);
    let err = member.handle(&ann, 1_000).expect_err("reveal before commit");
    assert!(matches!(err, RoundError::BadDeadlines { .. }) && err.merits_penalty(), "{err}");
    assert_eq!(member.load().1, 0);
    // A commit deadline one millisecond past the seat cap (on the member's clock).
    let cap = 1_000 + params.max_seat_ms;
    let err = member.handle(&announce_by(&attacker, &me, 2, cap + 1, cap + 2), 1_000).expect_err("past the cap");
    assert!(matches!(err, RoundError::BadDeadlines { .. }) && err.merits_penalty(), "{err}");
    assert_eq!(member.load().1, 0);
    // At the cap: seated.
    member.handle(&announce_by(&attacker, &me, 3, cap, cap + 1), 1_000).expect("at the cap");
    assert_eq!(member.load().1, 1);
}

/// A seat whose inference is still running keeps counting against its coordinator,
/// even after the (short) deadlines it was announced with have passed.
#[test]
fn running_seats_count_until_their_inference_reports() {
    let params = RoundParams::default();
    let mut member = Consensus::new(NodeKey::from_seed([1; 32]), params.clone());
    let me = member.peer_id();
    let attacker = NodeKey::from_seed([2; 32]);
    for nonce in 0..3 {
        member.handle(&announce(&attacker, &me, nonce, 6_000), 1_000).expect("seated");
    }
    member.tick(7_000, &[]);
    assert_eq!(member.load().1, 3, "still executing: still counted");
    member.tick(1_000 + params.max_seat_ms, &[]);
    assert_eq!(member.load().1, 0, "freed at the seat cap");
}

/// A busy honest coordinator: seats this node finished (revealed) do not count against
/// the per-coordinator cap while they linger until their reveal deadline.
#[test]
fn finished_seats_do_not_count_against_the_cap() {
    let params = RoundParams::default();
    let mut net = sampo_consensus::sim::SimNet::new(3, params.clone(), |_| Behaviour::Honest);
    for _ in 0..(2 * params.max_duties_per_coordinator) {
        let spec = net.spec(0, 3, 0);
        let task = net.submit(0, spec).expect("submit");
        net.settle();
        assert!(
            matches!(net.outcome(0, &task), Some(Outcome::Finalized { .. })),
            "every task finalizes at once, none waits for a deadline"
        );
    }
}
