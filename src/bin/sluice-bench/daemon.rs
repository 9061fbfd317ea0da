//! The `sluice` daemon under measurement: a child process with its own configuration,
//! its HTTP API on a loopback port, and its peak RSS read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::wait_for;

pub struct Daemon {
    child: Child,
    port: u16,
    pub log: PathBuf,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

impl Daemon {
    /// Starts `sluice run --config <config>` and waits for its HTTP API.
    pub async fn start(bin: &Path, config: &Path, port: u16) -> anyhow::Result<Daemon> {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let daemon = Daemon { child, port, log };
        let what = format!("sluice's HTTP API on port {port} (log: {})", daemon.log.display());
        wait_for(&what, Duration::from_secs(30), Duration::from_millis(50), || async {
            Ok(daemon.get("/health").is_ok())
        })
        .await?;
        Ok(daemon)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut r = tokio::task::block_in_place(|| agent().get(&url).call()).with_context(|| format!("GET {url}"))?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()))
    }

    pub fn post(&self, path: &str) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut r =
            tokio::task::block_in_place(|| agent().post(&url).send_empty()).with_context(|| format!("POST {url}"))?;
        if r.status().as_u16() != 200 {
            bail!("POST {url}: {} {}", r.status(), r.body_mut().read_to_string().unwrap_or_default());
        }
        Ok(())
    }

    /// The sum of a metric's series, restricted to one label value.
    pub fn metric(&self, name: &str, label: Option<(&str, &str)>) -> anyhow::Result<f64> {
        let (_, text) = self.get("/metrics")?;
        Ok(sluice::http::metric_value(&text, name, label).unwrap_or(0.0))
    }

    /// Rows a sink made durable (databases: written in the open transaction).
    pub fn rows(&self, sink: &str) -> anyhow::Result<f64> {
        self.metric("sluice_sink_rows_total", Some(("sink", sink)))
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("every pipeline streaming (/ready)", timeout, Duration::from_millis(100), || async {
            Ok(self.get("/ready")?.0 == 200)
        })
        .await
    }

    /// Peak resident set size so far, in MB (`VmHWM`).
    pub fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// SIGTERM, then waits for the exit (a graceful stop drains first).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().context("kill -TERM")?;
        for _ in 0..600 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        bail!("sluice did not stop within 30 s (log: {})", self.log.display())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
