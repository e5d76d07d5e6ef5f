//! The swarm actor: one task owns the `Swarm`; the node holds a cloneable [`P2pHandle`]
//! that sends commands, and receives [`P2pEvent`]s — never raw swarm events.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::metrics::{Metrics, Recorder};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, StreamProtocol, Swarm, SwarmBuilder, connection_limits, identify, identity, kad, noise, ping, tcp, yamux,
};
use prometheus_client::registry::Registry as MetricsRegistry;
use sampo_consensus::{
    AdmissionCertificate, MessageKind, ModelId, NodeAnnouncement, NodeKey, PeerId, SignedEnvelope, TaskId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::eclipse::{AddrPolicy, AddrSource, EclipseMetrics, Filtered, IpLimits};
use crate::gossip::{self, ReplayGuard};
use crate::peers::PeerSet;
use crate::registry::{Admission, AdmissionStatus, LiveNode, Registry};

/// Kademlia protocol name of the sampo DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/sampo/kad/1.0.0");
/// Request-response protocol for fetching a task's evidence or result from a peer.
pub const FETCH_PROTOCOL: StreamProtocol = StreamProtocol::new("/sampo/fetch/1.0.0");
/// Request-response protocol for the round messages that concern a few peers only
/// (a task's announcement and reveal request go to the committee, commits, declines
/// and reveals to the coordinator): sent straight to them instead of gossiped to every
/// node.
/// 1.1.0 added task announcements: a 1.0.0 node refuses them (and drops the connection),
/// so the two do not speak to each other directly and fall back to gossip.
pub const ROUND_PROTOCOL: StreamProtocol = StreamProtocol::new("/sampo/round/1.1.0");
/// A direct send not answered within this long goes out as gossip instead.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Direct sends in flight at most; beyond, messages go out as gossip.
const MAX_DIRECT_IN_FLIGHT: usize = 1024;
/// Largest direct request (a reveal is 24 KiB at most; an announcement larger than
/// this is gossiped; the codec buffers a whole request before anything else is
/// checked).
const MAX_DIRECT_BYTES: u64 = 32 * 1024;
/// What the codec adds around an envelope's bytes (a CBOR byte-string header).
const DIRECT_FRAMING_BYTES: u64 = 16;
/// Direct messages a peer may send per second, and in a burst: a task's round takes a
/// few, so only a flood meets the limit (refused, so it goes to gossip's scoring).
const DIRECT_PER_SECOND: f64 = 50.0;
const DIRECT_BURST: f64 = 100.0;
/// identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/sampo/id/1.0.0";
/// Gossipsub's protocol ids become `/sampo/meshsub/1.x.0`: anonymous frames (see
/// `build_swarm`), which `/meshsub` peers that sign theirs would reject.
pub const GOSSIP_PROTOCOL_PREFIX: &str = "/sampo/meshsub";
/// Bound of the command and event queues.
pub const QUEUE_DEPTH: usize = 1024;
/// Room in the event queue that only round messages sent directly may take: a flood
/// of valid gossip, fresh node announcements, fetches or connections fills the rest,
/// and a round's messages still get in.
pub const DIRECT_RESERVE: usize = QUEUE_DEPTH / 8;
/// How often the connection count is checked against its high watermark.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
/// Inbound fetches awaiting the node's answer.
pub const MAX_PENDING_FETCHES: usize = 256;
/// Events dropped on a full queue are logged at most once per this long.
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct P2pConfig {
    pub listen: Vec<Multiaddr>,
    /// Full addresses including `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    pub max_connections: u32,
    /// Peers this node dials on its own from what discovery finds, at most: enough for a
    /// gossipsub mesh (~12) and spare, far fewer than a large network's size, so that a
    /// network of N nodes costs ~N·target handshakes instead of N². Discovery still
    /// learns every peer (Kademlia); the registry learns them from gossip. Above 1.5 ×
    /// this many connections (inbound ones included) the surplus is closed
    /// ([`crate::peers`]); mesh peers and peers the operator named always stay.
    pub target_connections: u32,
    pub announce_interval: Duration,
    /// How often a random Kademlia walk looks for peers we don't know yet.
    pub discovery_interval: Duration,
    pub idle_timeout: Duration,
    /// Dial peers that discovery finds (off only in tests that need a fixed topology).
    pub dial_discovered: bool,
    /// How long a fetch (either side) may take before it fails and frees its slot.
    pub fetch_timeout: Duration,
    /// Hold each protocol message until the node reports its judgement
    /// ([`P2pHandle::report`]); off, this layer accepts whatever its own checks pass.
    pub node_validates: bool,
    /// Most established connections to or from one IP address (IPv6: one /64), both
    /// directions counted. Loopback counts like any IP.
    pub max_connections_per_ip: u32,
    /// Slots of `max_connections` that only this node's own dials may fill: inbound
    /// connections get at most `max_connections - reserved_outbound`, so a flood of them
    /// cannot stop it from reaching peers it chose. Must be below `max_connections`.
    pub reserved_outbound: u32,
    /// Put private, loopback, link-local... addresses learned from peers (identify,
    /// Kademlia) into Kademlia and dial them. Off on the internet; on for a testnet on
    /// one host or a LAN. Bootstrap and explicitly dialled addresses are always used.
    pub allow_private_addresses: bool,
    /// A closed network: the ed25519 public keys of the admission issuers. Only peers
    /// whose announcements carry a certificate one of them signed are put in the
    /// registry (so sampled), and only their messages are relayed. Empty: open network.
    pub admission_keys: Vec<[u8; 32]>,
    /// This node's certificate, attached to its announcements (required when
    /// `admission_keys` is set).
    pub certificate: Option<AdmissionCertificate>,
    /// IPs exempt from gossipsub's IP colocation penalty and from seat spreading by
    /// network prefix: a testnet's loopback (`127.0.0.1`), by configuration only.
    pub colocation_whitelist: Vec<IpAddr>,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/tcp/4001".parse().unwrap_or_else(|_| Multiaddr::empty())],
            bootstrap: Vec::new(),
            max_connections: 256,
            target_connections: 24,
            announce_interval: Duration::from_secs(5),
            discovery_interval: Duration::from_secs(10),
            // The peer set is bounded by pruning (crate::peers); closing connections
            // merely idle (gossipsub keeps only mesh peers alive) would make a node
            // below its target redial over and over.
            idle_timeout: Duration::from_secs(600),
            dial_discovered: true,
            fetch_timeout: Duration::from_secs(30),
            node_validates: false,
            max_connections_per_ip: 8,
            reserved_outbound: 16,
            allow_private_addresses: false,
            admission_keys: Vec::new(),
            certificate: None,
            colocation_whitelist: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("transport setup: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("bootstrap address {0} lacks a /p2p/<peer id> suffix")]
    BootstrapWithoutPeerId(Multiaddr),
    #[error("gossipsub setup: {0}")]
    Gossipsub(String),
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("the p2p service has stopped")]
    Stopped,
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("invalid p2p config: {0}")]
    Config(String),
}

