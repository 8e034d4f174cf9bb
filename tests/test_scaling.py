"""bench/scaling.py on tiny inputs: the whole-query row, the synthetic corpus, start-up beside another tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import write_model

from bench.scaling import startup_compare, stride_at, synthetic_corpus
from stride.corpus import Record
from stride.model import LM
from stride.operators import SteeringOperators


def test_synthetic_corpus_reads_back(tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 50)
    recs = corpus.records([0, 49, 7])
    assert [r.id for r in recs] == ["doc-00000000", "doc-00000049", "doc-00000007"]
    assert recs[1].text == "synthetic example 49 of the scaling corpus"
    assert corpus.index_of("doc-00000042") == 42


def test_stride_row_times_the_whole_query(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    lm = LM.load(model, "cpu")
    ref = SteeringOperators(lm.hidden_size, 64, 8)
    ref.init_basis(torch.randn(100, lm.hidden_size, generator=torch.Generator().manual_seed(0)), 0)
    with torch.no_grad():
        ref.A.normal_(0, 0.05)
    row = stride_at(400, lm, ref, Record("q", "the old farmer", " crossed the river ."), model, reps=2)
    assert row["n"] == 400 and row["timed_repeats"] == 2 and row["converged"]
    assert set(row["parts_ms"]) == {"forward", "measure", "solve"}
    assert row["latency_ms"] > 0 and row["other_ms"] >= 0  # each repeat's wall time includes its parts
    assert "ids.safetensors" in row["store_files"] and "corpus.jsonl" not in row["store_files"]
    assert row["store_bytes"] == sum(row["store_files"].values())


@pytest.mark.slow
def test_startup_beside_another_tree() -> None:
    root = Path(__file__).resolve().parents[1]
    rows = startup_compare([2000], {"a": root, "b": root}, K=64, d=4, log=lambda _: None)
    assert [r["tree"] for r in rows] == ["a", "b"] and all(r["n"] == 2000 and r["converged"] for r in rows)
    assert all(r["ready_s"] > 0 and r["rss_mb"] > 0 and r["format_version"] == 3 for r in rows)
