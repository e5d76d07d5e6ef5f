//! The trust model's promises 1–4 against the attacks one key can try: forged absences,
//! dropped commits, re-announcement framing, two verdicts for one attempt, colluding
//! majorities, out-of-range attempts, and declines. Each test is an attack that must
//! fail to lower any honest node's standing in any honest node's view.

use proptest::prelude::*;
use sampo_consensus::sim::{SimNet, reference_output};
use sampo_consensus::*;

fn params() -> RoundParams {
    RoundParams { commit_window_ms: 5_000, reveal_window_ms: 5_000, ..RoundParams::default() }
}

/// No honest peer lost anything in any honest node's view.
fn assert_honest_untouched(net: &SimNet, honest: &[usize]) {
    for &h in honest {
        for &q in honest {
            let Some(r) = net.nodes[h].view.get(&net.peer(q)) else { continue };
            assert!(
                r.wrong == 0.0 && r.absent == 0.0 && r.equivocations == 0 && r.banned_until_ms == 0,
                "node {h} holds honest node {q} at {r:?}"
            );
        }
    }
}

fn commits_by(net: &SimNet, member: usize, task: &TaskId) -> Vec<Hash32> {
    net.log
        .iter()
        .filter(|(i, e)| *i == member && e.kind() == MessageKind::Commit)
        .filter_map(|(_, e)| e.open::<Commit>().ok())
        .filter(|c| c.task == *task)
        .map(|c| c.hash)
        .collect()
}

#[test]
fn byzantine_coordinator_harms_no_honest_node_and_is_banned() {
    let mut net =
        SimNet::new(6, params(), |i| if i == 0 { Behaviour::ByzantineCoordinator } else { Behaviour::Honest });
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec.clone()).expect("submit");
    let committee: Vec<usize> = net.nodes[0]
        .consensus
        .view(&task)
        .expect("coordinating")
        .committee
        .iter()
        .map(|p| net.index_of(p).expect("known"))
        .collect();
    // Seated members restart after the first verdict (their seats in memory are gone),
    // so that the re-announcement finds them with only their stored commits.
    net.settle();
    for &m in &committee {
        if m != 0 {
            net.restart(m);
        }
    }
    net.run(120_000);
    let honest: Vec<usize> = (1..6).collect();

    // The forged verdict verified everywhere and marked its victims absent...
    let forged = net.nodes[1]
        .applied
        .iter()
        .find(|v| v.task() != task && v.verdict.marks.iter().all(|(_, m)| *m == Mark::Absent))
        .expect("the forged verdict verifies");
    assert!(!forged.verdict.marks.is_empty());
    // ...and two verdicts for the real task's attempt 0 went out.
    let real: Vec<_> = net.nodes[1].applied.iter().filter(|v| v.task() == task).collect();
    assert_eq!(real.len(), 2, "a second verdict for the same attempt");
    assert_ne!(real[0].envelope.id(), real[1].envelope.id());
    // Re-announced after a restart, every member committed the very same hash.
    for &m in &committee {
        if m == 0 {
            continue;
        }
        let hashes = commits_by(&net, m, &task);
        assert!(hashes.len() >= 2, "member {m} committed twice: {hashes:?}");
        assert!(hashes.windows(2).all(|w| w[0] == w[1]), "member {m} signed different commits: {hashes:?}");
    }
    for v in &real {
        assert!(v.verdict.evidence.equivocations.is_empty(), "no honest member was framed");
    }
    assert_honest_untouched(&net, &honest);
    for h in honest {
        let r = net.nodes[h].view.get(&net.peer(0)).cloned().unwrap_or_default();
        assert!(r.is_banned(net.now_ms), "node {h} bans the equivocating coordinator: {r:?}");
    }
}

