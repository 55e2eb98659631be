#!/usr/bin/env bash
# The worker's footprint: the size of the stripped release drover-worker binary, and the idle
# memory of a real drover-worker registered to a real coordinator on loopback.
#
# Usage: tests/bench/worker_footprint.sh [IDLE_SECONDS]   (default 30)
#
# Needs release builds: cargo build --release -p drover-coordinator -p drover-worker-agent
# (the release profile strips symbols). Honours CARGO_TARGET_DIR; override the binaries with
# DROVER=... DROVER_WORKER=...
# Starts its own coordinator and worker in a temporary directory, with the default heartbeat
# interval and lease, waits until `drover status --json` shows the worker ready, lets it
# heartbeat for IDLE_SECONDS, reads VmRSS / VmHWM / RssAnon / RssFile from
# /proc/PID/status, and the Pss of the worker and its spawner, then stops both with SIGTERM.
set -euo pipefail

idle=${1:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
drover=${DROVER:-$target/release/drover}
worker_bin=${DROVER_WORKER:-$target/release/drover-worker}
for b in "$drover" "$worker_bin"; do
    if [[ ! -x $b ]]; then
        echo "worker_footprint: no binary at $b; run: cargo build --release -p drover-coordinator -p drover-worker-agent" >&2
        exit 1
    fi
done

dir=$(mktemp -d /tmp/drover-footprint.XXXXXX)
coord_pid=
worker_pid=
cleanup() {
    for pid in $worker_pid $coord_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $worker_pid $coord_pid; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 30000)))
addr=127.0.0.1:$port

"$drover" tls ca create --dir "$dir/tls" --name footprint >/dev/null
"$drover" tls cert create --role coordinator --name coordinator --ca-dir "$dir/tls" >/dev/null
"$drover" tls cert create --role operator --name operator --ca-dir "$dir/tls" >/dev/null
"$drover" tls cert create --role worker --name footprint-worker --ca-dir "$dir/tls" >/dev/null

cat >"$dir/coordinator.toml" <<EOF
listen = "$addr"
state_dir = "state"
[tls]
ca = "tls/ca.crt"
cert = "tls/coordinator.crt"
key = "tls/coordinator.key"
EOF
cat >"$dir/worker.toml" <<EOF
coordinator = "$addr"
work_dir = "work"
[tls]
ca = "tls/ca.crt"
cert = "tls/footprint-worker.crt"
key = "tls/footprint-worker.key"
EOF

export -n NOTIFY_SOCKET JOURNAL_STREAM 2>/dev/null || true
"$drover" serve --config "$dir/coordinator.toml" >"$dir/coordinator.log" 2>&1 &
coord_pid=$!
"$worker_bin" --config "$dir/worker.toml" >"$dir/worker.log" 2>&1 &
worker_pid=$!

status() {
    "$drover" status --json --coordinator "$addr" --ca "$dir/tls/ca.crt" \
        --cert "$dir/tls/operator.crt" --key "$dir/tls/operator.key" 2>/dev/null
}
for _ in $(seq 1 100); do
    if status | grep -q '"ready": 1'; then
        break
    fi
    sleep 0.2
done
if ! status | grep -q '"ready": 1'; then
    echo "worker_footprint: the worker did not become ready; logs:" >&2
    cat "$dir/coordinator.log" "$dir/worker.log" >&2
    exit 1
fi

echo "worker registered (pid $worker_pid); idling ${idle}s" >&2
sleep "$idle"
if ! status | grep -q '"ready": 1'; then
    echo "worker_footprint: the worker is no longer ready after ${idle}s" >&2
    exit 1
fi

field() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$worker_pid/status"; }
mib() { awk -v v="$1" -v d="$2" 'BEGIN { printf "%.2f", v / d }'; }
size=$(stat -c %s "$worker_bin")
stripped=$(file -b "$worker_bin" 2>/dev/null | grep -o 'not stripped\|stripped' | head -n1 || true)
rss=$(field VmRSS) hwm=$(field VmHWM)
echo "drover-worker binary    $worker_bin: $size bytes ($(mib "$size" 1048576) MiB, ${stripped:-strip state unknown})"
echo "worker idle VmRSS       $rss KiB ($(mib "$rss" 1024) MiB) after ${idle}s registered"
echo "worker VmHWM            $hwm KiB ($(mib "$hwm" 1024) MiB)"
echo "worker RssAnon/RssFile  $(field RssAnon) / $(field RssFile) KiB"
echo "worker threads          $(field Threads)"
# The spawner (worker-agent/src/sandbox/spawner.rs) is forked from the worker and shares its
# pages; Pss splits shared pages between the two, so their Pss sum is the pair's footprint.
pss() { awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup"; }
total_pss=$(pss "$worker_pid")
for child in $(cat "/proc/$worker_pid/task/"*/children 2>/dev/null); do
    crss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$child/status")
    echo "child $child ($(cat "/proc/$child/comm"))  VmRSS $crss KiB, Pss $(pss "$child") KiB"
    total_pss=$((total_pss + $(pss "$child")))
done
echo "worker + children Pss   $total_pss KiB ($(mib "$total_pss" 1024) MiB)"
