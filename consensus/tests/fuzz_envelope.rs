//! Structured fuzzing of the envelope decoder and everything that reads what is inside
//! one, run by every `cargo test`.
//!
//! Inputs: random bytes; random bytes behind a well-formed envelope prefix; and the
//! envelopes of real rounds (a simulated network with liars, equivocators and a
//! byzantine coordinator) and of generated messages of every kind, mutated either on
//! the wire (so the signature breaks) or in the body and then signed again by the
//! original signer (so the typed decoders and the verdict check see the damage).
//! Every input is decoded with [`SignedEnvelope::from_bytes`], opened as every message
//! type, verified when it is a verdict and validated when it holds a task spec: each
//! step must return a typed result, never panic. Case counts are fixed, so a run costs
//! a few seconds whatever the machine.

use std::collections::HashMap;
use std::sync::OnceLock;

use proptest::prelude::*;
use sampo_consensus::envelope::{SIGNING_DOMAIN, encode_body};
use sampo_consensus::messages::MAX_PROMPT_BYTES;
use sampo_consensus::sim::SimNet;
use sampo_consensus::*;

/// Cases per property, by cost: a case of the cheap ones decodes a few hundred bytes,
/// one of the verdict edits checks a verdict's whole evidence (about twenty signatures).
/// Together about 5 s of one core in the dev profile.
const CHEAP_CASES: u32 = 3000;
const CASES: u32 = 1000;
const VERDICT_CASES: u32 = 500;

fn config(cases: u32) -> ProptestConfig {
    // Failures are kept as named regression tests below, not in a persistence file.
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---- raw envelopes ----------------------------------------------------------------

/// The wire bytes of an envelope with any fields, laid out as `SignedEnvelope` lays
/// them out (bincode's standard config: a tuple encodes as the struct does).
fn wire(version: u16, kind: u8, body: &[u8], signer: [u8; 32], signature: [u8; 64]) -> Vec<u8> {
    bincode::encode_to_vec((version, kind, body.to_vec(), signer, signature), bincode::config::standard())
        .expect("encode")
}

/// `body` signed by `key` as a message of `kind`, whatever the body holds.
fn sign_raw(key: &NodeKey, kind: MessageKind, body: &[u8]) -> Vec<u8> {
    let mut msg = SIGNING_DOMAIN.to_vec();
    msg.extend_from_slice(kind.as_str().as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(body);
    wire(PROTOCOL_VERSION, kind as u8, body, key.public(), key.sign(&msg))
}

// ---- the corpus: envelopes of real rounds ------------------------------------------

struct Corpus {
    envelopes: Vec<SignedEnvelope>,
    keys: HashMap<PeerId, NodeKey>,
}

fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        // Liars of every kind, and a coordinator that tries every attack it can sign.
        let behaviour = |i: usize| match i {
            1 => Behaviour::WrongOutput,
            2 => Behaviour::NeverReveal,
            3 => Behaviour::Equivocate,
            4 => Behaviour::ByzantineCoordinator,
            5 => Behaviour::CopyCommit,
            _ => Behaviour::Honest,
        };
        let mut net = SimNet::new(9, RoundParams::default(), behaviour);
        for (coordinator, k, escalations) in [(0, 3, 1), (4, 3, 0), (6, 1, 2), (0, 5, 0)] {
            let spec = net.spec(coordinator, k, escalations);
            let _ = net.submit(coordinator, spec);
            net.run(120_000);
        }
        let keys = net.nodes.iter().map(|n| (n.key.peer_id(), n.key.clone())).collect();
        let mut envelopes: Vec<SignedEnvelope> = net.log.iter().map(|(_, e)| e.clone()).collect();
        // Kinds the simulation does not gossip.
        let k = &net.nodes[7].key;
        let task = TaskId(Hash32::of(b"task"));
        envelopes.push(seal(k, &node_announcement()));
        envelopes.push(seal(k, &Decline { task, attempt: 1, reason: DeclineReason::Price { price_per_1k: 9 } }));
        envelopes.push(seal(k, &Decline { task, attempt: 0, reason: DeclineReason::Full }));
        let fp = FraudProof { task, attempt: 0, verdict: Hash32::of(b"v"), position: 3, expected: Some(17) };
        envelopes.push(seal(k, &fp));
        Corpus { envelopes, keys }
    })
}

