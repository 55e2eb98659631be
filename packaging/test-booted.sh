#!/usr/bin/env bash
# Tests of drover's Debian packages and systemd units in clean Debian systems booted with
# systemd (systemd-nspawn -b), amd64 natively and arm64 under binfmt + qemu-user:
#
#   1. lintian on the packages; `systemd-analyze verify` prints nothing for either unit;
#      `systemd-analyze security --offline=yes` exposure of drover.service is at most 2.0
#      (the worker's score is printed).
#   2. amd64 root: drover_*_amd64.deb installs enabled but inactive (skipped, not failed)
#      without certificates; with certificates and a config it is active, `drover status`
#      answers, its log reaches the journal with structured fields; drover-worker_amd64
#      registers with it, its unit's sandbox can make namespaces and task cgroups, and a
#      task runs in the worker's sandbox (pid 2 of its own pid namespace); an upgrade
#      to a rebuilt higher version keeps an edited conffile and the service comes back on
#      the new version; purge removes the state, the config and the unit.
#   3. arm64 root: drover-worker_*_arm64.deb configured for a coordinator running on the
#      host appears in `drover workers --json` with arch aarch64, and a task requiring arch
#      aarch64 runs there and prints `uname -m` = aarch64.
#
# Run as root on Debian: it installs what it needs (systemd-container, debootstrap,
# qemu-user-static, jq, lintian) and builds the packages with build-debs.sh. Bootstrapped
# roots are cached as tarballs in $DROVER_ROOT_CACHE (default /var/cache/drover-test-roots),
# so only the first run pays for debootstrap. Without root, or where systemd-nspawn or
# debootstrap cannot work, it says so loudly and exits 0.
#
# Environment: DROVER_DEBS=DIR        use the .debs in DIR instead of building
#              DROVER_ROOT_CACHE=DIR  root tarball cache
#              DROVER_PKG_TARGET_DIR=DIR  cargo target dir of the release builds
#                                     (default: $DROVER_ROOT_CACHE/cargo-target)
#              DEBIAN_MIRROR=URL      mirror for debootstrap (default http://deb.debian.org/debian)
#              KEEP=1                 keep the work directory (its path is printed)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WS=$(cd "$HERE/.." && pwd)
CACHE=${DROVER_ROOT_CACHE:-/var/cache/drover-test-roots}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# Bump when the contents of a cached root change, so stale tarballs are not used.
ROOT_RECIPE=1
T0=$(date +%s)

log() { echo "[test-booted $(( $(date +%s) - T0 ))s] $*"; }
banner() {
    local line="################################################################################"
    printf '%s\n# %s\n%s\n' "$line" "$*" "$line"
    printf '%s\n# %s\n%s\n' "$line" "$*" "$line" >&2
}
SKIPPED=""
skip() { SKIPPED=$*; banner "test-booted SKIPPED: $*"; exit 0; }
FAILS=0
PASSES=0
pass() { PASSES=$((PASSES + 1)); log "PASS: $*"; }
fail() { FAILS=$((FAILS + 1)); log "FAIL: $*"; }
check() { # check "what" command... (the command's stdout is not shown)
    local what=$1; shift
    if "$@" >/dev/null; then pass "$what"; else fail "$what"; fi
}
die() { log "ERROR: $*"; FAILS=$((FAILS + 1)); finish; }

[ "$(id -u)" = 0 ] || skip "needs root (systemd-nspawn, debootstrap, dpkg in roots)"
[ -f /etc/debian_version ] || skip "needs a Debian host"

# ---------------------------------------------------------------- host tools
need=(systemd-container debootstrap qemu-user-static jq lintian dbus)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null; }; then
        skip "cannot install ${missing[*]} with apt-get"
    fi
fi
for t in systemd-nspawn debootstrap nsenter systemd-analyze jq; do
    command -v "$t" >/dev/null || skip "$t is not available"
done

W=$(mktemp -d "${TMPDIR:-/var/tmp}/drover-booted.XXXXXX")
NSPAWN_PIDS=()
INIT_PIDS=()
HOST_COORD_PID=""

