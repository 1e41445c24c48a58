//! `flotilla dev`: a local fleet on the embedded store — one server and N agent
//! processes, each agent with its own state dir — until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_proto::pb;
use tokio::process::{Child, Command};

use super::connect::{Target, status_error};

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 3)]
    agents: u32,
    /// Directory for the fleet's state (default: a new temporary directory,
    /// removed on exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Group the agents join.
    #[arg(long, default_value = "dev")]
    group: String,
}

/// Finds a sibling binary of this one (cargo puts them side by side).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate the flotilla binary")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {} (build everything first: cargo build --workspace)",
            name,
            me.display()
        );
    }
    Ok(path)
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Stdio::from(f))
}

async fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGTERM so each process stops cleanly, then waits (and kills if it must).
async fn stop(children: &mut [(String, Child)]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for (_, c) in children.iter() {
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for (name, c) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            eprintln!("{name} did not stop in 10s; killing it");
            let _ = c.kill().await;
        }
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let server_bin = sibling("flotilla-server")?;
    let agent_bin = sibling("flotilla-agent")?;
    let (_tmp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new().prefix("flotilla-dev-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let server_dir = dir.join("server");
    if !server_dir.join("tls").exists() {
        run_ok(
            Command::new(&server_bin)
                .args([
                    "init",
                    "--name",
                    "127.0.0.1",
                    "--name",
                    "localhost",
                    "--data-dir",
                ])
                .arg(&server_dir),
            "flotilla-server init",
        )
        .await?;
    }
    let _ = std::fs::remove_file(server_dir.join("server.addr"));
    let _ = std::fs::remove_file(server_dir.join("web.addr"));
    let mut children: Vec<(String, Child)> = Vec::new();
    let server = Command::new(&server_bin)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "5s",
            "--offline-grace",
            "20s",
            "--web-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&server_dir)
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("server.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start flotilla-server")?;
    children.push(("flotilla-server".into(), server));

    let result = start_fleet(&args, &dir, &server_dir, &agent_bin, &mut children).await;
    match result {
        Ok(url) => {
            let cred = server_dir.join("admin.credential");
            flotilla_proto::outln!();
            flotilla_proto::outln!(
                "Flotilla dev fleet is up: 1 server, {} agents in group {:?}",
                args.agents,
                args.group
            );
            flotilla_proto::outln!("  state and logs: {}", dir.display());
            flotilla_proto::outln!(
                "  demo patch:     {}/agent-N-root/opt/flotilla-demo",
                dir.display()
            );
            flotilla_proto::outln!("  server:         {url}");
            // Written before the server's own address, so it is there now.
            if let Ok(web) = std::fs::read_to_string(server_dir.join("web.addr")) {
                flotilla_proto::outln!(
                    "  dashboard:      https://{}/ (sign in with {}; the browser warns \
                     about the certificate: it is from this dev fleet's own CA)",
                    web.trim(),
                    cred.display()
                );
            }
            flotilla_proto::outln!();
            flotilla_proto::outln!("Talk to it from another terminal:");
            flotilla_proto::outln!("  export FLOTILLA_SERVER={url}");
            flotilla_proto::outln!("  export FLOTILLA_CREDENTIAL={}", cred.display());
            flotilla_proto::outln!("  flotilla nodes list");
            flotilla_proto::outln!("  flotilla group list");
            flotilla_proto::outln!(
                "  flotilla group set {} --desired {}",
                args.group,
                args.agents.saturating_sub(1).max(1)
            );
            flotilla_proto::outln!("  flotilla group watch");
            flotilla_proto::outln!("  flotilla patch list");
            flotilla_proto::outln!();
            flotilla_proto::outln!("Ctrl-C stops everything.");
            wait_for_stop().await;
            flotilla_proto::outln!("stopping...");
        }
        Err(e) => {
            stop(&mut children).await;
            return Err(e.context(format!(
                "the dev fleet did not start (logs in {})",
                dir.display()
            )));
        }
    }
    stop(&mut children).await;
    flotilla_proto::outln!("stopped");
    Ok(())
}

/// Ctrl-C, or SIGTERM from a supervisor: either way the children are stopped.
async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn start_fleet(
    args: &DevArgs,
    dir: &Path,
    server_dir: &Path,
    agent_bin: &Path,
    children: &mut Vec<(String, Child)>,
) -> anyhow::Result<String> {
    let addr_file = server_dir.join("server.addr");
    let addr = wait_for("the server to listen", Duration::from_secs(30), || async {
        std::fs::read_to_string(&addr_file).ok()
    })
    .await?;
    let url = format!("https://{}", addr.trim());
    let target = Target {
        server: Some(url.clone()),
        credential: Some(server_dir.join("admin.credential")),
    };
    let (mut admin, _) = target.admin().await?;
    super::demo::prepare(dir, &mut admin).await?;
    let token = admin
        .create_token(pb::CreateTokenRequest {
            group: args.group.clone(),
            ttl_secs: 3600,
            max_uses: args.agents.max(1),
            labels: [("env".to_string(), "dev".to_string())].into(),
            requires_approval: false,
            description: "flotilla dev".into(),
            pin_trust: None,
            new_node_for_clones: false,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .token;
    for i in 1..=args.agents {
        let state = dir.join(format!("agent-{i}"));
        if !state.join("status.json").exists() {
            run_ok(
                Command::new(agent_bin)
                    .args(["join", "--server", &url, "--token", &token])
                    .arg("--machine-id")
                    .arg(format!("dev-agent-{i}"))
                    .arg("--trusted-key")
                    .arg(super::demo::public_key(dir))
                    .arg("--state-dir")
                    .arg(&state),
                &format!("flotilla-agent join (agent {i})"),
            )
            .await?;
        }
        // Each agent patches its own root, so several can share this machine.
        let root = dir.join(format!("agent-{i}-root"));
        std::fs::create_dir_all(root.join("opt"))?;
        let child = Command::new(agent_bin)
            .args([
                "run",
                "--server",
                &url,
                "--allow-path",
                "/opt",
                "--allow-scripts",
            ])
            .arg("--root")
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join(format!("agent-{i}.log")))?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start flotilla-agent")?;
        children.push((format!("agent-{i}"), child));
    }
    let group = args.group.clone();
    let want = args.agents;
    wait_for("every agent to connect", Duration::from_secs(60), || {
        let mut admin = admin.clone();
        let group = group.clone();
        async move {
            let r = admin
                .list_groups(pb::ListGroupsRequest {})
                .await
                .ok()?
                .into_inner();
            r.groups
                .iter()
                .find(|g| g.name == group && g.online >= want)
                .map(|_| ())
        }
    })
    .await?;
    flotilla_proto::outln!(
        "{} agents online; rolling out a signed demo patch",
        args.agents
    );
    super::demo::roll_out(dir, &target, &args.group, args.agents).await?;
    Ok(url)
}
