//! sluice's actors, the messages they exchange and the pure protocol code they call.
//!
//! Data flows one way, acknowledgements flow back the same way, and only
//! acknowledgements move the source position (see DESIGN.md):
//!
//! ```text
//! source (snapshot, wal) ─► transport (direct fan-out | kafka) ─► per sink: mapper ─► writer
//!        ▲                                                                             │
//!        └──────────────────────────── Ack(checkpoint) ◄───────────────────────────────┘
//! ```
//!
//! Pure code (no I/O, unit- and property-tested): [`pgtext`], [`source::pgoutput`],
//! [`schema`], [`value`], the Debezium envelope, the mapping planner and the sinks' SQL.
//! Actors are thin loops around it, supervised by [`supervisor::Supervisor`].

pub mod compare;
pub mod error;
pub mod fault;
pub mod mailbox;
pub mod mapper;
pub mod message;
pub mod metrics;
pub mod pgtext;
pub mod schema;
pub mod sink;
pub mod source;
pub mod supervisor;
pub mod transport;
pub mod value;
