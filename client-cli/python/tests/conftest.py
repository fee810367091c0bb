import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import Cluster, WorkerProc  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    c = Cluster(3)
    try:
        c.start()
        os.environ["SCHED_ENDPOINTS"] = c.endpoints
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def app(cluster):
    import tasks_app  # its App() reads SCHED_ENDPOINTS, set by the cluster fixture

    assert tasks_app.app.endpoints == cluster.endpoints.split(",")
    return tasks_app.app


@pytest.fixture(scope="session")
def workers(cluster):
    ws = [WorkerProc(cluster, "tasks_app:app", "--concurrency", "8") for _ in range(2)]
    yield ws
    for w in ws:
        w.stop()
