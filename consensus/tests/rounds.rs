//! Whole rounds on the in-process network: the honest path, and every kind of
//! misbehaviour the protocol must catch.

use sampo_consensus::sim::{SimNet, reference_output};
use sampo_consensus::*;

fn net(n: usize) -> SimNet {
    SimNet::new(n, RoundParams::default(), |_| Behaviour::Honest)
}

/// Submit a k = 3 task at node 0 and return (task, spec, committee) before it runs.
fn start(net: &mut SimNet, k: u8, escalations: u8) -> (TaskId, TaskSpec, Vec<usize>) {
    let spec = net.spec(0, k, escalations);
    let task = net.submit(0, spec.clone()).expect("submit");
    let view = net.nodes[0].consensus.view(&task).expect("coordinating");
    let committee = view.committee.iter().map(|p| net.index_of(p).expect("known")).collect();
    (task, spec, committee)
}

fn finalized(net: &SimNet, task: &TaskId) -> Vec<u32> {
    match net.outcome(0, task) {
        Some(Outcome::Finalized { output }) => output.clone(),
        other => panic!("task not finalized: {other:?}"),
    }
}

/// A task's announcement is addressed to its committee: everyone else learns the task
/// from the verdict.
#[test]
fn the_announcement_is_for_the_committee() {
    let mut net = net(6);
    let spec = net.spec(0, 3, 0);
    let candidates = net.candidates(0);
    let (task, actions) = net.nodes[0].consensus.submit(spec, None, &candidates, 0).expect("submit");
    let committee = net.nodes[0].consensus.view(&task).expect("coordinating").committee;
    let to: Vec<&Vec<PeerId>> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { envelope, to, .. } if envelope.kind() == MessageKind::TaskAnnouncement => Some(to),
            _ => None,
        })
        .collect();
    assert_eq!(to, vec![&committee]);
}

