#!/usr/bin/env bash
# Three server replicas of one fleet on etcd, N simulated agents spread over
# them (agent i prefers replica i mod 3, the others after it): each replica's
# memory per session and CPU while the fleet only heartbeats, the store's
# writes per heartbeat and per report (etcd revisions: one per committed
# write), an emergency patch published on one replica and timed on every
# agent, then `kill -9` of the leading replica: the time until another leads,
# and until its agents are back on the other two.
#
#   bench/replicas.sh [N]             # default 1000
#
# Environment:
#   MEMBERS=1            etcd members (3: a cluster of three on this machine)
#   IDLE_S=60            heartbeat-only window
#   HEARTBEAT=15s        the replicas' --heartbeat-interval
#   START_RATE=1000      sessions the simulator starts per second
#   PATCH_TIMEOUT_S=180  for every agent to commit and the server to acknowledge
#   RESULTS_DIR=DIR      keep the JSON report and outputs there
# Compare with bench/fleet-sim.sh (one server on sled) run the same way.
# Everything it starts is stopped on exit; temp dirs are removed (KEEP_TMP=1 keeps them).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N="${1:-1000}"
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 3 ] && [ "$N" -le 60000 ] || die "usage: $0 [N (3..60000)]"
MEMBERS="${MEMBERS:-1}"
IDLE_S="${IDLE_S:-60}"
HEARTBEAT="${HEARTBEAT:-15s}"
START_RATE="${START_RATE:-1000}"
PATCH_TIMEOUT_S="${PATCH_TIMEOUT_S:-180}"
GROUP=fleet
PREFIX=/bench/
command -v etcd >/dev/null || die "etcd is needed (Debian package etcd-server)"
command -v curl >/dev/null || die "curl is needed"

ensure_binaries etcd
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
FD_LIMIT="$(raise_fd_limit)"
make_tmp replicas
T="$BENCH_TMP"
shm_dir sim
S="$SHM_DIR"
log "temp dir $T; simulator state $S; $N agents; $MEMBERS etcd member(s)"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---- etcd ----
CLIENT_URLS=()
INITIAL=""
PEERS=()
for i in $(seq 0 $((MEMBERS - 1))); do
    CLIENT_URLS+=("http://127.0.0.1:$(free_port)")
    PEERS+=("http://127.0.0.1:$(free_port)")
    INITIAL="${INITIAL:+$INITIAL,}m$i=${PEERS[$i]}"
done
for i in $(seq 0 $((MEMBERS - 1))); do
    etcd --name "m$i" --data-dir "$T/etcd-m$i" \
        --listen-client-urls "${CLIENT_URLS[$i]}" --advertise-client-urls "${CLIENT_URLS[$i]}" \
        --listen-peer-urls "${PEERS[$i]}" --initial-advertise-peer-urls "${PEERS[$i]}" \
        --initial-cluster "$INITIAL" --initial-cluster-state new --initial-cluster-token bench \
        >"$T/etcd-m$i.log" 2>&1 &
    track "$!"
done
ENDPOINTS="$(IFS=,; echo "${CLIENT_URLS[*]}")"
for u in "${CLIENT_URLS[@]}"; do
    for _ in $(seq 1 600); do
        curl -sf "$u/health" 2>/dev/null | grep -q '"health":"true"' && break
        sleep 0.1
    done
    curl -sf "$u/health" | grep -q '"health":"true"' || die "etcd at $u is not healthy"
done
# etcd's revision: one per committed write.
revision() {
    curl -sf -X POST "${CLIENT_URLS[0]}/v3/kv/range" -d '{"key":"AA=="}' 2>/dev/null | jq -r .header.revision \
        || curl -sf -X POST "${CLIENT_URLS[-1]}/v3/kv/range" -d '{"key":"AA=="}' | jq -r .header.revision
}
STORE=(--store etcd --etcd-endpoints "$ENDPOINTS" --etcd-prefix "$PREFIX")

