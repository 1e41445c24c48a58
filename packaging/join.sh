#!/bin/sh
# join.sh: join this host to a Flotilla fleet, then start its agent.
#
#   FLOTILLA_TOKEN=flt1.... join.sh --server https://fleet.example.net:7443 \
#       --label site=store-0421
#
# Runs `flotilla-agent join` unless the host has already joined (status.json
# in the agent's state directory), then enables and starts the systemd unit.
# Safe to run again: a joined host is only (re)started.
#
# The token is never printed and never put on a command line: it reaches
# flotilla-agent through its environment (FLOTILLA_AGENT_TOKEN). Prefer
# FLOTILLA_TOKEN or --token-file to --token: arguments are visible in ps.
#
# Exit status: 0 done, 1 failed, 2 bad usage.

set -eu

AGENT_BIN=${FLOTILLA_AGENT_BIN:-/usr/bin/flotilla-agent}
AGENT_CONFIG=${FLOTILLA_AGENT_CONFIG:-/etc/flotilla/agent.toml}
UNIT=${FLOTILLA_AGENT_UNIT:-flotilla-agent.service}
# Present when systemd runs as PID 1 (what sd_booted(3) checks).
SYSTEMD_DIR=${FLOTILLA_SYSTEMD_RUNTIME_DIR:-/run/systemd/system}

usage() {
    cat <<'EOF'
Usage: join.sh [options]

Joins this host to a Flotilla fleet and starts flotilla-agent.

Options:
  -s, --server URL      Server URL, https://HOST:PORT. Repeat (or separate with
                        commas) for failover. Env: FLOTILLA_SERVER.
  -t, --token TOKEN     Join token. Env: FLOTILLA_TOKEN (preferred: arguments
                        show in ps).
      --token-file FILE Read the join token from FILE.
  -l, --label KEY=VALUE Label to ask for; repeatable.
  -k, --trusted-key FILE
                        minisign public key to pin for patch signatures;
                        repeatable. Without one the host applies no patch.
      --trust-threshold N
                        How many pinned keys must sign each patch (default 1).
      --machine-id ID   State this machine id instead of /etc/machine-id. Use it
                        on hosts cloned from one image that kept the image's
                        machine id (a copy of an online host is refused).
      --no-start        Join only; do not enable or start the systemd unit (for
                        hosts without systemd: start `flotilla-agent run` with
                        their own service manager).
  -h, --help            Show this help.

Environment:
  FLOTILLA_SERVER        Server URL(s), comma-separated.
  FLOTILLA_TOKEN         Join token.
  FLOTILLA_AGENT_BIN     Agent binary (default /usr/bin/flotilla-agent).
  FLOTILLA_AGENT_CONFIG  Agent config (default /etc/flotilla/agent.toml; used
                         if it exists).
  FLOTILLA_AGENT_UNIT    systemd unit (default flotilla-agent.service).
  FLOTILLA_AGENT_STATE_DIR
                         The agent's state directory (default
                         /var/lib/flotilla-agent); when set, root is not needed
                         for --no-start.
  FLOTILLA_SYSTEMD_RUNTIME_DIR
                         Where to look for a running systemd (default
                         /run/systemd/system).
EOF
}

die() {
    printf 'join.sh: error: %s\n' "$*" >&2
    exit 1
}

usage_error() {
    printf 'join.sh: %s\n' "$*" >&2
    printf 'Try: join.sh --help\n' >&2
    exit 2
}

say() {
    printf 'join.sh: %s\n' "$*"
}

# Newline-separated lists: label values may hold spaces but never newlines
# (control characters are refused by the server).
nl='
'
servers=''
labels=''
keys=''
threshold=''
machine_id=''
token=${FLOTILLA_TOKEN:-}
start=yes

need_value() {
    # $1: option name, $2: number of arguments left.
    [ "$2" -ge 2 ] || usage_error "option $1 needs a value"
}

while [ $# -gt 0 ]; do
    case $1 in
        -s | --server)
            need_value "$1" $#
            servers="${servers}${2}${nl}"
            shift 2
            ;;
        --server=*)
            servers="${servers}${1#--server=}${nl}"
            shift
            ;;
        -t | --token)
            need_value "$1" $#
            token=$2
            shift 2
            ;;
        --token=*)
            token=${1#--token=}
            shift
            ;;
        --token-file)
            need_value "$1" $#
            [ -r "$2" ] || die "cannot read token file $2"
            token=$(cat -- "$2")
            shift 2
            ;;
        --token-file=*)
            file=${1#--token-file=}
            [ -r "$file" ] || die "cannot read token file $file"
            token=$(cat -- "$file")
            shift
            ;;
        -l | --label)
            need_value "$1" $#
            labels="${labels}${2}${nl}"
            shift 2
            ;;
        --label=*)
            labels="${labels}${1#--label=}${nl}"
            shift
            ;;
        -k | --trusted-key)
            need_value "$1" $#
            [ -r "$2" ] || die "cannot read trusted key $2"
            keys="${keys}${2}${nl}"
            shift 2
            ;;
        --trusted-key=*)
            file=${1#--trusted-key=}
            [ -r "$file" ] || die "cannot read trusted key $file"
            keys="${keys}${file}${nl}"
            shift
            ;;
        --trust-threshold)
            need_value "$1" $#
            threshold=$2
            shift 2
            ;;
        --trust-threshold=*)
            threshold=${1#--trust-threshold=}
            shift
            ;;
        --machine-id)
            need_value "$1" $#
            machine_id=$2
            shift 2
            ;;
        --machine-id=*)
            machine_id=${1#--machine-id=}
            shift
            ;;
        --no-start)
            start=no
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage_error "unknown argument: $1"
            ;;
    esac
