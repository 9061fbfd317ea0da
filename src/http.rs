//! The HTTP interface: `/health`, `/ready`, `/metrics`, `/api/pipelines`.
//!
//! `/health` answers 200 while the process runs; `/ready` answers 200 only while every
//! group streams (paused sinks count as intended), 503 with the states otherwise. The API
//! reads the supervisor's shared status and sends it commands; it never blocks the data
//! path. Bound to loopback by default (`daemon.http`).

use actix::Addr;
use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use sluice_actors::supervisor::{Command, GroupState, GroupStatus, SharedStatus, Supervisor};

use crate::pipeline::{SOURCE_GROUP, SinkPlan};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub status: SharedStatus,
    pub supervisor: Addr<Supervisor>,
    pub metrics: PrometheusHandle,
    pub sinks: Vec<SinkInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkInfo {
    pub name: String,
    pub kind: String,
    pub endpoint: String,
}

impl SinkInfo {
    pub fn of(plan: &SinkPlan) -> Self {
        Self {
            name: plan.name.clone(),
            kind: format!("{:?}", plan.kind).to_lowercase(),
            endpoint: plan.endpoint.clone(),
        }
    }
}

/// One pipeline (sink) in `/api/pipelines`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PipelineView {
    pub sink: String,
    pub kind: String,
    pub endpoint: String,
    pub state: serde_json::Value,
    pub restarts: u64,
    pub last_error: Option<String>,
    pub actors: Vec<String>,
    pub lag_seconds: Option<f64>,
    pub rows_total: f64,
}

/// `/api/pipelines`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PipelinesView {
    pub ready: bool,
    pub source: serde_json::Value,
    pub source_lag_bytes: Option<f64>,
    pub pipelines: Vec<PipelineView>,
}

fn ready(groups: &[GroupStatus]) -> bool {
    !groups.is_empty() && groups.iter().all(|g| matches!(g.state, GroupState::Running | GroupState::Paused))
}

/// Reads one metric's value with the given label from Prometheus text.
pub fn metric_value(text: &str, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

fn view(state: &ApiState) -> PipelinesView {
    let groups = state.status.lock().map(|g| g.clone()).unwrap_or_default();
    let text = state.metrics.render();
    let source = groups.iter().find(|g| g.name == SOURCE_GROUP);
    let pipelines = state
        .sinks
        .iter()
        .map(|s| {
            let g = groups.iter().find(|g| g.name == s.name);
            PipelineView {
                sink: s.name.clone(),
                kind: s.kind.clone(),
                endpoint: s.endpoint.clone(),
                state: g.map(|g| serde_json::to_value(&g.state).unwrap_or_default()).unwrap_or_default(),
                restarts: g.map_or(0, |g| g.restarts),
                last_error: g.and_then(|g| g.last_error.clone()),
                actors: g.map(|g| g.actors.iter().map(|a| a.name.clone()).collect()).unwrap_or_default(),
                lag_seconds: metric_value(&text, "sluice_replication_lag_seconds", Some(("sink", &s.name))),
                rows_total: metric_value(&text, "sluice_sink_rows_total", Some(("sink", &s.name))).unwrap_or(0.0),
            }
        })
        .collect();
    PipelinesView {
        ready: ready(&groups),
        source: source.map(|g| serde_json::to_value(g).unwrap_or_default()).unwrap_or_default(),
        source_lag_bytes: metric_value(&text, "sluice_source_lag_bytes", None),
        pipelines,
    }
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn ready_handler(state: web::Data<ApiState>) -> HttpResponse {
    let groups = state.status.lock().map(|g| g.clone()).unwrap_or_default();
    let body = serde_json::json!({ "ready": ready(&groups), "groups": groups });
    if ready(&groups) { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}

async fn metrics_handler(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

async fn pipelines(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(view(&state))
}

async fn command(state: web::Data<ApiState>, path: web::Path<(String, String)>) -> HttpResponse {
    let (sink, action) = path.into_inner();
    if !state.sinks.iter().any(|s| s.name == sink) && sink != SOURCE_GROUP {
        return HttpResponse::NotFound().json(serde_json::json!({ "error": format!("no pipeline named {sink:?}") }));
    }
    let cmd = match action.as_str() {
        "pause" => Command::Pause(sink.clone()),
        "resume" => Command::Resume(sink.clone()),
        "restart" => Command::Restart(sink.clone()),
        other => {
            return HttpResponse::NotFound().json(
                serde_json::json!({ "error": format!("unknown action {other:?}; use pause, resume or restart") }),
            );
        }
    };
    match state.supervisor.send(cmd).await {
        Ok(Ok(())) => HttpResponse::Ok().json(serde_json::json!({ "sink": sink, "action": action, "ok": true })),
        Ok(Err(e)) => HttpResponse::BadRequest().json(serde_json::json!({ "error": e })),
        Err(e) => HttpResponse::InternalServerError().json(serde_json::json!({ "error": e.to_string() })),
    }
}

/// Starts the server on `listener` in the current actix system.
pub fn start(listener: std::net::TcpListener, state: ApiState) -> std::io::Result<ServerHandle> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .route("/health", web::get().to(health))
            .route("/ready", web::get().to(ready_handler))
            .route("/metrics", web::get().to(metrics_handler))
            .route("/api/pipelines", web::get().to(pipelines))
            .route("/api/pipelines/{sink}/{action}", web::post().to(command))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(error = %error, "http server stopped");
        }
    });
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_parse_from_text() {
        let text = "# TYPE x counter\nsluice_sink_rows_total{sink=\"a\",op=\"upsert\"} 5\nsluice_sink_rows_total{sink=\"a\",op=\"delete\"} 2\n\
                    sluice_sink_rows_total{sink=\"b\",op=\"upsert\"} 7\nsluice_source_lag_bytes 42\n";
        assert_eq!(metric_value(text, "sluice_sink_rows_total", Some(("sink", "a"))), Some(7.0));
        assert_eq!(metric_value(text, "sluice_source_lag_bytes", None), Some(42.0));
        assert_eq!(metric_value(text, "sluice_nope", None), None);
    }
}
