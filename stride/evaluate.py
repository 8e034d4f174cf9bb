"""Planted-fact recall of a store against queries with known supporting documents."""

from __future__ import annotations

import json
from pathlib import Path

from stride.config import Query
from stride.query import Attributor


def planted_recall(attributor: Attributor, queries_path: str | Path, ks: tuple[int, ...] = (1, 5),
                   batch: int = 16) -> dict[str, float]:
    """Mean recall@k of each query's ``support`` ids among its top-k proponents, and MRR."""
    rows = [json.loads(line) for line in Path(queries_path).read_text().splitlines() if line.strip()]
    top = max(ks)
    recalls = {k: 0.0 for k in ks}
    mrr = 0.0
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        results = attributor.attribute_batch([Query(r["prompt"], r.get("completion")) for r in part],
                                             top_k=max(top, 50), include_text=False)
        for r, res in zip(part, results, strict=True):
            ranked = [p.id for p in res.proponents]
            support = set(r["support"])
            for k in ks:
                recalls[k] += len(support & set(ranked[:k])) / min(len(support), k)
            first = next((i for i, pid in enumerate(ranked) if pid in support), None)
            mrr += 0.0 if first is None else 1.0 / (first + 1)
    n = len(rows)
    return {**{f"recall@{k}": v / n for k, v in recalls.items()}, "mrr": mrr / n, "queries": n}
