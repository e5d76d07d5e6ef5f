//! `SignedEnvelope`: how every application message travels.
//!
//! Wire layout (bincode 2, standard config, hard size limit):
//! `{ version: u16, kind: u8, body: bytes, signer: [u8; 32], signature: [u8; 64] }`.
//! `body` is the bincode encoding of the typed message; `signature` is ed25519 by
//! `signer` over `b"sampo/v1/" || kind name || b"\n" || body`. The newline keeps
//! kind names that prefix one another ("reveal", "reveal_request") apart.

use serde::{Serialize, de::DeserializeOwned};

use crate::PeerId;
use crate::identity::{self, NodeKey};

/// Version of the envelope format and the message set inside it.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest encoded envelope accepted from anyone (also the gossip size limit).
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;
/// Most envelopes one message may nest (a verdict's evidence: announcement, request,
/// commits, reveals, equivocation pairs, declines of at most `2 · MAX_COMMITTEE` seats
/// need about 200). Each nested envelope costs a signature check while decoding, so the
/// cap bounds what one message can make a node verify.
pub const MAX_NESTED_ENVELOPES: usize = 256;

thread_local! {
    /// Nested envelopes the message being opened on this thread may still decode.
    static NESTED_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// The wire bytes (by blake3) of envelopes whose signature this process has checked,
/// the oldest forgotten first. Verdicts nest every envelope of their round, and
/// re-checking those was half of a testnet's signature work. Only bytes that verified
/// get in, so nothing unverified can pass through it.
static VERIFIED: std::sync::LazyLock<std::sync::Mutex<crate::RecentIds>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(crate::RecentIds::new(VERIFIED_CAPACITY)));
/// A few minutes of a busy network's rounds.
const VERIFIED_CAPACITY: usize = 16_384;

/// Domain-separation prefix of every signature.
pub const SIGNING_DOMAIN: &[u8] = b"sampo/v1/";

type Limited = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_ENVELOPE_BYTES>,
>;

fn wire_config() -> Limited {
    bincode::config::standard().with_limit::<MAX_ENVELOPE_BYTES>()
}

/// The kinds of application message. The discriminant is the wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    NodeAnnouncement = 1,
    TaskAnnouncement = 2,
    Commit = 3,
    RevealRequest = 4,
    Reveal = 5,
    Verdict = 6,
    Decline = 7,
    FraudProof = 8,
}

impl MessageKind {
    pub const ALL: [MessageKind; 8] = [
        Self::NodeAnnouncement,
        Self::TaskAnnouncement,
        Self::Commit,
        Self::RevealRequest,
        Self::Reveal,
        Self::Verdict,
        Self::Decline,
        Self::FraudProof,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeAnnouncement => "node_announcement",
            Self::TaskAnnouncement => "task_announcement",
            Self::Commit => "commit",
            Self::RevealRequest => "reveal_request",
            Self::Reveal => "reveal",
            Self::Verdict => "verdict",
            Self::Decline => "decline",
            Self::FraudProof => "fraud_proof",
        }
    }

    pub fn from_wire(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == b)
    }
}

/// A typed protocol message that can be sealed in an envelope.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: MessageKind;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the envelope")]
    TrailingBytes(usize),
    #[error("unknown protocol version {found} (this node speaks {PROTOCOL_VERSION})")]
    UnknownVersion { found: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected} message, found {found}")]
    KindMismatch { expected: &'static str, found: &'static str },
    #[error("signer is not a valid ed25519 public key")]
    BadSignerKey,
    #[error("signature does not verify")]
    BadSignature,
    /// Boxed: two `PeerId`s would make every `Result` of this module 160 bytes wide.
    #[error("signer {} is not the expected sender {}", .0.found, .0.expected)]
    WrongSender(Box<SenderMismatch>),
    #[error("message body could not be encoded: {0}")]
    Encode(String),
}

/// The two identities of an [`EnvelopeError::WrongSender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderMismatch {
    pub expected: PeerId,
    pub found: PeerId,
}

impl EnvelopeError {
    /// Whether the sender of such bytes deserves a penalty (as opposed to, say, a
    /// newer peer speaking a version we don't know yet).
    pub fn merits_penalty(&self) -> bool {
        !matches!(self, Self::UnknownVersion { .. } | Self::Encode(_))
    }
}

#[derive(Clone, bincode::Encode, bincode::Decode)]
struct WireEnvelope {
    version: u16,
    kind: u8,
    body: Vec<u8>,
    signer: [u8; 32],
    signature: [u8; 64],
}

