//! The swap queue: an unbounded multi-producer, single-consumer queue whose
//! memory follows its backlog.
//!
//! It does what tokio's unbounded `mpsc` channel does for a client's
//! outbound messages, with one difference that matters for a chat server:
//! an empty queue holds no buffer. Senders push into a buffer under a
//! `parking_lot::Mutex`; the receiver takes the whole backlog in one swap
//! and hands it out without the lock, and before it waits on an empty queue
//! it frees both buffers. The buffers ([`Buffer`]) keep a backlog of 1 KiB
//! or more out of the allocator's heap, so that a storm's backlogs leave no
//! holes among the connections' long-lived state
//! ([`backlog`](crate::room::backlog)). tokio's channel keeps the 32-slot
//! blocks a burst grew (up to four per channel) and a 512-byte head per
//! channel for as long as the channel lives, which for 5,000 idle clients
//! after an arrival storm was 1.6 KiB each. docs/results.md ("Idle memory
//! after an arrival storm") has the measurements.
//!
//! The lock is held for one push, or for one swap: senders never wait on
//! the receiver's work, and a burst wakes the receiver once (the push that
//! finds it waiting takes its waker).

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use parking_lot::Mutex;

use crate::memory;
use crate::room::backlog::Buffer;

/// Creates a queue: clone the sender as often as needed; the receiver gets
/// `None` once every sender is gone and the backlog is drained.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        senders: AtomicUsize::new(1),
        state: Mutex::new(State {
            queue: Buffer::new(),
            waiting: None,
            closed: false,
            abandoned: false,
        }),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver {
            shared,
            taken: Buffer::new(),
        },
    )
}

#[derive(Debug)]
struct Shared<T> {
    /// Live [`Sender`]s; the queue closes when the last one goes.
    senders: AtomicUsize,
    state: Mutex<State<T>>,
}

#[derive(Debug)]
struct State<T> {
    queue: Buffer<T>,
    /// The receiver, while it waits on an empty queue.
    waiting: Option<Waker>,
    /// Every [`Sender`] is gone.
    closed: bool,
    /// The [`Receiver`] is gone: nothing sent would ever be received.
    abandoned: bool,
}

/// The sending half; cheap to clone.
#[derive(Debug)]
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Appends `value`, or gives it back if the receiver is gone.
    pub(crate) fn send(&self, value: T) -> Result<(), T> {
        let mut state = self.shared.state.lock();
        if state.abandoned {
            return Err(value);
        }
        state.queue.push_back(value);
        let waiting = state.waiting.take();
        drop(state);
        if let Some(receiver) = waiting {
            receiver.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Sender<T> {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let waiting = {
            let mut state = self.shared.state.lock();
            state.closed = true;
            state.waiting.take()
        };
        if let Some(receiver) = waiting {
            receiver.wake();
        }
    }
}

/// The receiving half.
#[derive(Debug)]
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The backlog taken in the last swap, being handed out.
    taken: Buffer<T>,
}

impl<T> Receiver<T> {
    /// The next value if one is ready now.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        if let Some(value) = self.taken.pop_front() {
            return Some(value);
        }
        let mut state = self.shared.state.lock();
        take_backlog(&mut self.taken, &mut state)
    }

    /// The next value; `None` once every sender is gone and everything sent
    /// has been received. Frees the queue's buffers before it waits.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        if let Some(value) = self.try_recv() {
            return Some(value);
        }
        release(&mut self.taken);
        let (shared, taken) = (&self.shared, &mut self.taken);
        poll_fn(|cx| {
            let mut state = shared.state.lock();
            if let Some(value) = take_backlog(taken, &mut state) {
                return Poll::Ready(Some(value));
            }
            if state.closed {
                return Poll::Ready(None);
            }
            release(&mut state.queue);
            match &state.waiting {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => state.waiting = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Free what is queued now rather than when the last sender goes.
        let backlog = {
            let mut state = self.shared.state.lock();
            state.abandoned = true;
            state.waiting = None;
            std::mem::take(&mut state.queue)
        };
        drop(backlog);
    }
}

/// Moves the whole backlog, if there is one, into `taken` (which is empty)
/// and returns its first value. Swapping leaves the queue the empty buffer
/// of the previous backlog, so a busy queue reuses two buffers instead of
/// allocating.
fn take_backlog<T>(taken: &mut Buffer<T>, state: &mut State<T>) -> Option<T> {
    if state.queue.is_empty() {
        return None;
    }
    std::mem::swap(&mut state.queue, taken);
    taken.pop_front()
}

/// Frees the buffer of an empty `queue`, telling the server's memory
/// housekeeping about a large one (see [`memory`]).
fn release<T>(queue: &mut Buffer<T>) {
    if queue.capacity() != 0 {
        memory::note_released(queue.capacity() * std::mem::size_of::<T>());
        *queue = Buffer::new();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn delivers_in_order_then_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = channel();
        let other = tx.clone();
        for i in 0..100 {
            tx.send(i).unwrap();
        }
        drop(tx);
        other.send(100).unwrap();
        drop(other);
        for i in 0..=100 {
            assert_eq!(rx.recv().await, Some(i));
        }
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn one_sender_leaving_does_not_end_the_queue() {
        let (tx, mut rx) = channel::<u32>();
        drop(tx.clone());
        assert!(
            timeout(Duration::from_millis(50), rx.recv()).await.is_err(),
            "a sender is still alive: recv must keep waiting"
        );
        drop(tx);
        assert_eq!(timeout(PATIENCE, rx.recv()).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_receiver_is_woken_by_another_thread() {
        let (tx, mut rx) = channel();
        let receiving = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(value) = rx.recv().await {
                got.push(value);
            }
            got
        });
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        tx.send((s, i)).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        for sender in senders {
            sender.join().unwrap();
        }
        let got = timeout(PATIENCE, receiving).await.unwrap().unwrap();
        assert_eq!(got.len(), 40_000);
        for s in 0..4 {
            let own: Vec<_> = got.iter().filter(|(from, _)| *from == s).collect();
            assert!(
                own.windows(2).all(|w| w[0].1 + 1 == w[1].1),
                "sender {s}'s values out of order"
            );
        }
    }

    #[tokio::test]
    async fn sending_to_a_dropped_receiver_gives_the_value_back() {
        let (tx, rx) = channel();
        tx.send(1).unwrap();
        drop(rx);
        assert_eq!(tx.send(2), Err(2));
        assert!(tx.shared.state.lock().queue.is_empty(), "backlog freed");
    }

    #[tokio::test]
    async fn an_idle_queue_holds_no_buffer_whatever_its_last_backlog() {
        let (tx, mut rx) = channel();
        for i in 0..10_000 {
            tx.send(i).unwrap();
        }
        assert_eq!(rx.try_recv(), Some(0));
        // The burst arrives again while the first is being handed out, so
        // both buffers are large.
        for i in 0..10_000 {
            tx.send(i).unwrap();
        }
        for _ in 1..20_000 {
            assert!(rx.try_recv().is_some());
        }
        assert!(timeout(Duration::from_millis(10), rx.recv()).await.is_err());
        assert_eq!(rx.taken.capacity(), 0);
        assert_eq!(tx.shared.state.lock().queue.capacity(), 0);
        // And it still works afterwards.
        tx.send(7).unwrap();
        assert_eq!(timeout(PATIENCE, rx.recv()).await.unwrap(), Some(7));
    }
}
