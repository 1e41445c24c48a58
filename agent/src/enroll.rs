//! Joining a fleet: trading a join token and a CSR for a node identity.
//!
//! The order matters for security. The server's CA is fetched and checked against
//! the fingerprint in the token with a bare TLS handshake *before* the Enroll call,
//! so the token's secret is only ever sent to the server the token names. The node's
//! private key is generated here and never leaves the host: only a CSR is sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_proto::limits::{self, MAX_FACT_LEN, NameError, check_text};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::tls::{self, TlsError};
use flotilla_proto::token::{JoinToken, TokenFormatError};
use serde::Serialize;
use tonic::Code;

use crate::cert::{CertError, cert_info, new_key_and_csr};
use crate::facts::{self, FactsError, SYSTEM_MACHINE_ID_FILES};
use crate::state::{Desired, Identity, Role, StateError, Store};
use crate::status::Status;

/// How long one Enroll call may take.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// What `join` needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Server URLs, tried in order until one answers.
    pub servers: Vec<String>,
    /// The join token, `flt1.<id>.<secret>.<ca-sha256>`.
    pub token: String,
    /// Labels to ask for.
    pub labels: BTreeMap<String, String>,
    /// Machine id to state instead of the host's.
    pub machine_id: Option<String>,
    /// Where to keep the state.
    pub state_dir: PathBuf,
    /// minisign public keys (file text or base64 line) to pin for patches.
    pub trusted_keys: Vec<String>,
    /// How many of them must sign each manifest.
    pub trust_threshold: u32,
    /// Join again from the state already in `state_dir`, proving the node's
    /// key: the node, its patch journal and its downgrade memory are kept.
    pub again: bool,
}

/// What a successful join produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Joined {
    /// Id the server assigned.
    pub node_id: String,
    /// Group the token bound the node to.
    pub group: String,
    /// First role.
    pub role: Role,
    /// True when the server gave back an existing node (same machine id).
    pub rejoined: bool,
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("invalid join token: {0}")]
    Token(#[from] TokenFormatError),
    #[error(
        "no server to join: pass --server https://HOST:PORT (or set servers in the config file)"
    )]
    NoServers,
    #[error(transparent)]
    ServerUrl(TlsError),
    #[error("invalid labels: {0}")]
    Labels(NameError),
    #[error(
        "already joined as node {node_id} in {state_dir}; to join again keeping this node and \
         its patch history, stop the agent and run join --again; to join as a new host, remove \
         the state directory"
    )]
    AlreadyJoined { node_id: String, state_dir: PathBuf },
    #[error("nothing to join again from: {state_dir} holds no node (join without --again)")]
    NothingToRejoin { state_dir: PathBuf },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Facts(#[from] FactsError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("join refused by server: {message}")]
    Refused { code: Code, message: String },
    #[error("could not reach a server: {}", .0.join("; "))]
    Unreachable(Vec<String>),
    #[error("the server's enrollment answer is unusable: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Trust(#[from] crate::trust::PinError),
}

/// Everything about the options that needs no network: mistakes are cheap.
fn check_options(opts: &JoinOptions) -> Result<JoinToken, JoinError> {
    let token: JoinToken = opts.token.parse()?;
    if opts.servers.is_empty() {
        return Err(JoinError::NoServers);
    }
    for url in &opts.servers {
        tls::host_port(url).map_err(JoinError::ServerUrl)?;
    }
    limits::check_labels(opts.labels.iter()).map_err(JoinError::Labels)?;
    Ok(token)
}

/// Joins the fleet and stores the identity in `opts.state_dir`.
pub async fn join(opts: JoinOptions) -> Result<Joined, JoinError> {
    check_options(&opts)?;
    let store = Store::open(&opts.state_dir)?;
    join_with(&store, opts).await
}

