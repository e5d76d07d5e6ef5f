//! Verdicts against their evidence: property tests of the verdict rule, and a lying
//! coordinator caught by any verifier.

use proptest::prelude::*;
use sampo_consensus::*;

/// How one committee member behaves in a hand-built round.
#[derive(Clone, Copy, Debug)]
enum Member {
    Honest,
    /// Reveals a wrong output; liars with the same `u8` collude on one output.
    Wrong(u8),
    NoCommit,
    NoReveal,
    /// Reveals the right tokens with a salt that does not open its commit.
    BadReveal,
}

struct Built {
    coordinator: NodeKey,
    keys: Vec<NodeKey>,
    honest_output: Vec<u32>,
    verdict: Verdict,
}

fn key(i: u8) -> NodeKey {
    NodeKey::from_seed([i.wrapping_add(1); 32])
}

fn seal<M: Message>(k: &NodeKey, m: &M) -> SignedEnvelope {
    SignedEnvelope::seal(k, m).expect("seal")
}

/// A round with the given members, ruled by the honest rule, as a coordinator would.
fn build(members: &[Member], k: u8) -> Built {
    let coordinator = key(200);
    let keys: Vec<NodeKey> = (0..members.len() as u8).map(key).collect();
    let spec = TaskSpec {
        coordinator: coordinator.peer_id(),
        nonce: 7,
        created_ms: 1,
        model: ModelId(Hash32::of(b"m")),
        prompt: Prompt::Text("p".into()),
        params: SamplingParams::default(),
        k,
        max_escalations: 0,
        fee: 1001,
        client_entropy: [7; 32],
    };
    let task = spec.id();
    let ann = TaskAnnouncement {
        spec: spec.clone(),
        attempt: 0,
        revision: 0,
        committee: keys.iter().map(NodeKey::peer_id).collect(),
        commit_deadline_ms: 10,
        reveal_deadline_ms: 20,
        candidates: keys.iter().map(|k| sampo_consensus::Listed::new(k.peer_id(), 1.0)).collect(),
    };
    let honest_output = vec![5u32, 6, 7];
    let mut commits = Vec::new();
    let mut reveals = Vec::new();
    let mut accepted = Vec::new();
    for (i, (m, kk)) in members.iter().zip(&keys).enumerate() {
        let tokens = match m {
            Member::Wrong(v) => vec![5, 6, 100 + *v as u32],
            _ => honest_output.clone(),
        };
        let salt = [i as u8; 32];
        if matches!(m, Member::NoCommit) {
            continue;
        }
        let hash = commit_hash(&task, &kk.peer_id(), &tokens, &salt);
        commits.push(seal(kk, &Commit { task, attempt: 0, hash }));
        accepted.push((kk.peer_id(), hash));
        match m {
            Member::NoReveal => {}
            Member::BadReveal => {
                reveals.push(seal(kk, &Reveal { task, attempt: 0, tokens, salt: [0xee; 32] }));
            }
            _ => reveals.push(seal(kk, &Reveal { task, attempt: 0, tokens, salt })),
        }
    }
    accepted.sort_by_key(|a| a.0);
    let request = seal(&coordinator, &RevealRequest { task, attempt: 0, accepted });
    let mut verdict = Verdict {
        task,
        attempt: 0,
        outcome: Outcome::Disputed,
        marks: Vec::new(),
        payouts: Vec::new(),
        evidence: Evidence {
            announcement: seal(&coordinator, &ann),
            reveal_request: Some(request),
            commits,
            reveals,
            equivocations: Vec::new(),
            declines: Vec::new(),
        },
        decided_ms: 30,
    };
    // Rule honestly, with the same rule every verifier applies.
    let decision = recompute(&verdict);
    verdict.outcome = decision.outcome;
    verdict.marks = decision.marks;
    verdict.payouts = decision.payouts;
    Built { coordinator, keys, honest_output, verdict }
}

/// Recompute the decision the way a verifier does, from the evidence alone.
fn recompute(v: &Verdict) -> Decision {
    use std::collections::{BTreeMap, BTreeSet};
    let ann: TaskAnnouncement = v.evidence.announcement.open().expect("ann");
    let req: RevealRequest = v.evidence.reveal_request.as_ref().expect("req").open().expect("req");
    let committed: BTreeMap<PeerId, Hash32> = req.accepted.into_iter().collect();
    let mut reveals: BTreeMap<PeerId, Vec<Reveal>> = BTreeMap::new();
    for e in &v.evidence.reveals {
        reveals.entry(e.signer()).or_default().push(e.open().expect("reveal"));
    }
    decide(&verdict::Tally {
        spec: &ann.spec,
        task: v.task,
        attempt: 0,
        committee: &ann.committee,
        request_sent: true,
        committed: &committed,
        reveals: &reveals,
        equivocators: &BTreeSet::new(),
        declined: &BTreeSet::new(),
    })
}

fn resign(b: &Built, v: &Verdict) -> SignedEnvelope {
    seal(&b.coordinator, v)
}

