//! Integration tests against the real local PostgreSQL, MariaDB and Kafka-protocol broker.
//! One test binary (one link step); `support` holds the shared helpers.

#![allow(unreachable_pub)]

mod support;

mod cli;
mod kafka;
mod mapping;
mod pipeline;
mod sinks;
mod source;
mod supervision;
