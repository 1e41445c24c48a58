#!/usr/bin/env bash
# N real agent processes against one server: publish → all committed, and
# server restart (kill -9) → all reconnected.
#
#   bench/real-agents.sh [N]           # default 100
#
# - a server (release build) on a free port of 127.0.0.1, --heartbeat-interval 5s;
# - a signing key (`flotilla key generate --unencrypted`) and the trust policy;
# - N agents, each joined with --trusted-key, its own --machine-id and --state-dir,
#   and run with --root <tmp>/roots/rootI --allow-path /opt --max-backoff 2s;
# - waits until `flotilla group list --json` shows N online;
# - 3 times: builds, signs and publishes a small `files` patch (no health check)
#   and polls `flotilla --json patch status ID` every 50 ms until N committed. The
#   time reported is from just before `flotilla patch publish` starts to the end of
#   the first poll that showed N committed (so it includes the CLI's upload and
#   publish calls); the median of the 3 is the result;
# - kill -9 the server, start it again on the same address, and poll
#   `flotilla group list --json` every 100 ms until N are online again.
# Prints the server's RSS with N agents connected, before and after.
# Builds the release binaries first if they are missing (see bench/lib.sh).
# Everything it starts is stopped on exit; the temp dir is removed (KEEP_TMP=1 keeps it).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N="${1:-100}"
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 1000 ] || die "usage: $0 [N (1..1000)]"
GROUP=bench
ROUNDS=3
PATCH_DEADLINE_S=120     # per round
ONLINE_DEADLINE_S=300    # for N agents to come online, first and after the restart

ensure_binaries
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
make_tmp agents
T="$BENCH_TMP"
log "temp dir $T; $N agents"

# Room for N agents' sockets and files in the server and in this shell.
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true

init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 5s
ADDR="$SERVER_ADDR"
export FLOTILLA_SERVER="https://$ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
log "server pid $SERVER_PID on $ADDR"

"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
"$BIN/flotilla" trust set --key "$T/release.pub" >/dev/null
TOKEN="$("$BIN/flotilla" --json token create --group "$GROUP" --max-uses "$N" --ttl 1h | jq -r .token)"

# ---- join and run N agents ----
j0="$(now_ms)"
for i in $(seq 1 "$N"); do
    "$BIN/flotilla-agent" --state-dir "$T/agents/a$i" join --server "$FLOTILLA_SERVER" \
        --token "$TOKEN" --trusted-key "$T/release.pub" --machine-id "bench-agent-$i" \
        >/dev/null 2>"$T/join-$i.err" || { cat "$T/join-$i.err" >&2; die "join of agent $i failed"; }
done
j1="$(now_ms)"
log "$N agents joined in $((j1 - j0)) ms (one after another)"

AGENT_PIDS=()
r0="$(now_ms)"
for i in $(seq 1 "$N"); do
    mkdir -p "$T/roots/root$i/opt"
    "$BIN/flotilla-agent" --state-dir "$T/agents/a$i" run --root "$T/roots/root$i" \
        --allow-path /opt --max-backoff 2s >"$T/agent-$i.log" 2>&1 &
    AGENT_PIDS+=($!)
    track "$!"
done

# wait_online DEADLINE_S PERIOD_MS: polls the group until N online; sets
# ONLINE_AT (ms, end of the first poll that showed N), POLLS, POLL_MS_SUM.
wait_online() {
    local deadline=$(($(now_ms) + $1 * 1000)) period="$2" a b on last=""
    POLLS=0; POLL_MS_SUM=0; ONLINE_AT=""
    while [ "$(now_ms)" -lt "$deadline" ]; do
        a="$(now_ms)"
        on="$(group_online "$GROUP")"
        b="$(now_ms)"
        POLLS=$((POLLS + 1)); POLL_MS_SUM=$((POLL_MS_SUM + b - a))
        if [ "$on" != "$last" ]; then
            log "  +$((b - WAIT_T0)) ms: ${on:-no answer} online"
            last="$on"
        fi
        if [ "$on" = "$N" ]; then ONLINE_AT="$b"; return 0; fi
        local rest=$((period - (b - a)))
        [ "$rest" -gt 0 ] && sleep "$(awk -v r="$rest" 'BEGIN { printf "%.3f", r / 1000 }')"
    done
    return 1
}

