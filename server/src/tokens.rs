//! Join tokens: creation, listing, revocation, extension, and the checks a join
//! must pass. The server keeps only the SHA-256 of each secret.

use std::collections::BTreeMap;

use flotilla_proto::limits;
use flotilla_proto::token::{self, JoinToken};

use crate::error::{Error, Result};
use crate::model::{TokenRecord, keys, now_secs};
use crate::store::{Db, Update};

/// What an operator asks for.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub group: String,
    pub ttl_secs: u64,
    pub max_uses: u32,
    pub labels: BTreeMap<String, String>,
    pub requires_approval: bool,
    pub description: String,
    /// See `TokenRecord::clones_new_node`.
    pub clones_new_node: bool,
}

pub const DEFAULT_TTL_SECS: u64 = 24 * 3600;

impl TokenSpec {
    pub fn validate(&mut self) -> Result<()> {
        limits::check_name("group", &self.group, limits::MAX_GROUP_NAME_LEN)?;
        limits::check_labels(self.labels.iter())?;
        limits::check_text(
            "description",
            &self.description,
            limits::MAX_DESCRIPTION_LEN,
        )?;
        if self.ttl_secs == 0 {
            self.ttl_secs = DEFAULT_TTL_SECS;
        }
        if self.ttl_secs > limits::MAX_TOKEN_TTL_SECS {
            return Err(Error::InvalidArgument(format!(
                "token lifetime {} is longer than the limit of {}",
                secs_text(self.ttl_secs),
                secs_text(limits::MAX_TOKEN_TTL_SECS)
            )));
        }
        if self.max_uses == 0 {
            self.max_uses = 1;
        }
        if self.max_uses > limits::MAX_TOKEN_USES {
            return Err(Error::InvalidArgument(format!(
                "max uses {} is above the limit of {}",
                self.max_uses,
                limits::MAX_TOKEN_USES
            )));
        }
        Ok(())
    }
}

/// Creates a token bound to the CA with `ca_fingerprint` (and pinning the
/// trust policy with `trust_sha256`, if given). Returns the full token (shown
/// once) and its record.
pub async fn create(
    db: &Db,
    mut spec: TokenSpec,
    ca_fingerprint: &str,
    trust_sha256: Option<&str>,
    created_by: &str,
) -> Result<(JoinToken, TokenRecord)> {
    spec.validate()?;
    loop {
        let token = JoinToken::generate(ca_fingerprint, trust_sha256);
        let now = now_secs();
        let rec = TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            group: spec.group.clone(),
            created_at: now,
            expires_at: now + spec.ttl_secs as i64,
            max_uses: spec.max_uses,
            uses: 0,
            labels: spec.labels.clone(),
            requires_approval: spec.requires_approval,
            revoked: false,
            description: spec.description.clone(),
            created_by: created_by.to_string(),
            trust_sha256: trust_sha256.unwrap_or_default().to_string(),
            clones_new_node: spec.clones_new_node,
        };
        if db.create(&keys::token(&rec.id), &rec).await? {
            return Ok((token, rec));
        }
    }
}

pub async fn list(db: &Db) -> Result<Vec<TokenRecord>> {
    Ok(db.list(keys::TOKENS).await?)
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no join token with id {id}"))
}

pub async fn revoke(db: &Db, id: &str) -> Result<TokenRecord> {
    let r = db
        .update(&keys::token(id), |cur: Option<TokenRecord>| {
            let mut t = cur.ok_or_else(|| not_found(id))?;
            if t.revoked {
                return Ok::<_, Error>(Update::Keep);
            }
            t.revoked = true;
            Ok(Update::Put(t))
        })
        .await??;
    r.ok_or_else(|| not_found(id))
}

