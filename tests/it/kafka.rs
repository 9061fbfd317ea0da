//! The Kafka transport against a real Kafka-protocol broker on loopback (tansu): round
//! trips, Debezium compatibility, consumer groups, broker restarts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;
use sluice_actors::fault::Faults;
use sluice_actors::message::{Change, Op, Position};
use sluice_actors::schema::{Column, PgType, ReplicaIdentity, TableId, TableSchema};
use sluice_actors::transport::envelope::{self, SourceInfo};
use sluice_actors::value::{Interval, Value};

use crate::pipeline::{Bed, T, lake_sink, pg_sink, pipeline_toml, validate_until_equal, workload};
use crate::support::daemon::{Daemon, InProcess};
use crate::support::{PgDb, TYPES_DDL, TYPES_ROWS, TempDir, free_port, kafka_brokers, loadgen_schema, unique};

/// `[transport]` for a test: its own topic prefix and group, `partitions` partitions.
pub fn kafka_toml(brokers: &str, partitions: i32, role: &str) -> String {
    let prefix = unique("k");
    format!(
        "[transport]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\ngroup = \"{prefix}\"\npartitions = {partitions}\nrole = \"{role}\"\n"
    )
}

fn customers() -> TableSchema {
    let col = |name: &str, pg_type: PgType, key: bool| Column { name: name.into(), pg_type, nullable: !key, key };
    TableSchema {
        id: TableId::new("public", "customers"),
        version: 1,
        columns: vec![
            col("id", PgType::Int4, true),
            col("name", PgType::Text("text".into()), false),
            col("balance", PgType::Numeric(Some((10, 2))), false),
            col("born", PgType::Date, false),
            col("wake_up", PgType::Time, false),
            col("created_at", PgType::Timestamp, false),
            col("updated_at", PgType::TimestampTz, false),
            col("tags", PgType::Array(Box::new(PgType::Text("text".into()))), false),
            col("profile", PgType::Jsonb, false),
            col("avatar", PgType::Bytea, false),
            col("external_id", PgType::Uuid, false),
            col("score", PgType::Float8, false),
            col("active", PgType::Bool, false),
        ],
        replica_identity: ReplicaIdentity::Default,
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).expect("fixture")
}

