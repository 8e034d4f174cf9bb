"""The `stride` command line: attribute --json, and errors as exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import write_corpus, write_model

from stride.config import BuildConfig
from stride.result import Attribution
from worker.build import build


def stride(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    model = write_model(root / "model")
    data = write_corpus(root / "corpus.jsonl", 40)
    return build(model, data, root / "store", BuildConfig(steps=20, num_subsets=16, memberships=3, rank=4),
                 device="cpu", show_progress=False)


def test_attribute_json(store: Path) -> None:
    proc = stride("attribute", "--store", str(store), "--prompt", "the old farmer",
                  "--completion", " crossed the green river .", "--top-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # one JSON object and nothing else on stdout
    out = json.loads(lines[0])
    assert set(out) == set(Attribution.model_fields)  # the one result contract, as is
    assert isinstance(out["loss"], float) and math.isfinite(out["loss"]) and out["loss"] > 0
    corpus = {json.loads(x)["id"]: json.loads(x)["text"] for x in (store / "corpus.jsonl").read_text().splitlines()}
    ids = list(corpus)
    assert out["proponents"] and len(out["proponents"]) <= 3 and len(out["opponents"]) <= 3
    for side, sign in (("proponents", 1), ("opponents", -1)):
        for row in out[side]:
            assert set(row) == {"rank", "index", "id", "score", "text"}
            assert ids[row["index"]] == row["id"] and corpus[row["id"]] == row["text"]
            assert row["score"] * sign > 0
        scores = [r["score"] for r in out[side]]
        assert scores == sorted(scores, reverse=sign > 0)  # strongest first
    assert {"converged", "gap", "iterations", "lambda", "nonzeros", "intercept"} <= set(out["diagnostics"])
    assert {"forward", "measure", "solve", "total"} <= set(out["timing_ms"])


def test_attribute_text(store: Path) -> None:
    proc = stride("attribute", "--store", str(store), "--prompt", "the old farmer crossed the river .")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("loss ") and "proponents:" in proc.stdout and "opponents:" in proc.stdout


def test_attribute_on_a_missing_store_fails_cleanly(tmp_path: Path) -> None:
    proc = stride("attribute", "--store", str(tmp_path / "nope"), "--prompt", "x", "--json")
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_build_rejects_an_unknown_fit_mode(tmp_path: Path) -> None:
    proc = stride("build", "--model", str(tmp_path), "--data", str(tmp_path / "c.jsonl"), "--out",
                  str(tmp_path / "s"), "--fit", "magic")
    assert proc.returncode != 0 and "--fit must be one of" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_attribute_ids_span_and_chat(store: Path) -> None:
    text = json.loads(stride("attribute", "--store", str(store), "--prompt", "the old farmer", "--completion",
                             " crossed the green river .", "--top-k", "3", "--json").stdout)
    ids = [t["id"] for t in text["tokens"]]
    proc = stride("attribute", "--store", str(store), "--prompt-ids", "5, 6", "--completion-ids",
                  ",".join(map(str, ids)), "--span", "0", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [t["scored"] for t in out["tokens"]] == [True] + [False] * (len(ids) - 1)
    assert out["scored_text"] == "crossed"
    proc = stride("attribute", "--store", str(store), "--messages",
                  '[{"role": "user", "content": "the old"}, {"role": "assistant", "content": " farmer"}]')
    assert proc.returncode == 2 and "chat template" in proc.stderr and "Traceback" not in proc.stderr
    proc = stride("attribute", "--store", str(store), "--messages", '[{"role": "user", "content": "the old"}]')
    assert proc.returncode == 2 and "assistant" in proc.stderr and "Traceback" not in proc.stderr


def test_build_config_file_gives_defaults_that_flags_override(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.jsonl", 20)
    cfg = tmp_path / "build.json"
    cfg.write_text(json.dumps({"steps": 2, "num_subsets": 16, "memberships": 5, "rank": 4, "fit": "magic"}))
    common = ("build", "--model", str(model), "--data", str(data), "--config", str(cfg), "--quiet")
    proc = stride(*common, "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "--fit must be one of" in proc.stderr and not (tmp_path / "bad").exists()
    proc = stride(*common, "--out", str(tmp_path / "s"), "--fit", "fidelity", "--memberships", "3", "--ridge", "0.5",
                  "--finetune-probes", "8", "--token-weights")
    assert proc.returncode == 0, proc.stderr
    built = json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]
    # the flags won, the file filled in the rest
    assert (built["fit"], built["memberships"], built["steps"], built["rank"]) == ("fidelity", 3, 2, 4)
    assert (built["ridge"], built["finetune_probes"], built["token_weights"]) == (0.5, 8, True)
