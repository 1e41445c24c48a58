#!/usr/bin/env bash
# Delta patches and site caches: the delta Flotilla builds and rebuilds
# against the stock zstd tool on the same files, and the bytes leaving the
# server for sites of real agents without and with the delta, and without and
# with a serving agent per site.
#
#   bench/deltas.sh [MIB] [AGENTS]       # default 50 MiB, 20 agents
#   SITES=2 CACHE=1 bench/deltas.sh 50 40   # 2 sites of 20, each with a cache
#
# Part 1, the tools (no server):
# - BASE: MIB MiB of random bytes (incompressible: a delta is small only
#   because of its base) as `blob.bin` in a tar; NEW: the same with 1 % of the
#   bytes replaced (64 regions of random bytes spread over the file), tarred;
# - `flotilla patch build` of BASE, then of NEW with `--delta-from` BASE's
#   bundle (timed; the delta's size from deltas.json);
# - `zstd --patch-from=BASE NEW` (the stock tool, its default level 3), timed,
#   its size;
# - rebuilding NEW: `zstd -d --patch-from=BASE` of zstd's delta and
#   `flotilla-sim rebuild` (the agent's own routine, digest checked) of
#   Flotilla's, 3 runs each, median; peak RSS of one run of each (GNU time).
# Part 2, the fleet (real processes on 127.0.0.1):
# - a server (release build) with `--max-artifact-rate RATE` (env RATE,
#   default 50000000 bytes/s: the uplink) and AGENTS agents spread over SITES
#   sites (env, default 1; labels site=store1..), with CACHE=1 the first agent
#   of each site started with `--serve-site` (its site's cache);
# - publish BASE's bundle: time until all committed, the patch's
#   `served_bytes` (artifact bytes the server sent);
# - publish NEW's bundle (with its delta): the same; every agent holds BASE's
#   artifact (kept as the installed version), so each downloads the delta;
# - the bytes that left the server per site, and their ratio to what every
#   agent fetching the full artifact from the server would take.
# Everything it starts is stopped on exit; temp dirs are removed (KEEP_TMP=1 keeps them).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB="${1:-50}"
N="${2:-20}"
RATE="${RATE:-50000000}"
SITES="${SITES:-1}"
CACHE="${CACHE:-0}"
[[ "$SITES" =~ ^[0-9]+$ ]] && [ "$SITES" -ge 1 ] && [ "$SITES" -le "$N" ] || die "SITES must be 1..AGENTS"
[[ "$MIB" =~ ^[0-9]+$ ]] && [ "$MIB" -ge 1 ] && [ "$MIB" -le 120 ] || die "usage: $0 [MIB (1..120)] [AGENTS]"
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 200 ] || die "usage: $0 [MIB] [AGENTS (1..200)]"
command -v zstd >/dev/null || die "zstd is needed (apt-get install zstd)"
[ -x /usr/bin/time ] || die "GNU time is needed (apt-get install time)"

ensure_binaries
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
make_tmp deltas
T="$BENCH_TMP"
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ t[NR] = $1 } END { print t[int((NR + 1) / 2)] }'; }

# ---- the files ----
log "writing $MIB MiB of random bytes, and a copy with 1 % changed"
mkdir -p "$T/v1" "$T/v2"
head -c "$((MIB << 20))" /dev/urandom >"$T/v1/blob.bin"
cp "$T/v1/blob.bin" "$T/v2/blob.bin"
SIZE=$((MIB << 20))
REGION=$((SIZE / 100 / 64))
for k in $(seq 0 63); do
    off=$(( (SIZE / 64) * k + 4096 ))
    head -c "$REGION" /dev/urandom | dd of="$T/v2/blob.bin" bs=1 seek="$off" conv=notrunc status=none
done
tar --owner=0 --group=0 --numeric-owner -C "$T/v1" -cf "$T/base.tar" blob.bin
tar --owner=0 --group=0 --numeric-owner -C "$T/v2" -cf "$T/new.tar" blob.bin
FULL="$(stat -c %s "$T/new.tar")"

