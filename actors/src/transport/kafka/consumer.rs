//! The consumer actor: one per sink, in consumer group `<group>-<sink>`.
//!
//! Invariants:
//! - The sink's own offsets are the truth. When partitions are assigned, the rebalance
//!   callback reads them from the sink and starts each partition there, before the
//!   assignment takes effect. Kafka's committed offsets, written after the sink commits,
//!   are only for lag tools.
//! - Within a partition, sluice's producer writes its progress in increasing order: the
//!   generation (`sluice.gen`, which grows with every new snapshot), then the source
//!   position (`sluice.pos`). A message whose progress is not above the newest applied one
//!   is a duplicate from a producer replay, or a late message of an older generation, and
//!   is skipped. The sink stores each partition's progress with its offset.
//! - Each checkpoint says, per partition, from which stored offset its unit starts; the
//!   sink commits only if it still holds that offset, so a consumer that lost its partition
//!   in a rebalance cannot overwrite the work of the consumer that took it.
//! - A message that cannot be decoded goes to the sink's dead-letter topic with the reason.
//! - A truncate written by sluice sits in every partition of its topic (`sluice.truncate`).
//!   It is a barrier: each partition that reaches it pauses there until all have, so that
//!   everything before it in any partition is applied before it and nothing after it is
//!   applied before it; then it applies once, with every partition's offset past it. A
//!   snapshot opens with such a truncate at the start position: positions start over after
//!   it. A consumer that holds only some partitions cannot see the barrier whole; it skips
//!   the truncate with a warning (rows it removed may remain) rather than empty rows that
//!   other consumers applied; so does a consumer that finds another partition already
//!   past the truncate (it was skipped there before).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::mailbox::Sender;
use crate::message::{Change, ChangeBatch, Checkpoint, Event, Op, Position, StreamOffset};
use crate::metrics as m;
use crate::schema::{TableId, TableSchema};
use crate::source::catalog;
use crate::transport::envelope;
use crate::transport::kafka::KafkaOptions;

/// Reads the offsets the sink holds (a fresh read at every assignment).
pub type OffsetsReader = Box<dyn FnMut() -> BoxFuture<'static, Result<Vec<StreamOffset>>> + Send>;

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub kafka: KafkaOptions,
    /// The consumer group id.
    pub group: String,
    /// This daemon's stable identity in the group (`group.instance.id`, static
    /// membership); `None` for dynamic membership.
    pub instance: Option<String>,
    pub sink: String,
    pub tables: Vec<TableId>,
    /// Changes per batch at most.
    pub batch_rows: usize,
    /// The source database, to describe tables of topics written without sluice's schema
    /// header (by Debezium).
    pub source: Option<tokio_postgres::Config>,
}

/// A partition: (topic, partition).
type PartitionKey = (String, i32);
/// A partition's progress since the last checkpoint: the next offset and the newest progress.
type Touched = (i64, Option<Progress>);

/// Assigned partitions, shared by the rebalance callback (which fills them before the
/// assignment takes effect) and the consumer loop.
type Parts = Arc<std::sync::Mutex<HashMap<(String, i32), Part>>>;

