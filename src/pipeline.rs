//! Pipeline assembly: from the configuration to supervised groups of actors.
//!
//! ```text
//! direct:  group "source"  = WAL/snapshot source ─► fan-out
//!          group "<sink>"  = mapper ─► writer            (one group per sink)
//! kafka:   group "source"  = WAL/snapshot source ─► producer
//!          group "<sink>"  = consumer ─► mapper ─► writer
//! ```
//!
//! Each group is built by a factory that runs again at every restart: fresh mailboxes,
//! state read back from what is durable (the sinks' stored offsets, the slot, the broker).
//! Channels that must outlive a group's incarnation (acknowledgements, attachments to the
//! fan-out, the stop signal) are created here once. One source serves every sink: its
//! confirmed position is the minimum over the sinks, so a sink that is down holds WAL on
//! the source (bounded by the disk there), while memory here stays bounded by the mailboxes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sluice_actors::error::Error;
use sluice_actors::fault::Faults;
use sluice_actors::mailbox::{Mailbox, Sender, mailbox};
use sluice_actors::mapper::plan::{self, MappingStatement};
use sluice_actors::mapper::{self, Mapper, Mapping, SinkEvent};
use sluice_actors::message::{Ack, Checkpoint, Event, Position, StreamOffset};
use sluice_actors::schema::TableId;
use sluice_actors::sink::parquet::{ParquetOptions, S3Options, open_store, part_bytes};
use sluice_actors::sink::{self, AnySink, Sink, SinkSpec, WriterOptions};
use sluice_actors::source::snapshot::SnapshotOptions;
use sluice_actors::source::wal::WalOptions;
use sluice_actors::source::{self, PgSourceOptions, SourceLinks};
use sluice_actors::supervisor::{ActorThread, Child, Group, RestartSpec, SharedStatus, WriterThreads};
use sluice_actors::transport::direct::{self, FanoutControl, FanoutLinks};
use sluice_actors::transport::kafka::consumer::{self, ConsumerOptions, OffsetsReader};
use sluice_actors::transport::kafka::producer::{self, ProducerOptions};
use sluice_actors::transport::kafka::{KafkaOptions, ensure_topics, read_source_state};
use tokio::sync::{Mutex, mpsc, watch};

use crate::config::{Config, Role, SinkConfig, SinkKind, TransportKind, mask_url};

/// How long a sink pipeline waits for the fan-out to take it (it may be restarting).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the source's group; sink groups are named after their sinks.
pub const SOURCE_GROUP: &str = "source";

/// A sink as the pipeline runs it.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    pub kind: SinkKind,
    pub spec: SinkSpec,
    pub mapping: Mapping,
    pub restart: RestartSpec,
    /// The endpoint with secrets masked, for status and logs.
    pub endpoint: String,
}

/// An assembled pipeline, ready for the supervisor.
pub struct Pipeline {
    pub groups: Vec<Group>,
    pub sinks: Vec<SinkPlan>,
    /// Set to stop gracefully: the source stops reading and drains.
    pub stop: watch::Sender<bool>,
    /// Becomes true once the source drained after a stop.
    pub drained: watch::Receiver<bool>,
    pub status: SharedStatus,
}

/// Parses a sink's mapping file, if any.
pub fn load_mapping(config: &Config, base: &Path, sink: &SinkConfig) -> anyhow::Result<Mapping> {
    let Some(path) = config.mapping_path(base, sink) else { return Ok(Mapping::Identity) };
    let statements: Vec<MappingStatement> =
        plan::load_file(&path).map_err(|e| anyhow::anyhow!("sink {}: mapping {e}", sink.name))?;
    let tables: Vec<TableId> = config.source.tables.iter().filter_map(|t| TableId::parse(t)).collect();
    for s in &statements {
        if !tables.contains(&s.source) {
            bail!(
                "sink {}: mapping {}:{}: source table {} is not in source.tables",
                sink.name,
                s.file,
                s.line,
                s.source
            );
        }
    }
    Ok(Mapping::Sql(statements))
}