# ---- three replicas ----
"$BIN/flotilla-server" init --data-dir "$T/r0" --name 127.0.0.1 --name localhost "${STORE[@]}" >/dev/null
"$BIN/flotilla-server" export-ca --data-dir "$T/r0" --out "$T/ca.bundle" >/dev/null
for r in 1 2; do
    "$BIN/flotilla-server" init --data-dir "$T/r$r" --name 127.0.0.1 --name localhost \
        --replica-of "$T/ca.bundle" "${STORE[@]}" >/dev/null
done
PIDS=()
ADDRS=()
for r in 0 1 2; do
    start_server "$T/r$r" "$T/r$r.log" 127.0.0.1:0 "$HEARTBEAT" "${STORE[@]}"
    PIDS+=("$SERVER_PID")
    ADDRS+=("$SERVER_ADDR")
    echo "$SERVER_PID" >"$T/r$r.pid"
done
export FLOTILLA_SERVER="https://${ADDRS[0]}"
export FLOTILLA_CREDENTIAL="$T/r0/admin.credential"
FRESH=()
for r in 0 1 2; do FRESH+=("$(proc_mem "${PIDS[$r]}")"); done
log "replicas: ${ADDRS[*]} (pids ${PIDS[*]})"

"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
cli trust set --key "$T/release.pub" >/dev/null
TOKEN="$(cli --json token create --group "$GROUP" --max-uses "$N" --ttl 2h | jq -r .token)"
fleet_patch "$T/patch" "$GROUP" "$T/release.key"

SIM_ARGS=(run --state-dir "$S" --agents "$N" --token "$TOKEN"
    --trusted-key "$T/release.pub" --server-pid-file "$T/r0.pid"
    --start-rate "$START_RATE" --idle "${IDLE_S}s" --restart --marks "$T/marks"
    --report-json "$T/report.json" --connect-timeout 360s
    --manifest-id "$ID" --patch-timeout "${PATCH_TIMEOUT_S}s" --publish-delay 3s
    --publish-cmd "'$BIN/flotilla' patch publish '$W/bundle/manifest.json' --emergency")
for a in "${ADDRS[@]}"; do SIM_ARGS+=(--server "https://$a"); done
"$BIN/flotilla-sim" "${SIM_ARGS[@]}" >"$T/sim.txt" 2>"$T/sim.log" &
SIM_PID=$!
track "$SIM_PID"

wait_mark "$T/marks" joined 3600 >/dev/null || { tail -5 "$T/sim.log" >&2; die "the simulator did not finish joining"; }
wait_mark "$T/marks" connected 420 >/dev/null || { tail -5 "$T/sim.log" >&2; die "not all $N agents connected"; }
log "all connected"
wait_mark "$T/marks" idle-start 60 >/dev/null || die "no idle window"
CONNECTED=()
T0=()
for r in 0 1 2; do CONNECTED+=("$(proc_mem "${PIDS[$r]}")"); T0+=("$(proc_ticks "${PIDS[$r]}")"); done
REV0="$(revision)"
ti0="$(now_ms)"
wait_mark "$T/marks" patch-start $((IDLE_S + 120)) >/dev/null || { tail -5 "$T/sim.log" >&2; die "the patch did not start"; }
ti1="$(now_ms)"
REV1="$(revision)"
T1=()
for r in 0 1 2; do T1+=("$(proc_ticks "${PIDS[$r]}")"); done
log "publishing $ID"
wait_mark "$T/marks" patch-end $((PATCH_TIMEOUT_S + 60)) >/dev/null || die "the patch did not end"
REV2="$(revision)"
log "patch over"

# ---- kill -9 the leading replica; time the new leader ----
wait_mark "$T/marks" restart 120 >/dev/null || die "the simulator did not get ready for the kill"
LEADER_URL="$(cli --json replicas list | jq -r '.[] | select(.leader) | .url')"
L=-1
for r in 0 1 2; do [ "https://${ADDRS[$r]}" = "$LEADER_URL" ] && L=$r; done
[ "$L" -ge 0 ] || die "no leader among the replicas ($LEADER_URL)"
S_ASK=$(((L + 1) % 3))
tk="$(now_ms)"
kill -KILL "${PIDS[$L]}"
NEW_LEADER=""
for _ in $(seq 1 600); do
    NEW_LEADER="$(FLOTILLA_SERVER="https://${ADDRS[$S_ASK]}" cli --json replicas list 2>/dev/null \
        | jq -r --arg dead "$LEADER_URL" '.[] | select(.leader and .url != $dead) | .url' || true)"
    [ -n "$NEW_LEADER" ] && break
    sleep 0.05