/// A verified, signed message. Holding one means its signature checked out.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedEnvelope {
    kind: MessageKind,
    body: Vec<u8>,
    signer: [u8; 32],
    signature: [u8; 64],
    signer_peer: PeerId,
}

impl std::fmt::Debug for SignedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedEnvelope")
            .field("kind", &self.kind)
            .field("signer", &self.signer_peer)
            .field("body_len", &self.body.len())
            .finish()
    }
}

fn signing_bytes(kind: MessageKind, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIGNING_DOMAIN.len() + 24 + body.len());
    v.extend_from_slice(SIGNING_DOMAIN);
    v.extend_from_slice(kind.as_str().as_bytes());
    v.push(b'\n');
    v.extend_from_slice(body);
    v
}

/// Encode a value with the wire config.
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, EnvelopeError> {
    bincode::serde::encode_to_vec(value, wire_config()).map_err(|e| EnvelopeError::Encode(e.to_string()))
}

/// Decode a value with the wire config, rejecting trailing bytes.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge { size: bytes.len(), max: MAX_ENVELOPE_BYTES });
    }
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, wire_config()).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(EnvelopeError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

impl SignedEnvelope {
    /// Sign `message` with `key`.
    pub fn seal<M: Message>(key: &NodeKey, message: &M) -> Result<Self, EnvelopeError> {
        let body = encode_body(message)?;
        let signature = key.sign(&signing_bytes(M::KIND, &body));
        let env = Self { kind: M::KIND, body, signer: key.public(), signature, signer_peer: key.peer_id() };
        let bytes = env.to_bytes();
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge { size: bytes.len(), max: MAX_ENVELOPE_BYTES });
        }
        // Valid by construction: our own messages come back nested in verdicts.
        VERIFIED.lock().unwrap_or_else(|e| e.into_inner()).insert(crate::Hash32::of(&bytes));
        Ok(env)
    }

    fn wire(&self) -> WireEnvelope {
        WireEnvelope {
            version: PROTOCOL_VERSION,
            kind: self.kind as u8,
            body: self.body.clone(),
            signer: self.signer,
            signature: self.signature,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a struct of byte arrays into a Vec cannot fail.
        bincode::encode_to_vec(self.wire(), wire_config()).unwrap_or_default()
    }

    /// Decode and verify untrusted bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge { size: bytes.len(), max: MAX_ENVELOPE_BYTES });
        }
        // Peek at the version before trusting the rest of the layout.
        let (version, _): (u16, usize) =
            bincode::decode_from_slice(bytes, wire_config()).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if version != PROTOCOL_VERSION {
            return Err(EnvelopeError::UnknownVersion { found: version });
        }
        let (wire, used): (WireEnvelope, usize) =
            bincode::decode_from_slice(bytes, wire_config()).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(EnvelopeError::TrailingBytes(bytes.len() - used));
        }
        // One envelope, one byte string: varints decode from longer forms too, and each
        // form would be a different gossip message (its id hashes the bytes) carrying
        // the same signed envelope — copies a relay could make without any key.
        if bincode::encode_to_vec(&wire, wire_config()).ok().as_deref() != Some(bytes) {
            return Err(EnvelopeError::Malformed("not the canonical encoding".into()));
        }
        let kind = MessageKind::from_wire(wire.kind).ok_or(EnvelopeError::UnknownKind(wire.kind))?;
        let (signer_peer, key) = identity::signer_key(&wire.signer).map_err(|_| EnvelopeError::BadSignerKey)?;
        // These exact bytes verified before (a verdict nests the round's messages, which
        // every node checked as they arrived): the same bytes, the same answer.
        let id = crate::Hash32::of(bytes);
        if !VERIFIED.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
            if !identity::verify_with(&key, &signing_bytes(kind, &wire.body), &wire.signature) {
                return Err(EnvelopeError::BadSignature);
            }
            VERIFIED.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        }
        Ok(Self { kind, body: wire.body, signer: wire.signer, signature: wire.signature, signer_peer })
    }

    /// Decode the typed message inside.
    pub fn open<M: Message>(&self) -> Result<M, EnvelopeError> {
        if self.kind != M::KIND {
            return Err(EnvelopeError::KindMismatch { expected: M::KIND.as_str(), found: self.kind.as_str() });
        }
        let outer = NESTED_LEFT.with(|n| n.replace(MAX_NESTED_ENVELOPES));
        let r = decode_body(&self.body);
        NESTED_LEFT.with(|n| n.set(outer));
        r
    }

    /// Check that the envelope was signed by `expected` (e.g. gossipsub's `source`).
    pub fn check_sender(&self, expected: &PeerId) -> Result<(), EnvelopeError> {
        if &self.signer_peer != expected {
            return Err(EnvelopeError::WrongSender(Box::new(SenderMismatch {
                expected: *expected,
                found: self.signer_peer,
            })));
        }
        Ok(())
    }

    pub fn kind(&self) -> MessageKind {
        self.kind
    }
    pub fn signer(&self) -> PeerId {
        self.signer_peer
    }
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// Content address of the envelope: blake3 of its wire bytes.
    pub fn id(&self) -> crate::Hash32 {
        crate::Hash32::of(&self.to_bytes())
    }
}

