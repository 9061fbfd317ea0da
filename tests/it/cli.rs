//! Configuration, `check`, and the daemon's HTTP endpoints and signals (binary).

use std::time::Duration;

use sluice::config::Config;

use crate::support::daemon::{Daemon, sluice};
use crate::support::{PgDb, TempDir, loadgen_schema};

#[test]
fn every_file_in_conf_parses_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("conf/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 5, "conf/ holds {n} configurations");
}

const GOOD_SOURCE: &str =
    "[source]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\ntables = [\"public.users\"]\n";
const GOOD_SINK: &str =
    "[[sink]]\nname = \"replica\"\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/replica\"\n";

#[test]
fn bad_configurations_exit_1_naming_the_key() {
    let dir = TempDir::new("badconf");
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("unknown key", format!("{GOOD_SOURCE}bogus = 1\n{GOOD_SINK}"), &["bogus", "unknown key"]),
        (
            "missing key",
            format!("[source]\nkind = \"postgres\"\ntables = [\"public.users\"]\n{GOOD_SINK}"),
            &["url", "missing"],
        ),
        (
            "wrong type",
            format!(
                "{GOOD_SOURCE}[[sink]]\nname = \"lake\"\nkind = \"parquet\"\npath = \"x\"\nrotate_rows = \"many\"\n"
            ),
            &["rotate_rows"],
        ),
        (
            "bad url",
            GOOD_SOURCE.replace("postgres://postgres@127.0.0.1:5432/app", "not a url") + GOOD_SINK,
            &["source.url"],
        ),
        (
            "bad sink url scheme",
            format!("{GOOD_SOURCE}{}", GOOD_SINK.replace("postgres://", "http://")),
            &["sink[0].url", "scheme"],
        ),
        ("unknown sink kind", format!("{GOOD_SOURCE}[[sink]]\nname = \"o\"\nkind = \"oracle\"\n"), &["kind", "oracle"]),
        (
            "zero rotation",
            format!("{GOOD_SOURCE}[[sink]]\nname = \"lake\"\nkind = \"parquet\"\npath = \"x\"\nrotate_rows = 0\n"),
            &["sink[0].rotate_rows", "> 0"],
        ),
        (
            "lanes on a parquet sink",
            format!("{GOOD_SOURCE}[[sink]]\nname = \"lake\"\nkind = \"parquet\"\npath = \"x\"\nlanes = 2\n"),
            &["sink[0].lanes", "only PostgreSQL and MySQL"],
        ),
        ("no sink", GOOD_SOURCE.to_string(), &["sink"]),
        ("duplicate sink", format!("{GOOD_SOURCE}{GOOD_SINK}{GOOD_SINK}"), &["sink[1].name"]),
        (
            "kafka without brokers",
            format!("{GOOD_SOURCE}[transport]\nkind = \"kafka\"\n{GOOD_SINK}"),
            &["transport.brokers"],
        ),
        (
            "missing mapping file",
            format!("{GOOD_SOURCE}{GOOD_SINK}mapping = \"nope.sql\"\n"),
            &["sink[0].mapping", "nope.sql"],
        ),
    ];
    for (what, toml, expected) in cases {
        let path = dir.write("bad.toml", &toml);
        for command in ["check", "run"] {
            let (code, out) = sluice(&[command, "--config", path.to_str().expect("path")]);
            assert_eq!(code, 1, "{what} ({command}): exit code, output:\n{out}");
            for e in expected {
                assert!(out.contains(e), "{what} ({command}): {e:?} not in:\n{out}");
            }
            assert!(!out.contains("panicked") && !out.contains("RUST_BACKTRACE"), "{what}: {out}");
        }
    }
    let (code, out) = sluice(&["check", "--config", "/nonexistent/sluice.toml"]);
    assert_eq!(code, 1);
    assert!(out.contains("/nonexistent/sluice.toml") && out.contains("not found"), "{out}");
}

