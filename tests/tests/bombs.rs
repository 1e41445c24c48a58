//! Archive bombs against a real agent: a signed, 20 KB tar.zst whose long-name,
//! long-link or pax header holds 256 MiB is refused without reading it, the
//! agent's peak memory stays small, and its journal does not grow with it.

use std::io::Write;
use std::path::Path;

use flotilla_e2e::patch::{self, Key};
use flotilla_e2e::{Server, measure, wait_until};

/// What each bomb's extension header holds (and declares).
const BOMB_BYTES: u64 = 256 << 20;
/// The agent's peak resident memory allowed over its whole life.
const MAX_AGENT_HWM_KIB: u64 = 64 * 1024;

/// A tar.zst: a `kind` header of BOMB_BYTES (all of it there, zeros compress
/// to almost nothing), then one small file.
fn bomb(path: &Path, kind: tar::EntryType) {
    let out = std::fs::File::create(path).unwrap();
    let mut z = zstd::stream::write::Encoder::new(out, 1).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(BOMB_BYTES);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    z.write_all(h.as_bytes()).unwrap();
    let zeros = vec![b'a'; 1 << 20];
    for _ in 0..(BOMB_BYTES >> 20) {
        z.write_all(&zeros).unwrap();
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut f = tar::Header::new_gnu();
    f.set_size(2);
    f.set_mode(0o644);
    b.append_data(&mut f, "VERSION", &b"1\n"[..]).unwrap();
    z.write_all(&b.into_inner().unwrap()).unwrap();
    z.finish().unwrap();
}

fn release(server: &Server, dir: &Path, k: &Key, id: &str, version: &str, artifact: &Path) {
    let spec = patch::files_spec(dir, id, version, artifact, "compression = \"zstd\"");
    let manifest = patch::build(server, &spec, &dir.join(id));
    patch::sign(server, &manifest, k);
    let (ok, _, err) = patch::publish(server, &manifest);
    assert!(ok, "publish {id}: {err}");
}

#[test]
fn extension_header_bombs_are_refused_with_the_agent_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = patch::signed_fleet(dir.path(), &k, 1);
    let agent = &agents[0];
    let pid = agent.pid().unwrap();
    let root = agent.root();
    let host_before = patch::snapshot(&root);
    let state_before = measure::dir_bytes(&agent.state_dir);
    for (i, (name, kind)) in [
        ("long-name", tar::EntryType::GNULongName),
        ("long-link", tar::EntryType::GNULongLink),
        ("pax", tar::EntryType::XHeader),
    ]
    .into_iter()
    .enumerate()
    {
        let artifact = dir.path().join(format!("{name}.tar.zst"));
        bomb(&artifact, kind);
        let size = std::fs::metadata(&artifact).unwrap().len();
        assert!(size < 64 * 1024, "{name}: the bomb is {size} bytes");
        let version = format!("1.0.{i}");
        release(&server, dir.path(), &k, name, &version, &artifact);
        let outcome = patch::wait_outcomes(&server, name, 1);
        let (_, phase, error) = &outcome[0];
        assert_eq!(phase, "rolled_back", "{name}: {outcome:?}");
        assert!(
            error.contains(&format!("header of {BOMB_BYTES} bytes")),
            "{name}: {error}"
        );
    }
    let hwm = measure::status_kib(pid, "VmHWM:");
    let state_after = measure::dir_bytes(&agent.state_dir);
    eprintln!("agent peak RSS {hwm} KiB; state dir {state_before} -> {state_after} bytes");
    assert!(hwm < MAX_AGENT_HWM_KIB, "agent peak RSS {hwm} KiB");
    // Three small refusals journaled, not the headers' contents.
    assert!(
        state_after < state_before + (4 << 20),
        "state dir grew from {state_before} to {state_after} bytes"
    );
    assert_eq!(patch::snapshot(&root), host_before, "the host changed");
    wait_until(
        "the agent still serving",
        std::time::Duration::from_secs(10),
        || server.nodes()[0]["online"].as_bool().filter(|o| *o),
    );
}
