//! Test harness: a real `strata-node` process on loopback, and small clients.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod nbd_client;
pub mod netns;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_proto::storage::storage_node_client::StorageNodeClient;
use strata_proto::storage::CreateVolumeRequest;

pub const MIB: u64 = 1 << 20;

/// A port that is free now, below the kernel's ephemeral range (32768 and
/// up by default): a port the kernel handed out for port 0 may be handed
/// out again, between this call and the node's bind, as the local port of
/// one of the many client connections the tests make, and the node then
/// fails with "Address already in use".
fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 20_000;
    // Tests of one binary take turns through the span; the process id
    // spreads binaries that run at once.
    let start = std::process::id().wrapping_mul(7_919);
    loop {
        let port = FIRST + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().unwrap();
        }
    }
}

/// The addresses a node listens on.
struct Listen {
    grpc: SocketAddr,
    nbd: SocketAddr,
    http: SocketAddr,
    replication: SocketAddr,
}

/// A storage node process with its own pool file and ports.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub zone: String,
    pub grpc: SocketAddr,
    pub nbd: SocketAddr,
    pub http: SocketAddr,
    pub replication: SocketAddr,
    extra_args: Vec<String>,
    pool_size: String,
    /// The network namespace the process runs in (`ip netns exec`), if any.
    netns: Option<String>,
    child: Option<Child>,
}

impl TestNode {
    pub fn start(pool_size: &str) -> TestNode {
        Self::start_with(pool_size, &[])
    }

    pub fn start_with(pool_size: &str, extra_args: &[&str]) -> TestNode {
        Self::start_named("test-node", "zone-a", pool_size, extra_args)
    }

    pub fn start_named(name: &str, zone: &str, pool_size: &str, extra_args: &[&str]) -> TestNode {
        let listen = Listen {
            grpc: free_addr(),
            nbd: free_addr(),
            http: free_addr(),
            replication: free_addr(),
        };
        Self::start_on(name, zone, pool_size, extra_args, listen, None)
    }

    /// A node in network namespace `netns`, listening on `ip` (the
    /// namespace is its own, so fixed ports are free). The caller must
    /// reach `ip` from its own namespace.
    pub fn start_in_netns(
        name: &str,
        zone: &str,
        pool_size: &str,
        extra_args: &[&str],
        netns: &str,
        ip: IpAddr,
    ) -> TestNode {
        let listen = Listen {
            grpc: SocketAddr::new(ip, 7400),
            nbd: SocketAddr::new(ip, 10809),
            http: SocketAddr::new(ip, 7480),
            replication: SocketAddr::new(ip, 7410),
        };
        Self::start_on(name, zone, pool_size, extra_args, listen, Some(netns))
    }

    fn start_on(
        name: &str,
        zone: &str,
        pool_size: &str,
        extra_args: &[&str],
        listen: Listen,
        netns: Option<&str>,
    ) -> TestNode {
        let mut node = TestNode {
            dir: tempfile::tempdir().unwrap(),
            name: name.to_string(),
            zone: zone.to_string(),
            grpc: listen.grpc,
            nbd: listen.nbd,
            http: listen.http,
            replication: listen.replication,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            pool_size: pool_size.to_string(),
            netns: netns.map(str::to_string),
            child: None,
        };
        node.spawn();
        node
    }

    pub fn pool_path(&self) -> PathBuf {
        self.dir.path().join("pool.img")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// Starts the process (again) on the same pool and ports and waits until it serves.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let binary = env!("CARGO_BIN_EXE_strata-node");
        // `ip netns exec` execs the node in place: the child is the node.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, binary]);
                command
            }
            None => Command::new(binary),
        };
        command
            .args(["--name", &self.name, "--zone", &self.zone])
            .arg("--pool")
            .arg(self.pool_path())
            .args(["--pool-size", &self.pool_size])
            .args(["--grpc-listen", &self.grpc.to_string()])
            .args(["--nbd-listen", &self.nbd.to_string()])
            .args(["--http-listen", &self.http.to_string()])
            .args(["--replication-listen", &self.replication.to_string()])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: only an async-signal-safe system call between fork and exec.
        // A test killed from outside (a timeout) must not leave nodes behind.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = command.spawn().expect("start strata-node");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.grpc).is_err() || TcpStream::connect(self.nbd).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("strata-node exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "strata-node did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "clean stop failed ({status}):\n{}",
                self.log()
            );
        }
    }

    /// SIGSTOP: the process stops where it is, as a node cut off from the
    /// network looks to the others; it goes on from there on `thaw`.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let pid = self.pid().expect("node is running");
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{}", self.nbd, volume)
    }

    pub async fn client(&self) -> StorageNodeClient<tonic::transport::Channel> {
        StorageNodeClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// Creates a volume and returns its NBD URI.
    pub async fn create_volume(&self, name: &str, size: u64) -> String {
        let volume = self
            .client()
            .await
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(volume.export_uri, self.uri(name));
        volume.export_uri
    }

    /// GET an HTTP path; returns (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.http).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The value of a metric line that starts with `prefix` (name and labels).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command, returning its output; panics with the output when it cannot start.
/// fio's nbd engine writing random 4 KiB blocks over `size` of the export,
/// each verified (crc32c) after it is written, with a fsync every 64 writes.
pub fn fio_verify_args(uri: &str, size: &str) -> Vec<String> {
    [
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--verify_fatal=1",
        "--fsync=64",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec()
}

/// fio's JSON report, after checking that fio succeeded without an I/O or
/// verify error.
pub fn fio_report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(json["jobs"][0]["error"], 0, "{stdout}");
    json
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (install it with .ci/install-test-deps): {e}")
        })
}

/// Runs a command and insists it succeeded; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// qemu-io on an NBD URI with the given commands; returns stdout+stderr.
/// qemu-io exits 0 even when a `read -P` pattern check fails, so callers look
/// at the text too (see `assert_qemu_io_ok`).
pub fn qemu_io(uri: &str, commands: &[String]) -> (bool, String) {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let arg_refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &arg_refs);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn assert_qemu_io_ok(uri: &str, commands: &[String]) -> String {
    let (ok, text) = qemu_io(uri, commands);
    assert!(
        ok && !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io {commands:?} failed:\n{text}"
    );
    text
}

/// Random bytes from a seeded generator, so failures can be reproduced.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// Finds `needle` in a file, at a multiple of `align`.
pub fn find_in_file(path: &Path, needle: &[u8], align: usize) -> Option<u64> {
    let data = std::fs::read(path).unwrap();
    (0..data.len().saturating_sub(needle.len()))
        .step_by(align)
        .find(|&at| &data[at..at + needle.len()] == needle)
        .map(|at| at as u64)
}