#[test]
fn a_restarted_member_answers_a_reannouncement_with_the_same_commit() {
    let key = NodeKey::from_seed([42; 32]);
    let coordinator = NodeKey::from_seed([43; 32]);
    let spec = TaskSpec {
        coordinator: coordinator.peer_id(),
        nonce: 1,
        created_ms: 0,
        model: ModelId(Hash32::of(b"m")),
        prompt: Prompt::Text("p".into()),
        params: SamplingParams::default(),
        k: 1,
        max_escalations: 0,
        fee: 0,
        client_entropy: [7; 32],
    };
    let task = spec.id();
    let ann = |revision| TaskAnnouncement {
        spec: spec.clone(),
        attempt: 0,
        revision,
        committee: vec![key.peer_id()],
        commit_deadline_ms: 100,
        reveal_deadline_ms: 200,
        candidates: [key.peer_id()].iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
    };
    let commit_of = |actions: &[Action]| {
        actions.iter().find_map(|a| match a {
            Action::Publish { envelope, .. } if envelope.kind() == MessageKind::Commit => Some(envelope.clone()),
            _ => None,
        })
    };
    let mut first = Consensus::new(key.clone(), RoundParams::default());
    first.handle(&SignedEnvelope::seal(&coordinator, &ann(0)).expect("seal"), 1).expect("seated");
    let actions = first.executed(task, 0, vec![1, 2, 3], 2);
    // The commit is stored before it is published.
    let store = actions.iter().position(|a| matches!(a, Action::StoreCommit { .. })).expect("store");
    let publish = actions
        .iter()
        .position(|a| matches!(a, Action::Publish { envelope, .. } if envelope.kind() == MessageKind::Commit))
        .expect("publish");
    assert!(store < publish);
    let a = commit_of(&actions).expect("commit");
    // A restart: a fresh machine with the same key, seated again by a re-announcement.
    let mut second = Consensus::new(key.clone(), RoundParams::default());
    let acts = second.handle(&SignedEnvelope::seal(&coordinator, &ann(1)).expect("seal"), 3).expect("seated");
    assert!(acts.iter().any(|a| matches!(a, Action::Execute { .. })));
    let b = commit_of(&second.resume(task, 0, vec![1, 2, 3], 4)).expect("commit");
    assert_eq!(a, b, "the same commit, byte for byte");
    // Even re-running the inference (no stored commit) gives the same commit.
    let mut third = Consensus::new(key.clone(), RoundParams::default());
    third.handle(&SignedEnvelope::seal(&coordinator, &ann(2)).expect("seal"), 3).expect("seated");
    assert_eq!(commit_of(&third.executed(task, 0, vec![1, 2, 3], 4)), Some(a));
}

#[test]
fn colluding_majority_is_overturned_by_replay() {
    // Three nodes, so every committee is all of them: two colluders reveal one wrong output.
    let mut net = SimNet::new(3, params(), |i| if i == 0 { Behaviour::Honest } else { Behaviour::WrongOutput });
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec.clone()).expect("submit");
    net.run(60_000);
    let v = net.nodes[0].applied.iter().find(|v| v.task() == task).expect("verdict").clone();
    let Outcome::Finalized { output } = &v.verdict.outcome else { panic!("{:?}", v.verdict.outcome) };
    assert_ne!(output, &reference_output(&spec), "the lie finalized");
    assert_eq!(v.verdict.marks.iter().find(|(p, _)| *p == net.peer(0)).map(|m| m.1), Some(Mark::Wrong));
    // The honest member's Wrong mark is contested, not applied on the majority's word.
    let a = assess(&v, &net.peer(0), true);
    assert_eq!(a.contested, vec![net.peer(0)]);
    assert!(a.bans.is_empty());
    let expected = reference_output(&spec);
    let j = judge(&v, &|o| Some(o == expected.as_slice()));
    assert!(j.overturned);
    assert_eq!(j.liars.len(), 2);
    assert!(j.wrong.is_empty());
    assert_honest_untouched(&net, &[0]);
    for liar in [1, 2] {
        assert!(net.nodes[0].view[&net.peer(liar)].is_banned(net.now_ms), "liar {liar} banned");
    }
}

#[test]
fn a_bystander_applies_no_absence_and_no_contested_wrong_mark() {
    let mut net =
        SimNet::new(6, params(), |i| if i == 0 { Behaviour::ByzantineCoordinator } else { Behaviour::Honest });
    let spec = net.spec(0, 3, 0);
    net.submit(0, spec).expect("submit");
    net.settle();
    let forged = net.nodes[1].applied.iter().find(|v| v.verdict.evidence.commits.is_empty()).expect("forged").clone();
    for i in 1..6 {
        let a = assess(&forged, &net.peer(i), true);
        assert!(a.marks.is_empty() && a.bans.is_empty() && a.contested.is_empty(), "{a:?}");
    }
    // Only the coordinator itself records what it claims to have seen.
    let own = assess(&forged, &net.peer(0), true);
    assert!(own.marks.iter().all(|(_, m)| *m == Mark::Absent) && !own.marks.is_empty());
}

fn hand_verdict(attempt: u8, k: u8) -> SignedEnvelope {
    let coordinator = NodeKey::from_seed([7; 32]);
    let spec = TaskSpec {
        coordinator: coordinator.peer_id(),
        nonce: 1,
        created_ms: 0,
        model: ModelId(Hash32::of(b"m")),
        prompt: Prompt::Text("p".into()),
        params: SamplingParams::default(),
        k,
        max_escalations: 0,
        fee: 0,
        client_entropy: [7; 32],
    };
    let task = spec.id();
    let victims: Vec<PeerId> = (0..60u8).map(|i| NodeKey::from_seed([i + 100; 32]).peer_id()).collect();
    let ann = TaskAnnouncement {
        spec,
        attempt,
        revision: 0,
        committee: victims.clone(),
        commit_deadline_ms: 0,
        reveal_deadline_ms: 0,
        candidates: victims.iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
    };
    let verdict = Verdict {
        task,
        attempt,
        outcome: Outcome::Disputed,
        marks: victims.iter().map(|p| (*p, Mark::Absent)).collect(),
        payouts: Vec::new(),
        evidence: Evidence {
            announcement: SignedEnvelope::seal(&coordinator, &ann).expect("seal"),
            reveal_request: None,
            commits: Vec::new(),
            reveals: Vec::new(),
            equivocations: Vec::new(),
            declines: Vec::new(),
        },
        decided_ms: 0,
    };
    SignedEnvelope::seal(&coordinator, &verdict).expect("seal")
}

