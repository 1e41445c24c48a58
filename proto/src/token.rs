//! Join tokens: `flt1.<id>.<secret>.<ca-sha256>`.
//!
//! The id is public (it names the token in lists and logs), the secret proves the
//! holder may join (the server keeps only its SHA-256), and the CA fingerprint lets
//! an agent check it reached the right server before it sends the secret.

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
}

// The secret stays out of debug output and logs.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why a token string was refused before any network call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("join token must look like flt1.<id>.<secret>.<ca-fingerprint>")]
    Shape,
    #[error("join token id must be {ID_LEN} characters of a-z0-9")]
    Id,
    #[error("join token secret must be {SECRET_LEN} characters of a-z0-9")]
    Secret,
    #[error("join token CA fingerprint must be 64 lower-case hex characters")]
    Fingerprint,
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
    /// A fresh token bound to the CA with `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> Self {
        Self {
            id: random_string(ID_LEN),
            secret: random_string(SECRET_LEN),
            ca_fingerprint: ca_fingerprint.to_string(),
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
        )
    }
}

impl FromStr for JoinToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, id, secret, fp] = parts.as_slice() else {
            return Err(TokenFormatError::Shape);
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
        if fp.len() != 64 || !fp.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(TokenFormatError::Fingerprint);
        }
        Ok(Self {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_fingerprint: fp.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = JoinToken::generate(&"ab".repeat(32));
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&t.secret));
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
    }
}
