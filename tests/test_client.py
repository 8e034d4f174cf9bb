"""stride.client against a real server process (uvicorn on a free port, the demo store, an API key),
plus its retry rule on a scripted transport (a unit test of the client's own logic)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_service import metric

from stride.client import ApiError, AsyncClient, Client
from stride.result import Answer, Query

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")}
    env.update(STRIDE_STORE=str(demo_store), STRIDE_DEVICE="cpu", STRIDE_API_KEYS=KEY, STRIDE_MAX_BATCH_QUERIES="2")
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path_factory.mktemp("cwd"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def facts(demo_dir: Path) -> list[dict[str, str]]:
    rows = [json.loads(x) for x in (demo_dir / "queries.jsonl").read_text().splitlines()[:5]]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


@pytest.fixture(scope="module")
def prompt_ids(demo_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "model")
    return lambda text: tok(text)["input_ids"]


def test_sync_client_against_a_real_server(server: str, facts: list[dict[str, str]], prompt_ids) -> None:
    # called while the server is still loading: refused connections, then 503 "starting" with
    # Retry-After, are retried until it answers
    with Client(server, api_key=KEY, retries=600, max_backoff=0.5) as client:
        a = client.attribute(facts[0]["prompt"], facts[0]["completion"], top_k=3)
        assert isinstance(a, Answer) and a.proponents and len(a.proponents) <= 3
        assert a.diagnostics.converged and a.timing_ms.total > 0 and a.cached is False
        assert a.scored_text == facts[0]["completion"].strip() and a.warnings == []

        ids = client.attribute(prompt_ids=prompt_ids(facts[0]["prompt"]), completion_ids=[t.id for t in a.tokens],
                               top_k=3)
        assert ids.loss == a.loss and [p.id for p in ids.proponents] == [p.id for p in a.proponents]
        span = client.attribute(Query(facts[1]["prompt"], facts[1]["completion"] + " .",
                                      span=(1, len(facts[1]["completion"]))), top_k=3)
        assert [t.scored for t in span.tokens] == [True, False] and span.proponents

        # five queries over a server that takes two per batch request: three requests, answers in order
        before = httpx.get(f"{server}/metrics").text
        many = client.attribute_batch(facts, top_k=3)
        after = httpx.get(f"{server}/metrics").text
        assert [m.scored_text for m in many] == [f["completion"].strip() for f in facts]
        assert many[0].loss == pytest.approx(a.loss, rel=1e-4)
        calls = metric(after, "stride_http_requests_total", route="/v1/attribute/batch", status="200") - metric(
            before, "stride_http_requests_total", route="/v1/attribute/batch", status="200")
        assert calls == 3

        ex = client.example(a.proponents[0].id)
        assert ex.index == a.proponents[0].index and ex.text == a.proponents[0].text
        assert client.info()["limits"]["max_batch_queries"] == 2

        with pytest.raises(ApiError) as bad:
            client.attribute("word")
        assert bad.value.status == 422 and bad.value.type.endswith("unscorable-query")
        with pytest.raises(ApiError) as missing:
            client.example("no such/id")
        assert missing.value.status == 404

    with Client(server, api_key="wrong") as client, pytest.raises(ApiError) as denied:
        client.attribute(facts[0]["prompt"], facts[0]["completion"])
    assert denied.value.status == 401


def test_async_client(server: str, facts: list[dict[str, str]], prompt_ids) -> None:
    async def go() -> None:
        async with AsyncClient(server, api_key=KEY, retries=600, max_backoff=0.5) as client:
            one = await asyncio.gather(*(client.attribute(f["prompt"], f["completion"], top_k=2) for f in facts[:3]))
            many = await client.attribute_batch(facts[:3], top_k=2)
            for a, b in zip(one, many, strict=True):
                assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.proponents
            ids = await client.attribute(prompt_ids=prompt_ids(facts[0]["prompt"]),
                                         completion_ids=[t.id for t in one[0].tokens], top_k=2)
            assert ids.loss == pytest.approx(one[0].loss, rel=1e-4)

    asyncio.run(go())


def test_retries_honour_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """503 twice (Retry-After 2, then none), then 200: three calls, waits of 2 s and the backoff, jittered."""
    calls: list[int] = []
    slept: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "2"}, json={"type": "urn:stride:problem:overloaded"})
        if len(calls) == 2:
            return httpx.Response(503, json={"type": "urn:stride:problem:unavailable"})
        return httpx.Response(200, json={"limits": {"max_batch_queries": 7}})

    monkeypatch.setattr("stride.client.time.sleep", slept.append)
    monkeypatch.setattr(Client, "jitter", staticmethod(lambda: 1.25))
    client = Client("http://stride.test", retries=3, backoff=0.25)
    client._http = httpx.Client(base_url="http://stride.test", transport=httpx.MockTransport(handler))
    assert client.max_batch_queries() == 7
    assert len(calls) == 3 and slept == [2.5, 0.625]  # Retry-After and backoff, times the jitter

    calls.clear()
    client.retries = 1
    with pytest.raises(ApiError) as e:
        client.info()
    assert e.value.status == 503 and len(calls) == 2  # gives up after its retries
