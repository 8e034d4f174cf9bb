"""Shared fixtures: the embedded demo assets and a store built from them, once per session."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from stride.config import BuildConfig
from stride.demo import one_thread, write_demo_assets
from worker.build import build

# STRIDE_TEST_DEMO=demo reuses `make demo`'s assets and store instead of making them again (about
# 95 s of CPU): for iterating on tests that do not touch stride/demo.py or the build; CI never sets it.
REUSE = os.environ.get("STRIDE_TEST_DEMO")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if REUSE:
        return Path(REUSE).resolve()
    out = tmp_path_factory.mktemp("demo")
    write_demo_assets(out)
    return out


@pytest.fixture(scope="session")
def demo_store(demo_dir: Path) -> Path:
    """A store built with the demo's build options (``build.json``): what `make demo` serves. The one
    store of the session: a test that needs a served store takes this one rather than building its own."""
    if REUSE:
        return demo_dir / "store"
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


# --- a real server process: `stride serve` on the session's demo store ---------------------------


class LiveServer:
    """``stride serve`` in its own process on a free port (the way it is deployed), its stderr kept
    in a file; up once /readyz answers 200."""

    def __init__(self, store: Path, log: Path, **env: str) -> None:
        import os
        import shutil
        import subprocess
        import sys
        import time
        import urllib.request

        self.port, self.log = _free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("stride", path=str(Path(sys.executable).parent)) or "stride"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")}
        self.proc = subprocess.Popen(
            [exe, "serve", "--store", str(store), "--port", str(self.port)],
            env={**clean, "STRIDE_DEVICE": "cpu", "STRIDE_TORCH_THREADS": "1", **env},
            stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        )
        deadline = time.monotonic() + 300  # model load, sha256 of the store, warm-up; minutes on a loaded CPU
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stride serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"stride serve not ready in 300 s:\n{log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        """SIGTERM (a graceful drain), then the exit status."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def live_server(demo_store: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> object:
    """A keyed server with the Redis cache, shared by the fuzz and hardening tests."""
    server = LiveServer(demo_store, tmp_path_factory.mktemp("serve") / "stderr.log", STRIDE_API_KEYS="test-key",
                        STRIDE_REDIS_URL=redis_url, STRIDE_CACHE_NAMESPACE="live")
    server.key = "test-key"
    yield server
    server.stop()
