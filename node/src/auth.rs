//! Who may ask: bearer tokens, roles, and the one table saying which role each RPC needs.
//!
//! With `--auth-tokens FILE`, every gRPC request must carry `authorization: Bearer <secret>`
//! of a token in the file; the node keeps only the SHA-256 of each secret and compares digests
//! in constant time, and never logs a secret. The [`AuthLayer`] wraps the whole gRPC server, so
//! no handler runs for a request that is not allowed: a missing or unknown credential is
//! UNAUTHENTICATED, a role that is not enough is PERMISSION_DENIED naming the role needed.
//! The authenticated [`Caller`] travels to the handlers in the request's extensions (workers
//! are held to their `worker_id_prefix`; reads hide fencing tokens and holders from callers
//! that do not hold the task).
//!
//! Roles: `reader` (get/list/explain/watch tasks, events, worker list, cluster status),
//! `submitter` (reader + submit/cancel), `worker` (the Workers service for its own worker
//! ids, and reading the tasks it holds), `admin` (everything). Health checks stay open so
//! orchestrators can probe without a secret.
//!
//! Peer RPCs (`raftsched.internal.v1`: Raft and node-to-node) are not token-checked: peers do
//! not hold client secrets. With TLS on they are accepted only on connections that presented
//! a node certificate ([`crate::tls::is_peer`]); without TLS they are as open as the port,
//! which is why a node refuses to serve a non-loopback address without TLS and tokens unless
//! `--insecure` is given.
//!
//! Without a token file, authentication is off and [`Caller`] is absent: every request is
//! allowed, as before (fine on loopback for development; the startup guard above applies).

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;
use state_machine::valid_token_name;
use subtle::ConstantTimeEq;

pub use state_machine::Role;

/// What a method requires of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing (health checks).
    Open,
    /// A cluster peer (authenticated by certificate, not by token).
    Peer,
    /// `reader` or more.
    Reader,
    /// `submitter` or `admin`.
    Submitter,
    /// `worker` or `admin`.
    Worker,
    /// Any role that reads tasks, or a worker (reading the tasks it holds).
    ReaderOrWorker,
    /// `admin`.
    Admin,
}

impl Need {
    /// Whether `role` may call a method that needs this.
    pub fn allows(self, role: Role) -> bool {
        match self {
            Need::Open | Need::Peer => true,
            Need::Reader => matches!(role, Role::Reader | Role::Submitter | Role::Admin),
            Need::Submitter => matches!(role, Role::Submitter | Role::Admin),
            Need::Worker => matches!(role, Role::Worker | Role::Admin),
            Need::ReaderOrWorker => true,
            Need::Admin => role == Role::Admin,
        }
    }

    /// The role to name in a PERMISSION_DENIED message.
    fn named(self) -> &'static str {
        match self {
            Need::Open | Need::Peer => "none",
            Need::Reader => "reader (or submitter, admin)",
            Need::Submitter => "submitter (or admin)",
            Need::Worker => "worker (or admin)",
            Need::ReaderOrWorker => "reader, submitter, worker or admin",
            Need::Admin => "admin",
        }
    }
}

/// The role a gRPC method (`/package.Service/Method`) needs. Unknown methods need `reader`,
/// so probing for them without a credential is UNAUTHENTICATED like everything else.
pub fn need_of(path: &str) -> Need {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Need::Reader;
    };
    match service {
        "grpc.health.v1.Health" => Need::Open,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Need::Reader
        }
        s if s.starts_with("raftsched.internal.") => Need::Peer,
        "scheduler.v1.Tasks" => match method {
            "SubmitTasks" | "CancelTasks" | "RetryTask" => Need::Submitter,
            "PauseQueue" | "ResumeQueue" => Need::Admin,
            "GetTask" => Need::ReaderOrWorker,
            _ => Need::Reader,
        },
        "scheduler.v1.Workers" => match method {
            "ListWorkers" => Need::Reader,
            "RemoveWorker" => Need::Admin,
            _ => Need::Worker,
        },
        "scheduler.v1.Cluster" => match method {
            "Status" => Need::Reader,
            _ => Need::Admin,
        },
        _ => Need::Reader,
    }
}

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (never its secret).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// For worker tokens: the worker ids it may use must start with this.
    pub worker_id_prefix: Option<String>,
}