#[test]
fn attempts_beyond_the_spec_are_rejected_before_any_arithmetic() {
    for (attempt, k) in [(1u8, 3u8), (255, 31), (255, 1), (9, 31)] {
        match verify(&hand_verdict(attempt, k)) {
            Err(VerifyError::AttemptOutOfRange { attempt: a, max: 0 }) => assert_eq!(a, attempt),
            other => panic!("attempt {attempt}, k {k}: {other:?}"),
        }
    }
    // The same announcement fed to a member is refused, with a penalty for its sender.
    let v: Verdict = hand_verdict(255, 31).open().expect("open");
    let ann_env = v.evidence.announcement;
    let ann: TaskAnnouncement = ann_env.open().expect("open");
    let mut member = Consensus::new(NodeKey::from_seed([100; 32]), RoundParams::default());
    assert!(ann.committee.contains(&member.peer_id()));
    let err = member.handle(&ann_env, 0).expect_err("refused");
    assert!(matches!(err, RoundError::AttemptOutOfRange { attempt: 255, max: 0 }), "{err}");
    assert!(err.merits_penalty());
}

fn declined_round(reason: DeclineReason) -> (SimNet, TaskId, PeerId) {
    let mut net = SimNet::new(6, params(), |_| Behaviour::Honest);
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec).expect("submit");
    let committee = net.nodes[0].consensus.view(&task).expect("view").committee;
    let decliner = committee.iter().map(|p| net.index_of(p).expect("known")).find(|i| *i != 0).expect("member");
    // It declines instead of running the task.
    net.nodes[decliner].offline = true;
    net.settle();
    let now = net.now_ms;
    let actions = net.nodes[decliner].consensus.decline(task, 0, reason, now);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Publish { envelope, .. } if envelope.kind() == MessageKind::Decline))
    );
    net.act(decliner, actions);
    net.run(120_000);
    let p = net.peer(decliner);
    (net, task, p)
}

#[test]
fn a_member_declining_for_a_reason_that_holds_is_not_absent() {
    let (net, task, decliner) = declined_round(DeclineReason::Price { price_per_1k: u64::MAX });
    let v = net.nodes[0].applied.iter().find(|v| v.task() == task).expect("verdict");
    assert_eq!(v.verdict.marks.iter().find(|(p, _)| *p == decliner).map(|m| m.1), Some(Mark::Declined));
    assert_eq!(v.verdict.evidence.declines.len(), 1);
    assert!(matches!(v.verdict.outcome, Outcome::Finalized { .. }), "a substitute took the seat");
    let r = net.nodes[0].view.get(&decliner).cloned().unwrap_or_default();
    assert_eq!((r.absent, r.wrong), (0.0, 0.0), "not even first-hand");
}

