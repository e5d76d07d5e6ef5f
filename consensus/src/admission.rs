//! Admission certificates for closed networks: an issuer key the operators list signs a
//! node's `PeerId` with an expiry, and only nodes presenting such a certificate are
//! sampled or relayed (DESIGN.md, "Trust model", promise 5).
//!
//! The signature covers `b"sampo/v1/admission\n" || subject peer id bytes || expiry (u64
//! little-endian)`, a domain of its own, so no other signed sampo message can be passed
//! off as a certificate and the reverse.

use serde::{Deserialize, Serialize};

use crate::PeerId;
use crate::envelope::{EnvelopeError, decode_body, encode_body};
use crate::identity::{self, NodeKey};

/// Domain-separation prefix of every admission signature.
pub const ADMISSION_DOMAIN: &[u8] = b"sampo/v1/admission\n";

/// An issuer's signature admitting `subject` to a closed network until `expires_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionCertificate {
    pub subject: PeerId,
    /// The issuer's ed25519 public key.
    #[serde(with = "hex_or_bytes")]
    pub issuer: [u8; 32],
    /// Unix ms after which the certificate no longer admits its subject.
    pub expires_ms: u64,
    #[serde(with = "hex_or_bytes")]
    pub signature: [u8; 64],
}

/// Why a certificate does not admit a peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("the certificate is for {certified}, not {presented_by}")]
    WrongSubject { certified: String, presented_by: String },
    #[error("issuer {0} is not one of this network's admission keys")]
    UnknownIssuer(String),
    #[error("the certificate expired at {expires_ms} (now {now_ms})")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("the certificate's signature does not verify")]
    BadSignature,
    #[error("no admission certificate")]
    Missing,
    #[error("malformed certificate: {0}")]
    Malformed(String),
}

fn signing_bytes(subject: &PeerId, expires_ms: u64) -> Vec<u8> {
    let id = subject.to_bytes();
    let mut v = Vec::with_capacity(ADMISSION_DOMAIN.len() + id.len() + 8);
    v.extend_from_slice(ADMISSION_DOMAIN);
    v.extend_from_slice(&id);
    v.extend_from_slice(&expires_ms.to_le_bytes());
    v
}

impl AdmissionCertificate {
    /// Sign `subject` into the network until `expires_ms`.
    pub fn issue(issuer: &NodeKey, subject: PeerId, expires_ms: u64) -> Self {
        let signature = issuer.sign(&signing_bytes(&subject, expires_ms));
        Self { subject, issuer: issuer.public(), expires_ms, signature }
    }

    /// Does this certificate admit `subject` now? Cheap checks first: the signature is
    /// checked only for a listed issuer and an unexpired certificate of this subject.
    pub fn verify(&self, subject: &PeerId, admitted_issuers: &[[u8; 32]], now_ms: u64) -> Result<(), AdmissionError> {
        if self.subject != *subject {
            return Err(AdmissionError::WrongSubject {
                certified: self.subject.to_string(),
                presented_by: subject.to_string(),
            });
        }
        if !admitted_issuers.contains(&self.issuer) {
            return Err(AdmissionError::UnknownIssuer(hex::encode(self.issuer)));
        }
        if now_ms >= self.expires_ms {
            return Err(AdmissionError::Expired { expires_ms: self.expires_ms, now_ms });
        }
        if !identity::verify(&self.issuer, &signing_bytes(&self.subject, self.expires_ms), &self.signature) {
            return Err(AdmissionError::BadSignature);
        }
        Ok(())
    }

    /// The wire (bincode) encoding, also the contents of a certificate file.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_body(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AdmissionError> {
        decode_body(bytes).map_err(|e: EnvelopeError| AdmissionError::Malformed(e.to_string()))
    }

    /// A certificate file's contents: raw bytes, or the same bytes as hex text.
    pub fn from_file_contents(contents: &[u8]) -> Result<Self, AdmissionError> {
        if let Ok(text) = std::str::from_utf8(contents)
            && let Ok(bytes) = hex::decode(text.trim())
        {
            return Self::from_bytes(&bytes);
        }
        Self::from_bytes(contents)
    }
}

/// Parse an issuer's public key given as 64 hex characters.
pub fn parse_issuer_key(s: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("`{s}` is not hex: {e}"))?;
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("`{s}` is {} bytes; an ed25519 public key is 32 (64 hex characters)", bytes.len()))?;
    identity::peer_id_of(&key).map_err(|_| format!("`{s}` is not a valid ed25519 public key"))?;
    Ok(key)
}

