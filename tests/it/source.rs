//! The PostgreSQL source actor against the real local server.

use std::collections::HashMap;
use std::time::Duration;

use sluice_actors::error::Error;
use sluice_actors::fault::Faults;
use sluice_actors::message::{Change, Event, Op, Position};
use sluice_actors::source::SnapshotMode;
use sluice_actors::value::{Interval, Value, days_from_civil};

use crate::support::capture::{Capture, options};
use crate::support::{PgDb, TYPES_DDL, TYPES_ROWS, pg_connect, wait_until};

const T: Duration = Duration::from_secs(30);

fn by_id(changes: &[Change]) -> HashMap<i32, &Change> {
    changes
        .iter()
        .filter_map(|c| match c.after.as_ref().or(c.before.as_ref()).map(|r| &r[0]) {
            Some(Value::Int4(id)) => Some((*id, c)),
            _ => None,
        })
        .collect()
}

fn col(change: &Change, i: usize) -> &Value {
    &change.after.as_ref().expect("after image")[i]
}

fn check_types(rows: &HashMap<i32, &Change>) {
    let r1 = rows[&1];
    assert_eq!(col(r1, 1), &Value::Int2(7));
    assert_eq!(col(r1, 3), &Value::Int8(9_000_000_000));
    assert_eq!(col(r1, 4), &Value::Numeric("1234.567".into()));
    assert_eq!(col(r1, 5), &Value::Numeric("3.14159265358979323846".into()));
    assert_eq!(col(r1, 6), &Value::Float4(1.5));
    assert_eq!(col(r1, 8), &Value::Bool(true));
    assert_eq!(col(r1, 11), &Value::Text("ch   ".into()));
    assert_eq!(col(r1, 12), &Value::Date(days_from_civil(2024, 2, 29) as i32));
    assert_eq!(col(r1, 13), &Value::Time((13 * 3600 + 45 * 60 + 7) * 1_000_000 + 123_456));
    let ts = days_from_civil(2024, 2, 29) * 86_400_000_000 + (13 * 3600 + 45 * 60 + 7) * 1_000_000 + 123_456;
    assert_eq!(col(r1, 14), &Value::Timestamp(ts));
    assert_eq!(col(r1, 15), &Value::TimestampTz(ts - 2 * 3_600_000_000));
    assert_eq!(
        col(r1, 16),
        &Value::Interval(Interval { months: 14, days: 3, micros: (4 * 3600 + 5 * 60 + 6) * 1_000_000 + 500_000 })
    );
    assert_eq!(col(r1, 17), &Value::Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11));
    assert_eq!(col(r1, 18), &Value::Json("{\"a\": [1, 2]}".into()));
    assert_eq!(col(r1, 19), &Value::Json("{\"b\": {\"c\": null}}".into()));
    assert_eq!(col(r1, 20), &Value::Bytes(vec![0, 255, 16]));
    assert_eq!(col(r1, 21), &Value::Array(vec![Value::Int4(1), Value::Null, Value::Int4(3)]));
    assert_eq!(
        col(r1, 22),
        &Value::Array(vec![Value::Text("a,b".into()), Value::Text("say \"hi\"".into()), Value::Null])
    );
    assert_eq!(col(r1, 23), &Value::Text("happy".into()));
    let r2 = rows[&2];
    assert_eq!(col(r2, 1), &Value::Int2(i16::MIN));
    assert_eq!(col(r2, 3), &Value::Int8(i64::MIN));
    assert_eq!(col(r2, 5), &Value::Numeric("NaN".into()));
    assert!(matches!(col(r2, 6), Value::Float4(f) if f.is_nan()));
    assert_eq!(col(r2, 7), &Value::Float8(f64::NEG_INFINITY));
    assert_eq!(col(r2, 9), &Value::Text("tab\there\nnewline \\ backslash 'quote' ü€😀".into()));
    assert_eq!(col(r2, 10), &Value::Text(String::new()));
    assert_eq!(col(r2, 12), &Value::Date(i32::MIN));
    assert_eq!(col(r2, 14), &Value::Timestamp(i64::MAX));
    assert_eq!(col(r2, 16), &Value::Interval(Interval { months: 0, days: -1, micros: -1_000_000 }));
    assert_eq!(col(r2, 20), &Value::Bytes(vec![]));
    assert_eq!(col(r2, 21), &Value::Array(vec![]));
    let r3 = rows[&3];
    assert!(r3.after.as_ref().expect("after")[1..].iter().all(|v| *v == Value::Null));
}

