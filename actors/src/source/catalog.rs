//! What the source asks PostgreSQL's catalog, on an ordinary connection: server settings,
//! privileges, table schemas, the publication and the replication slot.
//!
//! Each check that a user must fix is a [`Error::Fatal`] whose message names the object and
//! says what to do.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use crate::error::{Context, Error, Result};
use crate::pgtext;
use crate::schema::{Column, PgType, ReplicaIdentity, TableId, TableSchema, quote_ident};

/// Connects an ordinary session with the settings every value decoder relies on.
pub async fn connect(config: &tokio_postgres::Config, what: &str) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await.context(format!("connect to {what}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "postgres connection closed");
        }
    });
    client.batch_execute(&pgtext::set_statements()).await.context(format!("configure session on {what}"))?;
    Ok(client)
}

/// Server-wide requirements: `wal_level = logical` and a role allowed to replicate.
pub async fn check_server(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), r.rolreplication OR r.rolsuper, current_user::text \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .context("read server settings")?;
    let wal_level: String = row.get(0);
    let can_replicate: bool = row.get(1);
    let user: String = row.get(2);
    if wal_level != "logical" {
        return Err(Error::Fatal(format!(
            "source: wal_level is '{wal_level}', logical replication needs 'logical' \
             (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
        )));
    }
    if !can_replicate {
        return Err(Error::Fatal(format!(
            "source: role '{user}' lacks the REPLICATION privilege (ALTER ROLE {} REPLICATION)",
            quote_ident(&user)
        )));
    }
    Ok(())
}

/// A source table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: Arc<TableSchema>,
    /// `pg_class.reltuples`, for snapshot progress and chunking; -1 when never analyzed.
    pub estimated_rows: i64,
}

/// Describes a table, refusing tables whose updates and deletes cannot be replicated.
pub async fn describe_table(client: &Client, table: &TableId) -> Result<TableInfo> {
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.reltuples::bigint, c.relkind::text, \
                    has_table_privilege(c.oid, 'SELECT') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .context(format!("describe source table {table}"))?
        .ok_or_else(|| Error::Fatal(format!("source.tables: table {table} does not exist in the source database")))?;
    let oid: u32 = rel.get(0);
    let identity_code: String = rel.get(1);
    let estimated_rows: i64 = rel.get(2);
    let relkind: String = rel.get(3);
    let can_select: bool = rel.get(4);
    if relkind != "r" && relkind != "p" {
        return Err(Error::Fatal(format!("source.tables: {table} is not a table (relkind '{relkind}')")));
    }
    if !can_select {
        return Err(Error::Fatal(format!(
            "source.tables: the source role may not SELECT from {table} (GRANT SELECT ON {} TO ...)",
            table.quoted()
        )));
    }
    let replica_identity = ReplicaIdentity::from_code(identity_code.as_bytes().first().copied().unwrap_or(b'd'))
        .unwrap_or(ReplicaIdentity::Default);
    let rows = client
        .query(
            "SELECT a.attname::text, a.attnotnull, \
                    format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, \
                                CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END), \
                    COALESCE(a.attnum = ANY(i.indkey), false) \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .context(format!("read columns of {table}"))?;
    let mut columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            nullable: !r.get::<_, bool>(1),
            pg_type: PgType::from_type_name(r.get(2)),
            key: r.get(3),
        })
        .collect();
    let has_pk = columns.iter().any(|c| c.key);
    if !has_pk {
        if replica_identity != ReplicaIdentity::Full {
            return Err(Error::Fatal(format!(
                "source.tables: table {table} has no primary key and its REPLICA IDENTITY is not FULL, so its \
                 updates and deletes cannot be replicated (add a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL)",
                table.quoted()
            )));
        }
        // Without a primary key, the whole row identifies it.
        for c in &mut columns {
            c.key = true;
        }
    }
    Ok(TableInfo {
        schema: Arc::new(TableSchema { id: table.clone(), version: 1, columns, replica_identity }),
        estimated_rows,
    })
}

