//! The sinks against the real local PostgreSQL and MariaDB and a local folder, driven with
//! hand-built changes: exactly-once across a crash before commit, replays, poison rows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Decimal128Type, Int64Type};
use mysql_async::prelude::Queryable;
use sluice_actors::fault::Faults;
use sluice_actors::mailbox::mailbox;
use sluice_actors::mapper::{Mapper, Mapping, SinkEvent, SinkItem};
use sluice_actors::message::{Change, ChangeBatch, Checkpoint, Op, Position, Row};
use sluice_actors::schema::{Column, PgType, ReplicaIdentity, TableId, TableSchema};
use sluice_actors::sink::parquet::{ParquetOptions, S3Options, open_store};
use sluice_actors::sink::{self, Sink, SinkSpec, WriterOptions};
use sluice_actors::value::Value;

use crate::support::{MyDb, PgDb, TempDir, wait_until};

const STREAM: &str = "slot";

fn schema() -> Arc<TableSchema> {
    let col = |name: &str, pg_type: PgType, key: bool| Column { name: name.into(), pg_type, nullable: !key, key };
    Arc::new(TableSchema {
        id: TableId::new("public", "accounts"),
        version: 1,
        columns: vec![
            col("id", PgType::Int8, true),
            col("name", PgType::Text("text".into()), false),
            col("balance", PgType::Numeric(Some((12, 2))), false),
            col("bio", PgType::Text("text".into()), false),
        ],
        replica_identity: ReplicaIdentity::Default,
    })
}

fn row(id: i64, name: &str, balance: &str, bio: Value) -> Row {
    vec![Value::Int8(id), Value::Text(name.into()), Value::Numeric(balance.into()), bio]
}

fn change(op: Op, lsn: u64, seq: u64, before: Option<Row>, after: Option<Row>) -> Change {
    Change {
        op,
        before,
        after,
        position: Position { lsn, seq },
        lsn,
        xid: 1,
        commit_micros: 1_700_000_000_000_000 + lsn as i64,
    }
}

async fn items(changes: Vec<Change>) -> Vec<SinkItem> {
    let s = schema();
    let mut mapper = Mapper::new(Mapping::Identity);
    let targets = mapper.targets(&s).await.expect("targets");
    Mapper::map(&ChangeBatch { table: s.id.clone(), schema: s, changes, snapshot_last: false }, &targets)
}

fn cp(lsn: u64) -> Checkpoint {
    Checkpoint::source(Position::txn_end(lsn), Some(lsn + 1))
}

/// Commits the unit `cp(lsn)` closes and forces it durable (lanes commit in the
/// background); returns every checkpoint acknowledged meanwhile.
async fn commit_durably(sink: &mut sink::AnySink, lsn: u64) -> Vec<Checkpoint> {
    let mut durable = sink.commit(&cp(lsn), cp(lsn).stream_offsets(STREAM)).await.expect("commit");
    durable.extend(sink.tick(true).await.expect("flush"));
    durable
}

/// The two units of the crash tests.
fn unit1() -> Vec<Change> {
    vec![
        change(Op::Insert, 10, 1, None, Some(row(1, "ann", "10.00", Value::Text("long bio".into())))),
        change(Op::Insert, 10, 2, None, Some(row(2, "bob", "20.50", Value::Null))),
        change(Op::Insert, 10, 3, None, Some(row(3, "cid", "0.01", Value::Null))),
    ]
}

fn unit2() -> Vec<Change> {
    vec![
        // The bio was not resent (unchanged TOAST): it must stay.
        change(Op::Update, 20, 1, None, Some(row(1, "ann", "11.00", Value::Unchanged))),
        change(Op::Delete, 20, 2, Some(vec![Value::Int8(2), Value::Null, Value::Null, Value::Null]), None),
        change(Op::Insert, 20, 3, None, Some(row(4, "dee", "4.00", Value::Null))),
    ]
}

/// (id, name, balance, bio) rows, sorted.
type State = Vec<(i64, String, String, Option<String>)>;

fn after_unit1() -> State {
    vec![
        (1, "ann".into(), "10.00".into(), Some("long bio".into())),
        (2, "bob".into(), "20.50".into(), None),
        (3, "cid".into(), "0.01".into(), None),
    ]
}

