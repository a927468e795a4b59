#!/usr/bin/env bash
#
# rebuild.sh: how long Strata takes to bring a replica back in sync.
#
# One run:
#   1. starts `strata up` with three nodes (preallocated pools) in a temp dir,
#      creates a 3-replica volume (VOL_SIZE) served by a target on node-1 and
#      fills it with a sequential 1 MiB write; that write's bandwidth is the
#      reference "sequential write bandwidth" of the 3-replica volume;
#   2. delta rebuild: stops node-3 (`strata node stop`), rewrites DELTA_PERCENT
#      of the volume in random 1 MiB blocks, starts node-3 again and times how
#      long until `strata volume describe` shows 3/3 in sync;
#   3. full rebuild: stops node-3 again, rewrites the whole volume, starts
#      node-3 and times the catch-up, in which every extent differs and is
#      copied: the throughput of a full copy;
#   4. prints both times, the bytes each rebuild copied (from the target's
#      log), the full copy's throughput and its ratio to the sequential
#      write bandwidth.
#
# The rebuild rate limit is off (--rebuild-rate 0) so the figures are what
# the copy itself achieves; a production node defaults to 256 MiB/s.
#
# Usage:
#   bench/rebuild.sh
#   VOL_SIZE=4GiB POOL_SIZE=6GiB bench/rebuild.sh
#
# Environment knobs (defaults in brackets):
#   VOL_SIZE       size of the volume [2GiB]
#   POOL_SIZE      size of each node's pool [3GiB]
#   DELTA_PERCENT  share of the volume rewritten while node-3 is away [10]
#   STRATA_CLI_BIN use this strata CLI instead of building one
#   BENCH_TMPDIR   where the temp dir goes [$TMPDIR or /tmp] (not tmpfs)
#
# Needs: cargo (unless STRATA_CLI_BIN is set), python3, fio with the nbd engine.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VOL_SIZE=${VOL_SIZE:-2GiB}
POOL_SIZE=${POOL_SIZE:-3GiB}
DELTA_PERCENT=${DELTA_PERCENT:-10}

TMP=""
UP_PID=""

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $UP_PID ]] && kill -0 "$UP_PID" 2>/dev/null; then
        kill -INT "$UP_PID" 2>/dev/null || true
        wait "$UP_PID" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -n $TMP ]]; then
        tail -n 20 "$TMP/up.log" "$TMP"/node-1/node.log 2>/dev/null >&2 || true
    fi
    [[ -n $TMP ]] && rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${STRATA_CLI_BIN:-} ]]; then
    log "building strata (release)"
    (cd "$ROOT" && cargo build --release -p strata-cli)
    STRATA_CLI_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/strata
fi
command -v fio >/dev/null || die "fio not found"

TMP=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/strata-rebuild.XXXXXX")
strata() { "$STRATA_CLI_BIN" --dir "$TMP" "$@"; }

VOL_BYTES=$(python3 -c "import sys; n=sys.argv[1].upper().rstrip('B').rstrip('I'); u={'K':1,'M':2,'G':3,'T':4}; print(int(n[:-1])*1024**u[n[-1]] if n[-1] in u else int(n))" "$VOL_SIZE")
EXTENTS=$((VOL_BYTES >> 20))
DELTA_BLOCKS=$((EXTENTS * DELTA_PERCENT / 100))

log "starting strata up (3 nodes, preallocated ${POOL_SIZE} pools) in $TMP"
"$STRATA_CLI_BIN" up --dir "$TMP" --nodes 3 --pool-size "$POOL_SIZE" --preallocate \
    --rebuild-rate 0 >"$TMP/up.log" 2>&1 &
UP_PID=$!
deadline=$((SECONDS + 300))
until grep -q "Strata is up" "$TMP/up.log"; do
    kill -0 "$UP_PID" 2>/dev/null || die "strata up exited"
    ((SECONDS < deadline)) || die "strata up did not start"
    sleep 0.5
done

strata volume create rb --size "$VOL_SIZE" --replicas 3 --node node-1 >&2
URI=$(strata volume export rb --node node-1)

