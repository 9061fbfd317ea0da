//! Bounded mailboxes, counted in rows.
//!
//! Every hand-off between actors goes through a [`Mailbox`]. A message weighs as many
//! units as it carries rows (at least one), and a sender waits while the mailbox holds
//! `capacity` units: a slow receiver stops its senders, and memory stays bounded by the
//! sum of the capacities whatever the speeds. The permit a message took travels with it
//! and is released the moment the receiver takes the message, so at any time
//! `sent = taken + queued` and `queued <= capacity` exactly.
//!
//! The queued depth is exported as `sluice_mailbox_depth{actor}` and the units ever sent as
//! `sluice_mailbox_sent_total{actor}`: what a receiver took is their difference.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::metrics as m;

/// How many units a message weighs.
pub trait Weighted {
    fn weight(&self) -> usize;
}

impl Weighted for crate::message::Event {
    fn weight(&self) -> usize {
        self.rows().max(1)
    }
}

/// The receiver is gone: the downstream actor stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mailbox {0} is closed")]
pub struct Closed(pub &'static str);

struct Shared {
    capacity: usize,
    queued: AtomicUsize,
    depth: metrics::Gauge,
    sent: metrics::Counter,
}

impl Shared {
    fn update_gauge(&self) {
        self.depth.set(self.queued.load(Ordering::Relaxed) as f64);
    }
}

struct Letter<T> {
    item: T,
    weight: usize,
    _permit: OwnedSemaphorePermit,
}

/// The sending half; cheap to clone.
pub struct Sender<T> {
    tx: mpsc::UnboundedSender<Letter<T>>,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    label: &'static str,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), permits: self.permits.clone(), shared: self.shared.clone(), label: self.label }
    }
}

/// The receiving half, owned by one actor.
pub struct Mailbox<T> {
    rx: mpsc::UnboundedReceiver<Letter<T>>,
    shared: Arc<Shared>,
}

/// A mailbox for the actor named `actor` holding at most `capacity` units.
pub fn mailbox<T: Weighted>(actor: impl Into<String>, label: &'static str, capacity: usize) -> (Sender<T>, Mailbox<T>) {
    let capacity = capacity.max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let actor: String = actor.into();
    let shared = Arc::new(Shared {
        capacity,
        queued: AtomicUsize::new(0),
        depth: metrics::gauge!(m::MAILBOX_DEPTH, "actor" => actor.clone()),
        sent: metrics::counter!(m::MAILBOX_SENT_TOTAL, "actor" => actor),
    });
    shared.update_gauge();
    let permits = Arc::new(Semaphore::new(capacity));
    (Sender { tx, permits, shared: shared.clone(), label }, Mailbox { rx, shared })
}

impl<T: Weighted> Sender<T> {
    /// Sends, waiting while the mailbox is full. A message heavier than the whole capacity
    /// waits for an empty mailbox and then goes alone.
    pub async fn send(&self, item: T) -> Result<(), Closed> {
        let weight = item.weight().clamp(1, self.shared.capacity);
        let permit = self.permits.clone().acquire_many_owned(weight as u32).await.map_err(|_| Closed(self.label))?;
        self.shared.queued.fetch_add(weight, Ordering::Relaxed);
        self.tx.send(Letter { item, weight, _permit: permit }).map_err(|_| {
            self.shared.queued.fetch_sub(weight, Ordering::Relaxed);
            Closed(self.label)
        })?;
        self.shared.sent.increment(weight as u64);
        self.shared.update_gauge();
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<T> Mailbox<T> {
    fn taken(&self, letter: Letter<T>) -> T {
        self.shared.queued.fetch_sub(letter.weight, Ordering::Relaxed);
        self.shared.update_gauge();
        letter.item
    }

    /// The next message; `None` once every sender is gone and the mailbox is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let letter = self.rx.recv().await?;
        Some(self.taken(letter))
    }

    /// A message if one is queued now.
    pub fn try_recv(&mut self) -> Option<T> {
        let letter = self.rx.try_recv().ok()?;
        Some(self.taken(letter))
    }

    /// Units queued now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Rows(usize);
    impl Weighted for Rows {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[tokio::test]
    async fn a_full_mailbox_makes_the_sender_wait_with_exact_counts() {
        let (tx, mut rx) = mailbox::<Rows>("test", "test", 10);
        for _ in 0..10 {
            tx.send(Rows(1)).await.unwrap();
        }
        assert_eq!(rx.queued(), 10);
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.send(Rows(1))).await;
        assert!(blocked.is_err(), "the 11th row must wait");
        assert!(rx.recv().await.is_some());
        tx.send(Rows(1)).await.unwrap();
        assert_eq!(rx.queued(), 10);
    }

    #[tokio::test]
    async fn heavy_messages_go_alone_and_closing_is_reported() {
        let (tx, mut rx) = mailbox::<Rows>("test2", "test2", 4);
        tx.send(Rows(100)).await.unwrap();
        assert_eq!(rx.queued(), 4);
        assert!(tokio::time::timeout(Duration::from_millis(20), tx.send(Rows(1))).await.is_err());
        assert_eq!(rx.try_recv().map(|r| r.0), Some(100));
        drop(rx);
        assert_eq!(tx.send(Rows(1)).await, Err(Closed("test2")));
    }
}