pub async fn extend(db: &Db, id: &str, ttl_secs: u64, max_uses: u32) -> Result<TokenRecord> {
    if ttl_secs == 0 || ttl_secs > limits::MAX_TOKEN_TTL_SECS {
        return Err(Error::InvalidArgument(format!(
            "the new lifetime must be between 1s and {}",
            secs_text(limits::MAX_TOKEN_TTL_SECS)
        )));
    }
    if max_uses > limits::MAX_TOKEN_USES {
        return Err(Error::InvalidArgument(format!(
            "max uses {max_uses} is above the limit of {}",
            limits::MAX_TOKEN_USES
        )));
    }
    let r = db
        .update(&keys::token(id), |cur: Option<TokenRecord>| {
            let mut t = cur.ok_or_else(|| not_found(id))?;
            if t.revoked {
                return Err(Error::FailedPrecondition(format!(
                    "join token {id} was revoked; create a new one"
                )));
            }
            t.expires_at = now_secs() + ttl_secs as i64;
            if max_uses > 0 {
                t.max_uses = max_uses;
            }
            Ok::<_, Error>(Update::Put(t))
        })
        .await??;
    r.ok_or_else(|| not_found(id))
}

/// Seconds as the `--ttl` flag takes them: "400d", "366d", "1d 12h", "90m".
fn secs_text(secs: u64) -> String {
    let (d, rest) = (secs / 86_400, secs % 86_400);
    match (d, rest) {
        (0, _) => humantime::format_duration(std::time::Duration::from_secs(secs)).to_string(),
        (d, 0) => format!("{d}d"),
        (d, r) => format!("{d}d {}h", r / 3600),
    }
}

/// Compares two hex digests in time independent of where they differ.
pub(crate) fn digest_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Checks a join's token without using it up: unknown, wrong secret, revoked,
/// expired and used up each get their own message.
pub fn check(rec: Option<&TokenRecord>, id: &str, secret: &str, now: i64) -> Result<()> {
    let rec = rec.ok_or_else(|| Error::Unauthenticated(format!("unknown join token {id}")))?;
    let hash = flotilla_proto::sha256_hex(secret.as_bytes());
    // The secret is checked first so a forger learns nothing about the token's state.
    if !digest_eq(&hash, &rec.secret_sha256) {
        return Err(Error::Unauthenticated(format!(
            "join token {id}: the secret does not match (a forged or mistyped token)"
        )));
    }
    if rec.revoked {
        return Err(Error::PermissionDenied(format!(
            "join token {id} has been revoked; ask an operator for a new one"
        )));
    }
    if now >= rec.expires_at {
        return Err(Error::PermissionDenied(format!(
            "join token {id} expired at {}; ask an operator for a new one or to extend it",
            flotilla_proto::when::unix_secs(rec.expires_at)
        )));
    }
    if rec.uses >= rec.max_uses {
        return Err(Error::ResourceExhausted(format!(
            "join token {id} is used up ({} of {} joins); ask an operator for a new one",
            rec.uses, rec.max_uses
        )));
    }
    Ok(())
}

/// Checks the token and counts one use, atomically.
pub async fn consume(db: &Db, id: &str, secret: &str) -> Result<TokenRecord> {
    if !token::is_valid_id(id) {
        return Err(Error::Unauthenticated(format!("unknown join token {id:?}")));
    }
    let r = db
        .update(&keys::token(id), |cur: Option<TokenRecord>| {
            check(cur.as_ref(), id, secret, now_secs())?;
            let mut t = cur.expect("checked above");
            t.uses += 1;
            Ok::<_, Error>(Update::Put(t))
        })
        .await??;
    r.ok_or_else(|| Error::Internal("token vanished while joining".into()))
}

