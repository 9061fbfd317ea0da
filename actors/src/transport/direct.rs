//! Direct transport: the in-process fan-out from the source to every sink pipeline.
//!
//! ```text
//!   source ──Event──► [mailbox] ──► Fanout ──► [mailbox sink 0] ──► mapper ─► writer ─┐
//!     ▲                              │  └────► [mailbox sink 1] ──► mapper ─► writer ─┤
//!     │ confirm = end LSN of the     │                                              Ack
//!     └ newest checkpoint every ◄────┴──────────────────────────────────────────────────┘
//!       sink acknowledged
//! ```
//!
//! Invariants:
//! - Per sink the fan-out remembers the last position it forwarded, per table and for
//!   checkpoints, and forwards only newer changes and checkpoints, so a source that rewinds
//!   (replays from the confirmed LSN after a restart) never hands a sink the same change
//!   twice. Per table, because the source keeps each table's order but gathers a unit's
//!   changes per table: a batch of one table may hold older positions than the batch of
//!   another table just before it.
//! - The confirmed LSN is the end LSN of the newest checkpoint that *every* sink, attached
//!   or not, acknowledged: a failed or paused sink holds the slot (PostgreSQL keeps its
//!   WAL) while the others go on. That is the trade-off of one source for many sinks:
//!   WAL accumulates on the source while a sink is down, memory here does not.
//! - A sink pipeline that (re)attaches says what it holds durably; if that is behind what
//!   already went by, the fan-out asks the source to rewind and forwards nothing to it until
//!   the rewound stream begins ([`Event::Rewound`]): events still in flight from before
//!   the rewind are newer than what the sink lacks, and would make it skip the replay.
//! - Backpressure is shared: a sink whose mailbox is full makes the fan-out, and so the
//!   source, wait. A sink that stays full for longer than the stall timeout is detached
//!   (told so through its `detached` channel, which restarts its pipeline): the others go
//!   on, and the sink re-attaches from what it holds durably, which rewinds the source.
//!   So a slow sink holds the others back by at most the stall timeout at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::mailbox::{Mailbox, Sender};
use crate::message::{Ack, ChangeBatch, Event, Position};
use crate::schema::TableId;

/// How long the fan-out waits for every sink pipeline before serving the ones attached.
pub const STARTUP_GRACE: Duration = Duration::from_secs(5);

/// Messages from sink pipelines to the fan-out.
pub enum FanoutControl {
    /// A (new incarnation of a) sink pipeline, holding `durable` durably. The reply says
    /// the fan-out took it.
    Attach {
        sink: usize,
        tx: Sender<Event>,
        durable: Position,
        reply: tokio::sync::oneshot::Sender<()>,
        /// Fired with the reason when the fan-out detaches this incarnation (it stalled).
        detached: tokio::sync::oneshot::Sender<String>,
    },
}

/// What a sink was handed: everything up to `floor`, and after it, per table, the changes
/// up to that table's position, and the checkpoints up to `checkpoint`.
#[derive(Debug, Default)]
struct Forwarded {
    floor: Position,
    tables: HashMap<TableId, Position>,
    checkpoint: Position,
}

impl Forwarded {
    fn from(floor: Position) -> Self {
        Self { floor, tables: HashMap::new(), checkpoint: floor }
    }

    fn table(&self, table: &TableId) -> Position {
        self.tables.get(table).map_or(self.floor, |p| (*p).max(self.floor))
    }
}

struct SinkSlot {
    name: String,
    tx: Option<Sender<Event>>,
    detached: Option<tokio::sync::oneshot::Sender<String>>,
    forwarded: Forwarded,
    acked: Position,
    /// Re-attached behind the stream: waits for the rewound stream.
    awaiting_replay: bool,
}

/// The fan-out's channels.
pub struct FanoutLinks {
    pub input: Mailbox<Event>,
    pub control: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<FanoutControl>>>,
    pub acks: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Ack>>>,
    pub confirm: watch::Sender<u64>,
    pub rewind: watch::Sender<u64>,
}