#[test]
fn check_against_a_closed_port_names_the_endpoint_without_the_password() {
    let dir = TempDir::new("closed");
    let toml = "[source]\nkind = \"postgres\"\nurl = \"postgres://app:topsecret@127.0.0.1:1/app\"\ntables = [\"public.users\"]\n\
         [[sink]]\nname = \"replica\"\nkind = \"mysql\"\nurl = \"mysql://root:alsosecret@127.0.0.1:2/replica\"\n";
    let path = dir.write("closed.toml", toml);
    let (code, out) = sluice(&["check", "--config", path.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("127.0.0.1:1"), "source endpoint named: {out}");
    assert!(out.contains("127.0.0.1:2") && out.contains("replica"), "sink endpoint named: {out}");
    assert!(!out.contains("topsecret") && !out.contains("alsosecret"), "password printed: {out}");
    assert!(out.lines().filter(|l| l.starts_with("error:")).count() >= 2, "{out}");
}

#[test]
fn check_names_a_kafka_setting_librdkafka_refuses() {
    let dir = TempDir::new("kafkaopt");
    // A consumer's fetch below its message.max.bytes (a contradiction only consumers
    // have), and a property librdkafka does not know.
    for (key, value, named) in
        [("fetch.max.bytes", "1000", "consumer"), ("no.such.property", "1", "No such configuration property")]
    {
        let toml = format!(
            "{GOOD_SOURCE}[transport]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:1\"\n\
             [transport.options]\n\"{key}\" = \"{value}\"\n{GOOD_SINK}"
        );
        let path = dir.write("kafkaopt.toml", &toml);
        let (code, out) = sluice(&["check", "--config", path.to_str().expect("path")]);
        assert_eq!(code, 1, "{out}");
        let line = out.lines().find(|l| l.contains("transport.options")).unwrap_or_else(|| panic!("{key}: {out}"));
        assert!(line.contains(key) && line.contains(named), "{line}");
    }
}

/// A daemon copying a fresh `public.users` into a PostgreSQL sink named `replica`; the
/// databases live as long as the returned handles.
async fn users_to_replica(name: &str) -> (PgDb, PgDb, Daemon) {
    let source = PgDb::create(&format!("{name}_src")).await;
    let sink = PgDb::create(&format!("{name}_dst")).await;
    loadgen_schema(&source).await;
    let toml = format!(
        "[source]\nkind = \"postgres\"\nurl = \"{}\"\ntables = [\"public.users\"]\nslot = \"{}\"\npublication = \"{}\"\n\
         [[sink]]\nname = \"replica\"\nkind = \"postgres\"\nurl = \"{}\"\n",
        source.url, source.name, source.name, sink.url
    );
    let daemon = Daemon::start(&toml);
    (source, sink, daemon)
}

#[tokio::test]
async fn the_daemon_serves_health_ready_metrics_and_stops_on_sigterm() {
    let (_source, _sink, mut daemon) = users_to_replica("cli").await;
    daemon.wait_http(Duration::from_secs(30)).await;
    assert_eq!(daemon.get("/health").map(|r| r.0), Some(200));
    crate::support::wait_until("ready", Duration::from_secs(30), || async {
        daemon.get("/ready").map(|r| r.0) == Some(200)
    })
    .await;
    let (status, metrics) = daemon.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("sluice_mailbox_depth"), "{metrics}");
    let (status, api) = daemon.get("/api/pipelines").expect("api");
    assert_eq!(status, 200);
    let api: serde_json::Value = serde_json::from_str(&api).expect("json");
    assert_eq!(api["pipelines"][0]["sink"], "replica");
    assert!(!api.to_string().contains("topsecret"));
    let status = daemon.term(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(daemon.logs().contains("drained"), "{}", daemon.logs());
}

#[tokio::test]
async fn status_prints_the_pipelines_of_a_running_daemon() {
    let (_source, _sink, mut daemon) = users_to_replica("status").await;
    daemon.wait_http(Duration::from_secs(30)).await;
    let url = format!("http://127.0.0.1:{}", daemon.port);
    let (code, out) = sluice(&["status", "--url", &url]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replica") && out.contains("postgres"), "{out}");
    let (code, out) = sluice(&["status", "--url", "http://127.0.0.1:1"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("127.0.0.1:1"));
    assert_eq!(daemon.term(Duration::from_secs(30)).code(), Some(0));
}
