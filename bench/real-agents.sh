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
#   Besides the server's view, each round also reports when the last agent logged
#   `patch finished ... phase="committed"` (the agents' own logs, same clock).
#   If the server does not show N committed within PATCH_DEADLINE_S (default 60),
#   the script checks whether the server's store still takes a write (a `token
#   create` with a 10 s limit), skips the remaining rounds and goes on;
# - kill -9 the server, start it again on the same address, and poll
#   `flotilla group list --json` every 100 ms until N are online again; if a round
#   did not complete, it then polls that patch (up to STUCK_WAIT_S, default 120)
#   to see whether the agents' queued reports land on the restarted server.
# Prints the server's RSS with N agents connected, before and after.
# Builds the release binaries first if they are missing (see bench/lib.sh).
# Everything it starts is stopped on exit; the temp dir is removed (KEEP_TMP=1 keeps it).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N="${1:-100}"
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 1000 ] || die "usage: $0 [N (1..1000)]"
GROUP=bench
ROUNDS=3
PATCH_DEADLINE_S="${PATCH_DEADLINE_S:-60}"      # per round
ONLINE_DEADLINE_S=300    # for N agents to come online, first and after the restart
STUCK_WAIT_S="${STUCK_WAIT_S:-120}"            # for queued reports to land after the restart

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
cli trust set --key "$T/release.pub" >/dev/null
TOKEN="$(cli --json token create --group "$GROUP" --max-uses "$N" --ttl 1h | jq -r .token)"

# ---- join and run N agents ----
j0="$(now_ms)"
for i in $(seq 1 "$N"); do
    timeout 60 "$BIN/flotilla-agent" --state-dir "$T/agents/a$i" join --server "$FLOTILLA_SERVER" \
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


# agent_commits ID T0: from the agents' own logs (same machine, same clock):
# "AGENTS_THAT_COMMITTED LAST_COMMIT_MS_AFTER_T0" (-1 when none).
agent_commits() {
    local lines last
    lines="$(grep -h "patch finished patch=$1 phase=\"committed\"" "$T"/agent-*.log 2>/dev/null | awk '{ print $1 }' | sort)"
    if [ -z "$lines" ]; then echo "0 -1"; return; fi
    last="$(date -u -d "$(echo "$lines" | tail -1)" +%s%3N)"
    echo "$(echo "$lines" | wc -l) $((last - $2))"
}

# agent_phases ID T0: from the agents' logs, for patch ID, how long after T0 (ms)
# the agents received it, had downloaded its artifact, and finished committed:
# "received p50/max, downloaded p50/max, committed p50/max (n)".
agent_phases() {
    local t0s
    t0s="$(TZ=UTC date -d "@$(($2 / 1000))" +%H:%M:%S)"
    awk -v id="$1" -v t0="$t0s" -v t0ms="$(($2 % 1000))" '
        function ms(ts,   h) {   # 2026-11-27T09:22:24.025585Z -> ms after T0
            split(substr(ts, 12, 15), h, ":")
            v = ((h[1] * 3600 + h[2] * 60 + h[3]) - base) * 1000 - t0ms
            return v < -43200000 ? v + 86400000 : v
        }
        BEGIN { split(t0, b, ":"); base = b[1] * 3600 + b[2] * 60 + b[3] }
        FNR == 1 { on = 0 }
        index($0, "patch received patch=" id " ") || $0 ~ ("patch received patch=" id "$") { on = 1; r[++nr] = ms($1) }
        on && /artifact downloaded and verified/ { d[++nd] = ms($1) }
        index($0, "patch finished patch=" id " phase=\"committed\"") { c[++nc] = ms($1); on = 0 }
        function q(a, n,   i, j, t) {
            if (n == 0) return "-"
            for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return sprintf("%d/%d", a[int((n + 1) / 2)], a[n])
        }
        END { printf "received %s, downloaded %s, committed %s ms p50/max (%d agents)\n", q(r, nr), q(d, nd), q(c, nc), nc }
    ' "$T"/agent-*.log
}

