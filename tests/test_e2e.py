"""End to end on the embedded default: demo assets -> build -> attribute every planted fact."""

from __future__ import annotations

import json
from pathlib import Path

from stride.evaluate import planted_recall
from stride.query import Attributor


def test_planted_fact_recall(demo_dir: Path, demo_store: Path) -> None:
    summary = json.loads((demo_dir / "demo.json").read_text())
    assert summary["fact_accuracy"] > 0.8, "the demo model must know its facts for recall to mean anything"
    attributor = Attributor.from_store(demo_store)
    scores = planted_recall(attributor, demo_dir / "queries.jsonl")
    print(f"planted-fact recall on the demo: {scores}")
    assert scores["queries"] == summary["facts"]
    assert scores["recall@5"] >= 0.8, scores
    assert scores["mrr"] > 0.5, scores