/// Runs the fan-out for sinks named `sinks` (index = `Ack::downstream`), whose durable
/// positions at start are `durable`. A sink whose mailbox stays full for `stall_timeout`
/// is detached (`None`: never).
pub async fn run(
    sinks: Vec<String>,
    durable: Vec<Position>,
    links: FanoutLinks,
    stall_timeout: Option<Duration>,
    faults: Faults,
) -> Result<()> {
    let FanoutLinks { mut input, control, acks, confirm, rewind } = links;
    let mut control = control.lock().await;
    let mut acks = acks.lock().await;
    let mut slots: Vec<SinkSlot> = sinks
        .into_iter()
        .zip(durable)
        .map(|(name, d)| SinkSlot {
            name,
            tx: None,
            detached: None,
            forwarded: Forwarded::from(d),
            acked: d,
            awaiting_replay: false,
        })
        .collect();
    // Checkpoints that confirm an LSN, in stream order, not yet acknowledged by all.
    let mut pending: VecDeque<(Position, u64)> = VecDeque::new();
    // The newest position that came in from the source.
    let mut head = Position::START;
    // Until every sink attached (or a grace period passed), nothing is taken from the
    // source, so that a normal start needs no rewind.
    let grace = tokio::time::Instant::now() + STARTUP_GRACE;
    let mut started = false;
    loop {
        started = started || tokio::time::Instant::now() >= grace || slots.iter().all(|s| s.tx.is_some());
        let attached = started && slots.iter().any(|s| s.tx.is_some());
        tokio::select! {
            biased;
            ctl = control.recv() => {
                let Some(FanoutControl::Attach { sink, tx, durable, reply, detached }) = ctl else {
                    return Err(Error::Stopped);
                };
                let Some(slot) = slots.get_mut(sink) else { continue };
                // A sink without the snapshot, once the source is past it: a rewind of the
                // stream would not copy the tables again; only a new snapshot can serve it,
                // and one source copies for every sink. The source side restarts (and with
                // it every sink pipeline); its start-up sees this sink holds no snapshot.
                if durable < Position::SNAPSHOT_DONE && head >= Position::SNAPSHOT_DONE {
                    let _ = reply.send(());
                    return Err(Error::Restart(format!(
                        "sink {} holds no complete snapshot while the source streams: copying the tables again",
                        slot.name
                    )));
                }
                tracing::info!(sink = %slot.name, durable = ?durable, "sink pipeline attached");
                slot.tx = Some(tx);
                slot.detached = Some(detached);
                slot.forwarded = Forwarded::from(durable);
                slot.acked = slot.acked.max(durable);
                let _ = reply.send(());
                slot.awaiting_replay = durable < head;
                if slot.awaiting_replay {
                    rewind.send_modify(|n| *n += 1);
                }
            }
            ack = acks.recv() => {
                let Some(ack) = ack else { return Err(Error::Stopped) };
                if let Some(slot) = slots.get_mut(ack.downstream) {
                    slot.acked = slot.acked.max(ack.checkpoint.position);
                }
                let min = slots.iter().map(|s| s.acked).min().unwrap_or(Position::START);
                let mut newest = None;
                while pending.front().is_some_and(|(p, _)| *p <= min) {
                    newest = pending.pop_front().map(|(_, lsn)| lsn);
                }
                if let Some(lsn) = newest {
                    confirm.send_if_modified(|c| if lsn > *c { *c = lsn; true } else { false });
                }
            }
            _ = tokio::time::sleep_until(grace), if !started => {}
            event = input.recv(), if attached => {
                let Some(event) = event else { return Ok(()) };
                faults.hit("fanout")?;
                match &event {
                    Event::SnapshotBegin { .. } => {
                        head = Position::START;
                        pending.clear();
                        for s in &mut slots {
                            s.forwarded = Forwarded::default();
                            s.acked = Position::START;
                            s.awaiting_replay = false;
                        }
                    }
                    Event::Rewound => {
                        for s in &mut slots {
                            s.awaiting_replay = false;
                        }
                        continue;
                    }
                    Event::Checkpoint(cp) => {
                        head = head.max(cp.position);
                        if let Some(lsn) = cp.confirm_lsn && pending.back().is_none_or(|(p, _)| cp.position > *p) {
                            pending.push_back((cp.position, lsn));
                        }
                    }
                    Event::Data(batch) => {
                        if let Some(p) = batch.last_position() {
                            head = head.max(p);
                        }
                    }
                }
                for slot in &mut slots {
                    forward(slot, &event, stall_timeout).await;
                }
            }
        }
    }
}

