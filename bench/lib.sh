# shellcheck shell=bash
# Shared helpers for the bench/ scripts. Sourced, not run.
#
# Binaries: release builds in a target dir of their own, so a benchmark run never
# disturbs (or is disturbed by) a debug build in target/:
#
#   CARGO_TARGET_DIR=<repo>/target/bench cargo build --release --workspace --bins
#
# FLOTILLA_BENCH_BIN=DIR uses binaries from DIR instead (no build).
# KEEP_TMP=1 keeps the temporary directory (logs, state) after the run; a run
# that fails keeps it too (its path is printed).

set -euo pipefail

BENCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_TARGET="${BENCH_TARGET:-$BENCH_REPO/target/bench}"
BIN="${FLOTILLA_BENCH_BIN:-$BENCH_TARGET/release}"

# Nothing from the caller's environment may steer the programs we start.
unset FLOTILLA_AGENT_CONFIG FLOTILLA_AGENT_STATE_DIR FLOTILLA_AGENT_SERVERS \
    FLOTILLA_AGENT_ROLE_HOOK FLOTILLA_AGENT_MAX_BACKOFF FLOTILLA_AGENT_TOKEN \
    FLOTILLA_AGENT_MACHINE_ID FLOTILLA_CONFIG FLOTILLA_DATA_DIR FLOTILLA_LISTEN \
    FLOTILLA_HEARTBEAT_INTERVAL FLOTILLA_OFFLINE_GRACE FLOTILLA_STARTUP_GRACE \
    FLOTILLA_NODE_CERT_LIFETIME FLOTILLA_SERVER FLOTILLA_CREDENTIAL FLOTILLA_KEY_PASSWORD \
    FLOTILLA_LOG_FORMAT 2>/dev/null || true

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in jq ss awk; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

# ensure_binaries [etcd]: the release binaries, built when missing; with
# `etcd`, a server built with the etcd store (built again when it lacks it).
ensure_binaries() {
    local missing=0 b features=()
    for b in flotilla-server flotilla-agent flotilla flotilla-sim; do
        [ -x "$BIN/$b" ] || missing=1
    done
    if [ "${1:-}" = etcd ]; then
        features=(--features flotilla-server/etcd)
        if [ "$missing" = 0 ] && "$BIN/flotilla-server" run --store etcd --data-dir /nonexistent \
            --etcd-endpoints http://127.0.0.1:1 2>&1 | grep -q "built without the etcd store"; then
            missing=1
        fi
    fi
    if [ "$missing" = 1 ]; then
        [ -z "${FLOTILLA_BENCH_BIN:-}" ] || die "no (suitable) binaries in FLOTILLA_BENCH_BIN=$BIN"
        log "release binaries missing in $BIN; building (about 10 minutes on 2 cores):"
        log "  CARGO_TARGET_DIR=$BENCH_TARGET cargo build --release --workspace --bins ${features[*]}"
        (cd "$BENCH_REPO" && CARGO_TARGET_DIR="$BENCH_TARGET" cargo build --release --workspace --bins "${features[@]}") \
            || die "release build failed"
    fi
}

# Every process we start is recorded here; cleanup stops exactly these.
BENCH_PIDS=()
BENCH_TMP=""
# Directories outside BENCH_TMP (state on tmpfs) that cleanup removes too
# (KEEP_TMP=1 keeps them).
BENCH_EXTRA_DIRS=()

track() { BENCH_PIDS+=("$1"); }

cleanup() {
    local rc=$? pid live i d
    trap - EXIT INT TERM
    if [ "${#BENCH_PIDS[@]}" -gt 0 ]; then
        for pid in "${BENCH_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        # At most 10 s for a clean stop, then SIGKILL.
        for i in $(seq 1 100); do
            live=0
            for pid in "${BENCH_PIDS[@]}"; do
                if kill -0 "$pid" 2>/dev/null; then live=1; break; fi
            done
            [ "$live" = 0 ] && break
            sleep 0.1
        done
        for pid in "${BENCH_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        wait 2>/dev/null || true
    fi
    for d in "${BENCH_EXTRA_DIRS[@]}"; do
        if [ "${KEEP_TMP:-0}" = 1 ]; then log "kept $d"; else rm -rf "$d"; fi
    done
    if [ -n "$BENCH_TMP" ] && [ -d "$BENCH_TMP" ]; then
        if [ "${KEEP_TMP:-0}" = 1 ] || [ "$rc" != 0 ]; then
            log "kept $BENCH_TMP (logs and state)"
        else
            rm -rf "$BENCH_TMP"
        fi
    fi
    exit "$rc"
}