struct Ctx {
    sink: String,
    parts: Parts,
    reader: std::sync::Mutex<OffsetsReader>,
    runtime: tokio::runtime::Handle,
    /// A failure inside the callback, reported by the loop.
    failed: std::sync::Mutex<Option<Error>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    /// Starts each assigned partition at the offset the sink holds, read from the sink
    /// itself at this moment (another consumer may have applied it since), before the
    /// assignment takes effect: no message of it is read from anywhere else.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr;
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let read = {
                    let mut reader = self.reader.lock().expect("offsets reader");
                    let future = (reader)();
                    tokio::task::block_in_place(|| self.runtime.block_on(future))
                };
                let held = match read {
                    Ok(held) => held,
                    Err(e) => {
                        *self.failed.lock().expect("failure slot") = Some(e);
                        Vec::new()
                    }
                };
                let mut parts = self.parts.lock().expect("partitions");
                for e in tpl.elements() {
                    let key = (e.topic().to_string(), e.partition());
                    let stored = held.iter().find(|o| o.stream == key.0 && o.partition == key.1);
                    let next = stored.map_or(0, |o| o.next_offset);
                    tracing::info!(sink = %self.sink, topic = %key.0, partition = key.1, next_offset = next, "partition assigned");
                    let floor = stored.map(|o| Progress { generation: o.generation, position: o.position });
                    let part = Part { next_expected: next, floor, from: next, barrier: None };
                    parts.insert(key, part);
                }
                drop(parts);
                for (key, part) in self.parts.lock().expect("partitions").iter() {
                    if let Some(mut elem) = tpl.find_partition(&key.0, key.1) {
                        let offset =
                            if part.next_expected > 0 { Offset::Offset(part.next_expected) } else { Offset::Beginning };
                        let _ = elem.set_offset(offset);
                    }
                }
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = result {
                    *self.failed.lock().expect("failure slot") =
                        Some(Error::Kafka { context: "assign partitions".into(), source: e });
                }
            }
            _ => {
                // Revoked (or a rebalance error): work already emitted for these partitions
                // is fenced at commit if they move elsewhere.
                let mut parts = self.parts.lock().expect("partitions");
                for e in tpl.elements() {
                    parts.remove(&(e.topic().to_string(), e.partition()));
                }
                drop(parts);
                let result = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = result {
                    tracing::warn!(sink = %self.sink, error = %e, "unassign failed");
                }
            }
        }
    }
}

/// Per assigned partition.
struct Part {
    /// Messages below this offset are stale (read before the seek).
    next_expected: i64,
    /// The newest progress applied or emitted from this partition.
    floor: Option<Progress>,
    /// The offset the sink will hold once everything emitted so far is committed.
    from: i64,
    /// Paused at the truncate at this offset, until every partition reached it.
    barrier: Option<i64>,
}

/// How far a partition got: the generation of the snapshot it follows, then the source
/// position within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Progress {
    generation: u64,
    position: Position,
}

struct Pending {
    schema: Arc<TableSchema>,
    change: Change,
}

/// Decodes envelopes with the right schema: the message's header, or the source catalog.
struct Schemas {
    by_header: HashMap<Vec<u8>, Arc<TableSchema>>,
    by_table: HashMap<TableId, Arc<TableSchema>>,
    source: Option<tokio_postgres::Config>,
    catalog: Option<tokio_postgres::Client>,
}

impl Schemas {
    async fn of(&mut self, message: &BorrowedMessage<'_>, table: &TableId) -> Result<Arc<TableSchema>> {
        if let Some(h) = header(message, "sluice.schema") {
            if let Some(s) = self.by_header.get(h) {
                return Ok(s.clone());
            }
            let s = Arc::new(envelope::parse_schema_header(h).map_err(Error::Rejected)?);
            self.by_header.insert(h.to_vec(), s.clone());
            return Ok(s);
        }
        if let Some(s) = self.by_table.get(table) {
            return Ok(s.clone());
        }
        let Some(source) = &self.source else {
            return Err(Error::Rejected(format!(
                "message of {table} has no sluice.schema header and no source is configured to describe it"
            )));
        };
        if self.catalog.is_none() {
            self.catalog = Some(catalog::connect(source, "source (table schemas)").await?);
        }
        let client = self.catalog.as_ref().ok_or_else(|| Error::Stopped)?;
        let info = catalog::describe_table(client, table).await?;
        self.by_table.insert(table.clone(), info.schema.clone());
        Ok(info.schema)
    }
}

fn header<'a>(message: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a [u8]> {
    message.headers()?.iter().find(|h| h.key == key)?.value
}

/// The most a consumer fetches in one request, in bytes (a larger message still comes
/// whole). librdkafka decompresses each response at once, so this bounds the consumers'
/// memory: in one daemon with three sinks through tansu, the glibc heap jumped by 30-45 MB
/// within a second when the consumers resumed with 1 MB fetches (peak RSS 123-136 MB),
/// and the peak was 97-101 MB with 256 KB. A broker answers small fetches at once when it
/// has the data, so only round trips are added (tansu 0.6 is slower with them: it scans a
/// partition's backlog per fetch; 2.3-2.7k events/s per sink instead of 5.4-6.6k).
pub const FETCH_BYTES: usize = 256 * 1024;