fn seal<M: Message>(k: &NodeKey, m: &M) -> SignedEnvelope {
    SignedEnvelope::seal(k, m).expect("seal")
}

fn node_announcement() -> NodeAnnouncement {
    NodeAnnouncement {
        models: vec![ModelRef { id: ModelId(Hash32::of(b"m")), name: "m".into() }],
        price_per_1k: 5,
        free_slots: 2,
        backend: "cpu".into(),
        device: "x86".into(),
        version: "0.1.0".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        api_url: Some("http://127.0.0.1:1".into()),
        sent_ms: 1,
        certificate: None,
    }
}

// ---- the oracle -------------------------------------------------------------------------

/// Decode `bytes` and read everything inside; any panic fails the case.
fn check_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    match SignedEnvelope::from_bytes(bytes) {
        Ok(env) => {
            // What decodes re-encodes to an envelope that decodes to the same thing.
            prop_assert_eq!(SignedEnvelope::from_bytes(&env.to_bytes()), Ok(env.clone()));
            check_envelope(&env)
        }
        Err(e) => {
            let _ = (e.to_string(), e.merits_penalty());
            Ok(())
        }
    }
}

/// Open `env` as every message type: only its own kind may open, the others are a
/// typed mismatch; a verdict is verified, a task spec validated.
fn check_envelope(env: &SignedEnvelope) -> Result<(), TestCaseError> {
    let mut opened = 0;
    opened += open_as::<NodeAnnouncement>(env, |_| {})?;
    opened += open_as::<TaskAnnouncement>(env, |a| {
        let _ = a.spec.validate().map_err(|e| e.to_string());
        let _ = (a.task_id(), a.spec.fee_per_1k_tokens(), a.spec.prompt.byte_len());
        for seats in [0, 1, a.committee.len(), usize::MAX] {
            for reason in [
                DeclineReason::Full,
                DeclineReason::Price { price_per_1k: u64::MAX },
                DeclineReason::MaxTokens { limit: 0 },
                DeclineReason::Context { limit: u32::MAX },
            ] {
                let _ = reason.holds_for(&a.spec, seats);
            }
        }
    })?;
    opened += open_as::<Commit>(env, |_| {})?;
    opened += open_as::<RevealRequest>(env, |_| {})?;
    opened += open_as::<Reveal>(env, |r| {
        let _ = commit_hash(&r.task, &env.signer(), &r.tokens, &r.salt);
    })?;
    opened += open_as::<Verdict>(env, |v| match verify(env) {
        Ok(vv) => assert_eq!(&vv.verdict, v),
        Err(e) => {
            let _ = e.to_string();
        }
    })?;
    opened += open_as::<Decline>(env, |_| {})?;
    opened += open_as::<FraudProof>(env, |_| {})?;
    prop_assert!(opened <= 1);
    Ok(())
}

/// 1 if `env` opens as `M` (then `f` reads it), 0 if it fails with a typed error.
fn open_as<M: Message>(env: &SignedEnvelope, f: impl FnOnce(&M)) -> Result<u32, TestCaseError> {
    match env.open::<M>() {
        Ok(m) => {
            prop_assert_eq!(env.kind(), M::KIND);
            f(&m);
            // A decoded message encodes again.
            prop_assert!(encode_body(&m).is_ok());
            Ok(1)
        }
        Err(EnvelopeError::KindMismatch { .. }) => {
            prop_assert_ne!(env.kind(), M::KIND);
            Ok(0)
        }
        Err(e) => {
            prop_assert_eq!(env.kind(), M::KIND, "only the own kind is decoded: {}", e);
            Ok(0)
        }
    }
}

