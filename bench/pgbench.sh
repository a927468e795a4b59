#!/usr/bin/env bash
#
# pgbench.sh: PostgreSQL 15 throughput (pgbench TPC-B-like, TPS) on a Strata
# volume with 3 replicas versus on a local directory, in one run, on the same
# machine and disk, with the same instance manager and configuration.
#
# What one run does:
#   1. builds strata and strata-instance (release) unless STRATA_BIN and
#      STRATA_INSTANCE_BIN point at binaries already built;
#   2. starts `strata up` (three storage nodes, preallocated pool files) in a
#      fresh temp dir and `strata db create bench --instances 1
#      --volume-replicas 3`: one PostgreSQL on ext4 on a 3-replica volume,
#      attached through nbdfuse + a loop device (or kernel nbd);
#   3. starts a second strata-instance on a plain directory of the same temp dir;
#   4. runs `pgbench -i -s SCALE` then `pgbench -c CLIENTS -j 2 -T DURATION
#      -M prepared` against each, directly on its port (not through the local
#      proxy, so both have the same path), and prints both TPS and the ratio;
#   5. stops everything and deletes the temp dir on exit, whatever happens.
#
# The three nodes share this machine's disk and CPUs: every commit's flush is
# done three times on one disk here, where a real cluster spreads the replicas
# over three machines. nbdfuse adds a FUSE round trip per request that a
# kernel nbd device does not have. One run is noisy on a shared machine.
#
# Usage:
#   bench/pgbench.sh
#   DURATION=120 CLIENTS=8 SCALE=20 bench/pgbench.sh
#
# Environment knobs (defaults in brackets):
#   DURATION             seconds of each measured pgbench run [60]
#   CLIENTS              pgbench clients [4]
#   SCALE                pgbench scale factor (x 16 MB) [10]
#   VOL_SIZE             size of the Strata volume [2GiB]
#   POOL_SIZE            size of each node's pool file [4GiB]
#   PREALLOCATE          1: zero-fill the pool files first (strata up --preallocate),
#                        as a raw device would behave; costs 3 x POOL_SIZE of disk [1]
#   STRATA_BIN           use this strata instead of building one
#   STRATA_INSTANCE_BIN  use this strata-instance instead of building one
#   BENCH_TMPDIR         where the temp dir goes [$TMPDIR or /tmp]; not tmpfs
#   KEEP_TMP             if set, the temp dir (logs) is kept
#
# Needs: root (loop devices, mounts), nbdfuse, PostgreSQL 15 server and
# pgbench in /usr/lib/postgresql/15/bin, python3, cargo (unless both *_BIN set).

set -euo pipefail

# shellcheck source=bench/local-db.sh
source "$(dirname "${BASH_SOURCE[0]}")/local-db.sh"
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-4}
SCALE=${SCALE:-10}
VOL_SIZE=${VOL_SIZE:-2GiB}
POOL_SIZE=${POOL_SIZE:-4GiB}
PREALLOCATE=${PREALLOCATE:-1}

[[ $(id -u) == 0 ]] || fail "needs root (loop devices and mounts)"
[[ -x "$PG_BIN/pgbench" ]] || fail "no pgbench in $PG_BIN (.ci/install-test-deps)"

build_db_binaries release

UP_FLAGS=(--pool-size "$POOL_SIZE")
[[ "$PREALLOCATE" == 1 ]] && UP_FLAGS+=(--preallocate)
start_strata_up pgbench "${UP_FLAGS[@]}"

echo "creating the database on a ${VOL_SIZE} volume with 3 replicas..."
"$STRATA_BIN" --dir "$DIR" db create bench --instances 1 --size "$VOL_SIZE" \
    --volume-replicas 3 >/dev/null || fail "strata db create failed"
# The instance's own port and the generated application password.
read -r STRATA_PORT APP_PASSWORD < <(python3 -c '
import json, sys
spec = json.load(open(sys.argv[1]))
print(spec["instances"][0]["pg_port"], spec["app_password"])' "$DIR/db/bench/spec.json")

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

echo "starting PostgreSQL on a local directory..."
LOCAL_PORT=$(free_port)
mkdir -p "$TMP/local"
RUN_AS=()
[[ $(id -u) == 0 ]] && RUN_AS=(--run-as postgres)
STRATA_SUPERUSER_PASSWORD=bench-superuser STRATA_REPLICATION_PASSWORD=bench-replication \
STRATA_APP_PASSWORD="$APP_PASSWORD" \
    "$STRATA_INSTANCE_BIN" --name local-1 --data-dir "$TMP/local/pgdata" \
    --socket-dir "$TMP/local/run" --listen-address 127.0.0.1 --port "$LOCAL_PORT" \
    --api-listen "127.0.0.1:$(free_port)" --peers local-1 "${RUN_AS[@]}" \
    >"$TMP/local.log" 2>&1 &
LOCAL_PID=$!
export PGPASSWORD="$APP_PASSWORD"
# Ready once the application role exists: the instance manager creates it
# after postgres accepts connections, so pg_isready alone is too early.
for _ in $(seq 1 240); do
    "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$LOCAL_PORT" -U app -d app -c "SELECT 1" \
        >/dev/null 2>&1 && break
    kill -0 "$LOCAL_PID" 2>/dev/null || { tail -20 "$TMP/local.log" >&2; fail "local instance exited"; }
    sleep 0.5
done
# Prints the TPS of one measured run against 127.0.0.1:PORT.
measure() {
    local port=$1 label=$2
    echo "[$label] pgbench -i -s $SCALE" >&2
    "$PG_BIN/pgbench" -h 127.0.0.1 -p "$port" -U app -i -s "$SCALE" -q app >/dev/null 2>"$TMP/$label-init.err" \
        || fail "pgbench -i on $label failed: $(cat "$TMP/$label-init.err")"
    echo "[$label] pgbench -c $CLIENTS -j 2 -T $DURATION -M prepared" >&2
    "$PG_BIN/pgbench" -h 127.0.0.1 -p "$port" -U app -c "$CLIENTS" -j 2 -T "$DURATION" \
        -M prepared app 2>/dev/null | tee "$TMP/$label.out" >&2 \
        || fail "pgbench on $label failed"
    awk '/^tps = / { print $3; exit }' "$TMP/$label.out"
}

TPS_LOCAL=$(measure "$LOCAL_PORT" local)
TPS_STRATA=$(measure "$STRATA_PORT" strata)

echo
echo "pgbench (scale $SCALE, $CLIENTS clients, ${DURATION}s, prepared), PostgreSQL 15, one run," \
    "pools preallocated: $PREALLOCATE"
printf '%-36s %10s\n' "data directory on" "TPS"
printf '%-36s %10.0f\n' "local directory" "$TPS_LOCAL"
printf '%-36s %10.0f\n' "Strata volume, 3 replicas" "$TPS_STRATA"
python3 -c 'import sys; print("Strata / local: %.2f" % (float(sys.argv[2]) / float(sys.argv[1])))' \
    "$TPS_LOCAL" "$TPS_STRATA"