/// Builds the sink plans (specs, mappings, restart policies) from the configuration.
pub fn sink_plans(config: &Config, base: &Path) -> anyhow::Result<Vec<SinkPlan>> {
    config
        .sinks
        .iter()
        .map(|s| {
            let (spec, endpoint) = match s.kind {
                SinkKind::Postgres => {
                    let url = s.url.clone().unwrap_or_default();
                    let pg: tokio_postgres::Config =
                        url.parse().with_context(|| format!("sink[{}].url: {}", s.name, mask_url(&url)))?;
                    let lanes = s.lanes.unwrap_or(1);
                    let spec = SinkSpec::Postgres { config: Box::new(pg), lanes, stream: config.source.slot.clone() };
                    (spec, mask_url(&url))
                }
                SinkKind::Mysql => {
                    let url = s.url.clone().unwrap_or_default();
                    let spec = SinkSpec::Mysql {
                        url: url.clone(),
                        lanes: s.lanes.unwrap_or(1),
                        stream: config.source.slot.clone(),
                    };
                    (spec, mask_url(&url))
                }
                SinkKind::Parquet => {
                    let path = s.path.clone().unwrap_or_default();
                    let s3 = S3Options {
                        endpoint: s.endpoint.clone(),
                        region: s.region.clone(),
                        access_key_id: s.access_key_id.clone(),
                        secret_access_key: s.secret_access_key.clone(),
                    };
                    let (store, prefix) = open_store(&path, &s3).map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
                    let options = ParquetOptions {
                        store,
                        prefix,
                        part_bytes: part_bytes(&path),
                        rotate_rows: s.rotate_rows.unwrap_or(crate::config::DEFAULT_ROTATE_ROWS),
                        rotate_secs: s.rotate_secs.unwrap_or(crate::config::DEFAULT_ROTATE_SECS),
                    };
                    (SinkSpec::Parquet(options), path)
                }
            };
            let mut restart = restart_spec(config);
            if let Some(policy) = s.restart {
                restart.policy = policy;
            }
            Ok(SinkPlan {
                name: s.name.clone(),
                kind: s.kind,
                spec,
                mapping: load_mapping(config, base, s)?,
                restart,
                endpoint,
            })
        })
        .collect()
}

pub fn restart_spec(config: &Config) -> RestartSpec {
    let p = &config.pipeline;
    RestartSpec {
        policy: p.restart,
        backoff_base: Duration::from_millis(p.backoff_base_ms),
        backoff_max: Duration::from_millis(p.backoff_max_ms),
        max_restarts: p.max_restarts,
        within: Duration::from_secs(p.restart_window_secs),
    }
}

pub fn source_options(config: &Config) -> anyhow::Result<PgSourceOptions> {
    let s = &config.source;
    let pg: tokio_postgres::Config = s.url.parse().with_context(|| format!("source.url: {}", mask_url(&s.url)))?;
    Ok(PgSourceOptions {
        pg,
        tables: s.tables.iter().filter_map(|t| TableId::parse(t)).collect(),
        slot: s.slot.clone(),
        publication: s.publication.clone(),
        snapshot: s.snapshot,
        snapshot_options: SnapshotOptions {
            batch_rows: config.pipeline.batch_rows,
            parallelism: s.snapshot_parallelism,
            chunk_rows: s.snapshot_chunk_rows,
        },
        wal_options: WalOptions {
            batch_rows: config.pipeline.batch_rows,
            heartbeat: Duration::from_secs(s.heartbeat_secs),
        },
    })
}

/// The position a sink holds for the source stream `slot`.
pub fn position_of(offsets: &[StreamOffset], slot: &str) -> Option<Position> {
    offsets.iter().filter(|o| o.stream == slot).map(|o| o.position).max()
}