/// Forwards what `slot` has not seen; a closed mailbox, or one full for `stall_timeout`,
/// detaches the sink.
async fn forward(slot: &mut SinkSlot, event: &Event, stall_timeout: Option<Duration>) {
    let Some(tx) = &slot.tx else { return };
    if slot.awaiting_replay {
        return;
    }
    let out = match event {
        Event::SnapshotBegin { .. } => Some(event.clone()),
        Event::Checkpoint(cp) => (cp.position > slot.forwarded.checkpoint).then(|| event.clone()),
        Event::Data(batch) => unseen(batch, slot.forwarded.table(&batch.table)).map(Event::Data),
        Event::Rewound => None,
    };
    let Some(out) = out else { return };
    let handed = match &out {
        Event::Checkpoint(cp) => Handed::Checkpoint(cp.position),
        Event::Data(b) => b.last_position().map_or(Handed::Nothing, |p| Handed::Rows(b.table.clone(), p)),
        Event::SnapshotBegin { .. } | Event::Rewound => Handed::Start,
    };
    let sent = match stall_timeout {
        Some(limit) => tokio::time::timeout(limit, tx.send(out)).await,
        None => Ok(tx.send(out).await),
    };
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            tracing::info!(sink = %slot.name, "sink pipeline detached");
            slot.tx = None;
            slot.detached = None;
            return;
        }
        Err(_) => {
            let reason = format!(
                "sink {} took nothing for {}s (pipeline.sink_stall_timeout_secs): detached so that the other sinks \
                 go on; it re-attaches from what it holds",
                slot.name,
                stall_timeout.unwrap_or_default().as_secs()
            );
            tracing::warn!(sink = %slot.name, "{reason}");
            slot.tx = None;
            if let Some(d) = slot.detached.take() {
                let _ = d.send(reason);
            }
            return;
        }
    }
    match handed {
        Handed::Checkpoint(p) => slot.forwarded.checkpoint = p,
        Handed::Rows(table, p) => {
            slot.forwarded.tables.insert(table, p);
        }
        Handed::Start => slot.forwarded = Forwarded::default(),
        Handed::Nothing => {}
    }
}

/// What forwarding an event hands a sink, for [`Forwarded`].
enum Handed {
    Checkpoint(Position),
    Rows(TableId, Position),
    Start,
    Nothing,
}

