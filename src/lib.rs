//! sluice: change-data-capture from PostgreSQL to PostgreSQL, MySQL and Parquet.
//!
//! This crate is the binary's body: configuration, pipeline assembly, the HTTP interface,
//! the daemon's lifecycle and the other commands. The actors live in `sluice-actors`.

pub mod allocator;
pub mod check;
pub mod config;
pub mod daemon;
pub mod http;
pub mod logging;
pub mod pipeline;
pub mod status;
pub mod validate;
