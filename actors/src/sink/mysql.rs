//! The MySQL/MariaDB sink: `INSERT ... ON DUPLICATE KEY UPDATE`, `UPDATE ... JOIN` a
//! derived table for partial updates, `DELETE ... WHERE key IN (...)`, in one transaction
//! with the offsets in `sluice_offsets` (per lane, see [`crate::sink::db`]).
//!
//! The session runs in UTC with strict SQL mode, so a value the column cannot hold is an
//! error (and the row a dead letter), never silently truncated, and at READ COMMITTED: its
//! statements all find rows by key, and under REPEATABLE READ InnoDB also locks gaps (one
//! lane's upserts held the gap above the highest key, so the other lane's inserts of new
//! keys waited for that lane's commit, which waited behind them in the writer: a lock
//! wait timeout, error 1205, in one benchmark run of two with two lanes). A target schema
//! `public` is the connection's database; any other schema names a database. Statements
//! carry their values as parameters of prepared statements ([`Statement`]), at most
//! [`MAX_ROWS_PER_STATEMENT`] rows each (which also stays under `max_allowed_packet`).
//! MariaDB's bulk requests (`COM_STMT_BULK_EXECUTE`: one single-row statement and the
//! parameters of many rows) were tried and not kept: no faster end to end and no less
//! server CPU in the benchmark, though a client sending only inserts saved the server half
//! of its CPU with them.
//!
//! InnoDB reads a page it lacks synchronously, in the thread of the statement that needs
//! it: a unit updating rows spread over a table larger than the buffer pool waits on one
//! disk read at a time. A [`Prefetcher`] reads the keys of a part's updates and deletes on
//! [`PREFETCH_CONNECTIONS`] helper connections while the sink's own connection applies it,
//! so the disk serves several reads at once and the apply finds most pages in the pool (the
//! technique of MySQL replication prefetchers). The helpers only read, uncommitted, outside
//! the sink's transaction: they take no locks and change nothing; a helper that falls
//! behind or fails is skipped, never waited for. They read only while the server's pool
//! misses pages (`Innodb_buffer_pool_reads`, checked every [`PREFETCH_CHECK`]): when the
//! tables fit in the pool their reads would only take CPU from the apply.

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Row as MyRow, Value};

use crate::error::{Context, Error, Result};
use crate::mapper::DeadLetter;
use crate::mapper::plan::{DEFAULT_TARGET_SCHEMA, TargetTable};
use crate::message::{Op, Position, StreamOffset};
use crate::schema::{PG_TYPE_METADATA, PgType};
use crate::sink::db::{Database, Durable, PartOp};
use crate::sink::encode::{Unrepresentable, mysql_value};
use crate::sink::reduce::Part;

/// Rows per generated statement (a power of two, see [`statement_ranges`]); 1,000 with
/// literals before. Smaller because the connection keeps the description of every
/// parameter (about 200 bytes each) of each statement it prepared, and the server an
/// item per parameter; a round trip per 256 rows costs little next to the rows.
pub const MAX_ROWS_PER_STATEMENT: usize = 256;
/// The most parameters the protocol lets a statement have.
const MAX_PARAMS: usize = u16::MAX as usize;
/// Prepared statements each connection keeps (at least; a URL's `stmt_cache_size` may
/// raise it): with [`statement_ranges`] a table needs at most 9 texts per kind of statement.
const STMT_CACHE: usize = 64;
/// Helper connections reading ahead of the apply (see the module documentation).
pub const PREFETCH_CONNECTIONS: usize = 2;
/// Keys per prefetching statement (a power of two, see [`statement_ranges`]).
const PREFETCH_KEYS: usize = 128;
/// Statements queued per helper before further ones are dropped.
const PREFETCH_QUEUE: usize = 32;
/// How often the server's buffer pool misses are read to switch prefetching on or off.
const PREFETCH_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// Pages read from disk per second (`Innodb_buffer_pool_reads`) above which the helpers read
/// ahead: below it the tables fit in the pool, and their reads would only cost CPU.
const PREFETCH_MIN_READS_PER_S: u64 = 100;

