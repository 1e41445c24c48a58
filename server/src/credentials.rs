//! Operator credentials: `<id>.<secret>` bearer strings the server issues, each
//! with one role. The server keeps only the SHA-256 of the secret.

use flotilla_proto::limits;
use flotilla_proto::token::random_string;

use crate::error::{Error, Result};
use crate::model::{CredentialRecord, OperatorRole, keys, now_secs};
use serde::{Deserialize, Serialize};

use crate::store::{Db, Update};

/// The caller of an admin call, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: OperatorRole,
}

/// A caller this process has already authenticated (a dashboard session),
/// carried in a request's extensions to the admin calls made on its behalf.
/// Only the server itself fills extensions: nothing from the network can.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Caller);

impl Caller {
    /// Refuses with PermissionDenied unless the caller's role allows `needed`.
    pub fn require(&self, needed: OperatorRole) -> Result<()> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "credential {:?} has role {}; this needs role {}",
                self.name,
                self.role.as_str(),
                needed.as_str()
            )))
        }
    }
}

/// How long a name claim may stand without its credential record before it is
/// taken for the leftover of a create that crashed between the two writes. A
/// create takes milliseconds between them.
const ORPHAN_CLAIM_MS: i64 = 60_000;

/// Who holds a credential name.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NameClaim {
    id: String,
    at_ms: i64,
}

/// Longest lifetime a credential may be given: ten years.
const MAX_TTL_SECS: u64 = 10 * 366 * 24 * 3600;

fn expiry(ttl_secs: u64) -> Result<i64> {
    match ttl_secs {
        0 => Ok(0),
        t if t > MAX_TTL_SECS => Err(Error::InvalidArgument(format!(
            "a credential lifetime of {t}s is longer than ten years"
        ))),
        t => Ok(now_secs() + t as i64),
    }
}

/// Creates a credential (expiring `ttl_secs` from now; 0: never); returns
/// the bearer string (shown once) and its record. The name is claimed first
/// with a compare-and-swap, so of two creates of one name at once exactly one
/// succeeds.
pub async fn create(
    db: &Db,
    name: &str,
    role: OperatorRole,
    ttl_secs: u64,
) -> Result<(String, CredentialRecord)> {
    let expires_at = expiry(ttl_secs)?;
    limits::check_name("credential name", name, limits::MAX_GROUP_NAME_LEN)?;
    let exists =
        || Error::FailedPrecondition(format!("a credential named {name:?} already exists"));
    // Credentials from before names were claimed have no claim.
    if list(db).await?.iter().any(|c| c.name == name) {
        return Err(exists());
    }
    let mut id = random_string(10);
    while db
        .get::<CredentialRecord>(&keys::credential(&id))
        .await?
        .is_some()
    {
        id = random_string(10);
    }
    let claim_key = keys::credential_name(name);
    let now = crate::model::now_ms();
    // A claim left by a crashed create may be taken over; any other means the
    // name is held.
    let mut orphan = None;
    if let Some(held) = db.get::<NameClaim>(&claim_key).await? {
        let record = db
            .get::<CredentialRecord>(&keys::credential(&held.id))
            .await?;
        if record.is_some() || now - held.at_ms <= ORPHAN_CLAIM_MS {
            return Err(exists());
        }
        orphan = Some(held.id);
    }
    let claim = NameClaim {
        id: id.clone(),
        at_ms: now,
    };
    db.update(&claim_key, |cur: Option<NameClaim>| match cur {
        Some(c) if Some(&c.id) != orphan.as_ref() => Err(exists()),
        _ => Ok(Update::Put(claim.clone())),
    })
    .await??;
    let secret = random_string(32);
    let rec = CredentialRecord {
        id: id.clone(),
        name: name.to_string(),
        role,
        secret_sha256: flotilla_proto::sha256_hex(secret.as_bytes()),
        created_at: now_secs(),
        revoked: false,
        expires_at,
        ttl_secs,
        rotated_at: 0,
    };
    if !db.create(&keys::credential(&id), &rec).await? {
        return Err(Error::Internal(format!(
            "credential id {id} was taken while it was being created"
        )));
    }
    Ok((format!("{id}.{secret}"), rec))
}

