"""Fixtures starting the real stack: redis-server, Orthanc, `her2 listen` and a Celery worker.

Every test gets fresh servers on free loopback ports under its own tmp dir
(Redis is shared per session and flushed per test). Nothing is installed at
test time; missing binaries fail the test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from pacs_stack import Orthanc, Redis, Server, free_port, her2, port_open, service_env, wait_until


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = Redis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@dataclass
class Stack:
    root: Path
    redis: Redis
    listener_port: int
    orthanc: Orthanc
    servers: list[Server]

    def env(self, **extra: str) -> dict[str, str]:
        return service_env(self.redis, self.root, self.listener_port, self.orthanc.dicom_port, **extra)

    def start_listener(self, **extra: str) -> Server:
        port = int(extra.setdefault("HER2_LISTENER_METRICS_PORT", str(free_port())))
        server = Server("her2 listen", her2("listen"), self.root / "listener.log", self.env(**extra)).start()
        server.metrics_port = port
        self.servers.append(server)
        wait_until(lambda: server.check_alive() or port_open(self.listener_port), 60, "the listener's port")
        return server

    def start_embedded(self) -> Server:
        """`her2 serve --embedded`, with Redis URLs pointing nowhere to prove it needs none."""
        nowhere = f"redis://127.0.0.1:{free_port()}"
        server = Server("her2 serve --embedded", her2("serve", "--embedded"), self.root / "serve.log",
                        self.env(HER2_BROKER_URL=f"{nowhere}/0", HER2_RESULT_BACKEND=f"{nowhere}/1",
                                 HER2_STATE_REDIS_URL=f"{nowhere}/2")).start()
        self.servers.append(server)
        wait_until(lambda: server.check_alive() or port_open(self.listener_port), 60, "the embedded server's port")
        return server

    def start_worker(self, pool: str = "solo", index: int = 0, **extra: str) -> Server:
        """A Celery worker; give each of several workers its own ``index`` (node name, log file)."""
        suffix = f"-{index}" if index else ""
        port = int(extra.setdefault("HER2_WORKER_METRICS_PORT", str(free_port())))
        server = Server(f"her2 worker{suffix}",
                        her2("worker", "--pool", pool, "--hostname", f"her2-{self.listener_port}{suffix}@%h"),
                        self.root / f"worker{suffix}.log", self.env(**extra)).start()
        server.metrics_port = port
        self.servers.append(server)
        wait_until(lambda: server.check_alive() or "ready." in server.log(), 90, "the Celery worker to be ready")
        return server

    def job(self, series_uid: str) -> dict[str, str]:
        """Job status (state, reason) from Redis, or from the embedded server's state_dir."""
        found = self.redis.client(db=2).hgetall(f"her2:status:{series_uid}")
        embedded = self.root / "state" / "status" / f"{series_uid}.json"
        if not found and embedded.exists():
            found = json.loads(embedded.read_text())
        return found

    def job_state(self, series_uid: str) -> str | None:
        return self.job(series_uid).get("state")

    def logs(self) -> str:
        """Everything our processes (listener, worker) logged; Orthanc's own log is not ours."""
        return "\n".join(s.log() for s in self.servers if s is not self.orthanc)


def _started_stack(root: Path, redis: Redis, **orthanc_config):
    redis.client().flushall()
    listener_port = free_port()
    orthanc = Orthanc(root / "orthanc", listener_port, **orthanc_config).start()
    s = Stack(root, redis, listener_port, orthanc, [orthanc])
    yield s
    for server in reversed(s.servers):
        server.stop()


@pytest.fixture
def stack(tmp_path, redis_server):
    """Fresh Orthanc routing to our listener, flushed Redis; the test starts listener and worker itself."""
    yield from _started_stack(tmp_path, redis_server)


@pytest.fixture
def persistent_stack(tmp_path):
    """Like ``stack`` but with its own redis-server, append-only as in production, that a test may restart."""
    server = Redis(tmp_path / "redis", appendonly=True).start()
    yield from _started_stack(tmp_path, server)
    server.stop()


@pytest.fixture
def make_stack(tmp_path, redis_server):
    """Like ``stack``, but the test chooses the Redis server and Orthanc's options (e.g. DICOM TLS)."""
    started = []

    def make(redis: Redis | None = None, **orthanc_options) -> Stack:
        stack_gen = _started_stack(tmp_path, redis or redis_server, **orthanc_options)
        started.append(stack_gen)
        return next(stack_gen)

    yield make
    for stack_gen in started:
        for _ in stack_gen:
            pass


@pytest.fixture(scope="module")
def scoring_stack(tmp_path_factory, redis_server):
    """Orthanc + listener + Celery worker shared by a module's scoring tests (scoring is the slow part)."""
    for s in _started_stack(tmp_path_factory.mktemp("stack"), redis_server):
        s.start_listener()
        s.start_worker()
        yield s
