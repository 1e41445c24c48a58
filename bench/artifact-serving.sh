#!/usr/bin/env bash
# Artifact serving: CLIENTS agents download one artifact from the server at once,
# against a raw loopback TCP copy of the same bytes to as many clients.
#
#   bench/artifact-serving.sh [MIB] [CLIENTS]     # default 50 MiB, 100 clients
#
# - a server (release build) on 127.0.0.1; MIB MiB of random bytes published as
#   the artifact of a patch no node is targeted by; a token for CLIENTS joins;
# - 3 rounds, each: `flotilla-sim fetch --agents CLIENTS` (enrolled agents, each
#   downloading through the agent's fetcher: its own mutual-TLS connection, gRPC
#   stream, SHA-256 while it arrives, written to tmpfs and fsynced, removed when
#   complete), then `flotilla-sim raw-serve` + `raw-fetch --clients CLIENTS` (plain
#   TCP from a tokio task reading the same file in 64 KiB blocks, each client
#   writing to tmpfs and fsyncing, no TLS, no hashing);
# - throughput = all bytes / wall time from the first request to the last byte.
# The ratio to the goal (≥ 0.5× raw loopback) uses the medians.
# Everything it starts is stopped on exit; temp dirs are removed (KEEP_TMP=1 keeps them).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB="${1:-50}"
CLIENTS="${2:-100}"
[[ "$MIB" =~ ^[0-9]+$ ]] && [ "$MIB" -ge 1 ] && [ "$MIB" -le 1024 ] || die "usage: $0 [MIB] [CLIENTS]"
[[ "$CLIENTS" =~ ^[0-9]+$ ]] && [ "$CLIENTS" -ge 1 ] && [ "$CLIENTS" -le 1000 ] || die "usage: $0 [MIB] [CLIENTS (1..1000)]"
ROUNDS=3

ensure_binaries
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
FD_LIMIT="$(raise_fd_limit)"
make_tmp serve
T="$BENCH_TMP"
shm_dir serve
S="$SHM_DIR"
F="$T/artifact.bin"
head -c "$((MIB << 20))" /dev/urandom >"$F"
BYTES="$(stat -c %s "$F")"
SHA="$(sha256sum "$F" | cut -d' ' -f1)"

init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 15s
export FLOTILLA_SERVER="https://$SERVER_ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
log "server pid $SERVER_PID on $SERVER_ADDR; $CLIENTS clients × $MIB MiB"
"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
cli trust set --key "$T/release.pub" >/dev/null
mkdir -p "$T/spec"
ln -s "$F" "$T/spec/artifact.bin"
files_spec "$T/spec/spec.toml" "serve-$(date +%s)" bench-serve 1.0.0 low 1h bench-nobody artifact.bin
"$BIN/flotilla" patch build "$T/spec/spec.toml" --out-dir "$T/bundle" >/dev/null
"$BIN/flotilla" patch sign "$T/bundle/manifest.json" --key "$T/release.key" >/dev/null
CLI_TIMEOUT=600 cli patch publish "$T/bundle/manifest.json" >/dev/null 2>&1 || die "publish failed"
TOKEN="$(cli --json token create --group bench-serve --max-uses "$CLIENTS" --ttl 1h | jq -r .token)"
# Both sides read the file from the page cache.
cat "$F" >/dev/null

AG=(); RAW=()
for k in $(seq 1 "$ROUNDS"); do
    "$BIN/flotilla-sim" --json fetch --server "$FLOTILLA_SERVER" --state-dir "$S/agents" \
        --agents "$CLIENTS" --token "$TOKEN" --sha256 "$SHA" --size "$BYTES" --out-dir "$S/out" \
        --server-pid "$SERVER_PID" >"$T/fetch-$k.json" 2>>"$T/fetch.log" \
        || { tail -5 "$T/fetch.log" >&2; die "fetch failed"; }
    [ "$(jq -r .ok "$T/fetch-$k.json")" = "$CLIENTS" ] || die "round $k: $(jq -r '.errors[0]' "$T/fetch-$k.json")"
    AG+=("$(jq -r .mib_per_s "$T/fetch-$k.json")")
    log "round $k: agents $(jq -r '"\(.mib_per_s | floor) MiB/s in \(.wall_secs) s"' "$T/fetch-$k.json")"

    rm -f "$T/raw.addr"
    "$BIN/flotilla-sim" --json raw-serve --file "$F" --addr-file "$T/raw.addr" \
        --max-connections "$CLIENTS" --timeout 10m >"$T/raw-serve-$k.json" 2>>"$T/raw-serve.log" &
    RAW_PID=$!
    track "$RAW_PID"
    wait_file "$T/raw.addr" 10 || die "raw-serve did not listen"
    "$BIN/flotilla-sim" --json raw-fetch --addr "$(cat "$T/raw.addr")" --clients "$CLIENTS" \
        --out-dir "$S/raw" >"$T/raw-$k.json" 2>>"$T/raw-fetch.log" \
        || die "raw-fetch failed"
    wait "$RAW_PID" || die "raw-serve failed: $(tail -1 "$T/raw-serve.log")"
    # The copy server's CPU is all serving (it started just before).
    jq --argjson s "$(jq .process.cpu_ms "$T/raw-serve-$k.json")" '.server_cpu_ms = $s' \
        "$T/raw-$k.json" >"$T/raw-$k.tmp" && mv "$T/raw-$k.tmp" "$T/raw-$k.json"
    [ "$(jq -r .ok "$T/raw-$k.json")" = "$CLIENTS" ] || die "raw round $k: $(jq -r '.errors[0]' "$T/raw-$k.json")"
    RAW+=("$(jq -r .mib_per_s "$T/raw-$k.json")")
    log "round $k: raw $(jq -r '"\(.mib_per_s | floor) MiB/s in \(.wall_secs) s"' "$T/raw-$k.json")"
done
AG_MED="$(median3 "${AG[@]}")"
RAW_MED="$(median3 "${RAW[@]}")"

line() {   # line FILE: one round's numbers
    jq -r '"\(.mib_per_s | floor) MiB/s, \(.wall_secs * 100 | floor / 100) s, per download p50 \(.per_download.p50_ms) ms max \(.per_download.max_ms) ms, CPU server \(.server_cpu_ms) ms client \(.client_cpu_ms) ms"' "$1"
}
echo
echo "artifact-serving: $CLIENTS concurrent downloads of $MIB MiB ($BYTES bytes each), loopback"
echo "machine: $(nproc) cores, $(uname -r); open-files limit $FD_LIMIT"
echo "$(provenance)"
for k in $(seq 1 "$ROUNDS"); do
    printf '%-34s %s\n' "round $k, server → agent fetcher" "$(line "$T/fetch-$k.json")"
    printf '%-34s %s\n' "round $k, raw loopback TCP" "$(line "$T/raw-$k.json")"
done
printf '%-34s %.0f MiB/s vs %.0f MiB/s = %s\n' "median, agents vs raw" "$AG_MED" "$RAW_MED" \
    "$(awk -v a="$AG_MED" -v r="$RAW_MED" 'BEGIN { printf "%.2f× (goal ≥ 0.5×)", a / r }')"
printf '%-34s %s at start, %s at end\n' "load average (1/5/15 min)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
