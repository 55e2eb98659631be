#!/usr/bin/env python3
"""How a no-op flood keeps its slots busy: when each no-op was forked, exec'd and exited.

Reads `perf script` output of the scheduler's process tracepoints, recorded machine-wide while
`task-bench throughput` (or anything else) runs no-ops, and prints for the programs whose exec
names PROGRAM (default `true`; `noop` for task-bench's static one):

- how many were seen, and the median and mean of fork → exec and exec → exit, ms;
- the share of the window during which 0, 1, 2, ... of them were running (exec → exit) and
  alive (fork → exit): with two slots, "2" is the time both slots ran a task;
- exit → the next exec of any of them (per exit), ms: a lower bound on how long a freed slot
  waits (the next start may be the other slot's).

Record and read (needs root or perf_event_paranoid <= -1):

    perf record -e sched:sched_process_fork,sched:sched_process_exec,sched:sched_process_exit \\
        -a -o /tmp/life.data -- sleep 2          # while the flood runs
    perf script -i /tmp/life.data -F comm,pid,tid,cpu,time,event,trace > /tmp/life.txt
    python3 tests/bench/noop_timeline.py /tmp/life.txt [--program true]

Used for docs/benchmarks.md ("eleventh round"); it measures, it asserts nothing.
"""

import argparse
import bisect
import collections
import re
import statistics
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)")


def parse(path: str, program: str):
    """(forks, execs, exits): pid -> time (s) for the no-ops, forks for every child."""
    forks, execs, exits = {}, {}, {}
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            comm, pid, _tid, _cpu, t, event, rest = m.groups()
            t, pid = float(t), int(pid)
            if event == "sched_process_fork":
                child = re.search(r"child_pid=(\d+)", rest)
                if child:
                    forks[int(child.group(1))] = t
            elif event == "sched_process_exec":
                name = re.search(r"filename=(\S+)", rest)
                if name and name.group(1).rsplit("/", 1)[-1] == program:
                    execs[pid] = t
            elif event == "sched_process_exit" and comm == program[:15]:
                exits[pid] = t
    return forks, execs, exits


def shares(starts, ends):
    """Share of the window (first start → last end) with n intervals open, per n."""
    points = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
    open_now, last, time_at = 0, points[0][0], collections.Counter()
    for t, step in points:
        time_at[open_now] += t - last
        last, open_now = t, open_now + step
    total = sum(time_at.values()) or 1.0
    return {n: round(v / total, 3) for n, v in sorted(time_at.items())}


def ms(values):
    return f"median {statistics.median(values) * 1e3:.3f}, mean {statistics.mean(values) * 1e3:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("script", help="perf script output (see above)")
    ap.add_argument("--program", default="true", help="the no-op's file name (default: true)")
    args = ap.parse_args()
    forks, execs, exits = parse(args.script, args.program)
    # A pid reused within the window would pair events of two processes: skip those.
    pids = [p for p in execs if p in exits and p in forks and forks[p] <= execs[p] <= exits[p]]
    if len(pids) < 2:
        print(f"noop_timeline: fewer than 2 complete runs of {args.program!r} in {args.script} "
              "(is the program's file name right, and was it written with "
              "`-F comm,pid,tid,cpu,time,event,trace`?)", file=sys.stderr)
        return 1
    print(f"{len(pids)} runs of {args.program}")
    print("fork -> exec, ms:", ms([execs[p] - forks[p] for p in pids]))
    print("exec -> exit, ms:", ms([exits[p] - execs[p] for p in pids]))
    print("running (exec -> exit), share of the window with n running:",
          shares([execs[p] for p in pids], [exits[p] for p in pids]))
    print("alive (fork -> exit), share of the window with n alive:",
          shares([forks[p] for p in pids], [exits[p] for p in pids]))
    starts = sorted(execs[p] for p in pids)
    gaps = []
    for end in sorted(exits[p] for p in pids):
        i = bisect.bisect_right(starts, end)
        if i < len(starts):
            gaps.append(starts[i] - end)
    print("exit -> next exec, ms:", ms(gaps) if gaps else "none (no exec after an exit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