fn after_unit2() -> State {
    vec![
        (1, "ann".into(), "11.00".into(), Some("long bio".into())),
        (3, "cid".into(), "0.01".into(), None),
        (4, "dee".into(), "4.00".into(), None),
    ]
}

enum Target {
    /// A PostgreSQL database, and the lanes the sink applies over.
    Pg(PgDb, usize),
    /// A MariaDB database, and the lanes the sink applies over.
    My(MyDb, usize),
    Lake(TempDir),
}

impl Target {
    fn spec(&self) -> SinkSpec {
        match self {
            Target::Pg(db, lanes) => lanes_spec(db, *lanes),
            Target::My(db, lanes) => SinkSpec::Mysql { url: db.url.clone(), lanes: *lanes, stream: STREAM.into() },
            Target::Lake(dir) => {
                let (store, prefix) =
                    open_store(dir.path().to_str().expect("path"), &S3Options::default()).expect("store");
                SinkSpec::Parquet(ParquetOptions {
                    store,
                    prefix,
                    part_bytes: 1 << 20,
                    rotate_rows: 1_000_000,
                    rotate_secs: 3600,
                })
            }
        }
    }

    async fn state(&self) -> State {
        match self {
            Target::Pg(db, _) => {
                let rows = db.rows("SELECT id::text, name, balance::text, bio FROM accounts").await;
                let mut s: State = rows
                    .into_iter()
                    .map(|r| {
                        (
                            r[0].as_ref().expect("id").parse().expect("id"),
                            r[1].clone().unwrap_or_default(),
                            r[2].clone().unwrap_or_default(),
                            r[3].clone(),
                        )
                    })
                    .collect();
                s.sort();
                s
            }
            Target::My(db, ..) => {
                let mut c = db.conn().await;
                let rows: Vec<(i64, String, String, Option<String>)> = c
                    .query("SELECT id, name, CAST(balance AS CHAR), bio FROM accounts ORDER BY id")
                    .await
                    .expect("rows");
                rows
            }
            Target::Lake(dir) => {
                // Fold the change log in position order.
                let mut log = lake_rows(dir.path());
                log.sort_by_key(|r| (r.lsn, r.seq));
                let mut state: BTreeMap<i64, (String, String, Option<String>)> = BTreeMap::new();
                for r in log {
                    match r.op.as_str() {
                        "d" => {
                            state.remove(&r.id);
                        }
                        _ => {
                            let bio = if r.unchanged.as_deref() == Some("bio") {
                                state.get(&r.id).and_then(|s| s.2.clone())
                            } else {
                                r.bio
                            };
                            state.insert(r.id, (r.name.unwrap_or_default(), r.balance.unwrap_or_default(), bio));
                        }
                    }
                }
                state.into_iter().map(|(k, (n, b, bio))| (k, n, b, bio)).collect()
            }
        }
    }
}

/// One row of the Parquet change log.
#[derive(Debug, Clone)]
pub struct LakeRow {
    pub id: i64,
    pub name: Option<String>,
    pub balance: Option<String>,
    pub bio: Option<String>,
    pub op: String,
    pub lsn: i64,
    pub seq: i64,
    pub unchanged: Option<String>,
}

/// Every row of every committed Parquet file of `accounts` under `root`.
pub fn lake_rows(root: &std::path::Path) -> Vec<LakeRow> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("table=accounts")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let file = std::fs::File::open(&p).expect("open parquet");
                let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .expect("parquet")
                    .build()
                    .expect("reader");
                for batch in reader {
                    let b = batch.expect("batch");
                    let col = |n: &str| b.column(b.schema().index_of(n).expect("column")).clone();
                    let (id, name, balance, bio, op, lsn, seq, unchanged) = (
                        col("id"),
                        col("name"),
                        col("balance"),
                        col("bio"),
                        col("_op"),
                        col("_commit_lsn"),
                        col("_seq"),
                        col("_unchanged"),
                    );
                    for i in 0..b.num_rows() {
                        let text = |a: &arrow::array::ArrayRef| {
                            (!a.is_null(i)).then(|| a.as_string::<i32>().value(i).to_string())
                        };
                        out.push(LakeRow {
                            id: id.as_primitive::<Int64Type>().value(i),
                            name: text(&name),
                            balance: (!balance.is_null(i)).then(|| {
                                sluice_actors::sink::encode::format_decimal(
                                    balance.as_primitive::<Decimal128Type>().value(i),
                                    2,
                                )
                            }),
                            bio: text(&bio),
                            op: text(&op).expect("op"),
                            lsn: lsn.as_primitive::<Int64Type>().value(i),
                            seq: seq.as_primitive::<Int64Type>().value(i),
                            unchanged: text(&unchanged),
                        });
                    }
                }
            }
        }
    }
    out
}

