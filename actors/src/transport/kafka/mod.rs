//! The Kafka transport: a producer actor on the source side, a consumer actor per sink.
//!
//! ```text
//!   source ─Event─► producer ──<prefix>.<schema>.<table>──► consumer (group <group>-<sink>) ─► mapper ─► writer
//!      ▲              │ delivery reports                        ▲ seeks to the sink's offsets      │
//!      └── confirm ◄──┘ (all messages before a checkpoint)      └──────── commit after the sink ◄──┘
//! ```
//!
//! Messages: key = JSON of the primary key, value = the Debezium envelope (tombstone after
//! each delete), headers `sluice.schema` (the table's schema) and `sluice.pos` (the
//! change's source position). The source's own state (whether its snapshot completed)
//! lives in the compacted topic `<prefix>.__sluice_source`, keyed by slot.

pub mod consumer;
pub mod producer;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;

use crate::error::{Context, Error, Result};
use crate::message::Position;
use crate::schema::TableId;

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    pub brokers: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub compression: String,
    /// Extra librdkafka settings, applied last.
    pub extra: std::collections::BTreeMap<String, String>,
}

impl KafkaOptions {
    /// `<prefix>.<schema>.<table>`.
    pub fn topic(&self, table: &TableId) -> String {
        format!("{}.{}.{}", self.topic_prefix, table.schema, table.name)
    }

    /// The compacted topic holding the source's state.
    pub fn state_topic(&self) -> String {
        format!("{}.__sluice_source", self.topic_prefix)
    }

    /// The dead-letter topic of a sink.
    pub fn dead_letter_topic(&self, sink: &str) -> String {
        format!("{}.__sluice_dead_letter.{sink}", self.topic_prefix)
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "sluice")
            .set("socket.keepalive.enable", "true")
            // librdkafka batches by itself; Nagle only adds delayed-ACK stalls (~40 ms).
            .set("socket.nagle.disable", "true");
        c
    }

    /// Applies the user's extra settings; call right before creating a client, so they
    /// override sluice's own.
    pub fn finish<'a>(&self, c: &'a mut ClientConfig) -> &'a mut ClientConfig {
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

/// Creates the topics that are missing (the broker may not auto-create them).
pub async fn ensure_topics(options: &KafkaOptions, topics: &[(String, bool)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        options.finish(&mut options.client_config()).create().context("create Kafka admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, compacted)| {
            let t = NewTopic::new(
                name,
                if *compacted { 1 } else { options.partitions },
                TopicReplication::Fixed(options.replication_factor),
            );
            if *compacted { t.set("cleanup.policy", "compact") } else { t }
        })
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .context("create Kafka topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Kafka {
                    context: format!("create topic {topic}"),
                    source: rdkafka::error::KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// Creates a producer and a consumer with the settings the daemon gives them (the user's
/// `[transport.options]` included) and asks the brokers for metadata; returns how many
/// brokers answered. A setting librdkafka refuses fails here as it would at start
/// ([`Error::is_kafka_config`]).
pub async fn check_brokers(options: &KafkaOptions, timeout: Duration) -> Result<usize> {
    let options = options.clone();
    tokio::task::spawn_blocking(move || {
        // Created only for librdkafka to check its settings.
        drop(producer::create(&options)?);
        let consumer: BaseConsumer =
            consumer::client_config(&options, "sluice-check", None).create().context("create Kafka consumer")?;
        let metadata = consumer.fetch_metadata(None, timeout).context("fetch Kafka metadata")?;
        Ok(metadata.brokers().len())
    })
    .await
    .map_err(|e| Error::Panicked(e.to_string()))?
}

/// The source state stored in the state topic for `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceState {
    /// The newest position the broker holds durably.
    pub position: Position,
    /// The generation of the topics' contents: the consistent LSN of the newest snapshot.
    #[serde(default)]
    pub generation: u64,
}

/// Reads the newest state of `slot` (the whole compacted topic, which is small).
pub async fn read_source_state(options: &KafkaOptions, slot: &str) -> Result<Option<SourceState>> {
    ensure_topics(options, &[(options.state_topic(), true)]).await?;
    let (options, slot) = (options.clone(), slot.to_string());
    tokio::task::spawn_blocking(move || {
        let topic = options.state_topic();
        // The reader assigns the partition itself; the group is never joined.
        let mut config = options.client_config();
        config.set("enable.auto.commit", "false").set("group.id", format!("{}-state-reader", options.topic_prefix));
        let consumer: BaseConsumer = options.finish(&mut config).create().context("create Kafka state reader")?;
        let (low, high) =
            consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10)).context(format!("read {topic}"))?;
        if high <= low {
            return Ok(None);
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(low)).context("assign state topic")?;
        consumer.assign(&tpl).context("assign state topic")?;
        let mut state = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut next = low;
        while next < high {
            if std::time::Instant::now() > deadline {
                return Err(Error::Protocol(format!("reading {topic} timed out at offset {next} of {high}")));
            }
            let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
            let m = m.context(format!("read {topic}"))?;
            next = m.offset() + 1;
            if m.key() == Some(slot.as_bytes())
                && let Some(payload) = m.payload()
            {
                state = serde_json::from_slice::<SourceState>(payload).ok();
            }
        }
        Ok(state)
    })
    .await
    .map_err(|e| Error::Panicked(e.to_string()))?
}
