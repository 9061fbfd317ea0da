//! The PostgreSQL source: a consistent snapshot, then logical replication (`pgoutput`).
//!
//! Start-up decides from the slot and from what downstream made durable:
//!
//! | snapshot | slot      | downstream position           | action                                         |
//! |----------|-----------|-------------------------------|------------------------------------------------|
//! | always   | any       | any                           | drop slot, create with exported snapshot, copy |
//! | never    | missing   | any                           | create slot, stream                            |
//! | never    | present   | any                           | stream from the slot                           |
//! | initial  | missing   | none or inside a snapshot     | create with exported snapshot, copy, stream    |
//! | initial  | missing   | streamed before               | fatal: the slot was dropped, changes are gone  |
//! | initial  | present   | none or inside a snapshot     | drop, create, copy again (interrupted copy)    |
//! | initial  | present   | snapshot done or streaming    | stream from the slot's confirmed position      |
//!
//! While copying, the replication connection that exported the snapshot stays idle, so the
//! snapshot stays importable for a rewind; streaming starts at the slot's consistent point.

pub mod catalog;
pub mod pgoutput;
pub mod snapshot;
pub mod wal;

use std::collections::HashMap;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};
use tokio::sync::watch;

use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::mailbox::Sender;
use crate::message::{Event, Position};
use crate::pgtext;
use crate::schema::{TableId, quote_ident};

/// When to copy the tables (SPEC.md `source.snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    Initial,
    Never,
    Always,
}

/// Everything the source needs.
#[derive(Debug, Clone)]
pub struct PgSourceOptions {
    pub pg: tokio_postgres::Config,
    pub tables: Vec<TableId>,
    pub slot: String,
    pub publication: String,
    pub snapshot: SnapshotMode,
    pub snapshot_options: snapshot::SnapshotOptions,
    pub wal_options: wal::WalOptions,
}

/// How the source talks with the rest of the pipeline.
pub struct SourceLinks {
    pub out: Sender<Event>,
    /// The LSN every downstream made durable (min over sinks), to confirm to PostgreSQL.
    pub confirm: watch::Receiver<u64>,
    /// Bumped when a downstream needs the stream again from the confirmed position.
    pub rewind: watch::Receiver<u64>,
    pub stop: watch::Receiver<bool>,
    /// What downstream holds durably (minimum over sinks); `None` when it holds nothing.
    pub downstream: Option<Position>,
}

/// The replication connection's settings derived from the source connection's.
pub fn replication_config(pg: &tokio_postgres::Config, slot: &str, publication: &str) -> Result<ReplicationConfig> {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "127.0.0.1".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_string();
    Ok(ReplicationConfig::new(host, user, password, database, slot, publication)
        .with_port(port)
        .with_options(pgtext::startup_options())
        .with_application_name(format!("sluice-{slot}"))
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(1024))
}