async fn targets() -> Vec<Target> {
    vec![
        Target::Pg(PgDb::create("sink_pg").await, 1),
        Target::Pg(PgDb::create("sink_pg_lanes").await, 2),
        Target::My(MyDb::create("sink_my").await, 1),
        Target::My(MyDb::create("sink_my_lanes").await, 2),
        Target::Lake(TempDir::new("sink_lake")),
    ]
}

#[tokio::test]
async fn a_crash_between_write_and_commit_applies_nothing_twice_in_each_sink() {
    for target in targets().await {
        // First incarnation: unit 1 committed, unit 2 written but never committed.
        let mut first = target.spec().build("acc").expect("sink");
        assert!(first.open().await.expect("open").is_empty());
        first.write(items(unit1()).await).await.expect("write");
        assert_eq!(commit_durably(&mut first, 10).await, vec![cp(10)], "unit 1 is durable once committed");
        first.write(items(unit2()).await).await.expect("write");
        drop(first);

        // Second incarnation: it holds exactly unit 1.
        let mut second = target.spec().build("acc").expect("sink");
        let offsets = second.open().await.expect("reopen");
        let position = sluice::pipeline::position_of(&offsets, STREAM);
        assert_eq!(position, Some(Position::txn_end(10)));
        assert_eq!(target.state().await, after_unit1(), "nothing of the uncommitted unit is visible");

        // The source replays from before unit 1: the writer skips what is durable.
        let writer = Writer::fed_both_units(second, position, Duration::ZERO).await;
        writer.stop.send_replace(true);
        writer.acknowledged(cp(20)).await;
        assert_eq!(target.state().await, after_unit2());
        if let Target::Lake(dir) = &target {
            let log = lake_rows(dir.path());
            let mut positions: Vec<(i64, i64)> = log.iter().map(|r| (r.lsn, r.seq)).collect();
            positions.sort();
            assert_eq!(
                positions,
                vec![(10, 1), (10, 2), (10, 3), (20, 1), (20, 2), (20, 3)],
                "each change exactly once"
            );
            let update = log.iter().find(|r| (r.lsn, r.seq) == (20, 1)).expect("update row");
            assert_eq!(
                (update.op.as_str(), update.unchanged.as_deref(), update.bio.as_deref()),
                ("u", Some("bio"), None)
            );
        }
        writer.task.abort();
    }
}

/// A writer actor on a sink, fed units 1 and 2 from a replay of the source.
struct Writer {
    /// Kept open: the writer ends when its mailbox closes.
    _input: sluice_actors::mailbox::Sender<SinkEvent>,
    acked: Arc<Mutex<Vec<Checkpoint>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<sluice_actors::error::Result<()>>,
}

impl Writer {
    /// Starts the writer on `sink` (holding `durable`) and sends it both units' events,
    /// `pause` apart.
    async fn fed_both_units(sink: sink::AnySink, durable: Option<Position>, pause: Duration) -> Self {
        let (input, rx) = mailbox::<SinkEvent>("acc.writer", "test", 100);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let options = WriterOptions { sink: "acc".into(), stream: STREAM.into(), max_unit_rows: 1000, durable };
        let on_commit = {
            let acked = acked.clone();
            move |c: Checkpoint| acked.lock().expect("acks").push(c)
        };
        let task = tokio::spawn(sink::run(sink, options, rx, on_commit, stop_rx, Faults::default()));
        for e in [
            SinkEvent::Items(items(unit1()).await),
            SinkEvent::Checkpoint(cp(10)),
            SinkEvent::Items(items(unit2()).await),
            SinkEvent::Checkpoint(cp(20)),
        ] {
            input.send(e).await.expect("send");
            tokio::time::sleep(pause).await;
        }
        Writer { _input: input, acked, stop, task }
    }