WAIT_T0="$r0"
wait_online "$ONLINE_DEADLINE_S" 100 || die "not all $N agents came online in ${ONLINE_DEADLINE_S}s"
FIRST_ONLINE_MS=$((ONLINE_AT - r0))
log "$N agents online $FIRST_ONLINE_MS ms after the first was started"
for p in "${AGENT_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "agent pid $p exited"; done
sleep 3

agents_mem() {   # "sum_rss_kB sum_pss_kB max_rss_kB"
    local p
    for p in "${AGENT_PIDS[@]}"; do proc_mem "$p"; done \
        | awk '{ r += $1; s += $3; if ($1 > m) m = $1 } END { printf "%d %d %d\n", r, s, m }'
}
SMEM_CONNECTED="$(proc_mem "$SERVER_PID")"
AMEM="$(agents_mem)"

# ---- publish → all committed, ROUNDS times ----
STAMP="$(date +%s)"
RESULTS=(); PUBLISH_MS=(); AGENT_COMMIT_MS=(); POLL_STATS=()
for k in $(seq 1 "$ROUNDS"); do
    id="bench-$STAMP-$k"
    w="$T/patch$k"
    mkdir -p "$w/src"
    printf '1.0.%s\n' "$k" >"$w/src/VERSION"
    printf 'bench payload %s\n' "$k" >"$w/src/README"
    tar --owner=0 --group=0 --numeric-owner -C "$w/src" -cf "$w/payload.tar" VERSION README
    cat >"$w/spec.toml" <<EOF
