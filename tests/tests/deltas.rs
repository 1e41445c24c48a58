//! Delta patches end to end: `patch build --delta-from` an older bundle, the
//! server's refusals of a bad index and of a delta it does not hold, `patch
//! publish` uploading the deltas, and a node that is sent the index, fetches
//! the delta and rebuilds the artifact from the base it holds.

use std::path::Path;

use flotilla_e2e::{Server, enroll, patch};
use flotilla_proto::delta::{DeltaIndex, INDEX_FILE};
use flotilla_proto::manifest::Manifest;
use flotilla_proto::pb;

const ID: &str = "app-1.0.1";

fn refused(e: tonic::Status, code: tonic::Code, want: &str) {
    assert_eq!(e.code(), code, "{e}");
    assert!(e.message().contains(want), "{e}");
}

#[test]
fn a_patch_built_with_delta_from_carries_a_small_delta_to_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, key) = patch::trusting_server(d);

    // 1.0.0 with a 5 MiB artifact; 1.0.1 changes a few bytes and adds some.
    let v1 = patch::noise(5 << 20, 1);
    let mut v2 = v1.clone();
    v2[1 << 20..(1 << 20) + 16].copy_from_slice(b"version 1.0.1 ok");
    v2.extend_from_slice(&patch::noise(1000, 2));
    std::fs::write(d.join("v1.bin"), &v1).unwrap();
    std::fs::write(d.join("v2.bin"), &v2).unwrap();
    let spec1 = patch::files_spec(d, "app-1.0.0", "1.0.0", &d.join("v1.bin"), "");
    let old = d.join("app-1.0.0");
    patch::build(&server, &spec1, &old);
    let spec2 = patch::files_spec(d, ID, "1.0.1", &d.join("v2.bin"), "");
    let new = d.join(ID);
    let (ok, out, err) = patch::cli(
        &server,
        &[
            "patch",
            "build",
            spec2.to_str().unwrap(),
            "--out-dir",
            new.to_str().unwrap(),
            "--delta-from",
            old.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("(1 artifact(s), 1 delta(s))"), "{out}");
    let manifest_path = new.join("manifest.json");
    let manifest_bytes = std::fs::read(&manifest_path).unwrap();
    let manifest = Manifest::parse(&manifest_bytes).unwrap();
    let index_bytes = std::fs::read(new.join(INDEX_FILE)).unwrap();
    let index = DeltaIndex::parse(&index_bytes).unwrap();
    index.validate_against(&manifest, &manifest_bytes).unwrap();
    let delta = index.deltas[0].clone();
    let delta_bytes = std::fs::read(new.join(&delta.name)).unwrap();
    assert_eq!(flotilla_proto::sha256_hex(&delta_bytes), delta.sha256);
    assert!(
        delta.size * 100 < v2.len() as u64,
        "a {} byte delta for a few changed bytes of {}",
        delta.size,
        v2.len()
    );
    patch::sign(&server, &manifest_path, &key);
    let signature = signature_of(&new);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    flotilla_proto::install_crypto_provider();
    rt.block_on(async {
        let mut admin = enroll::admin(&server).await;
        let request = |deltas: Vec<u8>| pb::PublishPatchRequest {
            manifest: manifest_bytes.clone(),
            signatures: vec![signature.clone()],
            deltas,
            ..Default::default()
        };
        // An index for other manifest bytes is refused before anything else.
        let mut other = index.clone();
        other.manifest_sha256 = "0".repeat(64);
        let e = admin
            .publish_patch(request(other.to_bytes()))
            .await
            .unwrap_err();
        refused(
            e,
            tonic::Code::InvalidArgument,
            "delta index refused: delta index is for the manifest with sha256 0000",
        );
        // With the artifact held but not its delta: refused like a missing artifact.
        let target = &manifest.artifacts[0];
        let chunks: Vec<pb::ArtifactUpload> = v2
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| pb::ArtifactUpload {
                sha256: if i == 0 {
                    target.sha256.clone()
                } else {
                    String::new()
                },
                size: if i == 0 { target.size } else { 0 },
                offset: 0,
                data: c.to_vec(),
            })
            .collect();
        let held = admin
            .upload_artifact(tokio_stream::iter(chunks))
            .await
            .unwrap()
            .into_inner();
        assert!(held.complete);
        let e = admin
            .publish_patch(request(index_bytes.clone()))
            .await
            .unwrap_err();
        refused(
            e,
            tonic::Code::FailedPrecondition,
            &format!(
                "delta {} ({}) has not been uploaded",
                delta.name, delta.sha256
            ),
        );
    });

    // `patch publish` uploads the delta and sends the index.
    let (ok, out, err) = patch::publish(&server, &manifest_path);
    assert!(ok, "{out}{err}");
    let held = server.data_dir.join("artifacts").join(&delta.sha256);
    assert_eq!(
        std::fs::read(held).unwrap(),
        delta_bytes,
        "the server holds it"
    );
    let shown = server.cli_json(&["patch", "show", ID]);
    assert_eq!(
        shown["deltas"][0]["sha256"],
        delta.sha256.as_str(),
        "{shown}"
    );
    assert_eq!(shown["deltas"][0]["artifact"], "payload.tar", "{shown}");
    let (ok, out, err) = patch::cli(&server, &["patch", "show", ID]);
    let text = String::from_utf8(manifest_bytes.clone()).unwrap();
    assert!(ok && out.trim_end() == text.trim_end(), "{out}");
    assert!(
        err.contains(&format!("delta {}: payload.tar from base", delta.name)),
        "{err}"
    );

    // A node joining now is sent the index beside the manifest, fetches the
    // delta, and rebuilds 1.0.1's artifact from 1.0.0's.
    let token: flotilla_proto::token::JoinToken = server.token("store", 1, &[]).parse().unwrap();
    rt.block_on(async {
        let (_, mut node) = enroll::enroll(&server, "127.0.0.1", &token, None, "host-1")
            .await
            .unwrap();
        let (beat, mut states) = enroll::open_session(&mut node, "host-1").await;
        let (_, offered) = enroll::offered(&mut states, ID).await;
        assert_eq!(offered.manifest.as_ref(), manifest_bytes.as_slice());
        assert_eq!(offered.deltas.as_ref(), index_bytes.as_slice());
        beat.abort();

        let mut chunks = node
            .fetch_artifact(pb::FetchArtifactRequest {
                sha256: delta.sha256.clone(),
                offset: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut fetched = Vec::new();
        while let Some(c) = chunks.message().await.unwrap() {
            fetched.extend_from_slice(&c.data);
        }
        assert_eq!(fetched, delta_bytes);
        let fetched_path = d.join("fetched.zst");
        std::fs::write(&fetched_path, &fetched).unwrap();
        let out_dir = d.join("rebuilt");
        std::fs::create_dir(&out_dir).unwrap();
        let rebuilt = flotilla_agent::patch::delta::rebuild(
            &old.join("payload.tar"),
            &delta.base_sha256,
            &fetched_path,
            &manifest.artifacts[0],
            &out_dir,
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(rebuilt).unwrap(), v2);
    });
    assert_no_stray_files(&new, &delta.name);
}

/// The one signature in a bundle (`patch sign` names it after its key).
fn signature_of(bundle: &Path) -> String {
    let path = std::fs::read_dir(bundle)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".minisig"))
        .expect("a signature");
    std::fs::read_to_string(path).unwrap()
}

