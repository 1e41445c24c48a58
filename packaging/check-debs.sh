#!/bin/sh
# check-debs.sh: checks the packages build-debs.sh made, and fails loudly on
# any missing piece.
#
#   packaging/check-debs.sh [DIR]      (default: target/debian)
#
# For each .deb: its contents (dpkg-deb -c: binaries, units, sysusers file,
# configs, man pages, completions), its control fields and conffiles. Then the
# three are unpacked into a throwaway root (dpkg -x), where:
#   - `systemd-analyze verify --root=ROOT` checks both units; it needs the
#     ExecStart binaries inside ROOT (they are, unpacked) and the targets the
#     units name (copied into ROOT from this host's systemd);
#   - the maintainer scripts run with DPKG_ROOT=ROOT (they take every path
#     under it), first as on a system without a booted systemd, then with
#     ROOT/run/systemd/system present and a systemctl on PATH that records
#     what it is asked: install, reinstall, upgrade before and after
#     `flotilla-server init`, remove, purge. Nothing outside ROOT is touched.
# Last, the cloud-init example: its YAML parses (python3 with PyYAML) and its
# embedded shell script passes `sh -n`.
#
# Needs: dpkg-deb, systemd-analyze, systemd-sysusers, deb-systemd-helper,
# python3 with yaml (PYTHON, default /usr/bin/python3); run as root (the data
# directory is chowned to the package's user inside ROOT).

set -eu

cd "$(dirname "$0")/.."
dir=${1:-${CARGO_TARGET_DIR:-target}/debian}
python=${PYTHON:-/usr/bin/python3}

fail() {
    printf 'check-debs.sh: FAIL: %s\n' "$*" >&2
    exit 1
}
ok() {
    printf 'check-debs.sh: ok: %s\n' "$*"
}

for tool in dpkg-deb systemd-analyze systemd-sysusers deb-systemd-helper; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed"
done
"$python" -c 'import yaml' 2>/dev/null || fail "$python cannot import yaml (Debian: python3-yaml)"
[ "$(id -u)" -eq 0 ] || fail "run as root (files inside the throwaway root are chowned)"

