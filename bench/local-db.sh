# Shared by the benchmarks that run PostgreSQL on a local Strata cluster
# (pgbench.sh, db-failover.sh); sourced, not run. It starts `strata up` in a
# temp dir and takes everything down again on exit, whatever happens.
#
# Sets: ROOT, PG_BIN, TMP (the temp dir), DIR (the cluster's dir in it),
# UP_PID, STRATA_BIN and STRATA_INSTANCE_BIN (exported, for strata up).
# A script may set LOCAL_PID to a process of its own to stop first.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=/usr/lib/postgresql/15/bin
TMP=""
UP_PID=""
LOCAL_PID=""

cleanup() {
    set +e
    if [[ -n "$LOCAL_PID" ]]; then
        kill -TERM "$LOCAL_PID" 2>/dev/null
        wait "$LOCAL_PID" 2>/dev/null
    fi
    if [[ -n "$UP_PID" ]]; then
        # strata up stops the databases (and detaches their volumes), then the nodes.
        kill -INT "$UP_PID" 2>/dev/null
        wait "$UP_PID" 2>/dev/null
    fi
    if [[ -n "$TMP" && -z "${KEEP_TMP:-}" ]]; then
        rm -rf "$TMP"
    elif [[ -n "$TMP" ]]; then
        echo "kept $TMP" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "error: $*" >&2
    if [[ -n "$TMP" && -f "$TMP/up.log" ]]; then
        echo "--- strata up log (tail)" >&2
        tail -20 "$TMP/up.log" >&2
    fi
    exit 1
}

# Builds strata and strata-instance with cargo PROFILE (dev or release)
# unless STRATA_BIN and STRATA_INSTANCE_BIN are both set.
build_db_binaries() {
    local profile=$1 dir
    if [[ -z "${STRATA_BIN:-}" || -z "${STRATA_INSTANCE_BIN:-}" ]]; then
        echo "building strata and strata-instance ($profile)..."
        (cd "$ROOT" && cargo build --profile "$profile" -q -p strata-cli -p strata-operator \
            --bin strata --bin strata-instance)
        dir=${CARGO_TARGET_DIR:-$ROOT/target}/$([[ $profile == dev ]] && echo debug || echo "$profile")
        STRATA_BIN=${STRATA_BIN:-$dir/strata}
        STRATA_INSTANCE_BIN=${STRATA_INSTANCE_BIN:-$dir/strata-instance}
    fi
    export STRATA_INSTANCE_BIN
}

# Makes the temp dir (strata-NAME.XXXXXX) and starts `strata up ARGS...` in
# it, waiting until it is up.
start_strata_up() {
    local name=$1
    shift
    TMP=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/strata-$name.XXXXXX")
    # PostgreSQL runs as the postgres user and must reach its folders in there.
    chmod 755 "$TMP"
    DIR="$TMP/strata"
    echo "starting strata up ($*)..."
    "$STRATA_BIN" --dir "$DIR" up "$@" >"$TMP/up.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 600); do
        grep -q "Press Ctrl-C to stop." "$TMP/up.log" 2>/dev/null && return 0
        kill -0 "$UP_PID" 2>/dev/null || fail "strata up exited (disk space for the pools?)"
        sleep 0.5
    done
    fail "strata up did not start"
}
