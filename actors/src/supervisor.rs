//! The supervisor: owns every actor, restarts failed ones with backoff, escalates.
//!
//! Actors are grouped: a [`Group`] is a set of actors that share mailboxes and therefore
//! live and die together (a sink's mapper and writer; the source and its fan-out). When
//! any member fails, by error or by panic, every member is stopped and the group is started
//! again from its factory after an exponential backoff with jitter. Each group has a
//! restart policy and an intensity limit: more than `max_restarts` restarts within
//! `within` escalate the failure, the group stops for good and reports the cause.
//!
//! Actors run as tokio tasks on the multi-threaded runtime (so the source and the sinks use
//! both cores), except those given an [`ActorThread`]: a sink writer waits on its
//! database for every unit, and a reply that lands while both workers decode WAL or map
//! rows would wait for one of them; on a thread of its own the writer is woken by the OS
//! at once. Writers share [`WriterThreads`], at most one per two cores. The supervisor
//! itself is an actix actor on the system arbiter and learns about exits through
//! messages. A restarted group resumes from the last acknowledged position: factories
//! rebuild state from durable positions, never from memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::BoxFuture;
use rand::RngExt;

use crate::error::{Context as _, Disposition, Error, Result};
use crate::metrics as m;

/// How long a failure that follows another (a closed mailbox) waits for the cause.
const CAUSE_GRACE: Duration = Duration::from_millis(250);

/// How long a stopped [`ActorThread`] lets the tasks of its aborted actor wind down.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// When a group is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After any exit, also a clean one.
    Always,
    /// After a failure only.
    OnFailure,
    /// Never: a failure stops the group.
    Never,
}

/// Restart policy, backoff and intensity limit of a group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Restarts allowed within `within` before the failure escalates.
    pub max_restarts: u32,
    pub within: Duration,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::OnFailure,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_restarts: 10,
            within: Duration::from_secs(300),
        }
    }
}

impl RestartSpec {
    /// Backoff before the `n`th restart in the window (n from 1): base * 2^(n-1), capped,
    /// with "equal jitter" (half fixed, half random) so restarts of many groups spread out.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self.backoff_base.saturating_mul(1u32 << (n.saturating_sub(1)).min(20));
        let capped = exp.min(self.backoff_max);
        let half = capped / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

/// One actor of a group: its name (for logs, metrics, status), its kind, its run loop
/// and, if it has one, the thread it runs on.
pub struct Child {
    pub name: String,
    pub kind: &'static str,
    pub run: BoxFuture<'static, Result<()>>,
    thread: Option<ActorThread>,
}

impl Child {
    pub fn new(
        name: impl Into<String>,
        kind: &'static str,
        run: impl Future<Output = Result<()>> + Send + 'static,
    ) -> Self {
        Self { name: name.into(), kind, run: Box::pin(run), thread: None }
    }

    /// Runs this actor on `thread` instead of the shared workers.
    pub fn on(self, thread: ActorThread) -> Self {
        Self { thread: Some(thread), ..self }
    }
}

/// A current-thread tokio runtime on an OS thread of its own, for one actor or a few.
///
/// Sockets are driven by the reactor of the runtime that created them, so whatever an
/// actor talks to must be connected on this runtime ([`ActorThread::run`]), reconnects
/// included (they happen inside the actor). Clones share the thread; dropping the last
/// one (the supervisor drops a child's when its group stops, and a sink group's factory,
/// which holds its writer's, when the pipeline ends) ends the thread: it first lets the
/// aborted actors' tasks, and what their drops spawn (aborting an upload), finish for up to
/// [`WIND_DOWN`], then drops the runtime and whatever is still on it. While other
/// clones live, those tasks simply run to their end on the thread.
#[derive(Clone)]
pub struct ActorThread {
    handle: tokio::runtime::Handle,
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl ActorThread {
    pub fn start(name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context(format!("build the runtime of {name}"))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                    let deadline = Instant::now() + WIND_DOWN;
                    let metrics = tokio::runtime::Handle::current().metrics();
                    while metrics.num_alive_tasks() > 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
            })
            .context(format!("start the thread of {name}"))?;
        Ok(Self { handle, _stop: Arc::new(stop) })
    }

