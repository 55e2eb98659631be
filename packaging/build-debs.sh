#!/usr/bin/env bash
# Build drover's Debian packages with cargo-deb:
#   drover_VERSION_{amd64,arm64}.deb         coordinator daemon and operator CLI
#   drover-worker_VERSION_{amd64,arm64}.deb  worker daemon
# arm64 is cross-compiled with Debian's rustc-web and aarch64-linux-gnu-gcc (see
# .cargo/config.toml and ../shared/recipes.md). Run as root on Debian, it installs its own
# build dependencies first.
#
# Usage: packaging/build-debs.sh [--out DIR] [--version DEBVERSION] [--arch amd64,arm64]
#                                [--package drover,drover-worker] [--no-build] [--no-deps]
#                                [--lintian]
#   --out DIR        where the .debs go (default: $CARGO_TARGET_DIR/packaging/debs, and
#                    CARGO_TARGET_DIR defaults to target)
#   --version V      the package version, e.g. 0.1.0-2 (default: the crate version + "-1");
#                    a version other than the default gets its own changelog entry
#   --arch LIST      comma-separated Debian architectures (default: amd64,arm64)
#   --package LIST   comma-separated package names (default: drover,drover-worker)
#   --no-build       package the binaries already built (e.g. a rebuild at a new version)
#   --no-deps        never run apt-get or cargo install
#   --lintian        run lintian on the results; any error or warning fails the build
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WS=$(cd "$HERE/.." && pwd)
GEN="$HERE/gen"   # referenced by [package.metadata.deb] in the crates' Cargo.toml
TARGET=${CARGO_TARGET_DIR:-$WS/target}
OUT="$TARGET/packaging/debs"
VERSION=""
ARCHES="amd64,arm64"
PACKAGES="drover,drover-worker"
BUILD=1
DEPS=1
LINTIAN=0
CARGO_DEB_VERSION="3.8.0"
AARCH64=aarch64-unknown-linux-gnu

die() { echo "build-debs: $*" >&2; exit 1; }
say() { echo "build-debs: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --version) VERSION=$2; shift 2 ;;
        --arch) ARCHES=$2; shift 2 ;;
        --package) PACKAGES=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-deps) DEPS=0; shift ;;
        --lintian) LINTIAN=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

has_arch() { [[ ",$ARCHES," == *",$1,"* ]]; }
has_pkg() { [[ ",$PACKAGES," == *",$1,"* ]]; }
for a in ${ARCHES//,/ }; do [[ $a == amd64 || $a == arm64 ]] || die "unsupported arch $a (amd64, arm64)"; done
for p in ${PACKAGES//,/ }; do [[ $p == drover || $p == drover-worker ]] || die "unknown package $p"; done

crate_of() { case "$1" in drover) echo drover-coordinator ;; drover-worker) echo drover-worker-agent ;; esac; }
bin_of() { echo "$1"; }   # each package's binary has the package's name

# ---------------------------------------------------------------- build dependencies
install_deps() {
    local need=(dpkg-dev binutils)
    [ "$LINTIAN" = 1 ] && need+=(lintian)
    if has_arch arm64; then
        need+=(rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross libc6:arm64)
    fi
    local missing=()
    for p in "${need[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$DEPS" = 1 ] && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
            say "installing build dependencies: ${missing[*]}"
            if has_arch arm64 && ! dpkg --print-foreign-architectures | grep -qx arm64; then
                dpkg --add-architecture arm64
            fi
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        else
            die "missing build dependencies: ${missing[*]} (run as root on Debian to install them, or: dpkg --add-architecture arm64 && apt-get install ${missing[*]})"
        fi
    fi
    if ! cargo deb --version >/dev/null 2>&1; then
        [ "$DEPS" = 1 ] || die "cargo-deb is missing: cargo install cargo-deb --version $CARGO_DEB_VERSION --locked"
        say "installing cargo-deb $CARGO_DEB_VERSION"
        cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
    fi
    if has_arch arm64 && [ ! -x /usr/bin/rustc ]; then
        die "/usr/bin/rustc (Debian's rustc-web) is needed to cross-compile arm64"
    fi
}

