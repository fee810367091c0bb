//! Development certificates: a private CA and the certificates a local cluster needs, made
//! with rcgen (no openssl, nothing downloaded). `schedctl dev up` and the tests use it; real
//! deployments bring certificates from their own CA.
//!
//! Node certificates are valid for the names clients dial (`localhost`, `127.0.0.1`, and any
//! extra host) and for [`PEER_NAME`], the name a node checks when another node connects to it
//! with its certificate: the server accepts peer (Raft and node-to-node) RPCs only from
//! connections that presented a certificate from the cluster CA valid for that name.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use time::OffsetDateTime;

use crate::Error;

/// The DNS name in every node certificate that marks it as a cluster member's.
pub const PEER_NAME: &str = "raftsched-peer";

/// A certificate authority that issues certificates.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate chain (leaf only).
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// Files of a written PKI.
#[derive(Clone, Debug)]
pub struct PkiFiles {
    /// The CA certificate (give it to clients: `--ca-cert`).
    pub ca: PathBuf,
    /// The node certificate.
    pub cert: PathBuf,
    /// The node key (mode 0600).
    pub key: PathBuf,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("making development certificates: {e}"))
}

impl DevCa {
    /// A new CA valid from yesterday for ten years.
    pub fn new(name: &str) -> Result<DevCa, Error> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (from, to) = validity(-1, 3650);
        p.not_before = from;
        p.not_after = to;
        let key = KeyPair::generate().map_err(err)?;
        Ok(DevCa { issuer: CertifiedIssuer::self_signed(p, key).map_err(err)? })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for a node: usable as server and as client, valid for `hosts` plus
    /// `localhost`, `127.0.0.1` and [`PEER_NAME`], for `days` days from yesterday (a negative
    /// end makes an already expired certificate, for tests).
    pub fn node_cert(&self, hosts: &[&str], days: i64) -> Result<Issued, Error> {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), PEER_NAME.into()];
        names.extend(hosts.iter().map(|h| h.to_string()));
        names.dedup();
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("raftsched node", names, usages, days)
    }

    /// A client certificate (not valid for [`PEER_NAME`]: it cannot act as a node).
    pub fn client_cert(&self, name: &str, days: i64) -> Result<Issued, Error> {
        self.issue(name, vec![name.to_string()], vec![ExtendedKeyUsagePurpose::ClientAuth], days)
    }

    fn issue(
        &self,
        cn: &str,
        names: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        days: i64,
    ) -> Result<Issued, Error> {
        let mut p = CertificateParams::new(names).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = usages;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let (from, to) = if days < 0 { validity(days - 30, days) } else { validity(-1, days) };
        p.not_before = from;
        p.not_after = to;
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.pem`, `node.pem` and `node-key.pem` (0600) for a local cluster under `dir`.
    pub fn write_node_files(&self, dir: &Path, hosts: &[&str]) -> Result<PkiFiles, Error> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let node = self.node_cert(hosts, 825)?;
        let files = PkiFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node-key.pem"),
        };
        std::fs::write(&files.ca, self.cert_pem()).map_err(err)?;
        std::fs::write(&files.cert, &node.cert_pem).map_err(err)?;
        write_private(&files.key, &node.key_pem)?;
        Ok(files)
    }
}

/// The roles a token can have.
pub const ROLES: [&str; 4] = ["admin", "submitter", "worker", "reader"];

/// A token to make: name, role and (workers only) the prefix its worker ids must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSpec {
    /// 1-64 of `A-Z a-z 0-9 . _ - @`.
    pub name: String,
    /// One of [`ROLES`].
    pub role: String,
    /// For workers: worker ids must start with this.
    pub worker_id_prefix: Option<String>,
}

impl TokenSpec {
    /// A token without a worker id prefix.
    pub fn new(name: impl Into<String>, role: impl Into<String>) -> TokenSpec {
        TokenSpec { name: name.into(), role: role.into(), worker_id_prefix: None }
    }

    /// Makes a random secret; returns it and the `[[token]]` entry for a token file (which
    /// records only the secret's SHA-256).
    pub fn generate(&self) -> Result<(String, String), Error> {
        let name = &self.name;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(Error::Config(format!(
                "token name {name:?}: use 1-64 of A-Z a-z 0-9 . _ - @"
            )));
        }
        if !ROLES.contains(&self.role.as_str()) {
            return Err(Error::Config(format!(
                "token role {:?}: expected one of {}",
                self.role,
                ROLES.join(", ")
            )));
        }
        if self.worker_id_prefix.is_some() && self.role != "worker" {
            return Err(Error::Config("a worker id prefix is only for worker tokens".into()));
        }
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let digest = proto::auth::secret_digest_hex(&secret);
        let mut entry = format!(
            "[[token]]\nname = {}\nrole = {}\nsecret_sha256 = \"{digest}\"\n",
            toml_string(name),
            toml_string(&self.role)
        );
        if let Some(p) = &self.worker_id_prefix {
            entry.push_str(&format!("worker_id_prefix = {}\n", toml_string(p)));
        }
        Ok((secret, entry))
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// `(now + from_days, now + to_days)` as certificate times.
fn validity(from_days: i64, to_days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now + time::Duration::days(from_days), now + time::Duration::days(to_days))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_entries_record_the_digest_and_never_the_secret() {
        let mut t = TokenSpec::new("gpu-pool", "worker");
        t.worker_id_prefix = Some("gpu-\"x".into());
        let (secret, entry) = t.generate().unwrap();
        assert_eq!(secret.len(), 64, "32 random bytes, hex");
        assert!(!entry.contains(&secret), "{entry}");
        assert!(entry.contains(&proto::auth::secret_digest_hex(&secret)), "{entry}");
        assert!(entry.contains("worker_id_prefix = \"gpu-\\\"x\""), "quotes are escaped: {entry}");
        let (other, _) = t.generate().unwrap();
        assert_ne!(secret, other, "every secret is new");
    }

    #[test]
    fn bad_token_specs_are_named() {
        for (spec, needle) in [
            (TokenSpec::new("", "admin"), "token name"),
            (TokenSpec::new("a b", "admin"), "token name"),
            (TokenSpec::new("ops", "root"), "token role"),
            (
                TokenSpec { worker_id_prefix: Some("x".into()), ..TokenSpec::new("ops", "admin") },
                "worker id prefix",
            ),
        ] {
            let e = spec.generate().unwrap_err().to_string();
            assert!(e.contains(needle), "{spec:?}: {e}");
        }
    }

    #[test]
    fn node_certificates_are_pem_and_expired_ones_can_be_made() {
        let ca = DevCa::new("test").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let n = ca.node_cert(&["node-a.example"], 30).unwrap();
        assert!(n.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(n.key_pem.contains("PRIVATE KEY"));
        assert!(ca.node_cert(&[], -1).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let files = ca.write_node_files(dir.path(), &[]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key is private");
    }
}
