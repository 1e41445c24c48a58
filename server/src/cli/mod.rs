//! The `flotilla` operator CLI: tokens, groups, nodes, audit, credentials and a
//! local dev fleet. Human tables by default, `--json` for scripts.

mod admin;
mod artifacts;
mod audit;
pub mod connect;
mod delta;
mod demo;
mod dev;
mod events;
mod keys;
mod output;
mod patch;
mod patch_status;
pub(crate) mod rollout;
mod shell;
mod sites;

use clap::{Parser, Subcommand};

pub use connect::Target;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Operate a Flotilla fleet")]
pub struct Cli {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Print tables as wide as their content: long cells are not wrapped to
    /// the terminal's width.
    #[arg(long, global = true)]
    wide: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(admin::TokenCmd),
    /// Groups and their desired node counts.
    #[command(subcommand)]
    Group(admin::GroupCmd),
    /// Joined nodes.
    #[command(subcommand)]
    Nodes(admin::NodesCmd),
    /// The audit log of every change (and of refused attempts): the newest
    /// entries, `verify` its hash chain, `export` it as JSON lines.
    Audit(audit::AuditArgs),
    /// Operator credentials (admin only).
    #[command(subcommand)]
    Credential(admin::CredentialCmd),
    /// Show who the credential authenticates as.
    Whoami,
    /// The server replicas serving the fleet.
    #[command(subcommand)]
    Replicas(admin::ReplicasCmd),
    /// Patch-signing keys.
    #[command(subcommand)]
    Key(keys::KeyCmd),
    /// The fleet's patch-signing trust policy.
    #[command(subcommand)]
    Trust(keys::TrustCmd),
    /// Signed patches: build, sign, publish, follow.
    #[command(subcommand)]
    Patch(patch::PatchCmd),
    /// The server's stored artifacts: collect what the retention policy lets go.
    #[command(subcommand)]
    Artifacts(artifacts::ArtifactsCmd),
    /// Rollouts of published patches: progress, pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Reports over the fleet.
    #[command(subcommand)]
    Report(rollout::ReportCmd),
    /// The sites of the groups (nodes sharing a site label's value): nodes,
    /// online, the agent serving each and its cache, downloads from the
    /// server now.
    Sites {
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Webhooks: the fleet's events POSTed to receivers (autoscalers, chat).
    #[command(subcommand)]
    Webhook(events::WebhookCmd),
    /// The fleet's events (deficit, surplus, rollouts, nodes, failed
    /// patches), and with --follow each new one as it happens.
    Events(events::EventsArgs),
    /// Start a local dev fleet: a server and agents, on this machine.
    Dev(dev::DevArgs),
    /// Print a shell completion script (e.g. `flotilla completion bash >
    /// /etc/bash_completion.d/flotilla`).
    Completion {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write man pages: flotilla.1 and one per command.
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: std::path::PathBuf,
    },
}

/// Entry point of the `flotilla` binary.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = output::Output {
        json: cli.json,
        wide: cli.wide,
    };
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Completion { shell } => {
            shell::completion(shell);
            Ok(())
        }
        Command::Man { out_dir } => shell::man(&out_dir),
        Command::Token(cmd) => admin::token(&cli.target, out, cmd).await,
        Command::Group(cmd) => admin::group(&cli.target, out, cmd).await,
        Command::Nodes(cmd) => admin::nodes(&cli.target, out, cmd).await,
        Command::Audit(args) => audit::audit(&cli.target, out, args).await,
        Command::Credential(cmd) => admin::credential(&cli.target, out, cmd).await,
        Command::Whoami => admin::whoami(&cli.target, out).await,
        Command::Replicas(admin::ReplicasCmd::List) => admin::replicas(&cli.target, out).await,
        Command::Key(cmd) => keys::key(out, cmd),
        Command::Trust(cmd) => keys::trust(&cli.target, out, cmd).await,
        Command::Patch(cmd) => patch::patch(&cli.target, out, cmd).await,
        Command::Artifacts(cmd) => artifacts::artifacts(&cli.target, out, cmd).await,
        Command::Rollout(cmd) => rollout::rollout(&cli.target, out, cmd).await,
        Command::Report(cmd) => rollout::report(&cli.target, out, cmd).await,
        Command::Webhook(cmd) => events::webhook(&cli.target, out, cmd).await,
        Command::Events(args) => events::events(&cli.target, out, args).await,
        Command::Sites { group } => sites::list(&cli.target, out, group).await,
    }
}
