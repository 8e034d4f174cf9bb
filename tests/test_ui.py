"""The dashboard (``/ui``) in a real browser: Debian's chromium driven by Playwright, against real
uvicorn servers on free ports (the demo store with Redis; a tiny store of HTML documents with API
keys; a server that never finished starting). One browser per module, a fresh context per test.

``STRIDE_UI_SCREENSHOTS=docs pytest tests/test_ui.py`` rewrites the README's screenshots.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from test_service import Gate  # holds a query in flight until released

from app.main import create_app
from app.settings import Settings
from stride.config import BuildConfig
from stride.query import Attributor

CHROMIUM = os.environ.get("STRIDE_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("STRIDE_UI_SCREENSHOTS")
KEY = "ui-test-key"
# documents a browser would run if the page ever rendered them as HTML
HTML_DOCS = [
    '<script>window.__pwned = "script"</script> the old market road .',
    '<img src=x onerror="window.__pwned = \'img\'"> the quiet river boat .',
    "<b>bold</b> &amp; <i>the</i> busy farmer painted the window .",
]

if not Path(CHROMIUM).exists():
    # .ci/run installs Debian's chromium and chromium-driver; only a bare dev machine skips
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: .ci/run should have installed Debian's chromium")
    pytest.skip(f"no {CHROMIUM} (apt-get install chromium chromium-driver)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' brings playwright")
expect = sync_api.expect  # its matchers run without eval: the page's CSP forbids eval (wait_for_function)


# --- servers -------------------------------------------------------------------------------------


class Server:
    """``create_app`` under uvicorn in a thread, on a free port, until ``stop``."""

    def __init__(self, settings: Settings, attributor: Any, lifespan: str = "on"):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(settings, attributor=attributor)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(1500):
            if self.server.started:
                return
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def settings(store: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, store=store, **{"redis_url": None, "api_keys": "", **overrides})


@pytest.fixture(scope="module")
def queries(demo_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (demo_dir / "queries.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(demo_store: Path, redis_url: str) -> Iterator[Server]:
    """The demo store with the Redis cache, no keys: ``make demo`` with STRIDE_REDIS_URL set."""
    server = Server(settings(demo_store, redis_url=redis_url, cache_namespace=f"ui-{os.getpid()}-{time.time()}"),
                    Attributor.from_store(demo_store))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def html_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real store whose corpus is HTML-laden text (built in seconds: 10 steps, K = 16)."""
    from _tiny import sentences, write_model

    from worker.build import build

    root = tmp_path_factory.mktemp("ui-html")
    docs = [{"id": f"html-{i}", "text": t} for i, t in enumerate(HTML_DOCS)]
    docs += [{"id": f"p-{i}", "text": f"<p>{s}</p>"} for i, s in enumerate(sentences(21))]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return build(write_model(root / "model"), root / "corpus.jsonl", root / "store",
                 BuildConfig(steps=10, num_subsets=16, memberships=3, rank=4), show_progress=False)


@pytest.fixture(scope="module")
def gate(html_store: Path) -> Gate:
    """The real attributor behind a gate that is open until a test closes it (a query held in flight)."""
    g = Gate(Attributor.from_store(html_store))
    g.release.set()
    return g


@pytest.fixture(scope="module")
def keyed(html_store: Path, gate: Gate) -> Iterator[Server]:
    """API keys on, no Redis, a small prompt limit (413) and a query that can be held in flight."""
    server = Server(settings(html_store, api_keys=f"{KEY},other-key", max_prompt_chars=200), gate)
    yield server
    server.stop()


# --- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


HTTP_ERROR = "Failed to load resource: the server responded with a status of"


