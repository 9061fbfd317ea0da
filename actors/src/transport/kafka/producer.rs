//! The producer actor: source events to Kafka, acknowledged by delivery reports.
//!
//! Every message is enqueued at once (librdkafka batches and compresses); its delivery
//! future joins an in-order queue where checkpoints sit between the messages they follow.
//! A checkpoint is acknowledged upstream only when every message before it was delivered
//! (the idempotent producer with `acks=all` makes "delivered" mean "durable on the
//! broker"). A delivery that fails fails the actor: the source group restarts and replays
//! from the confirmed position; consumers drop the duplicates by position.
//!
//! Memory is bounded by librdkafka's queue limits and [`MAX_IN_FLIGHT`]: when either is
//! full the producer waits for the oldest delivery, and the source waits for the producer.
//!
//! A truncate concerns every key, so it goes to every partition of its topic, marked with
//! the `sluice.truncate` header: consumers apply it once all partitions reached it (see
//! the consumer). A snapshot begins with such a truncate at [`Position::START`], so that
//! a re-snapshot empties what the topics delivered before and positions may start over.
//! Every message carries its generation (`sluice.gen`, the consistent LSN of the snapshot
//! it follows), so that consumers can drop late messages of an older producer that land
//! after a newer snapshot's truncate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::mailbox::Mailbox;
use crate::message::{Checkpoint, Event, Op, Position};
use crate::metrics as m;
use crate::schema::{TableId, TableSchema};
use crate::transport::envelope::{self, SourceInfo};
use crate::transport::kafka::{KafkaOptions, SourceState, ensure_topics};

/// Messages awaiting their delivery report at most.
pub const MAX_IN_FLIGHT: usize = 100_000;

/// What the producer needs besides the broker.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    pub kafka: KafkaOptions,
    /// The source database, for the envelope's `source.db`.
    pub database: String,
    /// The slot, keying the source state.
    pub slot: String,
    /// The generation recorded in the source state (0 without one).
    pub generation: u64,
}

enum Pending {
    Delivery(DeliveryFuture),
    Checkpoint(Checkpoint),
}

/// Creates the producer with throughput settings and bounded queues.
pub fn create(kafka: &KafkaOptions) -> Result<FutureProducer> {
    let mut config = kafka.client_config();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // With several requests in flight, librdkafka's broker thread spins while it waits
        // for a broker slower than the source (measured against tansu: 85 us of CPU per
        // event against 12 with one, at the same rate). One in flight, with large batches,
        // keeps that core free; its cost against a fast Kafka cluster is not measured.
        .set("max.in.flight.requests.per.connection", "1")
        .set("compression.type", &kafka.compression)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "100000")
        // Most of the daemon's memory through Kafka: 16 MB here cost 45-75 MB of peak RSS
        // over 4 MB (messages and their copies in glibc arenas), for the same rate into
        // tansu. 4 MB is four full batches.
        .set("queue.buffering.max.kbytes", "4096")
        .set("message.timeout.ms", "300000");
    kafka.finish(&mut config).create().context("create Kafka producer")
}

