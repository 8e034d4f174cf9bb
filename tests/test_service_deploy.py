"""The container files parse and name what the service needs (no Docker engine runs here)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from typer.testing import CliRunner

from app.main import create_app
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


def test_serve_command_takes_the_store_from_the_environment(monkeypatch, demo_store: Path) -> None:
    """`stride serve` reads STRIDE_* (the store from the environment), checks the store before
    anything loads, and hands uvicorn the settings' keep-alive, drain, JSON log config and protocol."""
    import uvicorn

    from app.serving import ProblemH11Protocol
    from worker.cli import app as cli

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: seen.update(target=target, **kw))
    monkeypatch.setenv("STRIDE_STORE", str(demo_store))
    monkeypatch.setenv("STRIDE_KEEPALIVE_S", "42")
    monkeypatch.delenv("STRIDE_DEVICE", raising=False)
    monkeypatch.delenv("STRIDE_REDIS_URL", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--port", "8123", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["target"] == "app.main:app" and seen["port"] == 8123
    assert seen["timeout_keep_alive"] == 42 and seen["http"] is ProblemH11Protocol
    assert seen["log_config"]["formatters"]["json"]["()"] == "app.middleware.JsonFormatter"
    import os

    assert os.environ["STRIDE_DEVICE"] == "cpu" and Settings(_env_file=None).store == demo_store
    # a bad setting or store stops it with exit code 2, naming it, before uvicorn (or a model) starts
    seen.clear()
    monkeypatch.setenv("STRIDE_REDIS_URL", "redis://localhost:notaport/0")
    result = CliRunner().invoke(cli, ["serve", "--port", "8123"])
    assert result.exit_code == 2 and "redis_url" in result.output and not seen
    monkeypatch.delenv("STRIDE_REDIS_URL")
    monkeypatch.setenv("STRIDE_STORE", str(demo_store.parent / "model"))  # a directory that is no store
    result = CliRunner().invoke(cli, ["serve", "--port", "8123"])
    assert result.exit_code == 2 and "manifest.json" in result.output and not seen


# --- deploy/: Kubernetes manifests and Prometheus files (parsed only; no cluster runs here) -----------

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes" / "stride.yaml"
SETTINGS_ENV = {f"STRIDE_{name.upper()}" for name in Settings.model_fields}


def _docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(K8S.read_text()))


def _obj(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name}"
    return found[0]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def _service_pod() -> dict[str, Any]:
    return _obj("Deployment", "stride")["spec"]["template"]["spec"]


def _image_cmd() -> list[str]:
    runtime = _stages((ROOT / "Dockerfile").read_text())[-1]
    return json.loads([line for line in runtime if line.startswith("CMD")][-1][len("CMD"):])


def _serve_port(container: dict[str, Any]) -> int:
    """The port `stride serve` listens on: the container's command/args, else the image's CMD."""
    argv = container.get("command", []) + container.get("args", []) or _image_cmd()
    assert argv[:2] == ["stride", "serve"], argv
    return int(argv[argv.index("--port") + 1])


def _port(container: dict[str, Any], port: int | str) -> int:
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return named[port] if isinstance(port, str) else port


def _routes() -> set[str]:
    """The served paths, as the OpenAPI document lists them (``app.routes`` holds included routers as
    opaque entries since FastAPI 0.165)."""
    app = create_app(Settings(_env_file=None, store=None, redis_url=None, api_keys=""))
    return set(app.openapi()["paths"])


def _uses(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted at ``path`` in ``container``, with the mount's readOnly flag."""
    mount = next(m for m in container.get("volumeMounts", []) if m["mountPath"] == path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return {**volume, "mount_read_only": mount.get("readOnly", False)}


def test_deploy_files_parse() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"kubernetes/stride.yaml", "prometheus/scrape.yml", "prometheus/alerts.yml"} <= names
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path  # no empty or scalar document
    for d in _docs():
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], d
    objects = {(d["kind"], d["metadata"]["name"]) for d in _docs()}
    assert {("Deployment", "stride"), ("Service", "stride"), ("ConfigMap", "stride-config"),
            ("PersistentVolumeClaim", "stride-data"), ("Job", "stride-store-init"),
            ("Deployment", "stride-redis"), ("Service", "stride-redis")} <= objects
    assert (DEPLOY / "README.md").is_file()