    /// Starts `work` on this thread.
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.handle.spawn(work)
    }

    /// Runs `work` on this thread and waits for its result.
    pub async fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> Result<T> {
        self.spawn(work).await.map_err(join_error)
    }
}

/// The threads a pipeline's sink writers run on, shared in turn (writer `i` on thread
/// `i % n`) and kept across group restarts. By default one per writer, at most one per
/// two cores: the other half stays for the shared workers (source, mappers).
///
/// A thread per writer wakes each writer at once, but more threads than that only add
/// switches and a heap each: three sinks on two cores caught up at the same rate on one,
/// two or three writer threads (37-46k events/s each, noise-bound), with 134-138,
/// 144-146 and 149-152 MB peak RSS.
pub struct WriterThreads {
    threads: Vec<ActorThread>,
}

impl WriterThreads {
    /// Threads named `writer.<k>`: one per writer, at most `limit` (0: one per two cores,
    /// at least one); none without writers.
    pub fn start(writers: usize, limit: usize) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let limit = if limit == 0 { (cores / 2).max(1) } else { limit };
        let count = writers.min(limit);
        let threads = (0..count).map(|k| ActorThread::start(&format!("writer.{k}"))).collect::<Result<_>>()?;
        Ok(Self { threads })
    }

    /// The thread of writer `index`.
    pub fn get(&self, index: usize) -> ActorThread {
        self.threads[index % self.threads.len()].clone()
    }
}

/// Builds a group's actors afresh for each incarnation (fresh mailboxes, state read back
/// from durable positions).
pub type GroupFactory = Box<dyn FnMut() -> BoxFuture<'static, Result<Vec<Child>>> + Send>;

/// The state of a group as shown by `/api/pipelines` and `/ready`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum GroupState {
    Starting,
    Running,
    /// Waiting to restart after a failure.
    Backoff(String),
    Paused,
    /// Stopped for good: the intensity limit was hit, the policy said never, or the error
    /// was fatal. The string is the cause.
    Failed(String),
    Stopped,
}

/// Status of one group, readable from any thread.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub state: GroupState,
    pub restarts: u64,
    pub last_error: Option<String>,
    pub actors: Vec<ActorStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ActorStatus {
    pub name: String,
    pub kind: &'static str,
}

/// The supervisor's view, shared with the HTTP server.
pub type SharedStatus = Arc<Mutex<Vec<GroupStatus>>>;

/// A group to supervise.
pub struct Group {
    pub name: String,
    pub spec: RestartSpec,
    pub factory: GroupFactory,
    /// Groups to restart whenever this one restarts (they share its mailboxes).
    pub dependents: Vec<String>,
}

struct Running {
    child: String,
    abort: tokio::task::AbortHandle,
    /// Ends with the actor (dropped after its abort) unless shared.
    _thread: Option<ActorThread>,
}

struct Supervised {
    group: Group,
    incarnation: u64,
    running: Vec<Running>,
    restarts: VecDeque<Instant>,
    pending: Option<SpawnHandle>,
}

/// The supervisor actor.
pub struct Supervisor {
    groups: Vec<Supervised>,
    status: SharedStatus,
    stopping: bool,
}

impl Supervisor {
    pub fn new(groups: Vec<Group>, status: SharedStatus) -> Self {
        {
            let mut s = status.lock().expect("status lock");
            s.clear();
            for g in &groups {
                s.push(GroupStatus {
                    name: g.name.clone(),
                    state: GroupState::Starting,
                    restarts: 0,
                    last_error: None,
                    actors: Vec::new(),
                });
            }
        }
        let groups = groups
            .into_iter()
            .map(|group| Supervised {
                group,
                incarnation: 0,
                running: Vec::new(),
                restarts: VecDeque::new(),
                pending: None,
            })
            .collect();
        Self { groups, status, stopping: false }
    }

    fn set_status(&self, idx: usize, f: impl FnOnce(&mut GroupStatus)) {
        let mut s = self.status.lock().expect("status lock");
        if let Some(g) = s.get_mut(idx) {
            f(g);
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.group.name == name)
    }

