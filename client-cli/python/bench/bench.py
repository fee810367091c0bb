#!/usr/bin/env python3
"""End-to-end benchmark of the Python SDK against a fresh local 3-node cluster.

Starts 3 schedulerd (built with `cargo build --release`) on free loopback ports and
`--workers` `python -m raftsched worker` processes, then measures:
  1. N no-op tasks: delay() in a loop (submit rate), then get() on all (end-to-end tasks/s),
  2. a chain of L steps submitted as one DAG: per-step latency.
It also prints the CPU seconds each process spent in phase 1 (client, workers, nodes), which
says where the time goes on a shared machine. Everything it starts is stopped at exit.

Usage: python3 bench/bench.py [--n 20000] [--chain 200] [--concurrency 256] [--workers 2]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from cluster import Cluster, WorkerProc  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--chain", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=256, help="threads per worker process")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    a = ap.parse_args()
    c = Cluster(3)
    ws = []
    try:
        c.start()
        os.environ["SCHED_ENDPOINTS"] = c.endpoints
        env = {"PYTHONPATH": HERE}
        ws = [WorkerProc(c, "noop_app:app", "--concurrency", str(a.concurrency), env=env)
              for _ in range(a.workers)]
        import noop_app
        from raftsched import chain
        # Warm up: workers registered, channels open, the result waiter running.
        [r.get(timeout=60) for r in [noop_app.noop.delay(i) for i in range(200)]]

        pids = {"client": os.getpid(), **{f"worker{i + 1}": w.proc.pid for i, w in enumerate(ws)},
                **{f"node{i}": p.pid for i, p in c.procs.items()}}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        rs = [noop_app.noop.delay(i) for i in range(a.n)]
        t_loop = time.perf_counter() - t0
        ids = [r.id for r in rs]
        t_ack = time.perf_counter() - t0
        for r in rs:
            r.get(timeout=600)
        t_all = time.perf_counter() - t0
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        assert len(set(ids)) == a.n
        print(f"raftsched noop: n={a.n} delay() loop {a.n / t_loop:.0f}/s, "
              f"acknowledged {a.n / t_ack:.0f}/s, end-to-end {a.n / t_all:.0f} tasks/s")
        print(f"raftsched cpu: {t_all:.2f}s wall; " + ", ".join(
            f"{k} {v:.2f}s ({v / a.n * 1e6:.0f} us/task)" for k, v in cpu.items()))

        if a.chain > 0:
            t0 = time.perf_counter()
            steps = [noop_app.step.s(0)] + [noop_app.step.s() for _ in range(a.chain - 1)]
            r = chain(*steps).delay()
            assert r.get(timeout=600) == a.chain
            dt = time.perf_counter() - t0
            print(f"raftsched chain: {a.chain} steps in {dt:.2f}s, "
                  f"{dt / a.chain * 1000:.2f} ms/step")
    finally:
        for w in ws:
            w.stop()
        c.stop()


if __name__ == "__main__":
    main()
