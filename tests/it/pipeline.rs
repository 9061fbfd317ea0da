//! Whole pipelines over the direct transport: PostgreSQL source to PostgreSQL, MariaDB
//! and Parquet sinks, checked with `validate`.

use std::path::Path;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use sluice::config::Config;
use sluice_actors::fault::Faults;

use crate::support::daemon::{Daemon, InProcess};
use crate::support::{MyDb, PgDb, TYPES_DDL, TYPES_ROWS, TempDir, loadgen_schema};

pub const T: Duration = Duration::from_secs(60);

/// The configuration of a test pipeline (without `[daemon]`).
pub fn pipeline_toml(source: &PgDb, tables: &[&str], sinks: &str, extra: &str) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[source]\nkind = \"postgres\"\nurl = \"{}\"\ntables = [{}]\nslot = \"{}\"\npublication = \"{}\"\nheartbeat_secs = 1\n\
         [pipeline]\nbackoff_base_ms = 100\nbackoff_max_ms = 1000\n{extra}\n{sinks}",
        source.url,
        tables.join(", "),
        source.name,
        source.name
    )
}

pub fn pg_sink(name: &str, db: &PgDb, mapping: Option<&str>) -> String {
    let mapping = mapping.map(|m| format!("mapping = \"{m}\"\n")).unwrap_or_default();
    format!("[[sink]]\nname = \"{name}\"\nkind = \"postgres\"\nurl = \"{}\"\n{mapping}", db.url)
}

pub fn mysql_sink(name: &str, db: &MyDb, mapping: Option<&str>) -> String {
    let mapping = mapping.map(|m| format!("mapping = \"{m}\"\n")).unwrap_or_default();
    format!("[[sink]]\nname = \"{name}\"\nkind = \"mysql\"\nurl = \"{}\"\n{mapping}", db.url)
}

pub fn lake_sink(name: &str, dir: &TempDir) -> String {
    format!("[[sink]]\nname = \"{name}\"\nkind = \"parquet\"\npath = \"{}\"\nrotate_secs = 1\n", dir.path().display())
}

pub fn queries(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("queries").join(file).display().to_string()
}

