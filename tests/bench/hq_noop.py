#!/usr/bin/env python3
"""No-op task throughput of HyperQueue, the peer drover's task path is measured against.

Starts a HyperQueue server and one worker with CORES cores (hyperqueue.cluster.LocalCluster,
both in this process), submits one job of TASKS program tasks running --program (default
`true`; each asks for one core, HyperQueue's default, so CORES run at once), and times from
just before the submit to the moment the job is finished. stdout/stderr of every task go to
files in a temporary directory (HyperQueue's default), as drover captures them as events.

When the job finished: HyperQueue's client learns it by polling about once a second
(`wait_for_jobs`), which would round its time up by up to a second. So the end is taken from
the task output files instead: each task's stdout file is created as the task starts, and the
newest one's modification time (CLOCK_REALTIME, as the start stamp) is the last task's start.
That end is a little early (by the no-op's own run time, about a millisecond for `true` on
the build machines), which favours HyperQueue. `polled_s` keeps the client's own figure.

The machine's CPU over the same window: a thread samples /proc/stat every 10 ms, and the
window ends at the first sample after the end above (so the client's last poll, the output
scan and the teardown are not in it). `machine_busy_cores` is that CPU over that window's
length; `machine_cpu_s` the CPU itself, every process's (other tenants' included). The
sampler itself costs about 13 us of CPU per sample here, about 0.1 % of a core.

Where: the server and task files go to a fresh directory under --dir, by default /dev/shm (a
tmpfs) when there is one. On this project's build machines /tmp is ext4 without a journal,
where creating a file is slow for a minute after many were deleted (ext4 skips recently
freed inodes), so one run's clean-up would slow the next; tmpfs has no such cost, which again
favours HyperQueue.

Prints one JSON object: {"tasks", "cores", "program", "submit_s", "total_s", "polled_s",
"tasks_per_s", "machine_busy_cores", "machine_cpu_s", "hq_version"}.
Used by `task-bench throughput` (tests/src/bin/task_bench.rs); runnable alone:

    pip install hyperqueue
    python3 tests/bench/hq_noop.py --tasks 2000 --cores 2
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path


def machine_jiffies() -> tuple[int, int]:
    """Busy and total jiffies of the whole machine (the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


class CpuSampler:
    """Samples (time, busy, total) every 10 ms on a thread until stopped."""

    def __init__(self) -> None:
        self.samples = [(time.time(), *machine_jiffies())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.samples.append((time.time(), *machine_jiffies()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), *machine_jiffies()))

    def window(self, start: float, end: float) -> tuple[float, float]:
        """(busy cores, CPU seconds) from the last sample at or before `start` to the first
        at or after `end`."""
        first = max((s for s in self.samples if s[0] <= start), key=lambda s: s[0])
        last = min((s for s in self.samples if s[0] >= end), key=lambda s: s[0])
        busy, total = last[1] - first[1], max(last[2] - first[2], 1)
        return busy / total * (os.cpu_count() or 1), busy / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="no-op tasks to run")
    parser.add_argument("--cores", type=int, default=2, help="cores of the one worker")
    parser.add_argument(
        "--program", default="true", help="the no-op each task runs (default true)"
    )
    parser.add_argument(
        "--dir",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where to make the run's directory (default /dev/shm when present, else $TMPDIR)",
    )
    args = parser.parse_args()
    if args.tasks < 1 or args.cores < 1:
        print("hq_noop.py: --tasks and --cores must be at least 1", file=sys.stderr)
        return 2
    try:
        from hyperqueue import Job
        from hyperqueue.cluster import LocalCluster, WorkerConfig
    except ImportError as e:
        print(f"hq_noop.py: {e}; install HyperQueue with `pip install hyperqueue`", file=sys.stderr)
        return 69

    with tempfile.TemporaryDirectory(prefix="hq-noop-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        (tmp / "server").mkdir()
        (tmp / "work").mkdir()
        with LocalCluster(server_dir=str(tmp / "server")) as cluster:
            cluster.start_worker(WorkerConfig(cores=args.cores))
            client = cluster.client()
            job = Job(default_workdir=str(tmp / "work"))
            for _ in range(args.tasks):
                job.program([args.program])
            sampler = CpuSampler()
            start = time.time()
            submitted = client.submit(job)
            submit_s = time.time() - start
            ok = client.wait_for_jobs([submitted], raise_on_error=False)
            polled_s = time.time() - start
            sampler.stop()
            if not ok:
                print("hq_noop.py: some HyperQueue tasks failed", file=sys.stderr)
                return 1
            outputs = list((tmp / "work").rglob("*.stdout"))
            if len(outputs) != args.tasks:
                print(
                    f"hq_noop.py: {len(outputs)} task output files, expected {args.tasks}",
                    file=sys.stderr,
                )
                return 1
            total_s = max(p.stat().st_mtime for p in outputs) - start
            busy_cores, cpu_s = sampler.window(start, start + total_s)
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "cores": args.cores,
                "program": args.program,
                "submit_s": submit_s,
                "total_s": total_s,
                "polled_s": polled_s,
                "tasks_per_s": args.tasks / total_s,
                "machine_busy_cores": busy_cores,
                "machine_cpu_s": cpu_s,
                "hq_version": version("hyperqueue"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