# fio's nbd engine prints "fio: connected to NBD server" on stdout, so the
# JSON goes through a file.
fio_json() {
    local out
    out=$(mktemp "$TMP/fio.XXXXXX.json")
    fio --ioengine=nbd --uri="$URI" --size="$VOL_BYTES" --output-format=json \
        --output="$out" "$@" >/dev/null
    cat "$out"
}

log "filling the volume (sequential 1 MiB writes, QD8)"
SEQ_MBS=$(fio_json --name=fill --rw=write --bs=1M --iodepth=8 --end_fsync=1 |
    python3 -c "import json,sys; print(json.load(sys.stdin)['jobs'][0]['write']['bw_bytes']/1e6)")

# Times from `strata node start node-3` until the volume is 3/3 in sync.
catch_up() {
    local started=$SECONDS start_ns end_ns
    start_ns=$(date +%s%N)
    strata node start node-3 >&2
    local described
    while true; do
        # Captured first: grep -q would close the pipe under the CLI.
        described=$(strata volume describe rb)
        [[ $described == *"3/3 in sync"* ]] && break
        ((SECONDS - started < 1800)) || die "node-3 did not catch up: $described"
        sleep 0.1
    done
    end_ns=$(date +%s%N)
    python3 -c "print(($end_ns - $start_ns) / 1e9)"
}

# The bytes and the copy time of the newest finished rebuild, from the log
# of node-1 (the target), as "bytes seconds".
last_rebuild() {
    grep "replica rebuilt and back in sync" "$TMP/node-1/node.log" | tail -n1 |
        python3 -c "
import re, sys
line = sys.stdin.read()
b = int(re.search(r'bytes=(\d+)', line).group(1))
e = re.search(r'elapsed=([\d.]+)(ms|s|µs)', line)
secs = float(e.group(1)) / {'ms': 1e3, 's': 1, 'µs': 1e6}[e.group(2)]
print(b, secs)"
}

log "delta: node-3 away while $DELTA_PERCENT% of the volume ($DELTA_BLOCKS MiB) is rewritten"
strata node stop node-3 >&2
fio_json --name=delta --rw=randwrite --bs=1M --iodepth=8 --number_ios="$DELTA_BLOCKS" \
    --end_fsync=1 >/dev/null
DELTA_WALL=$(catch_up)
read -r DELTA_BYTES DELTA_COPY < <(last_rebuild)

log "full: node-3 away while the whole volume is rewritten"
strata node stop node-3 >&2
fio_json --name=rewrite --rw=write --bs=1M --iodepth=8 --end_fsync=1 >/dev/null
FULL_WALL=$(catch_up)
read -r FULL_BYTES FULL_COPY < <(last_rebuild)

python3 - "$VOL_SIZE" "$DELTA_PERCENT" "$SEQ_MBS" "$DELTA_WALL" "$DELTA_BYTES" "$DELTA_COPY" \
    "$FULL_WALL" "$FULL_BYTES" "$FULL_COPY" <<'PY'
import sys
vol, pct, seq, dwall, dbytes, dcopy, fwall, fbytes, fcopy = sys.argv[1:]
seq, dwall, dbytes, dcopy = float(seq), float(dwall), int(dbytes), float(dcopy)
fwall, fbytes, fcopy = float(fwall), int(fbytes), float(fcopy)
full_mbs = fbytes / fcopy / 1e6
print()
print(f"volume {vol}, 3 replicas on one machine, rebuild rate unlimited")
print(f"sequential write (1 MiB, QD8) of the 3-replica volume: {seq:,.0f} MB/s")
print(f"delta rebuild, {pct}% changed: {dwall:.2f} s from node start to 3/3 in sync "
      f"(copy {dcopy:.2f} s, {dbytes / 2**20:,.0f} MiB copied)")
print(f"full rebuild: {fwall:.2f} s from node start to 3/3 in sync "
      f"(copy {fcopy:.2f} s, {fbytes / 2**20:,.0f} MiB, {full_mbs:,.0f} MB/s)")
print(f"full rebuild throughput / sequential write bandwidth: {full_mbs / seq:.2f}")
PY