/// The primary-key column names of a table (empty without one), for Relation messages that
/// flag the whole row as key (REPLICA IDENTITY FULL).
pub async fn primary_key(client: &Client, table: &TableId) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE i.indisprimary AND n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .context(format!("read primary key of {table}"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Resolves a type OID that is not built in (enum, domain, array of those, extension type)
/// to the type sluice decodes it as.
pub async fn resolve_type(
    client: &Client,
    type_oid: u32,
    typmod: i32,
    cache: &mut HashMap<(u32, i32), PgType>,
) -> Result<PgType> {
    if let Some(t) = PgType::from_oid(type_oid, typmod) {
        return Ok(t);
    }
    if let Some(t) = cache.get(&(type_oid, typmod)) {
        return Ok(t.clone());
    }
    let row = client
        .query_opt(
            "SELECT format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END, \
                                CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE $2 END) \
             FROM pg_type t WHERE t.oid = $1",
            &[&type_oid, &typmod],
        )
        .await
        .context(format!("resolve type oid {type_oid}"))?;
    let t = match row {
        Some(r) => PgType::from_type_name(r.get(0)),
        None => PgType::Text(format!("oid {type_oid}")),
    };
    cache.insert((type_oid, typmod), t.clone());
    Ok(t)
}

/// Creates the publication for `tables` if missing, or adds the tables it lacks.
pub async fn ensure_publication(client: &Client, name: &str, tables: &[TableId]) -> Result<()> {
    let existing = client
        .query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .context("read publications")?;
    let list = |ts: &[&TableId]| ts.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ");
    let all: Vec<&TableId> = tables.iter().collect();
    match existing {
        None => {
            let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(name), list(&all));
            client.batch_execute(&sql).await.map_err(|e| publication_error(name, e))?;
            tracing::info!(publication = name, "created publication");
        }
        Some(row) if row.get::<_, bool>(0) => {}
        Some(_) => {
            let published = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&name],
                )
                .await
                .context("read publication tables")?;
            let published: Vec<TableId> =
                published.iter().map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect();
            let missing: Vec<&TableId> = tables.iter().filter(|t| !published.contains(t)).collect();
            if !missing.is_empty() {
                let sql = format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(name), list(&missing));
                client.batch_execute(&sql).await.map_err(|e| publication_error(name, e))?;
                tracing::info!(publication = name, added = missing.len(), "added tables to publication");
            }
        }
    }
    Ok(())
}

fn publication_error(name: &str, e: tokio_postgres::Error) -> Error {
    let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    match e.code().map(|c| c.code().get(..2).unwrap_or("").to_string()).as_deref() {
        Some("42") => Error::Fatal(format!(
            "source.publication: cannot create or change publication '{name}': {detail} \
             (the source role must own the tables, or create the publication beforehand)"
        )),
        _ => Error::Postgres { context: format!("create publication {name}"), source: e },
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub confirmed_flush_lsn: Option<u64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, \
                    (confirmed_flush_lsn - '0/0'::pg_lsn)::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("read replication slots")?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        confirmed_flush_lsn: r.get::<_, Option<String>>(3).and_then(|s| s.parse::<u64>().ok()),
    }))
}

/// Checks that an existing slot can be streamed by sluice.
pub fn check_slot(slot: &str, info: &SlotInfo, database: &str) -> Result<()> {
    match info.plugin.as_deref() {
        Some("pgoutput") => {}
        Some(other) => {
            return Err(Error::Fatal(format!(
                "source.slot: replication slot '{slot}' exists for the output plugin '{other}', sluice needs 'pgoutput' \
                 (choose another slot name, or drop it with SELECT pg_drop_replication_slot('{slot}'))"
            )));
        }
        None => {
            return Err(Error::Fatal(format!(
                "source.slot: '{slot}' is a physical replication slot; sluice needs a logical one (choose another slot name)"
            )));
        }
    }
    if info.database.as_deref() != Some(database) {
        return Err(Error::Fatal(format!(
            "source.slot: replication slot '{slot}' belongs to database '{}', not '{database}' (choose another slot name)",
            info.database.as_deref().unwrap_or("?")
        )));
    }
    Ok(())
}

pub async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .context(format!("drop replication slot {slot}"))?;
    tracing::info!(slot, "dropped replication slot");
    Ok(())
}

/// The server's current WAL insert position, for lag.
pub async fn current_wal_lsn(client: &Client) -> Result<u64> {
    let row = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text", &[])
        .await
        .context("read WAL position")?;
    Ok(row.get::<_, String>(0).parse::<u64>().unwrap_or(0))
}