/// The source actor (snapshot, then WAL reader). Returns when stopped and drained.
pub async fn run(options: PgSourceOptions, mut links: SourceLinks, faults: Faults) -> Result<()> {
    let database = options.pg.get_dbname().unwrap_or("postgres").to_string();
    let catalog_client = catalog::connect(&options.pg, "source").await?;
    catalog::check_server(&catalog_client).await?;
    let mut infos = Vec::with_capacity(options.tables.len());
    for t in &options.tables {
        infos.push(catalog::describe_table(&catalog_client, t).await?);
    }
    catalog::ensure_publication(&catalog_client, &options.publication, &options.tables).await?;
    let slot = catalog::slot_info(&catalog_client, &options.slot).await?;
    if let Some(info) = &slot {
        catalog::check_slot(&options.slot, info, &database)?;
    }
    let snapshot_done = links.downstream.is_some_and(|p| p >= Position::SNAPSHOT_DONE);
    let streamed = links.downstream.is_some_and(|p| p > Position::SNAPSHOT_DONE);
    let copy = match (options.snapshot, &slot) {
        (SnapshotMode::Always, _) => true,
        (SnapshotMode::Never, _) => false,
        (SnapshotMode::Initial, None) if streamed => {
            return Err(Error::Fatal(format!(
                "source.slot: replication slot '{}' is missing, but the sinks already applied changes up to LSN {}; \
                 the changes since then are no longer retained. Re-copy the tables with snapshot = \"always\" \
                 (once), or recreate the slot if you know nothing changed",
                options.slot,
                pgwire_replication::Lsn::from_u64(links.downstream.map_or(0, |p| p.lsn))
            )));
        }
        (SnapshotMode::Initial, None) => true,
        (SnapshotMode::Initial, Some(_)) => !snapshot_done,
    };
    if copy && slot.is_some() {
        if options.snapshot == SnapshotMode::Initial {
            tracing::warn!(slot = %options.slot, "the last snapshot did not complete: copying again with a new slot");
        }
        wait_inactive_and_drop(&catalog_client, &options.slot).await?;
    }

    let schemas: HashMap<_, _> = infos.iter().map(|i| (i.schema.id.clone(), i.schema.clone())).collect();
    let mut state = wal::WalState::new(schemas);
    let repl_config = replication_config(&options.pg, &options.slot, &options.publication)?;
    let mut repl = if copy || slot.is_none() {
        let mut gated =
            ReplicationClient::connect_gated(repl_config.clone()).await.context("connect for replication")?;
        let export = if copy { "(SNAPSHOT 'export')" } else { "(SNAPSHOT 'nothing')" };
        let rows = gated
            .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {export}", quote_ident(&options.slot)))
            .await
            .context(format!("create replication slot {}", options.slot))?;
        let row = rows.first().ok_or_else(|| Error::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let text = |i: usize| row.get(i).and_then(|v| v.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned());
        let consistent = text(1).and_then(|s| pgwire_replication::Lsn::parse(&s).ok()).map_or(0, |l| l.as_u64());
        tracing::info!(slot = %options.slot, consistent_lsn = %pgwire_replication::Lsn::from_u64(consistent), "created replication slot");
        if copy {
            let name = text(2).ok_or_else(|| Error::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into()))?;
            loop {
                tokio::select! {
                    done = snapshot::run(&options.pg, &name, consistent, &infos, &options.snapshot_options, &links.out, &faults) => {
                        done?;
                        break;
                    }
                    Ok(()) = links.rewind.changed() => {
                        tracing::info!("rewind requested during the snapshot: copying again from the same snapshot");
                    }
                    Ok(()) = links.stop.changed() => {
                        if *links.stop.borrow() {
                            return Ok(());
                        }
                    }
                }
            }
        }
        gated.start().await.context("start replication")?;
        gated
    } else {
        wait_inactive(&catalog_client, &options.slot).await?;
        ReplicationClient::connect(repl_config.clone()).await.context("connect for replication")?
    };
    repl.wait_started().await.context(format!("start replication from slot {}", options.slot))?;
    tracing::info!(slot = %options.slot, "streaming");
    loop {
        let stopped = wal::stream(
            &mut repl,
            &catalog_client,
            &mut state,
            &options.wal_options,
            &links.out,
            &mut links.confirm,
            &mut links.rewind,
            &mut links.stop,
            &faults,
        )
        .await?;
        if stopped {
            return Ok(());
        }
        repl.abort();
        wait_inactive(&catalog_client, &options.slot).await?;
        repl = ReplicationClient::connect(repl_config.clone()).await.context("reconnect for replication")?;
        repl.wait_started().await.context("restart replication")?;
        links.out.send(Event::Rewound).await?;
    }
}

/// Waits a little for a previous session of ours to let go of a slot: a walsender exits a
/// moment after its connection closed (a rewind's reconnect, a restarted source), and
/// until then the slot is active and START_REPLICATION fails. Returns whether it exists.
async fn wait_inactive(client: &tokio_postgres::Client, slot: &str) -> Result<bool> {
    for _ in 0..50 {
        match catalog::slot_info(client, slot).await? {
            None => return Ok(false),
            Some(info) if !info.active => return Ok(true),
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Err(Error::Fatal(format!("source.slot: replication slot '{slot}' is in use by another process")))
}

/// Drops a slot once no session uses it.
async fn wait_inactive_and_drop(client: &tokio_postgres::Client, slot: &str) -> Result<()> {
    if wait_inactive(client, slot).await? { catalog::drop_slot(client, slot).await } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_connects_where_the_source_url_says() {
        let tcp: tokio_postgres::Config = "postgres://u:pw@db.example:6543/app".parse().expect("url");
        let config = replication_config(&tcp, "s", "p").expect("config");
        assert!(!config.is_unix_socket());
        assert_eq!((config.host.as_str(), config.port, config.database.as_str()), ("db.example", 6543, "app"));
        // A socket folder as host: the walsender then writes to a Unix socket (see README).
        let unix: tokio_postgres::Config = "postgres://u@%2Fvar%2Frun%2Fpostgresql/app".parse().expect("url");
        let config = replication_config(&unix, "s", "p").expect("config");
        assert!(config.is_unix_socket());
        assert_eq!(config.unix_socket_path(), std::path::Path::new("/var/run/postgresql/.s.PGSQL.5432"));
    }
}