cleanup() {
    set +e
    local i np
    for i in "${!NSPAWN_PIDS[@]}"; do
        np=${NSPAWN_PIDS[$i]}
        kill -0 "$np" 2>/dev/null || continue
        # nspawn asks the container's systemd to power off; the roots are thrown away, so
        # after a few seconds (an emulated shutdown is slow) the container's init is killed,
        # which ends its whole pid namespace, and nspawn exits.
        kill -TERM "$np" 2>/dev/null
        for _ in $(seq 1 10); do kill -0 "$np" 2>/dev/null || break; sleep 0.5; done
        [ -n "${INIT_PIDS[$i]:-}" ] && kill -KILL "${INIT_PIDS[$i]}" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$np" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$np" 2>/dev/null
    done
    [ -n "$HOST_COORD_PID" ] && kill "$HOST_COORD_PID" 2>/dev/null && wait "$HOST_COORD_PID" 2>/dev/null
    # A root still bootstrapping (an early failure): stop it; its tarball was not written.
    if [ -n "${ROOTS_PID:-}" ] && kill -0 "$ROOTS_PID" 2>/dev/null; then
        kill -TERM -- "-$ROOTS_PID" 2>/dev/null
        wait "$ROOTS_PID" 2>/dev/null
    fi
    # debootstrap's mounts, if it was interrupted.
    findmnt -rn -o TARGET | grep "^$W/" | sort -r | xargs -r umount -l 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then
        log "kept $W"
    else
        rm -rf --one-file-system "$W"
    fi
}
finish() {
    cleanup
    trap - EXIT
    log "total $(( $(date +%s) - T0 ))s"
    if [ -n "$SKIPPED" ] && [ "$FAILS" = 0 ]; then
        banner "test-booted SKIPPED after $PASSES passed checks: $SKIPPED"
        exit 0
    fi
    [ -n "$SKIPPED" ] && log "the rest was skipped: $SKIPPED"
    echo "test-booted: $PASSES passed, $FAILS failed"
    [ "$FAILS" = 0 ]
    exit $?
}
on_exit() {
    local rc=$?
    if [ "$rc" != 0 ] && [ -z "$SKIPPED" ]; then
        FAILS=$((FAILS + 1))
        log "ERROR: aborted with exit status $rc (see the output above)"
    fi
    finish
}
trap on_exit EXIT

# ---------------------------------------------------------------- roots and containers

binfmt_arm64() {
    [ -e /proc/sys/fs/binfmt_misc/status ] ||
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || return 1
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] ||
        /usr/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf || return 1
    grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64
}