# make_patch K: writes patch K's spec and payload, builds and signs the bundle.
make_patch() {
    local k="$1" w="$T/patch$1"
    mkdir -p "$w/src"
    printf '1.0.%s\n' "$k" >"$w/src/VERSION"
    printf 'bench payload %s\n' "$k" >"$w/src/README"
    tar --owner=0 --group=0 --numeric-owner -C "$w/src" -cf "$w/payload.tar" VERSION README
    files_spec "$w/spec.toml" "bench-$STAMP-$k" bench-files "1.0.$k" low 1h "$GROUP" payload.tar
    "$BIN/flotilla" patch build "$w/spec.toml" --out-dir "$w/bundle" >/dev/null
    "$BIN/flotilla" patch sign "$w/bundle/manifest.json" --key "$T/release.key" >/dev/null
}

# poll_committed ID DEADLINE_MS PERIOD_MS: polls `patch status` until N committed.
# Sets DONE_AT (ms, end of the first poll that showed N; empty if none),
# LOWER (start of the last poll that did not), PSTAT (poll statistics).
poll_committed() {
    local id="$1" deadline="$2" period="$3" a b rest polls=0 poll_ms=0 committed bad
    local out="$T/status-$id.json"
    DONE_AT=""; LOWER=""
    while [ "$(now_ms)" -lt "$deadline" ]; do
        a="$(now_ms)"
        timeout 10 "$BIN/flotilla" --json patch status "$id" >"$out" 2>/dev/null || true
        # awk, not jq, to keep the poll cycle short: count the nodes' phases.
        read -r committed bad < <(awk '/"phase": "committed"/ { c++ }
            /"phase": "(failed|rejected|rolled_back)"/ { b++ } END { print c + 0, b + 0 }' "$out")
        b="$(now_ms)"
        polls=$((polls + 1)); poll_ms=$((poll_ms + b - a))
        if [ "$bad" != 0 ]; then
            jq -r '.nodes[] | select(.phase == "failed" or .phase == "rejected" or .phase == "rolled_back") | "\(.node_id) \(.phase): \(.error)"' "$out" | head -5 >&2
            die "patch $id: $bad node(s) did not commit"
        fi
        if [ "$committed" = "$N" ]; then DONE_AT="$b"; break; fi
        LOWER="$a"
        rest=$((period - (b - a)))
        [ "$rest" -gt 0 ] && sleep "$(awk -v r="$rest" 'BEGIN { printf "%.3f", r / 1000 }')"
    done
    PSTAT="$polls polls, mean $((poll_ms / polls)) ms per status call"
    LAST_COUNTS="$(jq -c .counts "$out" 2>/dev/null || echo '?')"
}

# ---- publish → all committed, ROUNDS times ----
STAMP="$(date +%s)"
R_LINE=(); R_OK=(); R_AGENT=(); R_PHASES=()
STUCK_ID=""
for k in $(seq 1 "$ROUNDS"); do
    make_patch "$k"
    id="bench-$STAMP-$k"
    w="$T/patch$k"
    t0="$(now_ms)"
    if ! CLI_TIMEOUT=60 cli patch publish "$w/bundle/manifest.json" >"$w/publish.out" 2>&1; then
        R_LINE+=("round $k: publish failed or hung >60 s: $(tail -1 "$w/publish.out")")
        STUCK_ID="$id"; break
    fi
    tp="$(now_ms)"
    poll_committed "$id" $((t0 + PATCH_DEADLINE_S * 1000)) 50
    read -r a_n a_last <<<"$(agent_commits "$id" "$t0")"
    R_AGENT+=("$a_last")
    R_PHASES+=("round $k: $(agent_phases "$id" "$t0")")
    if [ -n "$DONE_AT" ]; then
        last_report="$(jq -r '[.nodes[] | select(.phase == "committed") | .updated_at_ms] | max' "$T/status-$id.json")"
        R_OK+=($((DONE_AT - t0)))
        R_LINE+=("round $k: $((DONE_AT - t0)) ms (publish cmd $((tp - t0)) ms; last commit per agent logs +$a_last ms; $([ -n "$LOWER" ] && echo "previous poll began +$((LOWER - t0)) ms" || echo "the first poll showed it"); $PSTAT)")
        log "${R_LINE[-1]}"
    else
        R_LINE+=("round $k: NOT all committed in ${PATCH_DEADLINE_S} s: server shows $LAST_COUNTS; agent logs: $a_n of $N committed, last +$a_last ms (publish cmd $((tp - t0)) ms; $PSTAT)")
        log "${R_LINE[-1]}"
        STUCK_ID="$id"
        # Is the server's store still taking writes? (a token is a small write)
        if CLI_TIMEOUT=10 cli token create --group bench-probe --ttl 1h >/dev/null 2>&1; then
            PROBE="a store write (token create) still answered"
        else
            PROBE="a store write (token create) got no answer within 10 s"
        fi
        log "  $PROBE; skipping the remaining rounds"
        break
    fi
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
STUCK_LINE=""
if [ -n "$STUCK_ID" ]; then
    # The agents queue their reports; after the restart they should land.
    poll_committed "$STUCK_ID" $(($(now_ms) + STUCK_WAIT_S * 1000)) 100
    if [ -n "$DONE_AT" ]; then
        STUCK_LINE="the queued reports of $STUCK_ID: all $N committed $((DONE_AT - ts)) ms after the restart"
    else
        STUCK_LINE="the queued reports of $STUCK_ID: still $LAST_COUNTS ${STUCK_WAIT_S} s after the restart"
    fi
    log "$STUCK_LINE"
fi
sleep 2
SMEM_RECONNECTED="$(proc_mem "$SERVER_PID")"

# ---- results ----
read -r s_rss s_hwm s_pss s_thr <<<"$SMEM_CONNECTED"
read -r a_rss a_pss a_max <<<"$AMEM"
echo
echo "$N real flotilla-agent processes, one server (release build, heartbeat 5s, agents --max-backoff 2s)"
echo "machine: $(nproc) cores, $(uname -r)"
echo "$(provenance)"
printf '%-44s %s\n' "measure" "value"
printf '%-44s %s\n' "--------------------------------------------" "------------------------------"
printf '%-44s %s ms (one after another)\n' "join N agents" "$((j1 - j0))"
printf '%-44s %s ms\n' "start N agents → all online" "$FIRST_ONLINE_MS"
for line in "${R_LINE[@]}"; do printf '%-44s %s\n' "publish → all $N committed" "$line"; done
for line in "${R_PHASES[@]}"; do printf '%-44s %s\n' "  per agent logs, after publish started" "$line"; done
if [ "${#R_OK[@]}" = "$ROUNDS" ]; then
    printf '%-44s %s ms (goal < 1000 ms)\n' "publish → all committed, MEDIAN of $ROUNDS" "$(median3 "${R_OK[@]}")"
    printf '%-44s %s ms\n' "  same, last commit per agent logs, median" "$(median3 "${R_AGENT[@]}")"
else
    printf '%-44s %s\n' "publish → all committed, MEDIAN of $ROUNDS" "n/a: only ${#R_OK[@]} of $ROUNDS rounds completed (goal < 1000 ms)"
fi
[ -z "${PROBE:-}" ] || printf '%-44s %s\n' "store write probe after the stuck round" "$PROBE"
[ -z "$STUCK_LINE" ] || printf '%-44s %s\n' "after the restart" "$STUCK_LINE"
printf '%-44s %s ms (server dead after %s ms; listening %s ms after start)\n' \
    "server restart → all $N online" "$RESTART_MS" "$((tk1 - tk))" "$((tl - ts))"
printf '%-44s %s\n' "" "(goal < 5000 ms; $RESTART_POLLS)"
printf '%-44s %s, Pss %s, %s threads\n' "server RSS, $N agents connected" "$(fmt_kib "$s_rss")" "$(fmt_kib "$s_pss")" "$s_thr"
read -r x_rss _ x_pss x_thr <<<"$SMEM_AFTER_PATCHES"
printf '%-44s %s, Pss %s, %s threads\n' "server RSS after the patch rounds" "$(fmt_kib "$x_rss")" "$(fmt_kib "$x_pss")" "$x_thr"
read -r y_rss _ y_pss y_thr <<<"$SMEM_RECONNECTED"
printf '%-44s %s, Pss %s, %s threads\n' "server RSS after restart, all reconnected" "$(fmt_kib "$y_rss")" "$(fmt_kib "$y_pss")" "$y_thr"
printf '%-44s %s RSS total (max %s), %s Pss total\n' "agents' memory" "$(fmt_kib "$a_rss")" "$(fmt_kib "$a_max")" "$(fmt_kib "$a_pss")"
printf '%-44s %s at start, %s at end (other work on this machine)\n' "load average (1/5/15 min)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
echo "polling: patch status every 50 ms (back to back when a call takes longer), group list every 100 ms;"
echo "a time is the end of the first poll that showed the condition, so it may be late by up to one poll cycle."