/// This node's admission mode, for its status page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionInfo {
    /// Issuers whose certificates admit a peer; 0 on an open network.
    pub issuers: usize,
    /// When this node's own certificate expires (unix ms).
    pub certificate_expires_ms: Option<u64>,
}

/// What can be fetched from a peer by task id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchRequest {
    Evidence { task: TaskId },
    Result { task: TaskId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchResponse {
    Found(Vec<u8>),
    NotFound,
}

/// Where a gossiped envelope travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GossipTopic {
    Nodes,
    Rounds,
    Tasks(ModelId),
}

impl GossipTopic {
    fn ident(&self) -> gossipsub::IdentTopic {
        match self {
            GossipTopic::Nodes => gossip::nodes_topic(),
            GossipTopic::Rounds => gossip::rounds_topic(),
            GossipTopic::Tasks(m) => gossip::tasks_topic(m),
        }
    }
}

/// Events for the node.
#[derive(Debug)]
pub enum P2pEvent {
    /// A protocol message whose envelope checked out (not node announcements: those
    /// feed the registry). It is forwarded to other peers only once the node reports
    /// [`Acceptance::Accept`] for it with [`P2pHandle::report`]; `Reject` makes the peer
    /// that sent it pay in its gossip score.
    Message {
        envelope: SignedEnvelope,
        from: PeerId,
        validation: Validation,
    },
    NodeJoined(PeerId),
    NodeLeft(PeerId),
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
    Listening(Multiaddr),
    /// A peer asks for something; answer with [`P2pHandle::respond`].
    FetchRequested {
        id: u64,
        from: PeerId,
        request: FetchRequest,
    },
}

/// A receiver's answer to a direct round message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectAck {
    /// This node has the message now (or had it already).
    Taken,
    /// Refused or not taken now (full queue, not admitted): gossip it instead.
    Refused,
}

/// Which received message a validation result is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation(Box<ValidationInner>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct ValidationInner {
    /// The gossip message id; none for a message sent directly (nothing to forward).
    id: Option<gossipsub::MessageId>,
    source: PeerId,
    /// The envelope's signer.
    author: PeerId,
}

/// The node's judgement of a gossiped message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// Valid: forward it.
    Accept,
    /// Invalid: drop it, and the peer that sent it loses score.
    Reject,
    /// Not forwarded, without a penalty (e.g. this node is too busy to check it).
    Ignore,
}

enum Command {
    Report { validation: Validation, acceptance: Acceptance },
    Publish { topic: GossipTopic, envelope: SignedEnvelope, reply: oneshot::Sender<Result<(), P2pError>> },
    Send { peers: Vec<PeerId>, topic: GossipTopic, envelope: SignedEnvelope },
    Subscribe { topic: GossipTopic },
    PublishRaw { topic: String, data: Vec<u8> },
    SendDirectRaw { peer: PeerId, envelope: SignedEnvelope },
    SetAnnouncement(Box<NodeAnnouncement>),
    Dial(Multiaddr),
    Fetch { peer: PeerId, request: FetchRequest, reply: oneshot::Sender<Result<FetchResponse, P2pError>> },
    Respond { id: u64, response: FetchResponse },
    Connected { reply: oneshot::Sender<Vec<PeerId>> },
    Listeners { reply: oneshot::Sender<Vec<Multiaddr>> },
    PeerScore { peer: PeerId, reply: oneshot::Sender<Option<f64>> },
    MeshPeers { topic: GossipTopic, reply: oneshot::Sender<Vec<PeerId>> },
    Shutdown,
}

/// A cloneable handle on the swarm actor.
#[derive(Clone)]
pub struct P2pHandle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    registry: Arc<RwLock<Registry>>,
    admission: AdmissionInfo,
}