    fn abort_group(&mut self, idx: usize, ctx: &mut Context<Self>) {
        let g = &mut self.groups[idx];
        g.incarnation += 1;
        if let Some(h) = g.pending.take() {
            ctx.cancel_future(h);
        }
        for r in g.running.drain(..) {
            r.abort.abort();
        }
    }

    fn start_group(&mut self, idx: usize, ctx: &mut Context<Self>) {
        self.abort_group(idx, ctx);
        let incarnation = self.groups[idx].incarnation;
        self.set_status(idx, |s| s.state = GroupState::Starting);
        let build = (self.groups[idx].group.factory)();
        ctx.spawn(build.into_actor(self).map(move |built, act, ctx| {
            if act.groups[idx].incarnation != incarnation || act.stopping {
                return;
            }
            match built {
                Ok(children) => act.spawn_children(idx, incarnation, children, ctx),
                Err(error) => act.failed(idx, None, error, ctx),
            }
        }));
    }

    fn spawn_children(&mut self, idx: usize, incarnation: u64, children: Vec<Child>, ctx: &mut Context<Self>) {
        let actors: Vec<ActorStatus> =
            children.iter().map(|c| ActorStatus { name: c.name.clone(), kind: c.kind }).collect();
        for child in children {
            let handle = match &child.thread {
                Some(thread) => thread.spawn(child.run),
                None => tokio::spawn(child.run),
            };
            let abort = handle.abort_handle();
            // The watcher turns the join result, panics included, into an outcome message.
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = tx.send(handle.await.unwrap_or_else(|e| Err(join_error(e))));
            });
            let name = child.name;
            self.groups[idx].running.push(Running { child: name.clone(), abort, _thread: child.thread });
            ctx.spawn(rx.into_actor(self).map(move |outcome, act, ctx| {
                act.child_exited(idx, incarnation, &name, outcome.unwrap_or(Err(Error::Stopped)), ctx);
            }));
        }
        self.set_status(idx, |s| {
            s.state = GroupState::Running;
            s.actors = actors;
        });
        metrics::gauge!(m::PIPELINE_UP, "sink" => self.groups[idx].group.name.clone()).set(1.0);
    }

    fn child_exited(
        &mut self,
        idx: usize,
        incarnation: u64,
        child: &str,
        outcome: Result<()>,
        ctx: &mut Context<Self>,
    ) {
        if self.groups[idx].incarnation != incarnation || self.stopping {
            return;
        }
        match outcome {
            Ok(()) => {
                self.groups[idx].running.retain(|r| r.child != child);
                if self.groups[idx].group.spec.policy == RestartPolicy::Always {
                    tracing::info!(actor = child, "actor exited; policy is always: restarting its group");
                    self.schedule_restart(idx, "exited".to_string(), ctx);
                } else if self.groups[idx].running.is_empty() {
                    self.set_status(idx, |s| s.state = GroupState::Stopped);
                }
            }
            Err(Error::Stopped) => {}
            Err(error) if error.is_consequence() => {
                // A neighbour stopped first and closed a shared mailbox: its own outcome,
                // due any moment, names the cause. Without one, this failure stands.
                self.groups[idx].running.retain(|r| r.child != child);
                let child = child.to_string();
                ctx.run_later(CAUSE_GRACE, move |act, ctx| {
                    if act.groups[idx].incarnation == incarnation && !act.stopping {
                        act.failed(idx, Some(&child), error, ctx);
                    }
                });
            }
            Err(error) => self.failed(idx, Some(child), error, ctx),
        }
    }

    fn failed(&mut self, idx: usize, child: Option<&str>, error: Error, ctx: &mut Context<Self>) {
        let group = self.groups[idx].group.name.clone();
        let actor = child.unwrap_or(&group).to_string();
        let cause = format!("{actor}: {}", error.chain());
        self.set_status(idx, |s| s.last_error = Some(cause.clone()));
        let disposition = error.disposition();
        if disposition == Disposition::Fatal {
            tracing::error!(group = %group, actor = %actor, error = %error.chain(), "fatal error: the pipeline stops");
            return self.escalate(idx, cause, ctx);
        }
        if self.groups[idx].group.spec.policy == RestartPolicy::Never {
            tracing::error!(group = %group, actor = %actor, error = %error.chain(), "actor failed; restart policy is never: the pipeline stops");
            return self.escalate(idx, cause, ctx);
        }
        tracing::warn!(group = %group, actor = %actor, error = %error.chain(), "actor failed; restarting its group");
        self.schedule_restart(idx, cause, ctx);
    }

    fn escalate(&mut self, idx: usize, cause: String, ctx: &mut Context<Self>) {
        self.abort_group(idx, ctx);
        self.set_status(idx, |s| s.state = GroupState::Failed(cause));
        metrics::gauge!(m::PIPELINE_UP, "sink" => self.groups[idx].group.name.clone()).set(0.0);
    }

    fn schedule_restart(&mut self, idx: usize, cause: String, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let spec = self.groups[idx].group.spec;
        let g = &mut self.groups[idx];
        while g.restarts.front().is_some_and(|t| now.duration_since(*t) > spec.within) {
            g.restarts.pop_front();
        }
        if g.restarts.len() as u32 >= spec.max_restarts {
            let n = g.restarts.len();
            tracing::error!(group = %g.group.name, restarts = n, "restart intensity exceeded: the pipeline stops");
            return self.escalate(idx, format!("{n} restarts within {}s; last: {cause}", spec.within.as_secs()), ctx);
        }
        g.restarts.push_back(now);
        let n = g.restarts.len() as u32;
        let delay = spec.backoff(n);
        self.abort_group(idx, ctx);
        let name = self.groups[idx].group.name.clone();
        for actor in self.status.lock().expect("status lock")[idx].actors.iter() {
            metrics::counter!(m::ACTOR_RESTARTS_TOTAL, "actor" => actor.name.clone()).increment(1);
        }
        self.set_status(idx, |s| {
            s.restarts += 1;
            s.state = GroupState::Backoff(format!("restart in {} ms: {cause}", delay.as_millis()));
        });
        tracing::info!(group = %name, delay_ms = delay.as_millis() as u64, "restart scheduled");
        let incarnation = self.groups[idx].incarnation;
        let handle = ctx.run_later(delay, move |act, ctx| {
            if act.groups[idx].incarnation == incarnation && !act.stopping {
                act.groups[idx].pending = None;
                act.start_group(idx, ctx);
                act.restart_dependents(idx, ctx);
            }
        });
        self.groups[idx].pending = Some(handle);
    }

    fn restart_dependents(&mut self, idx: usize, ctx: &mut Context<Self>) {
        let dependents = self.groups[idx].group.dependents.clone();
        for name in dependents {
            if let Some(d) = self.index(&name) {
                let state = self.status.lock().expect("status lock")[d].state.clone();
                if matches!(state, GroupState::Running | GroupState::Starting | GroupState::Backoff(_)) {
                    self.start_group(d, ctx);
                }
            }
        }
    }
}

