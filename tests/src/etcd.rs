//! Real etcd members for the end-to-end tests (Debian's `etcd-server`;
//! `scripts/test` installs it): one member, or a cluster of several, on
//! loopback ports picked for the test, in a temp dir, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

pub struct Etcd {
    child: Child,
    /// The client URL (`http://127.0.0.1:PORT`, or `https://` with TLS).
    pub url: String,
}

/// TLS material for an etcd member that requires client certificates: a CA,
/// the member's certificate for 127.0.0.1, and a client certificate, as PEM
/// files in a directory.
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTlsFiles {
    /// Makes a fresh CA and both certificates under `dir`.
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf(ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        Self {
            ca: write("etcd-ca.pem", &ca_cert.pem()),
            server_cert: write("etcd-server.pem", &server_cert),
            server_key: write("etcd-server.key", &server_key),
            client_cert: write("etcd-client.pem", &client_cert),
            client_key: write("etcd-client.key", &client_key),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts member `name` (data in `dir/etcd-<name>`) of the cluster
/// `initial` (`name=peer-url,...`), serving clients on `url`; `cmd` may
/// carry TLS flags.
fn spawn_member(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    url: &str,
    peer_url: &str,
    initial: &str,
) -> Child {
    cmd.args(["--name", name, "--data-dir"])
        .arg(dir.join(format!("etcd-{name}")))
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args(["--listen-peer-urls", peer_url])
        .args(["--initial-advertise-peer-urls", peer_url])
        .args(["--initial-cluster", initial])
        .args(["--initial-cluster-state", "new"])
        .args(["--initial-cluster-token", "e2e"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is installed (Debian package etcd-server; scripts/test installs it)")
}

impl Etcd {
    /// Starts one member with its data in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    /// [`Etcd::start`], serving clients over TLS (client certificates
    /// required) when `tls` is given.
    pub fn start_with(dir: &Path, tls: Option<&EtcdTlsFiles>) -> Self {
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = spawn_member(cmd, dir, "e2e", &url, &peer_url, &format!("e2e={peer_url}"));
        let etcd = Self { child, url };
        let health = format!("127.0.0.1:{client}");
        wait_until("etcd to answer", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&health).ok()
        });
        etcd
    }
}

impl Etcd {
    /// Freezes the member (SIGSTOP): it keeps its connections but answers
    /// nothing, as a hung or cut-off etcd does.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen member go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal etcd");
    }

    /// The `flotilla-server` flags of a fleet on this member under `prefix`.
    pub fn store_args(&self, prefix: &str) -> Vec<String> {
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.url,
            "--etcd-prefix",
            prefix,
        ]
        .map(String::from)
        .to_vec()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Several etcd members forming one cluster.
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    urls: Vec<String>,
}

/// Whether the member at `host:port` says it is healthy (it has a leader).
fn healthy(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdCluster {
    /// Starts `n` members with their data under `dir` and waits until every
    /// one is healthy.
    pub fn start(dir: &Path, n: usize) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        let mut urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = spawn_member(
                Command::new("etcd"),
                dir,
                &format!("m{i}"),
                &url,
                &peer_url,
                &initial,
            );
            members.push(Some(child));
            urls.push(url);
        }
        let cluster = Self { members, urls };
        for (client, _) in &ports {
            let addr = format!("127.0.0.1:{client}");
            wait_until("an etcd member healthy", Duration::from_secs(60), || {
                healthy(&addr).then_some(())
            });
        }
        cluster
    }

    /// The `flotilla-server` flags of a fleet on every member under `prefix`.
    pub fn store_args(&self, prefix: &str) -> Vec<String> {
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.urls.join(","),
            "--etcd-prefix",
            prefix,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Kills member `i` at once (SIGKILL).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}
