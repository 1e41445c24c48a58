//! A real etcd member for the end-to-end tests (Debian's `etcd-server`;
//! `scripts/test` installs it), on loopback ports picked for the test, in a
//! temp dir, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

pub struct Etcd {
    child: Child,
    /// The client URL (`http://127.0.0.1:PORT`).
    pub url: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Etcd {
    /// Starts one member with its data in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Self {
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "e2e", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e2e={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (Debian package etcd-server; scripts/test installs it)");
        let etcd = Self { child, url };
        let health = format!("127.0.0.1:{client}");
        wait_until("etcd to answer", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&health).ok()
        });
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
