//! The circuit breaker in front of the shared (Redis) limiter: when to stop
//! asking a Redis that keeps failing, and when to try it again.
//!
//! Closed, every request asks Redis (each bounded by `timeout`). After
//! [`Circuit::FAILURES_TO_OPEN`] failures in a row it opens: requests skip
//! Redis without waiting at all and `on_error` decides. When the back-off has
//! passed, exactly one request is let through as a probe; its success closes
//! the circuit, its failure opens it again for twice as long (up to
//! [`Circuit::MAX_BACKOFF`], so a Redis that comes back is used again within
//! a few seconds). A probe that never reports (its client went away) stops
//! counting as one after `probe_timeout`, and the next request probes.
//!
//! Pure state over instants the caller passes in; the live wrapper holds it
//! under a lock and logs the [`Transition`]s, one line each.

use std::time::{Duration, Instant};

/// What a request does about Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Ask Redis.
    Ask,
    /// Ask Redis, as the one probe of an open circuit.
    Probe,
    /// Do not ask: the circuit is open (or another request is probing).
    Skip,
}

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed → open after `failures` failures in a row; next probe in `retry_in`.
    Opened { failures: u32, retry_in: Duration },
    /// A probe succeeded: Redis is used again.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    /// Skip until the instant, then probe.
    Open(Instant),
    /// A probe is out; skip until the instant, when it no longer counts.
    Probing(Instant),
}

#[derive(Debug, Clone)]
pub struct Circuit {
    state: State,
    failures: u32,
    backoff: Duration,
    probe_timeout: Duration,
}

impl Circuit {
    /// Failures in a row that open the circuit.
    pub const FAILURES_TO_OPEN: u32 = 3;
    /// The first back-off; doubled by each failed probe.
    pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
    /// The longest back-off between probes.
    pub const MAX_BACKOFF: Duration = Duration::from_secs(4);

    /// A closed circuit whose probes give up after `probe_timeout` (the
    /// operation timeout, plus a margin).
    pub fn new(probe_timeout: Duration) -> Self {
        Circuit {
            state: State::Closed,
            failures: 0,
            backoff: Self::FIRST_BACKOFF,
            probe_timeout,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Ask,
            State::Open(until) | State::Probing(until) if now < until => Admit::Skip,
            State::Open(_) | State::Probing(_) => {
                self.state = State::Probing(now + self.probe_timeout);
                Admit::Probe
            }
        }
    }

    pub fn success(&mut self) -> Option<Transition> {
        self.failures = 0;
        self.backoff = Self::FIRST_BACKOFF;
        if self.state == State::Closed {
            None
        } else {
            self.state = State::Closed;
            Some(Transition::Closed)
        }
    }

    pub fn failure(&mut self, now: Instant) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            State::Closed if self.failures < Self::FAILURES_TO_OPEN => None,
            State::Closed => {
                self.state = State::Open(now + self.backoff);
                Some(Transition::Opened {
                    failures: self.failures,
                    retry_in: self.backoff,
                })
            }
            State::Open(_) | State::Probing(_) => {
                self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
                self.state = State::Open(now + self.backoff);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: Duration = Duration::from_millis(100);

    fn opened(now: Instant) -> Circuit {
        let mut circuit = Circuit::new(PROBE);
        for _ in 1..Circuit::FAILURES_TO_OPEN {
            assert_eq!(circuit.failure(now), None);
            assert_eq!(circuit.admit(now), Admit::Ask);
        }
        assert_eq!(
            circuit.failure(now),
            Some(Transition::Opened {
                failures: Circuit::FAILURES_TO_OPEN,
                retry_in: Circuit::FIRST_BACKOFF
            })
        );
        circuit
    }

    #[test]
    fn a_success_between_failures_keeps_it_closed() {
        let now = Instant::now();
        let mut circuit = Circuit::new(PROBE);
        for _ in 0..10 {
            assert_eq!(circuit.failure(now), None);
            assert_eq!(circuit.failure(now), None);
            assert_eq!(circuit.success(), None);
        }
        assert!(circuit.is_closed());
    }

    #[test]
    fn open_skips_until_the_backoff_then_lets_one_probe_through() {
        let now = Instant::now();
        let mut circuit = opened(now);
        assert_eq!(circuit.admit(now), Admit::Skip);
        let later = now + Circuit::FIRST_BACKOFF;
        assert_eq!(circuit.admit(later - Duration::from_millis(1)), Admit::Skip);
        assert_eq!(circuit.admit(later), Admit::Probe);
        assert_eq!(circuit.admit(later), Admit::Skip, "one probe at a time");
        assert_eq!(circuit.success(), Some(Transition::Closed));
        assert_eq!(circuit.admit(later), Admit::Ask);
        assert_eq!(circuit.success(), None, "one line per transition");
    }

    #[test]
    fn failed_probes_double_the_backoff_up_to_the_cap() {
        let mut now = Instant::now();
        let mut circuit = opened(now);
        let mut expected = Circuit::FIRST_BACKOFF;
        for _ in 0..10 {
            now += expected;
            assert_eq!(circuit.admit(now), Admit::Probe);
            assert_eq!(circuit.failure(now), None, "still open: no new line");
            expected = (expected * 2).min(Circuit::MAX_BACKOFF);
            assert_eq!(
                circuit.admit(now + expected - Duration::from_millis(1)),
                Admit::Skip
            );
        }
        assert_eq!(expected, Circuit::MAX_BACKOFF);
        now += expected;
        assert_eq!(circuit.admit(now), Admit::Probe);
        assert_eq!(circuit.success(), Some(Transition::Closed));
        // The next outage starts again from the first back-off.
        for _ in 1..Circuit::FAILURES_TO_OPEN {
            assert_eq!(circuit.failure(now), None);
        }
        assert_eq!(
            circuit.failure(now),
            Some(Transition::Opened {
                failures: Circuit::FAILURES_TO_OPEN,
                retry_in: Circuit::FIRST_BACKOFF
            })
        );
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced() {
        let now = Instant::now();
        let mut circuit = opened(now);
        let at = now + Circuit::FIRST_BACKOFF;
        assert_eq!(circuit.admit(at), Admit::Probe);
        assert_eq!(
            circuit.admit(at + PROBE - Duration::from_millis(1)),
            Admit::Skip
        );
        assert_eq!(circuit.admit(at + PROBE), Admit::Probe);
    }
}
