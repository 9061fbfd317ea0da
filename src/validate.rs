//! `sluice validate`: compares each source table with each database sink, through the
//! sink's mapping, and prints the differences (exit 1 when there are some).
//!
//! The source is read in primary-key order and mapped in chunks, exactly as the pipeline
//! maps a snapshot; for each chunk the target rows with the same keys are fetched and both
//! sides are compared cell by cell on canonical text (per-row hashes), so memory stays
//! bounded by the chunk. Row counts are compared once per target, which also reveals rows
//! the target has and the source does not. Run it when the source is quiet (or expect the
//! changes in flight to show up as differences). A target table or column the sink has not
//! created yet (it creates them with the first row that needs them) is one difference.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use arrow::array::ArrayRef;
use futures::StreamExt;
use mysql_async::prelude::Queryable;
use sluice_actors::compare::{canonical, row_hash};
use sluice_actors::mapper::plan::TargetTable;
use sluice_actors::mapper::{MappedRows, Mapper, SinkItem};
use sluice_actors::message::{Change, ChangeBatch, Op, Position};
use sluice_actors::schema::{TableSchema, quote_ident, quote_literal};
use sluice_actors::sink::encode::{cell_string, mysql_value};
use sluice_actors::sink::mysql::{database_of, quote as my_quote, table_name as my_table};
use sluice_actors::source::catalog;
use sluice_actors::source::snapshot::CopyParser;

use crate::config::{Config, SinkKind};
use crate::pipeline::{self, SinkPlan};

/// Source rows compared per round trip.
const CHUNK_ROWS: usize = 5000;
/// Differences listed per target at most.
const MAX_LISTED: usize = 10;

