//! Errors of the actors, and the one place that decides what to do with each kind.
//!
//! [`Error::disposition`] turns any error into [`Disposition::Retry`] (restart the actor
//! with backoff; the supervisor's intensity limit makes a retry that never succeeds fatal),
//! [`Disposition::DeadLetter`] (the data of one change is at fault: set it aside and go on)
//! or [`Disposition::Fatal`] (configuration, permissions, mapping: stop with one message).
//! PostgreSQL errors are classified by SQLSTATE class, MySQL errors by error code.

use std::fmt;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Retry,
    DeadLetter,
    Fatal,
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Disposition::Retry => "transient",
            Disposition::DeadLetter => "rejected row",
            Disposition::Fatal => "fatal",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-facing problem that no retry fixes (bad table, missing privilege, bad mapping).
    #[error("{0}")]
    Fatal(String),
    #[error("{context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{context}: {source}")]
    Replication {
        context: String,
        #[source]
        source: pgwire_replication::PgWireError,
    },
    #[error("{context}: {source}")]
    Mysql {
        context: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("{context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("{context}: {source}")]
    ObjectStore {
        context: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{context}: {source}")]
    DataFusion {
        context: String,
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    /// Malformed data from a peer (pgoutput, a Kafka envelope).
    #[error("{0}")]
    Protocol(String),
    /// A value one sink cannot hold, or a row it cannot decode.
    #[error("{0}")]
    Rejected(String),
    /// A mailbox's receiver went away: its actor stopped.
    #[error(transparent)]
    Closed(#[from] crate::mailbox::Closed),
    /// The actor was told to stop.
    #[error("stopped")]
    Stopped,
    /// The group must start over (for example to copy the tables again); not a data error.
    #[error("{0}")]
    Restart(String),
    /// The actor panicked: a failure like any other, restarted with backoff.
    #[error("panicked: {0}")]
    Panicked(String),
    /// Injected by a test's fault injection.
    #[error("injected failure: {0}")]
    Injected(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a context string to foreign errors (`.context("connect to sink")?`).
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
}

macro_rules! context_impl {
    ($err:ty, $variant:ident) => {
        impl<T> Context<T> for std::result::Result<T, $err> {
            fn context(self, context: impl Into<String>) -> Result<T> {
                self.map_err(|source| Error::$variant { context: context.into(), source })
            }
        }
    };
}

context_impl!(tokio_postgres::Error, Postgres);
context_impl!(pgwire_replication::PgWireError, Replication);
context_impl!(mysql_async::Error, Mysql);
context_impl!(rdkafka::error::KafkaError, Kafka);
context_impl!(object_store::Error, ObjectStore);
context_impl!(std::io::Error, Io);
context_impl!(arrow::error::ArrowError, Arrow);
context_impl!(parquet::errors::ParquetError, Parquet);

impl<T> Context<T> for std::result::Result<T, datafusion::error::DataFusionError> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::DataFusion { context: context.into(), source: Box::new(source) })
    }
}

/// Disposition of a PostgreSQL SQLSTATE.
pub fn sqlstate_disposition(code: &str) -> Disposition {
    match code.get(..2).unwrap_or("") {
        // Data exceptions and integrity violations belong to one row.
        "22" | "23" => Disposition::DeadLetter,
        // Syntax/access, invalid catalog (database), schema, authorization, feature.
        "42" | "3D" | "3F" | "28" | "0A" => Disposition::Fatal,
        // Connection, rollback (deadlock, serialization), resources, operator, system.
        _ => Disposition::Retry,
    }
}

/// Disposition of a MySQL server error code.
pub fn mysql_code_disposition(code: u16) -> Disposition {
    match code {
        // Bad value, out of range, too long, NULL into NOT NULL, foreign key, duplicate.
        1048 | 1062 | 1264 | 1265 | 1292 | 1366 | 1367 | 1406 | 1416 | 1451 | 1452 | 1690 | 3140 | 4025 => {
            Disposition::DeadLetter
        }
        // Access denied, unknown database/table/column, syntax.
        1044 | 1045 | 1049 | 1054 | 1064 | 1142 | 1146 | 1227 => Disposition::Fatal,
        // Deadlock, lock wait timeout, connection errors, server shutdown...
        _ => Disposition::Retry,
    }
}

/// The SQLSTATE in a replication error's text ("... (SQLSTATE 42704)").
pub fn sqlstate_in_text(text: &str) -> Option<&str> {
    let at = text.find("SQLSTATE ")? + "SQLSTATE ".len();
    text.get(at..at + 5)
}

impl Error {
    /// librdkafka refused to create a client from its settings (an unknown or bad
    /// `[transport.options]` setting, or one that contradicts sluice's own).
    pub fn is_kafka_config(&self) -> bool {
        use rdkafka::error::KafkaError;
        matches!(self, Error::Kafka { source: KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..), .. })
    }

    /// What to do about this error (see the module docs).
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Fatal(_) => Disposition::Fatal,
            Error::Postgres { source, .. } => match source.code() {
                Some(code) => sqlstate_disposition(code.code()),
                None => Disposition::Retry,
            },
            Error::Replication { source, .. } => {
                if source.is_auth() {
                    return Disposition::Fatal;
                }
                match sqlstate_in_text(&source.to_string()) {
                    Some(code) => sqlstate_disposition(code),
                    None => Disposition::Retry,
                }
            }
            Error::Mysql { source, .. } => match source {
                mysql_async::Error::Server(server) => mysql_code_disposition(server.code),
                _ => Disposition::Retry,
            },
            Error::Rejected(_) => Disposition::DeadLetter,
            Error::Arrow { .. } => Disposition::DeadLetter,
            Error::DataFusion { .. } => Disposition::DeadLetter,
            Error::Protocol(_) => Disposition::Fatal,
            // librdkafka refuses its configuration (a bad `[transport.options]` setting):
            // no retry builds the client.
            Error::Kafka { .. } if self.is_kafka_config() => Disposition::Fatal,
            Error::Kafka { .. }
            | Error::ObjectStore { .. }
            | Error::Io { .. }
            | Error::Parquet { .. }
            | Error::Closed(_)
            | Error::Stopped
            | Error::Panicked(_)
            | Error::Restart(_)
            | Error::Injected(_) => Disposition::Retry,
        }
    }

    /// A failure that only follows another actor's: its mailbox partner stopped first.
    pub fn is_consequence(&self) -> bool {
        matches!(self, Error::Closed(_))
    }

    /// The PostgreSQL SQLSTATE, if this is a PostgreSQL server error.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Error::Postgres { source, .. } => source.code().map(|c| c.code().to_string()),
            Error::Replication { source, .. } => sqlstate_in_text(&source.to_string()).map(str::to_string),
            _ => None,
        }
    }

    /// The full message: this error and its sources, joined by ": ", once each.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let text = s.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = s.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_client_librdkafka_refuses_is_fatal() {
        // A contradiction (client creation) and an unknown property (configuration).
        for (key, value) in [("fetch.max.bytes", "262144"), ("no.such.property", "1")] {
            let refused = rdkafka::ClientConfig::new()
                .set(key, value)
                .create::<rdkafka::consumer::BaseConsumer>()
                .err()
                .unwrap_or_else(|| panic!("{key} = {value} is refused"));
            let error = Error::Kafka { context: "create Kafka consumer".into(), source: refused };
            assert_eq!(error.disposition(), Disposition::Fatal, "{key}");
        }
    }

    #[test]
    fn sqlstates_classify_by_class() {
        assert_eq!(sqlstate_disposition("23505"), Disposition::DeadLetter);
        assert_eq!(sqlstate_disposition("22003"), Disposition::DeadLetter);
        assert_eq!(sqlstate_disposition("42P01"), Disposition::Fatal);
        assert_eq!(sqlstate_disposition("3D000"), Disposition::Fatal);
        assert_eq!(sqlstate_disposition("28P01"), Disposition::Fatal);
        assert_eq!(sqlstate_disposition("40001"), Disposition::Retry);
        assert_eq!(sqlstate_disposition("40P01"), Disposition::Retry);
        assert_eq!(sqlstate_disposition("08006"), Disposition::Retry);
        assert_eq!(sqlstate_disposition("55006"), Disposition::Retry);
    }

    #[test]
    fn mysql_codes_classify() {
        assert_eq!(mysql_code_disposition(1264), Disposition::DeadLetter);
        assert_eq!(mysql_code_disposition(1146), Disposition::Fatal);
        assert_eq!(mysql_code_disposition(1213), Disposition::Retry);
    }

    #[test]
    fn replication_errors_carry_sqlstate_in_text() {
        assert_eq!(sqlstate_in_text("server error: slot \"x\" does not exist (SQLSTATE 42704)"), Some("42704"));
        assert_eq!(sqlstate_in_text("io error"), None);
        let e = Error::Replication {
            context: "start replication".into(),
            source: pgwire_replication::PgWireError::Server(
                "replication slot \"s\" does not exist (SQLSTATE 42704)".into(),
            ),
        };
        assert_eq!(e.disposition(), Disposition::Fatal);
        assert_eq!(e.sqlstate().as_deref(), Some("42704"));
    }
}
