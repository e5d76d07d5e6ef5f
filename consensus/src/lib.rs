//! The sampo protocol, pure: message types, signed envelopes, ids and hashes.
//!
//! Nothing here performs I/O, reads a clock or spawns a task; time is passed in
//! by the caller. See `DESIGN.md` at the repository root of the shared docs for
//! the protocol this crate implements.

pub mod envelope;
pub mod identity;
pub mod ids;

pub use envelope::{EnvelopeError, MAX_ENVELOPE_BYTES, Message, MessageKind, PROTOCOL_VERSION, SignedEnvelope};
pub use identity::{IdentityError, NodeKey};
pub use ids::{Hash32, ModelId, TaskId, commit_hash};
pub use libp2p_identity::PeerId;