# ---- part 1: Flotilla against the stock zstd tool ----
"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
cp "$T/base.tar" "$T/app.tar"
files_spec "$T/app-1.toml" app-1.0.0 app 1.0.0 high 30d store app.tar
"$BIN/flotilla" patch build "$T/app-1.toml" --out-dir "$T/app-1" >/dev/null
cp "$T/new.tar" "$T/app.tar"
files_spec "$T/app-2.toml" app-1.0.1 app 1.0.1 high 30d store app.tar
a="$(now_ns)"
"$BIN/flotilla" patch build "$T/app-2.toml" --out-dir "$T/app-2" --delta-from "$T/app-1" >/dev/null 2>"$T/build.err"
b="$(now_ns)"
BUILD_S="$(secs "$a" "$b")"
OUR_DELTA="$T/app-2/$(jq -r '.deltas[0].name' "$T/app-2/deltas.json")"
OUR_SIZE="$(jq -r '.deltas[0].size' "$T/app-2/deltas.json")"
a="$(now_ns)"
zstd -q --patch-from="$T/base.tar" "$T/new.tar" -o "$T/zstd.delta"
b="$(now_ns)"
ZSTD_ENC_S="$(secs "$a" "$b")"
ZSTD_SIZE="$(stat -c %s "$T/zstd.delta")"
log "delta: flotilla $OUR_SIZE bytes (build ${BUILD_S}s incl. hashing and copying), zstd $ZSTD_SIZE bytes (${ZSTD_ENC_S}s)"

ZD=()
for i in 1 2 3; do
    a="$(now_ns)"
    zstd -q -d --patch-from="$T/base.tar" "$T/zstd.delta" -o "$T/zstd.out" -f
    b="$(now_ns)"
    ZD+=("$(secs "$a" "$b")")
done
cmp -s "$T/zstd.out" "$T/new.tar" || die "zstd rebuilt other bytes"
"$BIN/flotilla-sim" --json rebuild "$T/base.tar" "$OUR_DELTA" "$T/new.tar" --repeat 3 >"$T/rebuild.json"
OD=($(jq -r '.runs_secs[]' "$T/rebuild.json"))
ZSTD_DEC="$(median "${ZD[@]}")"
OUR_DEC="$(median "${OD[@]}")"
ZSTD_RSS="$(/usr/bin/time -f %M zstd -q -d --patch-from="$T/base.tar" "$T/zstd.delta" -o "$T/zstd.out" -f 2>&1 >/dev/null | tail -1)"
OUR_RSS="$(/usr/bin/time -f %M "$BIN/flotilla-sim" --json rebuild "$T/base.tar" "$OUR_DELTA" "$T/new.tar" --repeat 1 2>&1 >/dev/null | tail -1)"
log "rebuild: zstd ${ZD[*]} s (peak ${ZSTD_RSS} KiB); agent ${OD[*]} s (peak ${OUR_RSS} KiB)"

# ---- part 2: a site of real agents ----
ulimit -n 65536 2>/dev/null || true
init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 5s --max-artifact-rate "$RATE"
export FLOTILLA_SERVER="https://$SERVER_ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
cli group create store >/dev/null
cli trust set --key "$T/release.pub" >/dev/null
TOKENS=()
for s in $(seq 1 "$SITES"); do
    TOKENS+=("$(cli --json token create --group store --max-uses "$N" --ttl 1h --label "site=store$s" | jq -r .token)")
done
for i in $(seq 1 "$N"); do
    site=$(( (i - 1) % SITES ))
    timeout 60 "$BIN/flotilla-agent" --state-dir "$T/agents/a$i" join --server "$FLOTILLA_SERVER" \
        --token "${TOKENS[$site]}" --trusted-key "$T/release.pub" --machine-id "delta-bench-$i" \
        >/dev/null 2>"$T/join-$i.err" || { cat "$T/join-$i.err" >&2; die "join of agent $i failed"; }
    mkdir -p "$T/roots/root$i/opt"
    serve=()
    if [ "$CACHE" = 1 ] && [ "$i" -le "$SITES" ]; then
        serve=(--serve-site --site-listen 127.0.0.1:0)
    fi
    "$BIN/flotilla-agent" --state-dir "$T/agents/a$i" run --root "$T/roots/root$i" \
        --allow-path /opt --max-backoff 2s "${serve[@]}" >"$T/agent-$i.log" 2>&1 &
    track "$!"
done
deadline=$(( $(now_ms) + 120000 ))
until [ "$(group_online store)" = "$N" ]; do
    [ "$(now_ms)" -lt "$deadline" ] || die "not all $N agents came online"
    sleep 0.2
