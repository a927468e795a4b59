#!/usr/bin/env bash
#
# db-failover.sh: how long a client of a local-mode PostgreSQL cluster waits
# when its primary dies, over RUNS failovers: from SIGKILL of the primary's
# instance manager (its postgres dies with it) to the first commit
# acknowledged through the cluster's stable read-write address
# (`strata db uri`), which is what an application sees.
#
# What one run does:
#   1. builds strata and strata-instance (debug: the time is PostgreSQL's
#      promotion and the controller's polling, not CPU) unless STRATA_BIN and
#      STRATA_INSTANCE_BIN point at binaries already built;
#   2. starts `strata up` (three storage nodes) in a fresh temp dir and
#      `strata db create ha --instances 3 --sync`: three PostgreSQL 15
#      instances, each on its own 3-replica Strata volume, synchronous
#      replication (ANY 1);
#   3. RUNS times: kills the primary's instance manager with SIGKILL, retries
#      an INSERT through the read-write address until one commits, and
#      records the time; then waits until the lost instance is back as a
#      ready replica;
#   4. checks that every acknowledged INSERT is in the table, and prints each
#      time, the median and the worst.
#
# Usage:
#   bench/db-failover.sh
#   RUNS=20 bench/db-failover.sh
#
# Environment knobs (defaults in brackets):
#   RUNS                 failovers [10]
#   STRATA_BIN           use this strata instead of building one
#   STRATA_INSTANCE_BIN  use this strata-instance instead of building one
#   BENCH_TMPDIR         where the temp dir goes [$TMPDIR or /tmp]; not tmpfs
#   KEEP_TMP             if set, the temp dir (logs) is kept
#
# Needs: root (loop devices, mounts), nbdfuse, PostgreSQL 15 (psql) in
# /usr/lib/postgresql/15/bin, python3, cargo (unless both *_BIN are set).

set -euo pipefail

# shellcheck source=bench/local-db.sh
source "$(dirname "${BASH_SOURCE[0]}")/local-db.sh"
RUNS=${RUNS:-10}

[[ $(id -u) == 0 ]] || fail "needs root (loop devices and mounts)"
[[ -x "$PG_BIN/psql" ]] || fail "no psql in $PG_BIN (.ci/install-test-deps)"

build_db_binaries dev
start_strata_up failover --pool-size 2GiB
strata() { "$STRATA_BIN" --dir "$DIR" "$@"; }

echo "creating a 3-instance cluster with synchronous replication..."
strata db create ha --instances 3 --size 256MiB --sync >/dev/null || fail "strata db create failed"
read -r RW_PORT APP_PASSWORD < <(python3 -c '
import json, sys
spec = json.load(open(sys.argv[1]))
print(spec["rw_port"], spec["app_password"])' "$DIR/db/ha/spec.json")
export PGPASSWORD="$APP_PASSWORD" PGCONNECT_TIMEOUT=1
sql() {
    "$PG_BIN/psql" -X -q -t -A -h 127.0.0.1 -p "$RW_PORT" -U app -d app -c "$1" 2>/dev/null
}
sql "CREATE TABLE ledger (n int PRIMARY KEY)" || fail "cannot reach the primary"

# The process id of the primary's instance manager, from `strata db describe`
# (the status it shows is refreshed by polling, so an old process id is
# waited out).
primary_pid() {
    local described pid
    for _ in $(seq 1 100); do
        described=$(strata db describe ha)
        pid=$(awk '$2 == "primary" && $3 == "yes" { print $5; exit }' <<<"$described")
        if [[ -n "$pid" ]] && grep -q strata-instance "/proc/$pid/cmdline" 2>/dev/null; then
            echo "$pid"
            return
        fi
        sleep 0.2
    done
}
# Whether the cluster is whole again: all three instances ready in
# `strata db describe`, and both replicas connected to the primary (asked
# of the primary itself: the status describe shows is refreshed by polling,
# and a lost instance that is still being rewound cannot be a sync standby).
settled() {
    local described streaming
    described=$(strata db describe ha)
    [[ $(awk '($2 == "primary" || $2 == "replica") && $3 == "yes"' <<<"$described" | wc -l) == 3 ]] ||
        return 1
    streaming=$(sql "SELECT count(*) FROM pg_stat_replication") ||
        return 1
    [[ "$streaming" == 2 ]]
}
wait_settled() {
    for _ in $(seq 1 1200); do
        settled && return 0
        sleep 0.25
    done
    fail "the cluster did not get back to three ready instances"
}

wait_settled
acknowledged=0
times=()
for run in $(seq 1 "$RUNS"); do
    pid=$(primary_pid)
    [[ -n "$pid" ]] || fail "no ready primary"
    start=$(date +%s%N)
    kill -KILL "$pid"
    n=$((acknowledged + 1))
    # An attempt whose answer was lost may have committed: retries of the
    # same row must not fail on it.
    until sql "INSERT INTO ledger VALUES ($n) ON CONFLICT DO NOTHING" >/dev/null; do
        (($(date +%s%N) - start < 120000000000)) || fail "no commit within 120 s of the kill"
        sleep 0.05
    done
    end=$(date +%s%N)
    acknowledged=$n
    ms=$(((end - start) / 1000000))
    times+=("$ms")
    echo "failover $run: ${ms} ms"
    wait_settled
done

count=$(sql "SELECT count(*) FROM ledger") || fail "cannot count the ledger"
[[ "$count" == "$acknowledged" ]] || fail "$acknowledged commits acknowledged, $count in the table"

python3 - "${times[@]}" <<'PY'
import statistics, sys
times = sorted(int(t) for t in sys.argv[1:])
print()
print(f"{len(times)} failovers (SIGKILL of the primary's instance manager -> first commit"
      " through the read-write address), synchronous replication, every acknowledged commit kept")
print(f"median {statistics.median(times):.0f} ms, worst {times[-1]} ms, best {times[0]} ms")
PY