pub fn run(path: &Path, only: Option<&str>) -> ExitCode {
    let (config, base) = match Config::load_for_command(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build the tokio runtime");
    match runtime.block_on(validate(&config, &base, only)) {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            if report.differences == 0 {
                println!("validate: no difference");
                ExitCode::SUCCESS
            } else {
                println!("validate: {} difference(s)", report.differences);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            println!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What validate found.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub differences: usize,
}

/// The target side of a comparison.
enum TargetDb {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
}

impl TargetDb {
    async fn connect(plan: &SinkPlan) -> anyhow::Result<Self> {
        match &plan.spec {
            sluice_actors::sink::SinkSpec::Postgres { config, .. } => Ok(TargetDb::Postgres(
                catalog::connect(config, &plan.name).await.map_err(|e| anyhow::anyhow!("{}", e.chain()))?,
            )),
            sluice_actors::sink::SinkSpec::Mysql { url, .. } => {
                let opts = mysql_async::Opts::from_url(url)?;
                let mut conn = mysql_async::Conn::new(opts).await?;
                conn.query_drop("SET time_zone = '+00:00'").await?;
                Ok(TargetDb::Mysql(conn))
            }
            sluice_actors::sink::SinkSpec::Parquet(_) => anyhow::bail!("parquet sinks hold change logs, not tables"),
        }
    }

    async fn count(&mut self, target: &TargetTable) -> anyhow::Result<Option<i64>> {
        match self {
            TargetDb::Postgres(c) => {
                let exists = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&target.name.quoted()]).await?;
                if !exists.get::<_, bool>(0) {
                    return Ok(None);
                }
                Ok(Some(c.query_one(&format!("SELECT count(*) FROM {}", target.name.quoted()), &[]).await?.get(0)))
            }
            TargetDb::Mysql(c) => {
                let n: Option<i64> =
                    c.query_first(format!("SELECT count(*) FROM {}", my_table(target))).await.ok().flatten();
                Ok(n)
            }
        }
    }

    /// The target rows with these keys, as canonical cells, by canonical key.
    async fn fetch(
        &mut self,
        target: &TargetTable,
        rows: &MappedRows,
        types: &[String],
    ) -> anyhow::Result<HashMap<String, Vec<Option<String>>>> {
        let fields = target.schema.fields();
        let keys: Vec<&ArrayRef> = target.key.iter().map(|&k| rows.columns.column(k)).collect();
        let n = rows.columns.num_rows();
        let mut out = HashMap::with_capacity(n);
        let raw: Vec<Vec<Option<String>>> = match self {
            TargetDb::Postgres(c) => {
                let tuples: Vec<String> = (0..n)
                    .map(|r| {
                        let parts: Vec<String> = keys
                            .iter()
                            .zip(&target.key)
                            .map(|(a, &k)| {
                                format!("{}::{}", quote_literal(&cell_string(a, r).unwrap_or_default()), types[k])
                            })
                            .collect();
                        format!("({})", parts.join(", "))
                    })
                    .collect();
                // The text protocol prints each value with its type's output function (casts
                // to text would, for example, strip char(n) padding).
                let cols: Vec<String> = fields.iter().map(|f| quote_ident(f.name())).collect();
                let key_cols: Vec<String> = target.key.iter().map(|&k| quote_ident(fields[k].name())).collect();
                let sql = format!(
                    "SELECT {} FROM {} WHERE ({}) IN ({})",
                    cols.join(", "),
                    target.name.quoted(),
                    key_cols.join(", "),
                    tuples.join(", ")
                );
                c.simple_query(&sql)
                    .await?
                    .into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            Some((0..fields.len()).map(|i| row.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                    .collect()
            }
            TargetDb::Mysql(c) => {
                let mut tuples = Vec::with_capacity(n);
                for r in 0..n {
                    let mut t = String::from("(");
                    for (i, a) in keys.iter().enumerate() {
                        if i > 0 {
                            t.push(',');
                        }
                        // The rows are read back as text, so the keys go as literals.
                        let key = mysql_value(a, r).map_err(|e| anyhow::anyhow!("key of {}: {e}", target.name))?;
                        t.push_str(&key.as_sql(false));
                    }
                    t.push(')');
                    tuples.push(t);
                }
                let cols: Vec<String> = fields.iter().map(|f| my_quote(f.name())).collect();
                let key_cols: Vec<String> = target.key.iter().map(|&k| my_quote(fields[k].name())).collect();
                let sql = format!(
                    "SELECT {} FROM {} WHERE ({}) IN ({})",
                    cols.join(", "),
                    my_table(target),
                    key_cols.join(", "),
                    tuples.join(", ")
                );
                let result: Vec<mysql_async::Row> = c.query(sql).await?;
                result
                    .into_iter()
                    .map(|row| {
                        (0..fields.len())
                            .map(|i| match row.as_ref(i) {
                                Some(mysql_async::Value::NULL) | None => None,
                                Some(mysql_async::Value::Bytes(b))
                                    if fields[i].data_type() == &arrow::datatypes::DataType::Binary =>
                                {
                                    Some(b.iter().map(|x| format!("{x:02x}")).collect())
                                }
                                Some(mysql_async::Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                                Some(other) => Some(other.as_sql(true).trim_matches('\'').to_string()),
                            })
                            .collect()
                    })
                    .collect()
            }
        };
        for cells in raw {
            let canon: Vec<Option<String>> =
                cells.iter().zip(fields.iter()).map(|(c, f)| c.as_deref().map(|t| canonical(f, t))).collect();
            let key: Vec<String> = target.key.iter().map(|&k| canon[k].clone().unwrap_or_default()).collect();
            out.insert(key.join("\u{1}"), canon);
        }
        Ok(out)
    }

    /// The mapped columns the target table lacks (none when the table itself is missing).
    async fn missing_columns(&mut self, target: &TargetTable) -> anyhow::Result<Vec<String>> {
        let wanted: Vec<String> = target.schema.fields().iter().map(|f| f.name().clone()).collect();
        match self {
            TargetDb::Postgres(c) => {
                let rows = c
                    .query(
                        "SELECT w FROM unnest($2::text[]) w WHERE to_regclass($1) IS NOT NULL AND NOT EXISTS \
                         (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attname = w AND NOT a.attisdropped)",
                        &[&target.name.quoted(), &wanted],
                    )
                    .await?;
                Ok(rows.into_iter().map(|r| r.get(0)).collect())
            }
            TargetDb::Mysql(c) => {
                let schema = database_of(target);
                let present: Vec<String> = c
                    .exec(
                        "SELECT column_name FROM information_schema.columns \
                         WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ?",
                        (schema, target.name.name.as_str()),
                    )
                    .await?;
                if present.is_empty() {
                    return Ok(Vec::new());
                }
                Ok(wanted.into_iter().filter(|w| !present.iter().any(|p| p.eq_ignore_ascii_case(w))).collect())
            }
        }
    }

    async fn column_types(&mut self, target: &TargetTable) -> anyhow::Result<Vec<String>> {
        match self {
            TargetDb::Postgres(c) => {
                let mut types = Vec::new();
                for f in target.schema.fields() {
                    let row = c
                        .query_opt(
                            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attname = $2",
                            &[&target.name.quoted(), f.name()],
                        )
                        .await?;
                    types.push(row.map(|r| r.get::<_, String>(0)).unwrap_or_else(|| "text".into()));
                }
                Ok(types)
            }
            TargetDb::Mysql(_) => Ok(Vec::new()),
        }
    }
}

struct Tally {
    source_rows: u64,
    missing: u64,
    differing: u64,
    listed: Vec<String>,
}

pub async fn validate(config: &Config, base: &Path, only: Option<&str>) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let source = pipeline::source_options(config)?;
    let plans = pipeline::sink_plans(config, base)?;
    let client = catalog::connect(&source.pg, "source").await.map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
    if let Some(name) = only
        && !plans.iter().any(|p| p.name == name)
    {
        anyhow::bail!("--sink {name}: no such sink");
    }
    for plan in plans.iter().filter(|p| only.is_none_or(|n| n == p.name)) {
        if plan.kind == SinkKind::Parquet {
            report.lines.push(format!("sink {}: skipped (parquet sinks hold change logs, not tables)", plan.name));
            continue;
        }
        let mut db = TargetDb::connect(plan).await?;
        let mut mapper = Mapper::new(plan.mapping.clone());
        for table in &source.tables {
            let info = catalog::describe_table(&client, table).await.map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
            let targets = mapper.targets(&info.schema).await.map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
            for t in targets.iter() {
                let target = t.table().clone();
                let line_head = format!("sink {} {} -> {}:", plan.name, table, target.name);
                let missing = db.missing_columns(&target).await?;
                if !missing.is_empty() {
                    // A column added at the source reaches the target with the first row
                    // that carries it: until then its rows cannot be compared.
                    report.differences += 1;
                    report.lines.push(format!("{line_head} target table lacks column(s) {}", missing.join(", ")));
                    continue;
                }
                let tally = compare_table(&client, &info.schema, &mut mapper, &target, &mut db).await?;
                let count = db.count(&target).await?;
                match count {
                    // Sinks create tables with their first row: nothing to compare yet.
                    None if tally.source_rows == 0 => {
                        report.lines.push(format!("{line_head} no rows at the source, no target table yet: OK"));
                    }
                    None => {
                        report.differences += 1;
                        report
                            .lines
                            .push(format!("{line_head} target table is missing ({} source rows)", tally.source_rows));
                    }
                    Some(n) => {
                        let extra = (n as u64).saturating_sub(tally.source_rows - tally.missing);
                        let diffs = tally.missing + tally.differing + extra;
                        report.differences += diffs as usize;
                        let verdict = if diffs == 0 { "OK" } else { "DIFFERENT" };
                        report.lines.push(format!(
                            "{line_head} source {} rows, target {n} rows, {} missing, {} differing, {extra} extra: {verdict}",
                            tally.source_rows, tally.missing, tally.differing
                        ));
                        report.lines.extend(tally.listed.into_iter().map(|l| format!("  {l}")));
                    }
                }
            }
        }
    }
    Ok(report)
}

async fn compare_table(
    client: &tokio_postgres::Client,
    schema: &Arc<TableSchema>,
    mapper: &mut Mapper,
    target: &Arc<TargetTable>,
    db: &mut TargetDb,
) -> anyhow::Result<Tally> {
    let mut tally = Tally { source_rows: 0, missing: 0, differing: 0, listed: Vec::new() };
    if db.count(target).await?.is_none() {
        // Count the mapped source rows only.
        let cols = schema.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let stream =
            client.copy_out(format!("COPY (SELECT {cols} FROM {}) TO STDOUT", schema.id.quoted()).as_str()).await?;
        futures::pin_mut!(stream);
        let mut parser = CopyParser::new(schema);
        let mut rows = Vec::new();
        while let Some(bytes) = stream.next().await {
            parser.feed(&bytes?, &mut rows).map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
            tally.source_rows += mapped_count(schema, mapper, target, std::mem::take(&mut rows)).await?;
        }
        return Ok(tally);
    }
    let types = db.column_types(target).await?;
    let cols = schema.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let order = schema.columns.iter().filter(|c| c.key).map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let sql = format!("COPY (SELECT {cols} FROM {} ORDER BY {order}) TO STDOUT", schema.id.quoted());
    let stream = client.copy_out(sql.as_str()).await?;
    futures::pin_mut!(stream);
    let mut parser = CopyParser::new(schema);
    let mut rows = Vec::new();
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(bytes) = next {
            parser.feed(&bytes?, &mut rows).map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
        } else {
            parser.finish(&mut rows).map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
        }
        while rows.len() >= CHUNK_ROWS || (done && !rows.is_empty()) {
            let rest = rows.split_off(rows.len().min(CHUNK_ROWS));
            let chunk = std::mem::replace(&mut rows, rest);
            for mapped in map_chunk(schema, mapper, target, chunk).await? {
                compare_chunk(&mapped, target, db, &types, &mut tally).await?;
            }
        }
        if done {
            return Ok(tally);
        }
    }
}

async fn map_chunk(
    schema: &Arc<TableSchema>,
    mapper: &mut Mapper,
    target: &Arc<TargetTable>,
    rows: Vec<Vec<sluice_actors::value::Value>>,
) -> anyhow::Result<Vec<MappedRows>> {
    let changes = rows
        .into_iter()
        .enumerate()
        .map(|(i, row)| Change {
            op: Op::Read,
            before: None,
            after: Some(row),
            position: Position { lsn: 0, seq: i as u64 + 1 },
            lsn: 0,
            xid: 0,
            commit_micros: 0,
        })
        .collect();
    let batch = ChangeBatch { table: schema.id.clone(), schema: schema.clone(), changes, snapshot_last: false };
    let targets = mapper.targets(schema).await.map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
    Ok(Mapper::map(&batch, &targets)
        .into_iter()
        .filter_map(|item| match item {
            SinkItem::Rows(r) if r.target.name == target.name => Some(r),
            _ => None,
        })
        .collect())
}

async fn mapped_count(
    schema: &Arc<TableSchema>,
    mapper: &mut Mapper,
    target: &Arc<TargetTable>,
    rows: Vec<Vec<sluice_actors::value::Value>>,
) -> anyhow::Result<u64> {
    Ok(map_chunk(schema, mapper, target, rows).await?.iter().map(|m| m.ops.len() as u64).sum())
}

async fn compare_chunk(
    mapped: &MappedRows,
    target: &TargetTable,
    db: &mut TargetDb,
    types: &[String],
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let fields = target.schema.fields();
    let found = db.fetch(target, mapped, types).await?;
    for r in 0..mapped.columns.num_rows() {
        tally.source_rows += 1;
        let cells: Vec<Option<String>> = mapped
            .columns
            .columns()
            .iter()
            .zip(fields.iter())
            .map(|(a, f)| cell_string(a, r).map(|t| canonical(f, &t)))
            .collect();
        let key: Vec<String> = target.key.iter().map(|&k| cells[k].clone().unwrap_or_default()).collect();
        let key = key.join("\u{1}");
        match found.get(&key) {
            None => {
                tally.missing += 1;
                if tally.listed.len() < MAX_LISTED {
                    tally.listed.push(format!("missing in target: key {}", key.replace('\u{1}', ", ")));
                }
            }
            Some(theirs) if row_hash(theirs) != row_hash(&cells) => {
                tally.differing += 1;
                if tally.listed.len() < MAX_LISTED {
                    let columns: Vec<&str> = fields
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| theirs[*i] != cells[*i])
                        .map(|(_, f)| f.name().as_str())
                        .collect();
                    tally.listed.push(format!("differs: key {} in {}", key.replace('\u{1}', ", "), columns.join(", ")));
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}