const SETUP_SQL: &str = "\
CREATE TABLE IF NOT EXISTS sluice_offsets (
    sink VARCHAR(191) NOT NULL,
    stream VARCHAR(191) NOT NULL,
    part INT NOT NULL,
    next_offset BIGINT NOT NULL,
    lsn BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    generation BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (sink, stream, part)
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS sluice_dead_letter (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    sink VARCHAR(191) NOT NULL,
    source_table VARCHAR(255) NOT NULL,
    target_table VARCHAR(255),
    op VARCHAR(8) NOT NULL,
    lsn BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    error TEXT NOT NULL,
    `change` LONGTEXT NOT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB";

const SESSION_SQL: &str = "SET time_zone = '+00:00', \
    sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', \
    autocommit = 1; \
    SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED";

pub fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// The database a target table lives in: `None` for the connection's own, which the
/// default target schema `public` names; any other schema names a database.
pub fn database_of(target: &TargetTable) -> Option<&str> {
    (target.name.schema != DEFAULT_TARGET_SCHEMA).then_some(target.name.schema.as_str())
}

/// The table's name in MySQL (see [`database_of`]).
pub fn table_name(target: &TargetTable) -> String {
    match database_of(target) {
        None => quote(&target.name.name),
        Some(database) => format!("{}.{}", quote(database), quote(&target.name.name)),
    }
}

/// The MySQL type a target column is created with (DESIGN.md type table).
pub fn column_type(field: &Field, key: bool) -> String {
    let pg = field.metadata().get(PG_TYPE_METADATA).map(|p| PgType::from_type_name(p));
    match field.data_type() {
        DataType::Boolean => "TINYINT(1)".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Decimal128(p, s) => {
            let s = (*s).max(0) as u8;
            format!("DECIMAL({},{})", (*p).clamp(1, 65).max(s), s.min(30))
        }
        DataType::Utf8 => match pg {
            Some(PgType::Json | PgType::Jsonb) if !key => "JSON".into(),
            Some(PgType::Uuid) => "CHAR(36)".into(),
            Some(PgType::Numeric(_)) if key => "VARCHAR(100)".into(),
            Some(PgType::Text(name)) if name.starts_with("character varying(") || name.starts_with("varchar(") => {
                let n: u32 = name.split(['(', ')']).nth(1).and_then(|n| n.parse().ok()).unwrap_or(255);
                if n <= 16_383 { format!("VARCHAR({n})") } else { "LONGTEXT".into() }
            }
            _ if key => "VARCHAR(255)".into(),
            _ => "LONGTEXT".into(),
        },
        DataType::Binary => if key { "VARBINARY(255)" } else { "LONGBLOB" }.into(),
        DataType::Date32 => "DATE".into(),
        DataType::Time64(_) => "TIME(6)".into(),
        DataType::Timestamp(_, _) => "DATETIME(6)".into(),
        DataType::Interval(_) => "VARCHAR(64)".into(),
        DataType::List(_) => "JSON".into(),
        _ => "LONGTEXT".into(),
    }
}

pub fn create_table_sql(target: &TargetTable) -> String {
    let columns: Vec<String> = target
        .schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let key = target.key.contains(&i);
            format!("{} {}{}", quote(f.name()), column_type(f, key), if key { " NOT NULL" } else { "" })
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({})) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        table_name(target),
        columns.join(", "),
        key_columns(target).join(", ")
    )
}

fn key_columns(target: &TargetTable) -> Vec<String> {
    target.key.iter().map(|&k| quote(target.schema.field(k).name())).collect()
}

/// A statement with `?` placeholders and its parameters. Sent in the binary protocol: each
/// statement text is prepared once per connection (the connection caches it), and values
/// travel as they are instead of as literals the server would lex, unescape and convert —
/// which took most of its CPU with literal multi-row statements (module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
}

/// Appends `(?,...),(?,...)`: `rows` lists of `columns` placeholders.
fn placeholders(sql: &mut String, rows: usize, columns: usize) {
    let row = format!("({})", vec!["?"; columns].join(","));
    sql.push_str(&vec![row; rows].join(","));
}