/// Fixed-size byte arrays as hex in human-readable formats, as bytes in bincode.
mod hex_or_bytes {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&hex::encode(v)) } else { s.serialize_bytes(v) }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let bytes: Vec<u8> = if d.is_human_readable() {
            hex::decode(String::deserialize(d)?).map_err(D::Error::custom)?
        } else {
            d.deserialize_bytes(BytesVisitor)?
        };
        bytes.as_slice().try_into().map_err(|_| D::Error::invalid_length(bytes.len(), &format!("{N} bytes").as_str()))
    }

    struct BytesVisitor;

    impl<'de> serde::de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                if out.len() >= 64 {
                    return Err(A::Error::custom("too many bytes"));
                }
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn setup() -> (NodeKey, NodeKey, AdmissionCertificate) {
        let issuer = NodeKey::from_seed([1; 32]);
        let node = NodeKey::from_seed([2; 32]);
        let cert = AdmissionCertificate::issue(&issuer, node.peer_id(), NOW + 1000);
        (issuer, node, cert)
    }

    #[test]
    fn issued_certificate_verifies() {
        let (issuer, node, cert) = setup();
        let other_issuer = NodeKey::from_seed([3; 32]).public();
        assert_eq!(cert.verify(&node.peer_id(), &[other_issuer, issuer.public()], NOW), Ok(()));
        assert_eq!(cert.issuer, issuer.public());
    }

    #[test]
    fn wrong_subject_is_refused() {
        let (issuer, _node, cert) = setup();
        let thief = NodeKey::from_seed([4; 32]).peer_id();
        assert!(matches!(cert.verify(&thief, &[issuer.public()], NOW), Err(AdmissionError::WrongSubject { .. })));
    }

    #[test]
    fn unknown_issuer_is_refused() {
        let (_issuer, node, cert) = setup();
        let listed = NodeKey::from_seed([5; 32]).public();
        assert!(matches!(cert.verify(&node.peer_id(), &[listed], NOW), Err(AdmissionError::UnknownIssuer(_))));
        assert!(matches!(cert.verify(&node.peer_id(), &[], NOW), Err(AdmissionError::UnknownIssuer(_))));
    }

    #[test]
    fn expired_certificate_is_refused() {
        let (issuer, node, cert) = setup();
        assert_eq!(cert.verify(&node.peer_id(), &[issuer.public()], NOW + 999), Ok(()));
        assert_eq!(
            cert.verify(&node.peer_id(), &[issuer.public()], NOW + 1000),
            Err(AdmissionError::Expired { expires_ms: NOW + 1000, now_ms: NOW + 1000 })
        );
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let (issuer, node, cert) = setup();
        let mut sig = cert.clone();
        sig.signature[10] ^= 1;
        assert_eq!(sig.verify(&node.peer_id(), &[issuer.public()], NOW), Err(AdmissionError::BadSignature));
        // Extending one's own expiry breaks the signature too.
        let mut later = cert.clone();
        later.expires_ms += 1_000_000;
        assert_eq!(later.verify(&node.peer_id(), &[issuer.public()], NOW), Err(AdmissionError::BadSignature));
        // So does re-pointing it at another subject.
        let thief = NodeKey::from_seed([6; 32]).peer_id();
        let mut moved = cert;
        moved.subject = thief;
        assert_eq!(moved.verify(&thief, &[issuer.public()], NOW), Err(AdmissionError::BadSignature));
    }

    #[test]
    fn another_domain_signature_is_not_a_certificate() {
        let (issuer, node, cert) = setup();
        let mut plain = node.peer_id().to_bytes();
        plain.extend_from_slice(&cert.expires_ms.to_le_bytes());
        let forged = AdmissionCertificate { signature: issuer.sign(&plain), ..cert };
        assert_eq!(forged.verify(&node.peer_id(), &[issuer.public()], NOW), Err(AdmissionError::BadSignature));
    }

    #[test]
    fn bincode_and_hex_file_round_trip() {
        let (issuer, node, cert) = setup();
        let bytes = cert.to_bytes();
        let back = AdmissionCertificate::from_bytes(&bytes).expect("decode");
        assert_eq!(back, cert);
        assert_eq!(back.verify(&node.peer_id(), &[issuer.public()], NOW), Ok(()));
        assert_eq!(AdmissionCertificate::from_file_contents(hex::encode(&bytes).as_bytes()), Ok(cert.clone()));
        assert_eq!(AdmissionCertificate::from_file_contents(&bytes), Ok(cert.clone()));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(AdmissionCertificate::from_bytes(&trailing), Err(AdmissionError::Malformed(_))));
        assert!(matches!(
            AdmissionCertificate::from_bytes(&bytes[..bytes.len() - 1]),
            Err(AdmissionError::Malformed(_))
        ));
    }

    #[test]
    fn issuer_keys_parse_from_hex() {
        let k = NodeKey::from_seed([7; 32]).public();
        assert_eq!(parse_issuer_key(&hex::encode(k)), Ok(k));
        assert!(parse_issuer_key("zz").is_err());
        assert!(parse_issuer_key(&hex::encode([1u8; 31])).unwrap_err().contains("32"));
    }
}
