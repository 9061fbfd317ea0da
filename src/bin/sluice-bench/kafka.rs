//! The Kafka transport alone (`--kafka-only`): the producer and the consumer actors on
//! the local Kafka-protocol broker, in this process, without a database.
//!
//! 1. producer: `--rows` generated `users` changes (about 1 KB each, see [`Generator`]),
//!    in transactions of `--txn-rows`, through the producer actor: events/s until the
//!    last transaction is acknowledged (delivered with `acks=all`);
//! 2. consumer: the same topic read back by the consumer actor into a discarding end
//!    (decoded into typed changes, then dropped): events/s until the last change.
//!
//! The topic prefix is fresh on each run, so nothing of an earlier run is read.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sluice_actors::fault::Faults;
use sluice_actors::mailbox::mailbox;
use sluice_actors::message::{Event, Position};
use sluice_actors::transport::kafka::KafkaOptions;
use sluice_actors::transport::kafka::consumer::{self, ConsumerOptions};
use sluice_actors::transport::kafka::producer::{self, ProducerOptions};
use tokio::sync::watch;

use crate::scenario::Bench;
use crate::sinks::Generator;

#[derive(Debug, Serialize)]
pub struct KafkaFigures {
    pub produced_events_per_s: f64,
    pub consumed_events_per_s: f64,
    /// Where this process spent CPU per event (microseconds), by thread kind: `tokio`
    /// (sluice's actors: encoding, decoding) and `librdkafka` (its broker threads).
    pub produce_cpu_us_per_event: std::collections::BTreeMap<String, f64>,
    pub consume_cpu_us_per_event: std::collections::BTreeMap<String, f64>,
    /// Peak RSS of the benchmark process (MB).
    pub peak_rss_mb: f64,
}

pub async fn measure(bench: &Bench) -> anyhow::Result<KafkaFigures> {
    let (rows, txn_rows) = (bench.args.rows, bench.args.txn_rows);
    let prefix = format!("benchk{}", chrono::Utc::now().timestamp_millis());
    let kafka = KafkaOptions {
        brokers: bench.args.kafka.clone(),
        topic_prefix: prefix.clone(),
        // The daemon's defaults.
        partitions: 3,
        replication_factor: 1,
        compression: "lz4".into(),
        extra: bench.args.kafka_option.iter().cloned().collect(),
    };

    // 1. Produce.
    let (to_producer, input) = mailbox::<Event>("producer", "bench->producer", 4096);
    let (confirm_tx, mut confirm) = watch::channel(0u64);
    let options =
        ProducerOptions { kafka: kafka.clone(), database: "bench".into(), slot: prefix.clone(), generation: 0 };
    let task = tokio::spawn(producer::run(options, input, confirm_tx, Faults::default()));
    let mut generator = Generator::new();
    let table = generator.table().clone();
    let cpu = thread_cpu();
    let started = Instant::now();
    let (events, last) = generator.feed(&to_producer, rows, txn_rows).await?;
    let last = last.confirm_lsn.unwrap_or_default();
    let done = tokio::time::timeout(Duration::from_secs(1800), confirm.wait_for(|c| *c >= last)).await;
    anyhow::ensure!(matches!(done, Ok(Ok(_))), "the broker did not acknowledge the last transaction in time");
    let produced = events as f64 / started.elapsed().as_secs_f64();
    let produce_cpu = per_event(cpu, thread_cpu(), events);
    eprintln!(
        "[bench] Kafka producer: {produced:.0} events/s ({events} changes acknowledged by the broker); \
         CPU per event in this process: {produce_cpu:?} us"
    );
    drop(to_producer);
    task.await.context("the producer")??;

    // 2. Consume into a discarding end.
    let (out, mut input) = mailbox::<Event>("discard", "consumer->discard", 4096);
    let (_commits_tx, commits) = tokio::sync::mpsc::unbounded_channel();
    let options = ConsumerOptions {
        kafka,
        group: prefix,
        instance: None,
        sink: "discard".into(),
        tables: vec![table],
        batch_rows: 1000,
        source: None,
    };
    let no_offsets: consumer::OffsetsReader = Box::new(|| Box::pin(async { Ok(Vec::new()) }));
    let cpu = thread_cpu();
    let started = Instant::now();
    let task = tokio::spawn(consumer::run(options, out, no_offsets, commits, Faults::default()));
    let mut seen = 0u64;
    let counted = tokio::time::timeout(Duration::from_secs(1800), async {
        while seen < events {
            match input.recv().await {
                Some(Event::Data(batch)) => {
                    seen += batch.changes.iter().filter(|c| c.position > Position::START).count() as u64
                }
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    anyhow::ensure!(counted.is_ok() && seen >= events, "the consumer read {seen} of {events} changes in time");
    let consumed = events as f64 / started.elapsed().as_secs_f64();
    let consume_cpu = per_event(cpu, thread_cpu(), events);
    eprintln!(
        "[bench] Kafka consumer: {consumed:.0} events/s (decoded into typed changes and dropped); \
         CPU per event in this process: {consume_cpu:?} us"
    );
    task.abort();
    Ok(KafkaFigures {
        produced_events_per_s: produced,
        consumed_events_per_s: consumed,
        produce_cpu_us_per_event: produce_cpu,
        consume_cpu_us_per_event: consume_cpu,
        peak_rss_mb: crate::source::own_peak_rss_mb(),
    })
}

/// CPU time (user + system, in clock ticks) of this process's threads, by kind.
fn thread_cpu() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // "pid (comm) state ... utime stime ...": fields after the closing parenthesis.
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        let comm = head.split_once(" (").map_or("", |(_, c)| c);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let kind = if comm.starts_with("rdk:") {
            "librdkafka"
        } else if comm.starts_with("tokio") {
            "tokio"
        } else {
            "other"
        };
        *out.entry(kind.to_string()).or_default() += ticks(11) + ticks(12);
    }
    out
}

/// Microseconds of CPU per event between two [`thread_cpu`] readings (threads that ended
/// in between are not counted).
fn per_event(
    before: std::collections::BTreeMap<String, u64>,
    after: std::collections::BTreeMap<String, u64>,
    events: u64,
) -> std::collections::BTreeMap<String, f64> {
    const TICKS_PER_S: f64 = 100.0; // USER_HZ on Linux
    after
        .into_iter()
        .map(|(kind, t)| {
            let spent = t.saturating_sub(before.get(&kind).copied().unwrap_or(0)) as f64 / TICKS_PER_S;
            (kind, (spent * 1e6 / events.max(1) as f64 * 10.0).round() / 10.0)
        })
        .collect()
}