#[test]
fn debezium_fixtures_decode_into_typed_changes() {
    let schema = customers();
    let decode = |name: &str| {
        let e = envelope::parse_envelope(&fixture(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let after =
            e.after.as_ref().map(|a| envelope::decode_row(&schema, a).unwrap_or_else(|err| panic!("{name}: {err}")));
        let before =
            e.before.as_ref().map(|b| envelope::decode_row(&schema, b).unwrap_or_else(|err| panic!("{name}: {err}")));
        (e, before, after)
    };
    let (e, _, after) = decode("debezium/create.json");
    assert_eq!(
        (e.op, e.schema_name.as_str(), e.table.as_str(), e.lsn, e.xid),
        (Op::Insert, "public", "customers", 34156960, 767)
    );
    let a = after.expect("after");
    assert_eq!(a[0], Value::Int4(1001));
    assert_eq!(a[2], Value::Numeric("1234.50".into()));
    assert_eq!(a[3], Value::Date(7305));
    assert_eq!(a[4], Value::Time(25_200_000_000));
    assert_eq!(a[5], Value::Timestamp(1_705_314_600_123_456));
    assert_eq!(a[6], Value::TimestampTz(1_705_314_600_123_456));
    assert_eq!(a[7], Value::Array(vec![Value::Text("vip".into()), Value::Text("eu".into())]));
    assert_eq!(a[8], Value::Json("{\"tier\": \"gold\"}".into()));
    assert_eq!(a[9], Value::Bytes(vec![1, 2, 3]));
    assert_eq!(a[10], Value::Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11));
    assert_eq!(a[12], Value::Bool(true));
    // Unchanged TOAST values come back as unchanged, also for bytea; NaN as a string.
    let (e, before, after) = decode("debezium/update_toast.json");
    assert_eq!(e.op, Op::Update);
    assert!(before.is_none());
    let a = after.expect("after");
    assert_eq!((a[8].clone(), a[9].clone()), (Value::Unchanged, Value::Unchanged));
    assert!(matches!(a[11], Value::Float8(f) if f.is_nan()));
    let (e, before, _) = decode("debezium/delete.json");
    assert_eq!(e.op, Op::Delete);
    assert_eq!(before.expect("key")[0], Value::Int4(1001));
    let (e, _, after) = decode("debezium/read.json");
    assert_eq!((e.op, e.snapshot.as_str()), (Op::Read, "last"));
    let a = after.expect("after");
    assert_eq!(
        (a[3].clone(), a[5].clone(), a[6].clone()),
        (Value::Date(-1), Value::Timestamp(-1_000_000), Value::TimestampTz(-1_000_000))
    );
    assert_eq!(a[9], Value::Bytes(vec![]));
    let (e, before, after) = decode("debezium/truncate.json");
    assert_eq!((e.op, before, after), (Op::Truncate, None, None));
    // Schemas enabled: the envelope is under "payload".
    let (e, _, after) = decode("debezium/create_with_schema.json");
    assert_eq!(e.op, Op::Insert);
    assert_eq!(after.expect("after")[1], Value::Text("Edward Walker".into()));
}

#[test]
fn sluice_envelopes_match_the_contract_field_by_field() {
    let schema = customers();
    let before = vec![
        Value::Int4(1001),
        Value::Text("Sally Thomas".into()),
        Value::Numeric("1234.50".into()),
        Value::Date(7305),
        Value::Time(25_200_000_000),
        Value::Timestamp(1_705_314_600_123_456),
        Value::TimestampTz(1_705_314_600_123_456),
        Value::Array(vec![Value::Text("vip".into()), Value::Text("eu".into())]),
        Value::Json("{\"tier\": \"gold\"}".into()),
        Value::Bytes(vec![1, 2, 3]),
        Value::Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11),
        Value::Float8(4.5),
        Value::Bool(true),
    ];
    let mut after = before.clone();
    after[2] = Value::Numeric("99.99".into());
    after[6] = Value::TimestampTz(1_705_316_400_000_000);
    after[7] = Value::Array(vec![Value::Text("vip".into())]);
    after[8] = Value::Unchanged;
    after[11] = Value::Float8(f64::NAN);
    after[12] = Value::Bool(false);
    let change = Change {
        op: Op::Update,
        before: Some(before),
        after: Some(after),
        position: Position { lsn: 34_157_000, seq: 1 },
        lsn: 34_157_200,
        xid: 770,
        commit_micros: 1_705_316_400_000_000,
    };
    let ours: Json = serde_json::from_str(&envelope::encode_envelope(
        &schema,
        &change,
        &SourceInfo { name: "sluice", db: "inventory" },
        "false",
        1_705_316_400_400,
    ))
    .expect("json");
    let golden: Json = serde_json::from_slice(&fixture("sluice/update.json")).expect("golden");
    for field in ["before", "after", "source", "op", "ts_ms"] {
        assert_eq!(ours[field], golden[field], "field {field}");
    }
    assert_eq!(ours, golden);
    assert_eq!(envelope::encode_key(&schema, &change).as_deref(), Some("{\"id\":1001}"));
    // Intervals: ISO 8601 (interval.handling.mode=string); Debezium's default numeric
    // microseconds decode too.
    let mut text = String::new();
    envelope::write_value(&mut text, &Value::Interval(Interval { months: 14, days: 1, micros: 5 }));
    assert_eq!(text, "\"P1Y2M1DT0.000005S\"");
    assert_eq!(
        envelope::decode_value(&serde_json::json!(86_400_000_005i64), &PgType::Interval),
        Some(Value::Interval(Interval { months: 0, days: 0, micros: 86_400_000_005 }))
    );
}