    /// Waits until the writer acknowledged `checkpoint`.
    async fn acknowledged(&self, checkpoint: Checkpoint) {
        wait_until("the unit acknowledged", Duration::from_secs(20), || async {
            self.acked.lock().expect("acks").contains(&checkpoint)
        })
        .await;
    }
}

#[tokio::test]
async fn a_poison_row_is_dead_lettered_and_the_others_are_applied() {
    let mut pgs = Vec::new();
    for (name, lanes) in [("poison_pg", 1), ("poison_pg_lanes", 2)] {
        let pg = PgDb::create(name).await;
        pg.exec("CREATE TABLE accounts (id bigint PRIMARY KEY, name text, balance numeric(12,2) CHECK (balance >= 0), bio text)").await;
        pgs.push(Target::Pg(pg, lanes));
    }
    let mut mys = Vec::new();
    for (name, lanes) in [("poison_my", 1), ("poison_my_lanes", 2)] {
        let my = MyDb::create(name).await;
        my.conn()
            .await
            .query_drop("CREATE TABLE accounts (id BIGINT PRIMARY KEY, name LONGTEXT, balance DECIMAL(12,2), bio LONGTEXT, CHECK (balance >= 0))")
            .await
            .expect("create");
        mys.push(Target::My(my, lanes));
    }
    for target in pgs.into_iter().chain(mys) {
        let mut sink = target.spec().build("acc").expect("sink");
        sink.open().await.expect("open");
        let before = vec![
            change(Op::Insert, 5, 1, None, Some(row(7, "gone", "7.00", Value::Null))),
            change(Op::Insert, 5, 2, None, Some(row(8, "old", "8.00", Value::Text("bio".into())))),
            change(Op::Insert, 5, 3, None, Some(row(9, "old", "9.00", Value::Null))),
        ];
        sink.write(items(before).await).await.expect("write");
        sink.commit(&cp(5), cp(5).stream_offsets(STREAM)).await.expect("commit");
        // The rejected row shares its unit with every kind of part (delete, upsert of new
        // and existing keys, partial update): the unit is applied again part by part, and
        // everything but that row lands once.
        let changes = vec![
            change(Op::Delete, 10, 1, Some(vec![Value::Int8(7), Value::Null, Value::Null, Value::Null]), None),
            change(Op::Update, 10, 2, None, Some(row(8, "new", "8.50", Value::Unchanged))),
            change(Op::Update, 10, 3, None, Some(row(9, "new", "9.50", Value::Null))),
            change(Op::Insert, 10, 4, None, Some(row(1, "ok", "1.00", Value::Null))),
            change(Op::Insert, 10, 5, None, Some(row(2, "poison", "-5.00", Value::Null))),
            change(Op::Insert, 10, 6, None, Some(row(3, "ok too", "3.00", Value::Null))),
        ];
        sink.write(items(changes).await).await.expect("a rejected row does not fail the unit");
        // Lanes commit in the background: wait for them.
        commit_durably(&mut sink, 10).await;
        assert_eq!(
            target.state().await,
            vec![
                (1, "ok".into(), "1.00".into(), None),
                (3, "ok too".into(), "3.00".into(), None),
                (8, "new".into(), "8.50".into(), Some("bio".into())),
                (9, "new".into(), "9.50".into(), None),
            ]
        );
        sink.write(items(vec![change(Op::Insert, 20, 1, None, Some(row(4, "later", "4.00", Value::Null)))]).await)
            .await
            .expect("write");
        commit_durably(&mut sink, 20).await;
        assert_eq!(target.state().await.len(), 5, "later rows still arrive");
        let letters: Vec<(String, i64, String)> = match &target {
            Target::Pg(db, _) => db
                .client()
                .await
                .query("SELECT op, seq, error FROM sluice_dead_letter WHERE sink = 'acc'", &[])
                .await
                .expect("dead letters")
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
            Target::My(db, ..) => db
                .conn()
                .await
                .query("SELECT op, seq, error FROM sluice_dead_letter WHERE sink = 'acc'")
                .await
                .expect("dead letters"),
            Target::Lake(_) => unreachable!(),
        };
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!((letters[0].0.as_str(), letters[0].1), ("c", 5));
        assert!(
            letters[0].2.to_lowercase().contains("check") || letters[0].2.to_lowercase().contains("constraint"),
            "{}",
            letters[0].2
        );
    }
}

