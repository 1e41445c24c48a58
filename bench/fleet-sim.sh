#!/usr/bin/env bash
# One server, N simulated agents (flotilla-sim: N real agent-library sessions in
# one process, each with its own identity, no-op executor): the server's memory per
# connected agent and its CPU while the fleet only heartbeats, an emergency small
# patch timed on every agent, and a server restart (kill -9) timed until every
# agent is back.
#
#   bench/fleet-sim.sh [N]             # default 1000
#
# Environment:
#   IDLE_S=60            heartbeat-only window (0 skips it)
#   HEARTBEAT=15s        the server's --heartbeat-interval (its default)
#   START_RATE=1000      sessions the simulator starts per second (0: all at once)
#   PATCH_TIMEOUT_S=180  for every agent to commit and the server to acknowledge
#   SEPARATE_CHANNELS=1  agents open their own report/download connections, as a
#                        real agent does, instead of using the session's
#   PROFILE=1            `perf record -g` of the server during the patch
#   PROFILE_RESTART=1    the same of the new server until every agent is back
#   PERF_CALLGRAPH=-g    how those record call chains (release builds have no frame
#                        pointers: "--call-graph dwarf,16384" gives real callers)
#   RESULTS_DIR=DIR      keep the JSON report, outputs and profiles there
#   PATCH=0              no patch (idle and restart only)
#   SOURCES=K            loopback source addresses the sessions leave from
#                        (default: one per 25,000 agents; one address has ~28k
#                        ephemeral ports towards the server's one address and port)
#
# What it does:
# - a server (release build) on a free port of 127.0.0.1 with a fresh data dir;
#   the open-files limit raised to the hard limit (one descriptor per session);
# - a signing key and trust policy; a token for N joins (`token create --max-uses N`);
#   a `files` patch of a 10 KiB tar to /opt/bench, severity critical, built and
#   signed before the clock starts;
# - flotilla-sim joins N agents (32 at a time), starts their sessions START_RATE a
#   second, waits for all, settles 5 s, then the idle window, during which this
#   script counts the server's fsync/fdatasync/sync_file_range/pwrite64 calls with
#   `perf stat`; then runs `flotilla patch publish … --emergency` (the clock starts
#   just before) and times every agent's steps from its own outbox; then this script
#   kills the server with SIGKILL and starts it again on the same address, and the
#   simulator times the reconnection;
# - the simulator's state (one sled database, one directory per agent) lives on
#   tmpfs, so its fsyncs do not compete with the server's disk.
# Everything it starts is stopped on exit; temp dirs are removed (KEEP_TMP=1 keeps them).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N="${1:-1000}"
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 200000 ] || die "usage: $0 [N (1..200000)]"
IDLE_S="${IDLE_S:-60}"
HEARTBEAT="${HEARTBEAT:-15s}"
START_RATE="${START_RATE:-1000}"
PATCH_TIMEOUT_S="${PATCH_TIMEOUT_S:-180}"
GROUP=fleet
JOIN_DEADLINE_S=3600
CONNECT_DEADLINE_S=420
command -v perf >/dev/null || die "perf is needed (to count the server's fsyncs)"

ensure_binaries
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
FD_LIMIT="$(raise_fd_limit)"
make_tmp fleet
T="$BENCH_TMP"
shm_dir sim
S="$SHM_DIR"
log "temp dir $T; simulator state $S; $N agents; open-files limit $FD_LIMIT"
if [ $((N + 64)) -gt "$FD_LIMIT" ]; then
    log "WARNING: $N sessions need more descriptors than the limit ($FD_LIMIT) allows the server"
fi

init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 "$HEARTBEAT"
ADDR="$SERVER_ADDR"
echo "$SERVER_PID" >"$T/server.pid"
export FLOTILLA_SERVER="https://$ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
SMEM_FRESH="$(proc_mem "$SERVER_PID")"
log "server pid $SERVER_PID on $ADDR"

"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
cli trust set --key "$T/release.pub" >/dev/null
TOKEN="$(cli --json token create --group "$GROUP" --max-uses "$N" --ttl 2h | jq -r .token)"

# The emergency patch: built and signed now, published by the simulator.
fleet_patch "$T/patch" "$GROUP" "$T/release.key"

SIM_ARGS=(run --server "$FLOTILLA_SERVER" --state-dir "$S" --agents "$N" --token "$TOKEN"
    --trusted-key "$T/release.pub" --server-pid-file "$T/server.pid" --server-data-dir "$T/server"
    --start-rate "$START_RATE" --idle "${IDLE_S}s" --restart --marks "$T/marks"
    --report-json "$T/report.json" --connect-timeout "$((CONNECT_DEADLINE_S - 60))s")
