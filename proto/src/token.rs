//! Join tokens: `flt1.<id>.<secret>.<ca-sha256>[.<trust-sha256>]`.
//!
//! The id is public (it names the token in lists and logs), the secret proves the
//! holder may join (the server keeps only its SHA-256), and the CA fingerprint lets
//! an agent check it reached the right server before it sends the secret. The
//! optional trust hash pins the fleet's patch-signing trust policy: an agent
//! joined with it takes its keys from the server only if they hash to it.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

const PREFIX: &str = "flt1";
/// Length of a token id.
pub const ID_LEN: usize = 10;
/// Length of a token secret.
pub const SECRET_LEN: usize = 32;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id.
    pub id: String,
    /// Secret; never logged.
    pub secret: String,
    /// Lower-case hex SHA-256 of the server CA certificate (DER).
    pub ca_fingerprint: String,
    /// Lower-case hex SHA-256 of the trust policy to take at join
    /// (`flotilla_proto::trust::policy_sha256`), if the token pins one.
    pub trust_sha256: Option<String>,
}

// The secret stays out of debug output and logs.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("trust_sha256", &self.trust_sha256)
            .finish_non_exhaustive()
    }
}

/// Why a token string was refused before any network call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("join token must look like flt1.<id>.<secret>.<ca-fingerprint>[.<trust-hash>]")]
    Shape,
    #[error("join token id must be {ID_LEN} characters of a-z0-9")]
    Id,
    #[error("join token secret must be {SECRET_LEN} characters of a-z0-9")]
    Secret,
    #[error("join token CA fingerprint must be 64 lower-case hex characters")]
    Fingerprint,
    #[error("join token trust policy hash must be 64 lower-case hex characters")]
    TrustHash,
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// A random string of `len` characters from a-z0-9.
pub fn random_string(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Whether `id` has the shape of a token id.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.chars().all(is_token_char)
}

impl JoinToken {
    /// A fresh token bound to the CA with `ca_fingerprint`, pinning the trust
    /// policy with `trust_sha256` if given.
    pub fn generate(ca_fingerprint: &str, trust_sha256: Option<&str>) -> Self {
        Self {
            id: random_string(ID_LEN),
            secret: random_string(SECRET_LEN),
            ca_fingerprint: ca_fingerprint.to_string(),
            trust_sha256: trust_sha256.map(str::to_string),
        }
    }

    /// Hex SHA-256 of the secret: what the server stores.
    pub fn secret_hash(&self) -> String {
        crate::sha256_hex(self.secret.as_bytes())
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )?;
        match &self.trust_sha256 {
            Some(t) => write!(f, ".{t}"),
            None => Ok(()),
        }
    }
}

impl FromStr for JoinToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let (prefix, id, secret, fp, trust) = match parts.as_slice() {
            [prefix, id, secret, fp] => (prefix, id, secret, fp, None),
            [prefix, id, secret, fp, trust] => (prefix, id, secret, fp, Some(*trust)),
            _ => return Err(TokenFormatError::Shape),
        };
        if *prefix != PREFIX {
            return Err(TokenFormatError::Shape);
        }
        if !is_valid_id(id) {
            return Err(TokenFormatError::Id);
        }
        if secret.len() != SECRET_LEN || !secret.chars().all(is_token_char) {
            return Err(TokenFormatError::Secret);
        }
        if !is_sha256_hex(fp) {
            return Err(TokenFormatError::Fingerprint);
        }
        if trust.is_some_and(|t| !is_sha256_hex(t)) {
            return Err(TokenFormatError::TrustHash);
        }
        Ok(Self {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_fingerprint: fp.to_string(),
            trust_sha256: trust.map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = JoinToken::generate(&"ab".repeat(32), None);
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&t.secret));
        let pinned = JoinToken::generate(&"ab".repeat(32), Some(&"cd".repeat(32)));
        assert_eq!(pinned.to_string().split('.').count(), 5);
        assert_eq!(pinned.to_string().parse::<JoinToken>().unwrap(), pinned);
    }

    #[test]
    fn refuses_bad_shapes() {
        let fp = "0".repeat(64);
        let ok = format!("flt1.abcdefghij.{}.{fp}", "a".repeat(32));
        assert!(ok.parse::<JoinToken>().is_ok());
        assert_eq!("abc.def".parse::<JoinToken>(), Err(TokenFormatError::Shape));
        assert_eq!(
            format!("flt2.abcdefghij.{}.{fp}", "a".repeat(32)).parse::<JoinToken>(),
            Err(TokenFormatError::Shape)
        );
        assert_eq!(
            format!("flt1.ABCDEFGHIJ.{}.{fp}", "a".repeat(32)).parse::<JoinToken>(),
            Err(TokenFormatError::Id)
        );
        assert_eq!(
            format!("flt1.abcdefghij.short.{fp}").parse::<JoinToken>(),
            Err(TokenFormatError::Secret)
        );
        assert_eq!(
            format!("flt1.abcdefghij.{}.xyz", "a".repeat(32)).parse::<JoinToken>(),
            Err(TokenFormatError::Fingerprint)
        );
        assert_eq!(
            format!("flt1.abcdefghij.{}.{fp}.XYZ", "a".repeat(32)).parse::<JoinToken>(),
            Err(TokenFormatError::TrustHash)
        );
        assert_eq!(
            format!("flt1.abcdefghij.{}.{fp}.{fp}.{fp}", "a".repeat(32)).parse::<JoinToken>(),
            Err(TokenFormatError::Shape)
        );
    }
}
