//! Which server of a group gets a request: pure decisions over the
//! candidates (servers that take requests and were not tried yet for this
//! request), unit-tested without sockets.

use std::net::IpAddr;

use crate::config::Balance;

/// What a decision may look at.
pub struct Choice<'a> {
    /// Indices into the group's servers, in the group's order; never empty.
    pub candidates: &'a [usize],
    /// This worker's requests in flight to server `i`.
    pub in_flight: &'a dyn Fn(usize) -> usize,
    /// Each server's hash (of its address as written), by index.
    pub server_hashes: &'a [u64],
    pub client: IpAddr,
    /// This worker's request counter (round robin).
    pub turn: usize,
    /// Two fresh random numbers.
    pub random: [u64; 2],
}

/// The chosen server's index.
pub fn choose(balance: Balance, choice: &Choice<'_>) -> usize {
    let candidates = choice.candidates;
    if candidates.len() == 1 {
        return candidates[0];
    }
    let pick = |r: u64| candidates[(r % candidates.len() as u64) as usize];
    match balance {
        Balance::RoundRobin => candidates[choice.turn % candidates.len()],
        Balance::Random => pick(choice.random[0]),
        Balance::LeastRequest => {
            // Power of two choices (Envoy's default): two distinct random
            // candidates, the one with fewer requests in flight.
            let first = (choice.random[0] % candidates.len() as u64) as usize;
            let offset = 1 + (choice.random[1] % (candidates.len() as u64 - 1)) as usize;
            let second = (first + offset) % candidates.len();
            let (a, b) = (candidates[first], candidates[second]);
            if (choice.in_flight)(b) < (choice.in_flight)(a) {
                b
            } else {
                a
            }
        }
        Balance::ClientIp => {
            // Rendezvous hashing: the highest score of (client, server)
            // wins, so removing a server moves only its own clients, and
            // adding one takes about 1/N of everyone's.
            let client = hash_ip(choice.client);
            candidates
                .iter()
                .copied()
                .max_by_key(|&i| mix(client ^ choice.server_hashes.get(i).copied().unwrap_or(0)))
                .unwrap_or(candidates[0])
        }
    }
}

/// FNV-1a over the bytes: stable across processes and builds, so every
/// instance behind a load balancer sends a client to the same server.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(&v4.octets()),
            None => hash_bytes(&v6.octets()),
        },
    }
}

/// splitmix64's finalizer: every input bit moves every output bit.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| hash_bytes(format!("http://10.0.0.{i}:3000").as_bytes()))
            .collect()
    }

    fn decide(
        balance: Balance,
        candidates: &[usize],
        in_flight: &dyn Fn(usize) -> usize,
        client: IpAddr,
        turn: usize,
        seed: u64,
    ) -> usize {
        let server_hashes = hashes(8);
        choose(
            balance,
            &Choice {
                candidates,
                in_flight,
                server_hashes: &server_hashes,
                client,
                turn,
                random: [mix(seed), mix(seed ^ 0x5555)],
            },
        )
    }

    #[test]
    fn round_robin_takes_turns() {
        let picks: Vec<usize> = (0..6)
            .map(|t| {
                decide(
                    Balance::RoundRobin,
                    &[0, 2, 3],
                    &|_| 0,
                    [1, 1, 1, 1].into(),
                    t,
                    0,
                )
            })
            .collect();
        assert_eq!(picks, [0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn least_request_avoids_the_busy_server_and_spreads_otherwise() {
        let busy = |i: usize| if i == 1 { 10 } else { 0 };
        let mut counts = [0usize; 3];
        for seed in 0..3000 {
            counts[decide(
                Balance::LeastRequest,
                &[0, 1, 2],
                &busy,
                [1, 1, 1, 1].into(),
                0,
                seed,
            )] += 1;
        }
        // server 1 only wins when both draws... never: two distinct
        // candidates always include a less busy one
        assert_eq!(counts[1], 0, "{counts:?}");
        assert!(counts[0] > 1200 && counts[2] > 1200, "{counts:?}");
        let mut idle = [0usize; 3];
        for seed in 0..3000 {
            idle[decide(
                Balance::LeastRequest,
                &[0, 1, 2],
                &|_| 0,
                [1, 1, 1, 1].into(),
                0,
                seed,
            )] += 1;
        }
        assert!(idle.iter().all(|&c| c > 800), "{idle:?}");
    }

    #[test]
    fn random_spreads() {
        let mut counts = [0usize; 4];
        for seed in 0..4000 {
            counts[decide(
                Balance::Random,
                &[0, 1, 2, 3],
                &|_| 0,
                [1, 1, 1, 1].into(),
                0,
                seed,
            )] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn client_ip_moves_only_the_removed_servers_clients() {
        let all = [0, 1, 2, 3, 4];
        let without_2 = [0, 1, 3, 4];
        let mut moved = 0;
        let mut on_2 = 0;
        let mut spread = [0usize; 5];
        for n in 0..5000u32 {
            let client = IpAddr::from((0x0a00_0000 + n).to_be_bytes());
            let before = decide(Balance::ClientIp, &all, &|_| 0, client, 0, 0);
            let after = decide(Balance::ClientIp, &without_2, &|_| 0, client, 7, 9);
            spread[before] += 1;
            if before == 2 {
                on_2 += 1;
            } else if before != after {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "clients of the servers that stayed moved");
        assert!(on_2 > 700 && on_2 < 1300, "{on_2}");
        assert!(spread.iter().all(|&c| c > 700), "{spread:?}");
    }

    #[test]
    fn client_ip_is_stable_for_one_client() {
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let first = decide(Balance::ClientIp, &[0, 1, 2], &|_| 0, client, 0, 1);
        for seed in 0..50 {
            assert_eq!(
                decide(
                    Balance::ClientIp,
                    &[0, 1, 2],
                    &|_| 0,
                    client,
                    seed as usize,
                    seed
                ),
                first
            );
        }
    }
}