done
if [ "$CACHE" = 1 ]; then
    until [ "$(cli --json sites | jq '[.[] | select(.serving_node != "")] | length')" = "$SITES" ]; do
        [ "$(now_ms)" -lt "$deadline" ] || die "not every site has its serving agent"
        sleep 0.2
    done
fi

# roll ID BUNDLE: publishes, waits until N committed; sets ROLL_S and SERVED.
roll() {
    "$BIN/flotilla" patch sign "$2/manifest.json" --key "$T/release.key" >/dev/null
    local a b st deadline=$(( $(now_ms) + 900000 ))
    a="$(now_ns)"
    cli patch publish "$2/manifest.json" >/dev/null
    while :; do
        st="$(cli --json patch status "$1")"
        [ "$(jq -r '.counts.committed // 0' <<<"$st")" = "$N" ] && break
        [ "$(jq -r '[.counts.failed // 0, .counts.rolled_back // 0, .counts.rejected // 0] | add' <<<"$st")" = 0 ] \
            || die "$1: a node failed: $(jq -c '.nodes[] | select(.error != "")' <<<"$st" | head -3)"
        [ "$(now_ms)" -lt "$deadline" ] || die "$1: not all committed in 15 min"
        sleep 0.2
    done
    b="$(now_ns)"
    ROLL_S="$(secs "$a" "$b")"
    SERVED="$(jq -r .served_bytes <<<"$st")"
    DELTA_NODES="$(jq -r '[.nodes[] | select(.transfer.delta_bytes > 0)] | length' <<<"$st")"
    PEER_NODES="$(jq -r '[.nodes[] | select(.transfer.peer_bytes > 0)] | length' <<<"$st")"
}
roll app-1.0.0 "$T/app-1"
FULL_S="$ROLL_S"; FULL_SERVED="$SERVED"
log "full: $N committed in ${FULL_S}s; server sent $FULL_SERVED bytes; $PEER_NODES node(s) fetched from a site peer"
roll app-1.0.1 "$T/app-2"
DELTA_S="$ROLL_S"; DELTA_SERVED="$SERVED"
log "delta: $N committed in ${DELTA_S}s; server sent $DELTA_SERVED bytes; $DELTA_NODES node(s) used the delta, $PEER_NODES fetched from a site peer"

cat <<EOF
## Deltas: $MIB MiB artifact, 1 % changed; $N agents at $SITES site(s), site cache $([ "$CACHE" = 1 ] && echo on || echo off)
machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); load at start $LOAD_START; $(provenance)
artifact (tar): $FULL bytes
delta size: flotilla $OUR_SIZE bytes, zstd --patch-from $ZSTD_SIZE bytes (ratio $(awk -v a="$OUR_SIZE" -v b="$ZSTD_SIZE" 'BEGIN { printf "%.3f", a / b }'))
delta build: flotilla patch build --delta-from ${BUILD_S}s (hashing, copying and the delta), zstd ${ZSTD_ENC_S}s
rebuild (median of 3): agent ${OUR_DEC}s, zstd -d ${ZSTD_DEC}s (ratio $(awk -v a="$OUR_DEC" -v b="$ZSTD_DEC" 'BEGIN { printf "%.2f", a / b }')); peak RSS agent ${OUR_RSS} KiB, zstd ${ZSTD_RSS} KiB
server capped at $RATE bytes/s: full artifact to $N agents ${FULL_S}s, $FULL_SERVED bytes from the server; delta ${DELTA_S}s, $DELTA_SERVED bytes ($DELTA_NODES of $N used the delta, $PEER_NODES fetched from a site peer)
bytes leaving the server per site: full $((FULL_SERVED / SITES)), delta $((DELTA_SERVED / SITES)) (one delta: $OUR_SIZE bytes; $(awk -v a="$DELTA_SERVED" -v s="$SITES" -v d="$OUR_SIZE" 'BEGIN { printf "%.2f", a / s / d }') x)
reduction per site against every agent fetching the full artifact ($((N / SITES)) x $FULL bytes): full $(awk -v n="$N" -v f="$FULL" -v a="$FULL_SERVED" 'BEGIN { printf "%.1f", n * f / a }')x, delta $(awk -v n="$N" -v f="$FULL" -v a="$DELTA_SERVED" 'BEGIN { printf "%.0f", n * f / a }')x
EOF
