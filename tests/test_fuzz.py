"""``make fuzz``: schemathesis against a real ``stride serve`` process, with and without API keys.

Every schemathesis check runs but ``positive_data_acceptance``: some valid-by-schema queries are
refused by rules the JSON schema cannot state (a prompt of one token with no completion has nothing
to score, 422; tokens past the model's window, 413), each answered with a problem document that
names the rule. Everything else must hold with zero failures: no 5xx, documented status codes,
content types and headers, responses matching their schema, invalid input refused, and with keys,
no keyed route answering without one. Together the two runs generate well over 1,000 cases.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXCLUDED = "positive_data_acceptance"  # see the module docstring
# cases per operation and phase; measured: ~1,600 cases over both runs in ~1 min at load 8-10
MAX_EXAMPLES = int(os.environ.get("STRIDE_FUZZ_EXAMPLES", "150"))


def schemathesis(base_url: str, report_dir: Path, *headers: str, seed: int = 0) -> dict:
    """Run the schemathesis CLI; its JSON report, with the console output under ``"output"``."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("schemathesis is not installed: `pip install -e '.[dev]'`")
    argv = [exe, "run", f"{base_url}/openapi.json", "--checks", "all", "--exclude-checks", EXCLUDED,
            "--max-examples", str(MAX_EXAMPLES), "--seed", str(seed), "--continue-on-failure",
            "--request-timeout", "60", "--report", "json", "--report-dir", str(report_dir), "--no-color"]
    for h in headers:
        argv += ["-H", h]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=report_dir)
    (report,) = report_dir.glob("*.json")
    out = json.loads(report.read_text())
    out["output"] = proc.stdout[-6000:] + proc.stderr[-2000:]
    return out


def check(report: dict) -> int:
    """Zero failures and errors on every operation; the number of cases generated."""
    assert report["complete"] and report["operations"]["errored"] == 0, report["output"]
    assert report["failures"] == [] and report["errors"] == [], report["output"]
    assert report["test_cases"]["with_failures"] == 0, report["output"]
    return int(report["test_cases"]["generated"])


def test_fuzz_open_and_keyed(live_server, demo_store: Path, redis_url: str, tmp_path: Path) -> None:
    from conftest import LiveServer

    keyed_dir, open_dir = tmp_path / "keyed", tmp_path / "open"
    keyed_dir.mkdir()
    open_dir.mkdir()
    # keyed: the server of the session (Redis cache on); schemathesis sends the key on every request
    # and its ignored_auth check sends none where the OpenAPI declares the scheme
    keyed = schemathesis(live_server.url, keyed_dir, f"Authorization: Bearer {live_server.key}", seed=1)
    n_keyed = check(keyed)
    # no keys; Redis as deployed (the jobs routes need it: without it they answer 503 by design)
    server = LiveServer(demo_store, tmp_path / "open.log", STRIDE_REDIS_URL=redis_url, STRIDE_CACHE_NAMESPACE="open")
    try:
        n_open = check(schemathesis(server.url, open_dir, seed=2))
    finally:
        # SIGTERM drains and exits; uvicorn re-raises the signal after its graceful shutdown
        assert server.stop() in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "open.log").read_text()
    print(f"schemathesis: {n_keyed} cases keyed, {n_open} open")
    assert n_keyed + n_open >= 1000, (n_keyed, n_open)
    for log in (live_server.log, tmp_path / "open.log"):  # one JSON object per line, no traceback
        for line in log.read_text().splitlines():
            record = json.loads(line)
            assert record["level"] != "ERROR" and "exc" not in record, line