/// The consumer's librdkafka settings, the user's extra ones last: group `group`, static
/// membership as `<group>-<instance>` when an instance is given. `sluice check` creates a
/// client from them too, so a setting librdkafka refuses is reported before start.
pub fn client_config(kafka: &KafkaOptions, group: &str, instance: Option<&str>) -> ClientConfig {
    let message_max = kafka.extra.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(FETCH_BYTES);
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "30000")
        // See FETCH_BYTES. librdkafka wants fetch.max.bytes >= message.max.bytes, which
        // for a consumer only sizes its first guess of a decompression buffer; a larger
        // message.max.bytes set for the producers raises the fetch to it.
        .set("message.max.bytes", message_max.to_string())
        .set("fetch.max.bytes", FETCH_BYTES.max(message_max).to_string())
        .set("max.partition.fetch.bytes", FETCH_BYTES.to_string())
        .set("queued.max.messages.kbytes", "8192")
        // tansu does not answer a waiting fetch when data arrives: a short wait bounds latency.
        .set("fetch.wait.max.ms", "20");
    if let Some(instance) = instance {
        // Static membership: a restarted daemon takes its place back at once instead of
        // waiting for the broker to expire the dead member; a stopped one keeps its
        // partitions until the session times out.
        config.set("group.instance.id", format!("{group}-{instance}"));
    }
    kafka.finish(&mut config);
    config
}