/// Snapshot rows are copied straight into the target; a poison row among them is still
/// dead-lettered alone, and keys the target holds already are upserted instead.
#[tokio::test]
async fn snapshot_rows_are_copied_into_the_postgres_target_and_upserted_where_keys_exist() {
    let pg = PgDb::create("snapcopy_pg").await;
    pg.exec("CREATE TABLE accounts (id bigint PRIMARY KEY, name text, balance numeric(12,2) CHECK (balance >= 0), bio text)").await;
    let target = Target::Pg(pg, 1);
    let mut sink = target.spec().build("acc").expect("sink");
    sink.open().await.expect("open");
    let read = |seq: u64, id: i64, name: &str, balance: &str| {
        change(Op::Read, 0, seq, None, Some(row(id, name, balance, Value::Null)))
    };
    let snapshot_cp = Checkpoint::source(Position { lsn: 0, seq: 3 }, None);
    sink.write(items(vec![read(1, 1, "ann", "1.00"), read(2, 2, "poison", "-2.00"), read(3, 3, "cid", "3.00")]).await)
        .await
        .expect("write");
    sink.commit(&snapshot_cp, snapshot_cp.stream_offsets(STREAM)).await.expect("commit");
    let ids: Vec<i64> = target.state().await.iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![1, 3], "the poison row alone is left out");
    // Keys the target holds already: the copy falls back to the upsert.
    let done = Checkpoint::source(Position::SNAPSHOT_DONE, None);
    sink.write(items(vec![read(4, 1, "ann again", "1.50"), read(5, 5, "eve", "5.00")]).await).await.expect("write");
    sink.commit(&done, done.stream_offsets(STREAM)).await.expect("commit");
    assert_eq!(
        target.state().await,
        vec![
            (1, "ann again".into(), "1.50".into(), None),
            (3, "cid".into(), "3.00".into(), None),
            (5, "eve".into(), "5.00".into(), None)
        ]
    );
    let Target::Pg(db, _) = &target else { unreachable!() };
    let letters = db.rows("SELECT seq::text FROM sluice_dead_letter WHERE sink = 'acc'").await;
    assert_eq!(letters, vec![vec![Some("2".to_string())]]);
}

fn lanes_spec(db: &PgDb, lanes: usize) -> SinkSpec {
    SinkSpec::Postgres { config: Box::new(db.url.parse().expect("url")), lanes, stream: STREAM.into() }
}

/// (part, lsn) of the stored offsets rows of sink `acc`, sorted.
async fn offsets_rows(db: &PgDb) -> Vec<(i64, i64)> {
    let rows = db.rows("SELECT part::text, lsn::text FROM sluice_offsets WHERE sink = 'acc' ORDER BY part").await;
    rows.iter()
        .map(|r| {
            (r[0].as_deref().expect("part").parse().expect("part"), r[1].as_deref().expect("lsn").parse().expect("lsn"))
        })
        .collect()
}

