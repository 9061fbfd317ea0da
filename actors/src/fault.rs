//! Fault injection, for the restart-semantics tests.
//!
//! Each actor calls [`Faults::hit`] once per unit of work with its kind (`snapshot`, `wal`,
//! `fanout`, `producer`, `consumer`, `mapper`, `writer`), optionally qualified by its sink
//! (`writer:replica`). A planned [`Fault`] fires on its `after + 1`th hit, `times` times:
//! as an error, as a panic, or as a stall (the actor waits until [`Faults::release`]).
//! The daemon never plans faults; with none planned, a hit is one branch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    Error,
    Panic,
    /// Block the actor until released.
    Stall,
}

#[derive(Debug, Clone)]
pub struct Fault {
    /// `kind` or `kind:sink`.
    pub actor: String,
    /// Hits to let through before firing.
    pub after: u64,
    pub mode: FaultMode,
    /// How many times to fire.
    pub times: u32,
}

impl Fault {
    pub fn new(actor: impl Into<String>, after: u64, mode: FaultMode) -> Self {
        Self { actor: actor.into(), after, mode, times: 1 }
    }

    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }
}

#[derive(Default)]
struct Plan {
    faults: Vec<(Fault, u64)>,
    gates: HashMap<String, watch::Sender<bool>>,
    hits: HashMap<String, u64>,
}

/// A shared fault plan; `Faults::default()` plans nothing.
#[derive(Clone, Default)]
pub struct Faults(Option<Arc<Mutex<Plan>>>);

impl Faults {
    pub fn new(faults: Vec<Fault>) -> Self {
        let plan = Plan { faults: faults.into_iter().map(|f| (f, 0)).collect(), ..Plan::default() };
        Self(Some(Arc::new(Mutex::new(plan))))
    }

    /// Plans one more fault.
    pub fn add(&self, fault: Fault) {
        if let Some(plan) = &self.0 {
            plan.lock().expect("fault plan").faults.push((fault, 0));
        }
    }

    /// How many times actors of this kind (or `kind:sink`) passed a hit.
    pub fn hits(&self, actor: &str) -> u64 {
        self.0.as_ref().map(|p| p.lock().expect("fault plan").hits.get(actor).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// Lets stalled actors named `actor` go on.
    pub fn release(&self, actor: &str) {
        if let Some(plan) = &self.0
            && let Some(gate) = plan.lock().expect("fault plan").gates.get(actor)
        {
            let _ = gate.send(true);
        }
    }

    /// Called by actor `kind` (of sink `sink`, if any) once per unit of work.
    pub fn hit_as(&self, kind: &str, sink: Option<&str>) -> Result<Option<watch::Receiver<bool>>> {
        let Some(plan) = &self.0 else { return Ok(None) };
        let qualified = sink.map(|s| format!("{kind}:{s}"));
        let mut plan = plan.lock().expect("fault plan");
        *plan.hits.entry(kind.to_string()).or_default() += 1;
        if let Some(q) = &qualified {
            *plan.hits.entry(q.clone()).or_default() += 1;
        }
        let mut fire = None;
        for (fault, seen) in plan.faults.iter_mut() {
            if fault.times == 0 || (fault.actor != kind && Some(&fault.actor) != qualified.as_ref()) {
                continue;
            }
            *seen += 1;
            if *seen > fault.after {
                fault.times -= 1;
                fire = Some((fault.mode, fault.actor.clone()));
                break;
            }
        }
        match fire {
            None => Ok(None),
            Some((FaultMode::Error, actor)) => Err(Error::Injected(format!("fault planned for {actor}"))),
            Some((FaultMode::Panic, actor)) => {
                drop(plan);
                panic!("fault planned for {actor}");
            }
            Some((FaultMode::Stall, actor)) => {
                let gate = plan.gates.entry(actor).or_insert_with(|| watch::channel(false).0);
                let _ = gate.send(false);
                Ok(Some(gate.subscribe()))
            }
        }
    }

    /// [`Faults::hit_as`] for actors that belong to no sink, waiting out a stall.
    pub fn hit(&self, kind: &str) -> Result<()> {
        self.hit_as(kind, None).map(|gate| {
            if gate.is_some() {
                tracing::warn!(actor = kind, "stall faults need the async hit; ignored");
            }
        })
    }

    /// [`Faults::hit_as`], waiting out a stall.
    pub async fn hit_async(&self, kind: &str, sink: Option<&str>) -> Result<()> {
        if let Some(mut gate) = self.hit_as(kind, sink)? {
            while !*gate.borrow() {
                if gate.changed().await.is_err() {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_after_their_count() {
        let f = Faults::new(vec![Fault::new("writer", 2, FaultMode::Error)]);
        assert!(f.hit("writer").is_ok());
        assert!(f.hit("mapper").is_ok());
        assert!(f.hit("writer").is_ok());
        assert!(matches!(f.hit("writer"), Err(Error::Injected(_))));
        assert!(f.hit("writer").is_ok(), "fires once");
        assert_eq!(f.hits("writer"), 4);
        assert!(Faults::default().hit("writer").is_ok());
    }

    #[test]
    fn qualified_faults_match_one_sink() {
        let f = Faults::new(vec![Fault::new("writer:a", 0, FaultMode::Error)]);
        assert!(f.hit_as("writer", Some("b")).is_ok());
        assert!(f.hit_as("writer", Some("a")).is_err());
    }

    #[tokio::test]
    async fn stalls_wait_for_release() {
        let f = Faults::new(vec![Fault::new("writer", 0, FaultMode::Stall)]);
        let f2 = f.clone();
        let task = tokio::spawn(async move { f2.hit_async("writer", None).await });
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert!(!task.is_finished());
        f.release("writer");
        task.await.unwrap().unwrap();
    }
}
