//! Mapping SQL: parsing, checking and compiling to DataFusion physical expressions.
//!
//! A mapping file holds one `INSERT INTO target (cols) SELECT ... FROM schema.table [WHERE ...]`
//! per target table. Each is checked with the file and line in every message: one source
//! table, no joins, aggregates, window functions, DISTINCT, ORDER BY, LIMIT or subqueries,
//! every source primary-key column passed through (renamed or cast) so the target key is
//! the image of the source key, and known columns and functions.
//!
//! Compiling follows the per-batch recipe measured in TECH-NOTES.md: the source is
//! registered as an empty table with the schema version at hand, the SELECT is planned
//! once, and the projection and filter become `PhysicalExpr`s evaluated on each Arrow batch
//! (microseconds), never re-planned per batch. A new source schema version is compiled anew.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::DFSchema;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{self, SetExpr, Statement, TableFactor, TableObject};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::schema::{PG_TYPE_METADATA, TableId, TableSchema};

/// A mapping rejected, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

impl std::error::Error for MappingError {}

/// One parsed mapping statement.
#[derive(Debug, Clone)]
pub struct MappingStatement {
    pub file: String,
    pub line: u64,
    /// Target table name as written (`users_email` or `reporting.users_email`).
    pub target: String,
    /// Target column names; empty when the INSERT lists none (the SELECT's names are used).
    pub target_columns: Vec<String>,
    pub source: TableId,
    /// The SELECT, as SQL DataFusion plans.
    pub select_sql: String,
}

impl MappingStatement {
    fn error(&self, reason: impl Into<String>) -> MappingError {
        MappingError { file: self.file.clone(), line: self.line, reason: reason.into() }
    }
}

/// Reads and parses a mapping file.
pub fn load_file(path: &Path) -> Result<Vec<MappingStatement>, MappingError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| MappingError {
        file: file.clone(),
        line: 0,
        reason: format!("cannot read the mapping file: {e}"),
    })?;
    parse(&file, &text)
}

/// Parses mapping SQL; `file` only names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Vec<MappingStatement>, MappingError> {
    let err = |line: u64, reason: String| MappingError { file: file.to_string(), line, reason };
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, text).map_err(|e| {
        let msg = e.to_string();
        let line = msg
            .split("Line: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        err(line, format!("SQL syntax error: {msg}"))
    })?;
    if statements.is_empty() {
        return Err(err(1, "the mapping file holds no statement".into()));
    }
    let mut out: Vec<MappingStatement> = Vec::with_capacity(statements.len());
    for statement in statements {
        let Statement::Insert(insert) = statement else {
            let line = ast::Spanned::span(&statement).start.line;
            return Err(err(
                line,
                "only INSERT INTO target (columns) SELECT ... FROM source statements are allowed".into(),
            ));
        };
        let line = insert.insert_token.0.span.start.line;
        let target = match &insert.table {
            TableObject::TableName(name) => name.to_string().replace('"', ""),
            _ => return Err(err(line, "the target must be a table name".into())),
        };
        if insert.on.is_some() || insert.returning.is_some() {
            return Err(err(
                line,
                "ON CONFLICT and RETURNING are not allowed: sluice upserts by the target key".into(),
            ));
        }
        let target_columns: Vec<String> = insert.columns.iter().map(|c| c.to_string().replace('"', "")).collect();
        let Some(query) = &insert.source else {
            return Err(err(line, "INSERT needs a SELECT ... FROM source".into()));
        };
        if query.with.is_some() {
            return Err(err(line, "WITH (common table expressions) is not allowed in a mapping".into()));
        }
        if query.order_by.is_some() || query.limit_clause.is_some() || query.fetch.is_some() {
            return Err(err(
                line,
                "ORDER BY, LIMIT and FETCH are not allowed in a mapping (it applies to every change)".into(),
            ));
        }
        let SetExpr::Select(select) = query.body.as_ref() else {
            return Err(err(line, "UNION, INTERSECT, EXCEPT and VALUES are not allowed in a mapping".into()));
        };
        if select.from.len() != 1 || !select.from[0].joins.is_empty() {
            return Err(err(line, "joins are not allowed in a mapping: select from exactly one source table".into()));
        }
        let source = match &select.from[0].relation {
            TableFactor::Table { name, .. } => {
                let n = name.to_string().replace('"', "");
                TableId::parse(&n).ok_or_else(|| err(line, format!("bad source table name {n}")))?
            }
            _ => return Err(err(line, "the source must be a table (no subqueries or functions in FROM)".into())),
        };
        if select.distinct.is_some() {
            return Err(err(line, "DISTINCT is not allowed in a mapping".into()));
        }
        if !matches!(select.group_by, ast::GroupByExpr::Expressions(ref e, _) if e.is_empty())
            || select.having.is_some()
        {
            return Err(err(line, "aggregates are not allowed in a mapping (GROUP BY, HAVING)".into()));
        }
        if let Some(previous) = out.iter().find(|s| s.target == target) {
            return Err(err(line, format!("target table {target} is already mapped at line {}", previous.line)));
        }
        out.push(MappingStatement {
            file: file.to_string(),
            line,
            target,
            target_columns,
            source,
            select_sql: query.to_string(),
        });
    }
    Ok(out)
}

