//! Bounds per client, so one source cannot take what everyone shares: connections
//! (the accept loop's 1,024), and logins waiting for their identity provider (1,000
//! each for OIDC and SAML, ten minutes). A client is an IPv4 address or an IPv6 /64
//! (one host's usual share of addresses).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Most connections one client holds at once.
pub const CONNECTIONS_PER_CLIENT: usize = 128;
/// Most logins one client has waiting at the identity provider.
pub const PENDING_LOGINS_PER_CLIENT: usize = 16;

/// The client an address belongs to: an IPv4 address (an IPv4-mapped IPv6 address is
/// one), or the /64 an IPv6 address is in.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Counts what each client holds, up to a maximum each.
#[derive(Debug)]
pub struct PerClient {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One unit a client holds; given back when dropped.
#[derive(Debug)]
pub struct Held {
    owner: Arc<PerClient>,
    client: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// One more for `ip`'s client, unless it holds its maximum already.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<Held> {
        let client = client_of(ip);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(client).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Held {
            owner: Arc::clone(self),
            client,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.client);
            }
        }
    }
}

/// A login waiting for its identity provider: whose, and since when.
pub trait Waiting {
    fn client(&self) -> IpAddr;
    fn created(&self) -> Instant;
}

/// Makes room for one more waiting login of `client` in `pending`: past its own
/// [`PENDING_LOGINS_PER_CLIENT`] its own oldest goes; when `pending` holds `total`,
/// the oldest of the client holding the most goes. So a flood from one client (or
/// one /64) pushes out only its own logins, never someone else's.
pub fn make_room<K: Eq + Hash + Clone, V: Waiting>(
    pending: &mut HashMap<K, V>,
    client: IpAddr,
    total: usize,
) {
    let client = client_of(client);
    let oldest_of = |pending: &HashMap<K, V>, c: IpAddr| {
        pending
            .iter()
            .filter(|(_, v)| client_of(v.client()) == c)
            .min_by_key(|(_, v)| v.created())
            .map(|(k, _)| k.clone())
    };
    let mine = pending
        .values()
        .filter(|v| client_of(v.client()) == client)
        .count();
    if mine >= PENDING_LOGINS_PER_CLIENT {
        if let Some(k) = oldest_of(pending, client) {
            pending.remove(&k);
        }
        return;
    }
    if pending.len() >= total {
        let mut counts: HashMap<IpAddr, usize> = HashMap::new();
        for v in pending.values() {
            *counts.entry(client_of(v.client())).or_insert(0) += 1;
        }
        if let Some((busiest, _)) = counts.into_iter().max_by_key(|(_, n)| *n)
            && let Some(k) = oldest_of(pending, busiest)
        {
            pending.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ipv6_clients_are_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("v6");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("v6");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(client_of(a), client_of(b));
        assert_ne!(client_of(a), client_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("mapped");
        assert_eq!(
            client_of(mapped),
            "192.0.2.7".parse::<IpAddr>().expect("v4")
        );
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_gets_it_back() {
        let p = PerClient::new(2);
        let one: IpAddr = "192.0.2.1".parse().expect("ip");
        let two: IpAddr = "192.0.2.2".parse().expect("ip");
        let a = p.try_take(one).expect("first");
        let _b = p.try_take(one).expect("second");
        assert!(p.try_take(one).is_none(), "a third for the same client");
        assert!(p.try_take(two).is_some(), "another client is not affected");
        drop(a);
        assert!(p.try_take(one).is_some(), "given back on drop");
    }

    struct W(IpAddr, Instant);
    impl Waiting for W {
        fn client(&self) -> IpAddr {
            self.0
        }
        fn created(&self) -> Instant {
            self.1
        }
    }

    #[test]
    fn a_flood_of_logins_pushes_out_only_its_own() {
        let victim: IpAddr = "198.51.100.5".parse().expect("ip");
        let start = Instant::now();
        let mut pending: HashMap<String, W> = HashMap::new();
        make_room(&mut pending, victim, 100);
        pending.insert("victim".into(), W(victim, start));
        // One attacker address, then a whole /64 of them.
        for i in 0..1000u32 {
            let ip: IpAddr = if i % 2 == 0 {
                "203.0.113.9".parse().expect("ip")
            } else {
                format!("2001:db8:bad::{:x}", i).parse().expect("ip")
            };
            make_room(&mut pending, ip, 100);
            pending.insert(
                format!("a{i}"),
                W(ip, start + Duration::from_millis(u64::from(i) + 1)),
            );
        }
        assert!(
            pending.contains_key("victim"),
            "the victim's login survived the flood"
        );
        assert!(
            pending.len() <= 1 + 2 * PENDING_LOGINS_PER_CLIENT,
            "{}",
            pending.len()
        );
        // When the table is full of many clients, the busiest one gives way.
        let mut full: HashMap<String, W> = HashMap::new();
        for i in 0..10u8 {
            let ip = IpAddr::from([192, 0, 2, i]);
            full.insert(format!("c{i}"), W(ip, start));
        }
        let busy = IpAddr::from([192, 0, 2, 200]);
        for i in 0..5u64 {
            full.insert(format!("b{i}"), W(busy, start + Duration::from_millis(i)));
        }
        let total = full.len();
        make_room(&mut full, victim, total);
        assert!(!full.contains_key("b0"), "the busiest client's oldest went");
        assert_eq!(full.len(), 14);
    }
}