/// Assembles the pipeline's groups. Nothing connects until the supervisor starts them.
pub fn assemble(config: &Config, base: &Path, faults: Faults, status: SharedStatus) -> anyhow::Result<Pipeline> {
    if config.transport.kind == TransportKind::Kafka {
        return assemble_kafka(config, base, faults, status);
    }
    let sinks = sink_plans(config, base)?;
    let source = source_options(config)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drained_tx, drained_rx) = watch::channel(false);
    let drained_tx = Arc::new(drained_tx);
    let (control_tx, control_rx) = mpsc::unbounded_channel::<FanoutControl>();
    let control_rx = Arc::new(Mutex::new(control_rx));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
    let ack_rx = Arc::new(Mutex::new(ack_rx));
    let mailbox_rows = config.pipeline.mailbox_rows;
    let writers = WriterThreads::start(sinks.len(), config.pipeline.writer_threads)?;
    let stall_timeout = match config.pipeline.sink_stall_timeout_secs {
        0 => None,
        secs => Some(Duration::from_secs(secs)),
    };
    let mut groups = Vec::new();

    // The source group: source -> fan-out.
    {
        let dependents = sinks.iter().map(|s| s.name.clone()).collect();
        let sinks = sinks.clone();
        let source = source.clone();
        let faults = faults.clone();
        let stop_rx = stop_rx.clone();
        let drained_tx = drained_tx.clone();
        let control_rx = control_rx.clone();
        let ack_rx = ack_rx.clone();
        let factory = move || {
            let sinks = sinks.clone();
            let source = source.clone();
            let faults = faults.clone();
            let stop_rx = stop_rx.clone();
            let drained_tx = drained_tx.clone();
            let control = control_rx.clone();
            let acks = ack_rx.clone();
            Box::pin(async move {
                // What every sink holds decides between copying and streaming. Read only: each
                // sink is opened (and recovered) once, by its writer, on its writer thread.
                let mut durable = Vec::with_capacity(sinks.len());
                for s in &sinks {
                    let mut sink = s.spec.build(&s.name)?;
                    durable.push(position_of(&sink.offsets().await?, &source.slot));
                }
                let downstream =
                    if durable.iter().any(Option::is_none) { None } else { durable.iter().flatten().min().copied() };
                let (out, input) = mailbox::<Event>("fanout", "source->fanout", mailbox_rows);
                let (confirm_tx, confirm_rx) = watch::channel(0u64);
                let (rewind_tx, rewind_rx) = watch::channel(0u64);
                let links = SourceLinks { out, confirm: confirm_rx, rewind: rewind_rx, stop: stop_rx, downstream };
                let names: Vec<String> = sinks.iter().map(|s| s.name.clone()).collect();
                let starting: Vec<Position> = durable.iter().map(|d| d.unwrap_or(Position::START)).collect();
                let fanout_links = FanoutLinks { input, control, acks, confirm: confirm_tx, rewind: rewind_tx };
                let source_faults = faults.clone();
                Ok(vec![
                    Child::new("source", "wal", async move {
                        source::run(source, links, source_faults).await?;
                        drained_tx.send_replace(true);
                        Ok(())
                    }),
                    Child::new("fanout", "fanout", direct::run(names, starting, fanout_links, stall_timeout, faults)),
                ])
            }) as futures::future::BoxFuture<'static, sluice_actors::error::Result<Vec<Child>>>
        };
        groups.push(Group {
            name: SOURCE_GROUP.into(),
            spec: restart_spec(config),
            factory: Box::new(factory),
            dependents,
        });
    }

    // One group per sink: mapper -> writer, attached to the fan-out.
    for (index, plan) in sinks.iter().enumerate() {
        let plan = plan.clone();
        let faults = faults.clone();
        let control_tx = control_tx.clone();
        let ack_tx = ack_tx.clone();
        let stop_rx = stop_rx.clone();
        let slot = source.slot.clone();
        let max_unit_rows = config.pipeline.max_unit_rows;
        let name = plan.name.clone();
        let spec = plan.restart;
        let thread = writers.get(index);
        let factory = move || {
            let plan = plan.clone();
            let thread = thread.clone();
            let faults = faults.clone();
            let control_tx = control_tx.clone();
            let ack_tx = ack_tx.clone();
            let stop_rx = stop_rx.clone();
            let slot = slot.clone();
            Box::pin(async move {
                let (sink, offsets) = plan.spec.open_on(&plan.name, &thread).await?;
                let held = position_of(&offsets, &slot);
                let durable = held.unwrap_or(Position::START);
                let (to_mapper, mapper_in) =
                    mailbox::<Event>(format!("{}.mapper", plan.name), "fanout->mapper", mailbox_rows);
                let (to_writer, writer_in) =
                    mailbox::<SinkEvent>(format!("{}.writer", plan.name), "mapper->writer", mailbox_rows);
                let (reply_tx, reply) = tokio::sync::oneshot::channel();
                let (detached_tx, detached) = tokio::sync::oneshot::channel();
                control_tx
                    .send(FanoutControl::Attach {
                        sink: index,
                        tx: to_mapper,
                        durable,
                        reply: reply_tx,
                        detached: detached_tx,
                    })
                    .map_err(|_| Error::Restart("the fan-out is gone".into()))?;
                // The fan-out may be restarting with the source: the request waits for it.
                match tokio::time::timeout(ATTACH_TIMEOUT, reply).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => {
                        return Err(Error::Restart("the fan-out did not answer the attachment".into()));
                    }
                }
                let options = WriterOptions { sink: plan.name.clone(), stream: slot, max_unit_rows, durable: held };
                let on_commit = move |checkpoint| {
                    let _ = ack_tx.send(Ack { downstream: index, checkpoint });
                };
                let tail = SinkTail { sink, thread, options, mapper_in, to_writer, writer_in };
                let [mapper, writer] = mapper_and_writer(&plan, tail, on_commit, stop_rx, faults);
                Ok(vec![
                    mapper,
                    writer,
                    // Restarts the group when the fan-out detaches it for stalling; a
                    // fan-out that restarts restarts this group anyway.
                    Child::new(format!("{}.link", plan.name), "link", async move {
                        match detached.await {
                            Ok(reason) => Err(Error::Restart(reason)),
                            Err(_) => std::future::pending().await,
                        }
                    }),
                ])
            }) as futures::future::BoxFuture<'static, sluice_actors::error::Result<Vec<Child>>>
        };
        groups.push(Group { name, spec, factory: Box::new(factory), dependents: Vec::new() });
    }
    Ok(Pipeline { groups, sinks, stop: stop_tx, drained: drained_rx, status })
}

