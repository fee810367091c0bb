//! The credential contract shared by servers and clients: how a token's secret travels and
//! how token files record it.
//!
//! A client sends `authorization: Bearer <secret>`. Token files and the replicated token
//! store keep only the SHA-256 of the secret, as 64 lowercase hex digits, so reading them
//! does not reveal a usable credential.

use sha2::{Digest, Sha256};

/// The metadata key carrying the credential.
pub const AUTHORIZATION_KEY: &str = "authorization";

/// The SHA-256 of a secret.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The SHA-256 of a secret as token files write it (lowercase hex).
pub fn secret_digest_hex(secret: &str) -> String {
    hex::encode(secret_digest(secret))
}

/// The secret of an `authorization` value (`Bearer <secret>`, scheme case-insensitive).
pub fn bearer_secret(value: &str) -> Option<&str> {
    let (scheme, secret) = value.trim().split_once(' ')?;
    let secret = secret.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty()).then_some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_hex() {
        // SHA-256("abc"), from FIPS 180-2.
        assert_eq!(
            secret_digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_values_parse_strictly() {
        assert_eq!(bearer_secret("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_secret("bearer  s3cret "), Some("s3cret"));
        for bad in ["", "Bearer", "Bearer ", "Basic abc", "s3cret"] {
            assert_eq!(bearer_secret(bad), None, "{bad:?}");
        }
    }
}