/// The consumer actor.
pub async fn run(
    options: ConsumerOptions,
    out: Sender<Event>,
    read_offsets: OffsetsReader,
    mut commits: mpsc::UnboundedReceiver<Checkpoint>,
    faults: Faults,
) -> Result<()> {
    if tokio::runtime::Handle::current().runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err(Error::Fatal("the Kafka consumer needs the multi-threaded runtime".into()));
    }
    let parts: Parts = Arc::default();
    let ctx = Ctx {
        sink: options.sink.clone(),
        parts: parts.clone(),
        reader: std::sync::Mutex::new(read_offsets),
        runtime: tokio::runtime::Handle::current(),
        failed: std::sync::Mutex::new(None),
    };
    let consumer: StreamConsumer<Ctx> = client_config(&options.kafka, &options.group, options.instance.as_deref())
        .create_with_context(ctx)
        .context("create Kafka consumer")?;
    let topics: HashMap<String, TableId> = options.tables.iter().map(|t| (options.kafka.topic(t), t.clone())).collect();
    let names: Vec<&str> = topics.keys().map(String::as_str).collect();
    consumer.subscribe(&names).context("subscribe to the table topics")?;
    let mut schemas =
        Schemas { by_header: HashMap::new(), by_table: HashMap::new(), source: options.source.clone(), catalog: None };
    let mut pending: Vec<Pending> = Vec::new();
    let mut touched: HashMap<PartitionKey, Touched> = HashMap::new();
    let mut dead_letters: Option<FutureProducer> = None;
    let mut partition_counts: HashMap<String, usize> = HashMap::new();
    // A fetch response arrives whole: a few milliseconds gather it into one batch.
    let linger = Duration::from_millis(5);
    // Set by the first change that waits: a steady trickle of messages must not keep
    // postponing the flush (a sleep made afresh each turn would).
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        if pending.is_empty() && touched.is_empty() {
            due = None;
        } else {
            due.get_or_insert_with(|| tokio::time::Instant::now() + linger);
        }
        let wake = due.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            biased;
            cp = commits.recv() => {
                let Some(cp) = cp else { return Ok(()) };
                let mut tpl = TopicPartitionList::new();
                for o in cp.offsets.iter().flat_map(|o| o.iter()) {
                    let _ = tpl.add_partition_offset(&o.stream, o.partition, Offset::Offset(o.next_offset));
                }
                if tpl.count() > 0 && let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(error = %error, "committing offsets to Kafka failed (informational only)");
                }
            }
            _ = tokio::time::sleep_until(wake), if due.is_some() => {
                flush(&out, &mut pending, &mut touched, &parts).await?;
            }
            message = consumer.recv() => {
                let message = match message {
                    Ok(m) => m,
                    // librdkafka reconnects by itself; these only report the outage.
                    Err(rdkafka::error::KafkaError::MessageConsumption(code)) if transient(code) => {
                        tracing::warn!(sink = %options.sink, error = %code, "Kafka unreachable; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => return Err(Error::Kafka { context: "receive from Kafka".into(), source: e }),
                };
                if let Some(e) = consumer.context().failed.lock().expect("failure slot").take() {
                    return Err(e);
                }
                faults.hit_async("consumer", Some(&options.sink)).await?;
                let key = (message.topic().to_string(), message.partition());
                let offset = message.offset();
                let position = header(&message, "sluice.pos").and_then(envelope::parse_position_header);
                let truncate = header(&message, "sluice.truncate").is_some();
                let generation = header(&message, "sluice.gen")
                    .and_then(|g| std::str::from_utf8(g).ok()?.parse::<u64>().ok())
                    .unwrap_or(0);
                let progress = position.map(|position| Progress { generation, position });
                let floor = {
                    let mut parts = parts.lock().expect("partitions");
                    // Not (or no longer) ours: revoked while this message was in flight.
                    let Some(part) = parts.get_mut(&key) else { continue };
                    // Paused at a barrier: what was fetched beyond it is read again later.
                    if offset < part.next_expected || part.barrier.is_some() {
                        continue;
                    }
                    part.next_expected = offset + 1;
                    if let (Some(p), Some(floor)) = (progress, part.floor) && p <= floor {
                        // A duplicate from a producer that replayed after a restart.
                        touched.insert(key, (offset + 1, part.floor));
                        continue;
                    }
                    part.floor
                };
                let Some(table) = topics.get(&key.0).cloned() else { continue };
                let mut floor = floor;
                match decode(&message, &table, position, &mut schemas).await {
                    Ok(Some((schema, change))) if truncate => {
                        let count = partition_count(&consumer, &key.0, &mut partition_counts)?;
                        let barrier = Barrier { consumer: &consumer, parts: &parts, sink: &options.sink, count };
                        let at = progress.unwrap_or(Progress { generation, position: change.position });
                        match barrier.reach(&key, offset, at)? {
                            Reached::Waiting => {}
                            Reached::Skipped => {
                                touched.insert(key, (offset + 1, Some(at)));
                            }
                            Reached::All(at) => {
                                // Everything before the truncate first, then the truncate alone.
                                flush(&out, &mut pending, &mut touched, &parts).await?;
                                pending.push(Pending { schema, change });
                                touched.extend(at);
                                flush(&out, &mut pending, &mut touched, &parts).await?;
                            }
                        }
                        continue;
                    }
                    Ok(Some((schema, change))) => {
                        floor = floor.max(Some(Progress { generation, position: change.position }));
                        if let Some(part) = parts.lock().expect("partitions").get_mut(&key) {
                            part.floor = floor;
                        }
                        pending.push(Pending { schema, change });
                    }
                    Ok(None) => {}
                    Err(error) if error.disposition() == crate::error::Disposition::DeadLetter => {
                        dead_letter(&options, &mut dead_letters, &message, &error).await?;
                    }
                    Err(error) => return Err(error),
                }
                touched.insert(key, (offset + 1, floor));
                if pending.len() >= options.batch_rows {
                    flush(&out, &mut pending, &mut touched, &parts).await?;
                }
            }
        }
    }
}

/// The partitions of `topic`, from the broker's metadata (once per topic).
fn partition_count(consumer: &StreamConsumer<Ctx>, topic: &str, cache: &mut HashMap<String, usize>) -> Result<usize> {
    if let Some(n) = cache.get(topic) {
        return Ok(*n);
    }
    let metadata = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(10)))
        .context(format!("read the partitions of {topic}"))?;
    let n = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
    cache.insert(topic.to_string(), n);
    Ok(n)
}

/// Where a partition's truncate leaves the barrier.
enum Reached {
    /// Other partitions have not reached it yet: this one is paused.
    Waiting,
    /// This consumer holds only some of the partitions: the truncate is not applied.
    Skipped,
    /// Every partition reached it: apply it, with these offsets past it.
    All(Vec<(PartitionKey, Touched)>),
}