make_tmp() {
    BENCH_TMP="$(mktemp -d "${TMPDIR:-/tmp}/flotilla-bench-$1.XXXXXX")"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

now_ms() { date +%s%3N; }
now_ns() { date +%s%N; }

# wait_file FILE SECONDS: until FILE exists and is not empty (checked every 50 ms).
wait_file() {
    local i
    for i in $(seq 1 $(($2 * 20))); do
        [ -s "$1" ] && return 0
        sleep 0.05
    done
    return 1
}

# start_server DATA_DIR LOG LISTEN HEARTBEAT [EXTRA_ARGS...]: starts
# `flotilla-server run` (with EXTRA_ARGS), sets SERVER_PID and SERVER_ADDR
# (from DATA_DIR/server.addr).
start_server() {
    local data="$1" logf="$2" listen="$3" hb="$4"
    shift 4
    rm -f "$data/server.addr"
    # The simulated fleet comes from a few loopback addresses: no per-address
    # caps; and the benchmarks measure sessions up to the descriptor limit, so
    # only 256 descriptors are kept back instead of the default 1024.
    local max_conns=$(( $(ulimit -n) - 256 ))
    "$BIN/flotilla-server" run --data-dir "$data" --listen "$listen" \
        --heartbeat-interval "$hb" --max-connections-per-source 0 \
        --max-pending-per-source 0 --max-connections "$max_conns" "$@" >>"$logf" 2>&1 &
    SERVER_PID=$!
    track "$SERVER_PID"
    wait_file "$data/server.addr" 30 || { tail -20 "$logf" >&2; die "the server did not listen within 30 s"; }
    SERVER_ADDR="$(tr -d '[:space:]' <"$data/server.addr")"
}

# init_server DATA_DIR: `flotilla-server init` for 127.0.0.1.
init_server() {
    "$BIN/flotilla-server" init --data-dir "$1" --name 127.0.0.1 --name localhost >/dev/null
}

# fleet_patch DIR GROUP KEY: builds in DIR and signs with KEY a critical
# `files` patch (a 10 KiB tar to /opt/bench) for the nodes of GROUP; sets ID
# (its id) and W (DIR; the manifest is $W/bundle/manifest.json).
fleet_patch() {
    W="$1"
    ID="fleet-$(date +%s)"
    mkdir -p "$W/src"
    printf '1.0.0\n' >"$W/src/VERSION"
    head -c 8192 /dev/urandom | base64 >"$W/src/README"
    tar --owner=0 --group=0 --numeric-owner -C "$W/src" -cf "$W/payload.tar" VERSION README
    files_spec "$W/spec.toml" "$ID" fleet-files 1.0.0 critical 2h "$2" payload.tar
    "$BIN/flotilla" patch build "$W/spec.toml" --out-dir "$W/bundle" >/dev/null
    "$BIN/flotilla" patch sign "$W/bundle/manifest.json" --key "$3" >/dev/null
}

# cli ARGS...: the flotilla CLI, bounded in time (CLI_TIMEOUT seconds, default 30).
# files_spec FILE ID COMPONENT VERSION SEVERITY EXPIRES GROUP ARTIFACT: writes the
# spec of a `files` patch of ARTIFACT (a file beside FILE) into /opt/bench for
# the nodes of GROUP, for `flotilla patch build`.
files_spec() {
    cat >"$1" <<EOF
id = "$2"
component = "$3"
version = "$4"
severity = "$5"
expires_in = "$6"
[targets]
groups = ["$7"]
[[artifacts]]
name = "$8"
path = "$8"
[install]
type = "files"
artifact = "$8"
destination = "/opt/bench"
EOF
}

cli() { timeout "${CLI_TIMEOUT:-30}" "$BIN/flotilla" "$@"; }

# group_online GROUP: nodes online in GROUP per `flotilla group list --json`
# (empty when the server does not answer within 10 s).
group_online() {
    timeout 10 "$BIN/flotilla" --json group list 2>/dev/null \
        | jq -r --arg g "$1" '.[] | select(.name == $g) | .online' 2>/dev/null || true
}

# proc_mem PID: "VmRSS_kB VmHWM_kB Pss_kB Threads"
proc_mem() {
    local rss hwm pss thr
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$1/status")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$1/status")
    thr=$(awk '/^Threads:/ {print $2}' "/proc/$1/status")
    pss=$(awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo NA)
    echo "$rss $hwm $pss $thr"
}

