//! A real storage node process against real NBD clients: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and fio's nbd engine.

mod common;

use common::*;

/// Writes at many offsets and sizes, aligned and not, then reads each back.
fn patterns_round_trip(uri: &str) {
    // (offset, length, pattern byte); the ranges do not overlap.
    let cases: &[(u64, u64, u8)] = &[
        (0, 4096, 0x11),
        (4096 + 1, 3000, 0x22),
        (12_288 - 7, 14, 0x33),
        (65_535, 130_001, 0x44),
        (MIB, MIB, 0x55),
        (3 * MIB + 512, 512, 0x66),
        (5 * MIB - 1, 1, 0x77),
        (64 * MIB - 4096 - 3, 4096 + 3, 0x88),
    ];
    let writes: Vec<String> = cases
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .chain(std::iter::once("flush".to_string()))
        .collect();
    assert_qemu_io_ok(uri, &writes);
    let reads: Vec<String> = cases
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        // Between the writes nothing was written: zeroes.
        .chain([
            "read -P 0 4096 1".to_string(),
            "read -P 0 8M 1M".to_string(),
        ])
        .collect();
    assert_qemu_io_ok(uri, &reads);
}

#[tokio::test]
async fn qemu_io_patterns_read_back_at_unaligned_offsets() {
    let node = TestNode::start("256MiB");
    let uri = node.create_volume("vol", 64 * MIB).await;
    patterns_round_trip(&uri);
    // And after a clean restart.
    let mut node = node;
    node.stop();
    node.spawn();
    assert_qemu_io_ok(
        &uri,
        &["read -P 0x55 1M 1M".into(), "read -P 0x22 4097 3000".into()],
    );
}

#[tokio::test]
async fn the_pread_engine_serves_the_same_data() {
    let node = TestNode::start_with("256MiB", &["--io-engine", "sync"]);
    let uri = node.create_volume("vol", 64 * MIB).await;
    patterns_round_trip(&uri);
    assert!(node.log().contains("engine=\"sync\""), "{}", node.log());
}

#[tokio::test]
async fn nbdinfo_reports_size_and_flags() {
    let node = TestNode::start("128MiB");
    let uri = node.create_volume("info-vol", 48 * MIB).await;
    let json = run_ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &v["exports"][0];
    assert_eq!(export["export-size"], 48 * MIB, "{json}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag} in {json}");
    }
    assert_eq!(export["is_read_only"], false, "{json}");
    assert_eq!(export["block_size_preferred"], 4096, "{json}");
    // LIST shows every volume.
    node.create_volume("second", MIB).await;
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", node.nbd)]);
    assert!(
        list.contains("info-vol") && list.contains("second"),
        "{list}"
    );
    // An unknown export is refused, not served.
    assert!(!run("nbdinfo", &[&node.uri("nope")]).status.success());
    // qemu-img sees the same size.
    let info = run_ok("qemu-img", &["info", "-f", "raw", "--output=json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 48 * MIB);
}

#[tokio::test]
async fn nbdcopy_round_trips_a_random_image_byte_for_byte() {
    let node = TestNode::start("256MiB");
    let uri = node.create_volume("copy", 64 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let back = dir.path().join("back.img");
    std::fs::write(&source, random_bytes(64 * MIB as usize, 42)).unwrap();
    // nbdcopy uses several connections and requests in flight at once.
    run_ok("nbdcopy", &[source.to_str().unwrap(), &uri]);
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    let (a, b) = (
        std::fs::read(&source).unwrap(),
        std::fs::read(&back).unwrap(),
    );
    assert!(a == b, "image changed in the round trip");
    // qemu-img compares independently.
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            source.to_str().unwrap(),
            &uri,
        ],
    );
    // Every byte is allocated now; TRIM of all returns the space.
    let used = node.metric("strata_pool_used_bytes").unwrap();
    assert!(used >= 64.0 * MIB as f64, "used {used}");
    assert_qemu_io_ok(&uri, &["discard 0 64M".into(), "flush".into()]);
    assert_eq!(node.metric("strata_pool_used_bytes"), Some(0.0));
    assert_qemu_io_ok(&uri, &["read -P 0 0 64M".into()]);
}

