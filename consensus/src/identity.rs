//! A node's ed25519 identity. The libp2p `PeerId` derives from the same key, so a
//! signature on an application message can be checked against the sender's peer id.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;

/// Length of an ed25519 secret key file's contents.
pub const SECRET_KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("a node key must be {SECRET_KEY_LEN} bytes, found {0}")]
    BadLength(usize),
    #[error("not a valid ed25519 public key")]
    BadPublicKey,
}

/// The node's signing key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
    /// Derived once: every envelope this key seals names it.
    peer: PeerId,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey").field("peer_id", &self.peer_id()).finish_non_exhaustive()
    }
}

impl NodeKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let mut rng = rand::rngs::OsRng;
        Self::from_signing(SigningKey::generate(&mut rng))
    }

    /// A key from a 32-byte seed (tests and simulations derive keys this way).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self::from_signing(SigningKey::from_bytes(&seed))
    }

    fn from_signing(signing: SigningKey) -> Self {
        let public = signing.verifying_key().to_bytes();
        // A valid dalek key is always a valid libp2p ed25519 key.
        let peer = peer_id_of(&public).unwrap_or_else(|_| unreachable!("dalek key is a valid ed25519 key"));
        Self { signing, peer }
    }

    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let arr: [u8; SECRET_KEY_LEN] = bytes.try_into().map_err(|_| IdentityError::BadLength(bytes.len()))?;
        Ok(Self::from_seed(arr))
    }

    /// The raw secret, for writing the key file and building the libp2p keypair.
    pub fn secret_bytes(&self) -> [u8; SECRET_KEY_LEN] {
        self.signing.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// The commit salt of a task attempt: keyed blake3 under a key derived from the node
    /// key. Secret (nobody else can predict it, so a commit hides its output) and
    /// deterministic (a member asked twice for one attempt, even after a restart, signs
    /// the same commit and so can never be framed as an equivocator).
    pub fn commit_salt(&self, task: &crate::TaskId, attempt: u8) -> [u8; 32] {
        let salt_key = blake3::derive_key("sampo/v1 commit salt key", &self.signing.to_bytes());
        let mut h = blake3::Hasher::new_keyed(&salt_key);
        h.update(&task.0.0);
        h.update(&[attempt]);
        *h.finalize().as_bytes()
    }
}

/// The `PeerId` libp2p derives from an ed25519 public key.
pub fn peer_id_of(public: &[u8; 32]) -> Result<PeerId, IdentityError> {
    let pk = libp2p_identity::ed25519::PublicKey::try_from_bytes(public).map_err(|_| IdentityError::BadPublicKey)?;
    Ok(libp2p_identity::PublicKey::from(pk).to_peer_id())
}

/// Signer keys seen recently, decompressed, with their `PeerId`s. Uncached, every
/// envelope decompressed its signer's key twice (once for the `PeerId`, once for the
/// signature check): a square root each, ~5 % of a testnet's CPU. The few keys of a
/// network's rounds are signers again and again. Bounded: a flood of fresh keys only
/// empties it, which costs what no cache costs.
static SIGNER_KEYS: LazyLock<Mutex<HashMap<[u8; 32], SignerKey>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
type SignerKey = (PeerId, VerifyingKey);
const SIGNER_KEYS_CAPACITY: usize = 4096;

/// The `PeerId` and decompressed key of an ed25519 public key, from the cache when there.
pub(crate) fn signer_key(public: &[u8; 32]) -> Result<SignerKey, IdentityError> {
    let cached = SIGNER_KEYS.lock().unwrap_or_else(|e| e.into_inner()).get(public).copied();
    if let Some(hit) = cached {
        return Ok(hit);
    }
    let key = VerifyingKey::from_bytes(public).map_err(|_| IdentityError::BadPublicKey)?;
    let entry = (peer_id_of(public)?, key);
    let mut keys = SIGNER_KEYS.lock().unwrap_or_else(|e| e.into_inner());
    if keys.len() >= SIGNER_KEYS_CAPACITY {
        keys.clear();
    }
    keys.insert(*public, entry);
    Ok(entry)
}

/// Strict ed25519 verification (rejects small-order and non-canonical keys/signatures).
pub(crate) fn verify(public: &[u8; 32], msg: &[u8], signature: &[u8; 64]) -> bool {
    let Ok((_, vk)) = signer_key(public) else { return false };
    verify_with(&vk, msg, signature)
}

pub(crate) fn verify_with(key: &VerifyingKey, msg: &[u8], signature: &[u8; 64]) -> bool {
    #[cfg(test)]
    SIGNATURE_CHECKS.with(|n| n.set(n.get() + 1));
    key.verify_strict(msg, &Signature::from_bytes(signature)).is_ok()
}

#[cfg(test)]
thread_local! {
    /// Signature checks run on this thread (tests count what a cache saves).
    pub(crate) static SIGNATURE_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_matches_libp2p_keypair_from_same_secret() {
        let key = NodeKey::from_seed([7; 32]);
        let mut secret = key.secret_bytes();
        let kp = libp2p_identity::Keypair::ed25519_from_bytes(&mut secret).expect("valid secret");
        assert_eq!(kp.public().to_peer_id(), key.peer_id());
    }

    #[test]
    fn debug_does_not_leak_secret() {
        let key = NodeKey::from_seed([9; 32]);
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(&hex::encode(key.secret_bytes())));
        assert!(!dbg.contains("[9, 9"));
    }
}
