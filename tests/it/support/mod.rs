//! Test support: fresh databases per test (unique names), hosts from the environment with
//! local defaults, wait helpers with deadlines, and daemons in process or as a binary.
//!
//! Names carry the test run's start time (`it<unix seconds>_...`); databases and slots of
//! runs older than two hours are purged when a test creates its first database, so a test
//! that crashed leaves nothing behind for long (and never holds WAL on the server).

pub mod capture;
pub mod daemon;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mysql_async::prelude::Queryable;
use tokio_postgres::{Client, NoTls};

pub fn pg_base() -> String {
    std::env::var("SLUICE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn mysql_base() -> String {
    std::env::var("SLUICE_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn run_stamp() -> u64 {
    static STAMP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *STAMP.get_or_init(|| {
        std::env::var("SLUICE_TEST_RUN")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs())
    })
}

/// A name unique to this test process: `it<run>_<tag>_<pid>_<n>`, at most 63 characters.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let tag: String =
        tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(20).collect::<String>().to_lowercase();
    format!("it{}_{tag}_{}_{}", run_stamp(), std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

pub async fn pg_connect(url: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Drops databases and slots of test runs older than two hours.
async fn purge_old(admin: &Client) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let cutoff = run_stamp().saturating_sub(7200);
        let old = |name: &str| {
            name.strip_prefix("it")
                .and_then(|r| r.split('_').next())
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|t| t < cutoff)
        };
        if let Ok(rows) = admin
            .query("SELECT slot_name::text, active_pid FROM pg_replication_slots WHERE slot_name LIKE 'it%'", &[])
            .await
        {
            for r in rows {
                let name: String = r.get(0);
                if old(&name) {
                    if let Some(pid) = r.get::<_, Option<i32>>(1) {
                        let _ = admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).await;
                    }
                    let _ = admin.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await;
                }
            }
        }
        if let Ok(rows) = admin.query("SELECT datname::text FROM pg_database WHERE datname LIKE 'it%'", &[]).await {
            for r in rows {
                let name: String = r.get(0);
                if old(&name) {
                    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                }
            }
        }
    })
    .await;
}

/// A PostgreSQL database of its own, dropped (with its slots) when the test ends.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

impl PgDb {
    pub async fn create(tag: &str) -> PgDb {
        let admin = pg_connect(&format!("{}/postgres", pg_base())).await;
        purge_old(&admin).await;
        let name = unique(tag);
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        PgDb { url: format!("{}/{name}", pg_base()), name }
    }

    pub async fn client(&self) -> Client {
        pg_connect(&self.url).await
    }

    pub async fn exec(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    pub async fn count(&self, table: &str) -> i64 {
        let c = self.client().await;
        match c.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await {
            Ok(r) => r.get(0),
            Err(_) => -1,
        }
    }

    /// `SELECT ...` with every cell as text, rows sorted.
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let c = self.client().await;
        let rows = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let mut out: Vec<Vec<Option<String>>> = rows
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }
}

/// Drops a database and its replication slots.
pub async fn drop_pg_database(name: &str) {
    let admin = drop_slots(name).await;
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
}

/// Drops the replication slots of a database (they would hold WAL); returns the admin
/// connection.
async fn drop_slots(name: &str) -> Client {
    let admin = pg_connect(&format!("{}/postgres", pg_base())).await;
    let _ = admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL",
            &[&name],
        )
        .await;
    for _ in 0..50 {
        let _ = admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active", &[&name]).await;
        let left: i64 = admin
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE database = $1", &[&name])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin
}

/// Runs async cleanup from a `Drop`, on a runtime of its own.
fn cleanup(f: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(f);
        }
    })
    .join();
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        if std::thread::panicking() {
            eprintln!("kept database {name} (the test failed)");
            cleanup(async move {
                drop_slots(&name).await;
            });
            return;
        }
        cleanup(async move { drop_pg_database(&name).await });
    }
}

/// A MariaDB database of its own, dropped when the test ends.
pub struct MyDb {
    pub name: String,
    pub url: String,
}

impl MyDb {
    pub async fn create(tag: &str) -> MyDb {
        let name = unique(tag);
        let mut conn = mysql_async::Conn::from_url(&mysql_base()).await.expect("connect to MariaDB");
        conn.query_drop(format!("CREATE DATABASE `{name}`")).await.expect("create database");
        MyDb { url: format!("{}/{name}", mysql_base()), name }
    }

    pub async fn conn(&self) -> mysql_async::Conn {
        mysql_async::Conn::from_url(&self.url).await.expect("connect to MariaDB")
    }

    pub async fn count(&self, table: &str) -> i64 {
        let mut c = self.conn().await;
        c.query_first::<i64, _>(format!("SELECT count(*) FROM {table}")).await.ok().flatten().unwrap_or(-1)
    }
}

impl Drop for MyDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        cleanup(async move {
            if let Ok(mut c) = mysql_async::Conn::from_url(&mysql_base()).await {
                let _ = c.query_drop(format!("DROP DATABASE IF EXISTS `{name}`")).await;
            }
        });
    }
}

/// Waits until `check` holds, polling, or panics after `timeout` naming `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A temporary folder removed with the value (kept when the test fails, for a look).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} (the test failed)", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The loadgen schema (users, orders) in `db`.
pub async fn loadgen_schema(db: &PgDb) {
    loadgen::create_schema(&db.client().await).await.expect("create loadgen schema");
}

/// A table with every type sluice decodes, and three rows: typical, edge and NULL values.
pub const TYPES_DDL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE types (
    id int PRIMARY KEY,
    i2 smallint, i4 int, i8 bigint, n numeric(12,3), nu numeric, f4 real, f8 double precision, b boolean,
    t text, vc varchar(20), c char(5), d date, tm time, ts timestamp, tz timestamptz, iv interval,
    u uuid, j json, jb jsonb, by bytea, ai int[], at text[], m mood
);";

pub const TYPES_ROWS: &str = "
INSERT INTO types VALUES
 (1, 7, 42, 9000000000, 1234.567, 3.14159265358979323846, 1.5, 2.25, true,
  'plain', 'var', 'ch', '2024-02-29', '13:45:07.123456', '2024-02-29 13:45:07.123456', '2024-02-29 13:45:07.123456+02',
  '1 year 2 mons 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', '{\"b\": {\"c\": null}}',
  '\\x00ff10', '{1,NULL,3}', '{\"a,b\",\"say \\\"hi\\\"\",NULL}', 'happy'),
 (2, -32768, -2147483648, -9223372036854775808, -0.001, 'NaN', 'NaN', '-Infinity', false,
  E'tab\\there\\nnewline \\\\ backslash ''quote'' ü€😀', '', '', '-infinity', '00:00:00', 'infinity', '1900-01-01 00:00:00+00',
  '-1 days -00:00:01', '00000000-0000-0000-0000-000000000000', '[]', '{}', '\\x', '{}', '{}', 'sad'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);";
