//! Structured fuzzing of gossip validation ([`gossip::validate`]), the gate every
//! gossiped message passes before it is forwarded, run by every `cargo test`.
//!
//! Inputs: signed messages of every kind (at and around their size limits, with
//! announcement clocks near and far from ours) on every topic and on random ones, from
//! their signer, from another peer and from nobody, intact or damaged; and random
//! bytes. Validation must answer with a typed verdict (never panic), and what it
//! accepts must really satisfy each rule it checks. The case count is fixed.

use std::sync::OnceLock;

use libp2p::gossipsub::{self, MessageAcceptance, TopicHash};
use proptest::prelude::*;
use sampo_consensus::{
    Commit, Decline, DeclineReason, FraudProof, Hash32, MessageKind, ModelId, ModelRef, NodeAnnouncement, NodeKey,
    PeerId, Prompt, Reveal, RevealRequest, SamplingParams, SignedEnvelope, TaskAnnouncement, TaskId, TaskSpec,
};
use sampo_p2p::gossip::{
    self, ANNOUNCEMENT_SKEW_MS, GossipReject, NODES_TOPIC, ROUNDS_TOPIC, ReplayGuard, max_bytes, message_id,
};

/// Cases per property (two properties): about 4 s of one core in all, dev profile.
const CASES: u32 = 2000;

/// Keys and their peer ids, derived once (deriving them per case would be most of
/// the cost of a case).
fn keys() -> &'static [(NodeKey, PeerId)] {
    static KEYS: OnceLock<Vec<(NodeKey, PeerId)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..=255u8)
            .map(|i| {
                let k = NodeKey::from_seed([i; 32]);
                let p = k.peer_id();
                (k, p)
            })
            .collect()
    })
}

fn key(i: u8) -> &'static NodeKey {
    &keys()[i as usize].0
}

fn peer(i: u8) -> PeerId {
    keys()[i as usize].1
}

// ---- inputs ----------------------------------------------------------------------------

/// A message of `kind`, `pad` bytes of free text larger than the smallest, sealed by
/// key `signer`. `None` if it does not fit an envelope.
fn message(kind: MessageKind, signer: u8, pad: usize, sent_ms: u64) -> Option<SignedEnvelope> {
    let k = key(signer);
    let task = TaskId(Hash32::of(&[signer]));
    let filler = "x".repeat(pad);
    let r = match kind {
        MessageKind::NodeAnnouncement => SignedEnvelope::seal(
            k,
            &NodeAnnouncement {
                models: vec![ModelRef { id: ModelId(Hash32::of(b"m")), name: "m".into() }],
                price_per_1k: 1,
                free_slots: 1,
                backend: "cpu".into(),
                device: filler,
                version: "0".into(),
                addrs: Vec::new(),
                api_url: None,
                sent_ms,
                certificate: None,
            },
        ),
        MessageKind::TaskAnnouncement => SignedEnvelope::seal(
            k,
            &TaskAnnouncement {
                spec: TaskSpec {
                    coordinator: peer(signer),
                    nonce: sent_ms,
                    created_ms: sent_ms,
                    model: ModelId(Hash32::of(b"m")),
                    prompt: Prompt::Text(filler),
                    params: SamplingParams::default(),
                    k: 3,
                    max_escalations: 1,
                    fee: 10,
                    client_entropy: [7; 32],
                },
                attempt: 0,
                revision: 0,
                committee: vec![peer(1), peer(2)],
                commit_deadline_ms: sent_ms,
                reveal_deadline_ms: sent_ms,
                candidates: vec![
                    sampo_consensus::Listed::new(peer(1), 1.0),
                    sampo_consensus::Listed::new(peer(2), 1.0),
                ],
            },
        ),
        MessageKind::Commit => SignedEnvelope::seal(k, &Commit { task, attempt: 0, hash: Hash32::of(b"h") }),
        MessageKind::RevealRequest => SignedEnvelope::seal(
            k,
            &RevealRequest {
                task,
                attempt: 0,
                accepted: (0..pad / 70).map(|i| (peer(i as u8), Hash32::of(&[i as u8]))).collect(),
            },
        ),
        MessageKind::Reveal => {
            SignedEnvelope::seal(k, &Reveal { task, attempt: 0, tokens: vec![7; pad / 3], salt: [1; 32] })
        }
        // A real verdict needs a whole round; the gate only reads the envelope, so a
        // verdict-kind envelope with any body exercises it (see `raw_of_kind`).
        MessageKind::Verdict => return None,
        MessageKind::Decline => {
            SignedEnvelope::seal(k, &Decline { task, attempt: 0, reason: DeclineReason::Price { price_per_1k: 1 } })
        }
        MessageKind::FraudProof => SignedEnvelope::seal(
            k,
            &FraudProof { task, attempt: 0, verdict: Hash32::of(b"v"), position: 0, expected: None },
        ),
    };
    r.ok()
}

