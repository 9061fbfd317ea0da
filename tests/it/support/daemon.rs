//! Daemons for tests: in process (with fault injection, via `sluice::daemon::serve`) or
//! the real binary (for signals, kill -9 and exit codes).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use sluice::config::Config;
use sluice::daemon::{RunError, Running, serve};
use sluice_actors::fault::Faults;
use sluice_actors::supervisor::{GroupState, GroupStatus};
use tokio::sync::mpsc;

use super::{TempDir, free_port};

/// Test logs: `RUST_LOG=info cargo nextest run ...` shows them for failing tests.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A daemon running in this process, on a thread with its own actix system.
pub struct InProcess {
    pub running: Running,
    stop: mpsc::UnboundedSender<()>,
    thread: Option<std::thread::JoinHandle<Result<(), RunError>>>,
    pub dir: TempDir,
}

impl InProcess {
    /// Starts a daemon from TOML (its `[daemon] http` is set to a free port).
    pub fn start(toml: &str, faults: Faults) -> InProcess {
        init_logging();
        let dir = TempDir::new("daemon");
        let toml = format!("{}\n{toml}", daemon_section(&dir));
        let path = dir.write("sluice.toml", &toml);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let base = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let thread = std::thread::spawn(move || {
            let runtime =
                || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            actix::System::with_tokio_rt(runtime).block_on(serve(config, base, faults, stop_rx, move |r| {
                let _ = tx.send(r);
            }))
        });
        let running = rx.recv_timeout(Duration::from_secs(30)).expect("daemon did not start");
        InProcess { running, stop: stop_tx, thread: Some(thread), dir }
    }

    pub fn groups(&self) -> Vec<GroupStatus> {
        self.running.status.lock().expect("status").clone()
    }

    pub fn group(&self, name: &str) -> GroupStatus {
        self.groups().into_iter().find(|g| g.name == name).unwrap_or_else(|| panic!("no group {name}"))
    }

    /// Waits until the group's state satisfies `pred`.
    pub async fn wait_state(&self, name: &str, timeout: Duration, pred: impl Fn(&GroupState) -> bool) -> GroupStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let g = self.group(name);
            if pred(&g.state) {
                return g;
            }
            if Instant::now() > deadline {
                panic!("group {name} still {:?} after {timeout:?}: {g:?}", g.state);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the group restarted at least `n` times.
    pub async fn wait_restarts(&self, name: &str, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.group(name).restarts < n {
            assert!(Instant::now() < deadline, "group {name} restarted fewer than {n} times: {:?}", self.group(name));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.running.addr.port(), path)
    }

    /// Graceful stop; returns how the daemon ended.
    pub fn stop(mut self) -> Result<(), RunError> {
        let _ = self.stop.send(());
        self.thread.take().expect("running").join().expect("daemon thread panicked")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.send(());
            let _ = self.stop.send(());
            let _ = t.join();
        }
    }
}

fn daemon_section(dir: &TempDir) -> String {
    format!(
        "[daemon]\nhttp = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\nshutdown_timeout_secs = 20\n",
        free_port(),
        dir.path().join("state").display()
    )
}

/// GET on the loopback port; `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(&format!("http://127.0.0.1:{port}{path}")).call().ok()?;
    let status = r.status().as_u16();
    Some((status, r.body_mut().read_to_string().unwrap_or_default()))
}

pub fn http_post(port: u16, path: &str) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.post(&format!("http://127.0.0.1:{port}{path}")).send_empty().ok()?;
    let status = r.status().as_u16();
    Some((status, r.body_mut().read_to_string().unwrap_or_default()))
}

/// The `sluice` binary as a child process.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    pub config: PathBuf,
    pub dir: TempDir,
}

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// Runs `sluice <args>` to completion: (exit code, stdout + stderr).
pub fn sluice(args: &[&str]) -> (i32, String) {
    let out = Command::new(sluice_bin()).args(args).env_remove("RUST_BACKTRACE").output().expect("run sluice");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

impl Daemon {
    pub fn start(toml: &str) -> Daemon {
        let dir = TempDir::new("bin");
        let port = free_port();
        let toml = format!("[daemon]\nhttp = \"127.0.0.1:{port}\"\nshutdown_timeout_secs = 20\n{toml}");
        let config = dir.write("sluice.toml", &toml);
        Self::start_config(dir, config, port)
    }

    /// Starts again on the same configuration (after a stop or a kill).
    pub fn restart(mut self) -> Daemon {
        let _ = self.child.take().map(|mut c| c.kill());
        let dir = std::mem::replace(&mut self.dir, TempDir::new("unused"));
        Self::start_config(dir, self.config.clone(), self.port)
    }

    fn start_config(dir: TempDir, config: PathBuf, port: u16) -> Daemon {
        let log = dir.path().join(format!("sluice-{}.log", free_port()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(sluice_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn sluice");
        Daemon { child: Some(child), port, log, config, dir }
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_http(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.get("/health").is_none() {
            assert!(Instant::now() < deadline, "daemon did not answer /health:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a signal (`-TERM`, `-INT`, ...).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill");
    }

    /// SIGTERM, then waits for the exit.
    pub fn term(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("-TERM");
        self.wait_exit(timeout)
    }

    /// SIGKILL: no chance to drain.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        let _ = self.wait_exit(Duration::from_secs(10));
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not exit within {timeout:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
