//! `sluice status`: prints pipelines, actors, lag and throughput from a running daemon.

use std::process::ExitCode;
use std::time::Duration;

use crate::http::PipelinesView;

fn fetch(url: &str) -> Result<PipelinesView, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    let mut response =
        agent.get(&format!("{}/api/pipelines", url.trim_end_matches('/'))).call().map_err(|e| format!("{url}: {e}"))?;
    response.body_mut().read_json::<PipelinesView>().map_err(|e| format!("{url}: unexpected answer: {e}"))
}

pub fn run(url: &str) -> ExitCode {
    let first = match fetch(url) {
        Ok(v) => v,
        Err(e) => {
            println!("error: cannot reach the daemon at {e}");
            return ExitCode::from(1);
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    let second = fetch(url).unwrap_or_else(|_| first.clone());
    let state = |v: &serde_json::Value| v.get("state").and_then(|s| s.as_str()).unwrap_or("unknown").to_string();
    println!("ready: {}", if second.ready { "yes" } else { "no" });
    let source_state =
        second.source.get("state").and_then(|s| s.get("state")).and_then(|s| s.as_str()).unwrap_or("unknown");
    let lag = second.source_lag_bytes.map(|b| format!("{b:.0} bytes")).unwrap_or_else(|| "-".into());
    println!("source: {source_state}, lag {lag}");
    println!(
        "{:<16} {:<9} {:<10} {:>8} {:>9} {:>12} {:>10}  actors / last error",
        "PIPELINE", "KIND", "STATE", "RESTARTS", "LAG(s)", "ROWS", "ROWS/s"
    );
    for p in &second.pipelines {
        let before = first.pipelines.iter().find(|q| q.sink == p.sink).map_or(p.rows_total, |q| q.rows_total);
        let detail = p.last_error.clone().unwrap_or_else(|| p.actors.join(", "));
        println!(
            "{:<16} {:<9} {:<10} {:>8} {:>9} {:>12.0} {:>10.0}  {detail}",
            p.sink,
            p.kind,
            state(&p.state),
            p.restarts,
            p.lag_seconds.map(|l| format!("{l:.3}")).unwrap_or_else(|| "-".into()),
            p.rows_total,
            (p.rows_total - before).max(0.0),
        );
    }
    ExitCode::SUCCESS
}
