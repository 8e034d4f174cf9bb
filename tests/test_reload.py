"""Hot reload on a real uvicorn server with a real Redis: admin keys, a reload under 8 concurrent
clients (no failed request, answers switch to the new version, the cache never serves the old
one), a corrupt store refused while the old one keeps answering, and the watcher."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from stride.query import Attributor
from stride.store import load_store
from stride.update import UpdateConfig
from worker.update import update

QKEY, AKEY = "query-key-1", "admin-key-1"


@pytest.fixture(scope="module")
def versions(demo_dir: Path, demo_store: Path, tmp_path_factory) -> dict:
    """v1: the demo store; v2: it minus one document (a cheap refit); ``current`` -> v1."""
    root = tmp_path_factory.mktemp("reload")
    queries = [json.loads(x) for x in (demo_dir / "queries.jsonl").read_text().splitlines() if x.strip()]
    (root / "rm.txt").write_text(queries[0]["support"][0] + "\n")
    v2 = update(demo_store, root / "v2", remove=root / "rm.txt", config=UpdateConfig(steps=10), device="cpu",
                show_progress=False)
    current = root / "current"
    current.symlink_to(demo_store)
    return {"root": root, "v1": demo_store, "v2": v2, "current": current, "queries": queries,
            "v1_version": load_store(demo_store).version, "v2_version": load_store(v2).version}


def _point(link: Path, target: Path) -> None:
    """Flip a symlink atomically (what a deploy script does)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, settings: Settings, attributor: Attributor | None = None):
        import uvicorn

        self.port = _free_port()
        app = create_app(settings, attributor=attributor)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return self.client
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not get ready")

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _metric(client: httpx.Client, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("stride_store_reloads_total{") and f'result="{result}"' in line:
            return float(line.split()[-1])
    return 0.0


def _settings(versions: dict, redis_url: str, **kw) -> Settings:
    """A namespace of its own: a shared Redis may hold entries of an identical store from an earlier run."""
    return Settings(_env_file=None, store=versions["current"], redis_url=redis_url, api_keys=QKEY,
                    admin_keys=AKEY, cache_namespace=f"reload-test-{uuid.uuid4().hex}", **kw)


@pytest.fixture(scope="module")
def served(versions: dict, redis_url: str):
    _point(versions["current"], versions["v1"])
    with Server(_settings(versions, redis_url)) as client:
        yield client


def test_admin_keys_are_separate_from_query_keys(served: httpx.Client) -> None:
    r = served.post("/v1/admin/reload")
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    assert served.post("/v1/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
    r = served.post("/v1/admin/reload", headers={"Authorization": f"Bearer {QKEY}"})
    assert r.status_code == 403 and "query key" in r.json()["detail"]
    # and the admin key is no query key
    assert served.post("/v1/attribute", json={"prompt": "a b c"}, headers={"X-API-Key": AKEY}).status_code == 401
    r = served.post("/v1/admin/reload", headers={"X-API-Key": AKEY})
    assert r.status_code == 200 and r.json()["status"] == "unchanged", r.text


def test_reload_under_load_fails_no_request_and_switches_versions(served: httpx.Client, versions: dict) -> None:
    qs = [{"prompt": q["prompt"], "completion": q["completion"], "top_k": 3} for q in versions["queries"][:12]]
    v1, v2 = versions["v1_version"], versions["v2_version"]
    assert v1 != v2
    assert served.get("/v1/info", headers={"X-API-Key": QKEY}).json()["store"]["version"] == v1
    results: list[tuple[float, float, int, str | None, bool | None, int]] = []  # start, end, status, version,
    # cached, query
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=120, headers={"X-API-Key": QKEY}) as c:
            j = i
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post("/v1/attribute", json=qs[j % len(qs)])
                body = r.json() if r.status_code == 200 else {}
                with lock:
                    results.append((t0, time.monotonic(), r.status_code, body.get("store", {}).get("version"),
                                    body.get("cached"), j % len(qs)))
                j += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        while len(results) < 40:  # every query answered (and cached) on v1 first
            time.sleep(0.05)
        _point(versions["current"], versions["v2"])
        t_reload = time.monotonic()
        r = served.post("/v1/admin/reload", headers={"X-API-Key": AKEY})
        t_done = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloaded" and r.json()["version"] == v2 and r.json()["previous_version"] == v1
        assert r.json()["generation"] == 1
        n_at_swap = len(results)
        while len(results) < n_at_swap + 40:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    statuses = [r[2] for r in results]
    assert statuses.count(200) == len(results), {s: statuses.count(s) for s in set(statuses)}
    assert {r[3] for r in results} == {v1, v2}
    assert all(r[3] == v1 for r in results if r[1] < t_reload)
    after = [r for r in results if r[0] > t_done]
    assert len(after) >= 8 and all(r[3] == v2 for r in after)  # nothing computed on v1 is served after
    # the cache was in use on v1, and each query's first answer on v2 was computed, not read from a
    # v1 entry: the store version is part of the key
    assert any(r[4] for r in results if r[3] == v1)
    first_v2 = {}
    for r in sorted(results):
        if r[3] == v2:
            first_v2.setdefault(r[5], r)
    assert first_v2 and not any(r[4] for r in first_v2.values())
    info = served.get("/v1/info", headers={"X-API-Key": QKEY}).json()
    assert info["store"]["version"] == v2
    assert _metric(served, "ok") >= 1


def test_a_corrupt_store_is_refused_and_the_old_one_keeps_answering(served: httpx.Client, versions: dict) -> None:
    before = served.get("/v1/info", headers={"X-API-Key": QKEY}).json()["store"]["version"]
    refused = _metric(served, "refused")
    bad = shutil.copytree(versions["v2"], versions["root"] / "corrupt")
    # a store that differs from the served one only in a corrupt operators file
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = "0" * 16
    (bad / "manifest.json").write_text(json.dumps(manifest))
    f = bad / "operators.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    r = served.post("/v1/admin/reload", headers={"X-API-Key": AKEY}, json={"store": str(bad)})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert "operators.safetensors" in r.json()["detail"] and "still served" in r.json()["detail"]
    assert _metric(served, "refused") == refused + 1
    q = versions["queries"][3]
    a = served.post("/v1/attribute", json={"prompt": q["prompt"], "completion": q["completion"]},
                    headers={"X-API-Key": QKEY})
    assert a.status_code == 200 and a.json()["store"]["version"] == before
    assert served.get("/v1/info", headers={"X-API-Key": QKEY}).json()["store"]["version"] == before


def test_the_watcher_follows_the_current_symlink(versions: dict) -> None:
    """STRIDE_RELOAD_POLL_S: flipping ``current`` is enough; no admin call."""
    _point(versions["current"], versions["v1"])
    settings = Settings(_env_file=None, store=versions["current"], redis_url=None, reload_poll_s=0.1)
    app = create_app(settings)

    async def go() -> str:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                assert (await c.get("/v1/info")).json()["store"]["version"] == versions["v1_version"]
                _point(versions["current"], versions["v2"])
                for _ in range(600):
                    version = (await c.get("/v1/info")).json()["store"]["version"]
                    if version == versions["v2_version"]:
                        return version
                    await asyncio.sleep(0.1)
                return version

    assert asyncio.run(go()) == versions["v2_version"]