/// The cells of `arrays` at `rows` as parameters, row after row.
fn row_params(arrays: &[&ArrayRef], rows: impl ExactSizeIterator<Item = usize>) -> Result<Vec<Value>, Unrepresentable> {
    let mut params = Vec::with_capacity(rows.len() * arrays.len());
    for r in rows {
        for a in arrays {
            params.push(mysql_value(a, r)?);
        }
    }
    Ok(params)
}

/// Rows per statement for rows of `columns` values: [`MAX_ROWS_PER_STATEMENT`], or fewer
/// to stay within the protocol's [`MAX_PARAMS`]; a power of two (see [`statement_ranges`]).
pub fn rows_per_statement(columns: usize) -> usize {
    let fit = (MAX_PARAMS / columns.max(1)).max(1);
    let max = MAX_ROWS_PER_STATEMENT.min(fit);
    1 << max.ilog2()
}

/// Ranges covering rows `0..n` in statements of at most `max` rows (a power of two): whole
/// statements of `max` rows, then what is left in descending powers of two. A table has so
/// at most `log2(max) + 1` statement texts of each kind, which the connection prepares once
/// and keeps, whatever the sizes of the parts.
pub fn statement_ranges(n: usize, max: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::with_capacity(n / max + max.ilog2() as usize + 1);
    let mut start = 0;
    let mut size = max;
    while start < n {
        while size > n - start {
            size /= 2;
        }
        ranges.push(start..start + size);
        start += size;
    }
    ranges
}

/// What a part's statements do.
enum Kind {
    /// `INSERT ... VALUES ... ON DUPLICATE KEY UPDATE`.
    Upsert,
    /// `DELETE ... WHERE key IN (...)`.
    Delete,
    /// `UPDATE t JOIN (rows) s ON key SET` these columns.
    Update(Vec<usize>),
}

/// The statements applying one kind of change to rows of a part: their text depends only
/// on how many rows a statement carries, and each row's parameters are its cells of the
/// `used` columns, in the order of the text's placeholders.
pub struct Statements<'a> {
    target: &'a TargetTable,
    part: &'a Part,
    kind: Kind,
    used: Vec<usize>,
}

impl<'a> Statements<'a> {
    /// The statements for `op` on rows of `part`; `None` for an update that leaves every
    /// column as it is.
    pub fn new(target: &'a TargetTable, op: &PartOp<'_>, part: &'a Part) -> Option<Self> {
        let all = 0..target.schema.fields().len();
        let (kind, used): (Kind, Vec<usize>) = match op {
            PartOp::Upsert => (Kind::Upsert, all.collect()),
            PartOp::Delete => (Kind::Delete, target.key.clone()),
            PartOp::Update(unchanged) => {
                let set: Vec<usize> =
                    all.filter(|i| !target.key.contains(i) && !unchanged.get(*i).copied().unwrap_or(false)).collect();
                if set.is_empty() {
                    return None;
                }
                let used = target.key.iter().chain(&set).copied().collect();
                (Kind::Update(set), used)
            }
        };
        Some(Self { target, part, kind, used })
    }

    /// The text of a statement for `rows` rows.
    fn sql(&self, rows: usize) -> String {
        let target = self.target;
        let name = |c: usize| quote(target.schema.field(c).name());
        match &self.kind {
            Kind::Upsert => {
                let n = target.schema.fields().len();
                let cols: Vec<String> = (0..n).map(name).collect();
                let mut sql = format!("INSERT INTO {} ({}) VALUES ", table_name(target), cols.join(", "));
                placeholders(&mut sql, rows, n);
                let updates: Vec<String> =
                    (0..n).filter(|i| !target.key.contains(i)).map(|i| format!("{0} = VALUES({0})", cols[i])).collect();
                sql.push_str(" ON DUPLICATE KEY UPDATE ");
                match updates.is_empty() {
                    true => sql.push_str(&format!("{0} = {0}", cols[target.key[0]])),
                    false => sql.push_str(&updates.join(", ")),
                }
                sql
            }
            Kind::Delete => keys_in(format!("DELETE FROM {}", table_name(target)), target, rows),
            Kind::Update(set) => {
                let mut derived = String::from("SELECT ");
                for (j, &c) in self.used.iter().enumerate() {
                    derived.push_str(if j == 0 { "? AS " } else { ", ? AS " });
                    derived.push_str(&name(c));
                }
                for _ in 1..rows {
                    derived.push_str(" UNION ALL SELECT ?");
                    derived.push_str(&", ?".repeat(self.used.len() - 1));
                }
                let on: Vec<String> = key_columns(target).iter().map(|k| format!("t.{k} = s.{k}")).collect();
                let sets: Vec<String> = set.iter().map(|&c| format!("t.{0} = s.{0}", name(c))).collect();
                format!(
                    "UPDATE {} t JOIN ({derived}) s ON {} SET {}",
                    table_name(target),
                    on.join(" AND "),
                    sets.join(", ")
                )
            }
        }
    }