/// Two lanes apply disjoint keys; after a crash between their commits each lane skips
/// what it applied already; fewer lanes afterwards resume from the lowest and rewrite
/// the offsets.
#[tokio::test]
async fn postgres_lanes_resume_each_from_its_own_position() {
    let db = PgDb::create("lanes_pg").await;
    let inserts: Vec<Change> =
        (1..=40).map(|id| change(Op::Insert, 10, id as u64, None, Some(row(id, "v1", "1.00", Value::Null)))).collect();
    let updates: Vec<Change> =
        (1..=40).map(|id| change(Op::Update, 20, id as u64, None, Some(row(id, "v2", "2.00", Value::Null)))).collect();
    let mut sink = lanes_spec(&db, 2).build("acc").expect("sink");
    assert!(sink.open().await.expect("open").is_empty());
    sink.write(items(inserts).await).await.expect("write");
    sink.commit(&cp(10), cp(10).stream_offsets(STREAM)).await.expect("commit");
    sink.write(items(updates.clone()).await).await.expect("write");
    commit_durably(&mut sink, 20).await;
    drop(sink);
    assert_eq!(offsets_rows(&db).await, vec![(0, 20), (65536, 20)], "one offsets row per lane");

    // As if lane 1 had not committed unit 2: its position and its rows are back at unit 1
    // (lane 0's rows are set back too, to show that it does not apply unit 2 again).
    let at10 = Position::txn_end(10);
    db.exec(&format!("UPDATE sluice_offsets SET lsn = {}, seq = {} WHERE part = 65536", at10.lsn, at10.seq)).await;
    db.exec("UPDATE accounts SET name = 'v1', balance = 1.00").await;
    let mut sink = lanes_spec(&db, 2).build("acc").expect("sink");
    let offsets = sink.open().await.expect("reopen");
    assert_eq!(sluice::pipeline::position_of(&offsets, STREAM), Some(at10), "resumes from the lowest lane");
    sink.write(items(updates).await).await.expect("replay");
    // Lanes commit in the background: the checkpoint comes back once both did.
    assert_eq!(commit_durably(&mut sink, 20).await, vec![cp(20)]);
    let names: Vec<String> = Target::Pg(db, 2).state().await.into_iter().map(|r| r.1).collect();
    let replayed = names.iter().filter(|n| *n == "v2").count();
    assert!(
        (5..=35).contains(&replayed),
        "lane 1 applied its keys again ({replayed} of 40), lane 0 skipped its own: {names:?}"
    );
}

/// A lane that fails while others go on (lanes apply in the background): the error comes
/// back to the writer, the unit is never acknowledged, and the next incarnation applies it.
#[tokio::test]
async fn a_failing_lane_fails_the_unit_and_a_new_incarnation_applies_it() {
    let db = PgDb::create("lanes_fail_pg").await;
    let mut sink = lanes_spec(&db, 2).build("acc").expect("sink");
    sink.open().await.expect("open");
    sink.write(items(unit1()).await).await.expect("write");
    assert_eq!(commit_durably(&mut sink, 10).await, vec![cp(10)]);

    db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()").await;
    let mut acknowledged = Vec::new();
    let outcome = async {
        sink.write(items(unit2()).await).await?;
        acknowledged.extend(sink.commit(&cp(20), cp(20).stream_offsets(STREAM)).await?);
        acknowledged.extend(sink.tick(true).await?);
        Ok::<_, sluice_actors::error::Error>(())
    }
    .await;
    assert!(outcome.is_err(), "the lanes' lost connections fail the unit");
    assert!(acknowledged.is_empty(), "{acknowledged:?}");
    drop(sink);

    let mut sink = lanes_spec(&db, 2).build("acc").expect("sink");
    let offsets = sink.open().await.expect("reopen");
    assert_eq!(sluice::pipeline::position_of(&offsets, STREAM), Some(Position::txn_end(10)));
    sink.write(items(unit2()).await).await.expect("write");
    assert_eq!(commit_durably(&mut sink, 20).await, vec![cp(20)]);
    assert_eq!(Target::Pg(db, 2).state().await, after_unit2());
}

/// The writer acknowledges what lanes commit in the background while it waits for more,
/// in order, without being told to stop.
#[tokio::test]
async fn a_writer_acknowledges_what_its_lanes_commit_in_the_background() {
    let db = PgDb::create("lanes_writer_pg").await;
    let mut sink = lanes_spec(&db, 3).build("acc").expect("sink");
    sink.open().await.expect("open");
    let writer = Writer::fed_both_units(sink, None, Duration::from_millis(20)).await;
    writer.acknowledged(cp(20)).await;
    let acked = writer.acked.lock().expect("acks").clone();
    assert!(acked == vec![cp(10), cp(20)] || acked == vec![cp(20)], "in order: {acked:?}");
    assert_eq!(Target::Pg(db, 3).state().await, after_unit2());
    writer.task.abort();
}

