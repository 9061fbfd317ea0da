//! Logging with `tracing`: human-readable by default, JSON by `daemon.log_format`.
//! `RUST_LOG` overrides `daemon.log_level`. Logs carry structured fields, never row values
//! or secrets.

use tracing_subscriber::EnvFilter;

use crate::config::{DaemonConfig, LogFormat};

pub fn init(daemon: &DaemonConfig) {
    // The drivers' NOTICEs ("already exists, skipping") are not news.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},tokio_postgres=warn,actix_server=warn", daemon.log_level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match daemon.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A panic is an internal error: one line in the log, no backtrace for the user.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        tracing::error!("internal error (panic): {message}{location}");
    }));
}