/// A task that did not finish: it panicked (a failure like any other) or was aborted.
fn join_error(e: tokio::task::JoinError) -> Error {
    match e.try_into_panic() {
        Ok(payload) => Error::Panicked(
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".into()),
        ),
        Err(_) => Error::Stopped,
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for idx in 0..self.groups.len() {
            self.start_group(idx, ctx);
        }
    }
}

/// Pause, resume or restart a group by name.
#[derive(Message, Debug, Clone)]
#[rtype(result = "std::result::Result<(), String>")]
pub enum Command {
    Pause(String),
    Resume(String),
    Restart(String),
}

impl Handler<Command> for Supervisor {
    type Result = std::result::Result<(), String>;

    fn handle(&mut self, cmd: Command, ctx: &mut Self::Context) -> Self::Result {
        let name = match &cmd {
            Command::Pause(n) | Command::Resume(n) | Command::Restart(n) => n.clone(),
        };
        let idx = self.index(&name).ok_or_else(|| format!("no pipeline named {name:?}"))?;
        match cmd {
            Command::Pause(_) => {
                self.abort_group(idx, ctx);
                self.set_status(idx, |s| s.state = GroupState::Paused);
                tracing::info!(group = %name, "paused");
            }
            Command::Resume(_) | Command::Restart(_) => {
                self.groups[idx].restarts.clear();
                tracing::info!(group = %name, "starting on request");
                self.start_group(idx, ctx);
                self.restart_dependents(idx, ctx);
            }
        }
        Ok(())
    }
}