/// The truncate barrier over the partitions of one topic.
struct Barrier<'a> {
    consumer: &'a StreamConsumer<Ctx>,
    parts: &'a Parts,
    sink: &'a str,
    /// Partitions of the topic.
    count: usize,
}

impl Barrier<'_> {
    /// Partition `key` reached the truncate at `offset`, whose progress is `at`.
    fn reach(&self, key: &(String, i32), offset: i64, at: Progress) -> Result<Reached> {
        let mut parts = self.parts.lock().expect("partitions");
        let held = parts.keys().filter(|k| k.0 == key.0).count();
        // Another partition already past this truncate: it was skipped there before.
        let past = parts.iter().any(|(k, p)| k.0 == key.0 && k != key && p.barrier.is_none() && p.floor >= Some(at));
        if held < self.count || past {
            tracing::warn!(
                sink = %self.sink, topic = %key.0, partition = key.1, held, partitions = self.count,
                "a truncate reached a partition, but this consumer cannot apply it once for every partition \
                 (it holds only some, or the truncate was skipped before): not applied, so rows it removed may \
                 remain (run one consumer per sink to apply truncates)"
            );
            if let Some(part) = parts.get_mut(key) {
                part.floor = part.floor.max(Some(at));
            }
            return Ok(Reached::Skipped);
        }
        let waiting = parts.iter().filter(|(k, p)| k.0 == key.0 && p.barrier.is_some()).count();
        if waiting + 1 < self.count {
            if let Some(part) = parts.get_mut(key) {
                part.barrier = Some(offset);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            self.consumer.pause(&tpl).context("pause a partition at a truncate")?;
            tracing::debug!(sink = %self.sink, topic = %key.0, partition = key.1, offset, "partition waits at a truncate");
            return Ok(Reached::Waiting);
        }
        // The last one: every partition goes on past its copy of the truncate.
        let mut reached = vec![(key.clone(), (offset + 1, Some(at)))];
        let mut resume = TopicPartitionList::new();
        for (k, part) in parts.iter_mut().filter(|(k, _)| k.0 == key.0) {
            part.floor = Some(at);
            if let Some(b) = part.barrier.take() {
                part.next_expected = b + 1;
                reached.push((k.clone(), (b + 1, Some(at))));
                tokio::task::block_in_place(|| {
                    self.consumer.seek(&k.0, k.1, Offset::Offset(b + 1), Duration::from_secs(10))
                })
                .context("seek past a truncate")?;
                resume.add_partition(&k.0, k.1);
            }
        }
        if resume.count() > 0 {
            self.consumer.resume(&resume).context("resume partitions after a truncate")?;
        }
        tracing::debug!(sink = %self.sink, topic = %key.0, at = ?reached, "truncate reached every partition");
        Ok(Reached::All(reached))
    }
}

/// Errors librdkafka recovers from on its own (it keeps reconnecting).
fn transient(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::BrokerNotAvailable
            | C::NetworkException
            | C::RequestTimedOut
            | C::OperationTimedOut
    )
}

/// One message as a change; `None` for a tombstone.
async fn decode(
    message: &BorrowedMessage<'_>,
    table: &TableId,
    position: Option<Position>,
    schemas: &mut Schemas,
) -> Result<Option<(Arc<TableSchema>, Change)>> {
    let Some(payload) = message.payload() else { return Ok(None) };
    let envelope = envelope::parse_envelope(payload).map_err(|e| {
        Error::Rejected(format!("{}[{}]@{}: {e}", message.topic(), message.partition(), message.offset()))
    })?;
    let schema = schemas.of(message, table).await?;
    let row = |o: &Option<serde_json::Map<String, serde_json::Value>>| {
        o.as_ref()
            .map(|o| envelope::decode_row(&schema, o))
            .transpose()
            .map_err(|e| Error::Rejected(format!("{}: {e}", table)))
    };
    let before = row(&envelope.before)?;
    let after = row(&envelope.after)?;
    // Snapshot rows are reads whatever their op says; a snapshot's opening truncate stays one.
    let snapshot = envelope.snapshot == "true" || envelope.snapshot == "last";
    let op = if envelope.op != Op::Truncate && (envelope.op == Op::Read || snapshot) { Op::Read } else { envelope.op };
    let position = position.unwrap_or(Position { lsn: envelope.lsn, seq: message.offset().max(0) as u64 });
    let change = Change {
        op,
        before,
        after,
        position,
        lsn: envelope.lsn,
        xid: envelope.xid,
        commit_micros: envelope.commit_micros,
    };
    Ok(Some((schema, change)))
}

