#!/usr/bin/env bash
# One real `flotilla-agent run` process, idle: memory, CPU, wakeups, bytes on the wire.
#
#   bench/idle-agent.sh [SECONDS]      # measurement window, default 60
#
# Starts a server (release build, --heartbeat-interval 15s, the default) on a free
# port of 127.0.0.1 in a temporary directory, joins one agent with a token, runs it,
# waits until it is online and SETTLE seconds more (default 5), then measures the
# agent from /proc over the window:
#   - VmRSS, VmHWM, Pss (smaps_rollup), thread count, at the end of the window;
#   - CPU: utime+stime ticks (/proc/PID/stat, all threads) over the window, and
#     the on-CPU ns of the live threads (/proc/PID/task/*/schedstat);
#   - wakeups: voluntary + involuntary context switches summed over the agent's
#     threads (/proc/PID/task/*/status), per thread and in total;
#   - bytes on the wire: the server-side TCP socket of the agent's connection
#     (`ss -tin`: bytes_sent / bytes_received / segs_out / segs_in) before and after.
# Builds the release binaries first if they are missing (see bench/lib.sh).
# Everything it starts is stopped on exit; the temp dir is removed (KEEP_TMP=1 keeps it).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WINDOW="${1:-60}"
SETTLE="${SETTLE:-5}"
[[ "$WINDOW" =~ ^[0-9]+$ ]] && [ "$WINDOW" -ge 1 ] && [ "$WINDOW" -le 3600 ] \
    || die "usage: $0 [SECONDS (1..3600)]"

ensure_binaries
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
make_tmp idle
T="$BENCH_TMP"
log "temp dir $T"

init_server "$T/server"
start_server "$T/server" "$T/server.log" 127.0.0.1:0 15s
export FLOTILLA_SERVER="https://$SERVER_ADDR"
export FLOTILLA_CREDENTIAL="$T/server/admin.credential"
log "server pid $SERVER_PID on $SERVER_ADDR"

TOKEN="$(cli --json token create --group bench-idle --max-uses 1 --ttl 1h | jq -r .token)"
timeout 60 "$BIN/flotilla-agent" --state-dir "$T/agent" join --server "$FLOTILLA_SERVER" \
    --token "$TOKEN" --machine-id bench-idle-1 >/dev/null
mkdir -p "$T/root/opt"
"$BIN/flotilla-agent" --state-dir "$T/agent" run --root "$T/root" --allow-path /opt \
    >"$T/agent.log" 2>&1 &
AGENT_PID=$!
track "$AGENT_PID"
log "agent pid $AGENT_PID"

online=""
for i in $(seq 1 300); do            # at most 30 s
    online="$(group_online bench-idle)"
    [ "$online" = 1 ] && break
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$T/agent.log" >&2; die "the agent exited"; }
    sleep 0.1
done
[ "$online" = 1 ] || { tail -20 "$T/agent.log" >&2; die "the agent did not come online in 30 s"; }
log "agent online; settling ${SETTLE}s, then measuring for ${WINDOW}s"
sleep "$SETTLE"

# The agent's TCP connection(s), seen from the agent's side: "local_port".
agent_ports() {
    ss -tnpH state established 2>/dev/null | grep "pid=$AGENT_PID," \
        | awk '{ n = split($3, a, ":"); print a[n] }' | sort -u
}
SPORT="${SERVER_ADDR##*:}"
# sock_counters LPORT: "bytes_sent bytes_received segs_out segs_in" of the server's
# socket for the connection from agent port LPORT (server → agent = sent).
sock_counters() {
    ss -tinH state established "( sport = :$SPORT and dport = :$1 )" 2>/dev/null | tr ' ' '\n' | awk -F: '
        $1 == "bytes_sent" { bs = $2 } $1 == "bytes_received" { br = $2 }
        $1 == "segs_out" { so = $2 } $1 == "segs_in" { si = $2 }
        END { printf "%d %d %d %d\n", bs, br, so, si }'
}

PORTS0="$(agent_ports | tr '\n' ' ')"
NPORTS="$(echo "$PORTS0" | wc -w)"
[ "$NPORTS" -ge 1 ] || die "cannot find the agent's connection with ss -tnp"
LPORT="$(echo "$PORTS0" | awk '{print $1}')"
[ -n "$(ss -tinH state established "( sport = :$SPORT and dport = :$LPORT )" 2>/dev/null | grep -o 'bytes_received:[0-9]*')" ] \
    || die "ss -tin shows no byte counters for the server socket of port $LPORT"

# ---- window start ----
ctx0="$(proc_ctxsw "$AGENT_PID")"
net0="$(sock_counters "$LPORT")"
ticks0="$(proc_ticks "$AGENT_PID")"
rt0="$(proc_runtime_ns "$AGENT_PID")"
sticks0="$(proc_ticks "$SERVER_PID")"
t0="$(now_ns)"
mem0="$(proc_mem "$AGENT_PID")"

for i in $(seq 1 "$WINDOW"); do
    sleep 1
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$T/agent.log" >&2; die "the agent exited during the window"; }
done

