"""``python -m raftsched worker MODULE:APP [--queue Q ...] [--concurrency N] [--pool ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, TypeVar

from ._quantity import parse_cpu_milli, parse_key_count, parse_key_value, parse_mem_mib
from .worker import Worker, WorkerRefused, load_app

T = TypeVar("T")


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    def run(s: str) -> T:
        try:
            return parse(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    run.__name__ = parse.__name__
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftsched")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run the tasks of MODULE:APP")
    w.add_argument("app", metavar="MODULE:APP")
    w.add_argument("--queue", "-Q", action="append", dest="queues",
                   help="queue to take work from (repeat; default: default)")
    w.add_argument("--concurrency", "-c", type=int, default=0,
                   help="attempts run at the same time (default: 4 per CPU for threads, "
                        "1 per CPU for processes)")
    w.add_argument("--pool", choices=("threads", "processes"), default="threads")
    w.add_argument("--max-tasks-per-child", type=int, default=0, metavar="N",
                   help="processes pool: replace a child after N attempts (default 0: never)")
    w.add_argument("--cpu", type=_arg(parse_cpu_milli), default=None, metavar="CPU",
                   help="CPU offered: cores (2, 0.5) or millicores (500m) "
                        "(default: one core per CPU)")
    w.add_argument("--mem", type=_arg(parse_mem_mib), default=None, metavar="SIZE",
                   help="memory offered: MiB (512) or with a unit (2GiB, 512Mi, 1G) "
                        "(default: the machine's)")
    w.add_argument("--resource", type=_arg(parse_key_count), action="append", default=[],
                   dest="resources", metavar="NAME=N",
                   help="a named resource offered (repeat), e.g. gpu=2")
    w.add_argument("--label", type=_arg(parse_key_value), action="append", default=[],
                   dest="labels", metavar="K=V",
                   help="a label offered to tasks that require it (repeat), e.g. zone=eu")
    w.add_argument("--id", dest="worker_id", default=None,
                   help="worker id (default: SCHED_WORKER_ID, else generated)")
    w.add_argument("--drain-grace", type=float, default=30.0,
                   help="seconds held tasks may take after SIGTERM")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RAFTSCHED_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.concurrency < 0:
        p.error("--concurrency must be >= 0")
    if args.max_tasks_per_child < 0:
        p.error("--max-tasks-per-child must be >= 0")
    app = load_app(args.app)
    try:
        Worker(app, app_spec=args.app, queues=args.queues, concurrency=args.concurrency,
               pool=args.pool, worker_id=args.worker_id, drain_grace=args.drain_grace,
               labels=dict(args.labels), cpu=args.cpu, mem=args.mem,
               resources=dict(args.resources),
               max_tasks_per_child=args.max_tasks_per_child).run()
    except WorkerRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
