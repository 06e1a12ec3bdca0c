//! Keeping the workers' shares of the open connections even.
//!
//! Each worker accepts on its own `SO_REUSEPORT` listener, and the kernel
//! picks the listener by a hash of the connection's addresses and ports,
//! not by how busy a worker is. With 64 keep-alive connections on two
//! workers that hash typically leaves one with 35 and the other with 29
//! for as long as they stay open, and two HTTP/2 connections share a
//! worker half the time: on cores of its own, the fuller worker runs out
//! of CPU while the other has some to spare. HAProxy's listeners likewise
//! spread what they accept over their threads by load, and Envoy's
//! `exact_balance` by connection count.
//!
//! So a worker that accepts a connection while it holds more than the
//! least loaded worker hands the socket over to that worker, which does
//! the TLS handshake and serves it (`server::worker`): every connection is
//! served by a worker with the fewest open ones. The decision is
//! [`choose`], a pure function of the counts; the counts are
//! [`WorkerLoads`], one atomic per worker, raised when a connection is
//! placed and lowered when it closes ([`crate::connection::ConnectionSlot`]).
//! Counting at placement, before the other worker has picked the socket
//! up, keeps a burst of accepts from all landing on the same worker.
//!
//! A handover costs the socket a second epoll registration and the other
//! worker a wake-up, a few µs. Short connections gain nothing from it (an
//! uneven share of them evens out as they close), and with 16 concurrent
//! clients doing one request per connection about 40% are handed over;
//! measured, that costs nothing visible (`bench/ab.sh`, full handshakes:
//! 0.999 and 0.988 against the build before). Long ones gain the most
//! (`bench/spread.sh`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::connection::ConnectionSlot;
use crate::telemetry::{Metrics, WorkerLabels};

/// The worker that should serve a connection `accepting` has just
/// accepted, given every worker's open connections in worker order
/// (without the new one): `accepting` itself unless another has fewer.
pub fn choose(accepting: usize, loads: impl IntoIterator<Item = usize>) -> usize {
    let mut own = None;
    // The first of the least loaded, so that ties go to one worker and
    // not to whichever a scan happened to end on.
    let mut least: Option<(usize, usize)> = None;
    for (worker, load) in loads.into_iter().enumerate() {
        if worker == accepting {
            own = Some(load);
        }
        if least.is_none_or(|(_, least_load)| load < least_load) {
            least = Some((worker, load));
        }
    }
    match (own, least) {
        (Some(own), Some((least, least_load))) if least_load < own => least,
        _ => accepting,
    }
}

/// One worker's count on a cache line of its own: every worker writes its
/// own on each open and close and reads the others' on each accept.
#[repr(align(128))]
#[derive(Default)]
struct Load(AtomicUsize);

/// Every worker's open HTTPS connections, as placed by [`choose`].
pub struct WorkerLoads {
    loads: Box<[Load]>,
}

impl WorkerLoads {
    pub fn new(workers: usize) -> Self {
        WorkerLoads {
            loads: (0..workers).map(|_| Load::default()).collect(),
        }
    }

    /// Where the connection `accepting` has just accepted should be served.
    /// A count that moves while this reads the others only makes the
    /// choice a little stale, never wrong.
    pub fn place(&self, accepting: usize) -> usize {
        choose(
            accepting,
            self.loads.iter().map(|load| load.0.load(Ordering::Relaxed)),
        )
    }

    /// Brings `portcullis_worker_connections` up to date (before a scrape).
    pub fn refresh_gauges(&self, metrics: &Metrics) {
        for (worker, load) in self.loads.iter().enumerate() {
            metrics
                .worker_connections
                .get_or_create(&WorkerLabels {
                    worker: u32::try_from(worker).unwrap_or(u32::MAX),
                })
                .set(i64::try_from(load.0.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
    }

    pub fn opened(&self, worker: usize) {
        if let Some(load) = self.loads.get(worker) {
            load.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn closed(&self, worker: usize) {
        if let Some(load) = self.loads.get(worker) {
            load.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn snapshot(&self) -> Vec<usize> {
        self.loads
            .iter()
            .map(|l| l.0.load(Ordering::Relaxed))
            .collect()
    }
}

/// An accepted connection on its way to the worker that will serve it:
/// the socket (out of the accepting worker's reactor), the client's
/// address, and its `max_connections` slot, already counted against the
/// receiving worker.
pub struct Handover {
    pub tcp: std::net::TcpStream,
    pub peer: SocketAddr,
    pub slot: ConnectionSlot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_among_the_least_loaded_keeps_what_it_accepts() {
        assert_eq!(choose(0, [0, 0]), 0);
        assert_eq!(choose(1, [7, 3, 3]), 1);
        assert_eq!(choose(0, [2, 9]), 0);
    }

    #[test]
    fn a_worker_ahead_of_another_hands_over_to_the_least_loaded() {
        assert_eq!(choose(0, [1, 0]), 1);
        assert_eq!(choose(2, [20, 17, 20]), 1);
    }

    #[test]
    fn ties_go_to_the_first_least_loaded_worker() {
        assert_eq!(choose(3, [9, 2, 2, 9]), 1);
    }

    #[test]
    fn a_worker_outside_the_counts_keeps_its_connection() {
        assert_eq!(choose(5, [40, 0]), 5);
        assert_eq!(choose(0, []), 0);
    }

    #[test]
    fn a_burst_of_accepts_on_one_worker_ends_even() {
        // The kernel's hash sends all of a burst to worker 0; placing,
        // then counting, each as `worker_loop` does splits it evenly.
        let loads = WorkerLoads::new(2);
        for _ in 0..101 {
            let worker = loads.place(0);
            loads.opened(worker);
        }
        assert_eq!(loads.snapshot(), vec![51, 50]);
        for (worker, &count) in loads.snapshot().iter().enumerate() {
            for _ in 0..count {
                loads.closed(worker);
            }
        }
        assert_eq!(loads.snapshot(), vec![0, 0]);
    }

    #[test]
    fn one_worker_never_hands_over() {
        let loads = WorkerLoads::new(1);
        for _ in 0..100 {
            loads.opened(loads.place(0));
        }
        assert_eq!(loads.snapshot(), vec![100]);
    }
}