    /// The statement for rows `range`.
    pub fn statement(&self, range: std::ops::Range<usize>) -> Result<Statement, Unrepresentable> {
        let columns: Vec<&ArrayRef> = self.used.iter().map(|&c| self.part.rows.column(c)).collect();
        Ok(Statement { sql: self.sql(range.len()), params: row_params(&columns, range)? })
    }
}

/// `<head> WHERE (key) IN ((?), ...)` for `rows` keys.
fn keys_in(mut sql: String, target: &TargetTable, rows: usize) -> String {
    sql.push_str(" WHERE (");
    sql.push_str(&key_columns(target).join(", "));
    sql.push_str(") IN (");
    placeholders(&mut sql, rows, target.key.len());
    sql.push(')');
    sql
}

/// A read of the rows `rows` of `part` by key, which brings their pages into the pool.
pub fn prefetch_sql(target: &TargetTable, part: &Part, rows: &[usize]) -> Result<Statement, Unrepresentable> {
    let keys: Vec<&ArrayRef> = target.key.iter().map(|&k| part.rows.column(k)).collect();
    Ok(Statement {
        sql: keys_in(format!("SELECT 1 FROM {}", table_name(target)), target, rows.len()),
        params: row_params(&keys, rows.iter().copied())?,
    })
}

/// Helper connections that read the keys a part is about to change (module documentation).
struct Prefetcher {
    queues: Vec<tokio::sync::mpsc::Sender<Statement>>,
    next: usize,
    /// Whether the pool missed pages lately (see [`PREFETCH_MIN_READS_PER_S`]).
    active: bool,
    /// When `Innodb_buffer_pool_reads` was last read, and its value then.
    checked: Option<(std::time::Instant, u64)>,
}

impl Prefetcher {
    /// Opens up to `n` helpers; one that cannot connect is left out (prefetching is
    /// advisory), and with none there is no prefetcher.
    async fn start(opts: &Opts, n: usize, describe: &str) -> Option<Self> {
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            let helper = async {
                let mut conn = Conn::new(opts.clone()).await?;
                conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED").await?;
                Ok::<_, mysql_async::Error>(conn)
            };
            let conn = match helper.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(sink = %describe, error = %e, "prefetch helper left out");
                    continue;
                }
            };
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Statement>(PREFETCH_QUEUE);
            let describe = describe.to_string();
            tokio::spawn(async move {
                let mut conn = conn;
                while let Some(Statement { sql, params }) = rx.recv().await {
                    match conn.exec_drop(sql, params).await {
                        // A statement the server refused (a table dropped meanwhile): the
                        // connection is still good.
                        Ok(()) | Err(mysql_async::Error::Server(_)) => {}
                        Err(e) => {
                            tracing::debug!(sink = %describe, error = %e, "prefetch helper stops");
                            break;
                        }
                    }
                }
                let _ = conn.disconnect().await;
            });
            queues.push(tx);
        }
        (!queues.is_empty()).then_some(Self { queues, next: 0, active: false, checked: None })
    }

    /// Queues reads of the keys of the rows of `part` that `wanted` selects, spread over
    /// the helpers in order; what finds a full queue is dropped.
    fn read_ahead(&mut self, target: &TargetTable, part: &Part, wanted: impl Fn(usize) -> bool) {
        if !self.active {
            return;
        }
        let rows: Vec<usize> = (0..part.len()).filter(|&r| wanted(r)).collect();
        for range in statement_ranges(rows.len(), PREFETCH_KEYS) {
            let Ok(sql) = prefetch_sql(target, part, &rows[range]) else { continue };
            let queue = &self.queues[self.next % self.queues.len()];
            self.next = self.next.wrapping_add(1);
            let _ = queue.try_send(sql);
        }
    }

    /// Switches read-ahead on while the buffer pool misses pages, every [`PREFETCH_CHECK`],
    /// from the server's count of pages read from disk (`reads`, read by the caller when
    /// [`Prefetcher::due`]). The helpers' own reads count too: while they find pages on
    /// disk, the apply would have.
    fn observe(&mut self, reads: u64) {
        let now = std::time::Instant::now();
        if let Some((at, before)) = self.checked {
            let per_s = reads.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64().max(0.001);
            self.active = per_s >= PREFETCH_MIN_READS_PER_S as f64;
        }
        self.checked = Some((now, reads));
    }

    fn due(&self) -> bool {
        self.checked.is_none_or(|(at, _)| at.elapsed() >= PREFETCH_CHECK)
    }
}