# The one .deb of package $1 in $dir.
deb_of() {
    set -- "$dir/$1"_*.deb
    if [ $# -ne 1 ] || [ ! -f "$1" ]; then
        fail "expected exactly one $(basename "$1") in $dir"
    fi
    printf '%s\n' "$1"
}
cli=$(deb_of flotilla)
server=$(deb_of flotilla-server)
agent=$(deb_of flotilla-agent)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- Contents ---------------------------------------------------------------

# has DEB PATH [MODE]: the package holds PATH (a file), with MODE if given.
has() {
    line=$(dpkg-deb -c "$1" | awk -v p="./$2" '$6 == p { print $1 }')
    [ -n "$line" ] || fail "$(basename "$1") lacks /$2"
    if [ $# -ge 3 ] && [ "$line" != "$3" ]; then
        fail "$(basename "$1"): /$2 is $line, not $3"
    fi
}
lacks() {
    if dpkg-deb -c "$1" | awk '{ print $6 }' | grep -qx "./$2"; then
        fail "$(basename "$1") must not ship /$2"
    fi
}
field() {
    dpkg-deb -f "$1" "$2"
}
conffiles() {
    rm -rf "$work/control"
    dpkg-deb -e "$1" "$work/control"
    cat "$work/control/conffiles" 2>/dev/null || true
}

for deb in "$cli" "$server" "$agent"; do
    echo "--- $(basename "$deb")"
    dpkg-deb -c "$deb"
done

exe=-rwxr-xr-x
plain=-rw-r--r--
has "$cli" usr/bin/flotilla $exe
has "$cli" usr/share/man/man1/flotilla.1.gz $plain
has "$cli" usr/share/man/man1/flotilla-patch-build.1.gz $plain
pages=$(dpkg-deb -c "$cli" | grep -c '\./usr/share/man/man1/flotilla.*\.1\.gz$')
[ "$pages" -ge 20 ] || fail "flotilla has only $pages man pages"
has "$cli" usr/share/bash-completion/completions/flotilla $plain
has "$cli" usr/share/zsh/vendor-completions/_flotilla $plain
has "$cli" usr/share/fish/vendor_completions.d/flotilla.fish $plain
[ -z "$(conffiles "$cli")" ] || fail "flotilla has conffiles"
ok "flotilla: CLI, $pages man pages, bash/zsh/fish completions"

has "$server" usr/bin/flotilla-server $exe
lacks "$server" usr/bin/flotilla
has "$server" usr/lib/systemd/system/flotilla-server.service $plain
has "$server" usr/lib/sysusers.d/flotilla-server.conf $plain
has "$server" etc/flotilla/server.toml $plain
[ "$(conffiles "$server")" = /etc/flotilla/server.toml ] ||
    fail "flotilla-server conffiles: $(conffiles "$server")"
for s in postinst prerm postrm; do
    [ -x "$work/control/$s" ] || fail "flotilla-server has no $s"
done
# The CLI comes from the flotilla package built beside it, at its version.
want="flotilla (= $(field "$cli" Version))"
field "$server" Depends | tr ',' '\n' | sed 's/^ *//' | grep -qxF "$want" ||
    fail "flotilla-server must depend on $want, not: $(field "$server" Depends)"
[ "$(field "$server" Version)" = "$(field "$cli" Version)" ] || fail "versions differ"
ok "flotilla-server: server, unit, sysusers, conffile, scripts; depends on $want"

has "$agent" usr/bin/flotilla-agent $exe
has "$agent" usr/bin/flotilla-join $exe
has "$agent" usr/lib/systemd/system/flotilla-agent.service $plain
has "$agent" etc/flotilla/agent.toml $plain
[ "$(conffiles "$agent")" = /etc/flotilla/agent.toml ] ||
    fail "flotilla-agent conffiles: $(conffiles "$agent")"
for s in postinst prerm postrm; do
    [ -x "$work/control/$s" ] || fail "flotilla-agent has no $s"
done
ok "flotilla-agent: agent, flotilla-join, unit, conffile, scripts"

# --- Unpacked: units ----------------------------------------------------------

root=$work/root
mkdir -p "$root"
for deb in "$cli" "$server" "$agent"; do
    dpkg-deb -x "$deb" "$root"
done
# Shipped as they are in the source tree.
cmp "$root/usr/bin/flotilla-join" packaging/join.sh || fail "flotilla-join differs from packaging/join.sh"
for u in flotilla-server flotilla-agent; do
    cmp "$root/usr/lib/systemd/system/$u.service" "packaging/systemd/$u.service" ||
        fail "$u.service differs from packaging/systemd/$u.service"
done
"$root/usr/bin/flotilla" --version >/dev/null || fail "the packaged flotilla does not run"
"$root/usr/bin/flotilla-server" --version >/dev/null || fail "the packaged flotilla-server does not run"
"$root/usr/bin/flotilla-agent" --version >/dev/null || fail "the packaged flotilla-agent does not run"

units=$work/units
mkdir -p "$units"
cp /usr/lib/systemd/system/*.target "$units/"
verify_root=$work/verify-root
mkdir -p "$verify_root/usr/lib/systemd/system"
cp -a "$root/usr" "$verify_root/"
cp "$units"/*.target "$verify_root/usr/lib/systemd/system/"
# verify prints its findings (unknown settings, missing binaries...) on
# stderr and may still exit 0: any output is a failure.
findings=$(systemd-analyze verify --root="$verify_root" \
    flotilla-server.service flotilla-agent.service 2>&1) ||
    fail "systemd-analyze verify: $findings"
[ -z "$findings" ] || fail "systemd-analyze verify: $findings"
ok "systemd-analyze verify: both units clean"

# --- Unpacked: maintainer scripts ----------------------------------------------

scripts=$work/scripts
for p in server agent; do
    eval "deb=\$$p"
    mkdir -p "$scripts/$p"
    dpkg-deb -e "$deb" "$scripts/$p"
    for s in postinst prerm postrm; do
        sh -n "$scripts/$p/$s" || fail "flotilla-$p $s: syntax"
    done
done

fake_bin=$work/fake-bin
calls=$work/systemctl.calls
mkdir -p "$fake_bin"
printf '#!/bin/sh\necho "$*" >>"%s"\n' "$calls" >"$fake_bin/systemctl"
chmod 755 "$fake_bin/systemctl"
: >"$calls"

# run PACKAGE SCRIPT ARGS...: a maintainer script against the throwaway root.
run() {
    p=$1 s=$2
    shift 2
    # What dpkg sets for its scripts (deb-systemd-helper insists on it).
    DPKG_ROOT=$root DPKG_MAINTSCRIPT_PACKAGE=flotilla-$p DPKG_MAINTSCRIPT_NAME=$s \
        PATH="$fake_bin:$PATH" sh "$scripts/$p/$s" "$@" >"$work/out" 2>&1 ||
        fail "flotilla-$p $s $*: $(cat "$work/out")"
}
called() {
    grep -qxF -- "$1" "$calls" || fail "expected \`systemctl $1\`; calls: $(tr '\n' ';' <"$calls")"
}
no_calls() {
    [ ! -s "$calls" ] || fail "$1: systemctl called: $(tr '\n' ';' <"$calls")"
}
no_start() {
    if grep -Eq '(^| )(start|restart|try-restart|reload-or-restart|enable --now)( |$)' "$calls"; then
        fail "$1: started a unit: $(tr '\n' ';' <"$calls")"
    fi
}
wants=$root/etc/systemd/system/multi-user.target.wants

# Server, no booted systemd: user, data dir, unit enabled, nothing started.
run server postinst configure
grep -q '^flotilla:' "$root/etc/passwd" || fail "postinst made no user flotilla"
uid=$(awk -F: '$1 == "flotilla" { print $3 }' "$root/etc/passwd")
[ "$(stat -c '%u %a' "$root/var/lib/flotilla-server")" = "$uid 700" ] ||
    fail "data dir: $(stat -c '%u %a' "$root/var/lib/flotilla-server"), want $uid 700"
[ -L "$wants/flotilla-server.service" ] || fail "flotilla-server.service not enabled"
grep -q 'flotilla-server init' "$work/out" || fail "postinst does not say to run init"
no_calls "postinst without systemd"
run server postinst configure
[ "$(grep -c '^flotilla:' "$root/etc/passwd")" -eq 1 ] || fail "postinst is not idempotent"
ok "flotilla-server postinst without systemd: user, 0700 data dir, enabled, idempotent, no systemctl"

# With a booted systemd: reload, never a start while not initialised.
mkdir -p "$root/run/systemd/system"
run server postinst configure
called daemon-reload
no_start "fresh install"
run server postinst configure 0.0.1-1
no_start "upgrade of a server never initialised"
# Initialised: an upgrade restarts it, if it runs (try-restart).
mkdir -p "$root/var/lib/flotilla-server/tls"
: >"$root/var/lib/flotilla-server/tls/ca.pem"
: >"$calls"
run server postinst configure 0.0.1-1
called "try-restart flotilla-server.service"
: >"$calls"
run server postinst configure
no_start "reinstall"
ok "flotilla-server postinst with systemd: reload, no start until init, try-restart on upgrade"

: >"$calls"
run server prerm upgrade 0.2.0-1
no_calls "prerm upgrade"
run server prerm remove
called "stop flotilla-server.service"
run server postrm remove
[ -d "$root/var/lib/flotilla-server" ] || fail "postrm remove deleted the data dir"
run server postrm purge
[ ! -e "$root/var/lib/flotilla-server" ] || fail "postrm purge kept the data dir"
[ ! -e "$wants/flotilla-server.service" ] || fail "postrm purge kept the unit enabled"
ok "flotilla-server prerm/postrm: stop on remove, data dir kept on remove, gone on purge"

# Agent.
rm -rf "$root/run/systemd"
: >"$calls"
run agent postinst configure
[ -L "$wants/flotilla-agent.service" ] || fail "flotilla-agent.service not enabled"
grep -q 'flotilla-join' "$work/out" || fail "agent postinst does not say to run flotilla-join"
no_calls "agent postinst without systemd"
run agent postinst configure
mkdir -p "$root/run/systemd/system"
run agent postinst configure
called daemon-reload
no_start "agent fresh install"
run agent postinst configure 0.0.1-1
called "--no-block try-restart flotilla-agent.service"
: >"$calls"
run agent prerm remove
called "stop flotilla-agent.service"
mkdir -p "$root/var/lib/flotilla-agent"
run agent postrm remove
[ -d "$root/var/lib/flotilla-agent" ] || fail "postrm remove deleted the agent's state"
run agent postrm purge
[ ! -e "$root/var/lib/flotilla-agent" ] || fail "postrm purge kept the agent's state"
[ ! -e "$wants/flotilla-agent.service" ] || fail "postrm purge kept the agent enabled"
ok "flotilla-agent scripts: enabled, no start on install, --no-block try-restart on upgrade, stop on remove, state gone on purge"

# --- cloud-init example -------------------------------------------------------

user_data=packaging/cloud-init/user-data.yaml
[ "$(head -n 1 "$user_data")" = "#cloud-config" ] || fail "$user_data must start with #cloud-config"
"$python" - "$user_data" "$work/runcmd.sh" <<'PY' || fail "$user_data is not the expected cloud-config"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert isinstance(doc, dict), "not a mapping"
token = [f for f in doc["write_files"] if f["path"].endswith("join-token")]
assert len(token) == 1 and token[0]["permissions"] == "0600", "no root-only token file"
steps = doc["runcmd"]
assert all(isinstance(s, str) for s in steps), "runcmd items must be shell strings"
script = "\n".join(steps)
assert "flotilla-join" in script and "--token-file" in script, "no flotilla-join --token-file"
open(sys.argv[2], "w").write(script + "\n")
PY
sh -n "$work/runcmd.sh" || fail "$user_data: runcmd is not valid sh"
ok "cloud-init example: YAML parses, token file 0600, runcmd passes sh -n"

echo "check-debs.sh: all checks passed"
