//! An HTTP/2 connection that runs its own streams.
//!
//! hyper hands each new HTTP/2 stream (the request's service future, then
//! its response body) to the connection's executor. With tokio's executor
//! every stream is a task of its own: allocated, registered with the
//! runtime, scheduled, woken and released again, about 700 instructions
//! per request under callgrind, and the connection's task is woken once
//! more by each answer. Here the executor only queues the stream, and
//! [`WithStreams`] polls the queued streams inside the connection's own
//! task: answers produced while it runs are flushed by the same poll.
//!
//! The streams live and die with their connection, as they do in effect
//! with tokio's executor: once hyper's connection has ended, every stream
//! left is one whose client is gone (hyper resets them), so dropping them
//! cancels what they were waiting on, the upstream request included. A
//! stream that panicked would take its connection's other streams with it,
//! as any panic in an HTTP/1.1 connection's request already does.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor given to hyper for one HTTP/2 connection: it queues each
/// stream for that connection's [`WithStreams`].
#[derive(Clone, Default)]
pub struct StreamQueue {
    queued: Arc<Mutex<Vec<Stream>>>,
}

impl StreamQueue {
    fn lock(&self) -> MutexGuard<'_, Vec<Stream>> {
        // Only push and drain happen under the lock; a panic cannot leave
        // the vector half-changed.
        self.queued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<F> hyper::rt::Executor<F> for StreamQueue
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.lock().push(Box::pin(stream));
    }
}

/// Polls at most this many rounds of (streams, connection, new streams) in
/// one wake-up before yielding to the worker's other tasks.
const ROUNDS_PER_POLL: usize = 4;

/// hyper's HTTP/2 connection `C` together with the streams it started.
pub struct WithStreams<C> {
    connection: Pin<Box<C>>,
    queue: StreamQueue,
    streams: FuturesUnordered<Stream>,
}

impl<C> WithStreams<C> {
    /// `connection` must have been built with `queue` as its executor.
    pub fn new(connection: C, queue: StreamQueue) -> Self {
        WithStreams {
            connection: Box::pin(connection),
            queue,
            streams: FuturesUnordered::new(),
        }
    }

    pub fn connection(&mut self) -> Pin<&mut C> {
        self.connection.as_mut()
    }

    /// Moves the streams hyper started into the set; whether there were any.
    fn take_queued(&mut self) -> bool {
        let mut queued = self.queue.lock();
        if queued.is_empty() {
            return false;
        }
        self.streams.extend(queued.drain(..));
        true
    }

    /// Polls the streams until none is ready.
    fn poll_streams(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(cx) {}
    }
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        // Every field is Unpin (the connection is boxed).
        let this = self.get_mut();
        // Streams first, so that answers they produce now go out with the
        // connection's poll below rather than at a later wake-up.
        this.poll_streams(cx);
        for _ in 0..ROUNDS_PER_POLL {
            if let Poll::Ready(output) = this.connection.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            if !this.take_queued() {
                return Poll::Pending;
            }
            // New streams start now: most send their upstream request and
            // wait; an answer the proxy gives at once (a 401, a 404) needs
            // the connection polled again to go out.
            this.poll_streams(cx);
        }
        // More requests keep arriving: let the worker's other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A connection that starts `streams` streams on its first poll, each
    /// counting its completion, and ends once told to.
    struct FakeConnection {
        queue: StreamQueue,
        started: bool,
        streams: usize,
        done: Arc<AtomicUsize>,
        end: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Future for FakeConnection {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if !self.started {
                self.started = true;
                for _ in 0..self.streams {
                    let done = self.done.clone();
                    self.queue.execute(async move {
                        tokio::task::yield_now().await;
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
            if self.end.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn streams_a_connection_starts_run_to_completion_in_its_task() {
        let queue = StreamQueue::default();
        let done = Arc::new(AtomicUsize::new(0));
        let end = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connection = FakeConnection {
            queue: queue.clone(),
            started: false,
            streams: 10,
            done: done.clone(),
            end: end.clone(),
        };
        let mut driven = WithStreams::new(connection, queue);
        let waited = std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut driven).poll(cx);
            if done.load(Ordering::SeqCst) == 10 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), waited)
            .await
            .expect("all ten streams finished");
        assert!(driven.streams.is_empty(), "finished streams are released");
        end.store(true, Ordering::SeqCst);
        tokio::time::timeout(std::time::Duration::from_secs(5), driven)
            .await
            .expect("the connection ends");
    }

    #[tokio::test]
    async fn streams_left_when_the_connection_ends_are_dropped_with_it() {
        let queue = StreamQueue::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        struct CountDrop(Arc<AtomicUsize>);
        impl Drop for CountDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = CountDrop(dropped.clone());
        queue.execute(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        let mut driven = WithStreams::new(std::future::ready(()), queue);
        // The stream was queued before the connection's first poll, which
        // ends the connection at once.
        assert!(driven.take_queued());
        driven.await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