#[tokio::test]
async fn every_op_and_type_round_trips_through_kafka() {
    let source = PgDb::create("k_types").await;
    source.exec(TYPES_DDL).await;
    source.exec(TYPES_ROWS).await;
    let (pg, lake) = (PgDb::create("k_types_pg").await, TempDir::new("k_types_lake"));
    let sinks = format!("{}{}", pg_sink("pg", &pg, None), lake_sink("lake", &lake));
    let daemon = InProcess::start(
        &pipeline_toml(&source, &["public.types"], &sinks, &kafka_toml(&kafka_brokers(), 3, "all")),
        Faults::default(),
    );
    let config = daemon.dir.path().join("sluice.toml");
    assert_eq!(validate_until_equal(&config, Some("pg"), T).await.differences, 0);
    source.exec("UPDATE types SET t = 'kafka', iv = '3 days', m = 'ok' WHERE id = 1; DELETE FROM types WHERE id = 2; INSERT INTO types (id, ai) VALUES (5, '{7,8}');").await;
    let report = validate_until_equal(&config, Some("pg"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    // Rows after a truncate land in every partition; the truncate must not wipe any of them.
    source
        .exec(
            "INSERT INTO types (id, t) VALUES (20, 'x'), (21, 'x'), (22, 'x'); TRUNCATE types; \
             INSERT INTO types (id, t) VALUES (9, 'after'), (10, 'after'), (11, 'after'), (12, 'after');",
        )
        .await;
    let report = validate_until_equal(&config, Some("pg"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert_eq!(pg.count("types").await, 4);
    daemon.stop().expect("graceful stop");
}

#[tokio::test]
async fn serial_the_kafka_transport_ends_equal_under_a_loadgen_workload_with_kill_9() {
    let bed = Bed::new("k_load", 200).await;
    // Static membership: the restarted daemon takes its consumer-group places back at once
    // (tansu 0.6 never evicts a crashed member that led its group).
    let transport = format!("{}instance = \"{}\"\n", kafka_toml(&kafka_brokers(), 3, "all"), unique("inst"));
    let mut daemon = Daemon::start(&bed.toml("", &transport, &["pg", "my", "lake"], ""));
    daemon.wait_http(T).await;
    let load = tokio::spawn(loadgen::run(workload(&bed.source.url, 3000, 500), Default::default()));
    // Killed mid-stream: once every sink applies changes.
    crate::support::wait_until("all sinks applying", T, || async {
        bed.pg.count("users").await > 0 && bed.my.count("customers").await > 0 && lake_has_files(bed.lake.path())
    })
    .await;
    daemon.kill9();
    let mut daemon = daemon.restart();
    load.await.expect("task").expect("loadgen");
    let report = validate_until_equal(&daemon.config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}\n{}", report.lines, daemon.logs());
    assert_eq!(daemon.term(T).code(), Some(0));
    bed.assert_lake_has_no_duplicates();
}

#[tokio::test]
async fn serial_two_sink_daemons_share_partitions_and_a_rebalance_loses_nothing() {
    let source = PgDb::create("k_group").await;
    loadgen_schema(&source).await;
    let pg = PgDb::create("k_group_pg").await;
    let transport = kafka_toml(&kafka_brokers(), 4, "all");
    let tables = ["public.users", "public.orders"];
    let producer =
        Daemon::start(&pipeline_toml(&source, &tables, "", &transport.replace("role = \"all\"", "role = \"source\"")));
    let sinks_toml = pipeline_toml(
        &source,
        &tables,
        &pg_sink("pg", &pg, None),
        &transport.replace("role = \"all\"", "role = \"sinks\""),
    );
    let mut first = Daemon::start(&sinks_toml);
    let second = Daemon::start(&sinks_toml);
    for d in [&producer, &first, &second] {
        d.wait_http(T).await;
    }
    let load = tokio::spawn(loadgen::run(workload(&source.url, 3000, 1000), Default::default()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // One consumer leaves mid-stream, with work in flight: the group rebalances and the
    // other one takes its partitions over from the offsets the sink holds.
    assert_eq!(first.term(T).code(), Some(0));
    load.await.expect("task").expect("loadgen");
    let report = validate_until_equal(&second.config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}\n{}\n{}", report.lines, second.logs(), first.logs());
    let both = format!("{}{}", first.logs(), second.logs());
    assert!(both.matches("partition assigned").count() >= 5, "partitions were shared and reassigned:\n{both}");
}

fn lake_has_files(root: &Path) -> bool {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                return true;
            }
        }
    }
    false
}

/// A tansu broker of the test's own, on a free port, with durable SQLite storage.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Broker {
    fn bin() -> String {
        std::env::var("SLUICE_TANSU").unwrap_or_else(|_| {
            format!("{}/.cache/sluice/tansu-0.6.0/bin/tansu", std::env::var("HOME").unwrap_or_default())
        })
    }

    fn start() -> Broker {
        let dir = TempDir::new("broker");
        dir.write(".env", "");
        let mut b = Broker { child: None, port: free_port(), dir };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .expect("log");
        let child = Command::new(Self::bin())
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--storage-engine",
                "sqlite://tansu.db",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tansu (built by compose/native-up.sh)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The index tansu's SQLite storage lacks (see compose/tansu-indexes.sql).
        let indexes = format!(".read {}/compose/tansu-indexes.sql", env!("CARGO_MANIFEST_DIR"));
        let db = self.dir.path().join("tansu.db");
        let status = Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(&db)
            .arg(&indexes)
            .status()
            .expect("run sqlite3");
        assert!(status.success(), "indexing tansu's storage failed");
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let mut broker = Broker::start();
    let source = PgDb::create("k_restart").await;
    loadgen_schema(&source).await;
    let pg = PgDb::create("k_restart_pg").await;
    let toml = pipeline_toml(
        &source,
        &["public.users", "public.orders"],
        &pg_sink("pg", &pg, None),
        &kafka_toml(&broker.brokers(), 2, "all"),
    );
    let daemon = InProcess::start(&toml, Faults::default());
    let config = daemon.dir.path().join("sluice.toml");
    let load = tokio::spawn(loadgen::run(workload(&source.url, 2000, 500), Default::default()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.spawn();
    load.await.expect("task").expect("loadgen");
    let report = validate_until_equal(&config, None, Duration::from_secs(90)).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    daemon.stop().expect("graceful stop");
}
