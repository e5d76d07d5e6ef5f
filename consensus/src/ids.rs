//! Content-derived identifiers. Every id is a blake3 hash.

use serde::{Deserialize, Serialize};

/// The ids inserted most recently, at most `capacity` of them: the oldest go first.
/// For memories that anyone's traffic feeds (replays seen, signatures checked).
#[derive(Debug)]
pub struct RecentIds {
    ids: std::collections::HashSet<Hash32>,
    order: std::collections::VecDeque<Hash32>,
    capacity: usize,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        Self { ids: Default::default(), order: Default::default(), capacity }
    }

    pub fn contains(&self, id: &Hash32) -> bool {
        self.ids.contains(id)
    }

    /// True when `id` was not held (it is now).
    pub fn insert(&mut self, id: Hash32) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }

    /// Drop `id` now. Its place in the eviction order stays: an id removed and
    /// inserted again may be forgotten early, never late.
    pub fn remove(&mut self, id: &Hash32) {
        self.ids.remove(id);
    }
}

/// A 32-byte blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash32(pub [u8; 32]);

// Hex in JSON (evidence bundles, the API); 32 raw bytes on the wire.
impl Serialize for Hash32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&self.to_hex()) } else { self.0.serialize(s) }
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Hash32::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
        } else {
            <[u8; 32]>::deserialize(d).map(Hash32)
        }
    }
}

impl Hash32 {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for Hash32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default, Debug)]
        pub struct $name(pub Hash32);
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// `blake3(announcement fields)`.
    TaskId
);
id_type!(
    /// `blake3(model file bytes)`.
    ModelId
);

/// Domain prefix of commit hashes.
pub const COMMIT_DOMAIN: &[u8] = b"sampo/v1/commit";

/// `blake3("sampo/v1/commit" || task_id || member peer id || output tokens || salt)`.
///
/// The member's identity is bound in so that a lazy member cannot commit a copy of
/// another member's hash and later reveal a copy of that member's output.
pub fn commit_hash(task: &TaskId, member: &libp2p_identity::PeerId, tokens: &[u32], salt: &[u8; 32]) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(COMMIT_DOMAIN);
    h.update(&task.0.0);
    let peer = member.to_bytes();
    // Length-prefix the variable-length fields so that no two inputs share an encoding.
    h.update(&(peer.len() as u32).to_le_bytes());
    h.update(&peer);
    h.update(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.update(salt);
    Hash32(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;

    #[test]
    fn commit_hash_binds_member_identity() {
        let task = TaskId(Hash32::of(b"t"));
        let a = NodeKey::from_seed([1; 32]).peer_id();
        let b = NodeKey::from_seed([2; 32]).peer_id();
        let salt = [3; 32];
        assert_ne!(commit_hash(&task, &a, &[1, 2, 3], &salt), commit_hash(&task, &b, &[1, 2, 3], &salt));
        assert_ne!(commit_hash(&task, &a, &[1, 2, 3], &salt), commit_hash(&task, &a, &[1, 2, 4], &salt));
        assert_eq!(commit_hash(&task, &a, &[1, 2, 3], &salt), commit_hash(&task, &a, &[1, 2, 3], &salt));
    }

    #[test]
    fn hex_round_trip() {
        let h = Hash32::of(b"x");
        assert_eq!(Hash32::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash32::from_hex("zz"), None);
    }
}