/// An envelope of `kind` whose body is `body`, signed by key `signer`, as wire bytes.
fn raw_of_kind(kind: MessageKind, signer: u8, body: &[u8]) -> Vec<u8> {
    let k = key(signer);
    let mut msg = sampo_consensus::envelope::SIGNING_DOMAIN.to_vec();
    msg.extend_from_slice(kind.as_str().as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(body);
    // The envelope's bincode layout, by hand: varint version (one byte below 251),
    // kind, varint body length (one byte: bodies here are short), body, key, signature.
    assert!(body.len() < 251 && sampo_consensus::PROTOCOL_VERSION < 251);
    let mut out = vec![sampo_consensus::PROTOCOL_VERSION as u8, kind as u8, body.len() as u8];
    out.extend_from_slice(body);
    out.extend_from_slice(&k.public());
    out.extend_from_slice(&k.sign(&msg));
    out
}

fn topic() -> impl Strategy<Value = String> {
    let model = ModelId(Hash32::of(b"m"));
    prop_oneof![
        3 => Just(NODES_TOPIC.to_owned()),
        3 => Just(ROUNDS_TOPIC.to_owned()),
        3 => Just(gossip::tasks_topic(&model).to_string()),
        1 => Just("sampo/v1/tasks/".to_owned()),
        1 => Just(format!("{NODES_TOPIC}/x")),
        1 => Just(String::new()),
        1 => proptest::string::string_regex("(sampo/v1/)?[a-z/]{0,12}|.{0,16}").expect("regex"),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Author {
    Signer,
    Other(u8),
    Nobody,
}

fn author() -> impl Strategy<Value = Author> {
    prop_oneof![6 => Just(Author::Signer), 1 => (0u8..8).prop_map(Author::Other), 1 => Just(Author::Nobody)]
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Append(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        6 => Just(Damage::None),
        1 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Damage::Append),
    ]
}

fn apply(data: &mut Vec<u8>, d: &Damage) {
    match d {
        Damage::None => {}
        Damage::Flip(i, b) if !data.is_empty() => {
            let i = i.index(data.len());
            data[i] ^= 1 << b;
        }
        Damage::Flip(..) => {}
        Damage::Truncate(i) => data.truncate(i.index(data.len() + 1)),
        Damage::Append(b) => data.extend_from_slice(b),
    }
}

/// How big a generated message is: a little padding, or within a few bytes of its
/// kind's size limit (on either side).
#[derive(Debug, Clone, Copy)]
enum Size {
    Small(usize),
    NearLimit(i64),
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![7 => (0usize..200).prop_map(Size::Small), 1 => (-40i64..40).prop_map(Size::NearLimit)]
}

/// A message of `kind` of the given size (see [`message`]).
fn sized_message(kind: MessageKind, signer: u8, size: Size, sent_ms: u64) -> Option<SignedEnvelope> {
    match size {
        Size::Small(pad) => message(kind, signer, pad, sent_ms),
        Size::NearLimit(delta) => {
            let (base, per_pad) = calibration()[kind as usize - 1]?;
            let target = max_bytes(kind) as i64 + delta;
            let pad = ((target - base) as f64 / per_pad).max(0.0) as usize;
            message(kind, signer, pad, sent_ms)
        }
    }
}

/// Per kind (by wire value - 1): the size of the unpadded message and the bytes one
/// unit of padding adds, measured once; `None` for kinds without padding.
fn calibration() -> &'static [Option<(i64, f64)>] {
    static CAL: OnceLock<Vec<Option<(i64, f64)>>> = OnceLock::new();
    CAL.get_or_init(|| {
        MessageKind::ALL
            .iter()
            .map(|&kind| {
                let len = |pad: usize| message(kind, 0, pad, 0).map(|e| e.to_bytes().len() as i64);
                // Both points past 251 units, so length prefixes are 3 bytes in both.
                let (a, b) = (len(1400)?, len(2800)?);
                let per_pad = (b - a) as f64 / 1400.0;
                (per_pad > 0.0).then_some((a - (1400.0 * per_pad) as i64, per_pad))
            })
            .collect()
    })
}

// ---- the oracle ----------------------------------------------------------------------------

/// Validate once (then again, which must be a replay when the first was accepted) and
/// check that an accepted message keeps every rule.
fn check(
    topic: &str,
    author: Option<PeerId>,
    data: &[u8],
    guard: &mut ReplayGuard,
    now_ms: u64,
) -> Result<(), TestCaseError> {
    let hash = TopicHash::from_raw(topic);
    let m = gossipsub::Message { source: author, data: data.to_vec(), sequence_number: Some(1), topic: hash.clone() };
    let _ = message_id(&m);
    match gossip::validate(&hash, data, guard, now_ms) {
        Ok(env) => {
            let kind = env.kind();
            prop_assert!(data.len() <= max_bytes(kind));
            prop_assert_eq!(SignedEnvelope::from_bytes(data), Ok(env.clone()));
            // One envelope, one byte string (no second gossip id for the same message).
            prop_assert_eq!(env.to_bytes(), data.to_vec());
            match kind {
                MessageKind::NodeAnnouncement => {
                    prop_assert_eq!(topic, NODES_TOPIC);
                    let ann: NodeAnnouncement = env.open().map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(ann.sent_ms.abs_diff(now_ms) <= ANNOUNCEMENT_SKEW_MS);
                }
                MessageKind::TaskAnnouncement => {
                    let ann: TaskAnnouncement = env.open().map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(topic, gossip::tasks_topic(&ann.spec.model).to_string());
                }
                _ => prop_assert_eq!(topic, ROUNDS_TOPIC),
            }
            prop_assert_eq!(gossip::validate(&hash, data, guard, now_ms), Err(GossipReject::Replay));
        }
        Err(e) => {
            let _ = e.to_string();
            // Only a message from a newer protocol goes unpunished.
            if e.acceptance() == MessageAcceptance::Ignore {
                let newer = matches!(e, GossipReject::Envelope(sampo_consensus::EnvelopeError::UnknownVersion { .. }));
                prop_assert!(newer, "ignored without penalty: {}", e);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn signed_messages_on_any_topic(
        kind in prop::sample::select(MessageKind::ALL.to_vec()),
        signer in 0u8..8,
        size in size(),
        (sent_ms, now_ms) in prop_oneof![
            (any::<u64>(), any::<u64>()),
            (0u64..1 << 50, -2 * ANNOUNCEMENT_SKEW_MS as i64..2 * ANNOUNCEMENT_SKEW_MS as i64)
                .prop_map(|(s, d)| (s, s.saturating_add_signed(d))),
            Just((u64::MAX, 0)),
            Just((0, u64::MAX)),
        ],
        topic in topic(),
        author in author(),
        damage in damage(),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut data = match sized_message(kind, signer, size, sent_ms) {
            Some(env) => env.to_bytes(),
            None => raw_of_kind(kind, signer, &body),
        };
        apply(&mut data, &damage);
        let author = match author {
            Author::Signer => Some(peer(signer)),
            Author::Other(i) => Some(peer(i.wrapping_add(100))),
            Author::Nobody => None,
        };
        let mut guard = ReplayGuard::default();
        check(&topic, author, &data, &mut guard, now_ms)?;
    }

    #[test]
    fn random_bytes_on_any_topic(
        topic in topic(),
        author in author(),
        data in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            // A valid version byte first, so the decoder reads on.
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|mut v| { v.insert(0, 2); v }),
        ],
        now_ms in any::<u64>(),
    ) {
        let author = match author {
            Author::Signer | Author::Other(_) => Some(peer(1)),
            Author::Nobody => None,
        };
        check(&topic, author, &data, &mut ReplayGuard::default(), now_ms)?;
    }
}

#[test]
fn every_kind_is_accepted_on_its_own_topic() {
    let now = 1_000_000;
    for kind in MessageKind::ALL {
        let data = match message(kind, 1, 10, now) {
            Some(env) => env.to_bytes(),
            None => raw_of_kind(kind, 1, &[]),
        };
        let topic = match kind {
            MessageKind::NodeAnnouncement => NODES_TOPIC.to_owned(),
            MessageKind::TaskAnnouncement => gossip::tasks_topic(&ModelId(Hash32::of(b"m"))).to_string(),
            _ => ROUNDS_TOPIC.to_owned(),
        };
        let r = gossip::validate(&TopicHash::from_raw(&topic), &data, &mut ReplayGuard::default(), now);
        assert!(r.is_ok(), "{kind:?}: {r:?}");
    }
}

/// The replay memory forgets its oldest ids, and only those, past its capacity.
#[test]
fn the_replay_guard_stays_bounded() {
    let mut g = ReplayGuard::default();
    let n = gossip::REPLAY_MEMORY as u32 + 10;
    for i in 0..n {
        assert!(g.first_sight(Hash32::of(&i.to_le_bytes())));
    }
    assert!(g.first_sight(Hash32::of(&0u32.to_le_bytes())), "the oldest id was forgotten");
    assert!(!g.first_sight(Hash32::of(&(n - 1).to_le_bytes())), "a recent id is remembered");
}

/// The generator's near-limit sizes do straddle each kind's limit.
#[test]
fn near_limit_messages_straddle_the_limit() {
    let now = 1_000_000;
    let mut straddled = 0;
    for kind in MessageKind::ALL {
        let topic = match kind {
            MessageKind::NodeAnnouncement => NODES_TOPIC.to_owned(),
            MessageKind::TaskAnnouncement => gossip::tasks_topic(&ModelId(Hash32::of(b"m"))).to_string(),
            _ => ROUNDS_TOPIC.to_owned(),
        };
        let (Some(under), Some(over)) =
            (sized_message(kind, 1, Size::NearLimit(-40), now), sized_message(kind, 1, Size::NearLimit(40), now))
        else {
            continue;
        };
        let validate = |env: SignedEnvelope| {
            gossip::validate(&TopicHash::from_raw(&topic), &env.to_bytes(), &mut ReplayGuard::default(), now)
        };
        assert!(validate(under).is_ok(), "{kind:?} under its limit");
        let r = validate(over);
        assert!(matches!(r, Err(GossipReject::TooLarge { .. })), "{kind:?} over its limit: {r:?}");
        straddled += 1;
    }
    assert_eq!(straddled, 4, "announcements, reveal requests and reveals");
}