/// Runs `validate` until it finds no difference (the pipeline caught up) or `timeout`;
/// returns the last report.
pub async fn validate_until_equal(config: &Path, sink: Option<&str>, timeout: Duration) -> sluice::validate::Report {
    let config = Config::load(config).expect("config");
    let base = Path::new("/");
    let deadline = Instant::now() + timeout;
    loop {
        let report = sluice::validate::validate(&config, base, sink).await.expect("validate");
        if report.differences == 0 || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A source with the load generator's tables and `users` rows, and the three sink kinds
/// (PostgreSQL as is, MariaDB through a mapping, Parquet).
pub struct Bed {
    pub source: PgDb,
    pub pg: PgDb,
    pub my: MyDb,
    pub lake: TempDir,
}

impl Bed {
    pub async fn new(tag: &str, users: u64) -> Bed {
        let source = PgDb::create(tag).await;
        loadgen_schema(&source).await;
        if users > 0 {
            loadgen::populate(&source.url, users, 5).await.expect("populate");
        }
        let pg = PgDb::create(&format!("{tag}_pg")).await;
        let my = MyDb::create(&format!("{tag}_my")).await;
        let lake = TempDir::new(&format!("{tag}_lake"));
        Bed { source, pg, my, lake }
    }

    /// The configuration: `pipeline` lines go into `[pipeline]`, `sinks` picks the sinks
    /// (`pg`, `my`, `lake`), `sink_extra` is appended to the PostgreSQL sink's table.
    pub fn toml(&self, pipeline: &str, transport: &str, sinks: &[&str], pg_extra: &str) -> String {
        let mut s = String::new();
        for name in sinks {
            match *name {
                "pg" => s.push_str(&format!("{}{pg_extra}", pg_sink("pg", &self.pg, None))),
                "my" => s.push_str(&mysql_sink("my", &self.my, Some(&queries("mysql.sql")))),
                "lake" => s.push_str(&lake_sink("lake", &self.lake)),
                other => panic!("no sink {other}"),
            }
        }
        pipeline_toml(&self.source, &["public.users", "public.orders"], &s, &format!("{pipeline}{transport}"))
    }

    /// The lake holds each change once.
    pub fn assert_lake_has_no_duplicates(&self) {
        let positions = lake_positions(self.lake.path());
        let unique: std::collections::HashSet<_> = positions.iter().collect();
        assert_eq!(unique.len(), positions.len(), "duplicated changes in the lake");
    }
}

/// The columns of `types` whose types the PostgreSQL sink writes in binary.
const SCALARS: &str = "SELECT id, i2, i4, i8, n, f4, f8, b, t, vc, d, ts, tz, u, j, jb, by, ai, at FROM types";

#[tokio::test]
async fn every_type_reaches_each_sink_through_snapshot_and_stream() {
    let source = PgDb::create("e2e_types").await;
    source.exec(TYPES_DDL).await;
    source.exec(TYPES_ROWS).await;
    // The same values in a table whose every column the PostgreSQL sink writes in binary
    // COPY (`types` has intervals, times and arrays, so it goes as text).
    source.exec(&format!("CREATE TABLE scalars AS {SCALARS}; ALTER TABLE scalars ADD PRIMARY KEY (id)")).await;
    let (pg, my, lake) =
        (PgDb::create("e2e_types_pg").await, MyDb::create("e2e_types_my").await, TempDir::new("e2e_types_lake"));
    let sinks = format!("{}{}{}", pg_sink("pg", &pg, None), mysql_sink("my", &my, None), lake_sink("lake", &lake));
    let tables = ["public.types", "public.scalars"];
    let daemon = InProcess::start(&pipeline_toml(&source, &tables, &sinks, ""), Faults::default());
    let config = daemon.dir.path().join("sluice.toml");
    // The snapshot, then the same rows through the stream, then updates and a delete.
    let report = validate_until_equal(&config, Some("pg"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    source.exec("DELETE FROM types").await;
    source.exec(TYPES_ROWS).await;
    source.exec("UPDATE types SET t = 'changed', ai = '{9}', tz = now() WHERE id = 1; DELETE FROM types WHERE id = 3; INSERT INTO types (id) VALUES (4);").await;
    source.exec(&format!("DELETE FROM scalars; INSERT INTO scalars {SCALARS}; UPDATE scalars SET n = -n, u = gen_random_uuid(), d = d + 1, ai = '{{5,NULL}}', at = '{{}}' WHERE id = 1")).await;
    let report = validate_until_equal(&config, Some("pg"), T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    // MariaDB holds every value of rows 1 and 4; row 2's NaN and infinities it cannot:
    // that row is a dead letter (in both tables), not silently altered.
    let report = validate_until_equal(&config, Some("my"), Duration::from_secs(5)).await;
    assert_eq!(report.differences, 2, "{:#?}", report.lines);
    assert!(report.lines.iter().any(|l| l.contains("missing in target: key 2")), "{:#?}", report.lines);
    let letters: Vec<(i64, String)> =
        my.conn().await.query("SELECT seq, error FROM sluice_dead_letter").await.expect("dead letters");
    assert!(!letters.is_empty() && letters.iter().all(|(_, e)| e.contains("cannot be stored in MySQL")), "{letters:?}");
    let lake_state = daemon.group("lake");
    daemon.stop().expect("graceful stop");
    let files = walk(lake.path()).into_iter().filter(|f| f.ends_with(".parquet")).count();
    assert!(files >= 2, "snapshot and stream files in the lake: {lake_state:?}");
}

#[tokio::test]
async fn target_columns_retyped_behind_the_sink_are_read_again() {
    let source = PgDb::create("e2e_retype").await;
    source
        .exec("CREATE TABLE scores (id int PRIMARY KEY, score int, note int); INSERT INTO scores VALUES (1, 10, 100);")
        .await;
    let target = PgDb::create("e2e_retype_pg").await;
    let sinks = pg_sink("pg", &target, None);
    let daemon = InProcess::start(&pipeline_toml(&source, &["public.scores"], &sinks, ""), Faults::default());
    let config = daemon.dir.path().join("sluice.toml");
    assert_eq!(validate_until_equal(&config, None, T).await.differences, 0);
    // Retyped while the sink runs. The binary COPY would still send 4-byte integers: the
    // server rejects them as smallint (22P03), and as text it rejects their zero bytes
    // (22021), which would dead-letter the rows. The sink finds the new types when its
    // next transaction locks the table, and writes in those.
    target.exec("ALTER TABLE scores ALTER COLUMN score TYPE smallint, ALTER COLUMN note TYPE text").await;
    source
        .exec("INSERT INTO scores VALUES (2, 20, 200), (3, 30, 300); UPDATE scores SET score = 11 WHERE id = 1;")
        .await;
    let report = validate_until_equal(&config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert_eq!(target.count("sluice_dead_letter").await, 0);
    assert_eq!(
        target.rows("SELECT note FROM scores ORDER BY id").await,
        vec![vec![Some("100".to_string())], vec![Some("200".to_string())], vec![Some("300".to_string())]]
    );
    daemon.stop().expect("graceful stop");
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn mappings_rename_filter_and_follow_added_columns() {
    let source = PgDb::create("e2e_map").await;
    source.exec("CREATE TABLE users (id bigint PRIMARY KEY, name text, email text); INSERT INTO users VALUES (1, 'Ann', 'ANN@X.ORG'), (2, 'Bob', NULL);").await;
    let (mapped, copy, my) =
        (PgDb::create("e2e_map_pg").await, PgDb::create("e2e_copy_pg").await, MyDb::create("e2e_map_my").await);
    let dir = TempDir::new("mapping");
    let mapping = dir.write(
        "m.sql",
        "INSERT INTO users_email (user_id, full_name, email)\nSELECT id, name, lower(email) FROM public.users WHERE email IS NOT NULL;",
    );
    let m = mapping.display().to_string();
    let sinks = format!(
        "{}{}{}",
        pg_sink("mapped", &mapped, Some(&m)),
        pg_sink("copy", &copy, None),
        mysql_sink("my", &my, None)
    );
    let daemon = InProcess::start(&pipeline_toml(&source, &["public.users"], &sinks, ""), Faults::default());
    let config = daemon.dir.path().join("sluice.toml");
    assert_eq!(validate_until_equal(&config, None, T).await.differences, 0);
    assert_eq!(
        mapped.rows("SELECT user_id::text, full_name, email FROM users_email").await,
        vec![vec![Some("1".into()), Some("Ann".into()), Some("ann@x.org".into())]]
    );
    // Filter transitions: leaving the WHERE set deletes, entering it inserts.
    source.exec("UPDATE users SET email = NULL WHERE id = 1; UPDATE users SET email = 'Bob@Y.org' WHERE id = 2;").await;
    // A column added at the source reaches the identity copies.
    source.exec("ALTER TABLE users ADD COLUMN score int; INSERT INTO users VALUES (3, 'Cid', 'c@z', 7); UPDATE users SET score = 1 WHERE id = 2;").await;
    let report = validate_until_equal(&config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    assert_eq!(
        mapped.rows("SELECT user_id::text, email FROM users_email").await,
        vec![vec![Some("2".into()), Some("bob@y.org".into())], vec![Some("3".into()), Some("c@z".into())]]
    );
    assert_eq!(copy.rows("SELECT id::text, score::text FROM users").await[2], vec![Some("3".into()), Some("7".into())]);
    let mut c = my.conn().await;
    let score: Option<i32> = c.query_first("SELECT score FROM users WHERE id = 2").await.expect("score");
    assert_eq!(score, Some(1));
    daemon.stop().expect("graceful stop");
}

/// A column the source has and a target lacks (the sink adds it with the first row that
/// carries it) is a difference `validate` reports, not an error.
#[tokio::test]
async fn validate_reports_a_target_column_not_added_yet() {
    let source = PgDb::create("val_col").await;
    source
        .exec(
            "CREATE TABLE users (id bigint PRIMARY KEY, name text, score int); INSERT INTO users VALUES (1, 'Ann', 7);",
        )
        .await;
    let (pg, my) = (PgDb::create("val_col_pg").await, MyDb::create("val_col_my").await);
    pg.exec("CREATE TABLE users (id bigint PRIMARY KEY, name text); INSERT INTO users VALUES (1, 'Ann');").await;
    let mut c = my.conn().await;
    c.query_drop("CREATE TABLE users (id BIGINT PRIMARY KEY, name LONGTEXT)").await.expect("create");
    c.query_drop("INSERT INTO users VALUES (1, 'Ann')").await.expect("insert");
    let dir = TempDir::new("val_col");
    let sinks = format!("{}{}", pg_sink("pg", &pg, None), mysql_sink("my", &my, None));
    let config = dir.write("sluice.toml", &pipeline_toml(&source, &["public.users"], &sinks, ""));
    let config = Config::load(&config).expect("config");
    let report = sluice::validate::validate(&config, Path::new("/"), None).await.expect("validate");
    assert_eq!(report.differences, 2, "{:#?}", report.lines);
    for sink in ["pg", "my"] {
        let line = format!("sink {sink} public.users -> public.users: target table lacks column(s) score");
        assert!(report.lines.contains(&line), "{line:?} not in {:#?}", report.lines);
    }
}

#[tokio::test]
async fn a_loadgen_workload_over_the_direct_transport_ends_equal() {
    let bed = Bed::new("e2e_load", 300).await;
    let daemon = InProcess::start(&bed.toml("", "", &["pg", "my", "lake"], ""), Faults::default());
    let summary = loadgen::run(workload(&bed.source.url, 3000, 1500), Default::default()).await.expect("loadgen");
    assert!(summary.changes > 2500);
    let config = daemon.dir.path().join("sluice.toml");
    let report = validate_until_equal(&config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}", report.lines);
    bed.assert_lake_has_no_duplicates();
    daemon.stop().expect("graceful stop");
}

pub fn workload(url: &str, count: u64, rate: u64) -> loadgen::Options {
    loadgen::Options {
        url: url.into(),
        rate,
        duration: None,
        count: Some(count),
        mix: "insert=50,update=35,delete=15".parse().expect("mix"),
        tables: vec![loadgen::Table::Users, loadgen::Table::Orders],
        seed: 7,
        connections: 2,
        txn_size: 3,
        progress: false,
    }
}

#[tokio::test]
async fn kill_9_of_the_daemon_mid_stream_still_ends_equal_without_duplicates() {
    let bed = Bed::new("e2e_kill", 200).await;
    let mut daemon = Daemon::start(&bed.toml("", "", &["pg", "my", "lake"], ""));
    daemon.wait_http(T).await;
    let load = tokio::spawn(loadgen::run(workload(&bed.source.url, 4000, 1000), Default::default()));
    tokio::time::sleep(Duration::from_millis(1800)).await;
    daemon.kill9();
    let mut daemon = daemon.restart();
    daemon.wait_http(T).await;
    load.await.expect("loadgen task").expect("loadgen");
    let report = validate_until_equal(&daemon.config, None, T).await;
    assert_eq!(report.differences, 0, "{:#?}\n{}", report.lines, daemon.logs());
    assert_eq!(daemon.term(T).code(), Some(0));
    bed.assert_lake_has_no_duplicates();
    assert!(lake_positions(bed.lake.path()).len() > 1000);
}

/// (table folder, commit lsn, seq) of every row in the lake.
pub fn lake_positions(root: &Path) -> Vec<(String, i64, i64)> {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    let mut out = Vec::new();
    for f in walk(root).into_iter().filter(|f| f.ends_with(".parquet")) {
        let table = f.split("table=").nth(1).and_then(|s| s.split('/').next()).unwrap_or("").to_string();
        let file = std::fs::File::open(&f).expect("open");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet")
            .build()
            .expect("reader");
        for b in reader {
            let b = b.expect("batch");
            let lsn = b.column(b.schema().index_of("_commit_lsn").expect("lsn")).as_primitive::<Int64Type>().clone();
            let seq = b.column(b.schema().index_of("_seq").expect("seq")).as_primitive::<Int64Type>().clone();
            for i in 0..b.num_rows() {
                out.push((table.clone(), lsn.value(i), seq.value(i)));
            }
        }
    }
    out
}