# ---- window end ----
t1="$(now_ns)"
ticks1="$(proc_ticks "$AGENT_PID")"
rt1="$(proc_runtime_ns "$AGENT_PID")"
sticks1="$(proc_ticks "$SERVER_PID")"
net1="$(sock_counters "$LPORT")"
ctx1="$(proc_ctxsw "$AGENT_PID")"
mem1="$(proc_mem "$AGENT_PID")"
rss_split="$(awk '/^RssAnon:|^RssFile:|^RssShmem:/ { printf "%s %.1f MiB  ", $1, $2 / 1024 }' "/proc/$AGENT_PID/status")"
PORTS1="$(agent_ports | tr '\n' ' ')"
smem="$(proc_mem "$SERVER_PID")"

HZ="$(getconf CLK_TCK)"
secs="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')"
read -r rss hwm pss thr <<<"$mem1"
read -r rss0 _ pss0 thr0 <<<"$mem0"
read -r bs0 br0 so0 si0 <<<"$net0"
read -r bs1 br1 so1 si1 <<<"$net1"
dticks=$((ticks1 - ticks0))
dsticks=$((sticks1 - sticks0))
drt=$((rt1 - rt0))

# Per-thread wakeups over the window (threads present at both ends; a thread
# that exited in between is counted only in the total of the thread list it is in).
wake_table="$(LC_ALL=C join -j1 <(echo "$ctx0" | LC_ALL=C sort -k1,1) <(echo "$ctx1" | LC_ALL=C sort -k1,1) \
    | awk '{ d = ($7 + $8) - ($3 + $4); printf "%s %s %d %d %.3f\n", $1, $2, d, ($8 - $4), ($9 - $5) / 1e6 }')"
wakeups="$(echo "$wake_table" | awk '{ s += $3 } END { print s + 0 }')"
new_threads="$(LC_ALL=C join -v2 -j1 <(echo "$ctx0" | LC_ALL=C sort -k1,1) <(echo "$ctx1" | LC_ALL=C sort -k1,1) | wc -l)"
gone_threads="$(LC_ALL=C join -v1 -j1 <(echo "$ctx0" | LC_ALL=C sort -k1,1) <(echo "$ctx1" | LC_ALL=C sort -k1,1) | wc -l)"

up=$((br1 - br0)); down=$((bs1 - bs0)); segs=$(((so1 - so0) + (si1 - si0)))
# Each segment also costs Ethernet (14) + IPv4 (20) + TCP with timestamps (32) bytes.
wire=$((up + down + segs * 66))

echo
echo "flotilla-agent idle for ${secs}s (release build, server heartbeat interval 15s)"
echo "$(provenance)"
printf '%-34s %s\n' "measure" "value"
printf '%-34s %s\n' "----------------------------------" "------------------------------"
printf '%-34s %s (%s kB; %s at start)\n' "VmRSS (end of window)" "$(fmt_kib "$rss")" "$rss" "$(fmt_kib "$rss0")"
printf '%-34s %s\n' "VmHWM (peak RSS)" "$(fmt_kib "$hwm")"
printf '%-34s %s\n' "RSS split" "$rss_split"
printf '%-34s %s (%s kB; %s at start)\n' "Pss (smaps_rollup)" "$(fmt_kib "$pss")" "$pss" "$(fmt_kib "$pss0")"
printf '%-34s %s (%s at start; %s new, %s gone)\n' "threads" "$thr" "$thr0" "$new_threads" "$gone_threads"
printf '%-34s %s ticks of 1/%s s = %s%% of a core\n' "CPU utime+stime over window" "$dticks" "$HZ" \
    "$(awk -v t="$dticks" -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.4f", 100 * t / hz / s }')"
printf '%-34s %.3f ms = %s%% of a core\n' "CPU on-CPU time (schedstat)" \
    "$(awk -v n="$drt" 'BEGIN { print n / 1e6 }')" \
    "$(awk -v n="$drt" -v s="$secs" 'BEGIN { printf "%.5f", 100 * n / 1e9 / s }')"
printf '%-34s %s = %s/s\n' "wakeups (ctx switches, all thr.)" "$wakeups" \
    "$(awk -v w="$wakeups" -v s="$secs" 'BEGIN { printf "%.2f", w / s }')"
printf '%-34s %s\n' "connections (agent side)" "$PORTS0-> $PORTS1(local ports before -> after)"
printf '%-34s %s B up, %s B down = %s B/s\n' "TCP payload (server socket)" "$up" "$down" \
    "$(awk -v b="$((up + down))" -v s="$secs" 'BEGIN { printf "%.2f", b / s }')"
printf '%-34s %s segments; ~%s B/s incl. headers\n' "TCP segments (both ways)" "$segs" \
    "$(awk -v b="$wire" -v s="$secs" 'BEGIN { printf "%.2f", b / s }')"
printf '%-34s sent %s B, received %s B since connect\n' "server socket totals" "$bs1" "$br1"
printf '%-34s %s; CPU %s ticks = %s%% of a core\n' "server (1 agent): RSS" "$(fmt_kib "$(echo "$smem" | awk '{print $1}')")" "$dsticks" \
    "$(awk -v t="$dsticks" -v hz="$HZ" -v s="$secs" 'BEGIN { printf "%.4f", 100 * t / hz / s }')"
printf '%-34s %s at start, %s at end (other work on this machine)\n' "load average (1/5/15 min)" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "wakeups per agent thread over the window (tid name wakeups involuntary on-CPU-ms):"
echo "$wake_table" | sed 's/^/  /'
