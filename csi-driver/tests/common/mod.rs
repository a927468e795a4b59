//! Test harness: storage nodes running in this process (the storage node's
//! own daemon code on loopback), a cluster file naming them, the real
//! strata-csi binary on a unix socket, tonic clients over that socket, and
//! a guard that takes down every mount, loop device and nbdfuse a test left.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use strata_node::cluster::{ClusterFile, NodeEntry};
use strata_proto::csi::controller_client::ControllerClient;
use strata_proto::csi::identity_client::IdentityClient;
use strata_proto::csi::node_client::NodeClient;
use strata_proto::csi::volume_capability::access_mode::Mode;
use strata_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use strata_proto::csi::VolumeCapability;
use tonic::transport::{Channel, Endpoint};

pub const MIB: i64 = 1 << 20;

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `check` until it holds; panics with `what` past the deadline.
pub fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Parser)]
struct NodeCli {
    #[command(flatten)]
    node: strata_node::daemon::NodeArgs,
}

/// A storage node served by a runtime of its own on a thread of this process.
struct InProcessNode {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts a storage node on free loopback ports. The ports are free when
/// picked but another test may take one before the node binds it, so a node
/// that fails to start is started again on other ports.
fn start_node(name: &str, zone: &str, pool: &Path, pool_size: &str) -> (InProcessNode, NodeEntry) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (grpc, nbd, http, replication) = (free_addr(), free_addr(), free_addr(), free_addr());
        let args = NodeCli::parse_from([
            "strata-node",
            "--name",
            name,
            "--zone",
            zone,
            "--pool",
            &pool.to_string_lossy(),
            "--pool-size",
            pool_size,
            "--grpc-listen",
            &grpc.to_string(),
            "--nbd-listen",
            &nbd.to_string(),
            "--http-listen",
            &http.to_string(),
            "--replication-listen",
            &replication.to_string(),
            "--nbd-threads",
            "1",
            // A stopped node's replica leaves the in-sync set quickly.
            "--replica-timeout-ms",
            "1000",
        ])
        .node;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(strata_node::daemon::run(args, async {
                let _ = stopped.await;
            }))
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let listening = || TcpStream::connect(grpc).is_ok() && TcpStream::connect(nbd).is_ok();
        while !thread.is_finished() && !listening() {
            assert!(
                Instant::now() < deadline,
                "storage node {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            let err = thread.join().unwrap().err();
            assert!(attempts < 5, "storage node {name} does not start: {err:?}");
            continue;
        }
        let node = InProcessNode {
            stop: Some(stop),
            thread: Some(thread),
        };
        let entry = NodeEntry {
            name: name.to_string(),
            zone: zone.to_string(),
            grpc,
            nbd,
            http,
            replication: Some(replication),
            pool: pool.to_path_buf(),
            pid: None,
        };
        return (node, entry);
    }
}

/// Storage nodes and the cluster file (`dir/cluster.json`) that lists them.
pub struct StorageCluster {
    pub dir: tempfile::TempDir,
    nodes: Vec<(String, InProcessNode)>,
}

impl StorageCluster {
    /// One node per (name, zone), each with a pool file of `pool_size`.
    pub fn start(nodes: &[(&str, &str)], pool_size: &str) -> StorageCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut file = ClusterFile::default();
        let mut running = Vec::new();
        for (name, zone) in nodes {
            let pool = dir.path().join(format!("{name}.pool"));
            let (node, entry) = start_node(name, zone, &pool, pool_size);
            running.push((name.to_string(), node));
            file.nodes.push(entry);
        }
        file.save(dir.path()).unwrap();
        StorageCluster {
            dir,
            nodes: running,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self) -> ClusterFile {
        ClusterFile::load(self.path()).unwrap()
    }

    /// Stops one node (its pool stays); it stays in the cluster file, as a
    /// node that is down does.
    pub fn stop(&mut self, name: &str) {
        let i = self
            .nodes
            .iter()
            .position(|(n, _)| n == name)
            .expect("a running node of that name");
        drop(self.nodes.remove(i));
    }
}

/// The strata-csi binary serving on a unix socket.
pub struct CsiProcess {
    pub socket: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl CsiProcess {
    /// Starts `strata-csi --endpoint unix://<work>/<name>.sock <args>`.
    pub fn start(work: &Path, name: &str, args: &[&str]) -> CsiProcess {
        let mut csi = CsiProcess {
            socket: work.join(format!("{name}.sock")),
            args: args.iter().map(|s| s.to_string()).collect(),
            log: work.join(format!("{name}.log")),
            child: None,
        };
        csi.spawn();
        csi
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "strata-csi already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_strata-csi"));
        command
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: only an async-signal-safe call between fork and exec; a
        // test killed from outside must not leave the plugin running.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        self.child = Some(command.spawn().expect("start strata-csi"));
        let socket = self.socket.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("strata-csi exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "strata-csi did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the plugin dies mid-flight, as in a crash or an evicted pod.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        Endpoint::from_static("http://[::1]:50051")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }
}

impl Drop for CsiProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn mount_capability(fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Asserts a call failed with `code`; returns the message.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> String {
    match result {
        Ok(value) => panic!("expected {code:?}, got success: {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "wrong code: {}", status.message());
            assert!(!status.message().is_empty(), "{code:?} without a message");
            status.message().to_string()
        }
    }
}

/// Takes down everything under `root` when dropped (also on a failed test):
/// mounts (newest first), loop devices over files there, and nbdfuse
/// processes serving there.
pub struct HostCleanup {
    pub root: PathBuf,
}

impl Drop for HostCleanup {
    fn drop(&mut self) {
        let root = self.root.to_string_lossy().to_string();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<String> = strata_csi::mount::parse_mountinfo(&mountinfo)
            .into_iter()
            .map(|m| m.mount_point.to_string_lossy().to_string())
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.reverse();
        // Publish bind mounts and filesystems go before the FUSE mounts under them.
        mounts.sort_by_key(|m| m.contains("/attach/"));
        for mount in &mounts {
            if !mount.contains("/attach/") {
                let _ = Command::new("umount").arg("-l").arg(mount).status();
            }
        }
        if let Ok(out) = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((device, file)) = line.trim().split_once(' ') {
                    if file.trim().starts_with(&root) {
                        let _ = Command::new("losetup").args(["-d", device]).status();
                    }
                }
            }
        }
        for mount in &mounts {
            if mount.contains("/attach/") {
                let _ = Command::new("umount").arg("-l").arg(mount).status();
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let text = String::from_utf8_lossy(&cmdline);
                if text.starts_with("nbdfuse") && text.contains(root.as_str()) {
                    // SAFETY: an nbdfuse serving this test's directory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// nbdfuse processes serving under `root`.
pub fn nbdfuse_pids(root: &Path) -> Vec<i32> {
    let root = root.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).to_string();
            (text.starts_with("nbdfuse") && text.contains(root.as_ref())).then_some(pid)
        })
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    strata_csi::mount::is_mount_point(path).unwrap()
}