/// Emits the pending changes as batches, then a checkpoint of the partitions they advance.
async fn flush(
    out: &Sender<Event>,
    pending: &mut Vec<Pending>,
    touched: &mut HashMap<PartitionKey, Touched>,
    parts: &Parts,
) -> Result<()> {
    tracing::debug!(changes = pending.len(), partitions = touched.len(), "consumed batch");
    let mut batch: Option<ChangeBatch> = None;
    for p in pending.drain(..) {
        metrics::counter!(m::EVENTS_TOTAL, "stage" => "consumed", "table" => p.schema.id.to_string()).increment(1);
        match &mut batch {
            Some(b) if Arc::ptr_eq(&b.schema, &p.schema) => b.changes.push(p.change),
            _ => {
                if let Some(b) = batch.take() {
                    out.send(Event::Data(Arc::new(b))).await?;
                }
                batch = Some(ChangeBatch {
                    table: p.schema.id.clone(),
                    schema: p.schema,
                    changes: vec![p.change],
                    snapshot_last: false,
                });
            }
        }
    }
    if let Some(b) = batch {
        out.send(Event::Data(Arc::new(b))).await?;
    }
    if touched.is_empty() {
        return Ok(());
    }
    let mut offsets = Vec::with_capacity(touched.len());
    let mut newest = Position::START;
    {
        let mut parts = parts.lock().expect("partitions");
        for ((topic, partition), (next, floor)) in touched.drain() {
            let Some(part) = parts.get_mut(&(topic.clone(), partition)) else { continue };
            let Progress { generation, position } =
                floor.unwrap_or(Progress { generation: 0, position: Position::START });
            newest = newest.max(position);
            offsets.push(StreamOffset {
                stream: topic,
                partition,
                next_offset: next,
                position,
                generation,
                from_offset: Some(part.from),
            });
            part.from = next;
        }
    }
    out.send(Event::Checkpoint(Checkpoint { position: newest, confirm_lsn: None, offsets: Some(Arc::new(offsets)) }))
        .await?;
    Ok(())
}

async fn dead_letter(
    options: &ConsumerOptions,
    producer: &mut Option<FutureProducer>,
    message: &BorrowedMessage<'_>,
    error: &Error,
) -> Result<()> {
    let topic = options.kafka.dead_letter_topic(&options.sink);
    if producer.is_none() {
        crate::transport::kafka::ensure_topics(&options.kafka, &[(topic.clone(), false)]).await?;
        *producer = Some(crate::transport::kafka::producer::create(&options.kafka)?);
    }
    let producer = producer.as_ref().ok_or(Error::Stopped)?;
    let reason = error.chain();
    tracing::warn!(sink = %options.sink, topic = message.topic(), partition = message.partition(), offset = message.offset(), error = %reason, "undecodable message dead-lettered");
    metrics::counter!(m::DEAD_LETTERS_TOTAL, "sink" => options.sink.clone()).increment(1);
    let origin = format!("{}/{}/{}", message.topic(), message.partition(), message.offset());
    let headers = OwnedHeaders::new()
        .insert(Header { key: "sluice.error", value: Some(reason.as_bytes()) })
        .insert(Header { key: "sluice.origin", value: Some(origin.as_bytes()) });
    let mut record = FutureRecord::to(&topic).headers(headers);
    if let Some(k) = message.key() {
        record = record.key(k);
    }
    if let Some(p) = message.payload() {
        record = record.payload(p);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(source, _)| Error::Kafka { context: format!("dead-letter to {topic}"), source })?;
    Ok(())
}
