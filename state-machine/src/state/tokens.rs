//! Replicated API tokens: create (idempotent for an identical retry) and revoke.
//!
//! Invariants: names are unique; so are secret digests (one secret names one token, or the
//! node could not tell who called); at most [`MAX_TOKENS`] are stored; a prefix only on
//! worker tokens. Expiry is a stored log time; the node compares it with its own clock when a
//! request arrives (apply never reads a clock).

use super::SchedulerState;
use crate::command::{NewToken, Output, Response};
use crate::error::Rejection;
use crate::model::{ApiToken, Millis, Role};
use crate::record::RecordKey;

/// Most replicated tokens a cluster keeps (revoke unused ones to make room).
pub const MAX_TOKENS: usize = 10_000;

/// Longest token lifetime: ten years.
pub const MAX_TOKEN_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A token name: 1-64 of `[A-Za-z0-9._-@]` (the same rule as token files).
pub fn valid_token_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
}

fn check(t: &NewToken) -> Result<(), Rejection> {
    if !valid_token_name(&t.name) {
        return Err(Rejection::invalid("name", "use 1-64 of [A-Za-z0-9._-@]"));
    }
    if let Some(p) = &t.worker_id_prefix {
        if t.role != Role::Worker {
            return Err(Rejection::invalid(
                "worker_id_prefix",
                format!("is only for role worker, not {}", t.role),
            ));
        }
        if p.is_empty() || p.len() > 128 {
            return Err(Rejection::invalid("worker_id_prefix", "use 1-128 bytes"));
        }
    }
    match t.ttl_ms {
        Some(0) => Err(Rejection::invalid("ttl", "must be positive (omit it for no expiry)")),
        Some(ms) if ms > MAX_TOKEN_TTL_MS => Err(Rejection::limit("ttl_ms", MAX_TOKEN_TTL_MS, ms)),
        _ => Ok(()),
    }
}

impl SchedulerState {
    /// A replicated token by name.
    pub fn token(&self, name: &str) -> Option<&ApiToken> {
        self.tokens.get(name)
    }

    /// The replicated token with this secret digest.
    pub fn token_by_digest(&self, digest: &[u8; 32]) -> Option<&ApiToken> {
        self.token_digests.get(digest).and_then(|n| self.tokens.get(n))
    }

    /// Every replicated token, by name.
    pub fn tokens(&self) -> impl Iterator<Item = &ApiToken> {
        self.tokens.values()
    }

    pub(super) fn create_token(&mut self, now: Millis, t: &NewToken) -> Response {
        check(t)?;
        if let Some(old) = self.tokens.get(&t.name) {
            let same = old.role == t.role
                && old.secret_sha256 == t.secret_sha256
                && old.worker_id_prefix == t.worker_id_prefix;
            return if same {
                Ok(Output::TokenCreated { token: old.clone(), created: false })
            } else {
                Err(Rejection::TokenExists { name: t.name.clone() })
            };
        }
        if self.token_digests.contains_key(&t.secret_sha256) {
            return Err(Rejection::invalid(
                "secret_sha256",
                "another token has this secret; generate a new one",
            ));
        }
        if self.tokens.len() >= MAX_TOKENS {
            return Err(Rejection::limit(
                "tokens",
                MAX_TOKENS as u64,
                self.tokens.len() as u64 + 1,
            ));
        }
        let token = ApiToken {
            name: t.name.clone(),
            role: t.role,
            secret_sha256: t.secret_sha256,
            worker_id_prefix: t.worker_id_prefix.clone(),
            created_at: now,
            expires_at: t.ttl_ms.map(|ttl| now.saturating_add(ttl)),
        };
        self.token_digests.insert(token.secret_sha256, token.name.clone());
        self.tokens.insert(token.name.clone(), token.clone());
        self.touch(RecordKey::Token(token.name.clone()));
        Ok(Output::TokenCreated { token, created: true })
    }