/// The producer actor. `confirm` is the source's confirmed LSN.
pub async fn run(
    options: ProducerOptions,
    mut input: Mailbox<Event>,
    confirm: watch::Sender<u64>,
    faults: Faults,
) -> Result<()> {
    let producer = create(&options.kafka)?;
    let state_topic = options.kafka.state_topic();
    ensure_topics(&options.kafka, &[(state_topic.clone(), true)]).await?;
    let mut known_topics: HashSet<String> = HashSet::new();
    let mut schema_headers: HashMap<TableId, (Arc<TableSchema>, Arc<Vec<u8>>)> = HashMap::new();
    let mut queue: VecDeque<Pending> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut state =
        StateRecorder { topic: state_topic, slot: options.slot.clone(), last: None, generation: options.generation };
    let source = SourceInfo { name: &options.kafka.topic_prefix, db: &options.database };
    loop {
        // Acknowledge what is delivered at the front.
        while let Some(Pending::Checkpoint(_)) = queue.front() {
            let Some(Pending::Checkpoint(cp)) = queue.pop_front() else { unreachable!() };
            acknowledge(&producer, &mut state, &cp, &confirm).await?;
        }
        tokio::select! {
            biased;
            delivered = front_delivery(&mut queue), if matches!(queue.front(), Some(Pending::Delivery(_))) => {
                queue.pop_front();
                in_flight -= 1;
                delivered?;
            }
            event = input.recv(), if in_flight < MAX_IN_FLIGHT => {
                let Some(event) = event else { return Ok(()) };
                faults.hit("producer")?;
                match event {
                    Event::Checkpoint(cp) => queue.push_back(Pending::Checkpoint(cp)),
                    // The producer never asks for a rewind (a failed delivery restarts it).
                    Event::Rewound => {}
                    Event::SnapshotBegin { tables, consistent_lsn } => {
                        state.generation = consistent_lsn;
                        // Consumers empty the tables first (a no-op on the first snapshot).
                        for t in &tables {
                            let topic = options.kafka.topic(&t.id);
                            ensure_known(&options.kafka, &mut known_topics, &topic).await?;
                            let header = schema_header(&mut schema_headers, t);
                            let marker = crate::message::Change {
                                op: Op::Truncate,
                                before: None,
                                after: None,
                                position: Position::START,
                                lsn: 0,
                                xid: 0,
                                commit_micros: chrono::Utc::now().timestamp_micros(),
                            };
                            let value = envelope::encode_envelope(t, &marker, &source, "true", now_ms());
                            let headers = headers(&header, marker.position, state.generation).insert(TRUNCATE_HEADER);
                            let every = Every { topic: &topic, partitions: options.kafka.partitions };
                            every.send(&producer, &value, headers, &mut queue, &mut in_flight).await?;
                        }
                    }
                    Event::Data(batch) => {
                        let topic = options.kafka.topic(&batch.table);
                        ensure_known(&options.kafka, &mut known_topics, &topic).await?;
                        let header = schema_header(&mut schema_headers, &batch.schema);
                        let snapshot_kind = |i: usize| if batch.snapshot_last && i + 1 == batch.changes.len() { "last" } else { "true" };
                        for (i, change) in batch.changes.iter().enumerate() {
                            let snapshot = if change.op == Op::Read { snapshot_kind(i) } else { "false" };
                            let value = envelope::encode_envelope(&batch.schema, change, &source, snapshot, now_ms());
                            let key = envelope::encode_key(&batch.schema, change);
                            let headers = headers(&header, change.position, state.generation);
                            if change.op == Op::Truncate {
                                let every = Every { topic: &topic, partitions: options.kafka.partitions };
                                let headers = headers.insert(TRUNCATE_HEADER);
                                every.send(&producer, &value, headers, &mut queue, &mut in_flight).await?;
                                continue;
                            }
                            let mut record = FutureRecord::to(&topic).payload(value.as_str()).headers(headers.clone());
                            if let Some(k) = key.as_deref() {
                                record = record.key(k);
                            }
                            let f = enqueue(&producer, record, &mut queue, &mut in_flight).await?;
                            queue.push_back(Pending::Delivery(f));
                            in_flight += 1;
                            if change.op == Op::Delete && let Some(k) = key.as_deref() {
                                // The tombstone lets log compaction drop the key.
                                let tombstone = FutureRecord::<str, str>::to(&topic).key(k).headers(headers);
                                let f = enqueue(&producer, tombstone, &mut queue, &mut in_flight).await?;
                                queue.push_back(Pending::Delivery(f));
                                in_flight += 1;
                            }
                        }
                        metrics::counter!(m::EVENTS_TOTAL, "stage" => "produced", "table" => batch.table.to_string()).increment(batch.len() as u64);
                    }
                }
            }
        }
    }
}

/// Every partition of a topic, for the messages all of them carry (truncates).
struct Every<'a> {
    topic: &'a str,
    partitions: i32,
}

impl Every<'_> {
    async fn send(
        &self,
        producer: &FutureProducer,
        value: &str,
        headers: OwnedHeaders,
        queue: &mut VecDeque<Pending>,
        in_flight: &mut usize,
    ) -> Result<()> {
        for partition in 0..self.partitions {
            let record =
                FutureRecord::<(), str>::to(self.topic).payload(value).partition(partition).headers(headers.clone());
            let f = enqueue(producer, record, queue, in_flight).await?;
            queue.push_back(Pending::Delivery(f));
            *in_flight += 1;
        }
        Ok(())
    }
}