#[tokio::test]
async fn fio_random_writes_verify_with_crc32c() {
    let node = TestNode::start("256MiB");
    let uri = node.create_volume("fio", 64 * MIB).await;
    let args = fio_verify_args(&uri, "64M");
    let out = run("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let json = fio_report(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job = &json["jobs"][0];
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "{stdout}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "verify read everything"
    );
    assert!(
        node.metric("strata_volume_io_ops_total{volume=\"fio\",op=\"write\"}")
            .unwrap()
            >= 16384.0
    );
}

#[tokio::test]
async fn malformed_clients_do_not_disturb_others() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let node = TestNode::start("128MiB");
    let uri = node.create_volume("shared", 16 * MIB).await;
    assert_qemu_io_ok(&uri, &["write -P 0x5a 0 1M".into(), "flush".into()]);
    let mut good = nbd_client::NbdClient::connect(node.nbd, "shared").unwrap();

    // Garbage during the handshake: the server closes that connection only.
    let mut garbage = TcpStream::connect(node.nbd).unwrap();
    let mut greeting = [0u8; 18];
    garbage.read_exact(&mut greeting).unwrap();
    garbage.write_all(&random_bytes(4096, 7)).unwrap();
    garbage
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest); // ends: closed (or reset) by the server

    // Past the end, oversized, unknown command: error replies, connection lives.
    let mut bad = nbd_client::NbdClient::connect(node.nbd, "shared").unwrap();
    assert_ne!(
        bad.raw_request(nbd_client::CMD_READ, 0, 16 * MIB - 1, 2)
            .unwrap(),
        0
    );
    assert_ne!(
        bad.raw_request(nbd_client::CMD_READ, 0, u64::MAX - 1, 4096)
            .unwrap(),
        0
    );
    assert_ne!(
        bad.raw_request(nbd_client::CMD_READ, 0, 0, 64 << 20)
            .unwrap(),
        0
    );
    assert_ne!(bad.raw_request(77, 0, 0, 4096).unwrap(), 0);
    assert_eq!(bad.read(0, 4096).unwrap(), vec![0x5a; 4096], "still served");

    // A connection dropped mid-write: header and half the payload, then gone.
    let mut dropped = TcpStream::connect(node.nbd).unwrap();
    drop(nbd_client::NbdClient::connect(node.nbd, "shared").unwrap());
    dropped.write_all(&[0u8; 4]).unwrap();
    drop(dropped);
    {
        let half = nbd_client::NbdClient::connect(node.nbd, "shared").unwrap();
        half.disconnect();
    }

    // The first client saw none of it.
    assert_eq!(good.read(4096, 4096).unwrap(), vec![0x5a; 4096]);
    good.write(0, &[1u8; 4096], true).unwrap();
    assert_eq!(good.read(0, 4096).unwrap(), vec![1u8; 4096]);
    assert_qemu_io_ok(
        &uri,
        &["read -P 1 0 4k".into(), "read -P 0x5a 4k 1020k".into()],
    );
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let node = TestNode::start("128MiB");
    let uri = node.create_volume("m", 16 * MIB).await;
    assert_eq!(node.http_get("/healthz"), (200, "ok\n".to_string()));
    assert_qemu_io_ok(
        &uri,
        &["write 0 64k".into(), "read 0 64k".into(), "flush".into()],
    );
    let (status, body) = node.http_get("/metrics");
    assert_eq!(status, 200);
    for needle in [
        "strata_volume_io_ops_total{volume=\"m\",op=\"write\"}",
        "strata_volume_io_bytes_total{volume=\"m\",op=\"read\"}",
        "strata_volume_io_latency_seconds_bucket{",
        "strata_pool_capacity_bytes",
        "strata_pool_used_bytes 65536",
        "strata_volumes 1",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert_eq!(node.http_get("/nope").0, 404);
}