pub async fn list(db: &Db) -> Result<Vec<CredentialRecord>> {
    Ok(db.list(keys::CREDENTIALS).await?)
}

/// The id part of a bearer string, if it has the shape of one (what failed
/// attempts are counted against).
pub fn bearer_id(bearer: &str) -> Option<&str> {
    let (id, _) = bearer.split_once('.')?;
    (id.len() == 10 && id.chars().all(|c| c.is_ascii_alphanumeric())).then_some(id)
}

/// Authenticates a bearer string.
pub async fn authenticate(db: &Db, bearer: &str) -> Result<Caller> {
    let bad = || {
        Error::Unauthenticated(
            "the operator credential is not valid (check --credential or FLOTILLA_CREDENTIAL)"
                .into(),
        )
    };
    let (id, secret) = bearer.split_once('.').ok_or_else(bad)?;
    if id.len() != 10 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    let rec: CredentialRecord = db.get(&keys::credential(id)).await?.ok_or_else(bad)?;
    let hash = flotilla_proto::sha256_hex(secret.as_bytes());
    if !crate::tokens::digest_eq(&hash, &rec.secret_sha256) {
        return Err(bad());
    }
    still_valid(rec)
}

/// The caller a credential id stands for now, checked again without its
/// secret: for a dashboard session signed in with it, whose credential may
/// since have been revoked, expired or given another role.
pub async fn current(db: &Db, id: &str) -> Result<Caller> {
    let rec: CredentialRecord = db.get(&keys::credential(id)).await?.ok_or_else(|| {
        Error::Unauthenticated("the credential this session signed in with is gone".into())
    })?;
    still_valid(rec)
}

fn still_valid(rec: CredentialRecord) -> Result<Caller> {
    if rec.revoked {
        return Err(Error::Unauthenticated(format!(
            "the operator credential {:?} has been revoked",
            rec.name
        )));
    }
    if rec.expires_at > 0 && now_secs() >= rec.expires_at {
        return Err(Error::Unauthenticated(format!(
            "the operator credential {:?} expired at {}: an admin gives it a new secret (flotilla credential rotate {})",
            rec.name,
            flotilla_proto::when::unix_secs(rec.expires_at),
            rec.name
        )));
    }
    Ok(Caller {
        name: rec.name,
        role: rec.role,
    })
}

/// Gives the credential named `name` a new secret (the old one is refused
/// from the moment this returns) expiring `ttl_secs` from now, or after the
/// lifetime it was created with when 0. Returns the new bearer string.
pub async fn rotate(db: &Db, name: &str, ttl_secs: u64) -> Result<(String, CredentialRecord)> {
    let rec = list(db)
        .await?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Error::NotFound(format!("no credential named {name:?}")))?;
    if rec.revoked {
        return Err(Error::FailedPrecondition(format!(
            "credential {name:?} has been revoked; create a new one"
        )));
    }
    let ttl = if ttl_secs > 0 { ttl_secs } else { rec.ttl_secs };
    let expires_at = expiry(ttl)?;
    let secret = random_string(32);
    let hash = flotilla_proto::sha256_hex(secret.as_bytes());
    let updated = db
        .update(
            &keys::credential(&rec.id),
            |cur: Option<CredentialRecord>| {
                let mut c =
                    cur.ok_or_else(|| Error::NotFound(format!("no credential named {name:?}")))?;
                if c.revoked {
                    return Err(Error::FailedPrecondition(format!(
                        "credential {name:?} has been revoked; create a new one"
                    )));
                }
                c.secret_sha256 = hash.clone();
                c.expires_at = expires_at;
                c.ttl_secs = ttl;
                c.rotated_at = now_secs();
                Ok(Update::Put(c))
            },
        )
        .await??
        .ok_or_else(|| Error::Internal("credential vanished".into()))?;
    Ok((format!("{}.{secret}", updated.id), updated))
}