/// Messages addressed to some peers (the announcement and reveal request to the
/// committee, commits and reveals to the coordinator) reaching them alone: the round
/// still finalizes, and every node verifies the verdict.
#[test]
fn an_honest_round_needs_only_what_is_addressed_to_each_node() {
    let mut net = net(6);
    net.as_addressed = true;
    let (task, spec, _) = start(&mut net, 3, 0);
    net.run(60_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    for n in &net.nodes {
        assert_eq!(n.applied.iter().filter(|a| a.task() == task).count(), 1);
    }
    assert!(net.rejections.is_empty(), "{:?}", net.rejections);
}

#[test]
fn honest_round_finalizes_and_every_node_verifies_it() {
    let mut net = net(6);
    let (task, spec, committee) = start(&mut net, 3, 0);
    assert_eq!(committee.len(), 3);
    net.run(60_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    let v = net.verdicts(0, &task);
    assert_eq!(v.len(), 1);
    assert!(v[0].verdict.marks.iter().all(|(_, m)| *m == Mark::Agreed));
    assert_eq!(v[0].verdict.payouts.iter().map(|(_, c)| c).sum::<u64>(), spec.fee);
    // Every node (not only the coordinator) checked the evidence and applied it once.
    for n in &net.nodes {
        assert_eq!(n.applied.iter().filter(|a| a.task() == task).count(), 1);
    }
    assert!(net.rejections.is_empty(), "{:?}", net.rejections);
    // The round finished well before any deadline: it never needed a tick.
    assert_eq!(net.nodes[0].consensus.load().0, 0);
}

/// A coordinator applies the verdict it has just sealed without opening it again (its
/// nested signatures were checked as the messages came in): what it applies must be
/// exactly what every other node gets by verifying the envelope, liars and equivocators
/// included.
#[test]
fn the_coordinator_applies_its_own_verdict_as_every_node_verifies_it() {
    let mut cases = vec![("honest", net(6), None)];
    for b in [Behaviour::WrongOutput, Behaviour::NeverReveal, Behaviour::Equivocate] {
        let (n, _, _, _) = with_behaviour(6, 2, b);
        cases.push(("misbehaving member", n, Some(b)));
    }
    for (what, mut net, b) in cases {
        let task = match b {
            None => start(&mut net, 3, 0).0,
            Some(_) => net
                .log
                .iter()
                .find(|(_, e)| e.kind() == MessageKind::TaskAnnouncement)
                .expect("ann")
                .1
                .open::<TaskAnnouncement>()
                .expect("ann")
                .spec
                .id(),
        };
        net.run(120_000);
        let own = net.verdicts(0, &task);
        assert_eq!(own.len(), 1, "{what} {b:?}");
        let verified = verify(&own[0].envelope).expect("the coordinator's verdict verifies");
        assert_eq!(&verified, own[0], "{what} {b:?}");
        for (i, n) in net.nodes.iter().enumerate().skip(1) {
            let theirs: Vec<&VerifiedVerdict> = n.applied.iter().filter(|a| a.task() == task).collect();
            assert_eq!(theirs, vec![own[0]], "{what} {b:?}: node {i}");
        }
    }
}

fn with_behaviour(n: usize, bad: usize, b: Behaviour) -> (SimNet, TaskId, TaskSpec, Vec<usize>) {
    // Pick a task whose committee seats node `bad`, then make that node misbehave.
    for burn in 0..64 {
        let mut net = net(n);
        for _ in 0..burn {
            net.spec(0, 3, 0);
        }
        let (task, spec, committee) = start(&mut net, 3, 0);
        if committee.contains(&bad) && bad != 0 {
            let key = net.nodes[bad].key.clone();
            net.nodes[bad].consensus = Consensus::new(key, RoundParams::default()).with_behaviour(b);
            // Re-deliver the announcement to the fresh machine (it missed it).
            let ann = net.log.iter().find(|(_, e)| e.kind() == MessageKind::TaskAnnouncement).expect("ann").1.clone();
            let actions = net.nodes[bad].consensus.handle(&ann, net.now_ms).expect("handle");
            net.act(bad, actions);
            return (net, task, spec, committee);
        }
    }
    panic!("no committee seated node {bad}");
}

#[test]
fn wrong_output_is_outvoted_and_marked_wrong() {
    let (mut net, task, spec, _) = with_behaviour(5, 2, Behaviour::WrongOutput);
    net.run(60_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    assert_eq!(net.mark(0, &task, &net.peer(2)), Some(Mark::Wrong));
    let v = &net.verdicts(0, &task)[0].verdict;
    assert!(v.payouts.iter().all(|(p, _)| *p != net.peer(2)), "a liar is paid nothing");
}

#[test]
fn silent_members_are_replaced_by_substitutes_and_marked_absent() {
    let mut net = net(6);
    let (task, spec, committee) = start(&mut net, 3, 0);
    // Two of three silent: one commit is below the quorum at the deadline, so the
    // coordinator seats substitutes instead of giving up.
    let silent: Vec<usize> = committee.iter().copied().filter(|i| *i != 0).take(2).collect();
    for i in &silent {
        net.nodes[*i].offline = true;
    }
    net.run(300_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    let v = &net.verdicts(0, &task)[0];
    assert_eq!(v.committee.len(), 5, "two substitutes seated: {:?}", v.committee);
    for i in &silent {
        assert_eq!(net.mark(0, &task, &net.peer(*i)), Some(Mark::Absent));
    }
    assert_eq!(v.verdict.marks.iter().filter(|(_, m)| *m == Mark::Agreed).count(), 3);
}

#[test]
fn commit_without_reveal_is_absent_and_quorum_still_finalizes() {
    let (mut net, task, spec, _) = with_behaviour(5, 3, Behaviour::NeverReveal);
    net.run(120_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    assert_eq!(net.mark(0, &task, &net.peer(3)), Some(Mark::Absent));
}

#[test]
fn reveal_that_does_not_open_its_commit_is_wrong() {
    let mut net = net(5);
    let (task, spec, committee) = start(&mut net, 3, 0);
    let liar = *committee.iter().find(|i| **i != 0).expect("member");
    let key = net.nodes[liar].key.clone();
    // The liar commits honestly, then reveals the right tokens with another salt.
    net.tamper = Some(Box::new(move |from, env| {
        if from == liar && env.kind() == MessageKind::Reveal {
            let mut r: Reveal = env.open().ok()?;
            r.salt[0] ^= 1;
            return SignedEnvelope::seal(&key, &r).ok();
        }
        Some(env.clone())
    }));
    net.run(120_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    assert_eq!(net.mark(0, &task, &net.peer(liar)), Some(Mark::Wrong));
}

#[test]
fn lazy_copier_cannot_reuse_another_members_commit() {
    let (mut net, task, spec, _) = with_behaviour(5, 1, Behaviour::CopyCommit);
    net.run(120_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    // It copied a hash and later the victim's reveal, but the hash binds the victim's id.
    let copied = net.log.iter().filter(|(i, e)| *i == 1 && e.kind() == MessageKind::Commit).count();
    assert_eq!(copied, 1, "the copier did commit");
    assert_eq!(net.mark(0, &task, &net.peer(1)), Some(Mark::Wrong));
}

#[test]
fn equivocation_is_kept_as_proof_and_punished() {
    let (mut net, task, spec, _) = with_behaviour(5, 4, Behaviour::Equivocate);
    net.run(120_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    let v = &net.verdicts(0, &task)[0];
    assert_eq!(v.verdict.evidence.equivocations.len(), 1);
    assert_eq!(v.verdict.evidence.equivocations[0].0.signer(), net.peer(4));
    assert_eq!(net.mark(0, &task, &net.peer(4)), Some(Mark::Wrong));
    assert!(net.nodes[0].view[&net.peer(4)].is_banned(net.now_ms), "equivocation bans at once");
}

#[test]
fn forged_announcement_is_rejected_with_a_penalty() {
    let mut net = net(4);
    let spec = net.spec(0, 3, 0);
    // Node 1 announces a task in node 0's name.
    let ann = TaskAnnouncement {
        spec,
        attempt: 0,
        revision: 0,
        committee: vec![net.peer(2)],
        commit_deadline_ms: net.now_ms + 1000,
        reveal_deadline_ms: net.now_ms + 2000,
        candidates: [net.peer(2)].iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
    };
    let forged = SignedEnvelope::seal(&net.nodes[1].key, &ann).expect("seal");
    let now = net.now_ms;
    let err = net.nodes[2].consensus.handle(&forged, now).expect_err("forged");
    assert_eq!(err, RoundError::NotCoordinator("task announcement"));
    assert!(err.merits_penalty());
    assert_eq!(net.nodes[2].consensus.load(), (0, 0), "no seat taken");
}

#[test]
fn replayed_messages_change_nothing() {
    let mut net = net(5);
    let (task, _, _) = start(&mut net, 3, 0);
    net.run(60_000);
    let verdict = net.log.iter().rev().find(|(_, e)| e.kind() == MessageKind::Verdict).expect("verdict").1.clone();
    let commit = net.log.iter().find(|(_, e)| e.kind() == MessageKind::Commit).expect("commit").1.clone();
    let now = net.now_ms;
    for n in &mut net.nodes {
        assert!(n.consensus.handle(&verdict, now).expect("replay").is_empty(), "verdict applied once only");
        assert!(n.consensus.handle(&commit, now).expect("replay").is_empty());
    }
    assert_eq!(net.nodes[1].applied.iter().filter(|v| v.task() == task).count(), 1);
}

#[test]
fn commit_after_the_reveal_request_is_ignored() {
    let mut net = net(8);
    let (task, spec, committee) = start(&mut net, 3, 0);
    let slow = *committee.iter().rev().find(|i| **i != 0).expect("member");
    net.nodes[slow].offline = true;
    // Hold every gossiped reveal back, so the round stays in its reveal phase.
    let held = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = held.clone();
    net.tamper = Some(Box::new(move |from, env| {
        if env.kind() == MessageKind::Reveal {
            sink.borrow_mut().push((from, env.clone()));
            return None;
        }
        Some(env.clone())
    }));
    // The deadline passes with a quorum of 2 commits: the request goes out without `slow`.
    net.settle();
    net.tick(RoundParams::default().commit_window_ms);
    let before = net.nodes[0].consensus.view(&task).expect("still revealing");
    assert_eq!(before.phase, Phase::Revealing);
    // `slow` commits now, after the request: too late to count.
    let late = SignedEnvelope::seal(&net.nodes[slow].key, &Commit { task, attempt: 0, hash: Hash32::of(b"late") })
        .expect("seal");
    let now = net.now_ms;
    let actions = net.nodes[0].consensus.handle(&late, now).expect("a late commit is ignored, not an error");
    assert!(actions.is_empty());
    assert_eq!(net.nodes[0].consensus.view(&task).expect("round").commits, before.commits);
    net.tamper = None;
    let held: Vec<_> = held.borrow_mut().drain(..).collect();
    for (from, envelope) in held {
        net.act(from, vec![Action::Publish { topic: Topic::Rounds, envelope, to: Vec::new() }]);
    }
    net.run(60_000);
    assert_eq!(finalized(&net, &task), reference_output(&spec));
    assert_eq!(net.mark(0, &task, &net.peer(slow)), Some(Mark::Absent));
    let v = &net.verdicts(0, &task)[0].verdict;
    assert!(v.evidence.commits.iter().all(|c| c.signer() != net.peer(slow)));
}

#[test]
fn no_quorum_escalates_to_a_larger_committee() {
    escalation(false);
}

/// The same with each message addressed to some peers delivered to them alone, as the
/// direct path does on a real network.
#[test]
fn no_quorum_escalates_when_messages_reach_their_addressees_only() {
    escalation(true);
}

fn escalation(as_addressed: bool) {
    // 1 honest, 1 liar, 1 silent of 3: no output has 2 votes.
    for seed_try in 0..64 {
        let mut net = net(12);
        net.as_addressed = as_addressed;
        for _ in 0..seed_try {
            net.spec(0, 3, 1);
        }
        let (task, spec, committee) = start(&mut net, 3, 1);
        let others: Vec<usize> = committee.iter().copied().filter(|i| *i != 0).collect();
        if others.len() < 2 {
            continue;
        }
        let (liar, silent) = (others[0], others[1]);
        let key = net.nodes[liar].key.clone();
        net.nodes[liar].consensus = Consensus::new(key, RoundParams::default()).with_behaviour(Behaviour::WrongOutput);
        let ann = net.log[0].1.clone();
        let actions = net.nodes[liar].consensus.handle(&ann, net.now_ms).expect("ann");
        net.act(liar, actions);
        let key = net.nodes[silent].key.clone();
        net.nodes[silent].consensus =
            Consensus::new(key, RoundParams::default()).with_behaviour(Behaviour::NeverReveal);
        let actions = net.nodes[silent].consensus.handle(&ann, net.now_ms).expect("ann");
        net.act(silent, actions);
        // Step by step: the coordinator stores (and so serves) attempt 0's verdict only
        // once the task has ended (a later attempt could escalate again, and its
        // committee must not see attempt 0's outputs before it commits).
        let is_attempt = |e: &SignedEnvelope, kind: MessageKind, attempt: u8| {
            e.kind() == kind
                && match kind {
                    MessageKind::Verdict => e.open::<Verdict>().is_ok_and(|v| v.task == task && v.attempt == attempt),
                    _ => e.open::<RevealRequest>().is_ok_and(|r| r.task == task && r.attempt == attempt),
                }
        };
        let request_sent =
            |net: &SimNet| net.log.iter().any(|(f, e)| *f == 0 && is_attempt(e, MessageKind::RevealRequest, 1));
        for _ in 0..600 {
            if net.nodes.iter().all(|n| n.consensus.load().0 == 0) {
                break;
            }
            net.tick(1000);
            let applied = net.nodes[0].applied.iter().any(|v| v.task() == task && v.verdict.attempt == 0);
            assert!(!applied || request_sent(&net), "attempt 0's verdict stored before attempt 1's commits closed");
            let ruled = net.nodes[0].applied.iter().any(|v| v.task() == task && v.verdict.attempt == 1);
            assert_eq!(applied, ruled, "attempt 0's verdict stored before the task ended");
        }
        let verdicts = net.verdicts(0, &task);
        assert_eq!(verdicts.len(), 2, "attempt 0 escalated, attempt 1 ruled");
        assert_eq!(verdicts[0].verdict.outcome, Outcome::Escalated);
        assert_eq!(verdicts[1].committee.len(), 7, "escalation seats 2k + 1");
        assert_eq!(finalized(&net, &task), reference_output(&spec));
        // On the network: attempt 0's verdict once, after attempt 1's reveal request (and
        // so after every commit it accepted), right before attempt 1's verdict.
        let at = |kind: MessageKind, attempt: u8| -> Vec<usize> {
            net.log
                .iter()
                .enumerate()
                .filter(|(_, (f, e))| *f == 0 && is_attempt(e, kind, attempt))
                .map(|(i, _)| i)
                .collect()
        };
        let (escalated, second_request) = (at(MessageKind::Verdict, 0), at(MessageKind::RevealRequest, 1));
        assert_eq!(escalated.len(), 1, "published once");
        assert_eq!(second_request.len(), 1);
        assert!(
            second_request[0] < escalated[0],
            "attempt 0's verdict at {escalated:?}, attempt 1's request at {second_request:?}"
        );
        let ruling = at(MessageKind::Verdict, 1);
        let from_coordinator: Vec<usize> =
            net.log.iter().enumerate().filter(|(_, (f, _))| *f == 0).map(|(i, _)| i).collect();
        let next = from_coordinator.iter().position(|i| *i == escalated[0]).map(|k| from_coordinator[k + 1]);
        assert_eq!(next, ruling.first().copied(), "attempt 0's verdict goes out with the task's last verdict");
        // And every node applied both verdicts.
        for n in &net.nodes {
            assert_eq!(n.applied.iter().filter(|a| a.task() == task).count(), 2);
        }
        return;
    }
    panic!("never seated a committee with two members besides the coordinator");
}

/// An escalation that cannot seat a larger committee ends the task as disputed; the
/// held verdict of the attempt that escalated goes out then, once.
#[test]
fn a_held_verdict_goes_out_when_no_larger_committee_can_be_seated() {
    // Three nodes: the committee is all of them; attempt 1 would need four to reach a quorum.
    let mut net = net(3);
    let (task, _, committee) = start(&mut net, 3, 1);
    assert_eq!(committee.len(), 3);
    let ann = net.log[0].1.clone();
    let others: Vec<usize> = committee.iter().copied().filter(|i| *i != 0).collect();
    for (i, behaviour) in others.iter().zip([Behaviour::WrongOutput, Behaviour::NeverReveal]) {
        let key = net.nodes[*i].key.clone();
        net.nodes[*i].consensus = Consensus::new(key, RoundParams::default()).with_behaviour(behaviour);
        let actions = net.nodes[*i].consensus.handle(&ann, net.now_ms).expect("ann");
        net.act(*i, actions);
    }
    net.run(600_000);
    assert_eq!(net.outcome(0, &task), Some(&Outcome::Disputed));
    let sent: Vec<&SignedEnvelope> = net
        .log
        .iter()
        .filter(|(f, e)| *f == 0 && e.open::<Verdict>().is_ok_and(|v| v.task == task))
        .map(|(_, e)| e)
        .collect();
    assert_eq!(sent.len(), 1, "the escalated verdict, once");
    assert_eq!(sent[0].open::<Verdict>().expect("verdict").outcome, Outcome::Escalated);
    for n in &net.nodes {
        assert_eq!(n.applied.iter().filter(|a| a.task() == task).count(), 1);
    }
}

#[test]
fn without_escalations_left_the_task_fails_as_disputed() {
    let mut net = net(3);
    let (task, _, committee) = start(&mut net, 3, 0);
    assert_eq!(committee.len(), 3);
    // Two of the three go silent: one commit is below the quorum of 2.
    for i in committee.iter().copied().filter(|i| *i != 0).collect::<Vec<_>>() {
        net.nodes[i].offline = true;
    }
    net.run(600_000);
    assert_eq!(net.outcome(0, &task), Some(&Outcome::Disputed));
    let v = &net.verdicts(0, &task)[0].verdict;
    assert!(v.evidence.reveal_request.is_none());
    assert_eq!(v.marks.iter().filter(|(_, m)| *m == Mark::Absent).count(), 2);
}

#[test]
fn flood_of_foreign_announcements_leaves_no_state() {
    let mut net = net(3);
    let now = net.now_ms;
    for i in 0..5000u64 {
        let mut spec = net.spec(0, 3, 0);
        spec.nonce = i;
        let ann = TaskAnnouncement {
            spec,
            attempt: 0,
            revision: 0,
            committee: vec![net.peer(1)],
            commit_deadline_ms: now + 1000,
            reveal_deadline_ms: now + 2000,
            candidates: [net.peer(1)].iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
        };
        let env = SignedEnvelope::seal(&net.nodes[0].key, &ann).expect("seal");
        net.nodes[2].consensus.handle(&env, now).expect("valid, just not ours");
        // Node 1 is seated every time, but holds at most its per-coordinator share.
        let _ = net.nodes[1].consensus.handle(&env, now).expect("seat");
    }
    assert_eq!(net.nodes[2].consensus.load(), (0, 0));
    assert_eq!(net.nodes[1].consensus.load().1, RoundParams::default().max_duties_per_coordinator);
    // Expired seats are forgotten (a seat whose inference never reported, at the cap).
    let later = now + RoundParams::default().max_seat_ms;
    net.nodes[1].consensus.tick(later, &[]);
    assert_eq!(net.nodes[1].consensus.load().1, 0);
}

#[test]
fn coordinator_refuses_beyond_its_bound() {
    let params = RoundParams { max_coordinated: 2, ..RoundParams::default() };
    let mut net = SimNet::new(4, params, |_| Behaviour::Honest);
    for _ in 0..2 {
        let s = net.spec(0, 3, 0);
        net.submit(0, s).expect("submit");
    }
    let s = net.spec(0, 3, 0);
    assert_eq!(net.submit(0, s), Err(RoundError::Busy(2)));
    let mut s = net.spec(0, 3, 0);
    s.k = 5;
    s.nonce += 100;
    assert!(matches!(net.submit(0, s), Err(RoundError::Busy(_))));
}

#[test]
fn too_few_eligible_nodes_is_a_clear_error() {
    let mut net = net(1);
    let s = net.spec(0, 3, 0);
    assert_eq!(net.submit(0, s), Err(RoundError::NoCommittee { need: 2, found: 1 }));
}
