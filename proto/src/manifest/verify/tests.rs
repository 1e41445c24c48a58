use super::*;
use crate::manifest::{Install, Manifest};

struct Key {
    pk_text: String,
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
}

fn key() -> Key {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    Key {
        pk_text: kp.pk.to_box().unwrap().into_string(),
        sk: kp.sk,
        pk: kp.pk,
    }
}

fn sign(k: &Key, bytes: &[u8]) -> String {
    minisign::sign(Some(&k.pk), &k.sk, bytes, Some("flotilla test"), None)
        .unwrap()
        .into_string()
}

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn manifest_json() -> String {
    format!(
        r#"{{
  "schema": 1,
  "id": "app-1.2.0",
  "component": "app",
  "version": "1.2.0",
  "severity": "critical",
  "issued_at": "2026-01-01T00:00:00Z",
  "expires_at": "2027-01-01T00:00:00Z",
  "targets": {{ "groups": ["store-eu"], "arch": ["x86_64"], "labels": {{ "site": "b" }} }},
  "artifacts": [{{ "name": "app.tar", "sha256": "{SHA}", "size": 10 }}],
  "install": {{ "type": "files", "artifact": "app.tar", "destination": "/opt/app" }}
}}"#
    )
}

fn at(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

#[test]
fn one_trusted_signature_verifies() {
    let k = key();
    let policy = TrustPolicy::new(std::slice::from_ref(&k.pk_text), 1).unwrap();
    let bytes = manifest_json();
    let m = policy
        .verify(bytes.as_bytes(), &[sign(&k, bytes.as_bytes())])
        .unwrap();
    assert_eq!(m.id, "app-1.2.0");
    assert!(matches!(m.install, Install::Files { .. }));
}

#[test]
fn untrusted_key_is_refused() {
    let (trusted, other) = (key(), key());
    let policy = TrustPolicy::new(std::slice::from_ref(&trusted.pk_text), 1).unwrap();
    let bytes = manifest_json();
    let err = policy
        .verify(bytes.as_bytes(), &[sign(&other, bytes.as_bytes())])
        .unwrap_err();
    assert_eq!(err, ManifestError::Untrusted);
}

#[test]
fn modified_after_signing_is_refused() {
    let k = key();
    let policy = TrustPolicy::new(std::slice::from_ref(&k.pk_text), 1).unwrap();
    let bytes = manifest_json();
    let sig = sign(&k, bytes.as_bytes());
    let tampered = bytes.replace("1.2.0\",\n  \"severity", "9.9.9\",\n  \"severity");
    assert_ne!(tampered, bytes);
    assert_eq!(
        policy
            .verify(tampered.as_bytes(), std::slice::from_ref(&sig))
            .unwrap_err(),
        ManifestError::OtherBytes { index: 0 }
    );
    // Even whitespace counts: the exact bytes are what was signed.
    let spaced = format!("{bytes} ");
    assert_eq!(
        policy.verify(spaced.as_bytes(), &[sig]).unwrap_err(),
        ManifestError::OtherBytes { index: 0 }
    );
}

#[test]
fn threshold_needs_distinct_keys() {
    let (a, b) = (key(), key());
    let policy = TrustPolicy::new(&[a.pk_text.clone(), b.pk_text.clone()], 2).unwrap();
    let bytes = manifest_json();
    let sa = sign(&a, bytes.as_bytes());
    let err = policy
        .verify(bytes.as_bytes(), std::slice::from_ref(&sa))
        .unwrap_err();
    assert_eq!(err, ManifestError::BelowThreshold { have: 1, need: 2 });
    // The same key twice is still one key.
    let sa2 = sign(&a, bytes.as_bytes());
    let err = policy
        .verify(bytes.as_bytes(), &[sa.clone(), sa2])
        .unwrap_err();
    assert_eq!(err, ManifestError::BelowThreshold { have: 1, need: 2 });
    let sb = sign(&b, bytes.as_bytes());
    assert!(policy.verify(bytes.as_bytes(), &[sa, sb]).is_ok());
    // The same key listed twice in the policy does not count twice either.
    assert!(TrustPolicy::new(&[a.pk_text.clone(), a.pk_text.clone()], 2).is_err());
}

#[test]
fn garbage_signature_is_named() {
    let k = key();
    let policy = TrustPolicy::new(std::slice::from_ref(&k.pk_text), 1).unwrap();
    let err = policy
        .verify(manifest_json().as_bytes(), &["not a signature".into()])
        .unwrap_err();
    assert!(
        matches!(err, ManifestError::BadSignature { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn strict_parsing() {
    let good = manifest_json();
    assert!(Manifest::parse(good.as_bytes()).is_ok());
    let unknown = good.replace("\"schema\": 1,", "\"schema\": 1, \"surprise\": true,");
    assert!(matches!(
        Manifest::parse(unknown.as_bytes()),
        Err(ManifestError::Parse(_))
    ));
    let dup = good.replace("\"schema\": 1,", "\"schema\": 1, \"schema\": 1,");
    assert!(matches!(
        Manifest::parse(dup.as_bytes()),
        Err(ManifestError::Parse(_))
    ));
    let dup_label = good.replace("\"site\": \"b\"", "\"site\": \"b\", \"site\": \"c\"");
    let err = Manifest::parse(dup_label.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("duplicate key"), "{err}");
    let bad_name = good.replace("\"name\": \"app.tar\"", "\"name\": \"../app.tar\"");
    assert!(matches!(
        Manifest::parse(bad_name.as_bytes()),
        Err(ManifestError::Invalid(_))
    ));
    let rel_dest = good.replace("\"/opt/app\"", "\"opt/app\"");
    assert!(matches!(
        Manifest::parse(rel_dest.as_bytes()),
        Err(ManifestError::Invalid(_))
    ));
    let dotdot = good.replace("\"/opt/app\"", "\"/opt/../etc\"");
    assert!(matches!(
        Manifest::parse(dotdot.as_bytes()),
        Err(ManifestError::Invalid(_))
    ));
    let huge = format!("{good}{}", " ".repeat(70 * 1024));
    assert!(matches!(
        Manifest::parse(huge.as_bytes()),
        Err(ManifestError::TooLarge { .. })
    ));
    let script_rollback_for_files = good.replace(
        "\"destination\": \"/opt/app\" }",
        "\"destination\": \"/opt/app\" },\n  \"rollback\": { \"type\": \"script\", \"artifact\": \"app.tar\" }",
    );
    let err = Manifest::parse(script_rollback_for_files.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("restore"), "{err}");
    let schema2 = good.replace("\"schema\": 1,", "\"schema\": 2,");
    assert!(matches!(
        Manifest::parse(schema2.as_bytes()),
        Err(ManifestError::Invalid(_))
    ));
}

#[test]
fn expiry_is_checked_against_the_given_time() {
    let m = Manifest::parse(manifest_json().as_bytes()).unwrap();
    assert!(check_time(&m, at("2026-06-01T00:00:00Z")).is_ok());
    assert!(matches!(
        check_time(&m, at("2027-01-01T00:00:00Z")),
        Err(ManifestError::Expired { .. })
    ));
    assert!(matches!(
        check_time(&m, at("2025-12-31T00:00:00Z")),
        Err(ManifestError::NotYetValid { .. })
    ));
}

#[test]
fn targets() {
    let m = Manifest::parse(manifest_json().as_bytes()).unwrap();
    let mut node = NodeTarget {
        group: "store-eu".into(),
        labels: [("site".to_string(), "b".to_string())].into(),
        os: "linux".into(),
        arch: "x86_64".into(),
    };
    assert!(check_target(&m, &node).is_ok());
    node.arch = "aarch64".into();
    let err = check_target(&m, &node).unwrap_err();
    assert!(err.to_string().contains("arch"), "{err}");
    node.arch = "x86_64".into();
    node.group = "store-us".into();
    assert!(
        check_target(&m, &node)
            .unwrap_err()
            .to_string()
            .contains("groups")
    );
    node.group = "store-eu".into();
    node.labels.clear();
    assert!(
        check_target(&m, &node)
            .unwrap_err()
            .to_string()
            .contains("site=b")
    );
}

#[test]
fn downgrade_needs_the_signed_flag() {
    let m = Manifest::parse(manifest_json().as_bytes()).unwrap();
    assert!(check_version(&m, None).is_ok());
    assert!(check_version(&m, Some("1.1.9")).is_ok());
    assert!(check_version(&m, Some("1.2.0")).is_ok());
    assert!(matches!(
        check_version(&m, Some("1.10.0")),
        Err(ManifestError::Downgrade { .. })
    ));
    let allowed = Manifest {
        allow_downgrade: true,
        ..m
    };
    assert!(check_version(&allowed, Some("1.10.0")).is_ok());
}

mod properties {
    //! Over random edits of a signed manifest: the verifier accepts the exact
    //! signed bytes only, and the parser never panics and never accepts what
    //! it cannot give back unchanged.

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_change_to_signed_bytes_is_refused(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)
        ) {
            let k = key();
            let policy = TrustPolicy::new(std::slice::from_ref(&k.pk_text), 1).unwrap();
            let bytes = manifest_json().into_bytes();
            let sig = sign(&k, &bytes);
            let mut edited = bytes.clone();
            for (at, b) in &edits {
                let i = at.index(edited.len());
                edited[i] = *b;
            }
            prop_assume!(edited != bytes);
            prop_assert!(policy.verify(&edited, std::slice::from_ref(&sig)).is_err());
            prop_assert!(policy.verify(&bytes, &[sig]).is_ok());
        }

        #[test]
        fn the_parser_takes_any_bytes_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            cut in any::<prop::sample::Index>(),
        ) {
            let _ = Manifest::parse(&bytes);
            // Truncations of a real manifest: refused, never half-read.
            let good = manifest_json().into_bytes();
            let n = cut.index(good.len());
            prop_assert!(Manifest::parse(&good[..n]).is_err());
        }

        #[test]
        fn what_the_parser_accepts_has_the_fields_it_was_given(
            version in (0u32..50, 0u32..50, 0u32..50),
            component in "[a-z][a-z0-9-]{0,20}",
        ) {
            let (a, b, c) = version;
            let text = manifest_json()
                .replace("\"version\": \"1.2.0\"", &format!("\"version\": \"{a}.{b}.{c}\""))
                .replace("\"component\": \"app\"", &format!("\"component\": \"{component}\""));
            let m = Manifest::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(m.version, format!("{a}.{b}.{c}"));
            prop_assert_eq!(m.component, component);
        }
    }
}

#[test]
fn one_key_given_as_file_and_as_line_counts_once() {
    let k = key();
    let line = k.pk_text.lines().last().unwrap().trim().to_string();
    // Both forms of one key: a policy of one distinct key, so a threshold of 2
    // cannot be met by its one signature.
    assert!(TrustPolicy::new(&[k.pk_text.clone(), line], 2).is_err());
}
