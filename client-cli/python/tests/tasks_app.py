"""Tasks the tests submit and the worker processes run."""

import os
import time

from raftsched import App, current_task

app = App()


@app.task
def add(x, y=0):
    return x + y


@app.task
def tsum(xs):
    return sum(xs)


@app.task(max_attempts=1)
def boom(msg):
    raise ValueError(msg)


@app.task
def whoami():
    t = current_task()
    return {"id": t.id, "attempt": t.attempt, "fence": t.fence}


@app.task(max_attempts=1, timeout=1)
def sleepy(seconds):
    time.sleep(seconds)
    return "woke"


@app.task(max_attempts=3, retry_backoff=0)
def slow_marked(seconds, marker_dir):
    """Records each attempt (pid, fence) in marker_dir, then sleeps."""
    t = current_task()
    with open(os.path.join(marker_dir, f"{t.id}-{t.fence}-{os.getpid()}"), "w"):
        pass
    time.sleep(seconds)
    return t.attempt


@app.task(max_attempts=1)
def big(n):
    return "x" * n


@app.task(max_attempts=1)
def flaky_once(marker_dir):
    """Fails the first time it runs (leaving a marker), then returns its attempt number."""
    marker = os.path.join(marker_dir, "ran-once")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first run fails")
    return current_task().attempt


@app.task
def pid():
    return os.getpid()


@app.task(cpu=2, mem=64)
def needs_two_cpus():
    return "ran"


@app.task(cpu="500m", mem="64Mi", resources={"gpu": 1}, labels={"zone": "eu"})
def fits_small_worker():
    return "ran"