#[tokio::test]
async fn postgres_lanes_take_a_truncate_between_rows_and_fewer_lanes_rewrite_the_offsets() {
    let db = PgDb::create("lanes_trunc_pg").await;
    let mut changes: Vec<Change> =
        (1..=20).map(|id| change(Op::Insert, 10, id as u64, None, Some(row(id, "old", "1.00", Value::Null)))).collect();
    changes.push(change(Op::Truncate, 10, 21, None, None));
    changes.extend(
        (21..=30).map(|id| change(Op::Insert, 10, id as u64 + 1, None, Some(row(id, "new", "1.00", Value::Null)))),
    );
    let mut sink = lanes_spec(&db, 2).build("acc").expect("sink");
    sink.open().await.expect("open");
    // Rows in both lanes' open transactions, then a truncate: no lane waits for another.
    sink.write(items(changes[..20].to_vec()).await).await.expect("write");
    sink.write(items(changes[20..].to_vec()).await).await.expect("write");
    sink.commit(&cp(10), cp(10).stream_offsets(STREAM)).await.expect("commit");
    let target = Target::Pg(db, 2);
    let ids: Vec<i64> = target.state().await.iter().map(|r| r.0).collect();
    assert_eq!(ids, (21..=30).collect::<Vec<_>>());
    let Target::Pg(db, _) = &target else { unreachable!() };
    assert_eq!(offsets_rows(db).await, vec![(0, 10), (65536, 10)]);

    // One lane now: the stored rows of two lanes are merged and rewritten.
    let mut sink = lanes_spec(db, 1).build("acc").expect("sink");
    let offsets = sink.open().await.expect("reopen");
    assert_eq!(sluice::pipeline::position_of(&offsets, STREAM), Some(Position::txn_end(10)));
    sink.write(items(vec![change(Op::Insert, 30, 1, None, Some(row(31, "one", "1.00", Value::Null)))]).await)
        .await
        .expect("write");
    sink.commit(&cp(30), cp(30).stream_offsets(STREAM)).await.expect("commit");
    assert_eq!(offsets_rows(db).await, vec![(0, 30)]);
}

#[tokio::test]
async fn parquet_files_rotate_by_rows_into_hive_folders() {
    let dir = TempDir::new("rotate");
    let (store, prefix) = open_store(dir.path().to_str().expect("path"), &S3Options::default()).expect("store");
    let spec =
        SinkSpec::Parquet(ParquetOptions { store, prefix, part_bytes: 1 << 20, rotate_rows: 2, rotate_secs: 3600 });
    let mut sink = spec.build("lake").expect("sink");
    sink.open().await.expect("open");
    sink.write(items(unit1()).await).await.expect("write");
    let durable = sink.commit(&cp(10), cp(10).stream_offsets(STREAM)).await.expect("commit");
    assert_eq!(durable, vec![cp(10)], "three rows reach rotate_rows = 2: flushed and acknowledged");
    sink.write(items(vec![change(Op::Insert, 20, 1, None, Some(row(9, "x", "1.00", Value::Null)))]).await)
        .await
        .expect("write");
    assert!(
        sink.commit(&cp(20), cp(20).stream_offsets(STREAM)).await.expect("commit").is_empty(),
        "one row waits for rotation"
    );
    assert_eq!(sink.tick(true).await.expect("flush"), vec![cp(20)]);
    let files = lake_files(dir.path());
    let data: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
    assert_eq!(data.len(), 2, "{files:?}");
    assert!(data.iter().all(|f| f.starts_with("table=accounts/date=2023-11-14/part-")), "{files:?}");
    assert!(data[0].contains("-A_1-A_3-"), "file names carry the position range: {files:?}");
    assert!(files.iter().any(|f| f.starts_with("_sluice/commit-")), "{files:?}");
    // Reopening finds the offsets of the newest commit marker.
    let mut again = spec.build("lake").expect("sink");
    assert_eq!(sluice::pipeline::position_of(&again.open().await.expect("open"), STREAM), Some(Position::txn_end(20)));

    // rotate_rows reached before a commit: the file is put at once, under the coming
    // flush, and a crash before that flush's marker removes it on open.
    again.write(items(unit2()).await).await.expect("write");
    assert_eq!(lake_files(dir.path()).iter().filter(|f| f.ends_with(".parquet")).count(), 3, "put before its commit");
    drop(again);
    let mut third = spec.build("lake").expect("sink");
    assert_eq!(sluice::pipeline::position_of(&third.open().await.expect("open"), STREAM), Some(Position::txn_end(20)));
    assert_eq!(
        lake_files(dir.path()).iter().filter(|f| f.ends_with(".parquet")).count(),
        2,
        "uncommitted file removed"
    );

    // A put of an aborted incarnation that lands after `open` (a late file of the coming
    // flush, 2) is removed by that flush before its marker.
    let first = lake_files(dir.path()).into_iter().find(|f| f.ends_with(".parquet")).expect("a file");
    let late = "table=accounts/date=2023-11-14/part-0000000002-FF_1-FF_3-9.parquet";
    std::fs::copy(dir.path().join(&first), dir.path().join(late)).expect("late file");
    third.write(items(unit2()).await).await.expect("write");
    third.commit(&cp(30), cp(30).stream_offsets(STREAM)).await.expect("commit");
    let files = lake_files(dir.path());
    assert!(!files.iter().any(|f| f == late), "late file removed: {files:?}");
    assert_eq!(files.iter().filter(|f| f.ends_with(".parquet")).count(), 3, "{files:?}");
}

