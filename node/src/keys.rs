//! The node key file: 32 raw ed25519 secret bytes at `<data_dir>/node.key`, mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sampo_consensus::NodeKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path} can be read by other users (mode {mode:o}); fix it with `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("key file {path} already exists; pass --force to replace it (the node's identity changes)")]
    Exists { path: PathBuf },
    #[error("no key file at {path}; create one with `sampo keys generate`")]
    Missing { path: PathBuf },
    #[error("I/O on key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// Read the key, refusing a file that group or others can access.
pub fn load(path: &Path) -> Result<NodeKey, KeyError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyError::Missing { path: path.to_owned() }),
        Err(e) => return Err(io(path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.to_owned(), mode });
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    NodeKey::from_secret_bytes(&bytes).map_err(|e| KeyError::Invalid { path: path.to_owned(), reason: e.to_string() })
}

/// Write a fresh key; the file is created with mode 0600 so it is never readable by others.
pub fn generate(path: &Path, force: bool) -> Result<NodeKey, KeyError> {
    if path.exists() && !force {
        return Err(KeyError::Exists { path: path.to_owned() });
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(path))?;
    }
    let key = NodeKey::generate();
    let tmp = path.with_extension("key.tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        // An existing tmp file may have had other permissions.
        f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
        f.write_all(&key.secret_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(key)
}

/// Load the key, creating it on first start.
pub fn load_or_create(path: &Path) -> Result<(NodeKey, bool), KeyError> {
    match load(path) {
        Ok(k) => Ok((k, false)),
        Err(KeyError::Missing { .. }) => generate(path, false).map(|k| (k, true)),
        Err(e) => Err(e),
    }
}

/// Longest validity `sampo keys certify` issues (ten years).
pub const MAX_CERTIFICATE_DAYS: u64 = 3650;

/// `sampo keys certify`: sign `subject` into a closed network for `days` days with the
/// issuer key at `issuer_key` (an ordinary node key file, refused if others can read it).
pub fn certify(
    issuer_key: &Path,
    subject: sampo_consensus::PeerId,
    days: u64,
    now_ms: u64,
) -> Result<sampo_consensus::AdmissionCertificate, KeyError> {
    if days == 0 || days > MAX_CERTIFICATE_DAYS {
        return Err(KeyError::Invalid {
            path: issuer_key.to_owned(),
            reason: format!("--days {days} is outside 1..={MAX_CERTIFICATE_DAYS}"),
        });
    }
    let issuer = load(issuer_key)?;
    let expires_ms = now_ms.saturating_add(days * 86_400_000);
    Ok(sampo_consensus::AdmissionCertificate::issue(&issuer, subject, expires_ms))
}

/// Write a certificate file (the raw bytes; a certificate is public, so mode 0644).
pub fn write_certificate(path: &Path, cert: &sampo_consensus::AdmissionCertificate) -> Result<(), KeyError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(path))?;
    }
    std::fs::write(path, cert.to_bytes()).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certify_signs_with_the_issuer_key_and_refuses_an_open_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("issuer.key");
        let issuer = generate(&p, false).expect("gen");
        let subject = NodeKey::from_seed([3; 32]).peer_id();
        let cert = certify(&p, subject, 2, 1000).expect("certify");
        assert_eq!(cert.expires_ms, 1000 + 2 * 86_400_000);
        assert_eq!(cert.verify(&subject, &[issuer.public()], 2000), Ok(()));
        let out = dir.path().join("out/cert.bin");
        write_certificate(&out, &cert).expect("write");
        assert_eq!(crate::admission::read_certificate(&out), Ok(cert));
        assert!(matches!(certify(&p, subject, 0, 0), Err(KeyError::Invalid { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(certify(&p, subject, 2, 0), Err(KeyError::TooOpen { .. })));
    }

    #[test]
    fn create_then_load_same_identity_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/node.key");
        let (k1, created) = load_or_create(&p).expect("create");
        assert!(created);
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create(&p).expect("load");
        assert!(!created);
        assert_eq!(k1.peer_id(), k2.peer_id());
    }

    #[test]
    fn refuses_readable_key_and_says_how_to_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("node.key");
        generate(&p, false).expect("gen");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load(&p).expect_err("must refuse");
        assert!(matches!(err, KeyError::TooOpen { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn refuses_to_overwrite_without_force_and_rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("node.key");
        let k1 = generate(&p, false).expect("gen");
        assert!(matches!(generate(&p, false), Err(KeyError::Exists { .. })));
        let k2 = generate(&p, true).expect("force");
        assert_ne!(k1.peer_id(), k2.peer_id());
        std::fs::write(&p, b"short").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(load(&p), Err(KeyError::Invalid { .. })));
    }
}