impl std::fmt::Debug for P2pHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pHandle").field("peer_id", &self.peer_id).finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl P2pHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Open or closed network, and this node's certificate expiry.
    pub fn admission(&self) -> AdmissionInfo {
        self.admission
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, P2pError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| P2pError::Stopped)?;
        rx.await.map_err(|_| P2pError::Stopped)
    }

    /// Gossip an envelope (and subscribe to its topic if needed).
    pub async fn publish(&self, topic: GossipTopic, envelope: SignedEnvelope) -> Result<(), P2pError> {
        self.ask(|reply| Command::Publish { topic, envelope, reply }).await?
    }

    /// Send a round message straight to `peers` (this node itself skipped); to any of
    /// them not connected, or that does not take it in time, it goes out on `topic` as
    /// gossip instead.
    pub async fn send(&self, peers: Vec<PeerId>, topic: GossipTopic, envelope: SignedEnvelope) -> Result<(), P2pError> {
        self.tx.send(Command::Send { peers, topic, envelope }).await.map_err(|_| P2pError::Stopped)
    }

    /// Send `envelope` to `peer` directly whatever its size, with no gossip fallback:
    /// only for tests that play a misbehaving peer.
    #[doc(hidden)]
    pub async fn send_direct_raw(&self, peer: PeerId, envelope: SignedEnvelope) -> Result<(), P2pError> {
        self.tx.send(Command::SendDirectRaw { peer, envelope }).await.map_err(|_| P2pError::Stopped)
    }

    /// Publish arbitrary bytes, bypassing every local check: only for tests that play a
    /// misbehaving peer.
    #[doc(hidden)]
    pub async fn publish_raw(&self, topic: &str, data: Vec<u8>) -> Result<(), P2pError> {
        self.tx.send(Command::PublishRaw { topic: topic.to_owned(), data }).await.map_err(|_| P2pError::Stopped)
    }

    pub async fn subscribe(&self, topic: GossipTopic) -> Result<(), P2pError> {
        self.tx.send(Command::Subscribe { topic }).await.map_err(|_| P2pError::Stopped)
    }

    /// The announcement gossiped every interval (its `sent_ms` is set at each send).
    pub async fn set_announcement(&self, ann: NodeAnnouncement) -> Result<(), P2pError> {
        self.tx.send(Command::SetAnnouncement(Box::new(ann))).await.map_err(|_| P2pError::Stopped)
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), P2pError> {
        self.tx.send(Command::Dial(addr)).await.map_err(|_| P2pError::Stopped)
    }

    pub async fn fetch(&self, peer: PeerId, request: FetchRequest) -> Result<FetchResponse, P2pError> {
        self.ask(|reply| Command::Fetch { peer, request, reply }).await?
    }

    /// Report the node's judgement of a gossiped message. Never waits: if the swarm's
    /// command queue is full the report is dropped, and gossipsub forgets the message.
    pub fn report(&self, validation: Validation, acceptance: Acceptance) {
        let _ = self.tx.try_send(Command::Report { validation, acceptance });
    }

    pub async fn respond(&self, id: u64, response: FetchResponse) -> Result<(), P2pError> {
        self.tx.send(Command::Respond { id, response }).await.map_err(|_| P2pError::Stopped)
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, P2pError> {
        self.ask(|reply| Command::Connected { reply }).await
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, P2pError> {
        self.ask(|reply| Command::Listeners { reply }).await
    }

    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, P2pError> {
        self.ask(|reply| Command::PeerScore { peer, reply }).await
    }

    pub async fn mesh_peers(&self, topic: GossipTopic) -> Result<Vec<PeerId>, P2pError> {
        self.ask(|reply| Command::MeshPeers { topic, reply }).await
    }

    /// Live nodes (this one included once it has announced).
    /// Tell the registry which peers the node values (never evicted for a newcomer).
    pub fn set_valued(&self, peers: Vec<PeerId>) {
        if let Ok(mut r) = self.registry.write() {
            r.set_valued(peers);
        }
    }

    pub fn live_nodes(&self) -> Vec<LiveNode> {
        self.registry.read().map(|r| r.live(now_ms())).unwrap_or_default()
    }

    /// Live nodes serving `model` with a free slot.
    pub fn serving(&self, model: &ModelId) -> Vec<LiveNode> {
        self.registry.read().map(|r| r.serving(model, now_ms())).unwrap_or_default()
    }

    /// Stop the swarm; pending commands are dropped.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// The composed behaviour; connection limits first so they veto before anyone else.
#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Caps on pending and established connections, inbound capped below the total.
    limits: connection_limits::Behaviour,
    /// Cap on the connections of one IP.
    ip_limits: IpLimits,
    /// Exchanges listen addresses and protocols.
    identify: identify::Behaviour,
    /// Liveness and round-trip time.
    ping: ping::Behaviour,
    /// Peer discovery over `/sampo/kad/1.0.0`; only permitted addresses are dialled.
    kad: Filtered<kad::Behaviour<kad::store::MemoryStore>>,
    /// Validated gossip of all protocol messages.
    gossipsub: gossipsub::Behaviour,
    /// Fetching evidence and results by task id.
    fetch: request_response::cbor::Behaviour<FetchRequest, FetchResponse>,
    /// Round messages sent straight to the peers they concern.
    round: request_response::cbor::Behaviour<SignedEnvelope, DirectAck>,
}

fn build_swarm(key: &NodeKey, cfg: &P2pConfig, metrics: &mut MetricsRegistry) -> Result<Swarm<Behaviour>, P2pError> {
    let keypair = identity::Keypair::ed25519_from_bytes(key.secret_bytes())
        .map_err(|e| P2pError::Transport(format!("node key: {e}")))?;
    // Gossipsub frames carry no author, sequence number or signature of their own: every
    // payload is a signed envelope, checked once per message id by `gossip::validate`.
    // (Signed frames cost an ed25519 signature per publish and a verification per
    // received copy, duplicates included: ~7 per message per node.) Its own protocol id,
    // so that nodes that still sign their frames never mesh with these.
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .protocol_id_prefix(GOSSIP_PROTOCOL_PREFIX)
        .heartbeat_interval(gossip::HEARTBEAT)
        .validation_mode(ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(gossip::message_id)
        .max_transmit_size(gossip::MAX_TRANSMIT_BYTES)
        .duplicate_cache_time(gossip::DUPLICATE_CACHE)
        .build()
        .map_err(|e| P2pError::Gossipsub(e.to_string()))?;
    let peer_id = keypair.public().to_peer_id();
    let fetch_timeout = cfg.fetch_timeout;
    if cfg.reserved_outbound >= cfg.max_connections {
        return Err(P2pError::Config(format!(
            "reserved_outbound ({}) must be below max_connections ({})",
            cfg.reserved_outbound, cfg.max_connections
        )));
    }
    if cfg.max_connections_per_ip == 0 {
        return Err(P2pError::Config("max_connections_per_ip must be at least 1".into()));
    }
    let eclipse = EclipseMetrics::register(metrics);
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_incoming(Some(cfg.max_connections - cfg.reserved_outbound))
        .with_max_pending_incoming(Some(64))
        .with_max_established_per_peer(Some(2));
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| P2pError::Transport(e.to_string()))?
        .with_dns()
        .map_err(|e| P2pError::Transport(e.to_string()))?
        .with_bandwidth_metrics(metrics)
        .with_behaviour(|key| {
            let mut gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gossip_cfg)?;
            gossipsub.with_peer_score(
                gossip::score_params(cfg.colocation_whitelist.iter().copied().collect()),
                gossip::score_thresholds(),
            )?;
            let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
            // Each bootstrap dials every peer it asks (~20); with a bounded peer set those
            // are pruned again, so refresh rarely (libp2p's default).
            kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(300)));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            let kad = Filtered::new(
                kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg),
                AddrPolicy::new(cfg.allow_private_addresses),
                AddrSource::Kademlia,
                eclipse.clone(),
            );
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                ip_limits: IpLimits::new(cfg.max_connections_per_ip, eclipse),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(format!("sampo/{}", env!("CARGO_PKG_VERSION")))
                        // No cache of identified addresses to dial from: what identify
                        // learns reaches Kademlia only through the filter in the actor.
                        .with_cache_size(0),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                gossipsub,
                fetch: request_response::cbor::Behaviour::new(
                    [(FETCH_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(fetch_timeout),
                ),
                round: request_response::cbor::Behaviour::with_codec(
                    request_response::cbor::codec::Codec::default()
                        .set_request_size_maximum(MAX_DIRECT_BYTES)
                        .set_response_size_maximum(64),
                    [(ROUND_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(DIRECT_TIMEOUT)
                        .with_max_concurrent_streams(8),
                ),
            })
        })
        .map_err(|e| P2pError::Gossipsub(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
        .build();
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
    Ok(swarm)
}

/// Start the swarm actor. libp2p's metrics go into `metrics` (under `libp2p_`).
pub async fn spawn(
    key: NodeKey,
    cfg: P2pConfig,
    metrics: &mut MetricsRegistry,
) -> Result<(P2pHandle, mpsc::Receiver<P2pEvent>), P2pError> {
    if !cfg.admission_keys.is_empty() {
        let Some(cert) = &cfg.certificate else {
            return Err(P2pError::Config(
                "a closed network (admission keys set) needs this node's admission certificate".into(),
            ));
        };
        cert.verify(&key.peer_id(), &cfg.admission_keys, now_ms())
            .map_err(|e| P2pError::Config(format!("this node's admission certificate: {e}")))?;
    }
    let mut swarm = build_swarm(&key, &cfg, metrics)?;
    // `Metrics::new` adds its own `libp2p` prefix.
    let libp2p_metrics = Metrics::new(metrics);
    for addr in &cfg.listen {
        swarm.listen_on(addr.clone()).map_err(|e| P2pError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    }
    let mut named = HashSet::new();
    for addr in &cfg.bootstrap {
        let Some(peer) = addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        }) else {
            return Err(P2pError::BootstrapWithoutPeerId(addr.clone()));
        };
        // The operator chose it: dialled and kept in Kademlia whatever kind of address.
        named.insert(peer);
        swarm.behaviour_mut().kad.trust(addr);
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }
    for t in [gossip::nodes_topic(), gossip::rounds_topic()] {
        swarm.behaviour_mut().gossipsub.subscribe(&t).map_err(|e| P2pError::Gossipsub(e.to_string()))?;
    }
    let interval_ms = cfg.announce_interval.as_millis() as u64;
    let closed = !cfg.admission_keys.is_empty();
    let registry =
        Arc::new(RwLock::new(if closed { Registry::closed(interval_ms) } else { Registry::new(interval_ms) }));
    let admission = AdmissionInfo {
        issuers: cfg.admission_keys.len(),
        certificate_expires_ms: cfg.certificate.as_ref().map(|c| c.expires_ms),
    };
    let gate = Admission::new(cfg.admission_keys.clone());
    let (cmd_tx, cmd_rx) = mpsc::channel(QUEUE_DEPTH);
    let (ev_tx, ev_rx) = mpsc::channel(QUEUE_DEPTH);
    let peer_id = key.peer_id();
    let actor = Actor {
        swarm,
        key,
        cfg,
        events: ev_tx,
        registry: registry.clone(),
        admission: gate,
        replay: ReplayGuard::default(),
        metrics: libp2p_metrics,
        announcement: None,
        pending_fetches: HashMap::new(),
        pending_direct: HashMap::new(),
        direct_budget: HashMap::new(),
        inbound: HashMap::new(),
        next_inbound: 0,
        subscribed_models: HashSet::new(),
        peers: PeerSet::default(),
        named,
        unheard: true,
        dropped: std::cell::Cell::new((0, None)),
    };
    tokio::spawn(actor.run(cmd_rx).instrument(info_span!("p2p-swarm", %peer_id)));
    Ok((P2pHandle { tx: cmd_tx, peer_id, registry, admission }, ev_rx))
}

