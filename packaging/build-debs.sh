#!/bin/sh
# build-debs.sh: builds the Debian packages flotilla-server, flotilla (the
# CLI) and flotilla-agent with cargo-deb, into a directory it prints at the end
# (default target/debian).
#
#   packaging/build-debs.sh [--no-build] [--out-dir DIR]
#
#   --no-build     package the release binaries already built (cargo build
#                  --release --workspace --bins --locked), instead of
#                  building them first
#   --out-dir DIR  where to write the .deb files (default target/debian)
#
# cargo-deb is installed with `cargo install` when missing (or at another
# version than the one pinned here). The CLI's man pages and shell completions
# are generated from the built `flotilla` binary into
# <target>/release/generated/, where the packages' assets take them from.
#
# Exit status: 0 done, 1 failed, 2 bad usage.

set -eu

CARGO_DEB_VERSION=3.8.0

cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
out_dir=$target_dir/debian
build=yes

usage_error() {
    printf 'build-debs.sh: %s\n' "$*" >&2
    printf 'Usage: packaging/build-debs.sh [--no-build] [--out-dir DIR]\n' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --no-build)
            build=no
            shift
            ;;
        --out-dir)
            [ $# -ge 2 ] || usage_error "option --out-dir needs a value"
            out_dir=$2
            shift 2
            ;;
        --out-dir=*)
            out_dir=${1#--out-dir=}
            shift
            ;;
        -h | --help)
            sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

die() {
    printf 'build-debs.sh: error: %s\n' "$*" >&2
    exit 1
}

# cargo-deb, at the pinned version.
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
    echo "build-debs.sh: installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" ||
        die "cannot install cargo-deb $CARGO_DEB_VERSION"
fi

release=$target_dir/release
if [ "$build" = yes ]; then
    cargo build --release --locked -p flotilla-server -p flotilla-agent --bins
fi
for b in flotilla flotilla-server flotilla-agent; do
    [ -x "$release/$b" ] || die "$release/$b is missing: build it first (cargo build --release --workspace --bins --locked), or run without --no-build"
done

# Man pages and completions, from the binary that is packaged.
generated=$release/generated
rm -rf "$generated"
mkdir -p "$generated/completions"
"$release/flotilla" man --out-dir "$generated/man" 2>/dev/null
# Compressed, as Debian ships man pages (-n: no name or time inside).
gzip -9nf "$generated/man"/*.1
"$release/flotilla" completion bash >"$generated/completions/flotilla.bash"
"$release/flotilla" completion zsh >"$generated/completions/_flotilla"
"$release/flotilla" completion fish >"$generated/completions/flotilla.fish"
for f in "$generated/man/flotilla.1.gz" "$generated/completions/flotilla.bash" \
    "$generated/completions/_flotilla" "$generated/completions/flotilla.fish"; do
    [ -s "$f" ] || die "$f was not generated"
done

mkdir -p "$out_dir"
rm -f "$out_dir"/flotilla_*.deb "$out_dir"/flotilla-server_*.deb "$out_dir"/flotilla-agent_*.deb
# --no-build: the binaries are those above (cargo-deb would otherwise build
# them again with its own flags). cargo-deb strips the binaries it packages.
deb() {
    cargo deb --locked --no-build --output "$out_dir" "$@" >/dev/null ||
        die "cargo deb $* failed"
}
deb -p flotilla-server
deb -p flotilla-server --variant server
deb -p flotilla-agent

ls -l "$out_dir"/*.deb >&2
printf '%s\n' "$out_dir"
