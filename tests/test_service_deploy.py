"""The container files parse and name what the service needs (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _stages(text: str) -> list[list[str]]:
    """Dockerfile instructions (continuations joined, comments dropped), split into stages."""
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(buf)
            buf = ""
    stages: list[list[str]] = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    preamble, build, runtime = stages[0], stages[1], stages[-1]
    assert len(stages) >= 3, "multi-stage: a build stage and a runtime stage"
    args = {m.group(1): m.group(2) for line in preamble if (m := re.match(r"ARG (\w+)=(\S+)", line))}
    assert args["BASE"].startswith("python:3.1") and "cpu" in args["TORCH_INDEX"]  # CPU unless told
    assert all(s[0].startswith("FROM ${BASE}") for s in (build, runtime))
    copies = " ".join(line for line in build if line.startswith("COPY"))
    for pkg in ("stride", "worker", "app", "pyproject.toml"):
        assert pkg in copies
    assert any("COPY --from=build" in line for line in runtime)
    user = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    assert "HF_HUB_OFFLINE=1" in env and "STRIDE_STORE=/data/store" in env  # mounted, never downloaded
    assert any(line.startswith("EXPOSE 8000") for line in runtime)
    assert any("HEALTHCHECK" in line and "/healthz" in line for line in runtime)
    cmd = [line for line in runtime if line.startswith("CMD")][-1]
    assert '"stride", "serve"' in cmd and '"0.0.0.0"' in cmd
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "demo", ".git"} <= set(ignored)


def test_compose() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"redis", "stride", "store-init"} <= set(services)
    svc, init = services["stride"], services["store-init"]
    env = svc["environment"]
    known = {f"STRIDE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known  # every variable is one the service reads
    assert env["STRIDE_REDIS_URL"].startswith("redis://redis:")
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["depends_on"]["store-init"]["condition"] == "service_completed_successfully"
    assert any(p.endswith(":8000") for p in svc["ports"])
    # the one-shot job builds the embedded default into the volume the service reads
    cmd = " ".join(init["command"])
    assert "stride demo-assets --out /data" in cmd and "--out /data/store" in cmd
    assert "manifest.json" in cmd  # only on first start
    assert init.get("restart") == "no" and "build" in init
    vol = init["volumes"][0].split(":")[0]
    assert vol in spec["volumes"] and any(v.startswith(f"{vol}:/data") for v in svc["volumes"])
    assert env["STRIDE_STORE"] == "/data/store"
    assert "healthcheck" in services["redis"]


def test_serve_command_takes_the_store_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    import uvicorn

    from worker.cli import app as cli

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: seen.update(target=target, **kw))
    monkeypatch.setenv("STRIDE_STORE", str(tmp_path))
    monkeypatch.delenv("STRIDE_DEVICE", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--port", "8123", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["target"] == "app.main:app" and seen["port"] == 8123
    import os

    assert os.environ["STRIDE_DEVICE"] == "cpu" and Settings(_env_file=None).store == tmp_path