#[tokio::test]
async fn every_type_decodes_in_the_snapshot_and_in_the_stream() {
    let db = PgDb::create("types").await;
    db.exec(TYPES_DDL).await;
    db.exec(TYPES_ROWS).await;
    let capture = Capture::start(
        options(&db.url, &db.name, &["public.types"], SnapshotMode::Initial),
        None,
        Faults::default(),
        true,
    );
    let snapshot = capture.wait_changes(3, T).await;
    assert!(snapshot.iter().all(|c| c.op == Op::Read && c.position.lsn == 0));
    check_types(&by_id(&snapshot));
    // The same rows through the stream.
    db.exec("DELETE FROM types").await;
    db.exec(TYPES_ROWS).await;
    let all = capture.wait_changes(9, T).await;
    let stream: Vec<Change> = all[6..].to_vec();
    assert!(stream.iter().all(|c| c.op == Op::Insert && c.position.lsn > 0));
    check_types(&by_id(&stream));
    capture.stop().await.expect("stop");
}

#[tokio::test]
async fn every_operation_carries_its_position_and_images() {
    let db = PgDb::create("ops").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE full_t (id int PRIMARY KEY, v text); ALTER TABLE full_t REPLICA IDENTITY FULL;").await;
    let capture = Capture::start(
        options(&db.url, &db.name, &["public.t", "public.full_t"], SnapshotMode::Initial),
        None,
        Faults::default(),
        true,
    );
    capture.snapshot_done(T).await;
    db.exec(
        "BEGIN; INSERT INTO t VALUES (1, 'a'), (2, 'b'); UPDATE t SET v = 'c' WHERE id = 1; UPDATE t SET id = 3 WHERE id = 2; DELETE FROM t WHERE id = 1; COMMIT;
         INSERT INTO full_t VALUES (1, 'x'); UPDATE full_t SET v = 'y'; DELETE FROM full_t;
         TRUNCATE t;",
    )
    .await;
    let changes = capture.wait_changes(9, T).await;
    let ops: Vec<Op> = changes.iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        vec![
            Op::Insert,
            Op::Insert,
            Op::Update,
            Op::Update,
            Op::Delete,
            Op::Insert,
            Op::Update,
            Op::Delete,
            Op::Truncate
        ]
    );
    // One transaction: one commit LSN, seq 1..5.
    let txn = &changes[..5];
    assert!(txn.iter().all(|c| c.position.lsn == txn[0].position.lsn && c.xid == txn[0].xid));
    assert_eq!(txn.iter().map(|c| c.position.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    // A key change carries the old key; a plain update none (REPLICA IDENTITY DEFAULT).
    assert!(changes[2].before.is_none());
    assert_eq!(changes[3].before.as_ref().expect("old key")[0], Value::Int4(2));
    assert_eq!(changes[4].before.as_ref().expect("old key"), &vec![Value::Int4(1), Value::Null]);
    // REPLICA IDENTITY FULL: whole old rows.
    assert_eq!(changes[6].before.as_ref().expect("old row"), &vec![Value::Int4(1), Value::Text("x".into())]);
    assert_eq!(changes[7].before.as_ref().expect("old row"), &vec![Value::Int4(1), Value::Text("y".into())]);
    // Positions strictly increase across the stream; checkpoints close transactions, in
    // order, up to the last one (the statements after COMMIT ran as one implicit
    // transaction: two transactions in all; when both are read at once, one checkpoint
    // closes both).
    assert!(changes.windows(2).all(|w| w[0].position < w[1].position));
    let (first, second) = (changes[0].position.lsn, changes[5].position.lsn);
    wait_until("the last transaction's checkpoint", T, || async {
        capture.checkpoints().iter().any(|c| c.position.lsn == second)
    })
    .await;
    let txn_ends: Vec<u64> = capture
        .checkpoints()
        .iter()
        .filter(|c| c.position.seq == Position::END && c.position.lsn > 0)
        .map(|c| c.position.lsn)
        .collect();
    assert!(txn_ends == vec![first, second] || txn_ends == vec![second], "checkpoints {txn_ends:?}");
    capture.stop().await.expect("stop");
}

#[tokio::test]
async fn unchanged_toast_values_are_marked_unchanged_never_null() {
    let db = PgDb::create("toast").await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text); ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (id int PRIMARY KEY, n int, body text); ALTER TABLE docs_full ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await;
    let capture = Capture::start(
        options(&db.url, &db.name, &["public.docs", "public.docs_full"], SnapshotMode::Initial),
        None,
        Faults::default(),
        true,
    );
    capture.snapshot_done(T).await;
    db.exec(
        "INSERT INTO docs VALUES (1, 0, repeat('x', 20000)); UPDATE docs SET n = 1 WHERE id = 1;
         INSERT INTO docs_full VALUES (1, 0, repeat('y', 20000)); UPDATE docs_full SET n = 1 WHERE id = 1;",
    )
    .await;
    let changes = capture.wait_changes(4, T).await;
    assert_eq!(changes[1].op, Op::Update);
    assert_eq!(changes[1].after.as_ref().expect("after")[2], Value::Unchanged);
    assert_eq!(changes[1].after.as_ref().expect("after")[1], Value::Int4(1));
    // With the whole old row at hand, the value is filled in.
    assert_eq!(changes[3].after.as_ref().expect("after")[2], Value::Text("y".repeat(20000)));
    capture.stop().await.expect("stop");
}