id = "$id"
component = "bench-files"
version = "1.0.$k"
severity = "low"
expires_in = "1h"
[targets]
groups = ["$GROUP"]
[[artifacts]]
name = "payload.tar"
path = "payload.tar"
[install]
type = "files"
artifact = "payload.tar"
destination = "/opt/bench"
EOF
    "$BIN/flotilla" patch build "$w/spec.toml" --out-dir "$w/bundle" >/dev/null
    "$BIN/flotilla" patch sign "$w/bundle/manifest.json" --key "$T/release.key" >/dev/null

    t0="$(now_ms)"
    "$BIN/flotilla" patch publish "$w/bundle/manifest.json" >"$w/publish.out"
    tp="$(now_ms)"
    deadline=$((t0 + PATCH_DEADLINE_S * 1000))
    polls=0; poll_ms=0; done_at=""; prev_start=""
    while [ "$(now_ms)" -lt "$deadline" ]; do
        a="$(now_ms)"
        "$BIN/flotilla" --json patch status "$id" >"$w/status.json" 2>/dev/null || true
        # awk, not jq, to keep the poll cycle short: count the nodes' phases.
        read -r committed bad < <(awk '/"phase": "committed"/ { c++ }
            /"phase": "(failed|rejected|rolled_back)"/ { b++ } END { print c + 0, b + 0 }' "$w/status.json")
        b="$(now_ms)"
        polls=$((polls + 1)); poll_ms=$((poll_ms + b - a))
        if [ "$bad" != 0 ]; then
            jq -r '.nodes[] | select(.phase == "failed" or .phase == "rejected" or .phase == "rolled_back") | "\(.node_id) \(.phase): \(.error)"' "$w/status.json" | head -5 >&2
            die "patch $id: $bad node(s) did not commit"
        fi
        if [ "$committed" = "$N" ]; then done_at="$b"; break; fi
        prev_start="$a"
        rest=$((50 - (b - a)))
        [ "$rest" -gt 0 ] && sleep "$(awk -v r="$rest" 'BEGIN { printf "%.3f", r / 1000 }')"
    done
    [ -n "$done_at" ] || die "patch $id: not all $N committed within ${PATCH_DEADLINE_S}s ($(jq -c .counts "$w/status.json"))"
    # The agents' own report times (same machine, same clock): last commit.
    last_commit="$(jq -r '[.nodes[] | select(.phase == "committed") | .updated_at_ms] | max' "$w/status.json")"
    first_seen="$(jq -r '[.nodes[] | .first_at_ms] | min' "$w/status.json")"
    RESULTS+=($((done_at - t0)))
    PUBLISH_MS+=($((tp - t0)))
    AGENT_COMMIT_MS+=($((last_commit - t0)))
    POLL_STATS+=("$polls polls, mean $((poll_ms / polls)) ms per status call")
    log "round $k ($id): all $N committed at $((done_at - t0)) ms after publish started" \
        "(publish command $((tp - t0)) ms; first agent report +$((first_seen - t0)) ms;" \
        "last agent commit +$((last_commit - t0)) ms; lower bound $(( ${prev_start:-$t0} - t0 )) ms;" \
        "$polls polls, mean $((poll_ms / polls)) ms each)"
done
SMEM_AFTER_PATCHES="$(proc_mem "$SERVER_PID")"

# ---- kill -9 the server, restart it on the same address ----
log "kill -9 server pid $SERVER_PID; restarting on $ADDR"
tk="$(now_ms)"
{ kill -KILL "$SERVER_PID"; wait "$SERVER_PID"; } 2>/dev/null || true
tk1="$(now_ms)"
ts="$(now_ms)"
start_server "$T/server" "$T/server.log" "$ADDR" 5s
tl="$(now_ms)"
[ "$SERVER_ADDR" = "$ADDR" ] || die "the server came back on $SERVER_ADDR, not $ADDR"
WAIT_T0="$ts"
wait_online "$ONLINE_DEADLINE_S" 100 || die "not all $N agents reconnected in ${ONLINE_DEADLINE_S}s"
RESTART_MS=$((ONLINE_AT - ts))
RESTART_POLLS="$POLLS polls, mean $((POLL_MS_SUM / POLLS)) ms per group list call"
for p in "${AGENT_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "agent pid $p exited"; done
sleep 2
SMEM_RECONNECTED="$(proc_mem "$SERVER_PID")"

# ---- results ----
med="$(median3 "${RESULTS[@]}")"
read -r s_rss s_hwm s_pss s_thr <<<"$SMEM_CONNECTED"
read -r a_rss a_pss a_max <<<"$AMEM"
echo
echo "$N real flotilla-agent processes, one server (release build, heartbeat 5s, agents --max-backoff 2s)"
echo "machine: $(nproc) cores, $(uname -r)"
printf '%-44s %s\n' "measure" "value"
printf '%-44s %s\n' "--------------------------------------------" "------------------------------"
printf '%-44s %s ms (one after another)\n' "join N agents" "$((j1 - j0))"
printf '%-44s %s ms\n' "start N agents → all online" "$FIRST_ONLINE_MS"
for k in $(seq 1 "$ROUNDS"); do
    printf '%-44s %s ms (publish cmd %s ms; last agent commit +%s ms; %s)\n' \
        "publish → all $N committed, round $k" "${RESULTS[$((k - 1))]}" "${PUBLISH_MS[$((k - 1))]}" \
        "${AGENT_COMMIT_MS[$((k - 1))]}" "${POLL_STATS[$((k - 1))]}"
done
printf '%-44s %s ms (goal < 1000 ms)\n' "publish → all committed, MEDIAN of $ROUNDS" "$med"
printf '%-44s %s ms (server dead after %s ms; listening %s ms after start)\n' \
    "server restart → all $N online" "$RESTART_MS" "$((tk1 - tk))" "$((tl - ts))"
printf '%-44s %s\n' "" "(goal < 5000 ms; $RESTART_POLLS)"
printf '%-44s %s, Pss %s, %s threads\n' "server RSS, $N agents connected" "$(fmt_kib "$s_rss")" "$(fmt_kib "$s_pss")" "$s_thr"
read -r x_rss _ x_pss _ <<<"$SMEM_AFTER_PATCHES"
printf '%-44s %s, Pss %s\n' "server RSS after the $ROUNDS patches" "$(fmt_kib "$x_rss")" "$(fmt_kib "$x_pss")"
read -r y_rss _ y_pss y_thr <<<"$SMEM_RECONNECTED"
printf '%-44s %s, Pss %s, %s threads\n' "server RSS after restart, all reconnected" "$(fmt_kib "$y_rss")" "$(fmt_kib "$y_pss")" "$y_thr"
printf '%-44s %s RSS total (max %s), %s Pss total\n' "agents' memory" "$(fmt_kib "$a_rss")" "$(fmt_kib "$a_max")" "$(fmt_kib "$a_pss")"
printf '%-44s %s at start, %s at end (other work on this machine)\n' "load average (1/5/15 min)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
echo "polling: patch status every 50 ms (or back to back when a call takes longer); group list every 100 ms."