/// Marks a truncate copied to every partition.
const TRUNCATE_HEADER: Header<'static, &'static [u8]> = Header { key: "sluice.truncate", value: Some(b"1") };

/// The schema header of `schema`, encoded once per schema version.
fn schema_header(
    cache: &mut HashMap<TableId, (Arc<TableSchema>, Arc<Vec<u8>>)>,
    schema: &Arc<TableSchema>,
) -> Arc<Vec<u8>> {
    match cache.get(&schema.id) {
        Some((s, h)) if Arc::ptr_eq(s, schema) => h.clone(),
        _ => {
            let h = Arc::new(envelope::schema_header(schema));
            cache.insert(schema.id.clone(), (schema.clone(), h.clone()));
            h
        }
    }
}

/// sluice's headers of a message: its table's schema, its source position, its generation.
fn headers(schema: &[u8], position: Position, generation: u64) -> OwnedHeaders {
    let position = envelope::position_header(position);
    let generation = generation.to_string();
    OwnedHeaders::new()
        .insert(Header { key: "sluice.schema", value: Some(schema) })
        .insert(Header { key: "sluice.pos", value: Some(position.as_bytes()) })
        .insert(Header { key: "sluice.gen", value: Some(generation.as_bytes()) })
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn ensure_known(kafka: &KafkaOptions, known: &mut HashSet<String>, topic: &str) -> Result<()> {
    if !known.contains(topic) {
        ensure_topics(kafka, &[(topic.to_string(), false)]).await?;
        known.insert(topic.to_string());
    }
    Ok(())
}

async fn front_delivery(queue: &mut VecDeque<Pending>) -> Result<()> {
    let Some(Pending::Delivery(f)) = queue.front_mut() else { return Ok(()) };
    match f.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(Error::Kafka { context: "deliver a message".into(), source: e }),
        Err(_) => Err(Error::Protocol("the Kafka producer dropped a delivery report".into())),
    }
}

/// Enqueues a record; while librdkafka's queue is full, waits for the oldest delivery.
async fn enqueue<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
    queue: &mut VecDeque<Pending>,
    in_flight: &mut usize,
) -> Result<DeliveryFuture>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                match queue.iter().position(|p| matches!(p, Pending::Delivery(_))) {
                    Some(0) => {
                        front_delivery(queue).await?;
                        queue.pop_front();
                        *in_flight -= 1;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            Err((e, _)) => return Err(Error::Kafka { context: "enqueue a message".into(), source: e }),
        }
    }
}

/// Records the source's state in the state topic: at the end of the snapshot, at the first
/// streamed transaction, then whenever the confirmed position moved [`STATE_EVERY_BYTES`].
struct StateRecorder {
    topic: String,
    slot: String,
    last: Option<Position>,
    generation: u64,
}

/// WAL bytes between two state records while streaming.
const STATE_EVERY_BYTES: u64 = 64 * 1024 * 1024;

impl StateRecorder {
    fn due(&self, p: Position) -> bool {
        match self.last {
            _ if p == Position::SNAPSHOT_DONE => true,
            None => p.lsn > 0,
            Some(last) => p.lsn > 0 && (last.lsn == 0 || p.lsn.saturating_sub(last.lsn) >= STATE_EVERY_BYTES),
        }
    }

    async fn record(&mut self, producer: &FutureProducer, p: Position) -> Result<()> {
        let value = serde_json::to_vec(&SourceState { position: p, generation: self.generation })
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let record = FutureRecord::to(&self.topic).key(&self.slot).payload(&value);
        producer.send(record, Duration::from_secs(30)).await.map_err(|(source, _)| Error::Kafka {
            context: format!("record the source state in {}", self.topic),
            source,
        })?;
        self.last = Some(p);
        Ok(())
    }
}

/// A checkpoint whose messages are all delivered: record the state if due, confirm upstream.
async fn acknowledge(
    producer: &FutureProducer,
    state: &mut StateRecorder,
    cp: &Checkpoint,
    confirm: &watch::Sender<u64>,
) -> Result<()> {
    if state.due(cp.position) {
        state.record(producer, cp.position).await?;
    }
    if let Some(lsn) = cp.confirm_lsn {
        confirm.send_if_modified(|c| {
            if lsn > *c {
                *c = lsn;
                true
            } else {
                false
            }
        });
    }
    Ok(())
}