/// Stop every group (graceful stop already drained the pipelines).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAll;

impl Handler<StopAll> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: StopAll, ctx: &mut Self::Context) {
        self.stopping = true;
        for idx in 0..self.groups.len() {
            self.abort_group(idx, ctx);
            self.set_status(idx, |s| s.state = GroupState::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn spec(policy: RestartPolicy, max_restarts: u32) -> RestartSpec {
        RestartSpec {
            policy,
            backoff_base: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            max_restarts,
            within: Duration::from_secs(60),
        }
    }

    /// A group whose every incarnation runs `children()`, counting its builds.
    fn group(name: &str, spec: RestartSpec, builds: Arc<AtomicU32>, children: fn() -> Vec<Child>) -> Group {
        Group {
            name: name.into(),
            spec,
            factory: Box::new(move || {
                builds.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { Ok(children()) })
            }),
            dependents: Vec::new(),
        }
    }

    fn failing() -> Vec<Child> {
        vec![Child::new("bad", "test", async { Err(Error::Injected("boom".into())) })]
    }

    fn forever() -> Vec<Child> {
        vec![Child::new("good", "test", std::future::pending())]
    }

    fn state(status: &SharedStatus, name: &str) -> GroupStatus {
        status.lock().expect("status").iter().find(|g| g.name == name).cloned().expect("group")
    }

    /// Runs a supervisor over `groups` until group `name` failed, or 5 s passed (a panic
    /// is reported once its hook returned: slow with RUST_BACKTRACE set, or under load).
    fn run_until_failed(groups: Vec<Group>, status: &SharedStatus, name: &str) {
        let (s, name) = (status.clone(), name.to_string());
        actix::System::new().block_on(async move {
            let _supervisor = Supervisor::new(groups, s.clone()).start();
            for _ in 0..500 {
                if matches!(state(&s, &name).state, GroupState::Failed(_)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    #[test]
    fn failures_restart_with_backoff_then_escalate_past_the_intensity_limit() {
        let status = SharedStatus::default();
        let (bad, good) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let groups = vec![
            group("bad", spec(RestartPolicy::OnFailure, 3), bad.clone(), failing),
            group("good", spec(RestartPolicy::OnFailure, 3), good.clone(), forever),
        ];
        run_until_failed(groups, &status, "bad");
        let bad_status = state(&status, "bad");
        assert!(
            matches!(&bad_status.state, GroupState::Failed(c) if c.contains("3 restarts within 60s") && c.contains("boom"))
        );
        assert_eq!((bad.load(Ordering::SeqCst), bad_status.restarts), (4, 3), "first start and three restarts");
        assert_eq!(state(&status, "good").state, GroupState::Running, "the other group is untouched");
        assert_eq!(good.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_never_policy_fails_at_once_and_a_panic_is_a_failure() {
        fn panicking() -> Vec<Child> {
            vec![Child::new("p", "test", async { panic!("kaboom") })]
        }
        let status = SharedStatus::default();
        let builds = Arc::new(AtomicU32::new(0));
        let groups = vec![group("p", spec(RestartPolicy::Never, 10), builds.clone(), panicking)];
        run_until_failed(groups, &status, "p");
        let g = state(&status, "p");
        assert!(matches!(&g.state, GroupState::Failed(c) if c.contains("panicked: kaboom")), "{g:?}");
        assert_eq!((builds.load(Ordering::SeqCst), g.restarts), (1, 0));
    }

    /// Waits up to 3 s for `until`.
    async fn eventually(what: &str, until: impl Fn() -> bool) {
        for _ in 0..300 {
            if until() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out: {what}");
    }

    /// Names of this process's threads.
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .expect("task list")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect()
    }

    #[test]
    fn an_actor_thread_runs_its_actor_and_ends_with_it_after_the_drop_work() {
        /// Spawns work when dropped, as a sink that aborts its uploads does.
        struct SpawnsOnDrop(Arc<AtomicU32>);
        impl Drop for SpawnsOnDrop {
            fn drop(&mut self) {
                let done = self.0.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
        let status = SharedStatus::default();
        let (ran_on, cleaned) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicU32::new(0)));
        let (ran, done) = (ran_on.clone(), cleaned.clone());
        let factory: GroupFactory = Box::new(move || {
            let (ran, done) = (ran.clone(), done.clone());
            Box::pin(async move {
                let thread = ActorThread::start("own-thread")?;
                let name = || std::thread::current().name().map(String::from);
                let opened_on = thread.run(async move { name() }).await?;
                let child = Child::new("c", "test", async move {
                    let _guard = SpawnsOnDrop(done);
                    ran.lock().expect("names").extend([opened_on, name()]);
                    std::future::pending().await
                });
                Ok(vec![child.on(thread)])
            })
        });
        let group = Group { name: "g".into(), spec: spec(RestartPolicy::Never, 1), factory, dependents: Vec::new() };
        let s = status.clone();
        actix::System::new().block_on(async move {
            let supervisor = Supervisor::new(vec![group], s).start();
            eventually("the actor ran", || ran_on.lock().expect("names").len() == 2).await;
            let own = Some("own-thread".to_string());
            assert_eq!(*ran_on.lock().expect("names"), [own.clone(), own], "opened and ran on its thread");
            assert!(thread_names().contains(&"own-thread".to_string()));
            supervisor.send(Command::Pause("g".into())).await.expect("send").expect("pause");
            eventually("the actor's drop work ran", || cleaned.load(Ordering::SeqCst) == 1).await;
            eventually("the thread ended", || !thread_names().contains(&"own-thread".to_string())).await;
        });
    }

    #[test]
    fn writers_share_no_more_threads_than_asked_in_turn_until_the_last_clone_goes() {
        let name = || std::thread::current().name().map(String::from).unwrap_or_default();
        tokio::runtime::Runtime::new().expect("runtime").block_on(async move {
            let writers = WriterThreads::start(3, 2).expect("threads");
            let mut ran_on = Vec::new();
            for index in 0..3 {
                ran_on.push(writers.get(index).run(async move { name() }).await.expect("ran"));
            }
            assert_eq!(ran_on, ["writer.0", "writer.1", "writer.0"]);
            let kept = writers.get(1);
            drop(writers);
            eventually("writer.0 ended", || !thread_names().contains(&"writer.0".to_string())).await;
            assert_eq!(kept.run(async move { name() }).await.expect("ran"), "writer.1", "a clone keeps its thread");
            drop(kept);
            eventually("writer.1 ended", || !thread_names().contains(&"writer.1".to_string())).await;
            let half = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1);
            let threads = |writers| WriterThreads::start(writers, 0).expect("threads").threads.len();
            assert_eq!(threads(half + 1), half, "0: one per two cores at most");
            assert_eq!(threads(1), 1, "0: one per writer");
            assert_eq!(threads(0), 0, "none without writers");
        });
    }

    #[test]
    fn the_cause_is_the_failure_a_closed_mailbox_follows() {
        fn pair() -> Vec<Child> {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            vec![
                // Notices at once that its partner is gone, before the partner's panic is reported.
                Child::new("follower", "test", async move {
                    let _ = rx.await;
                    Err(Error::Closed(crate::mailbox::Closed("partner")))
                }),
                Child::new("leader", "test", async move {
                    drop(tx);
                    tokio::task::yield_now().await;
                    Err(Error::Injected("the real cause".into()))
                }),
            ]
        }
        let status = SharedStatus::default();
        let groups = vec![group("g", spec(RestartPolicy::Never, 10), Arc::new(AtomicU32::new(0)), pair)];
        run_until_failed(groups, &status, "g");
        let g = state(&status, "g");
        assert!(
            matches!(&g.state, GroupState::Failed(c) if c.contains("leader: injected failure: the real cause")),
            "{g:?}"
        );
    }
}
