"""Shared fixtures: the embedded demo assets and a store built from them, once per session."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from stride.config import BuildConfig
from stride.demo import one_thread, write_demo_assets
from worker.build import build


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_assets(out)
    return out


@pytest.fixture(scope="session")
def demo_store(demo_dir: Path) -> Path:
    """A store built with the demo's build options (``build.json``): what `make demo` serves. The one
    store of the session: a test that needs a served store takes this one rather than building its own."""
    logging.getLogger("stride").setLevel(logging.WARNING)
    config = BuildConfig.from_dict(json.loads((demo_dir / "build.json").read_text()))
    with one_thread():
        return build(demo_dir / "model", demo_dir / "corpus.jsonl", demo_dir / "store", config, show_progress=False)


# --- service tests: a real Redis --------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on a free port; tests may stop it (Redis down mid-test)."""

    def __init__(self) -> None:
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (.ci/run installs the Debian package)")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_timeout=0.5)
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url() -> object:
    """STRIDE_TEST_REDIS_URL when set, else a redis-server this session starts and stops."""
    import os

    url = os.environ.get("STRIDE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.fixture()
def private_redis() -> object:
    """A redis-server owned by one test, which may stop it."""
    server = RedisServer()
    yield server
    server.stop()
