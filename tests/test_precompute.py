"""`python -m bench.precompute --quick` end to end into a tmp dir.

Checks that every part ran and every number is finite and positive where it is a time; no timing
assertions (the quick sizes say nothing about the real crossover).
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_precompute_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.precompute import METHODS, main

    main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    res = json.loads((tmp_path / "precompute.json").read_text())
    json.dumps(res, allow_nan=False)  # raises on NaN or inf anywhere
    assert {"precompute", "gpt2", "wide", "meta", "machine"} <= set(res)
    rows = res["precompute"]["rows"]
    assert set(rows) == set(METHODS)
    for key, method_rows in rows.items():
        assert [r["n"] for r in method_rows] == [150, 300]
        for r in method_rows:
            if key == "kronfluence" and r.get("status", "ok") != "ok":
                assert r["status"].startswith("skipped")  # kronfluence is in the bench extra only
                continue
            assert r["seconds"] > 0 and isinstance(r["extrapolated"], bool)
            assert r["loadavg_start"] and r["wall_s"] > 0
    for r in rows["stride"]:
        assert r["steps"] == r["config"]["steps"] and r["steps_per_s"] > 0
    assert "stride" in res["precompute"]["analysis"]["fits"]
    assert all(r["examples_per_s"] > 0 for r in res["gpt2"]["rows"].values())
    assert res["wide"]["rows"]["defaults"]["status"] == "ok"
    md = (tmp_path / "precompute.md").read_text()
    for title in ("## 1. Precompute versus n", "## 2. Activation pass", "## 3. The larger tiny model"):
        assert title in md
    assert (tmp_path / "precompute.png").stat().st_size > 0
