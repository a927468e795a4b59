//! Loopback ports for the servers `strata up` and `strata db` start.

use anyhow::Context;

/// `count` distinct loopback ports that are free now (all held at once, so
/// none is handed out twice), for servers that bind them later. They are
/// taken below the kernel's range of ephemeral ports when there is room:
/// a port from that range (what binding port 0 gives) can be handed to any
/// outgoing connection meanwhile (the nodes' NBD, replication and gRPC links
/// make many), and the server would then fail to start.
pub fn free_local_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    use rand::seq::SliceRandom;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut candidates: Vec<u16> = (10_000..ephemeral_low).collect();
    candidates.shuffle(&mut rand::rng());
    let mut listeners: Vec<std::net::TcpListener> = candidates
        .into_iter()
        .filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
        .take(count)
        .collect();
    while listeners.len() < count {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?);
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports = free_local_ports(20).unwrap();
        let mut distinct = ports.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 20, "{ports:?}");
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
            assert!(
                ports.iter().all(|&p| p < low),
                "{ports:?} (ephemeral from {low})"
            );
        }
        let held: Vec<_> = ports
            .iter()
            .map(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).unwrap())
            .collect();
        assert_eq!(held.len(), 20);
    }
}