def test_k8s_probes_and_service_point_at_the_served_port() -> None:
    pod = _service_pod()
    c = _container(pod, "stride")
    port = _serve_port(c)
    assert port == 8000
    routes = _routes()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes, probe
        assert _port(c, get["port"]) == port, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # loading a model takes a while
    # the Service: 80 -> the served port, selecting the service pods only, scraped on /metrics
    svc = _obj("Service", "stride")
    (sp,) = svc["spec"]["ports"]
    assert sp["port"] == 80 and _port(c, sp["targetPort"]) == port
    labels = _obj("Deployment", "stride")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    redis_labels = _obj("Deployment", "stride-redis")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= redis_labels.items()
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
    assert ann["prometheus.io/path"] == "/metrics" and "/metrics" in routes


def test_k8s_env_names_are_settings_fields() -> None:
    text = K8S.read_text()
    # every variable the manifests set, commented-out variants included: env names and ConfigMap keys
    named = set(re.findall(r"\bname:\s*[\"']?(STRIDE_\w+)", text))
    named |= set(re.findall(r"^\s*#?\s*(STRIDE_\w+):", text, flags=re.M))
    assert {"STRIDE_STORE", "STRIDE_API_KEYS", "STRIDE_REDIS_URL", "STRIDE_DEVICE"} <= named
    assert named <= SETTINGS_ENV, named - SETTINGS_ENV
    # ... and what the parsed objects say, with values the Settings class accepts
    cm = _obj("ConfigMap", "stride-config")["data"]
    assert set(cm) <= SETTINGS_ENV, set(cm) - SETTINGS_ENV
    settings = Settings(_env_file=None, **{k.removeprefix("STRIDE_").lower(): v for k, v in cm.items()})
    c = _container(_service_pod(), "stride")
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == ["stride-config"]
    env = {e["name"]: e for e in c["env"]}
    assert {n for n in env if n.startswith("STRIDE_")} <= SETTINGS_ENV
    key = env["STRIDE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert key["name"] == "stride-api-keys" and key["optional"] is True and key["key"]
    # the store and the model live on the read-only data volume
    data = _uses(_service_pod(), c, "/data")
    assert data["persistentVolumeClaim"]["claimName"] == "stride-data" and data["mount_read_only"]
    assert str(settings.store).startswith("/data/") and str(settings.model).startswith("/data/")
    # the Redis URL names the Redis Service and its port
    m = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", cm["STRIDE_REDIS_URL"])
    assert m and [p["port"] for p in _obj("Service", m.group(1))["spec"]["ports"]] == [int(m.group(2))]
    # the GPU variant is there, commented out
    assert re.search(r"^\s*#.*nvidia\.com/gpu: 1", text, flags=re.M)
    assert re.search(r"^\s*#.*STRIDE_DEVICE.*cuda", text, flags=re.M)


def test_k8s_runs_as_the_image_user_with_a_read_only_root() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    assert uid != 0
    job = _obj("Job", "stride-store-init")["spec"]["template"]["spec"]
    for pod, python in ((_service_pod(), "stride"), (job, "store-init")):
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == uid
        # Service links would put STRIDE_PORT=tcp://... into a process reading STRIDE_*
        assert pod["enableServiceLinks"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = {**psc, **c.get("securityContext", {})}
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, c["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        # torch and tempfile write under /tmp at import: a writable emptyDir, where HOME points too
        c = _container(pod, python)
        assert "emptyDir" in _uses(pod, c, "/tmp")
        assert {e["name"]: e.get("value") for e in c.get("env", [])}.get("HOME", "/tmp").startswith("/tmp")
    res = _container(_service_pod(), "stride")["resources"]
    assert res["requests"]["cpu"] and res["limits"]["cpu"]


def test_k8s_store_init_and_redis_match_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    job = _obj("Job", "stride-store-init")
    pod = job["spec"]["template"]["spec"]
    c = _container(pod, "store-init")
    assert c["command"] == compose["store-init"]["command"]  # the same one-shot build, same idempotence
    assert c["image"] == _container(_service_pod(), "stride")["image"]
    data = _uses(pod, c, "/data")
    assert data["persistentVolumeClaim"]["claimName"] == "stride-data" and not data["mount_read_only"]
    assert pod["restartPolicy"] == "Never"
    assert "OPTIONAL" in K8S.read_text().split("kind: Job")[0].rsplit("---", 1)[-1]  # marked optional
    # the service waits for the store instead of crash-looping while the Job runs
    wait = _service_pod()["initContainers"][0]["command"]
    assert "/data/store/manifest.json" in " ".join(wait)
    redis = _container(_obj("Deployment", "stride-redis")["spec"]["template"]["spec"], "redis")
    assert redis["image"] == compose["redis"]["image"] == "redis:7-alpine"
    assert redis["args"] == compose["redis"]["command"]  # no persistence, maxmemory + allkeys-lru
    assert "allkeys-lru" in redis["args"] and "--maxmemory" in redis["args"]


# PromQL, enough to pull metric names out of an expression: strings, label matchers, ranges and numbers
# are skipped whole; a name followed by "(" is a function; grouping clauses list labels, not metrics.
_PROMQL = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?'
                     r"|[A-Za-z_:][A-Za-z0-9_:]*|\S")
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATORS = {"and", "or", "unless", "bool", "offset", "sum", "min", "max", "avg", "count", "group", "stddev",
              "stdvar", "topk", "bottomk", "quantile", "count_values"}


def _promql_metrics(expr: str) -> set[str]:
    toks, names, i = _PROMQL.findall(expr), set(), 0
    while i < len(toks):
        tok, nxt = toks[i], toks[i + 1] if i + 1 < len(toks) else ""
        if tok in _GROUPING and nxt == "(":
            i = toks.index(")", i)
        elif re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", tok) and nxt != "(" and tok not in _OPERATORS:
            names.add(tok)
        i += 1
    return names


def test_promql_metric_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route=~"x|y", s!="z"}[5m])))'
            " / on (job) group_left (pod) b_total > 1e-3 or vector(0) unless absent(c)")
    assert _promql_metrics(expr) == {"a_bucket", "b_total", "c"}


