//! Operator credentials: `<id>.<secret>` bearer strings the server issues, each
//! with one role. The server keeps only the SHA-256 of the secret.

use flotilla_proto::limits;
use flotilla_proto::token::random_string;

use crate::error::{Error, Result};
use crate::model::{CredentialRecord, OperatorRole, keys, now_secs};
use crate::store::Db;

/// The caller of an admin call, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: OperatorRole,
}

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

/// Creates a credential; returns the bearer string (shown once) and its record.
pub async fn create(db: &Db, name: &str, role: OperatorRole) -> Result<(String, CredentialRecord)> {
    limits::check_name("credential name", name, limits::MAX_GROUP_NAME_LEN)?;
    if list(db).await?.iter().any(|c| c.name == name) {
        return Err(Error::FailedPrecondition(format!(
            "a credential named {name:?} already exists"
        )));
    }
    loop {
        let id = random_string(10);
        let secret = random_string(32);
        let rec = CredentialRecord {
            id: id.clone(),
            name: name.to_string(),
            role,
            secret_sha256: flotilla_proto::sha256_hex(secret.as_bytes()),
            created_at: now_secs(),
            revoked: false,
        };
        if db.create(&keys::credential(&id), &rec).await? {
            return Ok((format!("{id}.{secret}"), rec));
        }
    }
}

pub async fn list(db: &Db) -> Result<Vec<CredentialRecord>> {
    Ok(db.list(keys::CREDENTIALS).await?)
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
    if rec.revoked {
        return Err(Error::Unauthenticated(format!(
            "the operator credential {:?} has been revoked",
            rec.name
        )));
    }
    Ok(Caller {
        name: rec.name,
        role: rec.role,
    })
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