/// A file that outgrows one upload part is streamed into a partial object and renamed to
/// its final name at the flush; a crash in the middle of one leaves no visible file.
#[tokio::test]
async fn a_parquet_file_larger_than_a_part_is_streamed_then_renamed() {
    let dir = TempDir::new("stream");
    let (store, prefix) = open_store(dir.path().to_str().expect("path"), &S3Options::default()).expect("store");
    let spec = SinkSpec::Parquet(ParquetOptions {
        store,
        prefix,
        part_bytes: 4096,
        rotate_rows: 1_000_000,
        rotate_secs: 3600,
    });
    // 10,000 rows a unit: a row group (8,192 rows) is written out during the first.
    let unit = |lsn: u64, first: i64| {
        let changes = (0..10_000)
            .map(|i| {
                let id = first + i;
                let bio = Value::Text(format!("bio {id} {}", id.wrapping_mul(2_654_435_761) % 1_000_003));
                change(Op::Insert, lsn, i as u64 + 1, None, Some(row(id, "n", "1.00", bio)))
            })
            .collect();
        items(changes)
    };
    let mut sink = spec.build("lake").expect("sink");
    sink.open().await.expect("open");
    for (k, lsn) in [10, 20, 30].into_iter().enumerate() {
        sink.write(unit(lsn, k as i64 * 10_000).await).await.expect("write");
        assert!(sink.commit(&cp(lsn), cp(lsn).stream_offsets(STREAM)).await.expect("commit").is_empty());
    }
    let files = lake_files(dir.path());
    assert!(files.iter().any(|f| f.contains("/_partial-0000000000-")), "streaming before its flush: {files:?}");
    assert!(!files.iter().any(|f| f.ends_with(".parquet")), "nothing visible before the flush: {files:?}");
    assert_eq!(sink.tick(true).await.expect("flush"), vec![cp(10), cp(20), cp(30)]);
    let files = lake_files(dir.path());
    assert!(!files.iter().any(|f| f.contains("_partial")), "{files:?}");
    let data: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
    assert_eq!(data.len(), 1, "{files:?}");
    assert!(data[0].contains("-A_1-1E_2710-"), "the name carries the position range: {files:?}");
    let ids: std::collections::BTreeSet<i64> = lake_rows(dir.path()).iter().map(|r| r.id).collect();
    assert_eq!(ids, (0..30_000).collect());

    // A crash while a file streams: nothing of it is visible after the next open.
    let mut again = spec.build("lake").expect("sink");
    again.open().await.expect("open");
    again.write(unit(40, 30_000).await).await.expect("write");
    assert!(lake_files(dir.path()).iter().any(|f| f.contains("/_partial-0000000001-")));
    drop(again);
    let mut third = spec.build("lake").expect("sink");
    assert_eq!(sluice::pipeline::position_of(&third.open().await.expect("open"), STREAM), Some(Position::txn_end(30)));
    assert_eq!(lake_rows(dir.path()).len(), 30_000);
}

/// Every file under `root`, relative, sorted.
fn lake_files(root: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(root).expect("relative").display().to_string());
            }
        }
    }
    files.sort();
    files
}