/// The bundle holds the manifest, its signature, the artifact, the delta and
/// its index, and nothing else (no temp files).
fn assert_no_stray_files(bundle: &Path, delta: &str) {
    let mut names: Vec<String> = std::fs::read_dir(bundle)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".minisig"))
        .collect();
    names.sort();
    let mut want = vec![
        INDEX_FILE.to_string(),
        "manifest.json".to_string(),
        "payload.tar".to_string(),
        delta.to_string(),
    ];
    want.sort();
    assert_eq!(names, want);
}

/// Builds a 1.0.x bundle of `data` (as `blob.bin` in the tar) into `dir/<id>`,
/// with `--delta-from` `from` when given; signs it. Returns the manifest path.
fn bundle(
    server: &Server,
    dir: &Path,
    key: &patch::Key,
    version: &str,
    data: &[u8],
    from: Option<&Path>,
) -> std::path::PathBuf {
    let id = format!("app-{version}");
    let tar = dir.join(format!("{id}.tar"));
    patch::tar(&tar, &[("blob.bin", data, 0o644)]);
    let spec = patch::files_spec(dir, &id, version, &tar, "");
    let out = dir.join(&id);
    let mut args = vec![
        "patch",
        "build",
        spec.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ];
    if let Some(from) = from {
        args.extend(["--delta-from", from.to_str().unwrap()]);
    }
    let (ok, _, err) = patch::cli(server, &args);
    assert!(ok, "patch build failed: {err}");
    let manifest = out.join("manifest.json");
    patch::sign(server, &manifest, key);
    manifest
}

/// (phase, transfer) of every node, once each reached an outcome.
fn outcomes(server: &Server, id: &str, n: usize) -> Vec<(String, serde_json::Value)> {
    patch::wait_outcomes(server, id, n);
    patch::status(server, id)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["phase"].as_str().unwrap().to_string(),
                n["transfer"].clone(),
            )
        })
        .collect()
}

