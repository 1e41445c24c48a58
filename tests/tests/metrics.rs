//! Prometheus metrics: `--metrics-listen` serves `/metrics` over plain HTTP;
//! a scrape parses as the text format, and a rollout moves its counters. An
//! agent's `--metrics-textfile` follows its session and its patches.

use std::io::{Read, Write};
use std::time::Duration;

use flotilla_e2e::patch::{self, FleetOptions};
use flotilla_e2e::{Server, wait_until};

const T: Duration = Duration::from_secs(120);

/// (status line, body) of `GET path` on the server's metrics address.
fn get(server: &Server, path: &str) -> (String, String) {
    let addr = std::fs::read_to_string(server.data_dir.join("metrics.addr")).unwrap();
    let mut conn = std::net::TcpStream::connect(addr.trim()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn scrape(server: &Server) -> prometheus_parse::Scrape {
    let (status, body) = get(server, "/metrics");
    assert!(status.contains("200"), "{status}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of `name` with every label in `labels`, summed over the others.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn a_scrape_parses_and_a_rollout_moves_the_counters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, mut agents) = patch::fleet(
        d,
        FleetOptions {
            agents: 2,
            server_keys: &[&key],
            pinned: &[&key],
            server_env: &[("FLOTILLA_METRICS_LISTEN", "127.0.0.1:0".to_string())],
            ..FleetOptions::default()
        },
    );
    // One agent keeps a textfile for node-exporter.
    let prom = d.join("agent0.prom");
    agents[0].kill9();
    agents[0].run_args.extend([
        "--metrics-textfile".to_string(),
        prom.to_string_lossy().into_owned(),
    ]);
    agents[0].start(&[server.url()]);
    wait_until("the agent's textfile says connected", T, || {
        let text = std::fs::read_to_string(&prom).ok()?;
        text.contains("flotilla_agent_connected 1\n").then_some(())
    });
    wait_until("both agents online", T, || {
        (server.group("store")["online"] == 2).then_some(())
    });
    let before = scrape(&server);
    assert_eq!(value(&before, "flotilla_sessions", &[]), 2.0);
    assert_eq!(
        value(
            &before,
            "flotilla_nodes",
            &[("group", "store"), ("online", "true")]
        ),
        2.0
    );
    assert_eq!(value(&before, "flotilla_reports_total", &[]), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for cert in ["ca", "server"] {
        let expiry = value(
            &before,
            "flotilla_certificate_expiry_timestamp_seconds",
            &[("certificate", cert)],
        );
        assert!(expiry > now, "{cert} expires in the future");
    }

    let tar = d.join("app.tar");
    patch::tar(&tar, &[("blob.bin", &patch::noise(100_000, 5), 0o644)]);
    let spec = patch::files_spec(d, "app-1.0.0", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &d.join("app-1.0.0"));
    patch::sign(&server, &manifest, &key);
    assert!(patch::publish(&server, &manifest).0);
    let size = std::fs::metadata(&tar).unwrap().len() as f64;
    let after = wait_until("the rollout's counters moved", T, || {
        let s = scrape(&server);
        (value(&s, "flotilla_reports_total", &[("phase", "committed")]) == 2.0
            && value(&s, "flotilla_rollouts", &[("state", "completed")]) == 1.0)
            .then_some(s)
    });
    assert!(
        value(&after, "flotilla_reports_total", &[]) > 2.0,
        "every phase counted"
    );
    assert_eq!(
        value(
            &after,
            "flotilla_rollout_nodes",
            &[("patch", "app-1.0.0"), ("nodes", "committed")]
        ),
        2.0
    );
    assert_eq!(
        value(&after, "flotilla_rollouts", &[("state", "running")]),
        0.0
    );
    assert!(value(&after, "flotilla_artifact_bytes_sent_total", &[]) >= 2.0 * size);
    assert_eq!(value(&after, "flotilla_publish_seconds_count", &[]), 1.0);
    // Each agent was sent the patch over its session; the store was timed.
    assert!(value(&after, "flotilla_push_seconds_count", &[]) >= 2.0);
    assert!(value(&after, "flotilla_store_seconds_count", &[("op", "txn")]) > 0.0);
    assert!(value(&after, "flotilla_store_seconds_count", &[("op", "get")]) > 0.0);

    let text = wait_until("the textfile has the patch", T, || {
        let text = std::fs::read_to_string(&prom).ok()?;
        text.contains("flotilla_agent_last_report_timestamp_seconds")
            .then_some(text)
    });
    let agent = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(
        value(
            &agent,
            "flotilla_agent_patch_phase",
            &[("patch", "app-1.0.0"), ("phase", "committed")]
        ),
        1.0,
        "{text}"
    );
    assert!(
        value(
            &agent,
            "flotilla_agent_certificate_expiry_timestamp_seconds",
            &[]
        ) > now
    );

    let (status, _) = get(&server, "/other");
    assert!(status.contains("404"), "{status}");
}