/// The end of every sink pipeline: its sink, the thread its writer runs on and the
/// mailboxes around its mapper.
struct SinkTail {
    sink: AnySink,
    thread: ActorThread,
    options: WriterOptions,
    mapper_in: Mailbox<Event>,
    to_writer: Sender<SinkEvent>,
    writer_in: Mailbox<SinkEvent>,
}

/// A sink's mapper and writer actors, the same in both transports.
fn mapper_and_writer(
    plan: &SinkPlan,
    tail: SinkTail,
    on_commit: impl Fn(Checkpoint) + Send + Sync + 'static,
    stop: watch::Receiver<bool>,
    faults: Faults,
) -> [Child; 2] {
    let mapper = Mapper::new(plan.mapping.clone());
    [
        Child::new(
            format!("{}.mapper", plan.name),
            "mapper",
            mapper::run(plan.name.clone(), mapper, tail.mapper_in, tail.to_writer, faults.clone()),
        ),
        Child::new(
            format!("{}.writer", plan.name),
            "writer",
            sink::run(tail.sink, tail.options, tail.writer_in, on_commit, stop, faults),
        )
        .on(tail.thread),
    ]
}

pub fn kafka_options(config: &Config) -> KafkaOptions {
    let t = &config.transport;
    KafkaOptions {
        brokers: t.brokers.clone().unwrap_or_default(),
        topic_prefix: t.topic_prefix.clone(),
        partitions: t.partitions,
        replication_factor: t.replication_factor,
        compression: t.compression.clone(),
        extra: t.options.clone(),
    }
}

