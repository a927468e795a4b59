//! Network partitions for tests: every storage node in a network namespace of
//! its own, the nodes linked pairwise by veth pairs, and the test itself in a
//! client namespace linked to every node. Cutting a link between two nodes
//! (both ends set down) partitions them while the test still reaches both.
//!
//! Each node has one address (a /32 on its loopback) that peers and the test
//! use, routed over the direct link to it; no namespace forwards, so a cut
//! link has no way around. The namespaces are private to one `NetLab`, so
//! addresses and interface names never collide with the host or with tests
//! running in parallel; only the namespace names are global, and they carry
//! the process id and a counter.
//!
//! Needs root and `ip` (iproute2). Without them a test fails loudly: CI runs
//! as root, and a partition test that skips would prove nothing.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// The namespaces and links of one test; deleted on drop, also when the test
/// fails.
pub struct NetLab {
    prefix: String,
    nodes: usize,
    created: Vec<String>,
}

impl NetLab {
    /// Namespaces for `nodes` nodes and the client, fully linked.
    pub fn new(nodes: usize) -> NetLab {
        assert!(
            (1..100).contains(&nodes),
            "a lab has 1 to 99 nodes, not {nodes}"
        );
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "partition tests need root to create network namespaces (CI runs as root)"
        );
        let mut lab = NetLab {
            prefix: format!(
                "strata-{}-{}",
                std::process::id(),
                NEXT_LAB.fetch_add(1, Ordering::Relaxed)
            ),
            nodes,
            created: Vec::new(),
        };
        let names: Vec<String> = (0..nodes)
            .map(|i| lab.node_netns(i))
            .chain([lab.client_netns()])
            .collect();
        for ns in names {
            ip(&["netns", "add", &ns]);
            lab.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "dev", "lo", "up"]);
        }
        for i in 0..nodes {
            let addr = format!("{}/32", node_ip(i));
            ip(&["-n", &lab.node_netns(i), "addr", "add", &addr, "dev", "lo"]);
        }
        let client = format!("{}/32", client_ip());
        ip(&[
            "-n",
            &lab.client_netns(),
            "addr",
            "add",
            &client,
            "dev",
            "lo",
        ]);
        for a in 0..nodes {
            for b in a + 1..nodes {
                lab.link(Some(a), Some(b));
            }
            lab.link(Some(a), None);
        }
        lab
    }

    /// The namespace node `index` runs in.
    pub fn node_netns(&self, index: usize) -> String {
        format!("{}-n{}", self.prefix, index + 1)
    }

    /// The namespace the test's own sockets and clients live in.
    pub fn client_netns(&self) -> String {
        format!("{}-c", self.prefix)
    }

    /// Moves the calling thread into the client namespace. Threads it starts
    /// afterwards (a tokio runtime's workers, say) and processes they spawn
    /// are in it too; other threads of the test binary are not affected.
    fn enter_client(&self) {
        let path = format!("/var/run/netns/{}", self.client_netns());
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; setns only changes this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {path}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Runs `test` in the client namespace, on a runtime built there (its
    /// workers, and the clients they start, are in the namespace too).
    pub fn run<F: std::future::Future>(&self, test: F) -> F::Output {
        self.enter_client();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(test)
    }

    /// Cuts the link between nodes `a` and `b`: both ends go down, so
    /// neither side can send to the other (new connections and established
    /// ones alike) until `heal`.
    pub fn cut(&self, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            let ns = self.node_netns(from);
            ip(&["-n", &ns, "link", "set", "dev", &iface_to(Some(to)), "down"]);
        }
    }

    /// Restores the link between nodes `a` and `b`. Setting a link down drops
    /// the routes over it, so they are put back.
    pub fn heal(&self, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            let ns = self.node_netns(from);
            ip(&["-n", &ns, "link", "set", "dev", &iface_to(Some(to)), "up"]);
        }
        for (from, to) in [(a, b), (b, a)] {
            self.route(Some(from), Some(to), "replace");
        }
    }

    /// A veth pair between two endpoints (`None` is the client), with a
    /// route to the other end's address on each side.
    fn link(&self, a: Option<usize>, b: Option<usize>) {
        let (ns_a, ns_b) = (self.netns(a), self.netns(b));
        let (to_b, to_a) = (iface_to(b), iface_to(a));
        // Created directly in the two namespaces, so the interface names
        // never exist in the namespace this runs in.
        ip(&[
            "link", "add", "name", &to_b, "netns", &ns_a, "type", "veth", "peer", "name", &to_a,
            "netns", &ns_b,
        ]);
        ip(&["-n", &ns_a, "link", "set", "dev", &to_b, "up"]);
        ip(&["-n", &ns_b, "link", "set", "dev", &to_a, "up"]);
        self.route(a, b, "add");
        self.route(b, a, "add");
    }

    fn route(&self, from: Option<usize>, to: Option<usize>, verb: &str) {
        ip(&[
            "-n",
            &self.netns(from),
            "route",
            verb,
            &format!("{}/32", endpoint_ip(to)),
            "dev",
            &iface_to(to),
            "src",
            &endpoint_ip(from).to_string(),
        ]);
    }

    fn netns(&self, endpoint: Option<usize>) -> String {
        match endpoint {
            Some(index) => self.node_netns(index),
            None => self.client_netns(),
        }
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth ends, and with them the
        // peers in the other namespaces. Errors are reported, not raised:
        // this may run while a failed test unwinds.
        for ns in self.created.drain(..) {
            match Command::new("ip").args(["netns", "delete", &ns]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "could not delete network namespace {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(err) => eprintln!("could not delete network namespace {ns}: {err}"),
            }
        }
    }
}

/// The address of node `index`, in every namespace of a lab.
pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, index as u8 + 1)
}

/// The address the test's clients connect from.
pub fn client_ip() -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 200)
}

fn endpoint_ip(endpoint: Option<usize>) -> Ipv4Addr {
    endpoint.map_or_else(client_ip, node_ip)
}

/// The name of the interface that leads to `endpoint` (`None`: the client).
fn iface_to(endpoint: Option<usize>) -> String {
    match endpoint {
        Some(index) => format!("to-n{}", index + 1),
        None => "to-client".to_string(),
    }
}

/// Runs `ip ARGS`, panicking with its output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (iproute2; see .ci/install-test-deps): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