/// The MySQL/MariaDB sink's database.
pub struct MySqlDatabase {
    opts: Opts,
    conn: Option<Conn>,
    prefetcher: Option<Prefetcher>,
    describe: String,
}

impl MySqlDatabase {
    pub fn new(url: &str, describe: impl Into<String>) -> Result<Self> {
        let describe = describe.into();
        let opts = Opts::from_url(url).map_err(|e| Error::Fatal(format!("sink {describe}: bad MySQL URL: {e}")))?;
        let cache = opts.stmt_cache_size().max(STMT_CACHE);
        let opts = OptsBuilder::from_opts(opts).stmt_cache_size(cache).into();
        Ok(Self { opts, conn: None, prefetcher: None, describe })
    }

    fn conn(&mut self) -> Result<&mut Conn> {
        self.conn.as_mut().ok_or_else(|| Error::Fatal("internal: sink used before connect".into()))
    }

    /// What a statement's error names: the sink and the statement's first words.
    fn what(&self, sql: &str) -> String {
        format!("{}: {}", self.describe, sql.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
    }

    async fn exec(&mut self, sql: String) -> Result<()> {
        let what = self.what(&sql);
        self.conn()?.query_drop(sql).await.context(what)
    }

    async fn exec_statement(&mut self, Statement { sql, params }: Statement) -> Result<()> {
        let what = self.what(&sql);
        self.conn()?.exec_drop(sql, params).await.context(what)
    }

    fn database(&self) -> String {
        self.opts.db_name().unwrap_or("").to_string()
    }
}

impl Database for MySqlDatabase {
    async fn connect(&mut self) -> Result<()> {
        self.prefetcher = None;
        if let Some(old) = self.conn.take() {
            drop(old);
        }
        let mut conn = Conn::new(self.opts.clone()).await.context(format!("connect to sink {}", self.describe))?;
        conn.query_drop(SESSION_SQL).await.context(format!("{}: configure session", self.describe))?;
        conn.query_drop(SETUP_SQL).await.context(format!("{}: create sluice tables", self.describe))?;
        self.conn = Some(conn);
        self.prefetcher = Prefetcher::start(&self.opts, PREFETCH_CONNECTIONS, &self.describe).await;
        Ok(())
    }