/// The part of a batch after `seen` (the whole batch shared when nothing was seen).
fn unseen(batch: &Arc<ChangeBatch>, seen: Position) -> Option<Arc<ChangeBatch>> {
    let first = batch.changes.first()?.position;
    if first > seen {
        return Some(batch.clone());
    }
    if batch.last_position()? <= seen {
        return None;
    }
    let changes = batch.changes.iter().filter(|c| c.position > seen).cloned().collect();
    Some(Arc::new(ChangeBatch { changes, ..ChangeBatch::clone(batch) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Checkpoint;

    fn batch(lsn: u64, seqs: std::ops::RangeInclusive<u64>) -> Arc<ChangeBatch> {
        Arc::new(crate::message::testing::inserts(seqs.map(|seq| (lsn, seq))))
    }

    #[test]
    fn unseen_keeps_only_newer_changes() {
        let b = batch(10, 1..=4);
        assert!(Arc::ptr_eq(&unseen(&b, Position { lsn: 9, seq: Position::END }).unwrap(), &b));
        assert!(unseen(&b, Position { lsn: 10, seq: 4 }).is_none());
        let part = unseen(&b, Position { lsn: 10, seq: 2 }).unwrap();
        assert_eq!(part.changes.iter().map(|c| c.position.seq).collect::<Vec<_>>(), vec![3, 4]);
    }

    /// A fan-out for sinks `a` and `b`, both attached with mailboxes of `capacity` rows.
    struct Harness {
        src: Sender<Event>,
        acks: mpsc::UnboundedSender<Ack>,
        confirm: watch::Receiver<u64>,
        rewind: watch::Receiver<u64>,
        sinks: Vec<Mailbox<Event>>,
        detached: Vec<tokio::sync::oneshot::Receiver<String>>,
        control: mpsc::UnboundedSender<FanoutControl>,
        task: tokio::task::JoinHandle<Result<()>>,
    }

    fn harness(capacity: usize, stall_timeout: Option<Duration>) -> Harness {
        let (src, input) = crate::mailbox::mailbox::<Event>("fanout-test", "fanout", 100);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (confirm_tx, confirm) = watch::channel(0u64);
        let (rewind_tx, rewind) = watch::channel(0u64);
        let links = FanoutLinks {
            input,
            control: Arc::new(tokio::sync::Mutex::new(ctl_rx)),
            acks: Arc::new(tokio::sync::Mutex::new(ack_rx)),
            confirm: confirm_tx,
            rewind: rewind_tx,
        };
        let durable = vec![Position::SNAPSHOT_DONE; 2];
        let task = tokio::spawn(run(vec!["a".into(), "b".into()], durable, links, stall_timeout, Faults::default()));
        let (mut sinks, mut detached) = (Vec::new(), Vec::new());
        for (sink, name) in ["a", "b"].into_iter().enumerate() {
            let (tx, rx) = crate::mailbox::mailbox::<Event>(name, "test", capacity);
            let (reply, _) = tokio::sync::oneshot::channel();
            let (detach_tx, detach_rx) = tokio::sync::oneshot::channel();
            ctl_tx
                .send(FanoutControl::Attach { sink, tx, durable: Position::SNAPSHOT_DONE, reply, detached: detach_tx })
                .ok();
            sinks.push(rx);
            detached.push(detach_rx);
        }
        Harness { src, acks, confirm, rewind, sinks, detached, control: ctl_tx, task }
    }

    fn cp(lsn: u64) -> Event {
        Event::Checkpoint(Checkpoint::source(Position::txn_end(lsn), Some(lsn + 8)))
    }

    #[tokio::test]
    async fn replays_are_not_forwarded_twice_and_confirm_waits_for_every_sink() {
        let mut h = harness(100, None);
        for e in [Event::Data(batch(10, 1..=2)), cp(10), Event::Data(batch(20, 1..=1))] {
            h.src.send(e).await.unwrap();
        }
        // The source rewinds and replays: nothing is forwarded twice.
        for e in [Event::Data(batch(10, 1..=2)), cp(10), Event::Data(batch(20, 1..=1)), cp(20)] {
            h.src.send(e).await.unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            match h.sinks[0].recv().await.unwrap() {
                Event::Data(b) => seen.push(format!("data {}", b.changes.len())),
                Event::Checkpoint(c) => seen.push(format!("cp {}", c.position.lsn)),
                Event::SnapshotBegin { .. } | Event::Rewound => seen.push("begin".into()),
            }
        }
        assert_eq!(seen, vec!["data 2", "cp 10", "data 1", "cp 20"]);
        assert!(h.sinks[0].try_recv().is_none());
        while h.sinks[1].try_recv().is_some() {}
        // One sink acknowledging is not enough.
        h.acks.send(Ack { downstream: 0, checkpoint: Checkpoint::source(Position::txn_end(20), Some(28)) }).ok();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*h.confirm.borrow(), 0);
        h.acks.send(Ack { downstream: 1, checkpoint: Checkpoint::source(Position::txn_end(10), Some(18)) }).ok();
        h.confirm.changed().await.unwrap();
        assert_eq!(*h.confirm.borrow(), 18);
        assert_eq!(*h.rewind.borrow(), 0);
        h.task.abort();
    }

    #[tokio::test]
    async fn batches_of_other_tables_with_older_positions_are_forwarded_once() {
        let mut h = harness(100, None);
        let other = |b: Arc<ChangeBatch>| {
            Event::Data(Arc::new(ChangeBatch { table: TableId::new("public", "u"), ..ChangeBatch::clone(&b) }))
        };
        // One unit gathered per table: t holds 10.1 and 10.3, u holds 10.2 and comes after.
        let t = Arc::new(ChangeBatch {
            changes: [batch(10, 1..=1), batch(10, 3..=3)].iter().flat_map(|b| b.changes.clone()).collect(),
            ..ChangeBatch::clone(&batch(10, 1..=1))
        });
        let unit = [Event::Data(t), other(batch(10, 2..=2)), cp(10)];
        // Then the source rewinds and replays the unit.
        for e in unit.iter().chain(&unit) {
            h.src.send(e.clone()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut seen = Vec::new();
        while let Some(e) = h.sinks[0].try_recv() {
            seen.push(match e {
                Event::Data(b) => {
                    format!("{} {:?}", b.table.name, b.changes.iter().map(|c| c.position.seq).collect::<Vec<_>>())
                }
                Event::Checkpoint(c) => format!("cp {}", c.position.lsn),
                other => format!("{other:?}"),
            });
        }
        assert_eq!(seen, vec!["t [1, 3]", "u [2]", "cp 10"]);
        h.task.abort();
    }

    fn lsns(rx: &mut Mailbox<Event>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(e) = rx.try_recv() {
            if let Event::Data(b) = e {
                out.push(b.changes[0].lsn);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_sink_that_reattaches_behind_gets_the_replay_and_not_what_was_in_flight() {
        let mut h = harness(100, None);
        for lsn in [10, 20, 30] {
            h.src.send(Event::Data(batch(lsn, 1..=1))).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lsns(&mut h.sinks[0]), vec![10, 20, 30]);
        // Sink a restarts holding only 10: the source is asked to rewind.
        let (tx, mut a) = crate::mailbox::mailbox::<Event>("a2", "test", 100);
        let (reply, answered) = tokio::sync::oneshot::channel();
        let (detached, _kept) = tokio::sync::oneshot::channel();
        let durable = Position { lsn: 10, seq: Position::END };
        h.control.send(FanoutControl::Attach { sink: 0, tx, durable, reply, detached }).ok();
        answered.await.unwrap();
        assert_eq!(*h.rewind.borrow(), 1);
        // 40 was read before the rewind took effect: not for a, whose replay comes first.
        h.src.send(Event::Data(batch(40, 1..=1))).await.unwrap();
        h.src.send(Event::Rewound).await.unwrap();
        for lsn in [10, 20, 30, 40, 50] {
            h.src.send(Event::Data(batch(lsn, 1..=1))).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lsns(&mut a), vec![20, 30, 40, 50], "everything after what it holds, once, in order");
        assert_eq!(lsns(&mut h.sinks[1]), vec![10, 20, 30, 40, 50], "the other sink skips the replay");
        h.task.abort();
    }

    #[tokio::test]
    async fn a_stalled_sink_holds_the_others_back_only_until_the_stall_timeout() {
        let mut h = harness(2, Some(Duration::from_millis(300)));
        // Sink a takes nothing: after two rows its mailbox is full and the fan-out waits.
        let started = tokio::time::Instant::now();
        for lsn in 1..=6 {
            h.src.send(Event::Data(batch(lsn * 10, 1..=1))).await.unwrap();
        }
        let mut b = Vec::new();
        while b.len() < 6 {
            let Some(Event::Data(batch)) = h.sinks[1].recv().await else { panic!("data expected") };
            b.push(batch.changes[0].lsn);
        }
        assert_eq!(b, vec![10, 20, 30, 40, 50, 60], "sink b got everything, in order");
        assert!(started.elapsed() >= Duration::from_millis(300), "b waited for a up to the stall timeout");
        let reason = (&mut h.detached[0]).await.expect("a is told it was detached");
        assert!(reason.contains("sink a took nothing"), "{reason}");
        assert_eq!(h.sinks[0].queued(), 2, "a keeps what it had; the rest it gets after re-attaching");
        assert!(h.detached[1].try_recv().is_err(), "b stays attached");
        h.task.abort();
    }
}