done

if [ -z "$servers" ] && [ -n "${FLOTILLA_SERVER:-}" ]; then
    servers="${FLOTILLA_SERVER}${nl}"
fi

# --- Checks that need no network. ----------------------------------------

if [ "$(id -u)" -ne 0 ] && { [ "$start" = yes ] || [ -z "${FLOTILLA_AGENT_STATE_DIR:-}" ]; }; then
    die "run as root: the agent's state lives in /var/lib and the unit is started with systemctl"
fi
[ -x "$AGENT_BIN" ] || die "$AGENT_BIN not found or not executable (build it with \`cargo build --release -p flotilla-agent\` and install target/release/flotilla-agent there, or set FLOTILLA_AGENT_BIN)"
if [ "$start" = yes ]; then
    # Checked before joining: a host that cannot start the agent should not
    # take a node (and a token use) it will not run.
    [ -d "$SYSTEMD_DIR" ] || die "systemd is not running on this host ($SYSTEMD_DIR is missing): run join.sh --no-start, then start \`flotilla-agent run\` with this host's service manager"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: run join.sh --no-start, then start \`flotilla-agent run\` yourself"
fi

# flotilla-agent, with the config file if there is one.
agent() {
    if [ -f "$AGENT_CONFIG" ]; then
        "$AGENT_BIN" --config "$AGENT_CONFIG" "$@"
    else
        "$AGENT_BIN" "$@"
    fi
}

# Already joined? `flotilla-agent status` reads status.json from the state
# directory the agent itself resolves (flag > env > config > default).
if agent status >/dev/null 2>&1; then
    say "this host has already joined; not joining again"
    agent status || true
else
    [ -n "$token" ] || die "no join token: set FLOTILLA_TOKEN, or pass --token-file FILE or --token TOKEN"
    # Drop whitespace (a token file usually ends with a newline).
    token=$(printf '%s' "$token" | tr -d ' \t\r\n')
    case $token in
        flt1.*.*.*) ;;
        *) die "the join token does not look like flt1.<id>.<secret>.<ca-fingerprint>[.<trust-hash>] (check FLOTILLA_TOKEN or the token file)" ;;
    esac

    set -- join
    set -f # no globbing while splitting the lists below
    old_ifs=$IFS
    IFS=$nl
    for url in $servers; do
        # An entry may itself be a comma-separated list: the agent splits it.
        case $url in
            https://*) ;;
            *) IFS=$old_ifs; die "server URL must start with https://: $url" ;;
        esac
        set -- "$@" --server "$url"
    done
    for label in $labels; do
        case $label in
            ?*=*) ;;
            *) IFS=$old_ifs; die "label must look like key=value: $label" ;;
        esac
        set -- "$@" --label "$label"
    done
    for key in $keys; do
        set -- "$@" --trusted-key "$key"
    done
    IFS=$old_ifs
    set +f
    if [ -n "$threshold" ]; then
        [ -n "$keys" ] || die "--trust-threshold needs at least one --trusted-key"
        set -- "$@" --trust-threshold "$threshold"
    fi
    if [ -n "$machine_id" ]; then
        set -- "$@" --machine-id "$machine_id"
    fi
    case $token in
        # A fifth part pins the fleet's trust policy: the keys come from the server.
        flt1.*.*.*.*) ;;
        *) [ -n "$keys" ] || say "warning: no --trusted-key given and the token pins no trust policy: this host will refuse every patch" ;;
    esac

    # No --server at all is fine when the config file names servers; the agent
    # says so clearly when neither does.
    say "joining the fleet"
    # The token goes through the environment, in a subshell, never in argv.
    if ! (
        FLOTILLA_AGENT_TOKEN=$token
        export FLOTILLA_AGENT_TOKEN
        agent "$@"
    ); then
        die "flotilla-agent join failed (see its message above); nothing was started"
    fi
    token=''
fi

if [ "$start" = no ]; then
    say "joined; not starting $UNIT (--no-start)"
    exit 0
fi

say "enabling and starting $UNIT"
systemctl enable --now "$UNIT" >/dev/null ||
    die "could not enable and start $UNIT (check: systemctl status $UNIT)"
# The unit skips start when the host has not joined; a host that was running
# already keeps its session.
if ! systemctl is-active --quiet "$UNIT"; then
    die "$UNIT is not running (check: systemctl status $UNIT; journalctl -u $UNIT)"
fi
say "done: $UNIT is running"
