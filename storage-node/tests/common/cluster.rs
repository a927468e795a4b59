//! Several real storage nodes on loopback, with a cluster file, for tests of
//! replicated volumes.

use std::time::{Duration, Instant};

use strata_node::cluster::volumes::{self, Placement, VolumeReport};
use strata_node::cluster::{ClusterFile, NodeEntry};
use strata_node::replication::client::ReplicaClient;
use strata_node::replication::replica::{extent_count, StateRecord};
use strata_node::replication::wire::{Op, Request, Status};

use super::netns::{self, NetLab};
use super::TestNode;

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    /// `count` nodes named node-1.. in zones zone-1.., each with `extra_args`.
    pub fn start(count: usize, pool_size: &str, extra_args: &[&str]) -> TestCluster {
        let nodes = (1..=count)
            .map(|i| {
                TestNode::start_named(
                    &format!("node-{i}"),
                    &format!("zone-{i}"),
                    pool_size,
                    extra_args,
                )
            })
            .collect();
        TestCluster { nodes }
    }

    /// `lab.nodes()` nodes, each in its namespace of `lab`. The calling
    /// thread must be in the lab's client namespace (`NetLab::enter_client`).
    pub fn start_in(lab: &NetLab, pool_size: &str, extra_args: &[&str]) -> TestCluster {
        let nodes = (0..lab.nodes())
            .map(|i| {
                TestNode::start_in_netns(
                    &format!("node-{}", i + 1),
                    &format!("zone-{}", i + 1),
                    pool_size,
                    extra_args,
                    &lab.node_netns(i),
                    netns::node_ip(i).into(),
                )
            })
            .collect();
        TestCluster { nodes }
    }

    pub fn file(&self) -> ClusterFile {
        ClusterFile {
            supervisor_pid: None,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    name: n.name.clone(),
                    zone: n.zone.clone(),
                    grpc: n.grpc,
                    nbd: n.nbd,
                    http: n.http,
                    replication: Some(n.replication),
                    pool: n.pool_path(),
                    pid: None,
                })
                .collect(),
        }
    }

    pub fn index_of(&self, node: &str) -> usize {
        self.nodes.iter().position(|n| n.name == node).unwrap()
    }

    pub async fn create_volume(&self, name: &str, size: u64, replicas: usize) -> VolumeReport {
        let placement = Placement {
            replicas,
            ..Placement::default()
        };
        volumes::create(&self.file(), name, size, &placement)
            .await
            .unwrap()
    }

    /// Opens the volume's target on node `index`; returns the NBD URI.
    pub async fn export(&self, name: &str, index: usize) -> String {
        let (_, target) = volumes::open_target(&self.file(), name, Some(&self.nodes[index].name))
            .await
            .unwrap();
        target.export_uri
    }

    pub async fn report(&self, name: &str) -> VolumeReport {
        volumes::get(&self.file(), name).await.unwrap()
    }

    /// Waits until `count` replicas are in sync and nothing is rebuilding.
    pub async fn wait_in_sync(&self, name: &str, count: usize, within: Duration) -> VolumeReport {
        let deadline = Instant::now() + within;
        loop {
            let report = self.report(name).await;
            let rebuilding = report
                .active_target()
                .is_some_and(|(_, t)| t.replicas.iter().any(|r| r.rebuilding));
            if report.in_sync().len() == count && !rebuilding {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "volume {name} did not reach {count} in-sync replicas: {:?}",
                report.in_sync()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A direct connection to node `index`'s replica of `volume`, and the
    /// epoch it takes I/O at (so the test can read it as the target would).
    pub async fn replica(&self, index: usize, volume: &str) -> (ReplicaClient, u64, StateRecord) {
        let timeout = Duration::from_secs(10);
        let client = ReplicaClient::connect(
            &self.nodes[index].replication.to_string(),
            volume,
            None,
            timeout,
            None,
        )
        .await
        .unwrap();
        let reply = client
            .call(Request::new(Op::GetState, 0, 0), timeout)
            .await
            .unwrap();
        let state: StateRecord = serde_json::from_slice(&reply.payload).unwrap();
        (client, state.promised_epoch, state)
    }

    /// Digests of every extent of node `index`'s replica (from its block CRCs).
    pub async fn digests(&self, index: usize, volume: &str) -> Vec<u8> {
        let (client, epoch, state) = self.replica(index, volume).await;
        let mut request = Request::new(Op::Digest, 0, epoch);
        request.length = extent_count(state.size);
        let reply = client.call(request, Duration::from_secs(30)).await.unwrap();
        assert_eq!(reply.status, Status::Ok);
        reply.payload.to_vec()
    }

    /// Every byte of node `index`'s replica, read through the replication
    /// protocol (each block checked against its CRC by the node).
    pub async fn replica_bytes(&self, index: usize, volume: &str) -> Vec<u8> {
        let (client, epoch, state) = self.replica(index, volume).await;
        let mut out = Vec::with_capacity(state.size as usize);
        let chunk = 4 << 20;
        let mut offset = 0;
        while offset < state.size {
            let mut request = Request::new(Op::Read, 0, epoch);
            request.offset = offset;
            request.length = chunk.min(state.size - offset);
            let reply = client.call(request, Duration::from_secs(30)).await.unwrap();
            assert_eq!(
                reply.status,
                Status::Ok,
                "{}",
                String::from_utf8_lossy(&reply.payload)
            );
            out.extend_from_slice(&reply.payload);
            offset += chunk;
        }
        out
    }

    /// Every replica holds the same bytes, and the same block checksums.
    pub async fn assert_replicas_identical(&self, volume: &str) {
        let report = self.report(volume).await;
        let indexes: Vec<usize> = report
            .replicas
            .iter()
            .map(|r| self.index_of(&r.node.name))
            .collect();
        let first_digests = self.digests(indexes[0], volume).await;
        let first_bytes = crc32fast::hash(&self.replica_bytes(indexes[0], volume).await);
        for &index in &indexes[1..] {
            assert!(
                self.digests(index, volume).await == first_digests,
                "block checksums of {} differ from {}",
                self.nodes[index].name,
                self.nodes[indexes[0]].name
            );
            assert_eq!(
                crc32fast::hash(&self.replica_bytes(index, volume).await),
                first_bytes,
                "data of {} differs from {}",
                self.nodes[index].name,
                self.nodes[indexes[0]].name
            );
        }
    }
}

/// fio's nbd engine writing 32 MiB of random 4 KiB blocks three times over
/// the export, each block verified (crc32c) after it is written, in the
/// background.
pub struct FioVerify(std::thread::JoinHandle<std::process::Output>);

pub fn fio_verify(uri: String) -> FioVerify {
    use std::os::unix::process::CommandExt;
    FioVerify(std::thread::spawn(move || {
        std::process::Command::new("fio")
            .args(super::fio_verify_args(&uri, "32M"))
            .arg("--loops=3")
            .process_group(0)
            .output()
            .expect("fio (see .ci/install-test-deps)")
    }))
}

impl FioVerify {
    /// Waits for fio; fails the test on any I/O or verify error.
    pub async fn finish(self) {
        let out = tokio::task::spawn_blocking(move || self.0.join().unwrap())
            .await
            .unwrap();
        super::fio_report(&out);
    }
}
