//! The libp2p swarm of a sampo node: TCP + Noise + Yamux, identify, ping, connection
//! limits, Kademlia discovery (`/sampo/kad/1.0.0`), validated gossipsub, request-response
//! for fetching evidence, and the registry of live nodes. Knows nothing of models.

pub mod eclipse;
pub mod gossip;
pub mod peers;
pub mod registry;
pub mod service;

pub use eclipse::{AddrPolicy, is_global_addr, is_global_ip, prefix_group};
pub use libp2p::Multiaddr;
pub use libp2p::multiaddr::Protocol;
pub use registry::{Admission, AdmissionStatus, LiveNode, Registry};
pub use service::{
    Acceptance, AdmissionInfo, DIRECT_RESERVE, FetchRequest, FetchResponse, GossipTopic, MAX_PENDING_FETCHES,
    P2pConfig, P2pError, P2pEvent, P2pHandle, QUEUE_DEPTH, Validation, spawn,
};