/// Revokes the credential named `name`. Refuses to revoke the last admin
/// credential still valid: that would lock every operator out.
pub async fn revoke(db: &Db, name: &str) -> Result<CredentialRecord> {
    let all = list(db).await?;
    let rec = all
        .iter()
        .find(|c| c.name == name)
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("no credential named {name:?}")))?;
    if rec.revoked {
        return Ok(rec);
    }
    let admins = all
        .iter()
        .filter(|c| c.role == OperatorRole::Admin && !c.revoked)
        .count();
    if rec.role == OperatorRole::Admin && admins <= 1 {
        return Err(Error::FailedPrecondition(format!(
            "{name:?} is the last admin credential; create another admin first"
        )));
    }
    let updated = db
        .update(
            &keys::credential(&rec.id),
            |cur: Option<CredentialRecord>| {
                let mut c =
                    cur.ok_or_else(|| Error::NotFound(format!("no credential named {name:?}")))?;
                c.revoked = true;
                Ok::<_, Error>(crate::store::Update::Put(c))
            },
        )
        .await??;
    updated.ok_or_else(|| Error::Internal("credential vanished".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[tokio::test]
    async fn expired_and_rotated_secrets_are_refused_by_name() {
        let (_dir, db) = temp_db();
        let (old, rec) = create(&db, "ci", OperatorRole::Publisher, 3600)
            .await
            .unwrap();
        assert!(rec.expires_at > now_secs());
        authenticate(&db, &old).await.unwrap();
        let (new, rotated) = rotate(&db, "ci", 0).await.unwrap();
        assert_eq!(
            (rotated.id.as_str(), rotated.ttl_secs),
            (rec.id.as_str(), 3600)
        );
        let e = authenticate(&db, &old).await.unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
        authenticate(&db, &new).await.unwrap();
        // Past its expiry, the credential is refused, saying so.
        db.update(&keys::credential(&rec.id), |c: Option<CredentialRecord>| {
            let mut c = c.unwrap();
            c.expires_at = now_secs() - 1;
            Ok::<_, Error>(Update::Put(c))
        })
        .await
        .unwrap()
        .unwrap();
        let e = authenticate(&db, &new).await.unwrap_err().to_string();
        assert!(
            e.contains("expired at") && e.contains("credential rotate ci"),
            "{e}"
        );
        assert!(
            create(&db, "x", OperatorRole::Viewer, MAX_TTL_SECS + 1)
                .await
                .is_err()
        );
        revoke(&db, "ci").await.unwrap();
        let e = rotate(&db, "ci", 0).await.unwrap_err().to_string();
        assert!(e.contains("revoked"), "{e}");
    }

    fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(std::sync::Arc::new(SledStore::open(dir.path()).unwrap()));
        (dir, db)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn of_concurrent_creates_of_one_name_exactly_one_succeeds() {
        let (_dir, db) = temp_db();
        let tries: Vec<_> = (0..16)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move { create(&db, "ci", OperatorRole::Publisher, 0).await })
            })
            .collect();
        let mut created = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(_) => created += 1,
                Err(e) => assert!(e.to_string().contains("already exists"), "{e}"),
            }
        }
        assert_eq!(created, 1);
        let named: Vec<_> = list(&db)
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.name == "ci")
            .collect();
        assert_eq!(named.len(), 1);
    }

    #[tokio::test]
    async fn a_claim_left_by_a_crashed_create_is_taken_over_only_once_stale() {
        let (_dir, db) = temp_db();
        let claim = |at_ms| NameClaim {
            id: "gone000000".into(),
            at_ms,
        };
        // Just claimed, its record not written yet: the name is held.
        db.put(
            &keys::credential_name("ops"),
            &claim(crate::model::now_ms()),
        )
        .await
        .unwrap();
        let err = create(&db, "ops", OperatorRole::Admin, 0)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        // Claimed long ago and never completed: a crash's leftover.
        let stale = crate::model::now_ms() - ORPHAN_CLAIM_MS - 1;
        db.put(&keys::credential_name("ops"), &claim(stale))
            .await
            .unwrap();
        let (_, rec) = create(&db, "ops", OperatorRole::Admin, 0).await.unwrap();
        let held: NameClaim = db
            .get(&keys::credential_name("ops"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(held.id, rec.id);
        // Now it is held by a real credential.
        let err = create(&db, "ops", OperatorRole::Admin, 0)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