/// [`join`] into a store the caller opened: the fleet simulator keeps many
/// nodes in one database (see [`Store::open_shared`]). `opts.state_dir` is
/// still where status.json (and a generated machine id) go.
pub async fn join_with(store: &Store, opts: JoinOptions) -> Result<Joined, JoinError> {
    let token = check_options(&opts)?;
    let previous = store.identity()?;
    match (&previous, opts.again) {
        (Some(existing), false) => {
            return Err(JoinError::AlreadyJoined {
                node_id: existing.node_id.clone(),
                state_dir: opts.state_dir,
            });
        }
        (None, true) => {
            return Err(JoinError::NothingToRejoin {
                state_dir: opts.state_dir,
            });
        }
        _ => {}
    }
    let system_files: Vec<&std::path::Path> = SYSTEM_MACHINE_ID_FILES
        .iter()
        .map(std::path::Path::new)
        .collect();
    let machine_id = match (&previous, &opts.machine_id) {
        (Some(p), None) => p.machine_id.clone(),
        _ => facts::machine_id(opts.machine_id.as_deref(), &system_files, &opts.state_dir)?,
    };
    let key = new_key_and_csr()?;
    let proof = previous
        .as_ref()
        .map(|p| crate::cert::prove_key(p, flotilla_proto::key_proof::REJOIN, &key.csr_der))
        .transpose()?;

    let request = pb::EnrollRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        csr_der: key.csr_der.clone(),
        facts: Some(facts::node_facts(
            &machine_id,
            previous.as_ref().map_or(0, |p| p.trust_version),
        )),
        labels: opts.labels.clone().into_iter().collect(),
        proof,
    };
    let (ca_pem, response) = enroll_with_failover(&opts.servers, &token, request).await?;

    let node_id = response.node_id.trim().to_string();
    check_text("node id", &node_id, MAX_FACT_LEN)
        .map_err(|e| JoinError::BadResponse(e.to_string()))?;
    if node_id.is_empty() {
        return Err(JoinError::BadResponse("no node id".into()));
    }
    // It reaches file names, logs and the role hook's environment.
    flotilla_proto::limits::check_name(
        "group",
        &response.group,
        flotilla_proto::limits::MAX_GROUP_NAME_LEN,
    )
    .map_err(|e| JoinError::BadResponse(e.to_string()))?;
    let role = Role::from_proto(response.role)
        .ok_or_else(|| JoinError::BadResponse(format!("unknown role {}", response.role)))?;
    let cert = cert_info(&response.certificate_pem)?;
    cert.check_key(&key.public_key)?;
    if let Some(p) = &previous
        && p.node_id != node_id
    {
        return Err(JoinError::BadResponse(format!(
            "asked to keep node {}, given node {node_id}",
            p.node_id
        )));
    }
    // Key files win; else the policy the token pins, checked against its hash;
    // else, joining again, the keys this host already holds.
    let (trusted_keys, trust_threshold, trust_version) =
        match (&token.trust_sha256, opts.trusted_keys.is_empty(), &previous) {
            (_, false, _) => (opts.trusted_keys.clone(), opts.trust_threshold, 0),
            (_, true, Some(p)) if !p.trusted_keys.is_empty() => {
                (p.trusted_keys.clone(), p.trust_threshold, p.trust_version)
            }
            (Some(pin), true, _) => {
                let doc = crate::trust::pinned_at_join(pin, &response.trust)?;
                (doc.keys, doc.threshold, doc.version)
            }
            _ => (Vec::new(), opts.trust_threshold, 0),
        };

    let identity = Identity {
        node_id: node_id.clone(),
        group: response.group.clone(),
        key_pem: key.key_pem,
        cert_pem: response.certificate_pem,
        // The CA the fingerprint pinned, not whatever the response claims.
        ca_pem,
        servers: opts.servers.clone(),
        token_id: token.id,
        machine_id,
        renewals: 0,
        trusted_keys,
        trust_threshold,
        trust_version,
    };
    let desired = match (&previous, store.desired()?) {
        // Joining again: the journal and the desired state held stay; the
        // server's next push says what changed.
        (Some(_), Some(held)) => {
            store.save_identity(&identity)?;
            held
        }
        _ => {
            let desired = Desired::initial(role);
            store.save_joined(&identity, &desired)?;
            desired
        }
    };
    match Status::new(&identity, &desired, &identity.servers, false) {
        Ok(status) => {
            if let Err(e) = status.write(&opts.state_dir) {
                tracing::warn!(error = %e, "joined, but could not write status.json");
            }
        }
        Err(e) => tracing::warn!(error = %e, "joined, but could not describe the certificate"),
    }
    tracing::info!(node_id = %identity.node_id, group = %identity.group, %role, rejoined = response.rejoined, "joined");
    Ok(Joined {
        node_id,
        group: identity.group,
        role,
        rejoined: response.rejoined,
    })
}