impl Caller {
    /// Whether this caller may act as worker `id`.
    pub fn may_be_worker(&self, id: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Worker => self.worker_id_prefix.as_deref().is_none_or(|p| id.starts_with(p)),
            _ => false,
        }
    }

    /// Whether this caller may see the fencing token of an attempt held by `holder`: admins
    /// always, workers for the ids they may act for, nobody else.
    pub fn sees_fence_of(&self, holder: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Worker => self.may_be_worker(holder),
            Role::Reader | Role::Submitter => false,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header, or not `Bearer <secret>`.
    #[error("this cluster requires a token: send `authorization: Bearer <secret>` (schedctl --token / SCHED_TOKEN)")]
    Missing,
    /// The secret matches no token.
    #[error("the token is not valid (unknown or revoked)")]
    Unknown,
    /// The token's role does not allow the method.
    #[error("token {token:?} has role {role}; {method} needs {need}")]
    Denied {
        /// The token's name.
        token: String,
        /// Its role.
        role: Role,
        /// The method.
        method: String,
        /// What it needs.
        need: &'static str,
    },
    /// A peer RPC on a connection without a node certificate.
    #[error(
        "{method} is for cluster nodes only: connect with a node certificate from the cluster CA"
    )]
    NotPeer {
        /// The method.
        method: String,
    },
    /// A worker token used a worker id outside its prefix.
    #[error(
        "token {token:?} may only act for worker ids starting with {prefix:?}, not {worker:?}"
    )]
    WrongWorkerId {
        /// The token's name.
        token: String,
        /// Its prefix.
        prefix: String,
        /// The id it used.
        worker: String,
    },
}

/// A problem in the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// Not readable.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid for the schema.
    #[error("token file {path}: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: String,
    secret_sha256: String,
    worker_id_prefix: Option<String>,
}

/// One token: a name, a role and the digest of its secret.
#[derive(Clone)]
pub struct Token {
    caller: Caller,
    digest: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").field("caller", &self.caller).finish_non_exhaustive()
    }
}

/// Looks up a replicated token by the digest of its secret: the caller, if the token exists
/// and has not expired by this node's clock.
pub type ReplicatedLookup = Arc<dyn Fn(&[u8; 32]) -> Option<Caller> + Send + Sync>;

/// The tokens a node accepts: its token file's, and (once the node runs) the replicated ones.
#[derive(Clone)]
pub struct Tokens {
    tokens: Vec<Token>,
    replicated: Option<ReplicatedLookup>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("file", &self.tokens)
            .field("replicated", &self.replicated.is_some())
            .finish()
    }
}

impl Tokens {
    /// Parses a token file's text (`[[token]]` tables with `name`, `role`, `secret_sha256`
    /// and, for workers, an optional `worker_id_prefix`).
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, TokenFileError> {
        let invalid = |reason: String| TokenFileError::Invalid { path: path.to_path_buf(), reason };
        let file: TokenFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if file.token.is_empty() {
            return Err(invalid(
                "no [[token]] entries: an empty file would lock everyone out".into(),
            ));
        }
        let mut names = BTreeSet::new();
        let mut tokens = Vec::new();
        for (i, t) in file.token.into_iter().enumerate() {
            let at = format!("token[{i}]");
            if !valid_token_name(&t.name) {
                return Err(invalid(format!(
                    "{at}.name {:?}: use 1-64 of [A-Za-z0-9._-@]",
                    t.name
                )));
            }
            if !names.insert(t.name.clone()) {
                return Err(invalid(format!("{at}.name {:?} appears twice", t.name)));
            }
            let role = Role::parse(&t.role).ok_or_else(|| {
                invalid(format!(
                    "{at}.role {:?}: expected admin, submitter, worker or reader",
                    t.role
                ))
            })?;
            let mut digest = [0u8; 32];
            hex::decode_to_slice(t.secret_sha256.trim(), &mut digest).map_err(|_| {
                invalid(format!(
                    "{at}.secret_sha256: expected 64 hex digits (the SHA-256 of the secret, e.g. from `schedctl token hash`)"
                ))
            })?;
            if t.worker_id_prefix.is_some() && role != Role::Worker {
                return Err(invalid(format!(
                    "{at}.worker_id_prefix is only for role \"worker\", not {role}"
                )));
            }
            tokens.push(Token {
                caller: Caller { name: t.name, role, worker_id_prefix: t.worker_id_prefix },
                digest,
            });
        }
        Ok(Tokens { tokens, replicated: None })
    }