fn member_strategy() -> impl Strategy<Value = Member> {
    prop_oneof![
        (0u8..3).prop_map(Member::Wrong),
        Just(Member::NoCommit),
        Just(Member::NoReveal),
        Just(Member::BadReveal),
    ]
}

/// A committee of size k ∈ {1, 3, 5, 7} with fewer liars than a quorum, in random seats.
fn committee_strategy() -> impl Strategy<Value = (u8, Vec<Member>)> {
    prop_oneof![Just(1u8), Just(3u8), Just(5u8), Just(7u8)].prop_flat_map(|k| {
        let max_bad = (k as usize / 2 + 1) - 1;
        (Just(k), proptest::collection::vec(member_strategy(), 0..=max_bad), any::<u64>()).prop_map(
            move |(k, bad, shuffle)| {
                let mut members = vec![Member::Honest; k as usize - bad.len()];
                members.extend(bad);
                // Deterministic shuffle of the seats from the drawn seed.
                let mut s = shuffle;
                for i in (1..members.len()).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    members.swap(i, (s >> 33) as usize % (i + 1));
                }
                (k, members)
            },
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With fewer liars than a quorum, the honest output wins and no honest member is
    /// marked wrong, whatever the liars do.
    #[test]
    fn honest_output_wins_below_quorum_of_liars((k, members) in committee_strategy()) {
        let b = build(&members, k);
        let v = verify(&resign(&b, &b.verdict)).expect("an honest verdict verifies");
        prop_assert_eq!(&v.verdict.outcome, &Outcome::Finalized { output: b.honest_output.clone() });
        for (m, key) in members.iter().zip(&b.keys) {
            let mark = v.verdict.marks.iter().find(|(p, _)| *p == key.peer_id()).map(|(_, m)| *m);
            match m {
                Member::Honest => prop_assert_eq!(mark, Some(Mark::Agreed)),
                Member::Wrong(_) | Member::BadReveal => prop_assert_eq!(mark, Some(Mark::Wrong)),
                Member::NoCommit | Member::NoReveal => prop_assert_eq!(mark, Some(Mark::Absent)),
            }
        }
        prop_assert_eq!(v.verdict.payouts.iter().map(|(_, c)| c).sum::<u64>(), 1001);
    }

    /// Verification does not depend on the order in which messages arrived (and so the
    /// order they sit in the evidence).
    #[test]
    fn verification_is_independent_of_arrival_order((k, members) in committee_strategy(), seed in any::<u64>()) {
        let b = build(&members, k);
        let reference = verify(&resign(&b, &b.verdict)).expect("verifies").verdict;
        let mut shuffled = b.verdict.clone();
        let mut s = seed;
        let mut shuffle = |v: &mut Vec<SignedEnvelope>| {
            for i in (1..v.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                v.swap(i, (s >> 33) as usize % (i + 1));
            }
        };
        shuffle(&mut shuffled.evidence.commits);
        shuffle(&mut shuffled.evidence.reveals);
        let again = verify(&resign(&b, &shuffled)).expect("still verifies").verdict;
        prop_assert_eq!(again.outcome, reference.outcome);
        prop_assert_eq!(again.marks, reference.marks);
        prop_assert_eq!(again.payouts, reference.payouts);
    }
}

fn three() -> Built {
    build(&[Member::Honest, Member::Wrong(0), Member::Honest], 3)
}

#[test]
fn lying_about_the_outcome_is_caught() {
    let b = three();
    let mut v = b.verdict.clone();
    v.outcome = Outcome::Finalized { output: vec![5, 6, 100] };
    let err = verify(&resign(&b, &v)).expect_err("lie");
    assert!(matches!(err, VerifyError::ClaimMismatch { field: "outcome", .. }), "{err}");
}

#[test]
fn marking_an_honest_member_wrong_is_caught() {
    let b = three();
    let mut v = b.verdict.clone();
    for (_, m) in &mut v.marks {
        if *m == Mark::Agreed {
            *m = Mark::Wrong;
            break;
        }
    }
    let err = verify(&resign(&b, &v)).expect_err("lie");
    assert!(matches!(err, VerifyError::ClaimMismatch { field: "marks", .. }), "{err}");
}

#[test]
fn paying_someone_else_is_caught() {
    let b = three();
    let mut v = b.verdict.clone();
    v.payouts = vec![(b.coordinator.peer_id(), 1001)];
    let err = verify(&resign(&b, &v)).expect_err("lie");
    assert!(matches!(err, VerifyError::ClaimMismatch { field: "payouts", .. }), "{err}");
}

#[test]
fn dropping_a_reveal_from_the_evidence_is_caught() {
    let b = three();
    let mut v = b.verdict.clone();
    v.evidence.reveals.remove(0);
    let err = verify(&resign(&b, &v)).expect_err("lie");
    assert!(matches!(err, VerifyError::ClaimMismatch { .. }), "{err}");
}

#[test]
fn a_forged_reveal_or_commit_is_caught() {
    let b = three();
    let outsider = key(99);
    let ann: TaskAnnouncement = b.verdict.evidence.announcement.open().expect("ann");
    let task = ann.task_id();
    let mut v = b.verdict.clone();
    v.evidence.reveals.push(seal(&outsider, &Reveal { task, attempt: 0, tokens: vec![1], salt: [0; 32] }));
    assert_eq!(verify(&resign(&b, &v)), Err(VerifyError::UnacceptedReveal(outsider.peer_id())));
    let mut v = b.verdict.clone();
    v.evidence.commits.push(seal(&outsider, &Commit { task, attempt: 0, hash: Hash32::of(b"x") }));
    assert_eq!(verify(&resign(&b, &v)), Err(VerifyError::NotAMember(outsider.peer_id(), "commit")));
}

#[test]
fn a_verdict_signed_by_anyone_but_the_coordinator_is_rejected() {
    let b = three();
    let env = seal(&b.keys[0], &b.verdict);
    assert!(matches!(verify(&env), Err(VerifyError::NotCoordinator { part: "verdict", .. })));
}

#[test]
fn evidence_from_another_task_is_rejected() {
    let b = three();
    let other = build(&[Member::Honest; 5], 5);
    let mut v = b.verdict.clone();
    v.evidence.reveals.push(other.verdict.evidence.reveals[0].clone());
    assert!(matches!(verify(&resign(&b, &v)), Err(VerifyError::WrongTask { part: "reveal", .. })));
}

#[test]
fn a_wrong_member_is_paid_nothing_and_payouts_sum_to_the_fee() {
    let b = three();
    let v = verify(&resign(&b, &b.verdict)).expect("verifies").verdict;
    assert_eq!(v.payouts.len(), 2);
    assert!(v.payouts.iter().all(|(p, _)| *p != b.keys[1].peer_id()));
    assert_eq!(v.payouts.iter().map(|(_, c)| c).sum::<u64>(), 1001, "the odd credit is not lost");
}

/// The largest verdict the limits allow still fits in one envelope, so a coordinator
/// can always publish its ruling.
#[test]
fn the_largest_possible_verdict_seals() {
    let coordinator = key(200);
    let keys: Vec<NodeKey> = (0..MAX_COMMITTEE as u8).map(key).collect();
    let spec = TaskSpec {
        coordinator: coordinator.peer_id(),
        nonce: 1,
        created_ms: 1,
        model: ModelId(Hash32::of(b"m")),
        prompt: Prompt::Text("x".repeat(messages::MAX_PROMPT_BYTES)),
        params: SamplingParams { max_tokens: messages::MAX_OUTPUT_TOKENS, ..SamplingParams::default() },
        k: MAX_COMMITTEE as u8,
        max_escalations: 0,
        fee: u64::MAX,
        client_entropy: [7; 32],
    };
    spec.validate().expect("valid");
    let task = spec.id();
    let ann = TaskAnnouncement {
        spec,
        attempt: 0,
        revision: u16::MAX,
        committee: keys.iter().map(NodeKey::peer_id).collect(),
        commit_deadline_ms: u64::MAX,
        reveal_deadline_ms: u64::MAX,
        // The longest candidate list an announcement may carry.
        candidates: (0..MAX_CANDIDATES as u32)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&i.to_le_bytes());
                seed[31] = 0xC4;
                sampo_consensus::Listed::new(NodeKey::from_seed(seed).peer_id(), f64::MAX)
            })
            .collect(),
    };
    // Tokens of u32::MAX take the longest varint encoding.
    let tokens = vec![u32::MAX; messages::MAX_OUTPUT_TOKENS as usize];
    let mut commits = Vec::new();
    let mut reveals = Vec::new();
    let mut accepted = Vec::new();
    for k in &keys {
        let hash = commit_hash(&task, &k.peer_id(), &tokens, &[7; 32]);
        commits.push(seal(k, &Commit { task, attempt: 0, hash }));
        reveals.push(seal(k, &Reveal { task, attempt: 0, tokens: tokens.clone(), salt: [7; 32] }));
        accepted.push((k.peer_id(), hash));
    }
    accepted.sort_by_key(|a| a.0);
    let verdict = Verdict {
        task,
        attempt: 0,
        outcome: Outcome::Finalized { output: tokens.clone() },
        marks: keys.iter().map(|k| (k.peer_id(), Mark::Agreed)).collect(),
        payouts: Vec::new(),
        evidence: Evidence {
            announcement: seal(&coordinator, &ann),
            reveal_request: Some(seal(&coordinator, &RevealRequest { task, attempt: 0, accepted })),
            commits,
            reveals,
            equivocations: Vec::new(),
            declines: Vec::new(),
        },
        decided_ms: u64::MAX,
    };
    let env = SignedEnvelope::seal(&coordinator, &verdict).expect("the worst case fits in one envelope");
    assert!(env.to_bytes().len() <= MAX_ENVELOPE_BYTES);
}
