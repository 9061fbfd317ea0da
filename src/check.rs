//! `sluice check`: parses the configuration and mappings, connects to every endpoint, and
//! prints one line per problem (exit 1) or what it verified (exit 0).
//!
//! Checked: the source's reachability, `wal_level`, REPLICATION privilege, each table
//! (exists, readable, replicable), an existing slot's plugin and database; each mapping
//! compiled against the tables' current schemas; each sink's reachability and
//! permission to create its tables; the Kafka brokers, and that librdkafka accepts the
//! producer's and consumers' settings with `[transport.options]` applied. URLs are shown
//! with passwords masked.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use sluice_actors::mapper::Mapping;
use sluice_actors::mapper::plan;
use sluice_actors::schema::{TableId, TableSchema};
use sluice_actors::sink::Sink;
use sluice_actors::source::catalog;

use crate::config::{Config, TransportKind, mask_url};
use crate::pipeline;

/// Connection attempts give up after this long (an unroutable host would hang).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(path: &Path) -> ExitCode {
    let (config, base) = match Config::load_for_command(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build the tokio runtime");
    let (ok, problems) = runtime.block_on(check(&config, &base));
    for line in &ok {
        println!("ok: {line}");
    }
    for p in &problems {
        println!("error: {p}");
    }
    if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

async fn timed<T>(what: &str, f: impl Future<Output = sluice_actors::error::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", e.chain())),
        Err(_) => Err(format!("{what}: no answer within {}s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// Returns (what was verified, problems).
pub async fn check(config: &Config, base: &Path) -> (Vec<String>, Vec<String>) {
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    let source_url = mask_url(&config.source.url);
    let mut schemas: HashMap<TableId, TableSchema> = HashMap::new();
    match pipeline::source_options(config) {
        Err(e) => problems.push(format!("{e:#}")),
        Ok(options) => match timed(&format!("source {source_url}"), catalog::connect(&options.pg, "source")).await {
            Err(e) => problems.push(e),
            Ok(client) => {
                match catalog::check_server(&client).await {
                    Ok(()) => ok.push(format!("source {source_url}: wal_level=logical, role may replicate")),
                    Err(e) => problems.push(e.chain()),
                }
                for t in &options.tables {
                    match catalog::describe_table(&client, t).await {
                        Ok(info) => {
                            schemas.insert(t.clone(), info.schema.as_ref().clone());
                        }
                        Err(e) => problems.push(e.chain()),
                    }
                }
                let database = options.pg.get_dbname().unwrap_or("postgres").to_string();
                match catalog::slot_info(&client, &options.slot).await {
                    Ok(Some(info)) => match catalog::check_slot(&options.slot, &info, &database) {
                        Ok(()) => ok.push(format!("source: slot {} exists (pgoutput)", options.slot)),
                        Err(e) => problems.push(e.chain()),
                    },
                    Ok(None) => ok.push(format!("source: slot {} will be created", options.slot)),
                    Err(e) => problems.push(e.chain()),
                }
            }
        },
    }
    for sink in &config.sinks {
        match pipeline::load_mapping(config, base, sink) {
            Err(e) => problems.push(format!("{e:#}")),
            Ok(Mapping::Sql(statements)) => {
                for s in &statements {
                    if let Some(schema) = schemas.get(&s.source) {
                        match plan::compile(s, schema).await {
                            Ok(c) => ok.push(format!(
                                "sink {}: {}:{} maps {} to {}",
                                sink.name, s.file, s.line, s.source, c.target.name
                            )),
                            Err(e) => problems.push(format!("sink {}: mapping {e}", sink.name)),
                        }
                    }
                }
            }
            Ok(Mapping::Identity) => {}
        }
    }
    match pipeline::sink_plans(config, base) {
        Err(e) => problems.push(format!("{e:#}")),
        Ok(plans) => {
            for plan in plans {
                let what = format!("sink {} ({})", plan.name, plan.endpoint);
                let result = match plan.spec.build(&plan.name) {
                    Ok(mut sink) => timed(&what, async move { sink.open().await }).await,
                    Err(e) => Err(format!("{what}: {}", e.chain())),
                };
                match result {
                    Ok(_) => ok.push(format!("{what}: reachable, sluice tables ready")),
                    Err(e) => problems.push(e),
                }
            }
        }
    }
    if config.transport.kind == TransportKind::Kafka {
        let kafka = pipeline::kafka_options(config);
        let brokers = &kafka.brokers;
        match sluice_actors::transport::kafka::check_brokers(&kafka, CONNECT_TIMEOUT).await {
            Ok(n) => ok.push(format!("kafka {brokers}: {n} broker(s) answered")),
            Err(e) if e.is_kafka_config() => problems.push(format!("transport.options: {}", e.chain())),
            Err(e) => problems.push(format!("transport.brokers {brokers}: {}", e.chain())),
        }
    }
    (ok, problems)
}
