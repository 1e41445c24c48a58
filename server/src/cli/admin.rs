//! The CLI's admin commands: one function per command group, each a thin layer
//! over one AdminService call and its output.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use flotilla_proto::pb;
use serde_json::{Value, json};

use super::connect::{Target, status_error};
use super::output::{Output, time};
use crate::credential_file::CredentialFile;

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must look like key=value"))
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token for a group.
    Create {
        /// Group the joined nodes belong to (made if new, without a desired count).
        #[arg(long)]
        group: String,
        /// Lifetime (e.g. 1h, 7d).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Label stamped on each node that joins (key=value, repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Joined nodes wait as pending until accepted.
        #[arg(long)]
        approval: bool,
        /// Free text kept with the token (what it is for).
        #[arg(long, default_value = "")]
        description: String,
        /// Pin the fleet's trust policy in the token (the default when there is one): a host
        /// joining without --trusted-key files takes its keys from the server, checked against it.
        #[arg(long, conflicts_with = "no_pin_trust")]
        pin_trust: bool,
        /// Do not pin the trust policy: hosts must bring their own --trusted-key files.
        #[arg(long)]
        no_pin_trust: bool,
        /// A host joining with the machine id of a node another host holds online (a cloned
        /// image) gets a new node instead of a refusal.
        #[arg(long)]
        new_node_for_clones: bool,
    },
    /// List tokens.
    List,
    /// Revoke a token: it can no longer be used to join.
    Revoke {
        /// The token's id (`token list`).
        id: String,
    },
    /// Give a token a new lifetime (and optionally more uses).
    Extend {
        /// The token's id (`token list`).
        id: String,
        /// New lifetime, counted from now (e.g. 1h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// New use limit (0 keeps the current one).
        #[arg(long, default_value_t = 0)]
        max_uses: u32,
    },
}

fn token_json(t: &pb::TokenInfo) -> Value {
    json!({
        "id": t.id, "group": t.group, "created_at": t.created_at, "expires_at": t.expires_at,
        "max_uses": t.max_uses, "uses": t.uses, "labels": t.labels,
        "requires_approval": t.requires_approval, "revoked": t.revoked,
        "description": t.description, "created_by": t.created_by,
        "trust_sha256": t.trust_sha256,
    })
}

fn token_row(t: &pb::TokenInfo) -> Vec<String> {
    let state = if t.revoked {
        "revoked"
    } else if t.expires_at <= crate::model::now_secs() {
        "expired"
    } else if t.uses >= t.max_uses {
        "used up"
    } else {
        "valid"
    };
    vec![
        t.id.clone(),
        t.group.clone(),
        format!("{}/{}", t.uses, t.max_uses),
        time(t.expires_at),
        state.to_string(),
        if t.requires_approval { "yes" } else { "no" }.to_string(),
    ]
}

const TOKEN_HEADERS: &[&str] = &["ID", "GROUP", "USES", "EXPIRES", "STATE", "APPROVAL"];

