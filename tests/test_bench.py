"""Smoke test of the reference benchmark: `python -m bench --quick` end to end into a tmp dir.

Checks that the pipeline ran and that every number is finite and in range; not the targets, and
no timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.slow


def _numbers(obj, path=""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench.run import main

    root = tmp_path_factory.mktemp("bench")
    skip = "" if importlib.util.find_spec("kronfluence") else "kronfluence"
    info = main(["--quick", "--out", str(root / "results"), "--work", str(root / "work"),
                 "--cache", str(root / "cache"), *(["--skip", skip] if skip else [])])
    return root / "results", info


def test_outputs_written(quick):
    out, info = quick
    assert (out / "REPORT.md").is_file() and (out / "lds.png").is_file() and (out / "scaling.png").is_file()
    assert json.loads((out / "results.json").read_text())["setting_key"] == info["setting_key"]
    assert info["ground_truth"]["retrains"] >= 8


def test_every_method_ran_or_was_skipped(quick):
    _, info = quick
    m = info["methods"]
    for name in ("STRIDE fidelity", "STRIDE finetune", "Gradient dot product (TracIn, final ckpt)",
                 "Gradient cosine", "BM25", "Representation similarity (final hidden, cosine)"):
        assert m[name]["status"] == "ok", name
    kf = m["Kronfluence EK-FAC"]
    assert kf["status"] == "ok" if importlib.util.find_spec("kronfluence") else kf["status"].startswith("skipped")


def test_numbers_finite_and_in_range(quick):
    _, info = quick
    for name, v in info["methods"].items():
        if v["status"] not in ("ok", "ablation", "floor", "reference"):
            continue
        for path, x in _numbers({k: val for k, val in v.items() if k not in ("config",)}):
            assert math.isfinite(x), (name, path, x)
        if "lds_mean" in v:
            assert -1 <= v["lds_mean"] <= 1 and 0 <= v["lds_std"] <= 1
            for k in ("recall@1", "recall@5", "mrr"):
                assert 0 <= v[k] <= 1, (name, k)
        if v["status"] not in ("ablation", "reference"):
            assert v["p50_ms"] > 0 and v["p95_ms"] >= v["p50_ms"]
            assert v["state_bytes"] >= 0 and v["precompute_s"] >= 0
    for row in info["scaling"]["stride"] + info["scaling"]["projected_gradients"]:
        assert row["latency_ms"] > 0 and row["store_bytes"] > 0
        assert all(math.isfinite(x) for _, x in _numbers(row))