/// A target table as a mapping (or the identity) produces it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetTable {
    pub name: TableId,
    /// The source table it is mapped from.
    pub source: TableId,
    /// Column names and Arrow types; the PostgreSQL type in field metadata when the column
    /// is a source column passed through.
    pub schema: SchemaRef,
    /// Indexes of the key columns in `schema`.
    pub key: Vec<usize>,
}

impl TargetTable {
    /// The identity mapping of a source table.
    pub fn identity(source: &TableSchema) -> Self {
        Self {
            name: source.id.clone(),
            source: source.id.clone(),
            schema: source.arrow_schema(),
            key: source.key_indexes(),
        }
    }
}

/// A mapping compiled for one source schema version.
pub struct CompiledMapping {
    pub target: Arc<TargetTable>,
    pub projections: Vec<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// Per target column, the source columns its expression reads.
    pub reads: Vec<Vec<usize>>,
    /// Source columns the filter reads.
    pub filter_reads: Vec<usize>,
}

impl fmt::Debug for CompiledMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledMapping").field("target", &self.target).finish_non_exhaustive()
    }
}

/// Default schema of an unqualified target name.
pub const DEFAULT_TARGET_SCHEMA: &str = "public";

/// Plans `statement` against `schema` (the source table's current version).
pub async fn compile(statement: &MappingStatement, schema: &TableSchema) -> Result<CompiledMapping, MappingError> {
    if statement.source != schema.id {
        return Err(statement.error(format!("internal: mapping of {} compiled for {}", statement.source, schema.id)));
    }
    let ctx = SessionContext::new();
    let arrow_schema = schema.arrow_schema();
    let table = MemTable::try_new(arrow_schema.clone(), vec![vec![]]).map_err(|e| statement.error(e.to_string()))?;
    let catalog = ctx.catalog("datafusion").ok_or_else(|| statement.error("internal: no default catalog"))?;
    if catalog.schema(&schema.id.schema).is_none() {
        catalog
            .register_schema(&schema.id.schema, Arc::new(MemorySchemaProvider::new()))
            .map_err(|e| statement.error(e.to_string()))?;
    }
    ctx.register_table(
        datafusion::common::TableReference::partial(schema.id.schema.as_str(), schema.id.name.as_str()),
        Arc::new(table),
    )
    .map_err(|e| statement.error(e.to_string()))?;
    let plan = ctx
        .sql(&statement.select_sql)
        .await
        .map_err(|e| {
            let msg = clean_datafusion_message(&e.to_string());
            // Only the source table is registered: another table can only come from a subquery.
            match msg.strip_prefix("table '").and_then(|m| m.split_once("' not found")) {
                Some((other, _)) if !other.ends_with(&format!("{}.{}", schema.id.schema, schema.id.name)) => statement
                    .error(format!(
                        "subqueries are not allowed in a mapping: it reads only its source table {}, not {}",
                        schema.id,
                        other.trim_start_matches("datafusion.")
                    )),
                _ => statement.error(msg),
            }
        })?
        .into_unoptimized_plan();

    let LogicalPlan::Projection(projection) = &plan else {
        return Err(statement.error(shape_error(&plan)));
    };
    let (filter, input) = match projection.input.as_ref() {
        LogicalPlan::Filter(f) => (Some(f.predicate.clone()), f.input.as_ref()),
        other => (None, other),
    };
    let scan_schema = match input {
        LogicalPlan::TableScan(scan) => scan.projected_schema.clone(),
        LogicalPlan::SubqueryAlias(alias) if matches!(alias.input.as_ref(), LogicalPlan::TableScan(_)) => {
            alias.schema.clone()
        }
        other => return Err(statement.error(shape_error(other))),
    };
    for e in projection.expr.iter().chain(filter.iter()) {
        reject_subqueries(statement, e)?;
    }
    let exprs = &projection.expr;
    let names: Vec<String> = if statement.target_columns.is_empty() {
        exprs
            .iter()
            .map(|e| e.schema_name().to_string())
            .map(|n| n.rsplit('.').next().unwrap_or(&n).to_string())
            .collect()
    } else {
        if statement.target_columns.len() != exprs.len() {
            return Err(statement.error(format!(
                "INSERT lists {} target columns but the SELECT produces {}",
                statement.target_columns.len(),
                exprs.len()
            )));
        }
        statement.target_columns.clone()
    };
    let mut seen = BTreeSet::new();
    for n in &names {
        if !seen.insert(n.as_str()) {
            return Err(statement.error(format!("target column {n} appears twice")));
        }
    }

    let source_index = |col: &datafusion::common::Column| schema.column_index(&col.name);
    let column_of = |e: &Expr| -> Option<usize> {
        let mut e = e;
        loop {
            match e {
                Expr::Alias(a) => e = a.expr.as_ref(),
                Expr::Cast(c) => e = c.expr.as_ref(),
                Expr::TryCast(c) => e = c.expr.as_ref(),
                Expr::Column(c) => return source_index(c),
                _ => return None,
            }
        }
    };
    // The target key: the images of the source key columns.
    let mut key = Vec::new();
    for k in schema.key_indexes() {
        match exprs.iter().position(|e| column_of(e) == Some(k)) {
            Some(i) => key.push(i),
            None => {
                return Err(statement.error(format!(
                    "the mapping drops primary-key column {} of {}: the target key must be the image of the source key",
                    schema.columns[k].name, schema.id
                )));
            }
        }
    }
    key.sort_unstable();

    let df_schema: &DFSchema = scan_schema.as_ref();
    let mut projections = Vec::with_capacity(exprs.len());
    let mut fields = Vec::with_capacity(exprs.len());
    let mut reads = Vec::with_capacity(exprs.len());
    for (e, name) in exprs.iter().zip(&names) {
        let physical = ctx
            .create_physical_expr(e.clone(), df_schema)
            .map_err(|err| statement.error(clean_datafusion_message(&err.to_string())))?;
        let data_type = physical.data_type(arrow_schema.as_ref()).map_err(|err| statement.error(err.to_string()))?;
        let data_type = sink_type(&data_type).ok_or_else(|| {
            statement.error(format!("target column {name}: type {data_type} cannot be written to a sink"))
        })?;
        let mut field = Field::new(name, data_type, true);
        if let Some(i) = column_of(e) {
            let source_field = arrow_schema.field(i);
            if source_field.data_type() == field.data_type()
                && let Some(pg) = source_field.metadata().get(PG_TYPE_METADATA)
            {
                field = field.with_metadata(HashMap::from([(PG_TYPE_METADATA.to_string(), pg.clone())]));
            }
        }
        fields.push(field);
        reads.push(e.column_refs().iter().filter_map(|c| source_index(c)).collect());
        projections.push(physical);
    }
    let (filter, filter_reads) = match filter {
        Some(predicate) => {
            let reads = predicate.column_refs().iter().filter_map(|c| source_index(c)).collect();
            let physical = ctx
                .create_physical_expr(predicate, df_schema)
                .map_err(|err| statement.error(clean_datafusion_message(&err.to_string())))?;
            (Some(physical), reads)
        }
        None => (None, Vec::new()),
    };
    let target_name = match TableId::parse(&statement.target) {
        Some(t) if statement.target.contains('.') => t,
        _ => TableId::new(DEFAULT_TARGET_SCHEMA, statement.target.clone()),
    };
    Ok(CompiledMapping {
        target: Arc::new(TargetTable {
            name: target_name,
            source: schema.id.clone(),
            schema: Arc::new(Schema::new(fields)),
            key,
        }),
        projections,
        filter,
        reads,
        filter_reads,
    })
}