struct Actor {
    swarm: Swarm<Behaviour>,
    key: NodeKey,
    cfg: P2pConfig,
    events: mpsc::Sender<P2pEvent>,
    registry: Arc<RwLock<Registry>>,
    /// Closed networks: whose certificates checked out, until when.
    admission: Admission,
    replay: ReplayGuard,
    metrics: Metrics,
    announcement: Option<NodeAnnouncement>,
    /// Fetches this node asked for: with the peer asked, which pruning leaves alone.
    pending_fetches:
        HashMap<request_response::OutboundRequestId, (PeerId, oneshot::Sender<Result<FetchResponse, P2pError>>)>,
    /// Direct sends in flight: what to gossip if one is not taken.
    pending_direct: HashMap<request_response::OutboundRequestId, (PeerId, GossipTopic, SignedEnvelope)>,
    /// Per peer: direct messages it may still send now, and when that was last topped
    /// up. A spent budget outlives the connection (reconnecting must not buy a fresh
    /// burst); the prune tick forgets a disconnected peer's once it is full again.
    direct_budget: HashMap<PeerId, (f64, std::time::Instant)>,
    /// Fetches asked of this node, awaiting its answer: with the asker.
    inbound: HashMap<u64, (PeerId, request_response::ResponseChannel<FetchResponse>)>,
    next_inbound: u64,
    subscribed_models: HashSet<ModelId>,
    /// Who this node is connected to, since when, which way: what pruning chooses from.
    peers: PeerSet,
    /// Peers the operator named (bootstrap, explicit dials): never pruned.
    named: HashSet<PeerId>,
    /// The last announcement found nobody on the nodes topic.
    unheard: bool,
    /// Events dropped on a full queue since the last warning, and when that was.
    dropped: std::cell::Cell<(u64, Option<std::time::Instant>)>,
}

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut announce = tokio::time::interval(self.cfg.announce_interval);
        let mut discover = tokio::time::interval(self.cfg.discovery_interval);
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => self.command(cmd),
                },
                ev = self.swarm.select_next_some() => self.swarm_event(ev),
                _ = announce.tick() => self.announce(),
                _ = prune.tick() => self.prune(),
                _ = discover.tick() => {
                    self.fill_peer_set();
                    let gone = self.registry.write().map(|mut r| r.expire(now_ms())).unwrap_or_default();
                    for p in gone {
                        self.emit(P2pEvent::NodeLeft(p));
                    }
                }
            }
        }
        info!("p2p swarm stopped");
    }

    /// Events go to a bounded queue; if the node can't keep up, we drop (and say so)
    /// rather than block the network loop.
    ///
    /// Every event a peer can cause (gossip, joins, fetches, connections) stays out of
    /// the last [`DIRECT_RESERVE`] places, which only direct round messages may take.
    fn emit(&self, ev: P2pEvent) -> bool {
        if self.events.capacity() <= DIRECT_RESERVE {
            self.dropped_event(&ev);
            return false;
        }
        self.emit_reserved(ev)
    }

    /// [`Self::emit`] that may take the reserve: for direct round messages only.
    fn emit_reserved(&self, ev: P2pEvent) -> bool {
        match self.events.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(ev)) => {
                self.dropped_event(&ev);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn dropped_event(&self, ev: &P2pEvent) {
        // At most one line per interval: a flood must not turn into a log flood.
        let (n, last) = self.dropped.get();
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= DROP_WARN_INTERVAL) {
            warn!(dropped = n + 1, last = ?ev, "node event queue full; events dropped");
            self.dropped.set((0, Some(now)));
        } else {
            self.dropped.set((n + 1, last));
        }
    }

    fn subscribe(&mut self, topic: &GossipTopic) {
        if let GossipTopic::Tasks(m) = topic
            && self.subscribed_models.insert(*m)
        {
            let t = topic.ident();
            let _ = self.swarm.behaviour_mut().gossipsub.set_topic_params(t.clone(), gossip::topic_params(1.0));
            if let Err(e) = self.swarm.behaviour_mut().gossipsub.subscribe(&t) {
                warn!(error = %e, "subscribe failed");
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { topic, envelope, reply } => {
                let _ = reply.send(self.gossip(&topic, &envelope));
            }
            Command::Send { peers, topic, envelope } => {
                // Encoded once: its id (blake3 of these bytes, as `id()`) and its size.
                let bytes = envelope.to_bytes();
                // Remember our own message so an echo is not mistaken for fresh input.
                self.replay.first_sight(sampo_consensus::Hash32::of(&bytes));
                let me = *self.swarm.local_peer_id();
                let mut gossip = false;
                // A long prompt's announcement is more than a direct request may carry.
                let fits = bytes.len() as u64 + DIRECT_FRAMING_BYTES <= MAX_DIRECT_BYTES;
                for peer in peers.into_iter().filter(|p| *p != me) {
                    if fits && self.swarm.is_connected(&peer) && self.pending_direct.len() < MAX_DIRECT_IN_FLIGHT {
                        let id = self.swarm.behaviour_mut().round.send_request(&peer, envelope.clone());
                        self.pending_direct.insert(id, (peer, topic.clone(), envelope.clone()));
                    } else {
                        gossip = true;
                    }
                }
                if gossip {
                    self.gossip_instead(&topic, &envelope);
                }
            }
            Command::Subscribe { topic } => self.subscribe(&topic),
            Command::SendDirectRaw { peer, envelope } => {
                let _ = self.swarm.behaviour_mut().round.send_request(&peer, envelope);
            }
            Command::PublishRaw { topic, data } => {
                let _ = self.swarm.behaviour_mut().gossipsub.publish(gossipsub::IdentTopic::new(topic), data);
            }
            Command::SetAnnouncement(ann) => {
                self.announcement = Some(*ann);
                self.announce();
            }
            Command::Dial(addr) => {
                if let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() {
                    self.named.insert(peer);
                }
                self.swarm.behaviour_mut().kad.trust(&addr);
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    warn!(%addr, error = %e, "dial failed");
                }
            }
            Command::Fetch { peer, request, reply } => {
                let id = self.swarm.behaviour_mut().fetch.send_request(&peer, request);
                self.pending_fetches.insert(id, (peer, reply));
            }
            Command::Respond { id, response } => {
                if let Some((_, ch)) = self.inbound.remove(&id) {
                    let _ = self.swarm.behaviour_mut().fetch.send_response(ch, response);
                }
            }
            Command::Connected { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Listeners { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::PeerScore { peer, reply } => {
                let _ = reply.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::Report { validation, acceptance } => {
                let validation = *validation.0;
                if acceptance == Acceptance::Reject {
                    // Its author signed something the protocol refuses: out of the
                    // registry (so out of committees) until it announces itself again.
                    let removed = self.registry.write().map(|mut r| {
                        let had = r.get(&validation.author).is_some();
                        r.remove(&validation.author);
                        had
                    });
                    if removed.unwrap_or(false) {
                        self.emit(P2pEvent::NodeLeft(validation.author));
                    }
                }
                let a = match acceptance {
                    Acceptance::Accept => MessageAcceptance::Accept,
                    Acceptance::Reject => MessageAcceptance::Reject,
                    Acceptance::Ignore => MessageAcceptance::Ignore,
                };
                match &validation.id {
                    Some(id) => {
                        let _ = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                            id,
                            &validation.source,
                            a,
                        );
                    }
                    // Sent directly, by its author: no gossip score to charge, so the
                    // connection goes.
                    None if acceptance == Acceptance::Reject => {
                        let _ = self.swarm.disconnect_peer_id(validation.source);
                    }
                    None => {}
                }
            }
            Command::MeshPeers { topic, reply } => {
                let _ =
                    reply.send(self.swarm.behaviour().gossipsub.mesh_peers(&topic.ident().hash()).copied().collect());
            }
            Command::Shutdown => {}
        }
    }

    fn announce(&mut self) {
        let Some(mut ann) = self.announcement.clone() else { return };
        ann.sent_ms = now_ms();
        ann.addrs = self.swarm.listeners().map(|a| a.to_string()).collect();
        if ann.certificate.is_none() {
            ann.certificate.clone_from(&self.cfg.certificate);
        }
        let env = match SignedEnvelope::seal(&self.key, &ann) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot seal node announcement");
                return;
            }
        };
        if let Ok(mut r) = self.registry.write() {
            r.observe(self.key.peer_id(), ann, now_ms());
        }
        match self.swarm.behaviour_mut().gossipsub.publish(gossip::nodes_topic(), env.to_bytes()) {
            Ok(_) => self.unheard = false,
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => self.unheard = true,
            Err(e) => debug!(error = %e, "announcement not published"),
        }
    }

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.emit(P2pEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished { peer_id, num_established, endpoint, .. } => {
                self.peers.connected(peer_id, endpoint.is_dialer(), std::time::Instant::now());
                if let Some(ip) = crate::eclipse::ip_of(endpoint.get_remote_address())
                    && let Ok(mut r) = self.registry.write()
                {
                    r.connected(peer_id, ip);
                }
                if num_established.get() == 1 {
                    self.emit(P2pEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.peers.disconnected(&peer_id, std::time::Instant::now());
                if let Ok(mut r) = self.registry.write() {
                    r.disconnected(&peer_id);
                }
                self.emit(P2pEvent::PeerDisconnected(peer_id));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(ev)) => {
                self.metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    // Only globally routable addresses (unless configured otherwise): a
                    // peer must not fill the routing table with addresses that lead to
                    // this node's LAN, or nowhere.
                    for addr in info.listen_addrs {
                        if self.swarm.behaviour().kad.admit(&addr, AddrSource::Identify) {
                            self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ev)) => self.metrics.record(&ev),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => {
                self.metrics.record(&ev);
                if let kad::Event::RoutingUpdated { peer, .. } = ev
                    && self.cfg.dial_discovered
                    && !self.swarm.is_connected(&peer)
                    && self.peers.may_dial(&peer, std::time::Instant::now())
                    && (self.swarm.network_info().num_peers() as u32)
                        < self.cfg.target_connections.min(self.cfg.max_connections)
                {
                    // Discovery is only useful if it turns into gossip neighbours.
                    let _ = self.swarm.dial(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => {
                self.metrics.record(&ev);
                match ev {
                    gossipsub::Event::Message { propagation_source, message_id, message } => {
                        self.gossip_message(propagation_source, message_id, message);
                    }
                    // The first listener of the nodes topic hears this node at once, not
                    // an announcement interval later: a new node is known in one hop.
                    gossipsub::Event::Subscribed { topic, .. }
                        if self.unheard && topic == gossip::nodes_topic().hash() =>
                    {
                        self.announce();
                    }
                    _ => {}
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Fetch(ev)) => self.fetch_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Round(ev)) => self.round_event(ev),
            _ => {}
        }
    }

    fn gossip_message(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let now = now_ms();
        let verdict = gossip::validate(&message.topic, &message.data, &mut self.replay, now);
        let envelope = match verdict {
            Ok(env) => env,
            Err(e) => {
                debug!(from = %source, error = %e, "gossip message refused");
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(&id, &source, e.acceptance());
                return;
            }
        };
        let signer = envelope.signer();
        if envelope.kind() == MessageKind::NodeAnnouncement {
            // Fully checked here: the registry is this layer's own business.
            let admitted = envelope.open::<NodeAnnouncement>().map_err(|e| e.to_string()).and_then(|ann| {
                self.admission.check_announcement(signer, &ann, now).map(|()| ann).map_err(|e| e.to_string())
            });
            let ann = match admitted {
                Ok(ann) => ann,
                Err(e) => {
                    // Closed network, no valid certificate: never in the registry, and
                    // the peer that sent it pays in score.
                    debug!(from = %source, %signer, error = %e, "node announcement refused");
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &id,
                        &source,
                        MessageAcceptance::Reject,
                    );
                    self.forget(signer);
                    return;
                }
            };
            self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                &id,
                &source,
                MessageAcceptance::Accept,
            );
            let joined = self.registry.write().map(|mut r| r.observe(signer, ann, now)).unwrap_or(false);
            if joined {
                self.emit(P2pEvent::NodeJoined(signer));
            }
            return;
        }
        // A closed network relays only admitted authors: one known to lack a valid
        // certificate is rejected; one not heard from yet is dropped without penalty
        // (its announcement may still be on its way).
        let not_admitted = match self.admission.status(&signer, now) {
            AdmissionStatus::Admitted => None,
            AdmissionStatus::Unknown => Some(MessageAcceptance::Ignore),
            AdmissionStatus::Refused => Some(MessageAcceptance::Reject),
        };
        if let Some(acceptance) = not_admitted {
            debug!(from = %source, %signer, "message from a peer not admitted refused");
            if acceptance == MessageAcceptance::Ignore {
                // Its author may yet be admitted: a later copy is not a replay.
                self.replay.forget(&envelope.id());
            }
            self.swarm.behaviour_mut().gossipsub.report_message_validation_result(&id, &source, acceptance);
            return;
        }
        // Everything else is judged by the node (the protocol's rules) before it is
        // forwarded; if the node cannot take it now, it is not forwarded either.
        let validation = Validation(Box::new(ValidationInner { id: Some(id.clone()), source, author: signer }));
        if !self.cfg.node_validates {
            self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                &id,
                &source,
                MessageAcceptance::Accept,
            );
            self.emit(P2pEvent::Message { envelope, from: signer, validation });
        } else {
            let envelope_id = envelope.id();
            if !self.emit(P2pEvent::Message { envelope, from: signer, validation }) {
                // Not taken: a later copy (gossiped, or sent directly) must not be
                // dropped as a replay.
                self.replay.forget(&envelope_id);
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &id,
                    &source,
                    MessageAcceptance::Ignore,
                );
            }
        }
    }

    /// Below the dial target: dial peers Kademlia already knows (and did not just leave),
    /// in a random order; walk the DHT only while it knows fewer peers than the target. A node with the peers it wants does
    /// neither — a walk connects to every peer it queries (~20), which on a large
    /// network would undo the bound (Kademlia's periodic bootstrap still refreshes it).
    fn fill_peer_set(&mut self) {
        let target = self.cfg.target_connections.min(self.cfg.max_connections) as usize;
        let connected = self.swarm.network_info().num_peers();
        if connected >= target {
            return;
        }
        let me = self.swarm.local_peer_id().to_owned();
        let mut known: Vec<PeerId> = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
            .collect();
        let table = known.len();
        let now = std::time::Instant::now();
        known.retain(|p| *p != me && !self.swarm.is_connected(p) && self.peers.may_dial(p, now));
        if known.is_empty() {
            // Walk only while the table itself is small: a walk dials whoever it asks,
            // backoffs included.
            if table < target {
                self.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
            }
            return;
        }
        // Closest to a random key first: a uniform choice without a random-number crate.
        let pivot = kad::KBucketKey::from(PeerId::random());
        known.sort_by_key(|p| kad::KBucketKey::from(*p).distance(&pivot));
        for p in known.into_iter().take(target - connected) {
            let _ = self.swarm.dial(p);
        }
    }

    /// Close the connections above the high watermark (see [`crate::peers`]).
    fn prune(&mut self) {
        // Budgets of peers no longer connected, once full again: the same as none.
        let now = std::time::Instant::now();
        let gone: Vec<PeerId> = self.direct_budget.keys().filter(|p| !self.swarm.is_connected(p)).copied().collect();
        for p in gone {
            forget_full_budget(&mut self.direct_budget, &p, now);
        }
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let mut kept: HashSet<PeerId> = gossipsub.all_mesh_peers().copied().collect();
        // A fetch or a direct round message in flight either way keeps its connection.
        kept.extend(self.pending_fetches.values().map(|(p, _)| *p));
        kept.extend(self.pending_direct.values().map(|(p, _, _)| *p));
        kept.extend(self.inbound.values().map(|(p, _)| *p));
        let surplus = self.peers.surplus(
            self.cfg.target_connections,
            std::time::Instant::now(),
            |p| kept.contains(p) || self.named.contains(p),
            |p| gossipsub.peer_score(p).unwrap_or(0.0),
        );
        for p in surplus {
            debug!(peer = %p, "pruning a surplus connection");
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Take `peer` out of the registry (saying so if it was there).
    fn forget(&mut self, peer: PeerId) {
        let removed = self.registry.write().map(|mut r| {
            let had = r.get(&peer).is_some();
            r.remove(&peer);
            had
        });
        if removed.unwrap_or(false) {
            self.emit(P2pEvent::NodeLeft(peer));
        }
    }

    /// Gossip `envelope` on `topic` (subscribing first), remembering it as seen.
    fn gossip(&mut self, topic: &GossipTopic, envelope: &SignedEnvelope) -> Result<(), P2pError> {
        self.subscribe(topic);
        // Remember our own message so an echo is not mistaken for fresh input.
        self.replay.first_sight(envelope.id());
        match self.swarm.behaviour_mut().gossipsub.publish(topic.ident(), envelope.to_bytes()) {
            Ok(_) => Ok(()),
            // Alone in the network: nothing to send to, nothing lost. Already sent (a
            // direct send that fell back twice): nothing more to do.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate) => Ok(()),
            Err(e) => Err(P2pError::Publish(e.to_string())),
        }
    }

    /// A direct send that could not be made or was not taken goes out as gossip.
    fn gossip_instead(&mut self, topic: &GossipTopic, envelope: &SignedEnvelope) {
        if let Err(e) = self.gossip(topic, envelope) {
            debug!(error = %e, "publish failed");
        }
    }

    fn round_event(&mut self, ev: request_response::Event<SignedEnvelope, DirectAck>) {
        match ev {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request, channel, .. },
                ..
            } => {
                let ack = self.direct_message(peer, request);
                let _ = self.swarm.behaviour_mut().round.send_response(channel, ack);
            }
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                if let Some((_, topic, envelope)) = self.pending_direct.remove(&request_id)
                    && response != DirectAck::Taken
                {
                    self.gossip_instead(&topic, &envelope);
                }
            }
            request_response::Event::OutboundFailure { request_id, peer, error, .. } => {
                if let Some((_, topic, envelope)) = self.pending_direct.remove(&request_id) {
                    debug!(%peer, %error, "direct send failed; gossiping it");
                    self.gossip_instead(&topic, &envelope);
                }
            }
            request_response::Event::InboundFailure { .. } | request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A round message sent to this node directly: the gossip path's checks (the
    /// envelope, its size, that it is a round message, not seen before, an admitted
    /// author), then the node's. Nothing is forwarded.
    fn direct_message(&mut self, from: PeerId, envelope: SignedEnvelope) -> DirectAck {
        let now = now_ms();
        let signer = envelope.signer();
        if !self.direct_allowed(from) {
            debug!(%from, "direct messages over their rate; refused");
            return DirectAck::Refused;
        }
        // Honest nodes send only their own messages directly (others' travel as gossip),
        // so whatever is refused here is the sending peer's doing: it is disconnected.
        let refusal = if from != signer {
            Some("not the sender's own message".to_owned())
        } else if let Err(e) = gossip::check_direct(&envelope) {
            Some(e.to_string())
        } else {
            match self.admission.status(&signer, now) {
                AdmissionStatus::Admitted => None,
                // Its announcement may still be on its way: refused, not punished.
                AdmissionStatus::Unknown => return DirectAck::Refused,
                AdmissionStatus::Refused => Some("author not admitted".to_owned()),
            }
        };
        if let Some(why) = refusal {
            debug!(%from, %signer, %why, "direct message refused; disconnecting");
            let _ = self.swarm.disconnect_peer_id(from);
            return DirectAck::Refused;
        }
        let (id, kind) = (envelope.id(), envelope.kind());
        if self.replay.seen(&id) {
            return DirectAck::Taken;
        }
        let validation = Validation(Box::new(ValidationInner { id: None, source: from, author: signer }));
        // Seen only once the node has it: if it cannot take it now, the gossiped copy
        // the sender falls back to must not look like a replay. The queue's reserve is
        // for rounds under way; an announcement (any key may sign one, and it costs the
        // most to take in) waits with gossip.
        let event = P2pEvent::Message { envelope, from: signer, validation };
        let taken = if kind == MessageKind::TaskAnnouncement { self.emit(event) } else { self.emit_reserved(event) };
        if taken {
            self.replay.first_sight(id);
            DirectAck::Taken
        } else {
            DirectAck::Refused
        }
    }

    /// Takes one from `peer`'s direct-message budget (topped up at
    /// [`DIRECT_PER_SECOND`] up to [`DIRECT_BURST`]); false when it is spent.
    fn direct_allowed(&mut self, peer: PeerId) -> bool {
        let now = std::time::Instant::now();
        take_direct_token(self.direct_budget.entry(peer).or_insert((DIRECT_BURST, now)), now)
    }

    fn fetch_event(&mut self, ev: request_response::Event<FetchRequest, FetchResponse>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    if self.inbound.len() >= MAX_PENDING_FETCHES {
                        // Requests whose askers hung up (or timed out) hold no slot.
                        self.inbound.retain(|_, (_, ch)| ch.is_open());
                    }
                    if self.inbound.len() >= MAX_PENDING_FETCHES {
                        let _ = self.swarm.behaviour_mut().fetch.send_response(channel, FetchResponse::NotFound);
                        return;
                    }
                    self.next_inbound += 1;
                    let id = self.next_inbound;
                    self.inbound.insert(id, (peer, channel));
                    if !self.emit(P2pEvent::FetchRequested { id, from: peer, request }) {
                        // Nobody will answer a dropped event: answer now, free the slot.
                        if let Some((_, ch)) = self.inbound.remove(&id) {
                            let _ = self.swarm.behaviour_mut().fetch.send_response(ch, FetchResponse::NotFound);
                        }
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some((_, tx)) = self.pending_fetches.remove(&request_id) {
                        let _ = tx.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some((_, tx)) = self.pending_fetches.remove(&request_id) {
                    let _ = tx.send(Err(P2pError::Fetch(error.to_string())));
                }
            }
            _ => {}
        }
    }
}

/// One peer's direct-message budget `(tokens, last)` at `now`: topped up at
/// [`DIRECT_PER_SECOND`] since `last`, up to [`DIRECT_BURST`]; takes one if there is one.
fn take_direct_token(budget: &mut (f64, std::time::Instant), now: std::time::Instant) -> bool {
    let (tokens, last) = budget;
    *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * DIRECT_PER_SECOND).min(DIRECT_BURST);
    *last = (*last).max(now);
    if *tokens < 1.0 {
        return false;
    }
    *tokens -= 1.0;
    true
}

