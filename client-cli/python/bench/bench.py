#!/usr/bin/env python3
"""End-to-end benchmark of the Python SDK against a fresh local 3-node cluster.

Starts 3 schedulerd (built with `cargo build --release`) on free loopback ports and two
`python -m raftsched worker` processes, then measures:
  1. N no-op tasks: delay() in a loop (submit rate), then get() on all (end-to-end tasks/s),
  2. a chain of L steps submitted as one DAG: per-step latency.
Everything it starts is stopped at exit.

Usage: python3 bench/bench.py [--n 20000] [--chain 200] [--concurrency 8]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--chain", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    c = Cluster(3)
    ws = []
    try:
        c.start()
        os.environ["SCHED_ENDPOINTS"] = c.endpoints
        env = {"PYTHONPATH": HERE}
        ws = [WorkerProc(c, "noop_app:app", "--concurrency", str(a.concurrency), env=env)
              for _ in range(2)]
        import noop_app
        from raftsched import chain
        noop_app.noop.delay(0).get(timeout=60)  # warm up: workers registered, channels open

        t0 = time.perf_counter()
        rs = [noop_app.noop.delay(i) for i in range(a.n)]
        t_loop = time.perf_counter() - t0
        ids = [r.id for r in rs]
        t_ack = time.perf_counter() - t0
        for r in rs:
            r.get(timeout=600)
        t_all = time.perf_counter() - t0
        assert len(set(ids)) == a.n
        print(f"raftsched noop: n={a.n} delay() loop {a.n / t_loop:.0f}/s, "
              f"acknowledged {a.n / t_ack:.0f}/s, end-to-end {a.n / t_all:.0f} tasks/s")

        t0 = time.perf_counter()
        r = chain(*[noop_app.step.s(0)] + [noop_app.step.s() for _ in range(a.chain - 1)]).delay()
        assert r.get(timeout=600) == a.chain
        dt = time.perf_counter() - t0
        print(f"raftsched chain: {a.chain} steps in {dt:.2f}s, {dt / a.chain * 1000:.2f} ms/step")
    finally:
        for w in ws:
            w.stop()
        c.stop()


if __name__ == "__main__":
    main()