if [ "${PATCH:-1}" != 0 ]; then
    SIM_ARGS+=(--manifest-id "$ID" --patch-timeout "${PATCH_TIMEOUT_S}s" --publish-delay 3s
        --publish-cmd "'$BIN/flotilla' patch publish '$W/bundle/manifest.json' --emergency")
fi
[ "${SEPARATE_CHANNELS:-0}" = 1 ] && SIM_ARGS+=(--separate-channels)
SOURCES="${SOURCES:-$(((N + 24999) / 25000))}"
[ "$SOURCES" -gt 1 ] && SIM_ARGS+=(--source-addresses "$SOURCES")
"$BIN/flotilla-sim" "${SIM_ARGS[@]}" >"$T/sim.txt" 2>"$T/sim.log" &
SIM_PID=$!
track "$SIM_PID"

wait_mark "$T/marks" joined "$JOIN_DEADLINE_S" >/dev/null || { tail -5 "$T/sim.log" >&2; die "the simulator did not finish joining"; }
log "joined; connecting"
wait_mark "$T/marks" "connected" "$CONNECT_DEADLINE_S" >/dev/null || { tail -5 "$T/sim.log" >&2; die "not all $N agents connected"; }
log "all connected"
if [ "$IDLE_S" -gt 0 ]; then
    wait_mark "$T/marks" idle-start 60 >/dev/null || die "no idle window"
    SMEM_CONNECTED="$(proc_mem "$SERVER_PID")"
    SERVER_FDS="$(ls "/proc/$SERVER_PID/fd" | wc -l)"
    # Counts only; tracepoints cost the server next to nothing. The record says
    # which thread (and code path) made each call.
    perf stat -e "$SYNC_EVENTS" -p "$SERVER_PID" -o "$T/perf-idle.txt" -- sleep "$IDLE_S" 2>/dev/null &
    track "$!"
    perf record -e "$SYNC_EVENTS" -g -p "$SERVER_PID" -o "$T/perf-idle.data" -- sleep "$IDLE_S" >/dev/null 2>&1 &
    track "$!"
    # Where the sessions come from (one line per source address).
    SOURCE_SPREAD="$(ss -Htn state established "( sport = :${ADDR##*:} )" 2>/dev/null \
        | awk '{ split($4, a, ":"); n[a[1]]++ } END { for (k in n) printf "%s %d; ", k, n[k] }')"
    log "idle window ${IDLE_S}s (server fds: $SERVER_FDS)"
fi

if [ "${PATCH:-1}" != 0 ]; then
    wait_mark "$T/marks" patch-start $((IDLE_S + 120)) >/dev/null || { tail -5 "$T/sim.log" >&2; die "the patch did not start"; }
    perf stat -e "$SYNC_EVENTS" -p "$SERVER_PID" -o "$T/perf-patch.txt" 2>/dev/null &
    PERF_PATCH=$!
    track "$PERF_PATCH"
    # The server's socket writes, on CLOCK_MONOTONIC (this perf refuses CLOCK_REALTIME),
    # with the offset to wall time: when the server itself pushed the patch to each
    # session, whatever the simulator's threads were doing.
    MONO_OFF_NS="$(python3 -c 'import time; print(time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC))' 2>/dev/null || true)"
    if [ -n "$MONO_OFF_NS" ]; then
        perf record -k CLOCK_MONOTONIC -e "$WRITE_EVENTS" -p "$SERVER_PID" -o "$T/perf-push.data" >/dev/null 2>&1 &
        PERF_PUSH=$!
        track "$PERF_PUSH"
    fi
    if [ "${PROFILE:-0}" = 1 ]; then
        perf record -F 499 ${PERF_CALLGRAPH:--g} -p "$SERVER_PID" -o "$T/perf-patch.data" >/dev/null 2>&1 &
        PERF_REC=$!
        track "$PERF_REC"
    fi
    log "publishing $ID"
    wait_mark "$T/marks" patch-end $((PATCH_TIMEOUT_S + 60)) >/dev/null || die "the patch did not end"
    kill -INT "$PERF_PATCH" 2>/dev/null || true
    [ -n "${PERF_PUSH:-}" ] && kill -INT "$PERF_PUSH" 2>/dev/null || true
    [ -n "${PERF_REC:-}" ] && kill -INT "$PERF_REC" 2>/dev/null || true
    sleep 1
    SMEM_PATCHED="$(proc_mem "$SERVER_PID")"
    log "patch over"
fi

# ---- kill -9 the server, start it again on the same address ----
wait_mark "$T/marks" restart $((IDLE_S + 120)) >/dev/null || die "the simulator did not get ready for the restart"
tk="$(now_ms)"
{ kill -KILL "$SERVER_PID"; wait "$SERVER_PID"; } 2>/dev/null || true
tk1="$(now_ms)"
start_server "$T/server" "$T/server.log" "$ADDR" "$HEARTBEAT"
tl="$(now_ms)"
echo "$SERVER_PID" >"$T/server.pid"
log "server restarted (pid $SERVER_PID): dead $((tk1 - tk)) ms after SIGKILL, listening $((tl - tk1)) ms after start"
# Every connection the new server accepts, timed: its own accept rate, against
# its admission limit (the simulator sees sessions open, in bursts when busy).
perf record -e syscalls:sys_exit_accept4 -p "$SERVER_PID" -o "$T/perf-accept.data" >/dev/null 2>&1 &
PERF_ACCEPT=$!
track "$PERF_ACCEPT"
if [ "${PROFILE_RESTART:-0}" = 1 ]; then
    perf record -F 499 ${PERF_CALLGRAPH:--g} -p "$SERVER_PID" -o "$T/perf-restart.data" >/dev/null 2>&1 &
    PERF_RESTART=$!
    track "$PERF_RESTART"
    wait_mark "$T/marks" reconnect 600 >/dev/null || true
    kill -INT "$PERF_RESTART" 2>/dev/null || true
fi

for _ in $(seq 1 $((420 * 10))); do
    kill -0 "$SIM_PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$SIM_PID" 2>/dev/null && die "the simulator did not finish"
wait "$SIM_PID" || { tail -20 "$T/sim.log" >&2; die "the simulator failed"; }
kill -INT "$PERF_ACCEPT" 2>/dev/null || true
sleep 1

# ---- results ----
R="$T/report.json"
echo
echo "fleet-sim: $N simulated agents, one server (release build, heartbeat $HEARTBEAT)"
echo "machine: $(nproc) cores, $(uname -r); open-files limit $FD_LIMIT"
echo "$(provenance)"
cat "$T/sim.txt"
echo "--- measured by this script ---"
read -r f_rss _ f_pss f_thr <<<"$SMEM_FRESH"
printf '%-46s %s, %s threads\n' "server RSS fresh (no node)" "$(fmt_kib "$f_rss")" "$f_thr"
if [ -n "${SMEM_CONNECTED:-}" ]; then
    read -r c_rss _ c_pss c_thr <<<"$SMEM_CONNECTED"
    printf '%-46s %s, Pss %s, %s threads, %s fds\n' "server with $N connected" "$(fmt_kib "$c_rss")" \
        "$(fmt_kib "$c_pss")" "$c_thr" "$SERVER_FDS"
    printf '%-46s %s KiB (goal ≤ 40 KiB)\n' "  per agent, from fresh (nodes + sessions)" \
        "$(awk -v a="$c_rss" -v b="$f_rss" -v n="$N" 'BEGIN { printf "%.1f", (a - b) / n }')"
    printf '%-46s %s\n' "  sessions by source address" "${SOURCE_SPREAD:-n/a}"
fi
if [ -f "$T/perf-idle.txt" ]; then
    read -r fs fds sfr pw <<<"$(syscall_counts "$T/perf-idle.txt")"
    hb="$(jq -r '.idle.heartbeats // 0' "$R")"
    printf '%-46s fsync %s, fdatasync %s, sync_file_range %s, pwrite64 %s\n' \
        "server syscalls over the idle window" "$fs" "$fds" "$sfr" "$pw"
    printf '%-46s %s (goal ≤ 0.01)\n' "  durable writes per heartbeat" \
        "$(awk -v w="$((fs + fds + sfr))" -v h="$hb" 'BEGIN { if (h > 0) printf "%.5f (%d / %.0f)", w / h, w, h; else print "n/a" }')"
    printf '%-46s %s\n' "  db growth, and per 10 min at that rate" \
        "$(jq -r '[.idle.db_bytes_start, .idle.db_bytes_end, .idle.secs] | "\(.[1] - .[0]) bytes in \(.[2] | floor) s; \((.[1] - .[0]) * 600 / .[2] | floor) bytes per 10 min (goal < 1 MB)"' "$R")"
fi
if [ -f "$T/perf-patch.txt" ]; then
    read -r fs fds sfr pw <<<"$(syscall_counts "$T/perf-patch.txt")"
    printf '%-46s fsync %s, fdatasync %s, sync_file_range %s, pwrite64 %s\n' \
        "server syscalls during the patch" "$fs" "$fds" "$sfr" "$pw"
fi
if [ -f "$T/perf-push.data" ]; then
    perf script -i "$T/perf-push.data" 2>/dev/null >"$T/perf-push.txt" || true
    printf '%-46s %s\n' "server's socket writes during the patch" \
        "$(grep -o 'syscalls:sys_enter_[a-z]*' "$T/perf-push.txt" | sort | uniq -c | awk '{ printf "%s %s; ", $2, $1 }')"
    printf '%-46s %s\n' "server pushed the patch (first ≥1 KiB write)" \
        "$(push_times "$T/perf-push.txt" "$MONO_OFF_NS" "$(jq -r .patch.published_at_ms "$R")")"
fi
if [ -f "$T/perf-accept.data" ]; then
    printf '%-46s %s\n' "new server's accepts (accept4 returning a socket)" \
        "$(perf script -i "$T/perf-accept.data" 2>/dev/null | accept_rate)"
fi
if [ -n "${SMEM_PATCHED:-}" ]; then
    read -r p_rss _ p_pss p_thr <<<"$SMEM_PATCHED"
    printf '%-46s %s, %s threads\n' "server after the patch" "$(fmt_kib "$p_rss")" "$p_thr"
    printf '%-46s %s\n' "server's view of the patch" \
        "$(timeout 30 "$BIN/flotilla" --json patch status "$ID" 2>/dev/null | jq -c .counts 2>/dev/null || echo 'no answer')"
fi
printf '%-46s dead %s ms after SIGKILL, listening %s ms after start\n' "server restart" \
    "$((tk1 - tk))" "$((tl - tk1))"
printf '%-46s %s at start, %s at end (other work on this machine)\n' "load average (1/5/15 min)" \
    "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
if [ -f "$T/perf-idle.data" ]; then
    echo "--- the server's storage syscalls over the idle window, by thread (perf record) ---"
    perf report -i "$T/perf-idle.data" --stdio --no-children -g none --sort comm,sym 2>/dev/null \
        | grep -E '^ +[0-9]' | sed 's/ \{2,\}/  /g' | head -12 || true
fi
if [ -f "$T/perf-patch.data" ]; then
    perf report -i "$T/perf-patch.data" --stdio --no-children -g none --percent-limit 0.7 \
        --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | sed 's/ \{2,\}/  /g' | cut -c1-160 \
        >"$T/perf-patch-top.txt" || true
    perf report -i "$T/perf-patch.data" --stdio --no-children -g none --sort comm 2>/dev/null \
        | grep -E '^ +[0-9]' | sed 's/ \{2,\}/  /g' >"$T/perf-patch-threads.txt" || true
    # Inclusive time of the server's own functions: where the work starts.
    perf report -i "$T/perf-patch.data" --stdio --children -g none --percent-limit 2 \
        --sort symbol 2>/dev/null | grep -E '^ +[0-9]' | grep -E 'flotilla|sled|h2::|tonic|rustls|tokio::runtime::blocking' \
        | sed 's/ \{2,\}/  /g' | cut -c1-200 >"$T/perf-patch-children.txt" || true
    echo "--- server profile during the patch: by thread, then top symbols (perf record -F 499) ---"
    head -8 "$T/perf-patch-threads.txt"
    head -30 "$T/perf-patch-top.txt"
    echo "--- inclusive (children, self) of the server's functions ---"
    head -40 "$T/perf-patch-children.txt"
fi
if [ -f "$T/perf-restart.data" ]; then
    sleep 1
    perf report -i "$T/perf-restart.data" --stdio --no-children -g none --sort comm 2>/dev/null \
        | grep -E '^ +[0-9]' | sed 's/ \{2,\}/  /g' >"$T/perf-restart-threads.txt" || true
    perf report -i "$T/perf-restart.data" --stdio --no-children -g none --percent-limit 0.7 \
        --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | sed 's/ \{2,\}/  /g' | cut -c1-160 \
        >"$T/perf-restart-top.txt" || true
    echo "--- new server from its start until all reconnected: by thread, then top symbols ---"
    head -6 "$T/perf-restart-threads.txt"
    head -25 "$T/perf-restart-top.txt"
fi
# RESULTS_DIR=DIR keeps the report, the simulator's output and the profiles.
if [ -n "${RESULTS_DIR:-}" ]; then
    mkdir -p "$RESULTS_DIR"
    cp "$R" "$T/sim.txt" "$T"/perf-*.txt "$T"/perf-patch.data "$RESULTS_DIR/" 2>/dev/null || true
    tail -200 "$T/sim.log" >"$RESULTS_DIR/sim.log.tail" 2>/dev/null || true
    tail -200 "$T/server.log" >"$RESULTS_DIR/server.log.tail" 2>/dev/null || true
fi