    /// These tokens, and the replicated ones `lookup` finds (a file token wins a name clash;
    /// creating a replicated token with a file token's name is refused).
    pub fn with_replicated(mut self, lookup: ReplicatedLookup) -> Tokens {
        self.replicated = Some(lookup);
        self
    }

    /// The token file's tokens, by name and role.
    pub fn file_tokens(&self) -> impl Iterator<Item = &Caller> {
        self.tokens.iter().map(|t| &t.caller)
    }

    /// Whether the token file defines `name`.
    pub fn in_file(&self, name: &str) -> bool {
        self.tokens.iter().any(|t| t.caller.name == name)
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are none (a parsed file always has at least one).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Reads and parses a token file.
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenFileError::Read { path: path.to_path_buf(), source })?;
        Tokens::parse(&text, path)
    }

    /// The token whose secret this is. Every file token's digest is compared in constant
    /// time, so the time taken does not tell which (or whether a prefix) matched; replicated
    /// tokens are found by digest (a lookup keyed by a SHA-256 tells nothing about secrets).
    pub fn find(&self, secret: &str) -> Option<Caller> {
        let digest = proto::auth::secret_digest(secret);
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(&t.caller);
            }
        }
        match found {
            Some(c) => Some(c.clone()),
            None => self.replicated.as_ref().and_then(|lookup| lookup(&digest)),
        }
    }

    /// Authenticates a request to `path`, which needs `need` ([`need_of`]), with these
    /// headers: `Ok(None)` for an open or peer method, `Ok(Some(caller))` when allowed.
    pub fn check(
        &self,
        need: Need,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, AuthError> {
        if matches!(need, Need::Open | Need::Peer) {
            return Ok(None);
        }
        let header = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.authorize(header, need, path.trim_start_matches('/')).map(Some)
    }

    /// Checks an `authorization` header value (`Bearer <secret>`) for something that needs
    /// `need`; `what` names it in a refusal.
    pub fn authorize(
        &self,
        header: Option<&str>,
        need: Need,
        what: &str,
    ) -> Result<Caller, AuthError> {
        let secret = header.and_then(proto::auth::bearer_secret).ok_or(AuthError::Missing)?;
        let caller = self.find(secret).ok_or(AuthError::Unknown)?;
        if !need.allows(caller.role) {
            return Err(AuthError::Denied {
                token: caller.name.clone(),
                role: caller.role,
                method: what.to_string(),
                need: need.named(),
            });
        }
        Ok(caller)
    }
}

/// The caller of a tonic request, when authentication is on.
pub fn caller_of<T>(req: &tonic::Request<T>) -> Option<&Caller> {
    req.extensions().get::<Caller>()
}

/// Checks that the caller (if authentication is on) may act as worker `id`.
pub fn check_worker(caller: Option<&Caller>, id: &str) -> Result<(), AuthError> {
    let Some(c) = caller else { return Ok(()) };
    if c.may_be_worker(id) {
        return Ok(());
    }
    Err(AuthError::WrongWorkerId {
        token: c.name.clone(),
        prefix: c.worker_id_prefix.clone().unwrap_or_default(),
        worker: id.to_string(),
    })
}

