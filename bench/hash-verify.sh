#!/usr/bin/env bash
# Hashing a large artifact: the agent's SHA-256 against `sha256sum` on the same
# file, and the agent's whole download path for it.
#
#   bench/hash-verify.sh [MIB]           # default 1024 (1 GiB)
#
# - writes MIB MiB of random bytes to a file in a temp dir and reads it once, so
#   every run below hashes from the page cache (CPU, not disk);
# - `sha256sum FILE`, 3 runs;
# - `flotilla-sim hash FILE --repeat 3`: the agent's digest routine
#   (`flotilla_agent::patch::fetch::file_sha256`, the one that checks a complete
#   or resumed download: 1 MiB reads into sha2's Sha256);
# - `flotilla patch build` of a spec with the file as its artifact (hashes it and
#   copies it into the bundle), once;
# - the agent's download path end to end: a server, the file published as the
#   artifact of a patch no node is targeted by, and `flotilla-sim fetch --agents 1`:
#   one enrolled agent downloads it through the agent's fetcher (mutual TLS, gRPC
#   stream, hashed while it arrives, written to tmpfs and fsynced), once.
# The ratio to the goal (≥ 0.8× sha256sum) uses the medians.
# Everything it starts is stopped on exit; temp dirs are removed (KEEP_TMP=1 keeps them).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB="${1:-1024}"
[[ "$MIB" =~ ^[0-9]+$ ]] && [ "$MIB" -ge 1 ] && [ "$MIB" -le 1024 ] || die "usage: $0 [MIB (1..1024)]"
command -v sha256sum >/dev/null || die "sha256sum is needed"

ensure_binaries
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
make_tmp hash
T="$BENCH_TMP"
shm_dir hash
S="$SHM_DIR"
F="$T/artifact.bin"
log "writing $MIB MiB of random bytes to $F"
head -c "$((MIB << 20))" /dev/urandom >"$F"
BYTES="$(stat -c %s "$F")"
cat "$F" >/dev/null

# rate_of SECONDS...: "best median" MiB/s over runs of $BYTES bytes.
rate_of() {
    printf '%s\n' "$@" | sort -g | awk -v b="$BYTES" '{ t[NR] = $1 } END {
        printf "%.0f %.0f\n", b / 1048576 / t[1], b / 1048576 / t[int((NR + 1) / 2)] }'
}

SUMS=()
for i in 1 2 3; do
    a="$(now_ns)"
    WANT="$(sha256sum "$F" | cut -d' ' -f1)"
    b="$(now_ns)"
    SUMS+=("$(awk -v d="$((b - a))" 'BEGIN { printf "%.3f", d / 1e9 }')")
done
read -r SUM_BEST SUM_MED <<<"$(rate_of "${SUMS[@]}")"
log "sha256sum: ${SUMS[*]} s"

"$BIN/flotilla-sim" --json hash "$F" --sha256 "$WANT" --repeat 3 >"$T/hash.json"
[ "$(jq -r .matches "$T/hash.json")" = true ] || die "the agent's digest differs from sha256sum's"
AGENT_RUNS="$(jq -r '.runs_secs | map(tostring) | join(" ")' "$T/hash.json")"
# shellcheck disable=SC2086
read -r AG_BEST AG_MED <<<"$(rate_of $AGENT_RUNS)"
log "agent digest routine: $AGENT_RUNS s"

# `flotilla patch build`: hashes the artifact and copies it next to the manifest.
mkdir -p "$T/spec"
ln -s "$F" "$T/spec/artifact.bin"
files_spec "$T/spec/spec.toml" "hash-$(date +%s)" bench-hash 1.0.0 low 1h bench-nobody artifact.bin
a="$(now_ns)"
"$BIN/flotilla" patch build "$T/spec/spec.toml" --out-dir "$T/bundle" >/dev/null
b="$(now_ns)"
BUILD_S="$(awk -v d="$((b - a))" 'BEGIN { printf "%.3f", d / 1e9 }')"
log "patch build: $BUILD_S s"

# The agent's download path: publish the artifact, one agent fetches it.
init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 15s
export FLOTILLA_SERVER="https://$SERVER_ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
"$BIN/flotilla" key generate --unencrypted --out "$T/release" >/dev/null
cli trust set --key "$T/release.pub" >/dev/null
"$BIN/flotilla" patch sign "$T/bundle/manifest.json" --key "$T/release.key" >/dev/null
a="$(now_ns)"
CLI_TIMEOUT=600 cli patch publish "$T/bundle/manifest.json" >/dev/null 2>&1 || die "publish failed"
b="$(now_ns)"
UPLOAD_S="$(awk -v d="$((b - a))" 'BEGIN { printf "%.3f", d / 1e9 }')"
log "uploaded and published in $UPLOAD_S s"
TOKEN="$(cli --json token create --group bench-hash --max-uses 1 --ttl 1h | jq -r .token)"
"$BIN/flotilla-sim" --json fetch --server "$FLOTILLA_SERVER" --state-dir "$S/agents" --agents 1 \
    --token "$TOKEN" --sha256 "$WANT" --size "$BYTES" --out-dir "$S/out" \
    --server-pid "$SERVER_PID" >"$T/fetch.json" 2>"$T/fetch.log" || { tail -5 "$T/fetch.log" >&2; die "fetch failed"; }
[ "$(jq -r .ok "$T/fetch.json")" = 1 ] || die "the download failed: $(jq -r '.errors[0]' "$T/fetch.json")"

echo
echo "hash-verify: $MIB MiB ($BYTES bytes) from the page cache"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo "CPU SHA extensions (sha_ni in /proc/cpuinfo): $(grep -q sha_ni /proc/cpuinfo && echo yes || echo no); sha2 detected them: $(jq -r .cpu_sha_ni "$T/hash.json")"
echo "sha2 crate: $(awk '/^name = "sha2"$/ { getline; print $3 }' "$BENCH_REPO/Cargo.lock" | tr -d '"' | paste -sd' ')"
echo "$(provenance)"
printf '%-44s %s\n' "sha256sum ($(sha256sum --version | head -1))" "runs ${SUMS[*]} s: best $SUM_BEST, median $SUM_MED MiB/s"
printf '%-44s %s\n' "agent digest routine (flotilla-sim hash)" "runs $AGENT_RUNS s: best $AG_BEST, median $AG_MED MiB/s"
printf '%-44s %s\n' "  ratio to sha256sum, medians" "$(awk -v a="$AG_MED" -v s="$SUM_MED" 'BEGIN { printf "%.2f× (goal ≥ 0.8×)", a / s }')"
printf '%-44s %s s = %s MiB/s (hash + copy into the bundle)\n' "flotilla patch build" "$BUILD_S" \
    "$(awk -v t="$BUILD_S" -v b="$BYTES" 'BEGIN { printf "%.0f", b / 1048576 / t }')"
printf '%-44s %s s = %s MiB/s (the CLI: upload over TLS, server hashes and fsyncs)\n' "flotilla patch publish" "$UPLOAD_S" \
    "$(awk -v t="$UPLOAD_S" -v b="$BYTES" 'BEGIN { printf "%.0f", b / 1048576 / t }')"
printf '%-44s %s\n' "agent download path (flotilla-sim fetch)" \
    "$(jq -r '"\(.wall_secs * 1000 | floor) ms = \(.mib_per_s | floor) MiB/s; CPU server \(.server_cpu_ms) ms, agent \(.client_cpu_ms) ms"' "$T/fetch.json")"
printf '%-44s %s at start, %s at end\n' "load average (1/5/15 min)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
