//! Transports between the source and the sinks: in-process ([`direct`]) or through Kafka,
//! with Debezium-compatible [`envelope`]s.

pub mod direct;
pub mod envelope;
pub mod kafka;