#[tokio::test]
async fn an_added_column_makes_a_new_schema_version_before_its_rows() {
    let db = PgDb::create("addcol").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, a text)").await;
    let capture =
        Capture::start(options(&db.url, &db.name, &["public.t"], SnapshotMode::Initial), None, Faults::default(), true);
    capture.snapshot_done(T).await;
    db.exec("INSERT INTO t VALUES (1, 'a'); ALTER TABLE t ADD COLUMN b int; INSERT INTO t VALUES (2, 'b', 7); ALTER TABLE t DROP COLUMN a; INSERT INTO t VALUES (3, 8);").await;
    capture.wait_changes(3, T).await;
    let batches: Vec<_> = capture
        .events
        .lock()
        .expect("events")
        .iter()
        .filter_map(|e| match e {
            Event::Data(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    let versions: Vec<(u32, usize, usize)> = batches
        .iter()
        .map(|b| (b.schema.version, b.schema.columns.len(), b.changes[0].after.as_ref().map_or(0, Vec::len)))
        .collect();
    assert_eq!(versions, vec![(1, 2, 2), (2, 3, 3), (3, 2, 2)], "{versions:?}");
    assert_eq!(batches[1].changes[0].after.as_ref().expect("row")[2], Value::Int4(7));
    assert_eq!(batches[2].schema.columns[1].name, "b");
    capture.stop().await.expect("stop");
}

#[tokio::test]
async fn the_snapshot_stream_seam_misses_nothing_under_concurrent_writes() {
    let db = PgDb::create("seam").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); INSERT INTO t SELECT g, 0 FROM generate_series(1, 20000) g; ANALYZE t;").await;
    // Writers run before, during and after the slot is created and the copy runs.
    let url = db.url.clone();
    let writer = tokio::spawn(async move {
        let c = pg_connect(&url).await;
        for i in 0..600 {
            let id = (i * 37) % 20000 + 1;
            c.batch_execute(&format!(
                "BEGIN; UPDATE t SET v = v + 1 WHERE id = {id}; INSERT INTO t VALUES ({}, {i}) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v; DELETE FROM t WHERE id = {}; COMMIT;",
                20000 + i,
                (i * 53) % 20000 + 1
            ))
            .await
            .expect("write");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let capture =
        Capture::start(options(&db.url, &db.name, &["public.t"], SnapshotMode::Initial), None, Faults::default(), true);
    writer.await.expect("writer");
    let end: String = db.client().await.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    let end = pgwire_lsn(&end);
    wait_until("stream reaches the end of the writes", T, || async {
        capture.checkpoints().iter().filter_map(|c| c.confirm_lsn).max().is_some_and(|l| l >= end)
    })
    .await;
    // Replaying snapshot + stream in order must give exactly the table.
    let mut model: HashMap<i32, i32> = HashMap::new();
    for c in capture.changes() {
        let key = |r: &Vec<Value>| match r[0] {
            Value::Int4(k) => k,
            _ => panic!("key"),
        };
        match c.op {
            Op::Read | Op::Insert | Op::Update => {
                let a = c.after.as_ref().expect("after");
                if let Some(b) = &c.before {
                    model.remove(&key(b));
                }
                let Value::Int4(v) = a[1] else { panic!("v") };
                model.insert(key(a), v);
            }
            Op::Delete => {
                model.remove(&key(c.before.as_ref().expect("before")));
            }
            Op::Truncate => model.clear(),
        }
    }
    let actual: HashMap<i32, i32> = db
        .client()
        .await
        .query("SELECT id, v FROM t", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(model.len(), actual.len());
    assert!(model == actual, "replayed state differs from the table");
    capture.stop().await.expect("stop");
}

fn pgwire_lsn(text: &str) -> u64 {
    pgwire_replication::Lsn::parse(text).expect("lsn").as_u64()
}

#[tokio::test]
async fn a_restart_resumes_from_the_acknowledged_position_losing_nothing() {
    let db = PgDb::create("resume").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let opts = options(&db.url, &db.name, &["public.t"], SnapshotMode::Initial);
    let first = Capture::start(opts.clone(), None, Faults::default(), false);
    first.snapshot_done(T).await;
    for i in 1..=10 {
        db.exec(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    let read = first.wait_changes(10, T).await;
    // Acknowledge a middle checkpoint only, then crash. Transactions read at once share
    // one checkpoint (the WAL reader gathers them), so the one acknowledged closes
    // `done` rows, not necessarily five.
    let cps: Vec<_> =
        first.checkpoints().into_iter().filter(|c| c.position.lsn > 0 && c.position.seq == Position::END).collect();
    let acked = cps[(cps.len() - 1) / 2].clone();
    let done = read.iter().filter(|c| c.position <= acked.position).count() as i32;
    first.confirm.send_replace(acked.confirm_lsn.expect("confirm"));
    wait_until("slot confirmed", T, || async { slot_confirmed(&db).await >= acked.confirm_lsn.expect("confirm") })
        .await;
    first.abort();
    for i in 11..=15 {
        db.exec(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    let second = Capture::start(opts, Some(acked.position), Faults::default(), true);
    let changes = second.wait_changes(15 - done as usize, T).await;
    let ids: Vec<i32> = changes
        .iter()
        .map(|c| match c.after.as_ref().expect("row")[0] {
            Value::Int4(i) => i,
            _ => panic!(),
        })
        .collect();
    // Everything after the acknowledged transaction, nothing skipped (and no new snapshot).
    assert_eq!(ids, (done + 1..=15).collect::<Vec<_>>());
    assert!(changes.iter().all(|c| c.op == Op::Insert));
    second.stop().await.expect("stop");
}

/// A rewind asked for before the stream begins (a sink restarted between the snapshot's
/// end and the first streamed change) is announced like one asked for mid-stream: the
/// fan-out forwards nothing more to that sink until it hears `Rewound`.
#[tokio::test]
async fn a_rewind_asked_before_streaming_is_announced() {
    let db = PgDb::create("rewind_early").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let capture =
        Capture::start(options(&db.url, &db.name, &["public.t"], SnapshotMode::Never), None, Faults::default(), true);
    // The source task has not run yet: the request is pending when its stream begins.
    capture.rewind();
    wait_until("the early rewind is announced", T, || async { capture.rewounds() == 1 }).await;
    for i in 1..=3 {
        db.exec(&format!("INSERT INTO t VALUES ({i})")).await;
    }
    capture.wait_changes(3, T).await;
    capture.rewind();
    wait_until("the mid-stream rewind is announced", T, || async { capture.rewounds() == 2 }).await;
    db.exec("INSERT INTO t VALUES (4)").await;
    wait_until("every row after the rewinds", T, || async {
        let changes = capture.changes();
        let ids: std::collections::BTreeSet<i32> = by_id(&changes).into_keys().collect();
        ids == (1..=4).collect()
    })
    .await;
    capture.stop().await.expect("stop");
}

/// The slot's confirmed_flush_lsn (named after the database); 0 while it is missing or
/// still being created.
async fn slot_confirmed(db: &PgDb) -> u64 {
    let r = db
        .client()
        .await
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&db.name])
        .await;
    r.ok().and_then(|r| r.get::<_, Option<String>>(0)).map_or(0, |lsn| pgwire_lsn(&lsn))
}

#[tokio::test]
async fn an_idle_source_still_advances_its_slot() {
    let db = PgDb::create("idle").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE other (id int)").await;
    let capture =
        Capture::start(options(&db.url, &db.name, &["public.t"], SnapshotMode::Never), None, Faults::default(), true);
    let slot_lsn = || slot_confirmed(&db);
    wait_until("slot created", T, || async { slot_lsn().await > 0 }).await;
    let before = slot_lsn().await;
    // WAL written by a table that is not published.
    for i in 0..20 {
        db.exec(&format!("INSERT INTO other VALUES ({i})")).await;
    }
    wait_until("slot advances without published changes", Duration::from_secs(40), || async {
        slot_lsn().await > before
    })
    .await;
    assert!(capture.changes().is_empty());
    capture.stop().await.expect("stop");
}

async fn fatal(options: sluice_actors::source::PgSourceOptions) -> String {
    let capture = Capture::start(options, None, Faults::default(), true);
    let result = tokio::time::timeout(T, capture.task).await.expect("source ends").expect("task");
    match result {
        Err(e @ Error::Fatal(_)) => e.to_string(),
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[tokio::test]
async fn each_fatal_case_has_one_clear_message() {
    let db = PgDb::create("fatal").await;
    db.exec("CREATE TABLE nopk (a int); CREATE TABLE ok (id int PRIMARY KEY)").await;
    let msg = fatal(options(&db.url, &db.name, &["public.missing"], SnapshotMode::Initial)).await;
    assert!(msg.contains("public.missing") && msg.contains("does not exist"), "{msg}");
    let msg = fatal(options(&db.url, &db.name, &["public.nopk"], SnapshotMode::Initial)).await;
    assert!(
        msg.contains("public.nopk") && msg.contains("no primary key") && msg.contains("REPLICA IDENTITY FULL"),
        "{msg}"
    );
    // A slot of another plugin.
    let other = format!("{}_td", db.name);
    db.client()
        .await
        .execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", &[&other])
        .await
        .expect("slot");
    let mut opts = options(&db.url, &other, &["public.ok"], SnapshotMode::Initial);
    opts.publication = db.name.clone();
    let msg = fatal(opts).await;
    assert!(msg.contains(&other) && msg.contains("test_decoding") && msg.contains("pgoutput"), "{msg}");
    db.client().await.execute("SELECT pg_drop_replication_slot($1)", &[&other]).await.expect("drop");
    // A role without the REPLICATION privilege.
    let role = format!("{}_r", db.name);
    db.exec(&format!("CREATE ROLE {role} LOGIN; GRANT SELECT ON ok TO {role};")).await;
    let url = db.url.replace("postgres@", &format!("{role}@"));
    let msg = fatal(options(&url, &db.name, &["public.ok"], SnapshotMode::Initial)).await;
    assert!(msg.contains(&role) && msg.contains("REPLICATION"), "{msg}");
    db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await;
    // A dropped slot after streaming: the gap cannot be recovered silently.
    let msg = fatal_with(
        options(&db.url, &db.name, &["public.ok"], SnapshotMode::Initial),
        Some(Position { lsn: 1234, seq: Position::END }),
    )
    .await;
    assert!(msg.contains("missing") && msg.contains("snapshot = \"always\""), "{msg}");
}

async fn fatal_with(options: sluice_actors::source::PgSourceOptions, downstream: Option<Position>) -> String {
    let capture = Capture::start(options, downstream, Faults::default(), true);
    match tokio::time::timeout(T, capture.task).await.expect("source ends").expect("task") {
        Err(e @ Error::Fatal(_)) => e.to_string(),
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[tokio::test]
async fn snapshot_modes_never_and_always() {
    let db = PgDb::create("modes").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 5);").await;
    let never =
        Capture::start(options(&db.url, &db.name, &["public.t"], SnapshotMode::Never), None, Faults::default(), true);
    wait_until("streaming", T, || async {
        let r = db
            .client()
            .await
            // A slot being created is active too, but decodes only what commits after its
            // consistent point (confirmed_flush_lsn is NULL until then).
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active \
                 AND confirmed_flush_lsn IS NOT NULL",
                &[&db.name],
            )
            .await;
        r.map(|r| r.get::<_, i64>(0) == 1).unwrap_or(false)
    })
    .await;
    db.exec("INSERT INTO t VALUES (6)").await;
    let changes = never.wait_changes(1, T).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].op, Op::Insert);
    never.stop().await.expect("stop");
    let always = Capture::start(
        options(&db.url, &db.name, &["public.t"], SnapshotMode::Always),
        Some(Position { lsn: 1, seq: Position::END }),
        Faults::default(),
        true,
    );
    let changes = always.wait_changes(6, T).await;
    assert!(changes.iter().all(|c| c.op == Op::Read));
    assert!(always.events.lock().expect("events").iter().any(|e| matches!(e, Event::SnapshotBegin { .. })));
    always.stop().await.expect("stop");
}