/// Drop `peer`'s direct-message budget if it has topped up to the full burst by `now`
/// (a new one would be the same).
fn forget_full_budget(
    budgets: &mut HashMap<PeerId, (f64, std::time::Instant)>,
    peer: &PeerId,
    now: std::time::Instant,
) {
    if let Some((tokens, last)) = budgets.get(peer)
        && tokens + now.saturating_duration_since(*last).as_secs_f64() * DIRECT_PER_SECOND >= DIRECT_BURST
    {
        budgets.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A peer that spent its budget and reconnects finds it spent: only time refills it.
    #[test]
    fn a_spent_direct_budget_outlives_the_connection_until_it_is_full_again() {
        let t0 = Instant::now();
        let peer = PeerId::random();
        let mut budgets = HashMap::from([(peer, (DIRECT_BURST, t0))]);
        while take_direct_token(budgets.get_mut(&peer).expect("budget"), t0) {}
        forget_full_budget(&mut budgets, &peer, t0);
        assert!(budgets.contains_key(&peer), "spent: kept");
        forget_full_budget(&mut budgets, &peer, t0 + Duration::from_secs(1));
        assert!(budgets.contains_key(&peer), "half full: kept");
        forget_full_budget(&mut budgets, &peer, t0 + Duration::from_secs(2));
        assert!(!budgets.contains_key(&peer), "full again: the same as none");
    }

    /// A flood of direct messages from one peer: a burst gets in, then the rate; the
    /// rest are refused (and go to gossip, where scoring sees them). Time that runs
    /// backwards (a clock step) gives nothing.
    #[test]
    fn direct_messages_beyond_the_burst_get_the_rate_and_no_more() {
        let t0 = Instant::now();
        let mut budget = (DIRECT_BURST, t0);
        let burst = (0..1000).filter(|_| take_direct_token(&mut budget, t0)).count();
        assert_eq!(burst, DIRECT_BURST as usize);
        // One second of a flood, a message every millisecond: the rate, not the flood.
        let second = (1..=1000).filter(|&ms| take_direct_token(&mut budget, t0 + Duration::from_millis(ms))).count();
        assert_eq!(second, DIRECT_PER_SECOND as usize);
        // A quiet peer is topped up to the burst, never beyond.
        let later = t0 + Duration::from_secs(3600);
        let refilled = (0..1000).filter(|_| take_direct_token(&mut budget, later)).count();
        assert_eq!(refilled, DIRECT_BURST as usize);
        assert!(!take_direct_token(&mut budget, t0), "an earlier instant adds nothing");
    }
}
