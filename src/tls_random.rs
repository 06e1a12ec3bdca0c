//! The random bytes rustls asks its crypto provider for, served from a small
//! per-thread buffer that aws-lc refills, instead of one aws-lc call each.
//!
//! aws-lc's `RAND_bytes` draws fresh CPU entropy (`RDRAND`) and rekeys its
//! DRBG on every call, whatever its size. A full handshake makes five such
//! calls through rustls's provider for 4 to 32 bytes each (the server's
//! hello random, then a nonce and an age mask per session ticket), and
//! `perf record` put them at 1.8% of the proxy's CPU per new connection.
//! One call of [`REFILL`] bytes now serves several handshakes.
//!
//! The bytes are aws-lc's DRBG output all the same, handed out once and
//! wiped from the buffer as they go; what buffering gives up is only the
//! per-call prediction resistance against someone who can read this
//! process's memory, who could read its session keys as well. And what
//! rustls (0.23) draws through this interface is public: hello randoms,
//! session IDs, ticket nonces and age masks. Key shares, signature nonces
//! and ticket encryption draw from aws-lc directly and are not affected.

use std::cell::RefCell;

use rustls::crypto::{GetRandomFailed, SecureRandom};

/// How many bytes one aws-lc call fetches: about five full handshakes'
/// worth (104 bytes each with two tickets: 32 for the hello random, 32 and
/// 4 per ticket).
const REFILL: usize = 512;

/// Asks larger than this go to aws-lc directly: they are rare, and would
/// drain the buffer for little gain.
const LARGEST_BUFFERED: usize = 64;

/// The rustls provider's `secure_random`.
#[derive(Debug)]
pub struct BufferedRandom;

/// The one instance, for `CryptoProvider::secure_random` (a `&'static`).
pub static BUFFERED_RANDOM: BufferedRandom = BufferedRandom;

struct Pool {
    bytes: [u8; REFILL],
    /// Bytes before this were handed out (and wiped).
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            bytes: [0; REFILL],
            used: REFILL,
        })
    };
}

impl SecureRandom for BufferedRandom {
    fn fill(&self, out: &mut [u8]) -> Result<(), GetRandomFailed> {
        if out.len() > LARGEST_BUFFERED {
            return direct(out);
        }
        // A thread being torn down has no pool left: aws-lc directly.
        POOL.try_with(|pool| pool.borrow_mut().take(out))
            .unwrap_or_else(|_| direct(out))
    }
}

impl Pool {
    fn take(&mut self, out: &mut [u8]) -> Result<(), GetRandomFailed> {
        if REFILL - self.used < out.len() {
            // A failed refill leaves the pool empty, not half new.
            self.used = REFILL;
            direct(&mut self.bytes)?;
            self.used = 0;
        }
        let end = self.used + out.len();
        let fresh = &mut self.bytes[self.used..end];
        out.copy_from_slice(fresh);
        fresh.fill(0);
        self.used = end;
        Ok(())
    }
}

fn direct(out: &mut [u8]) -> Result<(), GetRandomFailed> {
    aws_lc_rs::rand::fill(out).map_err(|_| GetRandomFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_handed_out_once_and_wiped() {
        let mut pool = Pool {
            bytes: [0; REFILL],
            used: REFILL,
        };
        let mut seen = Vec::new();
        for len in [32, 4, 32, 4, 32, 1, 0, 63, 64] {
            let mut out = vec![0u8; len];
            pool.take(&mut out).unwrap();
            assert!(pool.bytes[..pool.used].iter().all(|&b| b == 0));
            // Served bytes are wiped: served twice, they would be zeros.
            assert!(len < 4 || out.iter().any(|&b| b != 0), "{len} zero bytes");
            seen.extend(out);
        }
        // 232 bytes from one refill, none served twice.
        assert_eq!(pool.used, 232);
        let runs: Vec<&[u8]> = seen.chunks(32).collect();
        for (i, run) in runs.iter().enumerate() {
            assert!(run.iter().any(|&b| b != 0), "run {i} is blank");
            assert!(!runs[i + 1..].contains(run), "run {i} repeats");
        }
    }

    #[test]
    fn a_request_past_the_end_refills_first() {
        let mut pool = Pool {
            bytes: [0; REFILL],
            used: REFILL - 10,
        };
        let mut out = [0u8; 32];
        pool.take(&mut out).unwrap();
        assert_eq!(pool.used, 32);
        assert!(out.iter().any(|&b| b != 0));
    }

    #[test]
    fn large_and_small_requests_are_random() {
        let mut small = [0u8; 32];
        let mut again = [0u8; 32];
        let mut large = [0u8; 4096];
        BUFFERED_RANDOM.fill(&mut small).unwrap();
        BUFFERED_RANDOM.fill(&mut again).unwrap();
        BUFFERED_RANDOM.fill(&mut large).unwrap();
        assert_ne!(small, again);
        assert_ne!(small, [0; 32]);
        assert!(large.iter().filter(|&&b| b == 0).count() < 64);
    }
}