/// The Arrow type a sink receives for an expression's type: views and large variants
/// become their plain forms; types no sink can hold are `None`.
pub fn sink_type(t: &DataType) -> Option<DataType> {
    Some(match t {
        DataType::Utf8View | DataType::LargeUtf8 | DataType::Utf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary | DataType::Binary => DataType::Binary,
        DataType::Int8 => DataType::Int16,
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 => DataType::Int64,
        DataType::UInt64 => DataType::Decimal128(20, 0),
        DataType::Float16 => DataType::Float32,
        DataType::Null => DataType::Utf8,
        DataType::Dictionary(_, v) => return sink_type(v),
        DataType::Timestamp(unit, tz) => {
            let _ = unit;
            DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, tz.clone())
        }
        DataType::Time32(_) | DataType::Time64(_) => DataType::Time64(arrow::datatypes::TimeUnit::Microsecond),
        DataType::Date64 => DataType::Date32,
        DataType::Interval(_) => DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) | DataType::LargeListView(f) => {
            let inner = sink_type(f.data_type())?;
            if matches!(inner, DataType::List(_)) {
                return None;
            }
            DataType::List(Arc::new(Field::new("item", inner, true)))
        }
        DataType::Boolean
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal128(_, _)
        | DataType::Date32 => t.clone(),
        DataType::Decimal256(_, s) => DataType::Decimal128(38, (*s).min(38)),
        _ => return None,
    })
}