pub async fn token(target: &Target, out: Output, cmd: TokenCmd) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    match cmd {
        TokenCmd::Create {
            group,
            ttl,
            max_uses,
            labels,
            approval,
            description,
            pin_trust,
            no_pin_trust,
            new_node_for_clones,
        } => {
            let r = c
                .create_token(pb::CreateTokenRequest {
                    group,
                    ttl_secs: ttl.as_secs().max(1),
                    max_uses,
                    labels: labels.into_iter().collect::<HashMap<_, _>>(),
                    requires_approval: approval,
                    description,
                    pin_trust: match (pin_trust, no_pin_trust) {
                        (true, _) => Some(true),
                        (_, true) => Some(false),
                        _ => None,
                    },
                    new_node_for_clones,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let info = r.info.unwrap_or_default();
            let pinned = if info.trust_sha256.is_empty() {
                "hosts bring their own --trusted-key files".to_string()
            } else {
                format!("pins trust policy sha256 {}", info.trust_sha256)
            };
            out.object(
                &format!(
                    "{}\n\ntoken {} for group {}: {} use(s), expires {}; {pinned}. Shown once; keep it secret.",
                    r.token,
                    info.id,
                    info.group,
                    info.max_uses,
                    time(info.expires_at)
                ),
                json!({ "token": r.token, "info": token_json(&info) }),
            );
        }
        TokenCmd::List => {
            let r = c
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            out.table(
                TOKEN_HEADERS,
                r.tokens.iter().map(token_row).collect(),
                Value::Array(r.tokens.iter().map(token_json).collect()),
            );
        }
        TokenCmd::Revoke { id } => {
            let t = c
                .revoke_token(pb::RevokeTokenRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(&format!("token {} revoked", t.id), token_json(&t));
        }
        TokenCmd::Extend { id, ttl, max_uses } => {
            let t = c
                .extend_token(pb::ExtendTokenRequest {
                    id,
                    ttl_secs: ttl.as_secs().max(1),
                    max_uses,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(
                &format!(
                    "token {} now expires {} with {} use(s)",
                    t.id,
                    time(t.expires_at),
                    t.max_uses
                ),
                token_json(&t),
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a group (a join token for a new group also creates it).
    Create {
        /// The group's name.
        name: String,
        /// Desired node count (default: none, every accepted node is active).
        #[arg(long)]
        desired: Option<u32>,
        /// Nodes a rollout may take out of service at once [default: 1].
        #[arg(long)]
        max_unavailable: Option<u32>,
    },
    /// Set an existing group's desired node count.
    Set {
        /// The group's name.
        name: String,
        /// Desired node count: provisioning tools watch the deficit it makes.
        #[arg(long)]
        desired: u32,
        /// Nodes a rollout may take out of service at once.
        #[arg(long)]
        max_unavailable: Option<u32>,
        /// Create the group if it does not exist (otherwise an unknown name is refused).
        #[arg(long)]
        create: bool,
    },
    /// Delete a group that has no nodes (pending or accepted) and no join tokens left.
    Delete {
        /// The group's name.
        name: String,
    },
    /// List groups with their counts and deficit.
    List,
    /// Print each change of the groups' counts as it happens (for provisioning tools).
    Watch {
        /// Only this group.
        name: Option<String>,
        /// Reconnect when the server goes away instead of exiting with an error.
        #[arg(long)]
        follow: bool,
    },
    /// Show or change a group's maintenance windows, rollout defaults and SLA.
    Config(super::rollout::GroupConfigArgs),
}

fn group_json(g: &pb::GroupStatus) -> Value {
    json!({
        "name": g.name, "desired": g.desired, "max_unavailable": g.max_unavailable,
        "active": g.active, "healthy_active": g.healthy_active, "standby": g.standby,
        "pending": g.pending, "online": g.online, "deficit": g.deficit, "total": g.total,
    })
}

fn group_row(g: &pb::GroupStatus) -> Vec<String> {
    vec![
        g.name.clone(),
        g.desired.map_or("-".into(), |d| d.to_string()),
        format!("{}/{}", g.healthy_active, g.active),
        g.standby.to_string(),
        g.pending.to_string(),
        format!("{}/{}", g.online, g.total),
        g.deficit.to_string(),
    ]
}

pub async fn group(target: &Target, out: Output, cmd: GroupCmd) -> anyhow::Result<()> {
    if let GroupCmd::Config(args) = cmd {
        return super::rollout::group_config(target, out, args).await;
    }
    let (mut c, _) = target.admin().await?;
    match cmd {
        GroupCmd::Create {
            name,
            desired,
            max_unavailable,
        } => {
            let g = c
                .create_group(pb::CreateGroupRequest {
                    name,
                    desired,
                    max_unavailable,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(&format!("group {} created", g.name), group_json(&g));
        }
        GroupCmd::Set {
            name,
            desired,
            max_unavailable,
            create,
        } => {
            let g = c
                .set_group(pb::SetGroupRequest {
                    name,
                    desired,
                    max_unavailable,
                    create,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(
                &format!(
                    "group {}: desired {}, healthy active {}, standby {}, deficit {}",
                    g.name,
                    g.desired.unwrap_or(0),
                    g.healthy_active,
                    g.standby,
                    g.deficit
                ),
                group_json(&g),
            );
        }
        GroupCmd::Delete { name } => {
            c.delete_group(pb::DeleteGroupRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            out.object(&format!("group {name} deleted"), json!({ "name": name }));
        }
        GroupCmd::List => {
            let r = c
                .list_groups(pb::ListGroupsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            out.table(
                &[
                    "GROUP",
                    "DESIRED",
                    "ACTIVE (HEALTHY/ALL)",
                    "STANDBY",
                    "PENDING",
                    "ONLINE",
                    "DEFICIT",
                ],
                r.groups.iter().map(group_row).collect(),
                Value::Array(r.groups.iter().map(group_json).collect()),
            );
        }
        GroupCmd::Watch { name, follow } => {
            let req = pb::WatchGroupsRequest {
                group: name.unwrap_or_default(),
            };
            let mut client = Some(c);
            let mut delay = Duration::from_secs(1);
            loop {
                let c = match client.take() {
                    Some(c) => Ok(c),
                    None => target.admin().await.map(|(c, _)| c),
                };
                let why = match c {
                    Ok(c) => match watch_groups(c, &req, out, &mut delay).await {
                        Ok(()) => {
                            "the server ended the watch (it may be shutting down)".to_string()
                        }
                        Err(WatchEnd::Refused(e)) => return Err(e),
                        Err(WatchEnd::Lost(e)) => format!("{e:#}"),
                    },
                    Err(e) => format!("{e:#}"),
                };
                if !follow {
                    anyhow::bail!("{why}");
                }
                eprintln!(
                    "watch interrupted: {why}; reconnecting in {}s",
                    delay.as_secs()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        GroupCmd::Config(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// Why a watch stopped: refused (no use trying again) or lost (the server
/// went away: `--follow` reconnects).
enum WatchEnd {
    Refused(anyhow::Error),
    Lost(anyhow::Error),
}

/// Prints group changes until the stream ends; `delay` (the reconnect wait)
/// starts over once the server answers.
async fn watch_groups(
    mut c: super::connect::Admin,
    req: &pb::WatchGroupsRequest,
    out: Output,
    delay: &mut Duration,
) -> Result<(), WatchEnd> {
    use std::io::Write;
    use tonic::Code;
    let lost_or_refused = |s: tonic::Status| match s.code() {
        Code::NotFound | Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
            WatchEnd::Refused(status_error(s))
        }
        _ => WatchEnd::Lost(status_error(s)),
    };
    let mut stream = c
        .watch_groups(req.clone())
        .await
        .map_err(lost_or_refused)?
        .into_inner();
    *delay = Duration::from_secs(1);
    while let Some(g) = stream.message().await.map_err(lost_or_refused)? {
        if out.json {
            flotilla_proto::outln!("{}", group_json(&g));
        } else {
            flotilla_proto::outln!(
                "{} group={} desired={} active={} healthy_active={} standby={} pending={} online={} deficit={}",
                crate::model::now_secs(),
                g.name,
                g.desired.map_or("-".into(), |d| d.to_string()),
                g.active,
                g.healthy_active,
                g.standby,
                g.pending,
                g.online,
                g.deficit
            );
        }
        std::io::stdout()
            .flush()
            .map_err(|e| WatchEnd::Refused(e.into()))?;
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum NodesCmd {
    /// List nodes.
    List {
        /// Only this group's nodes.
        #[arg(long)]
        group: Option<String>,
    },
    /// Show one node.
    Show {
        /// The node's id.
        id: String,
    },
    /// Accept a pending node.
    Accept {
        /// The node's id.
        id: String,
    },
    /// Reject a pending node.
    Reject {
        /// The node's id.
        id: String,
    },
    /// Revoke a node: its session ends and its certificate is refused.
    Revoke {
        /// The node's id.
        id: String,
    },
    /// Set or remove a node's labels without a re-join (its desired state follows at once).
    SetLabels {
        /// The node's id.
        id: String,
        /// Labels to set (key=value; a value replaces the node's).
        #[arg(value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// A label key to remove (repeatable).
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
    /// Move a node to another existing group without a re-join (it starts there as a standby).
    Move {
        /// The node's id.
        id: String,
        /// The group to move it to.
        #[arg(long)]
        group: String,
    },
}

fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r).unwrap_or(pb::Role::Unspecified) {
        pb::Role::Active => "active",
        pb::Role::Standby => "standby",
        pb::Role::Pending => "pending",
        pb::Role::Unspecified => "-",
    }
}

fn node_json(n: &pb::NodeInfo) -> Value {
    let f = n.facts.clone().unwrap_or_default();
    json!({
        "id": n.id, "group": n.group, "status": n.status, "role": role_name(n.role),
        "online": n.online, "labels": n.labels, "joined_at": n.joined_at, "last_seen": n.last_seen,
        "certificate_serial": n.certificate_serial, "certificate_not_after": n.certificate_not_after,
        "token_id": n.token_id, "installed": n.installed,
        "facts": { "hostname": f.hostname, "os": f.os, "arch": f.arch,
                   "agent_version": f.agent_version, "machine_id": f.machine_id,
                   "trust_version": f.trust_version },
    })
}

/// Labels as `key=value,…`, sorted.
fn labels_text(labels: &HashMap<String, String>) -> String {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    l.join(",")
}

fn node_row(n: &pb::NodeInfo) -> Vec<String> {
    let f = n.facts.clone().unwrap_or_default();
    vec![
        n.id.clone(),
        n.group.clone(),
        n.status.clone(),
        role_name(n.role).to_string(),
        if n.online { "online" } else { "offline" }.to_string(),
        f.hostname,
        labels_text(&n.labels),
        time(n.last_seen),
    ]
}

pub async fn nodes(target: &Target, out: Output, cmd: NodesCmd) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let req = |id: String| pb::NodeActionRequest { id };
    let (verb, node) = match cmd {
        NodesCmd::List { group } => {
            let r = c
                .list_nodes(pb::ListNodesRequest {
                    group: group.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out.table(
                &[
                    "NODE",
                    "GROUP",
                    "STATUS",
                    "ROLE",
                    "ONLINE",
                    "HOSTNAME",
                    "LABELS",
                    "LAST SEEN",
                ],
                r.nodes.iter().map(node_row).collect(),
                Value::Array(r.nodes.iter().map(node_json).collect()),
            );
            return Ok(());
        }
        NodesCmd::Show { id } => (None, c.get_node(pb::GetNodeRequest { id }).await),
        NodesCmd::Accept { id } => (Some("accepted"), c.accept_node(req(id)).await),
        NodesCmd::Reject { id } => (Some("rejected"), c.reject_node(req(id)).await),
        NodesCmd::Revoke { id } => (Some("revoked"), c.revoke_node(req(id)).await),
        NodesCmd::SetLabels { id, labels, remove } => {
            if labels.is_empty() && remove.is_empty() {
                anyhow::bail!("give labels to set (key=value) or --remove KEY");
            }
            let r = c
                .set_node_labels(pb::SetNodeLabelsRequest {
                    id,
                    set: labels.into_iter().collect(),
                    remove,
                })
                .await;
            (Some("labels set"), r)
        }
        NodesCmd::Move { id, group } => {
            let r = c.move_node(pb::MoveNodeRequest { id, group }).await;
            (Some("moved"), r)
        }
    };
    let n = node.map_err(status_error)?.into_inner();
    let human = match verb {
        Some(v) => format!(
            "node {} {v}: group {}, labels {}",
            n.id,
            n.group,
            labels_text(&n.labels)
        ),
        None => {
            let f = n.facts.clone().unwrap_or_default();
            let mut installed: Vec<String> = n
                .installed
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            installed.sort();
            format!(
                "node:        {}\ngroup:       {}\nstatus:      {}\nrole:        {}\nonline:      {}\nhostname:    {}\nos/arch:     {}/{}\nagent:       {}\ntrust:       {}\nlabels:      {}\njoined:      {}\nlast seen:   {}\ncertificate: serial {} valid until {}\ninstalled:   {}",
                n.id,
                n.group,
                n.status,
                role_name(n.role),
                n.online,
                f.hostname,
                f.os,
                f.arch,
                f.agent_version,
                match f.trust_version {
                    0 => "policy version not reported".to_string(),
                    v => format!("policy v{v}"),
                },
                labels_text(&n.labels),
                time(n.joined_at),
                time(n.last_seen),
                n.certificate_serial,
                time(n.certificate_not_after),
                installed.join(", ")
            )
        }
    };
    out.object(&human, node_json(&n));
    Ok(())
}

#[derive(Subcommand)]
pub enum CredentialCmd {
    /// Create an operator credential and write it to a file.
    Create {
        /// The credential's name (unique; shown in the audit log).
        #[arg(long)]
        name: String,
        /// viewer, operator, publisher or admin.
        #[arg(long)]
        role: String,
        /// Where to write the credential file (owner-only permissions).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file at --out (its credential is lost: revoke it too).
        #[arg(long)]
        force: bool,
        /// Lifetime (e.g. 90d); after it the credential is refused until rotated.
        /// Default: it never expires.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List credentials.
    List,
    /// Revoke a credential: it is refused from now on.
    Revoke {
        /// The credential's name.
        name: String,
    },
    /// Give a credential a new secret and write it to a file; the old secret is refused at once.
    Rotate {
        /// The credential's name.
        name: String,
        /// Where to write the new credential file (owner-only permissions).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file at --out.
        #[arg(long)]
        force: bool,
        /// The new secret's lifetime (default: the lifetime the credential was created with).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

fn expires_text(at: i64) -> String {
    if at == 0 {
        "never".to_string()
    } else {
        time(at)
    }
}

/// Writes a credential the server just issued to `path` and says so.
fn save_credential(
    r: pb::CreateCredentialResponse,
    cred: CredentialFile,
    target: &Target,
    path: &std::path::Path,
    out: Output,
    done: &str,
) -> anyhow::Result<()> {
    CredentialFile {
        credential: r.credential,
        ca_certificate: cred.ca_certificate,
        server: target.server.clone().or(cred.server),
    }
    .save(path)?;
    let info = r.info.unwrap_or_default();
    out.object(
        &format!(
            "credential {} ({}) {done} {}; expires {}",
            info.name,
            info.role,
            path.display(),
            expires_text(info.expires_at)
        ),
        json!({ "id": info.id, "name": info.name, "role": info.role, "file": path, "expires_at": info.expires_at }),
    );
    Ok(())
}

pub async fn credential(target: &Target, out: Output, cmd: CredentialCmd) -> anyhow::Result<()> {
    // Checked before the server makes a credential whose secret would be lost.
    if let CredentialCmd::Create {
        out: path,
        force: false,
        ..
    }
    | CredentialCmd::Rotate {
        out: path,
        force: false,
        ..
    } = &cmd
        && std::fs::symlink_metadata(path).is_ok()
    {
        anyhow::bail!(
            "{} already exists; refusing to overwrite a credential file (its secret would be lost): choose another --out, or pass --force",
            path.display()
        );
    }
    let (mut c, cred) = target.admin().await?;
    match cmd {
        CredentialCmd::Create {
            name,
            role,
            out: path,
            force: _,
            ttl,
        } => {
            let r = c
                .create_credential(pb::CreateCredentialRequest {
                    name,
                    role,
                    ttl_secs: ttl.map_or(0, |t| t.as_secs().max(1)),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            save_credential(r, cred, target, &path, out, "written to")?;
        }
        CredentialCmd::Rotate {
            name,
            out: path,
            force: _,
            ttl,
        } => {
            let r = c
                .rotate_credential(pb::RotateCredentialRequest {
                    name,
                    ttl_secs: ttl.map_or(0, |t| t.as_secs().max(1)),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            save_credential(
                r,
                cred,
                target,
                &path,
                out,
                "rotated: its new secret written to",
            )?;
        }
        CredentialCmd::Revoke { name } => {
            let c = c
                .revoke_credential(pb::RevokeCredentialRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(
                &format!("credential {} ({}) revoked", c.name, c.role),
                json!({ "id": c.id, "name": c.name, "role": c.role, "revoked": c.revoked }),
            );
        }
        CredentialCmd::List => {
            let r = c
                .list_credentials(pb::ListCredentialsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            out.table(
                &["ID", "NAME", "ROLE", "CREATED", "EXPIRES", "REVOKED"],
                r.credentials
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.clone(),
                            c.name.clone(),
                            c.role.clone(),
                            time(c.created_at),
                            expires_text(c.expires_at),
                            if c.revoked { "yes" } else { "no" }.to_string(),
                        ]
                    })
                    .collect(),
                Value::Array(
                    r.credentials
                        .iter()
                        .map(|c| json!({ "id": c.id, "name": c.name, "role": c.role, "created_at": c.created_at, "expires_at": c.expires_at, "rotated_at": c.rotated_at, "revoked": c.revoked }))
                        .collect(),
                ),
            );
        }
    }
    Ok(())
}

pub async fn whoami(target: &Target, out: Output) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let r = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    out.object(
        &format!("{} (role {})", r.name, r.role),
        json!({ "name": r.name, "role": r.role }),
    );
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum ReplicasCmd {
    /// Each replica: its address, whether it leads, the agent sessions it holds.
    List,
}

pub async fn replicas(target: &Target, out: Output) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let r = c
        .list_replicas(pb::ListReplicasRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let rows = r
        .replicas
        .iter()
        .map(|x| {
            vec![
                x.id.clone(),
                x.url.clone(),
                if x.leader { "leader" } else { "" }.to_string(),
                x.sessions.to_string(),
                super::output::time(x.started_at_ms / 1000),
                x.version.clone(),
            ]
        })
        .collect();
    let json = json!(
        r.replicas
            .iter()
            .map(|x| json!({
                "id": x.id,
                "url": x.url,
                "host": x.host,
                "pid": x.pid,
                "leader": x.leader,
                "sessions": x.sessions,
                "started_at_ms": x.started_at_ms,
                "version": x.version,
            }))
            .collect::<Vec<_>>()
    );
    out.table(
        &["ID", "URL", "LEADS", "SESSIONS", "STARTED", "VERSION"],
        rows,
        json,
    );
    Ok(())
}
