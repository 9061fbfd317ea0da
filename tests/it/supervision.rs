//! Supervision, backpressure and the daemon's controls: failures injected into every actor
//! kind are restarted and end equal without duplicates; repeated failures escalate; a
//! stalled sink stops the source with exact counts; pause/resume/restart, `status`, and the
//! graceful stop.

use std::time::{Duration, Instant};

use sluice::http::metric_value;
use sluice_actors::fault::{Fault, FaultMode, Faults};
use sluice_actors::supervisor::GroupState;

use crate::kafka::kafka_toml;
use crate::pipeline::{Bed, T, validate_until_equal, workload};
use crate::support::daemon::{Daemon, InProcess, http_get, http_post, sluice};
use crate::support::{kafka_brokers, wait_until};

/// Where a fault is injected: during the snapshot (planned at start), or into the stream
/// (planned once the pipeline streams and the workload runs).
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Snapshot,
    Stream,
}

/// The restart-semantics scenario: an error, then a panic, in the named actor while a
/// workload runs; the group restarts (twice), resumes from what is acknowledged, and every
/// sink ends equal to the source, the lake without a duplicated change.
async fn error_then_panic(tag: &str, kafka: bool, actor: &str, phase: Phase, group: &str) {
    let bed = Bed::new(tag, 600).await;
    let transport = if kafka { kafka_toml(&kafka_brokers(), 2, "all") } else { String::new() };
    let toml = bed.toml("batch_rows = 50\n", &transport, &["pg", "my", "lake"], "");
    // Twelve snapshot batches per copy: the first copy fails at its fourth, the second at
    // its fourth again, the third completes.
    let planned = match phase {
        Phase::Snapshot => vec![Fault::new(actor, 3, FaultMode::Error), Fault::new(actor, 3, FaultMode::Panic)],
        Phase::Stream => Vec::new(),
    };
    let faults = Faults::new(planned);
    let daemon = InProcess::start(&toml, faults.clone());
    let load = tokio::spawn(loadgen::run(workload(&bed.source.url, 3000, 1000), Default::default()));
    if phase == Phase::Stream {
        let port = daemon.running.addr.port();
        wait_until("streaming", T, || async { http_get(port, "/ready").is_some_and(|r| r.0 == 200) }).await;
        for (mode, restarts) in [(FaultMode::Error, 1), (FaultMode::Panic, 2)] {
            faults.add(Fault::new(actor, 3, mode));
            // The fault fires at the actor's third message from now: changes keep coming
            // until it has, since the workload may be over by then (or its backlog folded
            // into a batch or two on a busy machine).
            let nudge = async {
                loop {
                    bed.source.exec("UPDATE users SET name = name WHERE id = (SELECT min(id) FROM users)").await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            tokio::select! {
                () = daemon.wait_restarts(group, restarts, T) => {}
                () = nudge => {}
            }
        }
    }
    let summary = load.await.expect("task").expect("loadgen");
    assert!(summary.changes >= 2900, "{summary:?}");
    let config = daemon.dir.path().join("sluice.toml");
    let report = validate_until_equal(&config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    let status = daemon.group(group);
    assert!(status.restarts >= 2, "{actor}: an error and a panic restart {group} twice: {status:?}");
    let (_, metrics) = daemon.http("/metrics").expect("metrics");
    assert!(metric_value(&metrics, "sluice_actor_restarts_total", None).unwrap_or(0.0) >= 2.0, "restarts counted");
    bed.assert_lake_has_no_duplicates();
    daemon.stop().expect("graceful stop");
}

#[tokio::test]
async fn snapshot_failures_restart_the_copy_and_end_equal() {
    error_then_panic("sv_snap", false, "snapshot", Phase::Snapshot, "source").await;
}

#[tokio::test]
async fn wal_reader_failures_resume_from_the_confirmed_position() {
    error_then_panic("sv_wal", false, "wal", Phase::Stream, "source").await;
}

#[tokio::test]
async fn fanout_failures_restart_the_source_side_and_end_equal() {
    error_then_panic("sv_fan", false, "fanout", Phase::Stream, "source").await;
}

#[tokio::test]
async fn mapper_failures_restart_only_their_sink() {
    error_then_panic("sv_map", false, "mapper:pg", Phase::Stream, "pg").await;
}

#[tokio::test]
async fn postgres_writer_failures_replay_without_duplicates() {
    error_then_panic("sv_wpg", false, "writer:pg", Phase::Stream, "pg").await;
}

#[tokio::test]
async fn mysql_writer_failures_replay_without_duplicates() {
    error_then_panic("sv_wmy", false, "writer:my", Phase::Stream, "my").await;
}

#[tokio::test]
async fn parquet_writer_failures_replay_without_duplicates() {
    error_then_panic("sv_wlk", false, "writer:lake", Phase::Stream, "lake").await;
}

#[tokio::test]
async fn failures_between_write_and_commit_replay_without_duplicates() {
    error_then_panic("sv_cmt", false, "commit:pg", Phase::Stream, "pg").await;
}

#[tokio::test]
async fn kafka_snapshot_failures_restart_the_copy_and_end_equal() {
    error_then_panic("sv_ksnap", true, "snapshot", Phase::Snapshot, "source").await;
}

#[tokio::test]
async fn kafka_producer_failures_resume_from_the_delivered_position() {
    error_then_panic("sv_prod", true, "producer", Phase::Stream, "source").await;
}

#[tokio::test]
async fn kafka_consumer_failures_resume_from_the_sink_offsets() {
    error_then_panic("sv_cons", true, "consumer:pg", Phase::Stream, "pg").await;
}

#[tokio::test]
async fn kafka_writer_failures_resume_from_the_sink_offsets() {
    error_then_panic("sv_kwr", true, "writer:my", Phase::Stream, "my").await;
}

/// The JSON `/api/pipelines` view of one sink.
fn pipeline_view(port: u16, sink: &str) -> serde_json::Value {
    let (_, body) = http_get(port, "/api/pipelines").expect("api");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["pipelines"].as_array().expect("pipelines").iter().find(|p| p["sink"] == sink).cloned().expect("sink")
}

#[tokio::test]
async fn repeated_failures_escalate_past_the_intensity_limit_and_spare_the_other_sinks() {
    let bed = Bed::new("sv_esc", 0).await;
    let toml = bed.toml("max_restarts = 2\nrestart_window_secs = 60\n", "", &["pg", "my"], "");
    let faults = Faults::new(Vec::new());
    let daemon = InProcess::start(&toml, faults.clone());
    let port = daemon.running.addr.port();
    wait_until("ready", T, || async { http_get(port, "/ready").is_some_and(|r| r.0 == 200) }).await;
    // From now on every write of pg fails.
    faults.add(Fault::new("writer:pg", 0, FaultMode::Error).times(1000));
    loadgen::run(workload(&bed.source.url, 300, 1000), Default::default()).await.expect("loadgen");
    let failed = daemon.wait_state("pg", T, |s| matches!(s, GroupState::Failed(_))).await;
    let GroupState::Failed(cause) = &failed.state else { unreachable!() };
    assert!(cause.contains("2 restarts within 60s") && cause.contains("fault planned"), "{cause}");
    assert_eq!(failed.restarts, 2);
    // The process keeps serving: healthy, not ready, and the API names the cause.
    assert_eq!(http_get(port, "/health").map(|r| r.0), Some(200));
    let (code, body) = http_get(port, "/ready").expect("ready");
    assert_eq!(code, 503, "{body}");
    let view = pipeline_view(port, "pg");
    assert_eq!(view["state"]["state"], "failed", "{view}");
    assert!(view["state"]["detail"].as_str().unwrap_or("").contains("restarts within"), "{view}");
    // The other sink streams on.
    let config = daemon.dir.path().join("sluice.toml");
    let report = validate_until_equal(&config, Some("my"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert!(matches!(daemon.group("source").state, GroupState::Running));
    daemon.stop().expect("graceful stop");
}

#[tokio::test]
async fn a_never_policy_stops_only_its_pipeline_until_restarted_by_the_api() {
    let bed = Bed::new("sv_never", 100).await;
    let toml = bed.toml("", "", &["pg", "my"], "restart = \"never\"\n");
    let faults = Faults::new(vec![Fault::new("writer:pg", 5, FaultMode::Panic)]);
    let daemon = InProcess::start(&toml, faults);
    let port = daemon.running.addr.port();
    let load = tokio::spawn(loadgen::run(workload(&bed.source.url, 600, 600), Default::default()));
    let failed = daemon.wait_state("pg", T, |s| matches!(s, GroupState::Failed(_))).await;
    assert_eq!(failed.restarts, 0, "never restarted");
    assert!(format!("{:?}", failed.state).contains("panic"), "{failed:?}");
    load.await.expect("task").expect("loadgen");
    let config = daemon.dir.path().join("sluice.toml");
    let report = validate_until_equal(&config, Some("my"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert!(matches!(daemon.group("source").state, GroupState::Running), "the source goes on");
    assert!(matches!(daemon.group("pg").state, GroupState::Failed(_)), "pg stays down");
    // An operator restarts it: it catches up from what it holds.
    assert_eq!(http_post(port, "/api/pipelines/pg/restart").map(|r| r.0), Some(200));
    let report = validate_until_equal(&config, Some("pg"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert_eq!(http_get(port, "/ready").map(|r| r.0), Some(200));
    daemon.stop().expect("graceful stop");
}

/// Sum of a metric over the series whose `actor` label is exactly `actor`.
fn actor_metric(text: &str, name: &str, actor: &str) -> u64 {
    metric_value(text, name, Some(("actor", actor))).unwrap_or(0.0) as u64
}

struct Flow {
    /// Units the source put into the fan-out's mailbox.
    emitted: u64,
    /// Units the writer took out of its mailbox.
    taken: u64,
    depths: [u64; 3],
}

fn flow(port: u16) -> Flow {
    let (_, text) = http_get(port, "/metrics").expect("metrics");
    let depth = |a| actor_metric(&text, "sluice_mailbox_depth", a);
    let sent = |a| actor_metric(&text, "sluice_mailbox_sent_total", a);
    Flow {
        emitted: sent("fanout"),
        taken: sent("pg.writer") - depth("pg.writer"),
        depths: [depth("fanout"), depth("pg.mapper"), depth("pg.writer")],
    }
}

/// The flow once nothing has moved for two seconds.
async fn settled(port: u16) -> Flow {
    let mut last = flow(port);
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = flow(port);
        if (now.emitted, now.taken, now.depths) != (last.emitted, last.taken, last.depths) {
            (last, still_since) = (now, Instant::now());
        }
    }
    last
}

#[tokio::test]
async fn a_stalled_sink_stops_the_source_with_exact_counts_and_it_resumes_after() {
    const CAPACITY: u64 = 20;
    let bed = Bed::new("sv_bp", 0).await;
    // One row per batch and per transaction: every message weighs one unit, so full
    // mailboxes hold exactly their capacity. No heartbeats, no stall detachment.
    let pipeline = format!("batch_rows = 1\nmailbox_rows = {CAPACITY}\nsink_stall_timeout_secs = 0\n");
    let toml = bed.toml(&pipeline, "", &["pg"], "").replace("heartbeat_secs = 1", "heartbeat_secs = 3600");
    let faults = Faults::new(Vec::new());
    let daemon = InProcess::start(&toml, faults.clone());
    let port = daemon.running.addr.port();
    wait_until("ready", T, || async { http_get(port, "/ready").is_some_and(|r| r.0 == 200) }).await;
    // The snapshot's end may still be on its way when the mailboxes look empty.
    let before = settled(port).await;
    assert_eq!(before.depths, [0, 0, 0], "idle");
    faults.add(Fault::new("writer:pg", 0, FaultMode::Stall));
    let mut options = workload(&bed.source.url, 300, 0);
    (options.txn_size, options.tables, options.mix) =
        (1, vec![loadgen::Table::Users], "insert=100,update=0,delete=0".parse().expect("mix"));
    let summary = loadgen::run(options, Default::default()).await.expect("loadgen");
    assert_eq!(summary.changes, 300);
    let stalled = settled(port).await;
    let emitted = stalled.emitted - before.emitted;
    let taken = stalled.taken - before.taken;
    assert_eq!(stalled.depths, [CAPACITY; 3], "every mailbox is exactly full");
    // Up to two units per transaction (its row and its checkpoint) wait in the WAL: the source
    // stopped reading. In flight: the three mailboxes, plus the one message the fan-out and
    // the mapper each hold while they wait to hand it on.
    assert_eq!(taken, 1, "the writer took one message and stalled on it");
    assert_eq!(emitted, taken + 3 * CAPACITY + 2, "emitted = taken + buffer capacity");
    assert!(emitted < 2 * summary.changes, "the rest waits in PostgreSQL's WAL");
    assert!(bed.pg.count("users").await <= 0, "nothing applied");
    // The sink goes on: everything arrives.
    faults.release("writer:pg");
    let config = daemon.dir.path().join("sluice.toml");
    let report = validate_until_equal(&config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    // Everything the source emitted reached the writer (the checkpoints of consecutive
    // transactions read at once travel as one, so their number depends on timing).
    wait_until("every message taken by the writer", T, || async {
        let f = flow(port);
        f.depths == [0, 0, 0] && f.taken - before.taken == f.emitted - before.emitted
    })
    .await;
    daemon.stop().expect("graceful stop");
}

#[tokio::test]
async fn pause_resume_and_status_through_the_api() {
    let bed = Bed::new("sv_pause", 50).await;
    let daemon = Daemon::start(&bed.toml("", "", &["pg", "my"], ""));
    daemon.wait_http(T).await;
    wait_until("ready", T, || async { daemon.get("/ready").is_some_and(|r| r.0 == 200) }).await;
    wait_until("snapshot applied", T, || async { bed.pg.count("users").await == 50 }).await;
    assert_eq!(http_post(daemon.port, "/api/pipelines/pg/pause").map(|r| r.0), Some(200));
    assert_eq!(pipeline_view(daemon.port, "pg")["state"]["state"], "paused");
    let url = format!("http://127.0.0.1:{}", daemon.port);
    let (code, out) = sluice(&["status", "--url", &url]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pg") && out.contains("paused") && out.contains("my"), "{out}");
    loadgen::run(workload(&bed.source.url, 300, 1000), Default::default()).await.expect("loadgen");
    // The other sink goes on while this one is paused.
    let report = validate_until_equal(&daemon.config, Some("my"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert_eq!(bed.pg.count("users").await, 50, "a paused sink applies nothing");
    assert_eq!(daemon.get("/ready").map(|r| r.0), Some(200), "paused is intended, not a failure");
    assert_eq!(http_post(daemon.port, "/api/pipelines/pg/resume").map(|r| r.0), Some(200));
    let report = validate_until_equal(&daemon.config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert_eq!(http_post(daemon.port, "/api/pipelines/my/restart").map(|r| r.0), Some(200));
    assert_eq!(http_post(daemon.port, "/api/pipelines/nope/pause").map(|r| r.0), Some(404));
    assert_eq!(http_post(daemon.port, "/api/pipelines/pg/explode").map(|r| r.0), Some(404));
    wait_until("ready after restart", T, || async { daemon.get("/ready").is_some_and(|r| r.0 == 200) }).await;
}

#[tokio::test]
async fn sigterm_drains_and_exits_0_and_a_second_signal_exits_at_once() {
    let bed = Bed::new("sv_term", 100).await;
    let mut daemon = Daemon::start(&bed.toml("", "", &["pg", "lake"], ""));
    daemon.wait_http(T).await;
    let load = tokio::spawn(loadgen::run(workload(&bed.source.url, 2000, 1000), Default::default()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    assert_eq!(daemon.term(T).code(), Some(0), "{}", daemon.logs());
    assert!(daemon.logs().contains("drained"), "{}", daemon.logs());
    assert!(started.elapsed() < Duration::from_secs(20), "within the shutdown deadline");
    let mut daemon = daemon.restart();
    daemon.wait_http(T).await;
    load.await.expect("task").expect("loadgen");
    let report = validate_until_equal(&daemon.config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}\n{}", report.lines, daemon.logs());
    bed.assert_lake_has_no_duplicates();
    // Two signals in a row: no waiting for the drain.
    let started = Instant::now();
    daemon.signal("-TERM");
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(T).code(), Some(0), "{}", daemon.logs());
    assert!(started.elapsed() < Duration::from_secs(5), "{}", daemon.logs());
}