fn shape_error(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Aggregate(_) => "aggregates are not allowed in a mapping (it applies to each row change)".into(),
        LogicalPlan::Window(_) => "window functions are not allowed in a mapping".into(),
        LogicalPlan::Join(_) => "joins are not allowed in a mapping: select from exactly one source table".into(),
        LogicalPlan::Distinct(_) => "DISTINCT is not allowed in a mapping".into(),
        LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => "ORDER BY and LIMIT are not allowed in a mapping".into(),
        LogicalPlan::Unnest(_) => {
            "UNNEST is not allowed in a mapping (one source row maps to at most one target row)".into()
        }
        LogicalPlan::Subquery(_) => "subqueries are not allowed in a mapping".into(),
        other => {
            format!("a mapping must be a projection with an optional WHERE over one table, not {}", other.display())
        }
    }
}

fn reject_subqueries(statement: &MappingStatement, e: &Expr) -> Result<(), MappingError> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut bad = None;
    let _ = e.apply(|node| {
        let what = match node {
            Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_) => {
                Some("subqueries are not allowed in a mapping")
            }
            Expr::AggregateFunction(_) => {
                Some("aggregates are not allowed in a mapping (it applies to each row change)")
            }
            Expr::WindowFunction(_) => Some("window functions are not allowed in a mapping"),
            _ => None,
        };
        if let Some(w) = what {
            bad = Some(w);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match bad {
        Some(reason) => Err(statement.error(reason)),
        None => Ok(()),
    }
}

/// DataFusion messages carry a "Error during planning: " style prefix and, for unknown
/// columns, a long list of valid fields; keep what a user needs.
fn clean_datafusion_message(msg: &str) -> String {
    let msg = msg.trim();
    let msg = msg.strip_prefix("Error during planning: ").unwrap_or(msg);
    let msg = msg.strip_prefix("Schema error: ").unwrap_or(msg);
    msg.split(". Valid fields are").next().unwrap_or(msg).trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Column, PgType, ReplicaIdentity};

    pub(crate) fn users() -> TableSchema {
        let col = |name: &str, pg_type: PgType, key: bool| Column { name: name.into(), pg_type, nullable: !key, key };
        TableSchema {
            id: TableId::new("public", "users"),
            version: 1,
            columns: vec![
                col("id", PgType::Int8, true),
                col("name", PgType::Text("text".into()), false),
                col("email", PgType::Text("text".into()), false),
                col("balance", PgType::Numeric(Some((12, 2))), false),
                col("attributes", PgType::Jsonb, false),
            ],
            replica_identity: ReplicaIdentity::Default,
        }
    }

    async fn compile_one(sql: &str) -> Result<CompiledMapping, MappingError> {
        let statements = parse("m.sql", sql)?;
        compile(&statements[0], &users()).await
    }

    #[tokio::test]
    async fn a_projection_with_filter_compiles() {
        let m = compile_one(
            "-- a comment\nINSERT INTO users_email (user_id, full_name, email)\nSELECT id, name, lower(email) FROM public.users WHERE email IS NOT NULL;",
        )
        .await
        .unwrap();
        assert_eq!(m.target.name, TableId::new("public", "users_email"));
        assert_eq!(m.target.key, vec![0]);
        let names: Vec<_> = m.target.schema.fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, vec!["user_id", "full_name", "email"]);
        assert_eq!(m.target.schema.field(0).data_type(), &DataType::Int64);
        assert_eq!(m.reads, vec![vec![0], vec![1], vec![2]]);
        assert_eq!(m.filter_reads, vec![2]);
        assert!(m.filter.is_some());
    }

    #[tokio::test]
    async fn rejections_name_line_and_reason() {
        let cases = [
            ("INSERT INTO t (id, n)\nSELECT u.id, count(*) FROM public.users u GROUP BY u.id", 1, "aggregates"),
            (
                "\n\nINSERT INTO t SELECT a.id FROM public.users a JOIN public.users b ON a.id = b.id",
                3,
                "joins are not allowed",
            ),
            ("INSERT INTO t (n) SELECT name FROM public.users", 1, "drops primary-key column id"),
            ("INSERT INTO t (id, x) SELECT id, nosuch FROM public.users", 1, "nosuch"),
            ("INSERT INTO t (id) SELECT id FROM public.missing", 1, "missing"),
            ("INSERT INTO t (id, r) SELECT id, row_number() OVER () FROM public.users", 1, "window functions"),
            ("INSERT INTO t (id) SELECT id FROM public.users ORDER BY id", 1, "ORDER BY"),
            (
                "INSERT INTO t (id) SELECT id FROM public.users WHERE id IN (SELECT id FROM public.users)",
                1,
                "subqueries",
            ),
            ("INSERT INTO t (id, a) SELECT id FROM public.users", 1, "lists 2 target columns"),
            ("DELETE FROM public.users", 1, "only INSERT"),
            ("INSERT INTO t (id) SELECT DISTINCT id FROM public.users", 1, "DISTINCT"),
        ];
        for (sql, line, reason) in cases {
            let err = compile_one(sql).await.expect_err(sql);
            assert_eq!(err.line, line, "{sql}: {err}");
            assert!(err.reason.contains(reason), "{sql}: {err}");
            assert!(err.to_string().starts_with(&format!("m.sql:{line}: ")), "{err}");
        }
        assert!(parse("m.sql", "INSERT INTO t (id) SELEC id FROM public.users").unwrap_err().reason.contains("syntax"));
        let two = "INSERT INTO t (id) SELECT id FROM public.users;\nINSERT INTO t (id) SELECT id FROM public.users;";
        assert!(parse("m.sql", two).unwrap_err().reason.contains("already mapped at line 1"));
    }

    #[tokio::test]
    async fn casts_and_renames_keep_the_key_and_passthrough_keeps_pg_types() {
        let m = compile_one("INSERT INTO s.t (k, attrs) SELECT CAST(id AS TEXT), attributes FROM users").await.unwrap();
        assert_eq!(m.target.name, TableId::new("s", "t"));
        assert_eq!(m.target.key, vec![0]);
        assert_eq!(m.target.schema.field(0).data_type(), &DataType::Utf8);
        assert_eq!(m.target.schema.field(1).metadata().get(PG_TYPE_METADATA).map(String::as_str), Some("jsonb"));
    }
}