/// Real agents: the one holding 1.0.0 downloads only the delta of 1.0.1 and
/// rebuilds the artifact; the one whose base is gone gets the whole artifact;
/// a delta that rebuilds other bytes is refused and the whole artifact used.
#[test]
fn agents_holding_the_base_download_only_the_delta() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, agents) = patch::signed_fleet(d, &key, 2);
    let v0 = patch::noise(5 << 20, 7);
    let m0 = bundle(&server, d, &key, "1.0.0", &v0, None);
    assert!(patch::publish(&server, &m0).0);
    let first = outcomes(&server, "app-1.0.0", 2);
    assert!(first.iter().all(|(p, _)| p == "committed"), "{first:?}");
    // The second host lost its copy of the installed version's artifact.
    let base: Manifest = Manifest::parse(&std::fs::read(&m0).unwrap()).unwrap();
    let base_sha = &base.artifacts[0].sha256;
    let kept = agents[1].state_dir.join("artifacts").join(base_sha);
    assert!(kept.exists(), "the installed version's artifact is kept");
    std::fs::remove_file(&kept).unwrap();

    let mut v1 = v0.clone();
    v1[1 << 20..(1 << 20) + 4096].copy_from_slice(&patch::noise(4096, 8));
    let m1 = bundle(&server, d, &key, "1.0.1", &v1, Some(&d.join("app-1.0.0")));
    let full = std::fs::metadata(d.join("app-1.0.1").join("payload.tar"))
        .unwrap()
        .len();
    assert!(patch::publish(&server, &m1).0);
    let second = outcomes(&server, "app-1.0.1", 2);
    eprintln!("deltas: {second:?}");
    assert!(second.iter().all(|(p, _)| p == "committed"), "{second:?}");
    let mut bytes: Vec<(u64, u64)> = second
        .iter()
        .map(|(_, t)| {
            (
                t["server_bytes"].as_u64().unwrap(),
                t["delta_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    bytes.sort();
    let (delta_node, whole_node) = (bytes[0], bytes[1]);
    assert!(
        delta_node.0 == delta_node.1 && delta_node.0 < full / 50,
        "only the delta: {bytes:?}"
    );
    assert_eq!(whole_node, (full, 0), "no base, the whole artifact");
    assert_eq!(
        patch::status(&server, "app-1.0.1")["served_bytes"],
        delta_node.0 + whole_node.0,
        "what the server sent of the patch, delta file included"
    );
    for a in &agents {
        assert_eq!(
            std::fs::read(a.root().join("opt/demo/blob.bin")).unwrap(),
            v1
        );
    }

    // 1.0.2's index claims its delta applies to 1.0.1's artifact (which both
    // hold now) but it was made from other bytes: the rebuild does not give
    // the signed bytes, and both hosts fetch the artifact whole.
    let mut v2 = v1.clone();
    v2[2 << 20..(2 << 20) + 4096].copy_from_slice(&patch::noise(4096, 9));
    // Equal to 1.0.2 but in one region, so the delta refers to 1.0.2's new
    // bytes, which 1.0.1 does not have.
    let mut other = v2.clone();
    other[4 << 20..(4 << 20) + 4096].copy_from_slice(&patch::noise(4096, 11));
    bundle(&server, d, &key, "0.9.0", &other, None);
    let m2 = bundle(&server, d, &key, "1.0.2", &v2, Some(&d.join("app-0.9.0")));
    let index_path = d.join("app-1.0.2").join(INDEX_FILE);
    let mut index = DeltaIndex::parse(&std::fs::read(&index_path).unwrap()).unwrap();
    let v1_manifest = Manifest::parse(&std::fs::read(&m1).unwrap()).unwrap();
    index.deltas[0].base_sha256 = v1_manifest.artifacts[0].sha256.clone();
    index.deltas[0].base_size = v1_manifest.artifacts[0].size;
    std::fs::write(&index_path, index.to_bytes()).unwrap();
    assert!(patch::publish(&server, &m2).0);
    let third = outcomes(&server, "app-1.0.2", 2);
    eprintln!("bad delta: {third:?}");
    for (phase, t) in &third {
        assert_eq!(phase, "committed");
        let failures = t["failures"].as_array().unwrap();
        assert!(
            failures
                .iter()
                .any(|f| f.as_str().unwrap().contains("fetching it whole")),
            "{t}"
        );
        assert!(t["server_bytes"].as_u64().unwrap() >= full, "{t}");
    }
    for a in &agents {
        assert_eq!(
            std::fs::read(a.root().join("opt/demo/blob.bin")).unwrap(),
            v2
        );
    }
}