# A cached, bootable minimal Debian root: minbase plus systemd, systemd-sysv and dbus.
ensure_root() { # $1 = arch → path of the tarball
    local arch=$1
    local tarball="$CACHE/$SUITE-$arch-r$ROOT_RECIPE.tar"
    if [ -f "$tarball" ]; then
        echo "$tarball"
        return 0
    fi
    log "bootstrapping a $SUITE $arch root (cached afterwards in $tarball)" >&2
    local d="$W/bootstrap-$arch" pkgs=systemd,systemd-sysv,dbus
    mkdir -p "$CACHE"
    if [ "$arch" = amd64 ]; then
        debootstrap --arch=amd64 --variant=minbase --include=$pkgs "$SUITE" "$d" "$MIRROR" \
            >"$W/debootstrap-$arch.log" 2>&1 || { tail -20 "$W/debootstrap-$arch.log" >&2; return 1; }
    else
        debootstrap --arch="$arch" --foreign --variant=minbase --include=$pkgs "$SUITE" "$d" "$MIRROR" \
            >"$W/debootstrap-$arch.log" 2>&1 &&
            chroot "$d" /debootstrap/debootstrap --second-stage >>"$W/debootstrap-$arch.log" 2>&1 ||
            { tail -20 "$W/debootstrap-$arch.log" >&2; return 1; }
    fi
    # Smaller and quicker to boot: no package caches, no getty on the console.
    rm -rf "$d"/var/cache/apt/archives/*.deb "$d"/var/lib/apt/lists/*
    ln -sf /dev/null "$d/etc/systemd/system/console-getty.service"
    tar --numeric-owner -C "$d" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$d"
    echo "$tarball"
}

unpack_root() { # $1 = tarball, $2 = dir
    mkdir -p "$2"
    tar --numeric-owner -C "$2" -xf "$1"
}

# Boot $2 with systemd-nspawn; sets PID1 to the container's systemd. Without
# --private-network the container shares the host's network (and loopback).
boot() { # $1 = name, $2 = root dir
    local name=$1 root=$2 np i
    systemd-nspawn -D "$root" --register=no --keep-unit --console=passive -b \
        --machine="drover-$name" >"$W/console-$name.log" 2>&1 &
    np=$!
    NSPAWN_PIDS+=("$np")
    PID1=""
    for i in $(seq 1 150); do
        PID1=$(pgrep -P "$np" -x systemd | head -1 || true)
        [ -n "$PID1" ] && break
        kill -0 "$np" 2>/dev/null || break
        sleep 0.2
    done
    [ -n "$PID1" ] || { tail -20 "$W/console-$name.log"; return 1; }
    INIT_PIDS[${#NSPAWN_PIDS[@]} - 1]=$PID1
    # Early in the boot (slow under emulation) systemctl cannot reach systemd yet and prints
    # nothing or "offline": ask again until it can wait for the boot to finish.
    local state="" deadline=$(( $(date +%s) + 300 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        state=$(timeout 300 nsenter -t "$PID1" -a systemctl is-system-running --wait 2>/dev/null || true)
        case "$state" in "" | offline) sleep 1 ;; *) break ;; esac
    done
    log "$name: booted, system state '$state'"
    # Under qemu-user, systemd-sysusers and a few hardware units fail: "degraded" is fine.
    [ "$state" = running ] || [ "$state" = degraded ]
}
ct() { timeout 180 nsenter -t "$PID1" -a "$@"; }
prop() { ct systemctl show -p "$2" --value "$1"; } # prop UNIT PROPERTY
# "inactive, condition failed, no error": how a unit skipped by ConditionPathExists= looks.
skipped_state() { echo "$(prop "$1" ActiveState) $(prop "$1" Result) $(prop "$1" ConditionResult)"; }
no_process() { # no process called $1 in the container
    ! ct sh -c 'for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = "$1" ] && exit 0; done; exit 1' _ "$1"
}
worker_ready() { # $1 = name, rest = operator connection flags; waits up to 20 s
    local name=$1 i; shift
    for i in $(seq 1 40); do
        ct drover workers --state ready "$@" --json 2>/dev/null |
            jq -e --arg n "$name" 'map(.name) | index($n) != null' >/dev/null && return 0
        sleep 0.5
    done
    return 1
}

# Every task runs in a cgroup of its own. On a hybrid cgroup host (cgroup v1 memory controller,
# like these build machines) systemd-nspawn mounts the v1 controllers read-only in the
# container, where no task could get a memory cgroup; a real host's delegated subtree has no
# such limit. Let the container write them.
cgroups_writable_for_tasks() {
    ct sh -c 'for c in memory pids freezer; do
        d=/sys/fs/cgroup/$c
        [ -d "$d" ] || continue
        mount -o remount,rw "$d" 2>/dev/null || mount -o remount,bind,rw "$d" 2>/dev/null || true
    done' || true
}

free_udp_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null && return
    local p
    while :; do
        p=$(shuf -i 20000-60000 -n 1)
        ss -Hlun "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return; }
    done
}

# Certificates from the packaged CLI: a fleet CA, then one certificate per holder.
make_pki() { # $1 = dir
    "$HOST_DROVER" tls ca create --dir "$1/ca" --name "test-fleet" >/dev/null
}
issue() { # $1 = pki dir, $2 = role, $3 = name, $4 = out dir
    "$HOST_DROVER" tls cert create --role "$2" --name "$3" --ca-dir "$1/ca" --out-dir "$4" >/dev/null
}

# Cold runs bootstrap the roots (about 45 s for amd64, 3 minutes for arm64 under emulation)
# while the packages compile.
prepare_roots() {
    ensure_root amd64 >/dev/null || true
    if binfmt_arm64; then ensure_root arm64 >/dev/null || true; fi
}
if [ ! -f "$CACHE/$SUITE-amd64-r$ROOT_RECIPE.tar" ] || [ ! -f "$CACHE/$SUITE-arm64-r$ROOT_RECIPE.tar" ]; then
    log "bootstrapping the missing roots in the background (log: $W/roots.log)"
    set -m # its own process group, so that cleanup can stop all of it
    prepare_roots >"$W/roots.log" 2>&1 &
    ROOTS_PID=$!
    set +m
fi

# ---------------------------------------------------------------- packages
# The release builds persist between runs (a CI clone starts without target/), so a warm run
# recompiles only drover's own crates. Kept under 6 GiB.
export CARGO_TARGET_DIR=${DROVER_PKG_TARGET_DIR:-$CACHE/cargo-target}
mkdir -p "$CARGO_TARGET_DIR"
if [ "$(du -sm "$CARGO_TARGET_DIR" | cut -f1)" -gt 6144 ]; then
    log "emptying the build cache $CARGO_TARGET_DIR (over 6 GiB)"
    rm -rf --one-file-system "${CARGO_TARGET_DIR:?}"/*
fi
VERSION=$(cd "$WS" && cargo pkgid -p drover-coordinator | sed 's/.*@//')
V1="$VERSION-1"
V2="$VERSION-2"
DEBS="$W/debs"
if [ -n "${DROVER_DEBS:-}" ]; then
    DEBS=$(cd "$DROVER_DEBS" && pwd)
    log "using the packages in $DEBS"
else
    log "building packages $V1 (amd64: drover, drover-worker; arm64: drover-worker)"
    "$HERE/build-debs.sh" --out "$DEBS" --arch amd64 --package drover,drover-worker
    "$HERE/build-debs.sh" --out "$DEBS" --arch arm64 --package drover-worker
    log "repackaging drover $V2 for the upgrade test"
    "$HERE/build-debs.sh" --out "$DEBS" --arch amd64 --package drover --version "$V2" --no-build
fi
for f in "drover_${V1}_amd64" "drover_${V2}_amd64" "drover-worker_${V1}_amd64" "drover-worker_${V1}_arm64"; do
    [ -f "$DEBS/$f.deb" ] || die "$DEBS/$f.deb is missing"
done
log "package sizes:"
ls -l "$DEBS"/*.deb | awk '{ printf "    %10d  %s\n", $5, $NF }'

# ---------------------------------------------------------------- 1. static checks
log "lintian"
lintian_rc=0
lintian --fail-on error,warning "$DEBS/drover_${V1}_amd64.deb" "$DEBS/drover-worker_${V1}_amd64.deb" \
    "$DEBS/drover-worker_${V1}_arm64.deb" >"$W/lintian.raw" 2>&1 || lintian_rc=$?
grep -v "running with root privileges" "$W/lintian.raw" >"$W/lintian.out" || true
[ -s "$W/lintian.out" ] && sed 's/^/    /' "$W/lintian.out"
if [ "$lintian_rc" = 0 ]; then
    pass "lintian: no errors or warnings (overrides: upload-only tags)"
else
    fail "lintian (exit $lintian_rc)"
fi

# A root for the offline checks: the host's systemd units plus both packages unpacked, so
# ExecStart= finds the packaged binaries.
VR="$W/verify-root"
mkdir -p "$VR/lib/systemd"
cp -a /lib/systemd/system "$VR/lib/systemd/"
dpkg-deb -x "$DEBS/drover_${V1}_amd64.deb" "$VR"
dpkg-deb -x "$DEBS/drover-worker_${V1}_amd64.deb" "$VR"
if systemd-analyze verify --root="$VR" --man=no drover.service drover-worker.service >"$W/verify.out" 2>&1 &&
    [ ! -s "$W/verify.out" ]; then
    pass "systemd-analyze verify prints nothing for drover.service and drover-worker.service"
else
    sed 's/^/    /' "$W/verify.out"
    fail "systemd-analyze verify"
fi
exposure() { # $1 = unit → its overall exposure level
    systemd-analyze security --offline=yes --root="$VR" "$1" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'
}
COORD_SCORE=$(exposure drover.service)
WORKER_SCORE=$(exposure drover-worker.service)
log "systemd-analyze security --offline=yes: drover.service $COORD_SCORE, drover-worker.service $WORKER_SCORE"
check "drover.service exposure $COORD_SCORE <= 2.0" awk -v s="$COORD_SCORE" 'BEGIN { exit !(s != "" && s <= 2.0) }'

# ---------------------------------------------------------------- roots
HOST_DROVER="$W/host-drover/usr/bin/drover"
dpkg-deb -x "$DEBS/drover_${V1}_amd64.deb" "$W/host-drover"
if [ -n "${ROOTS_PID:-}" ]; then
    log "waiting for the roots"
    wait "$ROOTS_PID" || true
    sed 's/^/    /' "$W/roots.log"
fi
AMD64_TAR=$(ensure_root amd64) || skip "debootstrap cannot build a $SUITE amd64 root (network or mirror: $MIRROR)"
unpack_root "$AMD64_TAR" "$W/root-amd64"
systemd-nspawn -q --register=no --keep-unit -D "$W/root-amd64" /bin/true >"$W/nspawn-probe.log" 2>&1 ||
    { cat "$W/nspawn-probe.log"; skip "systemd-nspawn cannot start a container here"; }

# ---------------------------------------------------------------- 2. amd64
amd64_test() {
    local R="$W/root-amd64" port pid_before pid_after
    mkdir -p "$R/root/debs" "$R/root/op"
    cp "$DEBS/drover_${V1}_amd64.deb" "$DEBS/drover_${V2}_amd64.deb" "$DEBS/drover-worker_${V1}_amd64.deb" "$R/root/debs/"
    boot amd64 "$R" || { fail "amd64 root boots"; return; }

    log "amd64: install drover $V1 without certificates"
    ct dpkg -i "/root/debs/drover_${V1}_amd64.deb" >"$W/dpkg-amd64-1.log" 2>&1 ||
        { cat "$W/dpkg-amd64-1.log"; fail "dpkg -i drover_${V1}_amd64.deb"; return; }
    check "drover.service enabled on install" test "$(ct systemctl is-enabled drover.service)" = enabled
    check "without certificates drover.service is skipped: inactive, not failed" \
        test "$(skipped_state drover.service)" = "inactive success no"
    check "system user drover exists" ct id drover
    check "/var/lib/drover is owned by drover, mode 750" \
        test "$(ct stat -c '%U:%G %a' /var/lib/drover)" = "drover:drover 750"
    check "conffile /etc/drover/coordinator.toml installed" ct test -f /etc/drover/coordinator.toml

    log "amd64: certificates and config, then start"
    make_pki "$W/pki-amd64"
    cp "$W/pki-amd64/ca/ca.crt" "$R/etc/drover/tls/"
    issue "$W/pki-amd64" coordinator coordinator "$R/etc/drover/tls"
    issue "$W/pki-amd64" operator ci-operator "$R/root/op"
    issue "$W/pki-amd64" worker amd64-worker "$W/pki-amd64/w"
    ct chgrp drover /etc/drover/tls/coordinator.key
    ct chmod 0640 /etc/drover/tls/coordinator.key
    port=$(free_udp_port)
    sed -i "s|^# listen = .*|listen = \"127.0.0.1:$port\"|" "$R/etc/drover/coordinator.toml"
    echo "# local edit: this line must survive upgrades" >>"$R/etc/drover/coordinator.toml"
    ct systemctl start drover.service || true
    check "drover.service active after start (READY=1)" test "$(ct systemctl is-active drover.service)" = active
    check "drover.service is Type=notify, runs as drover, with a 30 s watchdog" \
        test "$(prop drover.service Type) $(prop drover.service User) $(prop drover.service WatchdogUSec)" = "notify drover 30s"
    local op=(--coordinator "127.0.0.1:$port" --ca /etc/drover/tls/ca.crt --cert /root/op/ci-operator.crt --key /root/op/ci-operator.key)
    if ct drover status "${op[@]}" --json >"$W/status-1.json" 2>&1 && jq -e .coordinator_version "$W/status-1.json" >/dev/null; then
        pass "drover status answers: $(jq -r .coordinator_version "$W/status-1.json")"
    else
        cat "$W/status-1.json"
        fail "drover status answers"
    fi
    ct journalctl -u drover.service -o json --no-pager >"$W/journal-drover.json" 2>/dev/null || true
    check "the coordinator logs to the journal with structured fields (LISTEN=127.0.0.1:$port)" \
        jq -s -e --arg l "127.0.0.1:$port" 'any(.[]; .LISTEN == $l and .SYSLOG_IDENTIFIER == "drover")' "$W/journal-drover.json"

    log "amd64: drover-worker registers with it"
    ct dpkg -i "/root/debs/drover-worker_${V1}_amd64.deb" >"$W/dpkg-amd64-w.log" 2>&1 ||
        { cat "$W/dpkg-amd64-w.log"; fail "dpkg -i drover-worker_${V1}_amd64.deb"; }
    check "without certificates drover-worker.service is skipped: inactive, not failed" \
        test "$(skipped_state drover-worker.service)" = "inactive success no"
    install -m 0600 "$W/pki-amd64/w/amd64-worker.crt" "$R/etc/drover/tls/worker.crt"
    install -m 0600 "$W/pki-amd64/w/amd64-worker.key" "$R/etc/drover/tls/worker.key"
    sed -i "s|^# coordinator = .*|coordinator = \"127.0.0.1:$port\"|" "$R/etc/drover/worker.toml"
    cgroups_writable_for_tasks
    ct systemctl start drover-worker.service || true
    check "drover-worker.service active (READY=1 after registering)" test "$(ct systemctl is-active drover-worker.service)" = active
    ct drover workers "${op[@]}" --json >"$W/workers-amd64.json" 2>&1 || true
    check "amd64-worker is ready with arch x86_64" \
        jq -e 'any(.[]; .name == "amd64-worker" and .state == "ready" and .resources.arch == "x86_64")' "$W/workers-amd64.json"
    log "amd64-worker reports: $(jq -c '.[] | select(.name == "amd64-worker") | .resources | {arch, cgroup, namespaces}' "$W/workers-amd64.json" 2>/dev/null)"
    worker_sandbox_probe "$R"
    cat >"$R/root/hello.toml" <<'EOF'
name = "hello"
command = ["sh", "-c", "echo \"hello from $(uname -m), pid $$\""]
[limits]
wall_time = "60s"
EOF
    if ct timeout 120 drover submit /root/hello.toml --follow "${op[@]}" >"$W/task-amd64.out" 2>&1 &&
        grep -q "hello from x86_64, pid 2" "$W/task-amd64.out"; then
        pass "a task runs on the packaged worker, in its sandbox (pid 2 of its own pid namespace)"
    else
        sed 's/^/    /' "$W/task-amd64.out"
        fail "a task runs on the packaged worker"
    fi

    log "amd64: upgrade drover to $V2 with an edited conffile"
    pid_before=$(ct systemctl show -p MainPID --value drover.service)
    ct dpkg -i "/root/debs/drover_${V2}_amd64.deb" </dev/null >"$W/dpkg-amd64-2.log" 2>&1 ||
        { cat "$W/dpkg-amd64-2.log"; fail "dpkg -i drover_${V2}_amd64.deb"; }
    check "drover is at $V2" test "$(ct dpkg-query -W -f '${Version}' drover)" = "$V2"
    check "the edited conffile survived the upgrade" \
        grep -q "^# local edit: this line must survive upgrades" "$R/etc/drover/coordinator.toml"
    check "... and its edited value too" grep -q "^listen = \"127.0.0.1:$port\"" "$R/etc/drover/coordinator.toml"
    check "no .dpkg-dist or .dpkg-new copy was left" \
        test -z "$(ls "$R"/etc/drover/*.dpkg-* 2>/dev/null)"
    pid_after=$(ct systemctl show -p MainPID --value drover.service)
    check "drover.service active again after the upgrade" test "$(ct systemctl is-active drover.service)" = active
    check "drover.service was restarted by the upgrade (pid $pid_before -> $pid_after)" \
        test "$pid_after" != "$pid_before" -a "$pid_after" != 0
    check "drover status answers after the upgrade" ct drover status "${op[@]}" --json
    check "the worker reconnected to the restarted coordinator" worker_ready amd64-worker "${op[@]}"

    log "amd64: purge"
    ct dpkg --purge drover-worker >"$W/dpkg-amd64-pw.log" 2>&1 || { cat "$W/dpkg-amd64-pw.log"; fail "dpkg --purge drover-worker"; }
    check "purging drover-worker removed /var/lib/drover-worker and worker.toml" \
        test ! -e "$R/var/lib/drover-worker" -a ! -e "$R/etc/drover/worker.toml"
    ct dpkg --purge drover >"$W/dpkg-amd64-p.log" 2>&1 || { cat "$W/dpkg-amd64-p.log"; fail "dpkg --purge drover"; }
    check "after purge drover.service is gone" \
        test "$(prop drover.service LoadState) $(prop drover.service ActiveState)" = "not-found inactive"
    check "after purge no drover process runs" no_process drover
    check "purge removed /var/lib/drover, coordinator.toml and /usr/bin/drover" \
        test ! -e "$R/var/lib/drover" -a ! -e "$R/etc/drover/coordinator.toml" -a ! -e "$R/usr/bin/drover"
    check "purge left the operator's certificates in /etc/drover/tls" test -f "$R/etc/drover/tls/ca.crt"
}

# Inside drover-worker.service's sandbox (the packaged unit with only Type and ExecStart
# replaced), check what the task sandbox will need: namespaces as root and in a user
# namespace, and cgroups of its own under the delegated subtree.
worker_sandbox_probe() { # $1 = root
    local R=$1
    mkdir -p "$R/usr/local/sbin"
    cat >"$R/usr/local/sbin/drover-probe" <<'EOF'
#!/bin/sh
exec >/var/lib/drover-worker/probe.txt 2>&1
grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
unshare --pid --mount --net --uts --ipc --fork --mount-proc sh -c 'hostname task-1 && [ "$(hostname)" = task-1 ] && [ "$$" = 1 ]' &&
    echo "OK namespaces as root: pid mount net uts ipc, private /proc, own hostname" || echo "FAIL namespaces as root"
# The other way the sandbox may go: drop to an unprivileged uid, then a user namespace
# in which the task is root (mapping host root itself would need CAP_SETFCAP).
setpriv --reuid=65534 --regid=65534 --clear-groups \
    unshare --user --map-root-user --pid --mount --net --uts --ipc --fork true &&
    echo "OK namespaces in a user namespace, from an unprivileged uid" || echo "FAIL namespaces in a user namespace"
cg2=$(sed -n 's/^0:://p' /proc/self/cgroup)
for base in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    [ -f "$base/cgroup.procs" ] && [ "$(stat -f -c %T "$base")" = cgroup2fs ] || continue
    d="$base$cg2/probe-task"
    # A delegated subtree: the service's processes move to a leaf first, then tasks get theirs.
    mkdir -p "$base$cg2/supervisor" "$d" && echo $$ >"$base$cg2/supervisor/cgroup.procs" &&
        sh -c 'echo $$ > "$1/cgroup.procs" && exec true' _ "$d" && rmdir "$d" &&
        echo "OK cgroup2 subtree at $base$cg2" || echo "FAIL cgroup2 subtree at $base$cg2"
    break
done
mem=$(sed -n 's/^[0-9]*:memory:\(.*\)/\1/p' /proc/self/cgroup)
if [ -n "$mem" ] && [ -d "/sys/fs/cgroup/memory$mem" ]; then
    d="/sys/fs/cgroup/memory$mem/probe-task"
    # systemd-nspawn mounts the v1 controllers read-only in a container: only informative.
    mkdir "$d" && echo $((64 << 20)) >"$d/memory.limit_in_bytes" && rmdir "$d" &&
        echo "OK cgroup v1 memory child at /sys/fs/cgroup/memory$mem" ||
        echo "NOTE no cgroup v1 memory child (read-only in a container)"
fi
EOF
    chmod 755 "$R/usr/local/sbin/drover-probe"
    sed -e 's|^ExecStart=.*|ExecStart=/usr/local/sbin/drover-probe|' -e 's|^Type=notify|Type=oneshot|' \
        -e '/^WatchdogSec=/d' -e '/^ConditionPathExists=/d' \
        "$R/lib/systemd/system/drover-worker.service" >"$R/etc/systemd/system/drover-worker-probe.service"
    ct systemctl daemon-reload
    ct systemctl start drover-worker-probe.service || true
    sed 's/^/    probe: /' "$R/var/lib/drover-worker/probe.txt" 2>/dev/null || true
    check "worker sandbox: namespaces as root" grep -q "^OK namespaces as root" "$R/var/lib/drover-worker/probe.txt"
    check "worker sandbox: a task cgroup under the delegated subtree" grep -q "^OK cgroup" "$R/var/lib/drover-worker/probe.txt"
    check "worker sandbox: a user namespace from an unprivileged uid" \
        grep -q "^OK namespaces in a user namespace" "$R/var/lib/drover-worker/probe.txt"
    rm -f "$R/etc/systemd/system/drover-worker-probe.service" "$R/usr/local/sbin/drover-probe"
    ct systemctl daemon-reload
}

# ---------------------------------------------------------------- 3. arm64
arm64_test() {
    local R="$W/root-arm64" port tarball
    if ! binfmt_arm64; then
        banner "arm64 part SKIPPED: cannot register qemu-aarch64 with binfmt_misc"
        return
    fi
    tarball=$(ensure_root arm64) || { banner "arm64 part SKIPPED: debootstrap cannot build an arm64 root"; return; }
    unpack_root "$tarball" "$R"

    log "arm64: coordinator on the host"
    make_pki "$W/pki-arm64"
    mkdir -p "$W/host-coord"
    issue "$W/pki-arm64" coordinator coordinator "$W/host-coord"
    issue "$W/pki-arm64" operator ci-operator "$W/host-coord"
    issue "$W/pki-arm64" worker arm64-worker "$W/pki-arm64/w"
    port=$(free_udp_port)
    cat >"$W/host-coord/coordinator.toml" <<EOF
listen = "127.0.0.1:$port"
state_dir = "state"
[tls]
ca = "$W/pki-arm64/ca/ca.crt"
cert = "coordinator.crt"
key = "coordinator.key"
EOF
    "$HOST_DROVER" serve --config "$W/host-coord/coordinator.toml" >"$W/host-coord.log" 2>&1 &
    HOST_COORD_PID=$!
    local op=(--coordinator "127.0.0.1:$port" --ca "$W/pki-arm64/ca/ca.crt"
        --cert "$W/host-coord/ci-operator.crt" --key "$W/host-coord/ci-operator.key")
    local i
    for i in $(seq 1 50); do "$HOST_DROVER" status "${op[@]}" >/dev/null 2>&1 && break; sleep 0.2; done
    check "host coordinator answers on 127.0.0.1:$port" "$HOST_DROVER" status "${op[@]}"

    mkdir -p "$R/root/debs"
    cp "$DEBS/drover-worker_${V1}_arm64.deb" "$R/root/debs/"
    boot arm64 "$R" || { fail "arm64 root boots"; return; }
    check "the arm64 root runs aarch64 code" test "$(ct uname -m)" = aarch64
    log "arm64: install drover-worker $V1"
    ct dpkg -i "/root/debs/drover-worker_${V1}_arm64.deb" >"$W/dpkg-arm64.log" 2>&1 ||
        { cat "$W/dpkg-arm64.log"; fail "dpkg -i drover-worker_${V1}_arm64.deb"; return; }
    check "without certificates drover-worker.service is skipped: inactive, not failed" \
        test "$(skipped_state drover-worker.service)" = "inactive success no"
    cp "$W/pki-arm64/ca/ca.crt" "$R/etc/drover/tls/ca.crt"
    install -m 0600 "$W/pki-arm64/w/arm64-worker.crt" "$R/etc/drover/tls/worker.crt"
    install -m 0600 "$W/pki-arm64/w/arm64-worker.key" "$R/etc/drover/tls/worker.key"
    sed -i "s|^# coordinator = .*|coordinator = \"127.0.0.1:$port\"|" "$R/etc/drover/worker.toml"
    cgroups_writable_for_tasks
    ct systemctl start drover-worker.service || true
    check "drover-worker.service active in the arm64 root (registered)" \
        test "$(ct systemctl is-active drover-worker.service)" = active
    "$HOST_DROVER" workers "${op[@]}" --json >"$W/workers-arm64.json" 2>&1 || true
    check "arm64-worker appears in drover workers --json, ready, with arch aarch64" \
        jq -e 'any(.[]; .name == "arm64-worker" and .state == "ready" and .resources.arch == "aarch64")' "$W/workers-arm64.json"
    log "arm64-worker reports: $(jq -c '.[] | select(.name == "arm64-worker") | .resources | {arch, os, kernel, cgroup, namespaces}' "$W/workers-arm64.json" 2>/dev/null)"
    "$HOST_DROVER" workers "${op[@]}" | sed 's/^/    /' || true
    ct journalctl -u drover-worker.service -o json --no-pager >"$W/journal-worker.json" 2>/dev/null || true
    check "the worker logs to the journal with structured fields (WORKER=arm64-worker)" \
        jq -s -e 'any(.[]; .WORKER == "arm64-worker" and .SYSLOG_IDENTIFIER == "drover-worker")' "$W/journal-worker.json"
    # Under qemu-user the worker cannot create namespaces (qemu's own threads make unshare
    # fail), so there the task asks for process isolation; on a real ARM box it needs none.
    local isolation=sandbox
    if jq -e 'any(.[]; .name == "arm64-worker" and .resources.namespaces == false)' "$W/workers-arm64.json" >/dev/null; then
        isolation=process
        log "arm64: no namespaces under emulation: the task uses isolation = \"process\""
    fi
    cat >"$W/arm.toml" <<EOF
name = "arm"
command = ["uname", "-m"]
isolation = "$isolation"
[requirements]
arch = "aarch64"
[limits]
wall_time = "60s"
EOF
    if timeout 180 "$HOST_DROVER" submit "$W/arm.toml" --follow "${op[@]}" >"$W/task-arm64.out" 2>&1 &&
        grep -qw aarch64 "$W/task-arm64.out"; then
        pass "a task requiring arch aarch64 ran on arm64-worker and printed uname -m = aarch64"
    else
        fail "a task requiring arch aarch64 runs on arm64-worker"
    fi
    sed 's/^/    /' "$W/task-arm64.out"
}

T_AMD=$(date +%s)
amd64_test
log "amd64 part took $(( $(date +%s) - T_AMD ))s"
T_ARM=$(date +%s)
arm64_test
log "arm64 part took $(( $(date +%s) - T_ARM ))s"
finish