def _exported_metrics() -> str:
    """GET /metrics from the real app (no lifespan, so no model loads), after one request to count."""
    app = create_app(Settings(_env_file=None, store=None, redis_url=None, api_keys=""))

    async def scrape() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stride.test") as c:
            assert (await c.get("/healthz")).status_code == 200
            r = await c.get("/metrics")
            assert r.status_code == 200
            return r.text

    return asyncio.run(scrape())


def test_alerts_use_metrics_the_service_exports() -> None:
    exported: set[str] = set()
    for line in _exported_metrics().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported.add(name)
            if kind == "counter":
                exported.add(name if name.endswith("_total") else name + "_total")
            if kind == "histogram":  # a labelled family shows no samples until observed
                exported |= {name + s for s in ("_bucket", "_count", "_sum")}
        elif line and not line.startswith("#"):
            exported.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    assert {"stride_http_requests_total", "stride_http_request_duration_seconds_bucket", "stride_ready"} <= exported
    routes = _routes()
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 4
    used: set[str] = set()
    for rule in rules:
        assert rule["alert"] and rule["labels"]["severity"] and rule["annotations"]["summary"], rule
        names = _promql_metrics(rule["expr"])
        assert names and names <= exported, (rule["alert"], names - exported)
        used |= names
        # route matchers name the app's route templates (the label the middleware records)
        for op, value in re.findall(r'\broute\s*(=~|=)\s*"([^"]*)"', rule["expr"]):
            for alt in value.split("|") if op == "=~" else [value]:
                assert alt in routes, (rule["alert"], alt)
    # the brief: errors, latency from the histogram, the cache, load shedding
    assert {"stride_http_requests_total", "stride_http_request_duration_seconds_bucket",
            "stride_rejected_total"} <= used
    assert used & {"stride_cache_breaker_open", "stride_cache_requests_total"}


def test_prometheus_scrape_config() -> None:
    jobs = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yml").read_text())["scrape_configs"]
    port = _serve_port(_container(_service_pod(), "stride"))
    assert jobs and all(j.get("metrics_path", "/metrics") in _routes() for j in jobs)
    targets = [t for j in jobs for s in j.get("static_configs", []) for t in s["targets"]]
    assert targets and all(t.rsplit(":", 1)[1] == str(port) for t in targets)
    k8s = [j for j in jobs if "kubernetes_sd_configs" in j]
    assert k8s, "a job for deploy/kubernetes"
    keeps = {r["source_labels"][0]: r["regex"] for j in k8s for r in j["relabel_configs"] if r.get("action") == "keep"}
    ann = _obj("Service", "stride")["metadata"]["annotations"]
    assert re.fullmatch(keeps["__meta_kubernetes_service_annotation_prometheus_io_scrape"], ann["prometheus.io/scrape"])
