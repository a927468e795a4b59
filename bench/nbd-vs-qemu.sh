#!/usr/bin/env bash
#
# nbd-vs-qemu.sh: fio against Strata volumes with 1 and with 3 replicas and
# against qemu-nbd, side by side, on the same machine, the same disk and the
# same job lines.
#
# What one run does:
#   1. builds strata-node and the strata CLI (release) unless STRATA_NODE_BIN
#      and STRATA_CLI_BIN point at binaries already built;
#   2. starts three storage nodes, each on a pool file in a fresh temp dir,
#      and creates through the CLI a volume "r1" (one replica, on node n1)
#      and a volume "r3" (three replicas, one per node), both served by a
#      volume target on n1;
#   3. creates a raw file of the same size next to the pools and serves it
#      with qemu-nbd (--cache=none, io_uring, or native AIO when io_uring is
#      refused);
#   4. prefills the three exports with the same 1 MiB sequential write, so
#      random reads hit real data (Strata is thin-provisioned: an unwritten
#      block would be answered with zeroes without touching the disk), then
#      runs each fio job on r1, r3 and qemu-nbd in turn;
#   5. runs each job's pattern with fio's own io_uring engine (O_DIRECT) on
#      raw files beside the pools, as the disk's own figure: "disk" is one
#      file (what a 1-replica volume could get), "disk x3" three files at
#      once, the pattern of three replicas' writes on this one disk (each
#      write goes to all three: the figure is the files' writes / 3). A
#      3-replica volume reads from the target's local replica, so its reads
#      compare with the one-file figure;
#   6. prints a table (IOPS and mean latency of each, and the ratios
#      1-replica/qemu-nbd, 3-replica/qemu-nbd, 3-replica/1-replica,
#      1-replica/disk and 3-replica/disk x3), then the mean time each
#      request spends in the pools, and how busy the disk was during each
#      job (from /proc/diskstats: I/Os per second, time in the device and
#      the mean number of I/Os in it);
#   7. stops the servers and deletes the temp dir on exit, whatever happens.
#
# All three nodes share this machine's disk and CPUs: a 3-replica write does
# three times the disk work of a 1-replica write here, where a real cluster
# spreads it over three machines. The "disk x3" column shows what that costs
# on this disk before any server is involved.
#
# Jobs (fio's nbd engine, one connection per job, time-based):
#   randread   4 KiB random read,  QD32
#   randwrite  4 KiB random write, QD32
#   seqwrite   1 MiB sequential write, QD${SEQ_IODEPTH} (default 8)
#
# Usage:
#   bench/nbd-vs-qemu.sh
#   RUNTIME=30 VOL_SIZE=8GiB POOL_SIZE=16GiB bench/nbd-vs-qemu.sh
#
# Environment knobs (defaults in brackets):
#   RUNTIME          seconds per fio job [15]
#   VOL_SIZE         size of the volume and of the qemu-nbd file [2GiB]
#   POOL_SIZE        size of each Strata node's pool file [2 x VOL_SIZE + 1GiB:
#                    n1 holds a replica of both volumes, and copy-on-write
#                    overwrites need room for the new blocks first]
#   IO_ENGINE        strata-node --io-engine: auto, io_uring or sync [auto]
#   ROUNDS           rounds per job, alternating the servers; medians shown [3]
#   SEQ_IODEPTH      queue depth of the 1 MiB sequential write [8]
#   STRATA_NODE_BIN  use this strata-node instead of building one
#   STRATA_CLI_BIN   use this strata CLI instead of building one
#   BENCH_TMPDIR     where the temp dir (pool file, qemu file) goes [$TMPDIR or /tmp];
#                    must allow O_DIRECT (not tmpfs), since both servers use it
#   RESULTS_DIR      if set, fio's JSON output is copied there
#
# The Strata pool file is created with --preallocate (zero-filled once), as the
# qemu-nbd file is fallocated and prefilled: a copy-on-write pool writes to
# fresh blocks, and on a sparse file the filesystem would make each such
# O_DIRECT write block in a kernel worker thread. On a raw NVMe device neither
# is needed.
#
# Needs: cargo (unless both *_BIN are set), python3, curl, fio with the nbd engine,
# qemu-nbd, nbdinfo.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUNTIME=${RUNTIME:-15}
VOL_SIZE=${VOL_SIZE:-2GiB}
POOL_SIZE=${POOL_SIZE:-}
IO_ENGINE=${IO_ENGINE:-auto}
SEQ_IODEPTH=${SEQ_IODEPTH:-8}
ROUNDS=${ROUNDS:-3}
RESULTS_DIR=${RESULTS_DIR:-}