/// Whether a failed Enroll is worth trying on the next server: the server did not
/// answer, as opposed to answering no.
fn is_unreachable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Pins the CA and enrolls with the first server that answers. Returns the pinned
/// CA (PEM) and the server's answer.
async fn enroll_with_failover(
    servers: &[String],
    token: &JoinToken,
    request: pb::EnrollRequest,
) -> Result<(String, pb::EnrollResponse), JoinError> {
    let mut failures = Vec::new();
    for url in servers {
        // No secret has been sent yet: a server that fails the pin learns nothing.
        let ca_pem = match tls::fetch_pinned_ca(url, &token.ca_fingerprint).await {
            Ok(pem) => pem,
            Err(e) => {
                tracing::warn!(%url, error = %e, "server not usable for join");
                failures.push(e.to_string());
                continue;
            }
        };
        let endpoint = tls::endpoint(url, &ca_pem, None).map_err(JoinError::ServerUrl)?;
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!(
                    "cannot connect to {url}: {}",
                    crate::refusal::chain_text(&e)
                ));
                continue;
            }
        };
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(ENROLL_TIMEOUT);
        match tokio::time::timeout(ENROLL_TIMEOUT, client.enroll(call)).await {
            Ok(Ok(response)) => return Ok((ca_pem, response.into_inner())),
            Ok(Err(status)) if is_unreachable(status.code()) => {
                failures.push(format!("{url}: {}", status.message()));
            }
            Ok(Err(status)) => {
                let message = if status.message().is_empty() {
                    status.code().description().to_string()
                } else {
                    status.message().to_string()
                };
                return Err(JoinError::Refused {
                    code: status.code(),
                    message,
                });
            }
            Err(_) => failures.push(format!("{url}: no answer within {ENROLL_TIMEOUT:?}")),
        }
    }
    Err(JoinError::Unreachable(failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &std::path::Path) -> JoinOptions {
        JoinOptions {
            servers: vec!["https://127.0.0.1:1".into()],
            token: format!("flt1.abcdefghij.{}.{}", "s".repeat(32), "0".repeat(64)),
            labels: BTreeMap::new(),
            machine_id: Some("m".into()),
            state_dir: dir.join("state"),
            trusted_keys: Vec::new(),
            trust_threshold: 1,
            again: false,
        }
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_any_network_call() {
        let dir = tempfile::tempdir().unwrap();
        let bad_token = JoinOptions {
            token: "nope".into(),
            ..opts(dir.path())
        };
        assert!(matches!(join(bad_token).await, Err(JoinError::Token(_))));
        let no_servers = JoinOptions {
            servers: vec![],
            ..opts(dir.path())
        };
        assert!(matches!(join(no_servers).await, Err(JoinError::NoServers)));
        let plain_http = JoinOptions {
            servers: vec!["http://x:1".into()],
            ..opts(dir.path())
        };
        assert!(matches!(
            join(plain_http).await,
            Err(JoinError::ServerUrl(_))
        ));
        let mut labels = BTreeMap::new();
        labels.insert("bad key".to_string(), "v".to_string());
        let bad_labels = JoinOptions {
            labels,
            ..opts(dir.path())
        };
        assert!(matches!(join(bad_labels).await, Err(JoinError::Labels(_))));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_reported_with_its_url() {
        let dir = tempfile::tempdir().unwrap();
        // Port 1 on loopback: nothing listens there.
        let err = join(opts(dir.path())).await.unwrap_err();
        assert!(matches!(err, JoinError::Unreachable(_)), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        // Nothing was stored.
        let store = Store::open(&dir.path().join("state")).unwrap();
        assert!(store.identity().unwrap().is_none());
    }

    #[tokio::test]
    async fn join_with_refuses_a_namespace_that_already_joined() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let joined = Store::open_shared(&db, "a1", &dir.path().join("a1")).unwrap();
        let identity = crate::state::Identity {
            node_id: "n-1".into(),
            group: "g".into(),
            key_pem: String::new(),
            cert_pem: String::new(),
            ca_pem: String::new(),
            servers: Vec::new(),
            token_id: "abcdefghij".into(),
            machine_id: "m".into(),
            renewals: 0,
            trusted_keys: Vec::new(),
            trust_threshold: 0,
            trust_version: 0,
        };
        joined
            .save_joined(&identity, &Desired::initial(Role::Active))
            .unwrap();
        let err = join_with(&joined, opts(dir.path())).await.unwrap_err();
        assert!(matches!(err, JoinError::AlreadyJoined { .. }), "{err}");
        // Its neighbour in the same database has not joined: it gets as far as the
        // network (nothing listens on port 1).
        let other = Store::open_shared(&db, "a2", &dir.path().join("a2")).unwrap();
        let err = join_with(&other, opts(dir.path())).await.unwrap_err();
        assert!(matches!(err, JoinError::Unreachable(_)), "{err}");
        assert!(other.identity().unwrap().is_none());
    }

    #[test]
    fn refusals_carry_the_server_message() {
        let e = JoinError::Refused {
            code: Code::ResourceExhausted,
            message: "join token abc is used up (3 of 3 joins)".into(),
        };
        assert_eq!(
            e.to_string(),
            "join refused by server: join token abc is used up (3 of 3 joins)"
        );
    }
}