class Watch:
    """What a page did that it must not: console errors (a CSP violation is one), foreign requests.
    Chrome also logs every 4xx/5xx answer as an error; those are the API's answers the tests provoke."""

    def __init__(self, page: Any, origin: str):
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith((origin + "/", "blob:", "data:"))
                else self.foreign.append(r.url))

    def check(self) -> None:
        errors = [e for e in self.errors if not e.startswith(HTTP_ERROR)]
        assert not errors, errors
        assert not self.foreign, self.foreign


@pytest.fixture()
def open_page(browser: Any) -> Iterator[Any]:
    """``open_page(server, hash="", key=None)``: a fresh context (empty storage) at /ui."""
    made: list[tuple[Any, Watch]] = []

    def go(server: Server, hash: str = "", key: str | None = None) -> Any:
        ctx = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        if key:
            ctx.add_init_script(f"sessionStorage.setItem('stride.apiKey', {json.dumps(key)})")
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        watch = Watch(page, server.url)
        made.append((ctx, watch))
        page.goto(f"{server.url}/ui{hash}")
        return page

    yield go
    for ctx, watch in made:
        ctx.close()
        watch.check()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def wait_ready(page: Any) -> None:
    page.wait_for_selector('#status[data-state="ready"]')


def shown(page: Any, side: str) -> list[str]:
    return page.eval_on_selector_all(f"#{side} li.item", "els => els.map(e => e.dataset.id)")


def api(server: Server, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{server.url}/v1/attribute", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --- tests ---------------------------------------------------------------------------------------


def test_planted_fact_answer_example_and_curl(demo: Server, queries: list, open_page: Any) -> None:
    q = next(q for q in queries if len(q["support"]) == 3)  # a fact stated in three documents
    page = open_page(demo)
    wait_ready(page)
    info = page.inner_text("#info")
    assert "523 examples" in info and "store version" in info and "Redis" in info
    page.fill("#prompt", q["prompt"])
    page.fill("#completion", q["completion"])
    page.fill("#top-k", "5")
    page.press("#prompt", "Enter")  # Enter submits
    page.wait_for_selector("#proponents li.item")
    ids = shown(page, "proponents")
    truth = api(demo, {"prompt": q["prompt"], "completion": q["completion"], "top_k": 5})
    assert ids == [s["id"] for s in truth["proponents"]]
    assert shown(page, "opponents") == [s["id"] for s in truth["opponents"]]
    assert ids[0] in q["support"], (ids, q["support"])  # a document stating the planted fact is at the top
    assert float(page.inner_text("#loss")) == pytest.approx(truth["loss"], rel=1e-3, abs=1e-4)
    summary = page.inner_text("#summary")
    assert "converged" in summary and "iterations" in summary and "nonzeros" in summary and "solve" in summary
    # the query's own words are marked in the documents ("Orvane" of " Orvane"), and only those
    marks = page.eval_on_selector_all("#proponents mark", "els => els.map(e => e.textContent)")
    assert q["completion"].strip() in marks
    assert {m.lower() for m in marks} <= {w.lower() for w in (q["prompt"] + q["completion"]).split()}
    assert "prompt=" in page.url and "top_k=5" in page.url
    shot(page, "dashboard-answer.png")

    # the same request again: served from the Redis cache, and the page says so
    page.click("#submit")
    page.wait_for_selector("#summary .badge.cached")

    # the full example, as /v1/examples/{id} has it
    page.click(f'#proponents button.example-open[data-id="{ids[0]}"]')
    page.wait_for_selector("#example-meta:has-text('characters')")
    full = httpx.get(f"{demo.url}/v1/examples/{ids[0]}").json()
    assert page.inner_text("#example-text") == full["text"]
    assert page.inner_text("#example-title") == ids[0]
    shot(page, "dashboard-example.png")
    page.keyboard.press("Escape")

    # copy-as-curl: the command the page shows gives the same answer when a shell runs it
    page.click("#copy-curl")
    command = page.inner_text("#curl")
    if shutil.which("curl"):
        out = json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True,
                                        timeout=60).stdout)
        assert [s["id"] for s in out["proponents"]] == ids