/// Reads a token for a check that does not use it.
pub async fn get(db: &Db, id: &str) -> Result<Option<TokenRecord>> {
    if !token::is_valid_id(id) {
        return Ok(None);
    }
    Ok(db.get(&keys::token(id)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(secret: &str) -> TokenRecord {
        TokenRecord {
            id: "abcdefghij".into(),
            secret_sha256: flotilla_proto::sha256_hex(secret.as_bytes()),
            group: "g".into(),
            created_at: 0,
            expires_at: 100,
            max_uses: 2,
            uses: 0,
            labels: BTreeMap::new(),
            requires_approval: false,
            revoked: false,
            description: String::new(),
            created_by: "t".into(),
            trust_sha256: String::new(),
            clones_new_node: false,
        }
    }

    #[test]
    fn each_refusal_has_its_own_message() {
        let ok = rec("s3cret");
        assert!(check(Some(&ok), "abcdefghij", "s3cret", 50).is_ok());
        let e = check(None, "abcdefghij", "s3cret", 50).unwrap_err();
        assert!(e.to_string().contains("unknown join token"), "{e}");
        let e = check(Some(&ok), "abcdefghij", "wrong", 50).unwrap_err();
        assert!(e.to_string().contains("secret does not match"), "{e}");
        let e = check(Some(&ok), "abcdefghij", "s3cret", 100).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        let mut used = ok.clone();
        used.uses = 2;
        let e = check(Some(&used), "abcdefghij", "s3cret", 50).unwrap_err();
        assert!(e.to_string().contains("used up (2 of 2"), "{e}");
        let mut revoked = ok.clone();
        revoked.revoked = true;
        let e = check(Some(&revoked), "abcdefghij", "s3cret", 50).unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
        // A wrong secret never reveals that the token is revoked.
        let e = check(Some(&revoked), "abcdefghij", "wrong", 50).unwrap_err();
        assert!(!e.to_string().contains("revoked"), "{e}");
    }

    #[test]
    fn spec_defaults_and_limits() {
        let mut s = TokenSpec {
            group: "store-eu".into(),
            ttl_secs: 0,
            max_uses: 0,
            labels: BTreeMap::new(),
            requires_approval: false,
            description: String::new(),
            clones_new_node: false,
        };
        s.validate().unwrap();
        assert_eq!((s.ttl_secs, s.max_uses), (DEFAULT_TTL_SECS, 1));
        s.group = "../x".into();
        assert!(s.validate().is_err());
    }

    /// Joins racing from several servers on one store (each its own
    /// connection, as replicas have) for a token of 5 uses: exactly 5 win.
    async fn racing_joins_use_a_token_exactly(dbs: Vec<Db>) {
        let spec = TokenSpec {
            group: "g".into(),
            ttl_secs: 600,
            max_uses: 5,
            labels: BTreeMap::new(),
            requires_approval: false,
            description: String::new(),
            clones_new_node: false,
        };
        let (token, _) = create(&dbs[0], spec, "00", None, "t").await.unwrap();
        let joins = (0..10).map(|i| {
            let db = dbs[i % dbs.len()].clone();
            let (id, secret) = (token.id.clone(), token.secret.clone());
            tokio::spawn(async move { consume(&db, &id, &secret).await })
        });
        let results = futures::future::join_all(joins).await;
        let won = results
            .iter()
            .filter(|r| r.as_ref().unwrap().is_ok())
            .count();
        assert_eq!(won, 5);
        for r in results {
            if let Err(e) = r.unwrap() {
                assert!(e.to_string().contains("used up"), "{e}");
            }
        }
        assert_eq!(get(&dbs[1], &token.id).await.unwrap().unwrap().uses, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_joins_on_sled_use_a_token_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(std::sync::Arc::new(
            crate::store::SledStore::open(dir.path()).unwrap(),
        ));
        racing_joins_use_a_token_exactly(vec![db.clone(), db]).await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_joins_on_three_etcd_connections_use_a_token_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let member = flotilla_e2e::etcd::Etcd::start(dir.path());
        let mut dbs = Vec::new();
        for _ in 0..3 {
            let s = crate::store::etcd_store::connect_when_up(&member.url, "/tokens/").await;
            dbs.push(Db::new(std::sync::Arc::new(s)));
        }
        racing_joins_use_a_token_exactly(dbs).await;
    }
}