done
tl="$(now_ms)"
[ -n "$NEW_LEADER" ] || die "no replica took the lead within 30 s"
log "replica $L (leader) killed; $NEW_LEADER leads after $((tl - tk)) ms"

for _ in $(seq 1 $((420 * 10))); do
    kill -0 "$SIM_PID" 2>/dev/null || break
    sleep 0.1
done
wait "$SIM_PID" || { tail -20 "$T/sim.log" >&2; die "the simulator failed"; }

# ---- results ----
R="$T/report.json"
HZ="$(getconf CLK_TCK)"
HB="$(jq -r '.idle.heartbeats // 0' "$R")"
echo
echo "replicas: $N simulated agents over 3 replicas on $MEMBERS etcd member(s) (release build, heartbeat $HEARTBEAT)"
echo "machine: $(nproc) cores, $(uname -r); open-files limit $FD_LIMIT; etcd $(etcd --version | head -1 | awk '{print $3}')"
echo "$(provenance)"
cat "$T/sim.txt"
echo "--- measured by this script ---"
for r in 0 1 2; do
    read -r f_rss _ _ _ <<<"${FRESH[$r]}"
    read -r c_rss _ c_pss c_thr <<<"${CONNECTED[$r]}"
    printf '%-46s %s fresh, %s with the fleet connected (%s threads)\n' "replica $r RSS" \
        "$(fmt_kib "$f_rss")" "$(fmt_kib "$c_rss")" "$c_thr"
    printf '%-46s %s%%\n' "  CPU over the idle window" \
        "$(awk -v a="${T0[$r]}" -v b="${T1[$r]}" -v hz="$HZ" -v ms="$((ti1 - ti0))" 'BEGIN { printf "%.2f", 100 * (b - a) / hz / (ms / 1000) }')"
done
printf '%-46s %s\n' "  per session, from fresh (all replicas)" \
    "$(awk -v f="${FRESH[*]}" -v c="${CONNECTED[*]}" -v n="$N" 'BEGIN { split(f, F, " "); split(c, C, " "); printf "%.1f KiB", ((C[1] - F[1]) + (C[5] - F[5]) + (C[9] - F[9])) / n }')"
printf '%-46s %s writes over %.0f s, %.0f heartbeats: %s per heartbeat\n' "store writes while idle (etcd revisions)" \
    "$((REV1 - REV0))" "$(awk -v ms="$((ti1 - ti0))" 'BEGIN { print ms / 1000 }')" "$HB" \
    "$(awk -v w="$((REV1 - REV0))" -v h="$HB" 'BEGIN { if (h > 0) printf "%.5f", w / h; else print "n/a" }')"
SETTLED="$(jq -r '.patch.settled // 0' "$R")"
printf '%-46s %s writes, %s nodes committed: %s per node (its reports and what they change)\n' \
    "store writes during the patch" "$((REV2 - REV1))" "$SETTLED" \
    "$(awk -v w="$((REV2 - REV1))" -v r="$SETTLED" 'BEGIN { if (r > 0) printf "%.2f", w / r; else print "n/a" }')"
printf '%-46s %s ms (replica %s killed; %s asked)\n' "leader fail-over (kill -9 to a new leader listed)" \
    "$((tl - tk))" "$L" "$S_ASK"
printf '%-46s %s at start, %s at end\n' "load average (1/5/15 min)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "${RESULTS_DIR:-}" ]; then
    mkdir -p "$RESULTS_DIR"
    cp "$R" "$T/sim.txt" "$T/sim.log" "$RESULTS_DIR/" 2>/dev/null || true
    for r in 0 1 2; do cp "$T/r$r.log" "$RESULTS_DIR/" 2>/dev/null || true; done
fi
