//! TLS for the node: its listeners (gRPC and HTTP), its connections to peers, and the peer
//! check that keeps the internal services to cluster members.
//!
//! With `--tls-cert FILE --tls-key FILE --tls-ca FILE`:
//! * every listener speaks TLS only (a plaintext client fails the handshake), with this
//!   node's certificate; clients verify it against the CA;
//! * a client may present a certificate; if it does, it must chain to the CA and be valid
//!   now, or the handshake fails. Clients without one are served (they authenticate with
//!   tokens, [`crate::auth`]);
//! * a connection is a **peer** only if it presented a CA-signed certificate valid for the
//!   name [`PEER_NAME`] (node certificates carry it; client certificates must not). Raft and
//!   node-to-node RPCs are refused on any other connection ([`is_peer`]);
//! * this node connects to peers with TLS, presenting its own certificate and verifying
//!   theirs for [`PEER_NAME`];
//! * the files are read again on SIGHUP and when their modification time changes (checked
//!   every [`RELOAD_CHECK`]); new connections use the new certificate, established ones keep
//!   theirs. A reload that fails (unreadable, mismatched key) is logged and the node keeps
//!   the certificate it has.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{info, warn};

/// The name every node certificate is valid for, and the only name a peer connection may
/// prove. Keep in sync with the development PKI in the client library.
pub const PEER_NAME: &str = "raftsched-peer";

/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// The certificate files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The cluster CA (PEM): verifies peers and client certificates.
    pub ca: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM content.
    #[error("{what} {path}: {reason}")]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("TLS configuration from {cert}: {reason}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

struct Loaded {
    /// For the gRPC listener (ALPN h2).
    server: Arc<rustls::ServerConfig>,
    /// For the HTTP listener (ALPN http/1.1: it speaks HTTP/1.1 only, so a client such as
    /// curl or Prometheus must not be offered h2).
    http: Arc<rustls::ServerConfig>,
    client: ClientTlsConfig,
    stamps: Vec<Option<SystemTime>>,
}

/// The node's TLS state: the current server configuration and peer client configuration.
pub struct NodeTls {
    files: TlsFiles,
    current: RwLock<Loaded>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid { what, path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let stamps = vec![stamp(&files.cert), stamp(&files.key), stamp(&files.ca)];
    let cert_pem = read("certificate", &files.cert)?;
    let key_pem = read("key", &files.key)?;
    let ca_pem = read("CA certificate", &files.ca)?;
    let chain = certs("certificate", &files.cert, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
        what: "key",
        path: files.key.clone(),
        reason: format!("no usable private key: {e}"),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("CA certificate", &files.ca, &ca_pem)? {
        roots.add(c).map_err(|e| TlsError::Invalid {
            what: "CA certificate",
            path: files.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let config_err = |e: &dyn std::fmt::Display| TlsError::Config {
        cert: files.cert.clone(),
        reason: e.to_string(),
    };
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| config_err(&e))?;
    let mut server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| config_err(&e))?;
    let mut http = server.clone();
    server.alpn_protocols = vec![b"h2".to_vec()];
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(Identity::from_pem(&cert_pem, &key_pem))
        .domain_name(PEER_NAME);
    Ok(Loaded { server: Arc::new(server), http: Arc::new(http), client, stamps })
}

impl NodeTls {
    /// Reads the files and builds the configurations.
    pub fn load(files: TlsFiles) -> Result<Arc<NodeTls>, TlsError> {
        let loaded = load(&files)?;
        Ok(Arc::new(NodeTls { files, current: RwLock::new(loaded) }))
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// An acceptor for the gRPC listener with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().server.clone())
    }

    /// An acceptor for the HTTP listener with the current certificate.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().http.clone())
    }

    /// How to connect to peers with the current certificate.
    pub fn peer_client(&self) -> ClientTlsConfig {
        self.current().client.clone()
    }

    /// Reads the files again; `Ok(false)` when they did not change since the last load.
    pub fn reload_if_changed(&self, force: bool) -> Result<bool, TlsError> {
        let now = [stamp(&self.files.cert), stamp(&self.files.key), stamp(&self.files.ca)];
        if !force && self.current().stamps == now {
            return Ok(false);
        }
        let loaded = load(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(true)
    }
}

/// Reloads on SIGHUP and on file changes until the node stops; after each reload
/// `on_reload` runs (the node hands the new peer configuration to its connection pool).
pub fn spawn_reloader(
    tls: Arc<NodeTls>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    on_reload: impl Fn(&NodeTls) + Send + 'static,
) {
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot watch SIGHUP; certificates reload on file change only");
                None
            }
        };
        loop {
            let forced = tokio::select! {
                _ = async { match &mut hup { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
                _ = tokio::time::sleep(RELOAD_CHECK) => false,
                _ = stopping.wait_for(|s| *s) => return,
            };
            match tls.reload_if_changed(forced) {
                Ok(true) => {
                    info!(cert = %tls.files.cert.display(), "TLS certificates reloaded");
                    on_reload(&tls);
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "TLS reload failed; keeping the current certificates"),
            }
        }
    });
}

/// Whether the connection a request came on proved to be a cluster member: it presented a
/// CA-signed certificate (rustls verified the chain and validity during the handshake) that
/// is valid for [`PEER_NAME`].
pub fn is_peer(extensions: &http::Extensions) -> bool {
    let Some(conn) = extensions.get::<crate::conn::ConnInfo>() else { return false };
    let Some(info) = &conn.tls else { return false };
    let Some(certs) = info.peer_certs() else { return false };
    let Some(leaf) = certs.first() else { return false };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else { return false };
    let Ok(name) = rustls::pki_types::ServerName::try_from(PEER_NAME) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}