def test_permalink_and_history(demo: Server, queries: list, open_page: Any) -> None:
    q = queries[1]
    body = {"prompt": q["prompt"], "completion": q["completion"], "top_k": 3}
    link = "#" + str(httpx.QueryParams(body))
    page = open_page(demo, hash=link)
    page.wait_for_selector("#proponents li.item")  # the link alone runs the query
    assert page.input_value("#prompt") == q["prompt"] and page.input_value("#completion") == q["completion"]
    assert shown(page, "proponents") == [s["id"] for s in api(demo, body)["proponents"]]
    href = page.get_attribute("#permalink", "href")
    assert {k: v[0] for k, v in parse_qs(href[1:]).items()} == {k: str(v) for k, v in body.items()}

    # the history is this browser's: it survives a reload and re-runs a query on click
    page.reload()
    page.wait_for_selector("#history-list li")
    assert q["prompt"] in page.inner_text("#history-list")
    page.fill("#prompt", "")
    page.fill("#completion", "")
    page.click("#history-list li button")
    expect(page.locator("#prompt")).to_have_value(q["prompt"])
    page.click("#history-clear")
    assert page.locator("#history-list li").count() == 0

    # a problem document is shown with its detail: a prompt with no token to score is a 422
    page.fill("#prompt", "   ")
    page.fill("#completion", "")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "422" in page.inner_text("#error")


def test_batch_of_five_and_downloads(demo: Server, queries: list, open_page: Any, tmp_path: Path) -> None:
    five = queries[2:7]
    jsonl = tmp_path / "queries.jsonl"
    jsonl.write_text("".join(json.dumps(q) + "\n" for q in five))
    page = open_page(demo)
    wait_ready(page)
    page.click("#tab-batch")
    page.fill("#batch-input", '{"prompt": "ok"}\n{not json')
    page.click("#batch-run")
    assert "line 2: not valid JSON" in page.inner_text("#batch-error")

    page.set_input_files("#batch-file", str(jsonl))  # upload
    expect(page.locator("#batch-input")).to_have_value(re.compile(re.escape(five[0]["prompt"])))
    page.fill("#batch-k", "3")
    page.click("#batch-run")
    page.wait_for_selector("#batch-table tbody tr:nth-child(5)")
    rows = page.locator("#batch-table tbody tr")
    assert rows.count() == 5
    truth = httpx.post(f"{demo.url}/v1/attribute/batch", timeout=60, json={"queries": [
        {"prompt": q["prompt"], "completion": q["completion"], "top_k": 3} for q in five]}).json()["results"]
    for i, (q, t) in enumerate(zip(five, truth, strict=True)):
        cells = rows.nth(i).locator("td")
        assert cells.nth(0).inner_text() == q["id"]
        assert [c.strip().split()[0] for c in cells.nth(4).locator(".chip").all_inner_texts()] == [
            s["id"] for s in t["proponents"]]
    shot(page, "dashboard-batch.png")

    with page.expect_download() as dl:
        page.click("#download-jsonl")
    lines = [json.loads(x) for x in Path(dl.value.path()).read_text().splitlines()]
    assert [x["id"] for x in lines] == [q["id"] for q in five]
    assert [[s["id"] for s in x["proponents"]] for x in lines] == [[s["id"] for s in t["proponents"]] for t in truth]
    with page.expect_download() as dl:
        page.click("#download-csv")
    table = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert [r["prompt"] for r in table] == [q["prompt"] for q in five]
    assert [r["proponent_1_id"] for r in table] == [t["proponents"][0]["id"] for t in truth]