# ---------------------------------------------------------------- compile
# One cargo invocation per architecture, so the binaries' final (LTO) links run in parallel.
# The crates share their dependencies with the same features, so each binary is the same as
# when built alone.
cargo_build() { # $1 = debian arch, $2.. = package names
    local arch=$1 p t0=$SECONDS
    shift
    local args=(build --release --locked)
    for p in "$@"; do args+=(-p "$(crate_of "$p")" --bin "$(bin_of "$p")"); done
    if [ "$arch" = arm64 ]; then
        # rustup has no aarch64 std here; Debian's rustc-web has (libstd-rust-web-dev:arm64).
        # The linker comes from .cargo/config.toml.
        say "compiling $* for arm64 (RUSTC=/usr/bin/rustc)"
        (cd "$WS" && RUSTC=/usr/bin/rustc cargo "${args[@]}" --target "$AARCH64")
    else
        say "compiling $* for amd64"
        (cd "$WS" && cargo "${args[@]}")
    fi
    say "compiled for $arch in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- generated files
# path+file:///.../coordinator#drover-coordinator@0.1.0
CRATE_VERSION=$(cd "$WS" && cargo pkgid -p drover-coordinator | sed 's/.*@//')
[ -n "$CRATE_VERSION" ] || die "cannot read the crate version from cargo metadata"
DEFAULT_VERSION="$CRATE_VERSION-1"
VERSION=${VERSION:-$DEFAULT_VERSION}

gen_changelog() {
    mkdir -p "$GEN"
    if [ "$VERSION" = "$DEFAULT_VERSION" ]; then
        cp "$HERE/changelog" "$GEN/changelog"
    else
        {
            echo "drover ($VERSION) unstable; urgency=medium"
            echo
            echo "  * Rebuild as $VERSION."
            echo
            echo " -- Drover maintainers <maintainers@drover.example>  $(LC_ALL=C date -R)"
            echo
            cat "$HERE/changelog"
        } >"$GEN/changelog"
    fi
}

# Man pages come from the CLI definitions, through hidden options of the host binaries.
gen_manpages() {
    local d="$GEN/drover/man" w="$GEN/drover-worker/man"
    rm -rf "$d" "$w"
    "$TARGET/release/drover" manpages "$d"
    # `drover worker` only groups `drover worker show`; its page would be called
    # drover-worker(1) and shadow the daemon's.
    rm -f "$d/drover-worker.1"
    "$TARGET/release/drover-worker" --manpage-dir "$w"
    ls "$d"/*.1 "$w"/*.1 >/dev/null
}

# The conffiles must show every key the daemon knows, commented out at its default.
check_conffile() { # $1 = conffile, $2.. = the daemon's print-config command (without --config)
    local conf=$1; shift
    local tmp
    tmp=$(mktemp -d)
    : >"$tmp/empty.toml"
    "$@" --config "$tmp/empty.toml" --print-config >"$tmp/defaults" ||
        die "cannot print the default configuration with $*"
    "$@" --config "$conf" --print-config >"$tmp/shipped" ||
        die "$conf does not load"
    cmp -s "$tmp/defaults" "$tmp/shipped" || die "$conf sets values: every key must stay commented out"
    # Uncommenting every key must still load (catches misspelt keys in the comments).
    sed -E 's/^# ([a-z_]+ = )/\1/' "$conf" >"$tmp/uncommented.toml"
    "$@" --config "$tmp/uncommented.toml" --print-config >/dev/null ||
        die "$conf: uncommenting its keys gives an invalid configuration"
    local section="" line key
    while IFS= read -r line; do
        case "$line" in
            "") ;;
            \[*\]) section=$line ;;
            *)
                key=${line%% = *}
                awk -v sect="$section" -v want="# $line" '
                    /^\[.*\]$/ { cur = $0 }
                    cur == sect && $0 == want { found = 1 }
                    END { exit !found }' "$conf" ||
                    die "$conf lacks the line \"# $line\"${section:+ in $section} (key $key)"
                ;;
        esac
    done <"$tmp/defaults"
    rm -rf "$tmp"
}

gen_copyright() { # $1 = package, $2 = rust target triple
    local crate crates
    crate=$(crate_of "$1")
    crates=$(cd "$WS" && cargo tree --locked -p "$crate" -e normal,no-proc-macro --prefix none \
        -f '{p}|{l}' --target "$2" | sed 's/ (\*)$//' | grep -v '^drover' | sort -u |
        awk -F'|' '{ sub(/ v/, " ", $1); printf " %s (%s)\n", $1, $2 }')
    [ -n "$crates" ] || die "cargo tree listed no crates for $crate"
    mkdir -p "$GEN/$1"
    awk -v crates="$crates" '$0 == "@CRATES@" { print crates; next } { print }' \
        "$HERE/copyright.in" >"$GEN/$1/copyright"
}

# ---------------------------------------------------------------- main
[ "$DEPS" = 1 ] && install_deps
cd "$WS"

if [ "$BUILD" = 1 ]; then
    # The host binaries make the man pages and check the conffiles, so they are always built.
    cargo_build amd64 drover drover-worker
    if has_arch arm64; then
        # shellcheck disable=SC2086 # PACKAGES is a checked comma-separated list
        cargo_build arm64 ${PACKAGES//,/ }
    fi
fi
for b in drover drover-worker; do
    [ -x "$TARGET/release/$b" ] || die "target/release/$b is missing (drop --no-build)"
done

gen_changelog
gen_manpages
check_conffile "$HERE/conf/coordinator.toml" "$TARGET/release/drover" serve
check_conffile "$HERE/conf/worker.toml" "$TARGET/release/drover-worker"

# What debhelper would add and cargo-deb does not: binaries without the .comment and .note
# sections (dh_strip) and a DEBIAN/md5sums for `dpkg --verify` (dh_md5sums; conffiles are
# tracked by dpkg itself and left out).
finalize_deb() { # $1 = .deb, $2 = debian arch
    local deb=$1 objcopy=objcopy d f
    [ "$2" = arm64 ] && objcopy=aarch64-linux-gnu-objcopy
    d=$(mktemp -d "$TARGET/packaging/final.XXXXXX")
    dpkg-deb -R "$deb" "$d"
    for f in "$d"/usr/bin/*; do
        "$objcopy" --remove-section=.comment --remove-section=.note "$f"
    done
    (
        cd "$d"
        find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
            { if [ -f DEBIAN/conffiles ]; then grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles); else cat; fi; } |
            xargs -d '\n' md5sum >DEBIAN/md5sums
    )
    chmod 0644 "$d/DEBIAN/md5sums"
    # Installed-Size still holds: dropping .comment saves a few hundred bytes at most.
    dpkg-deb --root-owner-group -Zxz -b "$d" "$deb" >/dev/null
    rm -rf "$d"
}

built=()
for arch in ${ARCHES//,/ }; do
    case $arch in
        amd64) triple=x86_64-unknown-linux-gnu; target_args=() ;;
        arm64) triple=$AARCH64; target_args=(--target "$AARCH64") ;;
    esac
    for p in ${PACKAGES//,/ }; do
        gen_copyright "$p" "$triple"
        deb="$OUT/${p}_${VERSION}_${arch}.deb"
        say "packaging $deb"
        # cargo-deb deletes older .debs of a package in its output directory, so each goes
        # through a private one and is then moved to $OUT.
        mkdir -p "$TARGET/packaging"
        stage=$(mktemp -d "$TARGET/packaging/stage.XXXXXX")
        if [ "$arch" = arm64 ]; then export RUSTC=/usr/bin/rustc; else unset RUSTC; fi
        cargo deb --no-build --locked -p "$(crate_of "$p")" "${target_args[@]}" \
            --deb-version "$VERSION" --output "$stage/$(basename "$deb")" >/dev/null
        mv -f "$stage/$(basename "$deb")" "$deb"
        rm -rf "$stage"
        finalize_deb "$deb" "$arch"
        built+=("$deb")
    done
done
unset RUSTC

for deb in "${built[@]}"; do
    printf '%-60s %8s bytes\n' "$(basename "$deb")" "$(stat -c %s "$deb")"
done

if [ "$LINTIAN" = 1 ]; then
    command -v lintian >/dev/null || die "lintian is not installed"
    say "lintian (errors and warnings fail; overrides in packaging/*/lintian-overrides)"
    # --tag-display-limit 0: show every hit; upload-only tags are overridden in the packages.
    lintian --fail-on error,warning --tag-display-limit 0 --info "${built[@]}"
fi