#[test]
fn a_decline_with_a_false_reason_is_absence_and_cannot_be_smuggled_into_evidence() {
    // The task asks for 8 tokens: "more than my limit of 1,000" is false.
    let (net, task, decliner) = declined_round(DeclineReason::MaxTokens { limit: 1000 });
    let v = net.nodes[0].applied.iter().find(|v| v.task() == task).expect("verdict").clone();
    assert_eq!(v.verdict.marks.iter().find(|(p, _)| *p == decliner).map(|m| m.1), Some(Mark::Absent));
    assert!(v.verdict.evidence.declines.is_empty());
    // A coordinator that files the false decline anyway has its verdict rejected.
    let key = net.nodes[0].key.clone();
    let decline = SignedEnvelope::seal(
        &net.nodes[net.index_of(&decliner).expect("known")].key,
        &Decline { task, attempt: 0, reason: DeclineReason::MaxTokens { limit: 1000 } },
    )
    .expect("seal");
    let mut forged = v.verdict.clone();
    forged.evidence.declines.push(decline);
    for (p, m) in forged.marks.iter_mut() {
        if *p == decliner {
            *m = Mark::Declined;
        }
    }
    let env = SignedEnvelope::seal(&key, &forged).expect("seal");
    assert!(matches!(verify(&env), Err(VerifyError::FalseDecline(p)) if p == decliner));
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Honest,
    Liar(Behaviour),
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        3 => Just(Role::Honest),
        1 => Just(Role::Liar(Behaviour::WrongOutput)),
        1 => Just(Role::Liar(Behaviour::NeverReveal)),
        1 => Just(Role::Liar(Behaviour::CopyCommit)),
        1 => Just(Role::Liar(Behaviour::Equivocate)),
        1 => Just(Role::Liar(Behaviour::ByzantineCoordinator)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random rounds with any subset of lying members and lying coordinators: no honest
    /// member's standing falls in any honest node's view.
    #[test]
    fn no_honest_standing_falls(roles in proptest::collection::vec(role(), 4..9), coordinators in proptest::collection::vec(any::<u8>(), 1..5)) {
        let n = roles.len();
        let behaviours: Vec<Behaviour> =
            roles.iter().map(|r| match r { Role::Honest => Behaviour::Honest, Role::Liar(b) => *b }).collect();
        let mut net = SimNet::new(n, params(), |i| behaviours[i]);
        for c in coordinators {
            let c = c as usize % n;
            let spec = net.spec(c, 3, 1);
            let _ = net.submit(c, spec);
            net.run(300_000);
        }
        prop_assert!(net.nodes.iter().any(|n| !n.applied.is_empty()), "some round ran");
        let honest: Vec<usize> = (0..n).filter(|i| behaviours[*i] == Behaviour::Honest).collect();
        for &h in &honest {
            for &q in &honest {
                if let Some(r) = net.nodes[h].view.get(&net.peer(q)) {
                    prop_assert!(
                        r.wrong == 0.0 && r.absent == 0.0 && r.equivocations == 0 && r.banned_until_ms == 0,
                        "node {} holds honest node {} at {:?} (roles {:?})", h, q, r, roles
                    );
                }
            }
        }
    }
}

/// Substitutes seated with a fresh deadline that have not committed when the original
/// members' (late) commits close the phase early are marked absent in the verdict, but
/// the coordinator, which saw their deadline had not passed, does not hold it against them.
#[test]
fn in_time_members_after_an_early_close_are_excused() {
    let mut net = SimNet::new(7, params(), |_| Behaviour::Honest);
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec.clone()).expect("submit");
    let committee: Vec<usize> = net.nodes[0]
        .consensus
        .view(&task)
        .expect("view")
        .committee
        .iter()
        .map(|p| net.index_of(p).expect("known"))
        .collect();
    // Nobody runs the task in time; substitutes will be seated but stay slow too.
    for n in &mut net.nodes {
        n.offline = true;
    }
    net.settle();
    net.tick(params().commit_window_ms);
    let seated = net.nodes[0].consensus.view(&task).expect("still running").committee;
    assert!(seated.len() > committee.len(), "substitutes seated: {}", seated.len());
    // The original members now commit (late for their own deadline), closing the phase.
    let now = net.now_ms;
    for &i in &committee {
        net.nodes[i].offline = false;
        let actions = net.nodes[i].consensus.executed(task, 0, reference_output(&spec), now);
        net.act(i, actions);
    }
    net.run(120_000);
    let v = net.verdicts(0, &task).last().cloned().cloned().expect("verdict");
    assert!(matches!(v.verdict.outcome, Outcome::Finalized { .. }), "{:?}", v.verdict.outcome);
    let subs: Vec<PeerId> = seated.iter().filter(|p| !committee.iter().any(|i| net.peer(*i) == **p)).copied().collect();
    assert!(!subs.is_empty());
    let excused = net.nodes[0].consensus.excused(&task, 0);
    for s in &subs {
        assert_eq!(v.verdict.marks.iter().find(|(p, _)| p == s).map(|m| m.1), Some(Mark::Absent));
        assert!(excused.contains(s), "substitute {s} excused");
    }
    assert_honest_untouched(&net, &(0..7).collect::<Vec<_>>());
}

/// A fraud proof against an honest verdict convinces nobody: every node replays before
/// acting, and a replay that upholds the output (or fails) concludes nothing against
/// anyone.
#[test]
fn a_false_fraud_proof_bans_nobody() {
    let mut net = SimNet::new(4, params(), |_| Behaviour::Honest);
    let spec = net.spec(0, 3, 0);
    let task = net.submit(0, spec.clone()).expect("submit");
    net.run(60_000);
    let v = net.nodes[0].applied.iter().find(|v| v.task() == task).expect("verdict").clone();
    let expected = reference_output(&spec);
    let upheld = judge(&v, &|o| Some(o == expected.as_slice()));
    assert!(!upheld.overturned && upheld.liars.is_empty() && upheld.wrong.is_empty(), "{upheld:?}");
    let failed = judge(&v, &|_| None);
    assert!(!failed.overturned && failed.liars.is_empty() && failed.wrong.is_empty(), "{failed:?}");
}