# proc_ticks PID: utime+stime of all threads (live and exited), in clock ticks.
proc_ticks() {
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

# proc_runtime_ns PID: on-CPU time of the live threads in ns (schedstat).
proc_runtime_ns() {
    cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d\n", s }'
}

# proc_ctxsw PID: one line per live thread:
# "TID COMM VOLUNTARY NONVOLUNTARY ONCPU_NS".
proc_ctxsw() {
    local t rt
    for t in /proc/"$1"/task/*; do
        rt="$(awk '{ print $1 }' "$t/schedstat" 2>/dev/null || echo 0)"
        awk -v tid="${t##*/}" -v rt="$rt" '
            /^Name:/ { name = $2 }
            /^voluntary_ctxt_switches:/ { v = $2 }
            /^nonvoluntary_ctxt_switches:/ { n = $2 }
            END { print tid, name, v, n, rt }' "$t/status" 2>/dev/null || true
    done
}

# provenance: the source tree's commit and the binaries' build time.
provenance() {
    local rev dirty
    rev="$(git -C "$BENCH_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    dirty="$(git -C "$BENCH_REPO" status --porcelain --untracked-files=no -- . ':!bench' ':!docs/BENCHMARKS.md' 2>/dev/null | wc -l)"
    echo "source $rev ($dirty modified files outside bench/); binaries $BIN, built $(date -r "$BIN/flotilla-agent" '+%F %T')"
}

fmt_kib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }

# shm_dir NAME: makes a new directory on tmpfs (/dev/shm; TMPDIR when there is
# none) and sets SHM_DIR to it; cleanup removes it. Not for `$(…)`: the subshell
# would register it for cleanup in vain. The simulator's agents fsync every step:
# on tmpfs that costs the simulator little, so the disk is left to the server.
shm_dir() {
    local base=/dev/shm
    [ -d "$base" ] && [ -w "$base" ] || base="${TMPDIR:-/tmp}"
    SHM_DIR="$(mktemp -d "$base/flotilla-bench-$1.XXXXXX")"
    BENCH_EXTRA_DIRS+=("$SHM_DIR")
}

# raise_fd_limit: the soft open-files limit up to the hard one (a server holds one
# descriptor per session). Prints the limit now in force.
raise_fd_limit() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    ulimit -n
}

# wait_mark FILE PHASE SECONDS: until a line starting with PHASE appears in the
# simulator's marks FILE (checked every 50 ms); prints that line. Fails after
# SECONDS or when the process SIM_PID (if set) has exited.
wait_mark() {
    local i line
    for i in $(seq 1 $(($3 * 20))); do
        line="$(grep -m1 "^$2" "$1" 2>/dev/null || true)"
        if [ -n "$line" ]; then echo "$line"; return 0; fi
        if [ -n "${SIM_PID:-}" ] && ! kill -0 "$SIM_PID" 2>/dev/null; then return 1; fi
        sleep 0.05
    done
    return 1
}

