//! `sluice run`: the long-running daemon.
//!
//! Start-up order: configuration (exit 1 on any problem), logging, metrics recorder, the
//! actix system on a multi-threaded tokio runtime, the supervisor with the pipeline's
//! groups, the HTTP server. A first SIGINT/SIGTERM stops gracefully: the source stops
//! reading, in-flight batches are applied and acknowledged, the confirmed position reaches
//! PostgreSQL, then everything stops and the process exits 0 (after
//! `daemon.shutdown_timeout_secs` at most). A second signal exits at once; nothing is lost
//! either way, since positions only move on acknowledgement.

use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actix::Actor;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sluice_actors::fault::Faults;
use sluice_actors::supervisor::{GroupState, SharedStatus, StopAll, Supervisor};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::http::{self, ApiState, SinkInfo};
use crate::pipeline::{self, SOURCE_GROUP};

/// How long a graceful stop waits for the running sinks when another sink is down.
const BLOCKED_DRAIN: Duration = Duration::from_secs(2);

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests embed several daemons).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A failure of `run` and the exit code it means.
#[derive(Debug)]
pub enum RunError {
    /// Configuration, mapping, address: exit 1.
    User(String),
    /// Exit 2.
    Internal(String),
}

/// Runs the daemon until a signal; returns the exit code.
pub fn run(path: &Path) -> ExitCode {
    let (config, base) = match Config::load_for_command(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    crate::logging::init(&config.daemon);
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("build the tokio runtime");
    let system = actix::System::with_tokio_rt(runtime);
    let outcome = system.block_on(async move {
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let mut term = signal(SignalKind::terminate()).map_err(|e| RunError::Internal(e.to_string()))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| RunError::Internal(e.to_string()))?;
        actix::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if stop_tx.send(()).is_err() {
                    break;
                }
            }
        });
        serve(config, base, Faults::default(), stop_rx, |_| {}).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::User(msg)) => {
            tracing::error!("{msg}");
            eprintln!("{msg}");
            ExitCode::from(1)
        }
        Err(RunError::Internal(msg)) => {
            tracing::error!("internal error: {msg}");
            eprintln!("internal error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// What a running daemon exposes to its embedder (tests).
#[derive(Clone)]
pub struct Running {
    pub status: SharedStatus,
    pub supervisor: actix::Addr<Supervisor>,
    pub addr: std::net::SocketAddr,
}

/// The daemon's body, inside a running actix system. The first message on `stop` stops
/// gracefully, a second one at once. `started` is told where the daemon runs.
pub async fn serve(
    config: Config,
    base: std::path::PathBuf,
    faults: Faults,
    mut stop: mpsc::UnboundedReceiver<()>,
    started: impl FnOnce(Running),
) -> Result<(), RunError> {
    let handle = metrics_handle();
    let status = SharedStatus::default();
    let pipeline =
        pipeline::assemble(&config, &base, faults, status.clone()).map_err(|e| RunError::User(format!("{e:#}")))?;
    let sinks = pipeline.sinks.iter().map(SinkInfo::of).collect();
    let addr = config.daemon.http.parse().map_err(|e| RunError::User(format!("daemon.http: {e}")))?;
    // Listen before starting anything: an address in use is a user error with nothing to undo.
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| RunError::User(format!("daemon.http: cannot listen on {addr}: {e}")))?;
    let supervisor = Supervisor::new(pipeline.groups, status.clone()).start();
    let state = ApiState { status: status.clone(), supervisor: supervisor.clone(), metrics: handle, sinks };
    let server = http::start(listener, state)
        .map_err(|e| RunError::User(format!("daemon.http: cannot listen on {addr}: {e}")))?;
    tracing::info!(http = %addr, sinks = config.sinks.len(), transport = ?config.transport.kind, "sluice is running");
    started(Running { status: status.clone(), supervisor: supervisor.clone(), addr });

    let _ = stop.recv().await;
    tracing::info!("stop requested: draining the pipeline");
    pipeline.stop.send_replace(true);
    let deadline = Instant::now() + Duration::from_secs(config.daemon.shutdown_timeout_secs);
    let drained = pipeline.drained.clone();
    // A sink that is down (failed, paused) never acknowledges: the others get a moment to
    // make what they hold durable, and the source its position, then the daemon stops.
    let mut blocked_since: Option<Instant> = None;
    loop {
        if *drained.borrow() {
            tracing::info!("drained");
            break;
        }
        let (source_down, blocked) = status
            .lock()
            .map(|groups| {
                // Without a source group (a sinks-only daemon) there is nothing to drain upstream.
                let source_down =
                    !groups.iter().any(|g| g.name == SOURCE_GROUP && matches!(g.state, GroupState::Running));
                let blocked: Vec<String> = groups
                    .iter()
                    .filter(|g| g.name != SOURCE_GROUP && !matches!(g.state, GroupState::Running))
                    .map(|g| g.name.clone())
                    .collect();
                (source_down, blocked)
            })
            .unwrap_or((true, Vec::new()));
        if !blocked.is_empty() {
            blocked_since.get_or_insert_with(Instant::now);
        }
        let blocked_out = blocked_since.is_some_and(|t| t.elapsed() >= BLOCKED_DRAIN);
        if source_down || blocked_out || Instant::now() >= deadline {
            tracing::warn!(
                source_down,
                sinks_down = ?blocked,
                "stopping without a complete drain; the next start replays from the confirmed position"
            );
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.recv() => { tracing::warn!("second stop request: exiting now"); break; }
        }
    }
    let _ = supervisor.send(StopAll).await;
    server.stop(true).await;
    tracing::info!("stopped");
    Ok(())
}
