//! A free loopback port for a daemon a test starts, which binds it later.
//!
//! The usual way — bind port 0, read the port, close, hand the number on — leaves a
//! gap in which the port is free again, and it is a port of the kernel's ephemeral
//! range (`net.ipv4.ip_local_port_range`): the range `connect()` takes its local
//! ports from. Every client connection any test makes in that gap may take it, and
//! the daemon then fails to start with "address in use". The ports here come from
//! below that range (and above the daemons' default ports), which neither `connect()`
//! nor a bind to port 0 ever hands out; within one process no port is handed out
//! twice, and each is checked free (TCP and UDP) when picked.
//!
//! The check binds the port but never listens on it. A child process that another
//! thread spawns at that moment holds a copy of every descriptor until it execs; a
//! listening socket copied there would accept connections on the port for that while,
//! and a test waiting for its daemon to answer on the port would take that for the
//! daemon. A socket that is only bound accepts nothing.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

use socket2::{Domain, Socket, Type};

/// The lowest port handed out: above the daemons' own default ports (2080–2084, 8080,
/// 8888, 11435, ...), which a test may run a daemon on.
const LOWEST: u16 = 20_000;

/// Ports handed out so far by this process: the next search starts after them.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A loopback port free for TCP and UDP now, outside the ephemeral range, not handed
/// out before by this process. Panics when none is free (a test cannot go on).
pub fn free_port() -> u16 {
    let (low, high) = candidate_range(
        &std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default(),
    );
    // Different processes (test binaries, one after another, whose daemons may linger
    // a moment) start at different places.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    next_free((low, high), seed, &HANDED_OUT, is_free)
        .unwrap_or_else(|| panic!("no free loopback port in {low}..={high}"))
}

/// The next port of `range` after the `counter`-th from `seed` that `free` accepts.
fn next_free(
    (low, high): (u16, u16),
    seed: u32,
    counter: &AtomicU32,
    free: impl Fn(u16) -> bool,
) -> Option<u16> {
    let span = u32::from(high - low) + 1;
    (0..span).find_map(|_| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let port = low + (seed.wrapping_add(n) % span) as u16;
        free(port).then_some(port)
    })
}

/// The ports below the ephemeral range (`ip_local_port_range`'s text: "low high"),
/// from [`LOWEST`]; above it when there is no room below (a range set to start low).
fn candidate_range(ephemeral: &str) -> (u16, u16) {
    let mut bounds = ephemeral
        .split_ascii_whitespace()
        .map(|v| v.parse::<u16>().ok());
    let (e_low, e_high) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(l), Some(h)) if l <= h => (l, h),
        _ => (32_768, 60_999), // Linux's default
    };
    if e_low > LOWEST + 1_000 {
        (LOWEST, e_low - 1)
    } else if e_high < u16::MAX - 1_000 {
        (e_high + 1, u16::MAX)
    } else {
        (LOWEST, u16::MAX) // the range is nearly everything: nothing better to do
    }
}

/// Whether `port` can be bound on loopback for TCP and UDP now. The TCP socket is bound
/// with `SO_REUSEADDR`, as the daemons' listeners are: a port left in TIME_WAIT is
/// free, one any socket listens on is not. It is never listened on (see above).
fn is_free(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp_free = Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())
        })
        .is_ok();
    tcp_free && UdpSocket::bind(addr).is_ok()
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range() {
        assert_eq!(candidate_range("32768\t60999\n"), (20_000, 32_767));
        assert_eq!(candidate_range("25000 30000"), (20_000, 24_999));
        // No room below: above.
        assert_eq!(candidate_range("20500 40000"), (40_001, u16::MAX));
        assert_eq!(candidate_range("1024 65000"), (20_000, u16::MAX));
        // Unreadable: Linux's default.
        assert_eq!(candidate_range(""), (20_000, 32_767));
        assert_eq!(candidate_range("60999 32768"), (20_000, 32_767));
    }

    #[test]
    fn a_port_is_free_outside_the_ephemeral_range_and_never_handed_out_twice() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("read ip_local_port_range");
        let (low, high) = candidate_range(&range);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let port = free_port();
            assert!(
                (low..=high).contains(&port),
                "{port} outside {low}..={high}"
            );
            assert!(seen.insert(port), "{port} handed out twice");
            // Still free: a daemon can bind it.
            drop(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind it"));
        }
    }

    /// A child that another thread spawns copies the process's descriptors and keeps
    /// them until it execs: had the check listened on the port, a connection made right
    /// after it would, now and then, be accepted by that copy (the fault seen when a
    /// test took another's child for its daemon and read a file the daemon had not
    /// written yet).
    #[test]
    fn no_connection_is_accepted_on_a_port_just_checked_while_children_are_spawned() {
        let port = free_port();
        let stop = AtomicBool::new(false);
        let (checked, accepted, spawned) = std::thread::scope(|s| {
            let spawner = s.spawn(|| {
                let mut spawned = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    std::process::Command::new("true")
                        .status()
                        .expect("spawn true");
                    spawned += 1;
                }
                spawned
            });
            let (mut checked, mut accepted) = (0u32, 0u32);
            for _ in 0..50_000 {
                if is_free(port) {
                    checked += 1;
                    if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                        accepted += 1;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            (checked, accepted, spawner.join().expect("spawner"))
        });
        assert!(
            checked > 40_000,
            "the port was free in only {checked} checks"
        );
        assert!(spawned > 0, "no child was spawned beside the checks");
        assert_eq!(
            accepted, 0,
            "{accepted} of {checked} connections to port {port} right after its check were \
             accepted ({spawned} children spawned beside)"
        );
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let counter = AtomicU32::new(0);
        let busy = [10_005, 10_006, 10_008];
        let picked: Vec<u16> = (0..4)
            .map(|_| next_free((10_000, 10_009), 5, &counter, |p| !busy.contains(&p)))
            .map(|p| p.expect("a free port"))
            .collect();
        assert_eq!(picked, [10_007, 10_009, 10_000, 10_001]);
        // Nothing free: none, after one round.
        assert_eq!(next_free((10_000, 10_009), 0, &counter, |_| false), None);
        // A bound port is not free, for TCP or UDP.
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        assert!(!is_free(tcp.local_addr().expect("addr").port()));
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        assert!(!is_free(udp.local_addr().expect("addr").port()));
    }
}
