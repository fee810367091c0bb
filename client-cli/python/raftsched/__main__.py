"""``python -m raftsched worker MODULE:APP [--queue Q ...] [--concurrency N] [--pool ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .worker import Worker, load_app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftsched")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run the tasks of MODULE:APP")
    w.add_argument("app", metavar="MODULE:APP")
    w.add_argument("--queue", "-Q", action="append", dest="queues",
                   help="queue to take work from (repeat; default: default)")
    w.add_argument("--concurrency", "-c", type=int, default=0, help="parallel attempts")
    w.add_argument("--pool", choices=("threads", "processes"), default="threads")
    w.add_argument("--id", dest="worker_id", default=None, help="worker id (default: generated)")
    w.add_argument("--drain-grace", type=float, default=30.0,
                   help="seconds held tasks may take after SIGTERM")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RAFTSCHED_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.concurrency < 0:
        p.error("--concurrency must be >= 0")
    app = load_app(args.app)
    Worker(app, app_spec=args.app, queues=args.queues, concurrency=args.concurrency,
           pool=args.pool, worker_id=args.worker_id, drain_grace=args.drain_grace).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