# syscall_counts FILE: "fsync fdatasync sync_file_range pwrite64" counts from a
# `perf stat` output file (0 for any missing).
syscall_counts() {
    awk '/syscalls:sys_enter_fsync/ { f = $1 } /syscalls:sys_enter_fdatasync/ { d = $1 }
        /syscalls:sys_enter_sync_file_range/ { s = $1 } /syscalls:sys_enter_pwrite64/ { p = $1 }
        END { gsub(",", "", f); gsub(",", "", d); gsub(",", "", s); gsub(",", "", p);
              printf "%d %d %d %d\n", f, d, s, p }' "$1" 2>/dev/null || echo "0 0 0 0"
}

# The syscalls that make writes durable (and the writes), for `perf stat -e`.
SYNC_EVENTS="syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_sync_file_range,syscalls:sys_enter_pwrite64"

# The server's socket writes, for `perf record -e`.
WRITE_EVENTS="syscalls:sys_enter_write,syscalls:sys_exit_write,syscalls:sys_enter_writev,syscalls:sys_exit_writev"

# push_times PERF_SCRIPT_TXT MONO_OFFSET_NS PUBLISHED_AT_MS: from `perf script` of
# the server's write(2)/writev(2) calls and returns (CLOCK_MONOTONIC), the first
# call that wrote at least 1 KiB on each descriptor after the publish: the desired
# state carrying the patch (a session gets nothing that large before it). An exit
# is paired with its thread's last entry (writev's size is only in its return).
# Prints how many descriptors, and p50/p95/p99/max in ms after the publish, and
# the spread after the first push.
push_times() {
    awk -v off="$2" -v t0="$3" '
        function hex(s,   i, v) { v = 0
            for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
            return v }
        /syscalls:sys_(enter|exit)_writev?:/ {
            if (!match($0, /[0-9]+\.[0-9]+: +syscalls/)) next
            t = substr($0, RSTART, RLENGTH); sub(/: +syscalls/, "", t)
            tid = $2
            if ($0 ~ /sys_enter_/) {
                if (!match($0, /fd: 0x[0-9a-f]+/)) next
                fd[tid] = substr($0, RSTART + 6, RLENGTH - 6); at[tid] = t * 1000 + off / 1e6 - t0
                next
            }
            if (!(tid in fd) || !match($0, /: 0x[0-9a-f]+$/)) next
            bytes = hex(substr($0, RSTART + 4))
            f = fd[tid]; ms = at[tid]; delete fd[tid]
            if (ms >= 0 && bytes >= 1024 && bytes < 1e12 && !(f in seen)) { seen[f] = 1; printf "%.1f\n", ms }
        }' "$1" | sort -n | awk '
        { a[++n] = $1 }
        function q(p,   r) { r = int(p * n + 0.999999); if (r < 1) r = 1; return a[r] }
        END {
            if (n == 0) { print "none seen"; exit }
            printf "%d sessions: p50 %d p95 %d p99 %d max %d ms after the publish; spread p99 %d, max %d ms\n",
                n, q(0.5), q(0.95), q(0.99), a[n], q(0.99) - a[1], a[n] - a[1]
        }'
}

# accept_rate: from `perf script` of the server's accept4(2) returns on stdin, the
# connections it accepted (a descriptor returned, not EAGAIN): how many, over how
# long, and the most in any 1 s window.
accept_rate() {
    awk '
        function hex(s,   i, v) { v = 0
            for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
            return v }
        /syscalls:sys_exit_accept4:/ {
            if (!match($0, /[0-9]+\.[0-9]+: +syscalls/)) next
            t = substr($0, RSTART, RLENGTH); sub(/: +syscalls/, "", t)
            if (!match($0, /: 0x[0-9a-f]+$/)) next
            if (hex(substr($0, RSTART + 4)) < 1048576) printf "%.6f\n", t
        }' | sort -n | awk '
        { a[++n] = $1 }
        END {
            if (n == 0) { print "none seen"; exit }
            peak = 0; j = 1
            for (i = 1; i <= n; i++) { while (a[i] - a[j] >= 1) j++; if (i - j + 1 > peak) peak = i - j + 1 }
            span = a[n] - a[1]
            printf "%d in %.2f s (%.0f/s on average); peak %d in any 1 s\n", n, span, (span > 0 ? n / span : n), peak
        }'
}