    pub(super) fn revoke_token(&mut self, name: &str) -> Response {
        let t = self
            .tokens
            .remove(name)
            .ok_or_else(|| Rejection::TokenNotFound { name: name.to_string() })?;
        self.token_digests.remove(&t.secret_sha256);
        self.touch(RecordKey::Token(t.name));
        Ok(Output::TokenRevoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Op};
    use crate::record::StateLoader;

    fn new(name: &str, role: Role, secret: u8) -> NewToken {
        NewToken {
            name: name.into(),
            role,
            secret_sha256: [secret; 32],
            worker_id_prefix: None,
            ttl_ms: None,
        }
    }

    fn apply(s: &mut SchedulerState, now: Millis, op: Op) -> Response {
        s.apply(&Command::new(now, op))
    }

    #[test]
    fn create_is_idempotent_and_names_and_secrets_are_unique() {
        let mut s = SchedulerState::new();
        let ci = new("ci", Role::Submitter, 1);
        let first = apply(&mut s, 10, Op::CreateToken { token: ci.clone() }).unwrap();
        assert!(matches!(first, Output::TokenCreated { created: true, .. }));
        let again = apply(&mut s, 20, Op::CreateToken { token: ci.clone() }).unwrap();
        let Output::TokenCreated { token, created } = again else { panic!("{again:?}") };
        assert!(!created);
        assert_eq!(token.created_at, 10, "a retried create changes nothing");
        let other = NewToken { role: Role::Admin, ..ci.clone() };
        assert_eq!(
            apply(&mut s, 30, Op::CreateToken { token: other }),
            Err(Rejection::TokenExists { name: "ci".into() })
        );
        let same_secret = new("ci2", Role::Reader, 1);
        let e = apply(&mut s, 30, Op::CreateToken { token: same_secret }).unwrap_err();
        assert!(e.to_string().contains("secret_sha256"), "{e}");
        assert_eq!(s.token_by_digest(&[1; 32]).map(|t| t.name.as_str()), Some("ci"));
    }

    #[test]
    fn bad_tokens_are_refused_naming_the_field() {
        let mut s = SchedulerState::new();
        let cases = [
            (new("", Role::Reader, 1), "name"),
            (new("a b", Role::Reader, 1), "name"),
            (
                NewToken { worker_id_prefix: Some("gpu-".into()), ..new("p", Role::Reader, 1) },
                "worker_id_prefix",
            ),
            (NewToken { ttl_ms: Some(0), ..new("t", Role::Reader, 1) }, "ttl"),
            (NewToken { ttl_ms: Some(u64::MAX), ..new("t", Role::Reader, 1) }, "ttl_ms"),
        ];
        for (t, field) in cases {
            let e = apply(&mut s, 1, Op::CreateToken { token: t }).unwrap_err();
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
        assert_eq!(s.tokens().count(), 0, "nothing refused was stored");
    }

    #[test]
    fn revoke_removes_the_token_and_its_secret_and_expiry_is_stored() {
        let mut s = SchedulerState::new();
        let t = NewToken { ttl_ms: Some(1_000), ..new("short", Role::Reader, 7) };
        apply(&mut s, 100, Op::CreateToken { token: t }).unwrap();
        let stored = s.token("short").unwrap().clone();
        assert_eq!(stored.expires_at, Some(1_100));
        assert!(!stored.expired_at(1_099) && stored.expired_at(1_100));
        assert_eq!(
            apply(&mut s, 200, Op::RevokeToken { name: "short".into() }),
            Ok(Output::TokenRevoked)
        );
        assert!(s.token_by_digest(&[7; 32]).is_none());
        assert_eq!(
            apply(&mut s, 300, Op::RevokeToken { name: "short".into() }),
            Err(Rejection::TokenNotFound { name: "short".into() })
        );
    }

    #[test]
    fn tokens_survive_a_rebuild_from_records() {
        let mut s = SchedulerState::new();
        apply(&mut s, 5, Op::CreateToken { token: new("ops", Role::Admin, 3) }).unwrap();
        let w = NewToken { worker_id_prefix: Some("gpu-".into()), ..new("gpu", Role::Worker, 4) };
        apply(&mut s, 6, Op::CreateToken { token: w }).unwrap();
        let changed = s.take_changes().records;
        assert!(changed.contains(&RecordKey::Token("ops".into())));
        let mut loader = StateLoader::new();
        for (k, v) in s.records() {
            loader.add(&k.encode(), &v.encode()).unwrap();
        }
        let back = loader.finish();
        assert_eq!(back.digest(), s.digest());
        assert_eq!(
            back.token_by_digest(&[4; 32]).unwrap().worker_id_prefix.as_deref(),
            Some("gpu-")
        );
    }
}