// ---- mutations -----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    Byte {
        at: prop::sample::Index,
        value: u8,
    },
    Flip {
        at: prop::sample::Index,
        bit: u8,
    },
    Insert {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
    Delete {
        at: prop::sample::Index,
        len: usize,
    },
    Truncate {
        at: prop::sample::Index,
    },
    /// Write a bincode varint (a length or an integer) at a position.
    Varint {
        at: prop::sample::Index,
        value: u64,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edge = prop::sample::select(vec![
        0u64,
        1,
        2,
        31,
        32,
        33,
        250,
        251,
        255,
        256,
        65_535,
        65_536,
        1 << 20,
        (1 << 20) + 1,
        u32::MAX as u64,
        1 << 32,
        1 << 62,
        u64::MAX,
    ]);
    prop_oneof![
        3 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<prop::sample::Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
        3 => (any::<prop::sample::Index>(), prop_oneof![edge, any::<u64>()])
            .prop_map(|(at, value)| Mutation::Varint { at, value }),
    ]
}

/// bincode's varint encoding of `v` (the standard config).
fn varint(v: u64) -> Vec<u8> {
    bincode::encode_to_vec(v, bincode::config::standard()).expect("encode")
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match m {
        Mutation::Byte { at, value } if n > 0 => bytes[at.index(n)] = *value,
        Mutation::Flip { at, bit } if n > 0 => bytes[at.index(n)] ^= 1 << bit,
        Mutation::Insert { at, bytes: ins } => {
            let i = at.index(n + 1);
            bytes.splice(i..i, ins.iter().copied());
        }
        Mutation::Delete { at, len } if n > 0 => {
            let i = at.index(n);
            bytes.drain(i..(i + len).min(n));
        }
        Mutation::Truncate { at } => bytes.truncate(at.index(n + 1)),
        Mutation::Varint { at, value } => {
            let v = varint(*value);
            let i = at.index(n + 1);
            let end = (i + v.len()).min(n);
            bytes.splice(i..end, v);
        }
        _ => {}
    }
}

// ---- generated messages of every kind --------------------------------------------------

fn peer() -> impl Strategy<Value = PeerId> {
    (0u8..12).prop_map(|i| NodeKey::from_seed([i; 32]).peer_id())
}

fn hash() -> impl Strategy<Value = Hash32> {
    prop_oneof![any::<[u8; 32]>().prop_map(Hash32), (0u8..4).prop_map(|i| Hash32::of(&[i]))]
}

fn task() -> impl Strategy<Value = TaskId> {
    hash().prop_map(TaskId)
}

fn text() -> impl Strategy<Value = String> {
    // A compiled regex: a `&str` strategy would parse its pattern for every value.
    let any_text = proptest::string::string_regex(".{0,24}").expect("regex");
    prop_oneof![any_text, Just(String::new())]
}

/// A prompt text, sometimes at the limit of what a task may carry.
fn prompt_text() -> impl Strategy<Value = String> {
    let at_limit = (MAX_PROMPT_BYTES - 2..MAX_PROMPT_BYTES + 3).prop_map(|n| "x".repeat(n));
    prop_oneof![8 => text(), 1 => at_limit]
}

fn spec() -> impl Strategy<Value = TaskSpec> {
    let prompt = prop_oneof![
        prompt_text().prop_map(Prompt::Text),
        prop::collection::vec((text(), text()), 0..4)
            .prop_map(|m| Prompt::Chat(m.into_iter().map(|(role, content)| ChatMessage { role, content }).collect())),
    ];
    let float = prop_oneof![any::<f32>(), Just(f32::NAN), Just(f32::INFINITY), Just(0.0), Just(1.0), Just(-0.0)];
    let params =
        (float.clone(), any::<u32>(), float, any::<u32>(), any::<u64>(), prop::collection::vec(any::<u32>(), 0..20))
            .prop_map(|(temperature, top_k, top_p, max_tokens, seed, stop)| SamplingParams {
                temperature,
                top_k,
                top_p,
                max_tokens,
                seed,
                stop,
            });
    (peer(), any::<u64>(), hash(), prompt, params, any::<u8>(), any::<u8>(), any::<u64>()).prop_map(
        |(coordinator, nonce, model, prompt, params, k, max_escalations, fee)| TaskSpec {
            coordinator,
            nonce,
            created_ms: nonce / 3,
            model: ModelId(model),
            prompt,
            params,
            k,
            max_escalations,
            fee,
            client_entropy: model.0,
        },
    )
}

/// A message of any kind, sealed by a key from a small set, and that key.
fn generated() -> impl Strategy<Value = (u8, SignedEnvelope)> {
    let signer = 0u8..12;
    let ann = (spec(), any::<u8>(), any::<u16>(), prop::collection::vec(peer(), 0..8), any::<u64>(), any::<u64>())
        .prop_map(|(spec, attempt, revision, committee, c, r)| {
            Body::TaskAnnouncement(TaskAnnouncement {
                spec,
                attempt,
                revision,
                candidates: committee.iter().map(|p| sampo_consensus::Listed::new(*p, 1.0)).collect(),
                committee,
                commit_deadline_ms: c,
                reveal_deadline_ms: r,
            })
        });
    let node = (prop::collection::vec((hash(), text()), 0..4), any::<u64>(), any::<u32>(), text(), any::<u64>())
        .prop_map(|(models, price_per_1k, free_slots, s, sent_ms)| {
            Body::Node(NodeAnnouncement {
                models: models.into_iter().map(|(h, name)| ModelRef { id: ModelId(h), name }).collect(),
                price_per_1k,
                free_slots,
                backend: s.clone(),
                device: s.clone(),
                version: s,
                addrs: vec!["/ip4/1.2.3.4/tcp/5".into()],
                api_url: None,
                sent_ms,
                certificate: None,
            })
        });
    let commit =
        (task(), any::<u8>(), hash()).prop_map(|(task, attempt, hash)| Body::Commit(Commit { task, attempt, hash }));
    let request = (task(), any::<u8>(), prop::collection::vec((peer(), hash()), 0..40))
        .prop_map(|(task, attempt, accepted)| Body::RevealRequest(RevealRequest { task, attempt, accepted }));
    let reveal = (task(), any::<u8>(), prop::collection::vec(any::<u32>(), 0..64), any::<[u8; 32]>())
        .prop_map(|(task, attempt, tokens, salt)| Body::Reveal(Reveal { task, attempt, tokens, salt }));
    let reason = prop_oneof![
        any::<u64>().prop_map(|price_per_1k| DeclineReason::Price { price_per_1k }),
        any::<u32>().prop_map(|limit| DeclineReason::MaxTokens { limit }),
        any::<u32>().prop_map(|limit| DeclineReason::Context { limit }),
        Just(DeclineReason::Full),
    ];
    let decline = (task(), any::<u8>(), reason)
        .prop_map(|(task, attempt, reason)| Body::Decline(Decline { task, attempt, reason }));
    let fraud = (task(), any::<u8>(), hash(), any::<u32>(), any::<Option<u32>>()).prop_map(
        |(task, attempt, verdict, position, expected)| {
            Body::FraudProof(FraudProof { task, attempt, verdict, position, expected })
        },
    );
    let body = prop_oneof![ann, node, commit, request, reveal, decline, fraud];
    (signer, body).prop_map(|(s, body)| {
        let k = NodeKey::from_seed([s; 32]);
        let env = match body {
            Body::Node(m) => SignedEnvelope::seal(&k, &m),
            Body::TaskAnnouncement(m) => SignedEnvelope::seal(&k, &m),
            Body::Commit(m) => SignedEnvelope::seal(&k, &m),
            Body::RevealRequest(m) => SignedEnvelope::seal(&k, &m),
            Body::Reveal(m) => SignedEnvelope::seal(&k, &m),
            Body::Decline(m) => SignedEnvelope::seal(&k, &m),
            Body::FraudProof(m) => SignedEnvelope::seal(&k, &m),
        };
        (s, env.expect("a generated message fits an envelope"))
    })
}

#[derive(Debug, Clone)]
enum Body {
    Node(NodeAnnouncement),
    TaskAnnouncement(TaskAnnouncement),
    Commit(Commit),
    RevealRequest(RevealRequest),
    Reveal(Reveal),
    Decline(Decline),
    FraudProof(FraudProof),
}

// ---- typed edits of a verdict's evidence ---------------------------------------------------

/// One edit of a verdict, at the level of its fields: what a lying coordinator can do
/// to its own verdict (it signs the verdict, but cannot sign for its members).
#[derive(Debug, Clone)]
enum Edit {
    /// Damage the body of one evidence envelope and have its author sign it again.
    Nested {
        slot: prop::sample::Index,
        muts: Vec<Mutation>,
    },
    /// Put any corpus envelope into an evidence slot.
    Replace {
        slot: prop::sample::Index,
        with: prop::sample::Index,
    },
    /// Drop or duplicate one entry of a list.
    Remove {
        list: u8,
        at: prop::sample::Index,
    },
    Duplicate {
        list: u8,
        at: prop::sample::Index,
    },
    /// Append a corpus envelope to a list (an equivocation pairs it with a commit).
    Append {
        list: u8,
        with: prop::sample::Index,
    },
    DropRequest,
    Attempt(u8),
    Outcome(u8, Vec<u32>),
    Marks(Vec<(prop::sample::Index, u8)>),
    Payouts(Vec<(prop::sample::Index, u64)>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let idx = any::<prop::sample::Index>;
    prop_oneof![
        4 => (idx(), prop::collection::vec(mutation(), 1..3)).prop_map(|(slot, muts)| Edit::Nested { slot, muts }),
        2 => (idx(), idx()).prop_map(|(slot, with)| Edit::Replace { slot, with }),
        2 => (0u8..4, idx()).prop_map(|(list, at)| Edit::Remove { list, at }),
        2 => (0u8..4, idx()).prop_map(|(list, at)| Edit::Duplicate { list, at }),
        2 => (0u8..4, idx()).prop_map(|(list, with)| Edit::Append { list, with }),
        1 => Just(Edit::DropRequest),
        1 => prop_oneof![0u8..4, any::<u8>()].prop_map(Edit::Attempt),
        1 => (0u8..3, prop::collection::vec(0u32..4, 0..4)).prop_map(|(o, t)| Edit::Outcome(o, t)),
        1 => prop::collection::vec((idx(), 0u8..5), 0..8).prop_map(Edit::Marks),
        1 => prop::collection::vec((idx(), prop_oneof![0u64..2000, any::<u64>()]), 0..6).prop_map(Edit::Payouts),
    ]
}

/// Every envelope slot of the evidence, flattened.
fn slots(e: &mut Evidence) -> Vec<&mut SignedEnvelope> {
    let mut v = vec![&mut e.announcement];
    v.extend(e.reveal_request.as_mut());
    v.extend(e.commits.iter_mut());
    v.extend(e.reveals.iter_mut());
    for (a, b) in e.equivocations.iter_mut() {
        v.push(a);
        v.push(b);
    }
    v.extend(e.declines.iter_mut());
    v
}

fn list(e: &mut Evidence, which: u8) -> &mut Vec<SignedEnvelope> {
    match which {
        0 => &mut e.commits,
        1 => &mut e.reveals,
        _ => &mut e.declines,
    }
}

fn apply_edit(c: &Corpus, v: &mut Verdict, edit: &Edit) {
    let ev = &mut v.evidence;
    let any_env = |i: &prop::sample::Index| i.get(&c.envelopes).clone();
    match edit {
        Edit::Nested { slot, muts } => {
            let mut all = slots(ev);
            let n = all.len();
            let env = &mut all[slot.index(n)];
            let mut body = env.body().to_vec();
            for m in muts {
                apply(&mut body, m);
            }
            if let Some(key) = c.keys.get(&env.signer())
                && let Ok(e) = SignedEnvelope::from_bytes(&sign_raw(key, env.kind(), &body))
            {
                **env = e;
            }
        }
        Edit::Replace { slot, with } => {
            let mut all = slots(ev);
            let n = all.len();
            *all[slot.index(n)] = any_env(with);
        }
        Edit::Remove { list: 3, at } if !ev.equivocations.is_empty() => {
            ev.equivocations.remove(at.index(ev.equivocations.len()));
        }
        Edit::Duplicate { list: 3, at } if !ev.equivocations.is_empty() => {
            let e = at.get(&ev.equivocations).clone();
            ev.equivocations.push(e);
        }
        Edit::Append { list: 3, with } => {
            let commit = ev.commits.first().cloned().unwrap_or_else(|| any_env(with));
            ev.equivocations.push((commit, any_env(with)));
        }
        Edit::Remove { list: l, at } => {
            let l = list(ev, *l);
            if !l.is_empty() {
                l.remove(at.index(l.len()));
            }
        }
        Edit::Duplicate { list: l, at } => {
            let l = list(ev, *l);
            if !l.is_empty() {
                let e = at.get(l).clone();
                l.push(e);
            }
        }
        Edit::Append { list: l, with } => list(ev, *l).push(any_env(with)),
        Edit::DropRequest => ev.reveal_request = None,
        Edit::Attempt(a) => v.attempt = *a,
        Edit::Outcome(o, t) => {
            v.outcome = match o {
                0 => Outcome::Finalized { output: t.clone() },
                1 => Outcome::Escalated,
                _ => Outcome::Disputed,
            }
        }
        Edit::Marks(m) if !v.marks.is_empty() => {
            for (at, mark) in m {
                let i = at.index(v.marks.len());
                v.marks[i].1 =
                    [Mark::Agreed, Mark::Wrong, Mark::Absent, Mark::Undecided, Mark::Declined][*mark as usize];
            }
        }
        Edit::Payouts(p) => {
            let peers: Vec<PeerId> = v.marks.iter().map(|(p, _)| *p).collect();
            if !peers.is_empty() {
                v.payouts = p.iter().map(|(at, credits)| (*at.get(&peers), *credits)).collect();
            }
        }
        _ => {}
    }
}

// ---- properties ----------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(CHEAP_CASES))]

    #[test]
    fn random_bytes(
        prefix in prop_oneof![Just(None), (1u8..=8).prop_map(Some)],
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        // Behind a valid version and kind the decoder reads on into the body.
        let input = match prefix {
            Some(kind) => [varint(PROTOCOL_VERSION.into()), vec![kind], bytes].concat(),
            None => bytes,
        };
        check_bytes(&input)?;
    }

    #[test]
    fn mutated_wire_bytes(pick in any::<prop::sample::Index>(), muts in prop::collection::vec(mutation(), 1..4)) {
        let env = pick.get(&corpus().envelopes);
        let mut bytes = env.to_bytes();
        for m in &muts {
            apply(&mut bytes, m);
        }
        check_bytes(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(CASES))]

    /// The body is damaged and signed again by its author: the signature holds, so the

    /// message decoders, the spec check and the verdict check see the damage.

    #[test]
    fn mutated_bodies_signed_again(
        pick in any::<prop::sample::Index>(),
        relabel in prop::option::weighted(0.15, prop::sample::select(MessageKind::ALL.to_vec())),
        muts in prop::collection::vec(mutation(), 0..4),
    ) {
        let c = corpus();
        let env = pick.get(&c.envelopes);
        let mut body = env.body().to_vec();
        for m in &muts {
            apply(&mut body, m);
        }
        let key = &c.keys.get(&env.signer()).cloned().unwrap_or_else(|| NodeKey::from_seed([7; 32]));
        let bytes = sign_raw(key, relabel.unwrap_or(env.kind()), &body);
        if muts.is_empty() && relabel.is_none() {
            prop_assert_eq!(&bytes, &env.to_bytes());
        }
        check_bytes(&bytes)?;
    }

    /// A coordinator edits its own verdict and signs it again: the evidence check must

    /// catch every lie it can tell, with a typed error.

    #[test]
    fn generated_messages_of_every_kind(
        (signer, env) in generated(),
        muts in prop::collection::vec(mutation(), 0..3),
    ) {
        check_bytes(&env.to_bytes())?;
        let mut body = env.body().to_vec();
        for m in &muts {
            apply(&mut body, m);
        }
        check_bytes(&sign_raw(&NodeKey::from_seed([signer; 32]), env.kind(), &body))?;
    }
}

proptest! {
    #![proptest_config(config(VERDICT_CASES))]

    #[test]
    fn edited_verdicts_signed_again(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        let c = corpus();
        let verdicts: Vec<&SignedEnvelope> = c.envelopes.iter().filter(|e| e.kind() == MessageKind::Verdict).collect();
        let env = *pick.get(&verdicts);
        let mut v: Verdict = env.open().expect("corpus verdict");
        for e in &edits {
            apply_edit(c, &mut v, e);
        }
        if let Ok(sealed) = SignedEnvelope::seal(&c.keys[&env.signer()], &v) {
            check_bytes(&sealed.to_bytes())?;
        }
    }
}

// ---- fixed cases ------------------------------------------------------------------------------

#[test]
fn the_corpus_holds_every_kind_and_sign_raw_matches_seal() {
    let c = corpus();
    for kind in MessageKind::ALL {
        assert!(c.envelopes.iter().any(|e| e.kind() == kind), "no {kind:?} in the corpus");
    }
    // The simulation's verdicts verify: mutations start from valid evidence.
    assert!(c.envelopes.iter().filter(|e| e.kind() == MessageKind::Verdict).any(|e| verify(e).is_ok()));
    for env in &c.envelopes {
        let key = &c.keys[&env.signer()];
        assert_eq!(sign_raw(key, env.kind(), env.body()), env.to_bytes());
        check_bytes(&env.to_bytes()).expect("corpus envelope");
    }
}

/// A verdict whose evidence holds another verdict, whose evidence holds another, and so
/// on, eight levels deep: each level is one opaque envelope for the decoder (no
/// recursion), and the check fails typed at the first wrong kind.
#[test]
fn deeply_nested_verdict_evidence_is_a_typed_error() {
    let c = corpus();
    let verdict_env = c.envelopes.iter().find(|e| e.kind() == MessageKind::Verdict).expect("a verdict");
    let key = &c.keys[&verdict_env.signer()];
    let mut base: Verdict = verdict_env.open().expect("open");
    base.evidence.reveal_request = None;
    base.evidence.reveals.clear();
    base.evidence.equivocations.clear();
    base.evidence.declines.clear();
    base.evidence.commits.clear();
    let mut inner = SignedEnvelope::seal(key, &base).expect("seal");
    for _ in 0..8 {
        let mut v = base.clone();
        // A second copy, as a commit: the size doubles per level.
        v.evidence.announcement = inner.clone();
        v.evidence.commits = vec![inner.clone()];
        let env = SignedEnvelope::seal(key, &v).expect("seal");
        assert_eq!(SignedEnvelope::from_bytes(&env.to_bytes()).as_ref(), Ok(&env));
        assert_eq!(env.open::<Verdict>().as_ref(), Ok(&v));
        assert!(matches!(
            verify(&env),
            Err(VerifyError::Envelope { part: "announcement", source: EnvelopeError::KindMismatch { .. } })
        ));
        inner = env;
    }
    assert!(inner.to_bytes().len() > 100 << 10, "{} bytes", inner.to_bytes().len());
}

/// Length prefixes that claim more than the input holds, or more than the envelope
/// limit, are refused before anything is allocated for them.
#[test]
fn huge_length_prefixes_are_typed_errors() {
    let key = NodeKey::from_seed([3; 32]);
    for n in [1u64 << 20, (1 << 20) + 1, u32::MAX as u64, 1 << 40, u64::MAX] {
        let mut bytes = varint(PROTOCOL_VERSION.into());
        bytes.push(MessageKind::Commit as u8);
        bytes.extend(varint(n));
        bytes.extend([0u8; 100]);
        assert!(matches!(SignedEnvelope::from_bytes(&bytes), Err(EnvelopeError::Malformed(_))), "{n}");
        // The same inside a body: a reveal claiming `n` tokens.
        let mut body = vec![0u8; 33];
        body.extend(varint(n));
        let env = SignedEnvelope::from_bytes(&sign_raw(&key, MessageKind::Reveal, &body)).expect("signed");
        assert!(matches!(env.open::<Reveal>(), Err(EnvelopeError::Malformed(_))), "{n}");
    }
}