# Filled in as things start, so cleanup knows what to stop.
TMP=""
STRATA_PIDS=()
STRATA_HTTP_PORTS=()
QEMU_PID=""
FIO_PID=""
QEMU_AIO=""
DISK=""
STRATA_ENGINE=""

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Cleanup: runs on every exit (normal, error, Ctrl-C, SIGTERM).
# ---------------------------------------------------------------------------

# Stops one server we started: SIGTERM first (strata-node then makes its
# writes durable and exits cleanly), SIGKILL if it is still there after 10 s.
stop_process() {
    local pid=$1
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # On failure, the server logs are the first thing one wants; they live in
    # the temp dir that is about to go, so show their tails now.
    if [[ $status -ne 0 && -n $TMP ]]; then
        local f
        for f in "$TMP"/strata-node-*.log "$TMP/qemu-nbd.log"; do
            if [[ -s $f ]]; then
                printf '\n--- last lines of %s ---\n' "$(basename "$f")" >&2
                tail -n 20 "$f" >&2
            fi
        done
    fi
    stop_process "$FIO_PID"
    local pid
    for pid in "${STRATA_PIDS[@]}"; do
        stop_process "$pid"
    done
    stop_process "$QEMU_PID"
    [[ -n $TMP ]] && rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs once, with a status.
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# Converts 2GiB, 512MiB, 4096 ... to bytes (the same suffixes strata accepts).
to_bytes() {
    python3 - "$1" <<'EOF'
import re, sys
m = re.fullmatch(r'\s*(\d+)\s*([KMGT]i?B?|B)?\s*', sys.argv[1], re.I)
if not m:
    sys.exit(f"cannot parse size {sys.argv[1]!r}")
n, unit = int(m.group(1)), (m.group(2) or "B").upper()
powers = {"K": 1, "M": 2, "G": 3, "T": 4}
base = 1024 if "I" in unit or len(unit) == 1 and unit != "B" else 1000
print(n * base ** powers.get(unit[0], 0))
EOF
}

# Prints N distinct free TCP ports. All sockets stay bound until every port is
# picked, so the kernel cannot hand out the same port twice.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# True once something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits up to TIMEOUT seconds for PORT to accept connections, failing early
# if the server process PID has died.
wait_for_port() {
    local port=$1 pid=$2 what=$3 timeout=${4:-30}
    local deadline=$((SECONDS + timeout))
    until port_open "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$what exited before listening on port $port"
        ((SECONDS < deadline)) || die "$what is not listening on port $port after ${timeout}s"
        sleep 0.2
    done
}

# Waits until an NBD client can complete the handshake on URI and prints the
# export size. A listening port is not enough: a server may accept
# connections and still never answer the handshake.
wait_for_export() {
    local uri=$1 what=$2 timeout=${3:-30}
    local deadline=$((SECONDS + timeout)) size
    while true; do
        if size=$(timeout 10 nbdinfo --size "$uri" 2>"$TMP/nbdinfo.err"); then
            echo "$size"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            cat "$TMP/nbdinfo.err" >&2
            die "$what: no NBD client can open $uri"
        fi
        sleep 1
    done
}

# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

build_strata() {
    if [[ -n ${STRATA_NODE_BIN:-} && -n ${STRATA_CLI_BIN:-} ]]; then
        return
    fi
    command -v cargo >/dev/null || die "cargo not found (or set STRATA_NODE_BIN and STRATA_CLI_BIN)"
    log "building strata-node and strata (release)"
    (cd "$ROOT" && cargo build --release -p strata-node -p strata-cli)
    # Honour CARGO_TARGET_DIR the way cargo does.
    local target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
    STRATA_NODE_BIN=${STRATA_NODE_BIN:-$target_dir/release/strata-node}
    STRATA_CLI_BIN=${STRATA_CLI_BIN:-$target_dir/release/strata}
}

check_tools() {
    local tool
    for tool in python3 fio qemu-nbd nbdinfo timeout curl; do
        command -v "$tool" >/dev/null || die "$tool not found (bash .ci/install-test-deps installs the NBD tools and fio)"
    done
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (it needs libnbd)"
}

# Starts three storage nodes and creates the volumes "r1" (one replica, on
# n1) and "r3" (three replicas), both with their target on n1. The CLI finds
# the nodes through a cluster.json we write ourselves, in the format that
# `strata up` writes.
start_strata() {
    local i grpc nbd http repl entries=""
    local ports
    read -r -a ports < <(free_ports 12)
    for i in 1 2 3; do
        grpc=${ports[$(((i - 1) * 4))]}
        nbd=${ports[$(((i - 1) * 4 + 1))]}
        http=${ports[$(((i - 1) * 4 + 2))]}
        repl=${ports[$(((i - 1) * 4 + 3))]}
        log "starting strata-node n$i (pool $POOL_SIZE, io engine $IO_ENGINE)"
        "$STRATA_NODE_BIN" --name "n$i" --zone "zone-$i" \
            --pool "$TMP/pool-$i.img" --pool-size "$POOL_SIZE" --io-engine "$IO_ENGINE" \
            --preallocate \
            --grpc-listen "127.0.0.1:$grpc" --nbd-listen "127.0.0.1:$nbd" \
            --http-listen "127.0.0.1:$http" --replication-listen "127.0.0.1:$repl" \
            >"$TMP/strata-node-$i.log" 2>&1 &
        STRATA_PIDS+=($!)
        STRATA_HTTP_PORTS+=("$http")
        entries+="${entries:+,}{\"name\":\"n$i\",\"zone\":\"zone-$i\",\"grpc\":\"127.0.0.1:$grpc\",\"nbd\":\"127.0.0.1:$nbd\",\"http\":\"127.0.0.1:$http\",\"replication\":\"127.0.0.1:$repl\",\"pool\":\"$TMP/pool-$i.img\",\"pid\":null}"
        [[ $i == 1 ]] && STRATA_NBD_PORT=$nbd
    done
    for i in 1 2 3; do
        # gRPC is bound last, so once it listens the pool is open.
        wait_for_port "${ports[$(((i - 1) * 4))]}" "${STRATA_PIDS[$((i - 1))]}" "strata-node n$i" 120
    done

    # Which engine the node really uses ("auto" may fall back to pread/pwrite).
    local deadline=$((SECONDS + 10))
    until grep -q 'storage node ready' "$TMP/strata-node-1.log" || ((SECONDS >= deadline)); do
        sleep 0.2
    done
    STRATA_ENGINE=$(sed -nE 's/.*storage node ready.*engine="?([A-Za-z_]+).*/\1/p; s/.*engine="?([A-Za-z_]+)"?.*storage node ready.*/\1/p' \
        "$TMP/strata-node-1.log" | head -n1)
    STRATA_ENGINE=${STRATA_ENGINE:-unknown}

    printf '{"supervisor_pid":null,"nodes":[%s]}\n' "$entries" >"$TMP/cluster.json"
    "$STRATA_CLI_BIN" volume create r1 --size "$VOL_SIZE" --replicas 1 --node n1 --dir "$TMP" >&2
    "$STRATA_CLI_BIN" volume create r3 --size "$VOL_SIZE" --replicas 3 --node n1 --dir "$TMP" >&2
    R1_URI=$("$STRATA_CLI_BIN" volume export r1 --node n1 --dir "$TMP")
    R3_URI=$("$STRATA_CLI_BIN" volume export r3 --node n1 --dir "$TMP")
}

# Serves a raw file of the volume's size with qemu-nbd: O_DIRECT like Strata,
# io_uring like Strata when the kernel allows it, else Linux native AIO.
start_qemu_nbd() {
    local port=$1 bytes=$2 aio
    # Allocate every block now so qemu-nbd's writes never extend or allocate
    # the file (Strata's pool file is allocated by its own prefill, below).
    fallocate -l "$bytes" "$TMP/qemu.img" 2>/dev/null || truncate -s "$bytes" "$TMP/qemu.img"
    for aio in io_uring native; do
        log "starting qemu-nbd (--cache=none --aio=$aio)"
        qemu-nbd --cache=none --aio="$aio" -f raw -x bench -p "$port" -b 127.0.0.1 \
            --persistent --shared=8 "$TMP/qemu.img" >"$TMP/qemu-nbd.log" 2>&1 &
        QEMU_PID=$!
        # qemu-nbd opens the image before it listens, so an AIO mode it cannot
        # use makes it exit instead of listen.
        if (wait_for_port "$port" "$QEMU_PID" qemu-nbd 15) 2>/dev/null; then
            QEMU_AIO=$aio
            [[ $aio == io_uring ]] || log "NOTE: qemu-nbd refused --aio=io_uring; using --aio=native"
            return
        fi
        cat "$TMP/qemu-nbd.log" >&2
        stop_process "$QEMU_PID"
        QEMU_PID=""
    done
    die "qemu-nbd did not start"
}

# Runs fio with ARGS (JSON to OUT), saying WHAT it ran against if it fails.
# A hung server must not hang the benchmark: fio gets a deadline.
fio_json() {
    local what=$1 out=$2 deadline=$3
    shift 3
    # In the background plus `wait`, because bash defers a trap until a
    # foreground child exits: Ctrl-C would otherwise wait out the whole job.
    timeout --kill-after=10 "$deadline" fio --size="$VOL_BYTES" --group_reporting \
        --output-format=json --output="$out" "$@" >"$out.stderr" 2>&1 &
    FIO_PID=$!
    local status=0
    wait "$FIO_PID" || status=$?
    FIO_PID=""
    if ((status != 0)); then
        cat "$out.stderr" >&2
        ((status == 124)) && die "fio against $what did not finish within ${deadline}s"
        die "fio failed against $what (${*})"
    fi
}

# Runs one fio job against URI, JSON to OUT. Any extra arguments are fio
# options.
run_fio() {
    local uri=$1 out=$2 deadline=$3
    shift 3
    fio_json "$uri" "$out" "$deadline" --ioengine=nbd --uri="$uri" "$@"
}

# Runs one job's fio options with fio's io_uring engine on raw files: disk1
# on one file, disk3 on three at once (see the header). JSON to OUT.
run_fio_disk() {
    local which=$1 out=$2 deadline=$3
    shift 3
    local jobs=() i
    for i in $([[ $which == disk1 ]] && echo 1 || echo 1 2 3); do
        jobs+=(--name="disk$i" --filename="$TMP/disk-$i.img")
    done
    fio_json "the raw files" "$out" "$deadline" --ioengine=io_uring --direct=1 "$@" "${jobs[@]}"
}

# Writes the raw files of the disk columns once, as the volumes are
# prefilled, so their reads and overwrites touch allocated, written blocks.
prefill_disk_files() {
    local i
    log "writing three raw files of $VOL_SIZE for the disk columns"
    for i in 1 2 3; do
        fallocate -l "$VOL_BYTES" "$TMP/disk-$i.img" 2>/dev/null || true
    done
    run_fio_disk disk3 "$TMP/prefill-disk.json" 1800 --rw=write --bs=1M --iodepth=8 --end_fsync=1
}

# The same full sequential write on both targets, so that every later read
# hits written data and the two servers start from the same state.
prefill() {
    local name=$1 uri=$2
    log "prefilling $name with a sequential write of $VOL_SIZE"
    run_fio "$uri" "$TMP/prefill-$name.json" 1800 \
        --name=prefill --rw=write --bs=1M --iodepth=8 --end_fsync=1
}

# job name | fio options. Each runs on r1, r3 and qemu-nbd in turn.
JOBS=(
    "randread|--rw=randread --bs=4k --iodepth=32"
    "randwrite|--rw=randwrite --bs=4k --iodepth=32"
    "seqwrite|--rw=write --bs=1M --iodepth=$SEQ_IODEPTH"
)
TARGETS=(r1 r3 qemu disk1 disk3)

# Per node, the sum (seconds) and count of its pool's reads and writes, all
# volumes together, from /metrics: "node op sum count" lines. Around a job,
# they give the mean time a request spends in each node's pool (its replica's
# part), to set against the client's latency.
pool_latency() {
    local i
    for i in "${!STRATA_HTTP_PORTS[@]}"; do
        curl -sf "http://127.0.0.1:${STRATA_HTTP_PORTS[$i]}/metrics" |
            awk -v node="n$((i + 1))" '
                /^strata_volume_io_latency_seconds_(sum|count)\{/ && /op="(read|write)"/ {
                    op = ($0 ~ /op="read"/) ? "read" : "write"
                    key = op (($0 ~ /_sum\{/) ? " sum" : " count")
                    total[key] += $NF
                }
                END {
                    for (o = 0; o < 2; o++) {
                        op = o ? "write" : "read"
                        printf "%s %s %.9f %d\n", node, op, total[op " sum"], total[op " count"]
                    }
                }' || true
    done
}

# The block device that holds the temp dir, as /proc/diskstats names it
# (vda, nvme0n1p2, dm-0 ...); empty when there is none (tmpfs, overlay).
disk_name() {
    local source
    source=$(df --output=source "$TMP" 2>/dev/null | tail -n 1)
    [[ $source == /dev/* ]] || return 0
    source=$(basename "$(readlink -f "$source")")
    awk -v d="$source" '$3 == d { print d; exit }' /proc/diskstats
}

# The disk's counters now: "reads read_ms writes write_ms weighted_ms"
# (weighted_ms: milliseconds spent in the device, summed over the I/Os in
# it, so its growth over a span divided by the span is the mean number of
# I/Os in the device). Nothing when the disk is unknown.
disk_counters() {
    [[ -n $DISK ]] || return 0
    awk -v d="$DISK" '$3 == d { print $4, $7, $8, $11, $14 }' /proc/diskstats
}

# utime + stime of processes (and their threads), in clock ticks.
cpu_ticks() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}

run_jobs() {
    local entry job opts target uri pids round
    for entry in "${JOBS[@]}"; do
        job=${entry%%|*}
        opts=${entry#*|}
        # Rounds alternate the targets, so a slow spell of this shared
        # machine hits all of them; the table reports each one's median round.
        for round in $(seq 1 "$ROUNDS"); do
            for target in "${TARGETS[@]}"; do
                # Reads of r3 come from one replica: disk1 is their figure.
                [[ $target == disk3 && $job == *read* ]] && continue
                log "$job on $target, round $round of $ROUNDS (${RUNTIME}s)"
                case $target in
                    r1) uri=$R1_URI; pids=("${STRATA_PIDS[0]}") ;;
                    r3) uri=$R3_URI; pids=("${STRATA_PIDS[@]}") ;;
                    qemu) uri=$QEMU_URI; pids=("$QEMU_PID") ;;
                    disk*)
                        # No server: no CPU figure.
                        echo "0 0" >"$TMP/$job-$target-$round.cpu"
                        disk_counters >"$TMP/$job-$target-$round.disk"
                        # shellcheck disable=SC2086 # opts is a list of fio options
                        run_fio_disk "$target" "$TMP/$job-$target-$round.json" $((RUNTIME + 120)) \
                            $opts --runtime="$RUNTIME" --time_based
                        disk_counters >>"$TMP/$job-$target-$round.disk"
                        continue
                        ;;
                esac
                # The servers' CPU time (user + system, in clock ticks) around
                # the job gives the CPU cost per request, a figure that the
                # shared, noisy machine disturbs far less than IOPS.
                cpu_ticks "${pids[@]}" >"$TMP/$job-$target-$round.cpu"
                pool_latency >"$TMP/$job-$target-$round.pool-before"
                disk_counters >"$TMP/$job-$target-$round.disk"
                # shellcheck disable=SC2086 # opts is a list of fio options
                run_fio "$uri" "$TMP/$job-$target-$round.json" $((RUNTIME + 120)) \
                    --name="$job" $opts --runtime="$RUNTIME" --time_based
                cpu_ticks "${pids[@]}" >>"$TMP/$job-$target-$round.cpu"
                pool_latency >"$TMP/$job-$target-$round.pool-after"
                disk_counters >>"$TMP/$job-$target-$round.disk"
            done
        done
    done
}

# Reads the fio JSON files and prints the comparison table.
print_table() {
    local names=()
    local entry
    for entry in "${JOBS[@]}"; do names+=("${entry%%|*}"); done
    python3 - "$TMP" "$ROUNDS" "$DISK" "${names[@]}" <<'PY'
import json, os, sys

tmp, rounds, disk, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]

def one_round(job, target, rnd):
    with open(f"{tmp}/{job}-{target}-{rnd}.json") as f:
        data = json.load(f)
    j = data["jobs"][0]
    if j.get("error"):
        sys.exit(f"fio reported error {j['error']} for {job} on {target}")
    d = j["read"] if "read" in job else j["write"]
    with open(f"{tmp}/{job}-{target}-{rnd}.cpu") as f:
        before, after = (int(x) for x in f.read().split())
    ios = d["total_ios"]
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    cpu_per_io = (after - before) * tick_us / ios if ios and after else float("nan")
    # Three replicas write every block three times: the disk x3 figure is
    # the replicated writes that the three files' writes make.
    share = 3 if target == "disk3" and "read" not in job else 1
    # lat_ns: submission to completion, what the client waits for.
    return d["iops"] / share, d["lat_ns"]["mean"] / 1000.0, d["bw_bytes"] / 1e6 / share, cpu_per_io

def median_round(job, target):
    """The round with the median IOPS."""
    return sorted(range(1, rounds + 1), key=lambda r: one_round(job, target, r)[0])[rounds // 2]

def stats(job, target):
    """The median round's IOPS, latency, throughput and CPU."""
    return one_round(job, target, median_round(job, target))

def pool_means(job, target):
    """Mean µs per request in each node's pool during the median round."""
    rnd = median_round(job, target)
    op = "read" if "read" in job else "write"
    def load(name):
        try:
            with open(f"{tmp}/{job}-{target}-{rnd}.{name}") as f:
                return {(n, o): (float(s), int(c)) for n, o, s, c in (l.split() for l in f)}
        except (OSError, ValueError):
            return {}
    before, after = load("pool-before"), load("pool-after")
    means = {}
    for (node, o), (s, c) in sorted(after.items()):
        s0, c0 = before.get((node, o), (0.0, 0))
        if o == op and c > c0:
            means[node] = (s - s0) / (c - c0) * 1e6
    return means

def device(job, target):
    """The disk during the median round: I/Os per second, mean µs each
    spent in the device (its queue included) and the mean number in it."""
    rnd = median_round(job, target)
    try:
        with open(f"{tmp}/{job}-{target}-{rnd}.disk") as f:
            before, after = ([float(x) for x in l.split()] for l in f.read().splitlines())
    except (OSError, ValueError):
        return None
    # The counters were read around fio's whole run; the disk works while
    # its jobs do (their runtime, the longest job's with several).
    with open(f"{tmp}/{job}-{target}-{rnd}.json") as f:
        d = json.load(f)["jobs"][0]["read" if "read" in job else "write"]
    seconds = d["runtime"] / 1000
    ios = (after[0] - before[0]) + (after[2] - before[2])
    busy_ms = (after[1] - before[1]) + (after[3] - before[3])
    if seconds <= 0 or ios <= 0:
        return None
    return ios / seconds, busy_ms * 1000 / ios, (after[4] - before[4]) / (seconds * 1000)

def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"

header = ("job",
          "1-replica IOPS", "lat µs", "CPU µs/IO",
          "3-replica IOPS", "lat µs", "CPU µs/IO",
          "qemu-nbd IOPS", "lat µs", "CPU µs/IO",
          "disk IOPS", "disk x3 IOPS",
          "1r/qemu", "3r/qemu", "3r/1r", "1r/disk", "3r/disk x3")
rows = []
for job in jobs:
    r1 = stats(job, "r1")
    r3 = stats(job, "r3")
    q = stats(job, "qemu")
    d1 = stats(job, "disk1")
    d3 = stats(job, "disk1" if "read" in job else "disk3")
    rows.append((job,
                 f"{r1[0]:,.0f}", f"{r1[1]:,.1f}", f"{r1[3]:,.1f}",
                 f"{r3[0]:,.0f}", f"{r3[1]:,.1f}", f"{r3[3]:,.1f}",
                 f"{q[0]:,.0f}", f"{q[1]:,.1f}", f"{q[3]:,.1f}",
                 f"{d1[0]:,.0f}", f"{d3[0]:,.0f}",
                 ratio(r1[0], q[0]), ratio(r3[0], q[0]), ratio(r3[0], r1[0]),
                 ratio(r1[0], d1[0]), ratio(r3[0], d3[0])))

widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
def line(r):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths)))
print(line(header))
print("  ".join("-" * w for w in widths))
for r in rows:
    print(line(r))
print()
print("Where a request's time goes (mean µs, median round): the client's latency, and")
print("the time the request spends in the pool of each node holding a replica (the")
print("rest is the network, the target and the wait for each node's thread):")
for job in jobs:
    parts = []
    for target, label in (("r1", "1-replica"), ("r3", "3-replica")):
        pools = pool_means(job, target)
        pool_text = " / ".join(f"{n} {v:,.0f}" for n, v in pools.items()) or "n/a"
        parts.append(f"{label} {stats(job, target)[1]:,.0f}, in pools {pool_text}")
    print(f"  {job:<10} " + "; ".join(parts))
if disk:
    print()
    print(f"The disk ({disk}) during each job, median round: I/Os per second, mean µs each")
    print("spends in the device (its queue included) and mean I/Os in it. A server that")
    print("keeps fewer of its client's requests in the device gets fewer I/Os out of it:")
    for job in jobs:
        parts = []
        targets = [("r1", "1-replica"), ("r3", "3-replica"), ("qemu", "qemu-nbd"), ("disk1", "disk")]
        if "read" not in job:
            targets.append(("disk3", "disk x3"))
        for target, label in targets:
            d = device(job, target)
            if d:
                parts.append(f"{label} {d[0]:,.0f}/s {d[1]:,.0f} µs QD {d[2]:.1f}")
        print(f"  {job:<10} " + "; ".join(parts))
print()
print("seqwrite IOPS are MiB/s (1 MiB requests). CPU µs/IO: all three nodes for 3-replica.")
print("disk: fio's io_uring on one raw file; disk x3: on three at once, writes / 3;")
print("reads of r3 come from the target's local replica, so their disk x3 is the one-file figure.")
PY
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

main() {
    check_tools
    build_strata
    [[ -x $STRATA_NODE_BIN ]] || die "no strata-node at $STRATA_NODE_BIN"
    [[ -x $STRATA_CLI_BIN ]] || die "no strata CLI at $STRATA_CLI_BIN"

    VOL_BYTES=$(to_bytes "$VOL_SIZE")
    POOL_SIZE=${POOL_SIZE:-$((2 * VOL_BYTES + (1 << 30)))}
    TMP=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/strata-bench.XXXXXX")
    log "temp dir $TMP"
    DISK=$(disk_name)

    local qport
    qport=$(free_ports 1)

    start_strata
    start_qemu_nbd "$qport" "$VOL_BYTES"
    QEMU_URI="nbd://127.0.0.1:$qport/bench"

    local uri size
    for uri in "$R1_URI" "$R3_URI" "$QEMU_URI"; do
        size=$(wait_for_export "$uri" "$uri" 30)
        [[ $size == "$VOL_BYTES" ]] || die "$uri is $size bytes, expected $VOL_BYTES"
    done

    prefill r1 "$R1_URI"
    prefill r3 "$R3_URI"
    prefill qemu "$QEMU_URI"
    prefill_disk_files
    # A replica that missed the timeout under the prefill's load would be
    # rebuilding during the jobs: measure only a fully in-sync volume.
    local deadline=$((SECONDS + 600)) described
    while true; do
        described=$("$STRATA_CLI_BIN" volume describe r3 --dir "$TMP")
        [[ $described == *"3/3 in sync"* ]] && break
        ((SECONDS < deadline)) || die "r3 did not get back to 3/3 in sync: $described"
        sleep 1
    done
    run_jobs
    local shrinks
    shrinks=$(cat "$TMP"/strata-node-*.log | grep -c "in-sync set shrunk" || true)
    if ((shrinks > 0)); then
        log "NOTE: a replica of r3 was dropped $shrinks time(s) during the run (timeouts under load)"
        grep -h "in-sync set shrunk\|replica failed a request" "$TMP"/strata-node-*.log | head -n 5 >&2
    fi

    if [[ -n $RESULTS_DIR ]]; then
        mkdir -p "$RESULTS_DIR"
        cp "$TMP"/*.json "$RESULTS_DIR"/
    fi

    echo
    echo "Strata 1- and 3-replica volumes (io engine: $STRATA_ENGINE) vs qemu-nbd (--cache=none --aio=$QEMU_AIO)"
    echo "volume $VOL_SIZE, ${RUNTIME}s per job, fio $(fio --version), $(nproc) CPUs"
    echo "seqwrite: 1 MiB, QD$SEQ_IODEPTH; randread/randwrite: 4 KiB, QD32"
    echo
    print_table
}

# Run main only when executed, so the functions can be sourced for testing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
