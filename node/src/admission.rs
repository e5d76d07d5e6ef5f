//! Closed networks, node side: the issuers and this node's certificate from the config
//! (`network.admission_keys`, `network.certificate`), and the admission mode `/v1/node`
//! shows. Certificates are issued by `sampo keys certify` ([`crate::keys::certify`]).

use std::path::Path;

pub use sampo_consensus::{AdmissionCertificate, PeerId};
use sampo_p2p::P2pHandle;
use serde::Serialize;

use crate::Config;

/// What `/v1/node` says under `"admission"`: `"open"`, or
/// `{"closed": {"issuers": N, "certificate_expires_ms": ..}}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionMode {
    Open,
    Closed { issuers: usize, certificate_expires_ms: Option<u64> },
}

/// The admission mode of the node whose mesh `p2p` is (open without a mesh).
pub fn mode(p2p: Option<&P2pHandle>) -> AdmissionMode {
    match p2p.map(|p| p.admission()) {
        Some(a) if a.issuers > 0 => {
            AdmissionMode::Closed { issuers: a.issuers, certificate_expires_ms: a.certificate_expires_ms }
        }
        _ => AdmissionMode::Open,
    }
}

/// Read a certificate file (raw bytes or hex, as `sampo keys certify` writes them).
pub fn read_certificate(path: &Path) -> Result<AdmissionCertificate, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    AdmissionCertificate::from_file_contents(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The issuers and this node's certificate, checked: on a closed network the
/// certificate must admit `own` now. Errors name the config key.
pub fn from_config(
    cfg: &Config,
    own: &PeerId,
    now_ms: u64,
) -> Result<(Vec<[u8; 32]>, Option<AdmissionCertificate>), String> {
    let issuers = cfg
        .network
        .admission_keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            sampo_consensus::admission::parse_issuer_key(k).map_err(|e| format!("network.admission_keys[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cert = match &cfg.network.certificate {
        Some(p) => Some(read_certificate(p).map_err(|e| format!("network.certificate: {e}"))?),
        None => None,
    };
    if !issuers.is_empty() {
        let Some(c) = &cert else {
            return Err("network.certificate: is required when network.admission_keys is set".into());
        };
        c.verify(own, &issuers, now_ms)
            .map_err(|e| format!("network.certificate: does not admit this node ({own}) to the network: {e}"))?;
    }
    Ok((issuers, cert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sampo_consensus::NodeKey;

    #[test]
    fn mode_serializes_as_documented() {
        assert_eq!(serde_json::to_value(AdmissionMode::Open).expect("json"), serde_json::json!("open"));
        let closed = AdmissionMode::Closed { issuers: 2, certificate_expires_ms: Some(5) };
        assert_eq!(
            serde_json::to_value(closed).expect("json"),
            serde_json::json!({"closed": {"issuers": 2, "certificate_expires_ms": 5}})
        );
        assert_eq!(mode(None), AdmissionMode::Open);
    }

    #[test]
    fn config_certificate_must_admit_this_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = NodeKey::from_seed([1; 32]);
        let me = NodeKey::from_seed([2; 32]).peer_id();
        let path = dir.path().join("c.cert");
        std::fs::write(&path, AdmissionCertificate::issue(&issuer, me, 1000).to_bytes()).expect("write");
        let mut cfg = Config::default();
        cfg.network.admission_keys = vec![hex::encode(issuer.public())];
        cfg.network.certificate = Some(path.clone());
        let (keys, cert) = from_config(&cfg, &me, 10).expect("admitted");
        assert_eq!(keys, vec![issuer.public()]);
        assert_eq!(cert.map(|c| c.expires_ms), Some(1000));
        let err = from_config(&cfg, &me, 1000).expect_err("expired");
        assert!(err.starts_with("network.certificate") && err.contains("expired"), "{err}");
        let other = NodeKey::from_seed([3; 32]).peer_id();
        assert!(from_config(&cfg, &other, 10).is_err());
        std::fs::write(&path, b"junk").expect("write");
        assert!(from_config(&cfg, &me, 10).expect_err("junk").starts_with("network.certificate"));
        cfg.network.admission_keys = Vec::new();
        cfg.network.certificate = None;
        assert_eq!(from_config(&cfg, &me, 10), Ok((Vec::new(), None)));
    }
}