/// The Kafka transport: the source group produces, each sink group consumes on its own.
fn assemble_kafka(config: &Config, base: &Path, faults: Faults, status: SharedStatus) -> anyhow::Result<Pipeline> {
    let sinks = sink_plans(config, base)?;
    let source = source_options(config)?;
    let kafka = kafka_options(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drained_tx, drained_rx) = watch::channel(false);
    let drained_tx = Arc::new(drained_tx);
    let mailbox_rows = config.pipeline.mailbox_rows;
    let batch_rows = config.pipeline.batch_rows;
    let mut groups = Vec::new();

    let role = config.transport.role;
    // The source group: source -> producer.
    if role != Role::Sinks {
        let (source, kafka, faults, stop_rx, drained_tx) =
            (source.clone(), kafka.clone(), faults.clone(), stop_rx.clone(), drained_tx.clone());
        let factory = move || {
            let (source, kafka, faults, stop_rx, drained_tx) =
                (source.clone(), kafka.clone(), faults.clone(), stop_rx.clone(), drained_tx.clone());
            Box::pin(async move {
                let state = read_source_state(&kafka, &source.slot).await?;
                let (out, input) = mailbox::<Event>("producer", "source->producer", mailbox_rows);
                let (confirm_tx, confirm_rx) = watch::channel(0u64);
                // The producer never asks for a rewind: a failed delivery restarts the group.
                let (rewind_tx, rewind_rx) = watch::channel(0u64);
                let links = SourceLinks {
                    out,
                    confirm: confirm_rx,
                    rewind: rewind_rx,
                    stop: stop_rx,
                    downstream: state.as_ref().map(|s| s.position),
                };
                let options = ProducerOptions {
                    kafka,
                    database: source.pg.get_dbname().unwrap_or("postgres").to_string(),
                    slot: source.slot.clone(),
                    generation: state.as_ref().map_or(0, |s| s.generation),
                };
                let source_faults = faults.clone();
                Ok(vec![
                    Child::new("source", "wal", async move {
                        let _rewind = rewind_tx;
                        source::run(source, links, source_faults).await?;
                        drained_tx.send_replace(true);
                        Ok(())
                    }),
                    Child::new("producer", "producer", producer::run(options, input, confirm_tx, faults)),
                ])
            }) as futures::future::BoxFuture<'static, sluice_actors::error::Result<Vec<Child>>>
        };
        groups.push(Group {
            name: SOURCE_GROUP.into(),
            spec: restart_spec(config),
            factory: Box::new(factory),
            dependents: Vec::new(),
        });
    }

    // One group per sink: consumer -> mapper -> writer.
    let consumed: &[SinkPlan] = if role == Role::Source { &[] } else { &sinks };
    let writers = WriterThreads::start(consumed.len(), config.pipeline.writer_threads)?;
    for (index, plan) in consumed.iter().enumerate() {
        let plan = plan.clone();
        let thread = writers.get(index);
        let (kafka, faults, stop_rx) = (kafka.clone(), faults.clone(), stop_rx.clone());
        let max_unit_rows = config.pipeline.max_unit_rows;
        let group_id = format!("{}-{}", config.transport.group, plan.name);
        let instance = config.transport.instance.clone();
        let tables = source.tables.clone();
        let source_pg = source.pg.clone();
        let (name, spec) = (plan.name.clone(), plan.restart);
        let factory = move || {
            let (plan, thread, kafka, faults, stop_rx, group_id, tables, source_pg, instance) = (
                plan.clone(),
                thread.clone(),
                kafka.clone(),
                faults.clone(),
                stop_rx.clone(),
                group_id.clone(),
                tables.clone(),
                source_pg.clone(),
                instance.clone(),
            );
            Box::pin(async move {
                let (sink, _) = plan.spec.open_on(&plan.name, &thread).await?;
                let topics: Vec<(String, bool)> = tables.iter().map(|t| (kafka.topic(t), false)).collect();
                ensure_topics(&kafka, &topics).await?;
                let (to_mapper, mapper_in) =
                    mailbox::<Event>(format!("{}.mapper", plan.name), "consumer->mapper", mailbox_rows);
                let (to_writer, writer_in) =
                    mailbox::<SinkEvent>(format!("{}.writer", plan.name), "mapper->writer", mailbox_rows);
                let (commit_tx, commit_rx) = mpsc::unbounded_channel();
                let on_commit = move |cp| {
                    let _ = commit_tx.send(cp);
                };
                let reader_spec = plan.spec.clone();
                let reader_name = plan.name.clone();
                let read_offsets: OffsetsReader = Box::new(move || {
                    let (spec, name) = (reader_spec.clone(), reader_name.clone());
                    Box::pin(async move { spec.build(&name)?.offsets().await })
                });
                let consumer_options = ConsumerOptions {
                    kafka,
                    group: group_id,
                    instance,
                    sink: plan.name.clone(),
                    tables,
                    batch_rows,
                    source: Some(source_pg),
                };
                let options =
                    WriterOptions { sink: plan.name.clone(), stream: String::new(), max_unit_rows, durable: None };
                let consumer = Child::new(
                    format!("{}.consumer", plan.name),
                    "consumer",
                    consumer::run(consumer_options, to_mapper, read_offsets, commit_rx, faults.clone()),
                );
                let tail = SinkTail { sink, thread, options, mapper_in, to_writer, writer_in };
                let [mapper, writer] = mapper_and_writer(&plan, tail, on_commit, stop_rx, faults);
                Ok(vec![consumer, mapper, writer])
            }) as futures::future::BoxFuture<'static, sluice_actors::error::Result<Vec<Child>>>
        };
        groups.push(Group { name, spec, factory: Box::new(factory), dependents: Vec::new() });
    }
    Ok(Pipeline { groups, sinks, stop: stop_tx, drained: drained_rx, status })
}