impl serde::Serialize for SignedEnvelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Evidence bundles carry envelopes verbatim, so a third party can re-verify them.
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.to_bytes()))
        } else {
            s.serialize_bytes(&self.to_bytes())
        }
    }
}

impl<'de> serde::Deserialize<'de> for SignedEnvelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Counted before the bytes are even read, so an over-nested message stops at
        // the cap instead of paying for every signature in it.
        let left = NESTED_LEFT.with(|n| n.get());
        if left == 0 {
            return Err(D::Error::custom(format!("more than {MAX_NESTED_ENVELOPES} nested envelopes")));
        }
        NESTED_LEFT.with(|n| n.set(left - 1));
        let bytes: Vec<u8> = if d.is_human_readable() {
            let s = String::deserialize(d)?;
            hex::decode(s).map_err(D::Error::custom)?
        } else {
            serde_bytes_vec(d)?
        };
        Self::from_bytes(&bytes).map_err(D::Error::custom)
    }
}

fn serde_bytes_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("envelope bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                if out.len() >= MAX_ENVELOPE_BYTES {
                    return Err(serde::de::Error::custom("envelope too large"));
                }
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_bytes(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u64,
        text: String,
        data: Vec<u8>,
    }
    impl Message for Ping {
        const KIND: MessageKind = MessageKind::Commit;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Other {
        n: u64,
    }
    impl Message for Other {
        const KIND: MessageKind = MessageKind::Reveal;
    }

    fn key() -> NodeKey {
        NodeKey::from_seed([42; 32])
    }

    #[test]
    fn only_the_canonical_encoding_decodes() {
        let bytes = SignedEnvelope::seal(&key(), &Other { n: 7 }).expect("seal").to_bytes();
        assert!(SignedEnvelope::from_bytes(&bytes).is_ok());
        // The version (a one-byte varint, 3) written as a three-byte varint.
        assert_eq!(bytes[0], PROTOCOL_VERSION as u8);
        let long_version: Vec<u8> = [0xFB, PROTOCOL_VERSION as u8, 0].iter().chain(&bytes[1..]).copied().collect();
        // The body's length (after version and kind) written as a three-byte varint.
        let len = bytes[2];
        assert!(len < 0xFB, "a one-byte length");
        let long_len: Vec<u8> = bytes[..2].iter().chain(&[0xFB, len, 0]).chain(&bytes[3..]).copied().collect();
        for (what, v) in [("version", long_version), ("body length", long_len)] {
            assert!(
                matches!(SignedEnvelope::from_bytes(&v), Err(EnvelopeError::Malformed(_))),
                "a longer varint for the {what} is refused"
            );
        }
    }

    #[test]
    fn seal_verify_open() {
        let msg = Ping { n: 5, text: "hi".into(), data: vec![1, 2, 3] };
        let env = SignedEnvelope::seal(&key(), &msg).expect("seal");
        let bytes = env.to_bytes();
        let back = SignedEnvelope::from_bytes(&bytes).expect("verify");
        assert_eq!(back.signer(), key().peer_id());
        assert_eq!(back.open::<Ping>().expect("open"), msg);
        assert!(back.check_sender(&key().peer_id()).is_ok());
        let other = NodeKey::from_seed([1; 32]).peer_id();
        assert!(matches!(back.check_sender(&other), Err(EnvelopeError::WrongSender(_))));
    }

    #[test]
    fn wrong_kind_is_typed_error() {
        let env = SignedEnvelope::seal(&key(), &Other { n: 1 }).expect("seal");
        assert!(matches!(env.open::<Ping>(), Err(EnvelopeError::KindMismatch { .. })));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = SignedEnvelope::seal(&key(), &Other { n: 1 }).expect("seal").to_bytes();
        bytes.push(0);
        assert_eq!(SignedEnvelope::from_bytes(&bytes), Err(EnvelopeError::TrailingBytes(1)));
    }

    #[test]
    fn rejects_unknown_version() {
        let env = SignedEnvelope::seal(&key(), &Other { n: 1 }).expect("seal");
        // A newer protocol, and the v1 protocol before the trust model.
        for v in [PROTOCOL_VERSION + 1, 1] {
            let mut wire = env.wire();
            wire.version = v;
            let bytes = bincode::encode_to_vec(wire, wire_config()).expect("encode");
            assert_eq!(SignedEnvelope::from_bytes(&bytes), Err(EnvelopeError::UnknownVersion { found: v }));
        }
    }

    #[test]
    fn rejects_unknown_kind() {
        let env = SignedEnvelope::seal(&key(), &Other { n: 1 }).expect("seal");
        let mut wire = env.wire();
        wire.kind = 99;
        let bytes = bincode::encode_to_vec(wire, wire_config()).expect("encode");
        assert_eq!(SignedEnvelope::from_bytes(&bytes), Err(EnvelopeError::UnknownKind(99)));
    }

    #[test]
    fn rejects_oversized_input_and_message() {
        let bytes = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(SignedEnvelope::from_bytes(&bytes), Err(EnvelopeError::TooLarge { .. })));
        let big = Ping { n: 0, text: String::new(), data: vec![0; MAX_ENVELOPE_BYTES] };
        assert!(matches!(SignedEnvelope::seal(&key(), &big), Err(EnvelopeError::TooLarge { .. })));
    }

    #[test]
    fn rejects_kind_swap_even_with_same_body() {
        // Re-labelling a signed body as another kind must break the signature.
        let env = SignedEnvelope::seal(&key(), &Other { n: 1 }).expect("seal");
        let mut wire = env.wire();
        wire.kind = MessageKind::Commit as u8;
        let bytes = bincode::encode_to_vec(wire, wire_config()).expect("encode");
        assert_eq!(SignedEnvelope::from_bytes(&bytes), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn bytes_checked_once_are_not_checked_again_and_altered_copies_still_are() {
        let checks = || crate::identity::SIGNATURE_CHECKS.with(|n| n.get());
        let signer = NodeKey::from_seed([42; 32]);
        let other = NodeKey::from_seed([43; 32]);
        let theirs =
            SignedEnvelope::seal(&other, &Ping { n: 42, text: "once".into(), data: vec![4, 2] }).expect("seal");
        // Bytes this process did not seal (`seal` marks its own as checked): a new
        // body, signed by hand.
        let mut wire = theirs.wire();
        wire.body = encode_body(&Ping { n: 43, text: "once".into(), data: vec![] }).expect("encode");
        wire.signature = other.sign(&signing_bytes(MessageKind::Commit, &wire.body));
        let fresh = bincode::encode_to_vec(&wire, wire_config()).expect("encode");
        let before = checks();
        assert!(SignedEnvelope::from_bytes(&fresh).is_ok());
        assert_eq!(checks(), before + 1, "first sight: checked");
        assert!(SignedEnvelope::from_bytes(&fresh).is_ok());
        assert_eq!(checks(), before + 1, "the same bytes again: not checked again");
        // The same body and signer with another signature, or another signer: new bytes,
        // checked, refused.
        let mut forged = wire.clone();
        forged.signature[0] ^= 1;
        let forged = bincode::encode_to_vec(&forged, wire_config()).expect("encode");
        assert_eq!(SignedEnvelope::from_bytes(&forged), Err(EnvelopeError::BadSignature));
        let mut resigned = wire;
        resigned.signer = signer.public();
        let resigned = bincode::encode_to_vec(&resigned, wire_config()).expect("encode");
        assert_eq!(SignedEnvelope::from_bytes(&resigned), Err(EnvelopeError::BadSignature));
        assert_eq!(checks(), before + 3);
        // What this process sealed itself is known valid: nested in a reply, not re-checked.
        let ours = SignedEnvelope::seal(&signer, &Ping { n: 44, text: "mine".into(), data: vec![] }).expect("seal");
        let before = checks();
        assert!(SignedEnvelope::from_bytes(&ours.to_bytes()).is_ok());
        assert_eq!(checks(), before);
    }

    proptest! {
        #[test]
        fn round_trip(n in any::<u64>(), text in ".{0,64}", data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let msg = Ping { n, text, data };
            let env = SignedEnvelope::seal(&key(), &msg).expect("seal");
            let back = SignedEnvelope::from_bytes(&env.to_bytes()).expect("verify");
            prop_assert_eq!(back.open::<Ping>().expect("open"), msg);
        }

        #[test]
        fn any_flipped_byte_is_rejected(n in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..64), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let env = SignedEnvelope::seal(&key(), &Ping { n, text: "x".into(), data }).expect("seal");
            let mut bytes = env.to_bytes();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(SignedEnvelope::from_bytes(&bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SignedEnvelope::from_bytes(&bytes);
        }
    }
}
