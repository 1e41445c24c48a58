#!/usr/bin/env bash
# The dashboard's nodes page at fleet size: one server (release build) with
# `--web-listen`, N simulated agents online (flotilla-sim, as fleet-sim.sh), an
# operator signed in with curl; then each of a set of node-list pages (first
# page, a deep page, a text search, a state filter, a label filter, a phase
# filter) is fetched REPS times, and the same fleet listed whole through the
# CLI (`flotilla nodes list --json`, the way to find nodes before the
# dashboard) as the baseline.
#
#   bench/dashboard.sh [N]        # default 10000
#
# Environment: REPS=20 (fetches per page). Times are curl's: from the TLS
# session being up to the last byte (the server's work plus the transfer on
# loopback), median and max over REPS fresh connections.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N="${1:-10000}"
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 50000 ] || die "usage: $0 [N (1..50000)]"
REPS="${REPS:-20}"
GROUP=fleet
command -v curl >/dev/null || die "curl is needed"

ensure_binaries
FD_LIMIT="$(raise_fd_limit)"
make_tmp dashboard
T="$BENCH_TMP"
shm_dir sim
S="$SHM_DIR"
log "temp dir $T; $N agents; open-files limit $FD_LIMIT"

init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 15s --web-listen 127.0.0.1:0
export FLOTILLA_SERVER="https://$SERVER_ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
wait_file "$T/server/web.addr" 10 || die "the dashboard did not listen"
WEB="https://$(tr -d '[:space:]' <"$T/server/web.addr")"

"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
cli trust set --key "$T/release.pub" >/dev/null
TOKEN="$(cli --json token create --group "$GROUP" --max-uses "$N" --ttl 2h --label site=berlin | jq -r .token)"
fleet_patch "$T/patch" "$GROUP" "$T/release.key"

SOURCES="$(((N + 24999) / 25000))"
SIM_ARGS=(run --server "$FLOTILLA_SERVER" --state-dir "$S" --agents "$N" --token "$TOKEN"
    --trusted-key "$T/release.pub" --start-rate 1000 --idle 900s --marks "$T/marks")
[ "$SOURCES" -gt 1 ] && SIM_ARGS+=(--source-addresses "$SOURCES")
"$BIN/flotilla-sim" "${SIM_ARGS[@]}" >"$T/sim.txt" 2>"$T/sim.log" &
SIM_PID=$!
track "$SIM_PID"
wait_mark "$T/marks" idle-start 1800 >/dev/null || { tail -5 "$T/sim.log" >&2; die "the simulated fleet did not connect"; }
cli patch publish "$W/bundle/manifest.json" --emergency >/dev/null
for i in $(seq 1 300); do
    done_n="$(cli --json patch status "$ID" | jq '[.nodes[] | select(.phase == "committed")] | length')"
    [ "$done_n" = "$N" ] && break
    sleep 1
done
[ "$done_n" = "$N" ] || die "only $done_n of $N committed the patch"
log "$N agents online, each with the patch committed; measuring"

# Sign in as a browser does: the form's token and cookie, then the session.
J="$T/cookies"
FORM="$(curl -sk -c "$J" "$WEB/signin")"
CSRF="$(grep -o 'name="csrf" value="[^"]*"' <<<"$FORM" | head -1 | sed 's/.*value="//;s/"$//')"
curl -sk -b "$J" -c "$J" -o /dev/null -H "Origin: $WEB" --data-urlencode "csrf=$CSRF" \
    --data-urlencode "credential@$FLOTILLA_CREDENTIAL" "$WEB/signin"
grep -q __Host-flotilla-session "$J" || die "could not sign in"

# time_page PATH: "median max" seconds of REPS fetches, and the match count.
time_page() {
    local i times=() count
    for i in $(seq 1 "$REPS"); do
        times+=("$(curl -sk -b "$J" -o "$T/page.html" -w '%{time_appconnect} %{time_total} %{http_code}' "$WEB$1")")
    done
    [ "$(awk '{print $3}' <<<"${times[-1]}")" = 200 ] || die "$1 answered $(awk '{print $3}' <<<"${times[-1]}")"
    count="$(grep -o '<p id="node-count"[^>]*>[^<]*' "$T/page.html" | sed 's/.*>//' || true)"
    printf '%s\n' "${times[@]}" | awk '{print $2 - $1}' | sort -g |
        awk -v p="$1" -v c="$count" '{ a[NR] = $1 } END { printf "%-48s median %6.1f ms  max %6.1f ms  (%s)\n", p, a[int((NR + 1) / 2)] * 1000, a[NR] * 1000, c }'
}

ID_PART="$(cli --json nodes list | jq -r '.[1234 % length].id' | cut -c6-9)"
{
    echo "dashboard pages, $N nodes online, $REPS fetches each"
    time_page "/nodes"
    time_page "/nodes?page=150"
    time_page "/nodes?q=$ID_PART"
    time_page "/nodes?state=online&page=40"
    time_page "/nodes?label=site%3Dberlin&state=active"
    time_page "/nodes?patch=$ID&phase=committed&page=10"
    time_page "/nodes?phase=failed"
    time_page "/"
    # Baseline: the whole list through the CLI (gRPC, then a client-side filter).
    for i in $(seq 1 5); do
        s="$(now_ns)"; cli --json nodes list >/dev/null; e="$(now_ns)"
        echo $(( (e - s) / 1000000 ))
    done | sort -n | awk '{ a[NR] = $1 } END { printf "%-48s median %6.1f ms  max %6.1f ms\n", "baseline: flotilla nodes list --json (all)", a[int((NR + 1) / 2)], a[NR] }'
    provenance
} | tee "$T/results.txt"