def test_api_key_prompt_and_html_as_text(keyed: Server, html_store: Path, open_page: Any) -> None:
    # no key yet: the page loads, asks for one, and says so in words
    page = open_page(keyed)
    page.wait_for_selector("#key-dialog[open]")
    assert "needs an API key" in page.inner_text("#key-reason")
    shot(page, "dashboard-key.png")
    page.fill("#key-input", "not-the-key")
    page.click("#key-save")
    page.wait_for_selector("#key-dialog[open]")
    assert "Wrong or missing API key" in page.inner_text("#key-reason")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    wait_ready(page)
    assert page.evaluate("sessionStorage.getItem('stride.apiKey')") == KEY
    assert page.evaluate("localStorage.getItem('stride.apiKey')") is None  # this tab only

    # a training document holding HTML shows its characters and runs nothing
    page.fill("#open-id", "html-0")
    page.press("#open-id", "Enter")
    page.wait_for_selector("#example-meta:has-text('characters')")
    assert page.inner_text("#example-text") == HTML_DOCS[0]
    page.keyboard.press("Escape")
    page.fill("#prompt", "the old market road")
    page.fill("#top-k", "30")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#proponents li.item")
    snippets = page.eval_on_selector_all(".snippet", "els => els.map(e => e.textContent)")
    corpus = [json.loads(x)["text"] for x in (html_store / "corpus.jsonl").read_text().splitlines()]
    assert snippets and all(s in corpus and "<" in s for s in snippets), snippets  # every one HTML, as text
    assert page.evaluate("document.querySelectorAll('main script, main img, main b, #example-text *:not(mark)')"
                         ".length") == 0
    assert page.evaluate("window.__pwned") is None

    # a new tab starts without the key
    other = open_page(keyed)
    other.wait_for_selector("#key-dialog[open]")


def test_errors_slow_query_and_cancel(keyed: Server, gate: Gate, open_page: Any) -> None:
    page = open_page(keyed, key=KEY)
    wait_ready(page)
    page.fill("#prompt", "the " * 60)  # 240 characters, over this server's 200: a 413 with its detail
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "413" in page.inner_text("#error") and "over 200 characters" in page.inner_text("#error")

    gate.entered.clear()
    gate.release.clear()
    try:
        page.fill("#prompt", "the quiet river boat")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#progress:not([hidden])")
        assert gate.entered.wait(20)
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"[1-9]\.\d s"))  # a second passed
        assert page.is_visible("#cancel")
        page.click("#cancel")
        page.wait_for_selector("#error:has-text('Cancelled')")
        assert page.is_hidden("#progress") and page.is_enabled("#submit")
    finally:
        gate.release.set()
    # usable again at once; a word the tokenizer never saw comes back as a warning beside the answer
    page.fill("#prompt", "the quiet river qwxyz boat")
    page.click("#submit")
    page.wait_for_selector("#warnings:not([hidden])")
    assert "unknown-tokens" in page.inner_text("#warnings")


def test_not_ready_server(html_store: Path, open_page: Any) -> None:
    """A server whose model never loaded (no lifespan): the page says it is not ready, not a 503 dump."""
    server = Server(settings(html_store), attributor=None, lifespan="off")
    try:
        page = open_page(server)
        page.wait_for_selector("#banner:not([hidden])")
        assert "not ready" in page.inner_text("#banner") and page.get_attribute("#status", "data-state") == "starting"
    finally:
        server.stop()


def test_served_with_csp_and_open_without_key(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        r = c.get("/ui")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
        assert "<script" not in r.text.replace('<script type="module" src="ui/app.js"></script>', "")
        assert ' style="' not in r.text
        js = c.get("/ui/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert c.get("/ui/app.js", headers={"If-None-Match": js.headers["etag"]}).status_code == 304
        assert c.get("/ui/index.html").status_code == 404 and c.get("/ui/nothing.js").status_code == 404
        assert c.get("/v1/info").status_code == 401
    # the open prefix opens nothing else: a raw request (httpx would drop the dot segments)
    import socket

    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as s:
        s.sendall(b"GET /ui/../v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = s.recv(4096).split(b"\r\n", 1)[0]
    assert head.split()[1] in (b"401", b"404"), head
