"""The benchmark: its data generators (fast), and `python -m bench --quick` end to end into a tmp dir.

The smoke run checks that the pipeline ran and that every number is finite and in range; not the
targets, and no timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest


def test_setting_keys_stable():
    """Existing ground-truth caches are keyed by these; a new Setting field must not move them."""
    from bench.setting import FULL, QUICK

    assert (FULL.key(), QUICK.key()) == ("9ff3abcc82f78614", "82339c8201e6bc7f")


def test_removal_comparators_draw_from_the_right_pools():
    """Random documents come from the whole corpus; same-answer ones are other facts' documents whose
    relation and answer (the query's completion) match, never the query's own support."""
    from types import SimpleNamespace

    import torch

    from bench.removal import RANDOM, SAME_ANSWER, removal_sets

    fact = lambda i, rel: {"id": i, "relation": rel, "object": "Brira"}  # noqa: E731
    docs = [fact("a0", "capital"), fact("a1", "capital"), fact("b0", "capital"), fact("c0", "river"),
            {"id": "f0", "role": "filler"}, {"id": "f1", "role": "filler"}]
    queries = [{"id": "q", "prompt": "p", "completion": " Brira", "relation": "capital", "support": ["a0", "a1"]}]
    b = SimpleNamespace(docs=docs, queries=queries)
    sets = removal_sets(b, {"m": torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])}, [0], [2], 0)
    assert sets[("m", 2)] == [[1, 4]]
    assert sets[(SAME_ANSWER, 2)] == [[2]]  # the only other document stating that answer for that relation
    assert len(sets[(RANDOM, 2)][0]) == 2


@pytest.mark.parametrize("kind", ["alias", "instruct"])
def test_harder_generators(kind):
    """Queries' subject names never occur in their supporting documents; corpus lines keep the core's schema."""
    from bench.setting import CORPUS_KEYS, SETTINGS, doc_text, generate

    s = SETTINGS[kind][1]
    _, docs, queries = generate(s)
    assert generate(s)[1] == docs  # deterministic
    by_id = {d["id"]: d for d in docs}
    assert len(by_id) == len(docs)
    for d in docs:
        line = {k: d[k] for k in CORPUS_KEYS if k in d}
        assert set(line) in ({"id", "text"}, {"id", "prompt", "completion"})
    facts = [q for q in queries if q["relation"] != "behaviour"]
    assert len(facts) == s.facts
    for q in facts:
        assert q["support"] and all(by_id[i]["role"] == "fact" for i in q["support"])
        assert q["subject"] in q["prompt"].split()
        assert all(q["subject"] not in doc_text(by_id[i]).split() for i in q["support"]), q["id"]
        assert all(q["completion"].strip() in doc_text(by_id[i]).split() for i in q["support"])
    links = [d for d in docs if d["role"] == "link"]
    assert {d["fact"] for d in links} == set(range(s.facts))  # every alias is linked somewhere


def test_instruct_loss_on_completions_only():
    """Instruction records are scored on their completions: prompt tokens never reach the loss."""
    import torch

    from bench.setting import SETTINGS, doc_record, generate, make_model
    from stride.demo import build_tokenizer
    from stride.model import LM

    s = SETTINGS["instruct"][1]
    _, docs, queries = generate(s)
    assert all("prompt" in d and "text" not in d for d in docs)
    assert any(q["relation"] == "behaviour" for q in queries)
    recs = [doc_record(d) for d in docs[:8]]
    tok = build_tokenizer([r.text for r in recs])
    lm = LM(make_model(s, tok), tok, torch.device("cpu"))
    batch = lm.encode(recs)
    for b, r in enumerate(recs):
        n_prompt = len(tok(r.prompt)["input_ids"])
        n_completion = len(tok(r.completion, add_special_tokens=False)["input_ids"])
        assert int(batch.scored[b].sum()) == n_completion
        assert not bool(batch.scored[b, : n_prompt - 1].any())


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
    """The default mode over 2 design seeds, the baselines, every reference row and a 2-query removal test."""
    from bench.run import main

    root = tmp_path_factory.mktemp("bench")
    from bench.methods import DEFAULT_MODE, MODE_ROWS

    others = ",".join(m for m in MODE_ROWS if m != DEFAULT_MODE)
    skip = others + ("" if importlib.util.find_spec("kronfluence") else ",kronfluence")
    info = main(["--quick", "--out", str(root / "results"), "--work", str(root / "work"),
                 "--cache", str(root / "cache"), "--skip", skip, "--seeds", "2",
                 "--removal", "--removal-queries", "2", "--removal-k", "5"])
    return root / "results", info


@pytest.mark.slow
def test_outputs_written(quick):
    out, info = quick
    assert (out / "REPORT.md").is_file() and (out / "lds.png").is_file() and (out / "scaling.png").is_file()
    assert json.loads((out / "results.json").read_text())["setting_key"] == info["setting_key"]
    gt = info["ground_truth"]
    assert gt["retrains"] == 10 and gt["report_retrains"] == [0, 7] and gt["tune_retrains"] == [8, 9]


@pytest.mark.slow
def test_every_method_ran_or_was_skipped(quick):
    _, info = quick
    m = info["methods"]
    from bench.methods import DEFAULT_MODE, MODE_ROWS

    default = MODE_ROWS[DEFAULT_MODE]
    for name in (default, "Gradient dot product (TracIn, final ckpt)",
                 "Gradient cosine", "BM25", "Representation similarity (final hidden, cosine)"):
        assert m[name]["status"] == "ok", name
    stride = m[default]
    assert stride["seeds"] == [0, 1] and set(stride["per_seed"]) == {"0", "1"} and "lds_mean_seed_sd" in stride
    assert f"{default}: M^T y, no sparse solve (ablation)" in m
    refs = [k for k, v in m.items() if v["status"] == "reference"]
    assert len(refs) == 5, refs  # planted support, same relation and answer, thresholded BM25, 2 counterfactual
    kf = m["Kronfluence EK-FAC"]
    assert kf["status"] == "ok" if importlib.util.find_spec("kronfluence") else kf["status"].startswith("skipped")
    rem = info["removal"]
    assert len(rem["queries"]) == 2 and "Random documents" in rem["rows"] and rem["retrains"] >= 2


@pytest.mark.slow
def test_numbers_finite_and_in_range(quick):
    _, info = quick
    for name, v in info["methods"].items():
        if v["status"] not in ("ok", "ablation", "floor", "reference"):
            continue
        for path, x in _numbers({k: val for k, val in v.items() if k not in ("config", "per_seed")}):
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