    async fn read_offsets(&mut self, sink: &str) -> Result<Vec<StreamOffset>> {
        let describe = self.describe.clone();
        let rows: Vec<MyRow> = self
            .conn()?
            .exec("SELECT stream, part, next_offset, lsn, seq, generation FROM sluice_offsets WHERE sink = ?", (sink,))
            .await
            .context(format!("{describe}: read offsets"))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let (stream, partition, next_offset, lsn, seq, generation): (String, i32, i64, i64, i64, i64) =
                    mysql_async::from_row(r);
                StreamOffset {
                    stream,
                    partition,
                    next_offset,
                    position: Position { lsn: lsn as u64, seq: seq as u64 },
                    generation: generation as u64,
                    from_offset: None,
                }
            })
            .collect())
    }

    async fn begin(&mut self, _targets: &[Arc<TargetTable>]) -> Result<()> {
        self.exec("START TRANSACTION".into()).await
    }

    async fn ensure_table(&mut self, target: &Arc<TargetTable>) -> Result<()> {
        let describe = self.describe.clone();
        let schema = match database_of(target) {
            None => self.database(),
            Some(database) => {
                self.exec(format!("CREATE DATABASE IF NOT EXISTS {}", quote(database))).await?;
                database.to_string()
            }
        };
        let existing: Vec<(String, String)> = self
            .conn()?
            .exec(
                "SELECT column_name, column_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
                (schema.as_str(), target.name.name.as_str()),
            )
            .await
            .context(format!("{describe}: describe {}", target.name))?;
        if existing.is_empty() {
            self.exec(create_table_sql(target)).await?;
            tracing::info!(sink = %describe, table = %target.name, "created target table");
            return Ok(());
        }
        for (i, f) in target.schema.fields().iter().enumerate() {
            if existing.iter().any(|(c, _)| c.eq_ignore_ascii_case(f.name())) {
                continue;
            }
            if target.key.contains(&i) {
                return Err(Error::Fatal(format!(
                    "sink {describe}: table {} lacks the key column {}",
                    target.name,
                    f.name()
                )));
            }
            self.exec(format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                table_name(target),
                quote(f.name()),
                column_type(f, false)
            ))
            .await?;
            tracing::info!(sink = %describe, table = %target.name, column = %f.name(), "added target column");
        }
        Ok(())
    }

    async fn apply(&mut self, target: &TargetTable, op: PartOp<'_>, part: &Part) -> Result<()> {
        let n = part.len();
        if self.prefetcher.as_ref().is_some_and(Prefetcher::due) {
            let reads: mysql_async::Result<Option<(String, u64)>> =
                self.conn()?.query_first("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_reads'").await;
            match reads {
                Ok(Some((_, reads))) => {
                    if let Some(p) = self.prefetcher.as_mut() {
                        p.observe(reads);
                    }
                }
                // Read-ahead is advisory: a server that does not tell goes without it.
                Ok(None) | Err(mysql_async::Error::Server(_)) => {
                    tracing::info!(sink = %self.describe, "buffer pool misses unreadable: no read-ahead");
                    self.prefetcher = None;
                }
                Err(e) => return Err(e).context(format!("{}: read buffer pool misses", self.describe)),
            }
        }
        if let Some(prefetcher) = self.prefetcher.as_mut() {
            // Inserts and snapshot rows go to keys the table does not hold yet.
            prefetcher.read_ahead(target, part, |r| !matches!(part.meta[r].op, Op::Insert | Op::Read));
        }
        let Some(statements) = Statements::new(target, &op, part) else { return Ok(()) };
        for range in statement_ranges(n, rows_per_statement(target.schema.fields().len())) {
            // The bisection isolates the row with a value MySQL cannot hold.
            let statement = statements
                .statement(range)
                .map_err(|e| Error::Rejected(format!("sink {}: table {}: {e}", self.describe, target.name)))?;
            self.exec_statement(statement).await?;
        }
        Ok(())
    }

    async fn truncate(&mut self, target: &TargetTable) -> Result<()> {
        // TRUNCATE would commit implicitly; DELETE stays in the transaction.
        self.exec(format!("DELETE FROM {}", table_name(target))).await
    }

    async fn savepoint(&mut self) -> Result<()> {
        self.exec("SAVEPOINT sluice_part".into()).await
    }

    async fn release_savepoint(&mut self) -> Result<()> {
        self.exec("RELEASE SAVEPOINT sluice_part".into()).await
    }

    async fn rollback_to_savepoint(&mut self) -> Result<()> {
        self.exec("ROLLBACK TO SAVEPOINT sluice_part".into()).await
    }

    async fn rollback(&mut self) -> Result<()> {
        self.exec("ROLLBACK".into()).await
    }

    async fn dead_letters(&mut self, sink: &str, letters: &[DeadLetter]) -> Result<()> {
        let describe = self.describe.clone();
        let params: Vec<_> = letters
            .iter()
            .map(|d| {
                (
                    sink.to_string(),
                    d.source.to_string(),
                    d.target.as_ref().map(|t| t.to_string()),
                    d.op.code(),
                    d.position.lsn as i64,
                    d.position.seq as i64,
                    d.error.clone(),
                    d.change.clone(),
                )
            })
            .collect();
        let conn = self.conn()?;
        for p in params {
            conn.exec_drop(
                "INSERT INTO sluice_dead_letter (sink, source_table, target_table, op, lsn, seq, error, `change`) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                mysql_async::Params::Positional(vec![
                    p.0.into(),
                    p.1.into(),
                    p.2.into(),
                    p.3.into(),
                    p.4.into(),
                    p.5.into(),
                    p.6.into(),
                    p.7.into(),
                ]),
            )
            .await
            .context(format!("{describe}: write dead letters"))?;
        }
        Ok(())
    }

    async fn clear_offsets(&mut self, sink: &str, stream: &str) -> Result<()> {
        let describe = self.describe.clone();
        self.conn()?
            .exec_drop("DELETE FROM sluice_offsets WHERE sink = ? AND stream = ?", (sink, stream))
            .await
            .context(format!("{describe}: clear offsets"))
    }

    async fn commit(&mut self, sink: &str, offsets: &[StreamOffset]) -> Result<Durable> {
        let describe = self.describe.clone();
        for o in offsets {
            // Compare-and-set per partition (see StreamOffset::from_offset): with a starting
            // offset, the stored one is replaced only if it still is that offset.
            let sql = match o.from_offset {
                None => "INSERT INTO sluice_offsets (sink, stream, part, next_offset, lsn, seq, generation) \
                         VALUES (?, ?, ?, ?, ?, ?, ?) \
                         ON DUPLICATE KEY UPDATE next_offset = VALUES(next_offset), lsn = VALUES(lsn), seq = VALUES(seq), \
                         generation = VALUES(generation), updated_at = CURRENT_TIMESTAMP(6)"
                    .to_string(),
                Some(from) => format!(
                    "INSERT INTO sluice_offsets (sink, stream, part, next_offset, lsn, seq, generation) \
                     VALUES (?, ?, ?, ?, ?, ?, ?) \
                     ON DUPLICATE KEY UPDATE updated_at = IF(next_offset = {from}, CURRENT_TIMESTAMP(6), updated_at), \
                     lsn = IF(next_offset = {from}, VALUES(lsn), lsn), seq = IF(next_offset = {from}, VALUES(seq), seq), \
                     generation = IF(next_offset = {from}, VALUES(generation), generation), \
                     next_offset = IF(next_offset = {from}, VALUES(next_offset), next_offset)"
                ),
            };
            let conn = self.conn()?;
            conn.exec_drop(
                sql,
                (
                    sink,
                    o.stream.as_str(),
                    o.partition,
                    o.next_offset,
                    o.position.lsn as i64,
                    o.position.seq as i64,
                    o.generation as i64,
                ),
            )
            .await
            .context(format!("{describe}: store offsets"))?;
            if o.from_offset.is_some() && conn.affected_rows() == 0 {
                let _ = conn.query_drop("ROLLBACK").await;
                return Err(Error::Restart(format!(
                    "sink {describe}: another consumer applied partition {}/{} meanwhile; this unit is abandoned",
                    o.stream, o.partition
                )));
            }
        }
        self.exec("COMMIT".into()).await?;
        Ok(Durable::Now)
    }

    /// Commits are durable on return (InnoDB flushes its log at each commit by default).
    async fn flush(&mut self, _sink: &str) -> Result<u64> {
        Ok(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::RowMeta;
    use crate::schema::TableId;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::Schema;
    use std::collections::HashMap;

    fn target() -> TargetTable {
        let json = Field::new("attrs", DataType::Utf8, true)
            .with_metadata(HashMap::from([(PG_TYPE_METADATA.to_string(), "jsonb".to_string())]));
        TargetTable {
            name: TableId::new("public", "users"),
            source: TableId::new("public", "users"),
            schema: Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("name", DataType::Utf8, true),
                json,
            ])),
            key: vec![0],
        }
    }

    fn part(t: &TargetTable) -> Part {
        let rows = RecordBatch::try_new(
            t.schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("o'hara"), None])),
                Arc::new(StringArray::from(vec![Some("{}"), Some("[1]")])),
            ],
        )
        .unwrap();
        let meta = RowMeta { op: Op::Insert, position: Position::START, commit_micros: 0, lsn: 0, xid: 0 };
        Part { rows, meta: vec![meta; 2] }
    }

    #[tokio::test]
    async fn prefetching_follows_the_pool_misses() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let mut p = Prefetcher { queues: vec![tx], next: 0, active: false, checked: None };
        assert!(p.due());
        p.observe(1_000);
        assert!(!p.active, "no rate without a first reading");
        assert!(!p.due());
        p.observe(1_000_000);
        assert!(p.active, "pages read from disk: read ahead");
        p.observe(1_000_000);
        assert!(!p.active, "no misses: the tables fit in the pool");
    }

    #[test]
    fn ddl_maps_types() {
        assert_eq!(
            create_table_sql(&target()),
            "CREATE TABLE IF NOT EXISTS `users` (`id` BIGINT NOT NULL, `name` LONGTEXT, `attrs` JSON, PRIMARY KEY (`id`)) \
             ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        );
        assert_eq!(column_type(&Field::new("k", DataType::Utf8, true), true), "VARCHAR(255)");
        assert_eq!(column_type(&Field::new("d", DataType::Decimal128(12, 2), true), false), "DECIMAL(12,2)");
    }

    #[test]
    fn statements_are_multi_row_with_parameters() {
        let t = target();
        let p = part(&t);
        let (one, two, hara) = (Value::Int(1), Value::Int(2), Value::Bytes(b"o'hara".to_vec()));
        let statement = |op: PartOp<'_>| Statements::new(&t, &op, &p).map(|s| s.statement(0..2).unwrap());
        let upsert = statement(PartOp::Upsert).unwrap();
        assert_eq!(
            upsert.sql,
            "INSERT INTO `users` (`id`, `name`, `attrs`) VALUES (?,?,?),(?,?,?) \
             ON DUPLICATE KEY UPDATE `name` = VALUES(`name`), `attrs` = VALUES(`attrs`)"
        );
        let json = |j: &str| Value::Bytes(j.as_bytes().to_vec());
        assert_eq!(upsert.params, [one.clone(), hara.clone(), json("{}"), two.clone(), Value::NULL, json("[1]")]);
        let delete = statement(PartOp::Delete).unwrap();
        assert_eq!(delete.sql, "DELETE FROM `users` WHERE (`id`) IN ((?),(?))");
        assert_eq!(delete.params, [one.clone(), two.clone()]);
        let prefetch = prefetch_sql(&t, &p, &[1]).unwrap();
        assert_eq!(
            (prefetch.sql.as_str(), prefetch.params),
            ("SELECT 1 FROM `users` WHERE (`id`) IN ((?))", vec![two.clone()])
        );
        let update = statement(PartOp::Update(&[false, false, true])).unwrap();
        assert_eq!(
            update.sql,
            "UPDATE `users` t JOIN (SELECT ? AS `id`, ? AS `name` UNION ALL SELECT ?, ?) s ON t.`id` = s.`id` SET t.`name` = s.`name`"
        );
        assert_eq!(update.params, [one.clone(), hara, two.clone(), Value::NULL]);
        assert!(statement(PartOp::Update(&[false, true, true])).is_none());
    }

    #[test]
    fn statements_come_in_few_sizes() {
        let sizes = |n, max| statement_ranges(n, max).iter().map(|r| r.len()).collect::<Vec<_>>();
        assert_eq!(sizes(0, 256), Vec::<usize>::new());
        assert_eq!(sizes(600, 256), [256, 256, 64, 16, 8]);
        assert_eq!(sizes(3, 4), [2, 1]);
        let ranges = statement_ranges(1000, 256);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start) && ranges.last().unwrap().end == 1000);
        assert_eq!(rows_per_statement(13), 256);
        assert_eq!(rows_per_statement(1000), 64, "65,535 parameters at most");
        assert_eq!(rows_per_statement(100_000), 1);
    }
}