/// A tower layer that authenticates every gRPC request before any service sees it.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<Tokens>>,
    peer_certs: bool,
}

impl AuthLayer {
    /// Checks requests against `tokens` (`None`: authentication off) and, with `peer_certs`
    /// (TLS on), peer RPCs against the connection's certificate.
    pub fn new(tokens: Option<Arc<Tokens>>, peer_certs: bool) -> Self {
        AuthLayer { tokens, peer_certs }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, tokens: self.tokens.clone(), peer_certs: self.peer_certs }
    }
}

/// The service [`AuthLayer`] wraps around the gRPC server.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
    peer_certs: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let need = need_of(path);
        let verdict = match (need, &self.tokens) {
            (Need::Peer, _) if self.peer_certs && !crate::tls::is_peer(req.extensions()) => {
                Err(AuthError::NotPeer { method: path.trim_start_matches('/').to_string() })
            }
            (_, Some(tokens)) => tokens.check(need, path, req.headers()),
            (_, None) => Ok(None),
        };
        match verdict {
            Ok(Some(caller)) => {
                req.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(e) => {
                let status = tonic::Status::from(crate::error::NodeError::from(e));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        // The clone is ready only after poll_ready; swap so the polled one is used.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::auth::secret_digest_hex;

    const FILE: &str = r#"
[[token]]
name = "ops"
role = "admin"
secret_sha256 = "SHA_ADMIN"

[[token]]
name = "ci"
role = "submitter"
secret_sha256 = "SHA_SUB"

[[token]]
name = "dash"
role = "reader"
secret_sha256 = "SHA_READ"

[[token]]
name = "gpu-pool"
role = "worker"
secret_sha256 = "SHA_WORK"
worker_id_prefix = "gpu-"
"#;

    fn tokens() -> Tokens {
        let text = FILE
            .replace("SHA_ADMIN", &secret_digest_hex("admin-secret"))
            .replace("SHA_SUB", &secret_digest_hex("sub-secret"))
            .replace("SHA_READ", &secret_digest_hex("read-secret"))
            .replace("SHA_WORK", &secret_digest_hex("work-secret"));
        Tokens::parse(&text, Path::new("tokens.toml")).unwrap()
    }

    fn check(t: &Tokens, path: &str, h: &http::HeaderMap) -> Result<Option<Caller>, AuthError> {
        t.check(need_of(path), path, h)
    }

    fn headers(secret: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(s) = secret {
            h.insert(http::header::AUTHORIZATION, format!("Bearer {s}").parse().unwrap());
        }
        h
    }

    /// Every public method and who may call it: (path, admin, submitter, reader, worker).
    const MATRIX: &[(&str, bool, bool, bool, bool)] = &[
        ("/scheduler.v1.Tasks/SubmitTasks", true, true, false, false),
        ("/scheduler.v1.Tasks/CancelTasks", true, true, false, false),
        ("/scheduler.v1.Tasks/GetTask", true, true, true, true),
        ("/scheduler.v1.Tasks/ListTasks", true, true, true, false),
        ("/scheduler.v1.Tasks/ExplainTask", true, true, true, false),
        ("/scheduler.v1.Tasks/WatchTask", true, true, true, false),
        ("/scheduler.v1.Tasks/WatchEvents", true, true, true, false),
        ("/scheduler.v1.Tasks/RetryTask", true, true, false, false),
        ("/scheduler.v1.Tasks/PauseQueue", true, false, false, false),
        ("/scheduler.v1.Tasks/ResumeQueue", true, false, false, false),
        ("/scheduler.v1.Tasks/ListQueues", true, true, true, false),
        ("/scheduler.v1.Workers/RegisterWorker", true, false, false, true),
        ("/scheduler.v1.Workers/OpenAssignments", true, false, false, true),
        ("/scheduler.v1.Workers/Heartbeat", true, false, false, true),
        ("/scheduler.v1.Workers/Report", true, false, false, true),
        ("/scheduler.v1.Workers/StartTask", true, false, false, true),
        ("/scheduler.v1.Workers/CompleteTask", true, false, false, true),
        ("/scheduler.v1.Workers/FailTask", true, false, false, true),
        ("/scheduler.v1.Workers/DrainWorker", true, false, false, true),
        ("/scheduler.v1.Workers/DeregisterWorker", true, false, false, true),
        ("/scheduler.v1.Workers/ListWorkers", true, true, true, false),
        ("/scheduler.v1.Workers/UndrainWorker", true, false, false, true),
        ("/scheduler.v1.Workers/RemoveWorker", true, false, false, false),
        ("/scheduler.v1.Cluster/InitCluster", true, false, false, false),
        ("/scheduler.v1.Cluster/Status", true, true, true, false),
        ("/scheduler.v1.Cluster/AddLearner", true, false, false, false),
        ("/scheduler.v1.Cluster/Promote", true, false, false, false),
        ("/scheduler.v1.Cluster/RemoveNode", true, false, false, false),
        ("/scheduler.v1.Cluster/TransferLeader", true, false, false, false),
        ("/scheduler.v1.Cluster/TriggerSnapshot", true, false, false, false),
        ("/scheduler.v1.Cluster/SaveSnapshot", true, false, false, false),
        ("/scheduler.v1.Cluster/CreateToken", true, false, false, false),
        ("/scheduler.v1.Cluster/ListTokens", true, false, false, false),
        ("/scheduler.v1.Cluster/RevokeToken", true, false, false, false),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", true, true, true, false),
    ];

    #[test]
    fn the_role_matrix() {
        let t = tokens();
        for (path, admin, sub, read, work) in MATRIX {
            for (secret, allowed) in [
                ("admin-secret", admin),
                ("sub-secret", sub),
                ("read-secret", read),
                ("work-secret", work),
            ] {
                let r = check(&t, path, &headers(Some(secret)));
                assert_eq!(r.is_ok(), *allowed, "{secret} on {path}: {r:?}");
                if let Err(e) = r {
                    assert!(matches!(e, AuthError::Denied { .. }), "{e:?}");
                    assert!(e.to_string().contains("needs"), "{e}");
                }
            }
            assert_eq!(check(&t, path, &headers(None)), Err(AuthError::Missing), "{path}");
            assert_eq!(check(&t, path, &headers(Some("guess"))), Err(AuthError::Unknown), "{path}");
        }
    }

    #[test]
    fn every_public_method_is_in_the_matrix() {
        let methods = public_methods();
        assert!(methods.len() >= 24, "the descriptor walk found too little: {methods:?}");
        for m in &methods {
            assert!(MATRIX.iter().any(|(p, ..)| p == m), "{m} has no row in the role matrix");
        }
    }

    /// Every `/scheduler.v1.Service/Method` in the compiled descriptor set.
    fn public_methods() -> Vec<String> {
        // The descriptor set is a FileDescriptorSet; walk it with a tiny protobuf reader of
        // the fields we need (file=1 → package=2, service=6 → name=1, method=2 → name=1).
        fn fields(mut b: &[u8]) -> Vec<(u32, &[u8])> {
            let mut out = Vec::new();
            while !b.is_empty() {
                let (key, n) = varint(b);
                b = &b[n..];
                match key & 7 {
                    0 => b = &b[varint(b).1..],
                    1 => b = &b[8..],
                    5 => b = &b[4..],
                    2 => {
                        let (len, n) = varint(b);
                        out.push(((key >> 3) as u32, &b[n..n + len as usize]));
                        b = &b[n + len as usize..];
                    }
                    w => panic!("wire type {w}"),
                }
            }
            out
        }
        fn varint(b: &[u8]) -> (u64, usize) {
            let mut v = 0u64;
            for (i, byte) in b.iter().enumerate() {
                v |= u64::from(byte & 0x7f) << (7 * i);
                if byte & 0x80 == 0 {
                    return (v, i + 1);
                }
            }
            panic!("truncated varint")
        }
        let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        let mut out = Vec::new();
        for (_, file) in fields(proto::FILE_DESCRIPTOR_SET).into_iter().filter(|(f, _)| *f == 1) {
            let fs = fields(file);
            let package = fs.iter().find(|(f, _)| *f == 2).map(|(_, b)| s(b)).unwrap_or_default();
            if package != "scheduler.v1" {
                continue;
            }
            for (_, svc) in fs.iter().filter(|(f, _)| *f == 6) {
                let sf = fields(svc);
                let name = sf.iter().find(|(f, _)| *f == 1).map(|(_, b)| s(b)).unwrap();
                for (_, m) in sf.iter().filter(|(f, _)| *f == 2) {
                    let mname = fields(m).iter().find(|(f, _)| *f == 1).map(|(_, b)| s(b)).unwrap();
                    out.push(format!("/{package}.{name}/{mname}"));
                }
            }
        }
        out
    }

    #[test]
    fn health_and_peer_methods_need_no_token_and_unknown_methods_do() {
        let t = tokens();
        assert_eq!(check(&t, "/grpc.health.v1.Health/Check", &headers(None)), Ok(None));
        assert_eq!(check(&t, "/raftsched.internal.v1.RaftService/Vote", &headers(None)), Ok(None));
        assert_eq!(check(&t, "/scheduler.v1.Tasks/Nope", &headers(None)), Err(AuthError::Missing));
        assert_eq!(check(&t, "garbage", &headers(None)), Err(AuthError::Missing));
    }

    #[test]
    fn worker_tokens_are_held_to_their_prefix() {
        let t = tokens();
        let w = t.find("work-secret").unwrap();
        assert!(check_worker(Some(&w), "gpu-7").is_ok());
        let e = check_worker(Some(&w), "cpu-1").unwrap_err();
        assert!(e.to_string().contains("\"gpu-\""), "{e}");
        let admin = t.find("admin-secret").unwrap();
        assert!(check_worker(Some(&admin), "anything").is_ok());
        assert!(check_worker(Some(&t.find("sub-secret").unwrap()), "gpu-1").is_err());
        assert!(check_worker(None, "anything").is_ok(), "authentication off");
        // Fences: the admin and the workers that may act for the holder, nobody else.
        assert!(w.sees_fence_of("gpu-7") && !w.sees_fence_of("cpu-1"));
        assert!(admin.sees_fence_of("cpu-1"));
        assert!(!t.find("read-secret").unwrap().sees_fence_of("gpu-7"));
        assert!(!t.find("sub-secret").unwrap().sees_fence_of("gpu-7"));
    }

    #[test]
    fn bad_files_are_named() {
        let p = Path::new("t.toml");
        let h = secret_digest_hex("x");
        for (text, needle) in [
            ("", "no [[token]]"),
            ("[[token]]\nname='a'\nrole='root'\nsecret_sha256='00'", "token[0].role"),
            ("[[token]]\nname='a'\nrole='admin'\nsecret_sha256='zz'", "token[0].secret_sha256"),
            (&format!("[[token]]\nname='a b'\nrole='admin'\nsecret_sha256='{h}'"), "token[0].name"),
            (
                &format!("[[token]]\nname='a'\nrole='admin'\nsecret_sha256='{h}'\n[[token]]\nname='a'\nrole='reader'\nsecret_sha256='{h}'"),
                "appears twice",
            ),
            (
                &format!("[[token]]\nname='a'\nrole='admin'\nsecret_sha256='{h}'\nworker_id_prefix='x'"),
                "worker_id_prefix",
            ),
            (&format!("[[token]]\nname='a'\nrole='admin'\nsecret='{h}'"), "unknown field"),
        ] {
            let e = Tokens::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let t = tokens();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&secret_digest_hex("admin-secret")), "{dbg}");
        assert!(!dbg.contains("admin-secret"), "{dbg}");
    }
}
