"""Removal test: retrain without a method's top proponents of a query and measure how much its loss rises.

The STRIDE article's check ("removing the recovered top examples causes a measurable drop in the
target prediction's confidence"). Each retrain starts from the base with the setting's recipe and
seed on the corpus minus the removed documents; the rise is against a full-corpus retrain with the
same recipe and seed. Comparators: k random documents, and k random documents stating other facts
with the same answer (what matching the answer alone would remove). Every retrain's query losses
are cached under ``<cache>/<setting key>/removal/`` keyed by the removed ids, so a run resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.setting import Built, doc_record, query_losses, top1_correct, train

RANDOM = "Random documents"
SAME_ANSWER = "Random documents with the same answer (other facts)"


def retrain_losses(b: Built, removed: list[int], cache_root: Path) -> tuple[torch.Tensor, float, bool]:
    """(query losses (Q,), seconds, cached) of a retrain on every document but ``removed``."""
    r = retrain(b, removed, cache_root)
    return r["losses"], 0.0 if r["cached"] else r["seconds"], r["cached"]


def retrain(b: Built, removed: list[int], cache_root: Path) -> dict:
    """A retrain on every document but ``removed``: each query's loss and top-1 correctness, the
    training seconds, whether it came from the cache (files written before top-1 was kept hold none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = b.setting
    ids = sorted(b.docs[i]["id"] for i in removed)
    key = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:20]
    f = cache_root / s.key() / "removal" / f"{key}.pt"
    if f.is_file():
        saved = torch.load(f)
        return {"losses": saved["losses"], "top1": saved.get("top1"), "seconds": saved.get("seconds"),
                "cached": True}
    t = time.perf_counter()
    gone = set(removed)
    tok = AutoTokenizer.from_pretrained(b.base_dir)
    model = AutoModelForCausalLM.from_pretrained(b.base_dir, dtype=torch.float32)
    train(model, tok, [doc_record(x) for i, x in enumerate(b.docs) if i not in gone], s.epochs, s.lr,
          s.batch_size, s.seed + 1)
    seconds = time.perf_counter() - t
    out = {"removed": ids, "losses": query_losses(model, tok, b.queries), "top1": top1_correct(model, tok, b.queries),
           "seconds": seconds}
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, f.with_suffix(".tmp"))
    f.with_suffix(".tmp").replace(f)
    return {**out, "cached": False}


def removal_sets(b: Built, scores: dict[str, torch.Tensor], qidx: list[int], ks: list[int], seed: int) -> dict:
    """{(row, k): [removed indices per chosen query]} for every method row and the two comparators."""
    n = len(b.docs)
    out = {}
    for name, S in scores.items():
        for k in ks:
            out[(name, k)] = [torch.argsort(S[q], descending=True, stable=True)[:k].tolist() for q in qidx]
    for k in ks:
        rnd, same = [], []
        for q in qidx:
            rng = np.random.default_rng([seed, q, k])
            rnd.append(sorted(rng.choice(n, k, replace=False).tolist()))
            query = b.queries[q]
            # queries carry their answer as the completion (no "object" key): compare with it, as the
            # same-relation-and-answer reference row does (bench.methods.reference_rows)
            answer = query.get("object", query["completion"].strip())
            pool = [i for i, d in enumerate(b.docs) if d.get("object") == answer
                    and d.get("relation") == query["relation"] and d["id"] not in query["support"]]
            same.append(sorted(rng.choice(pool, min(k, len(pool)), replace=False).tolist()) if pool else [])
        out[(RANDOM, k)], out[(SAME_ANSWER, k)] = rnd, same
    return out


def paired_excess(rows: dict, name: str, over: str, k: str) -> dict | None:
    """Mean and standard error of row ``name``'s rise minus row ``over``'s on the queries both cover.

    Every removal is compared with one full-corpus retrain, whose own training noise shifts each
    query's rises by the same amount in every row; the paired difference cancels that shift.
    """
    a, b = rows.get(name, {}).get(k), rows.get(over, {}).get(k)
    if not a or not b or "query_ids" not in a or "query_ids" not in b:
        return None
    other = dict(zip(b["query_ids"], b["per_query"], strict=True))
    d = np.array([x - other[q] for q, x in zip(a["query_ids"], a["per_query"], strict=True) if q in other])
    if len(d) < 2:
        return None
    return {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(len(d))), "queries": len(d),
            "positive_share": float((d > 0).mean())}


def removal_test(b: Built, scores: dict[str, torch.Tensor], cache_root: Path, num_queries: int = 30,
                 ks: tuple[int, ...] = (5,), seed: int = 0, log=print) -> dict:
    """Mean rise of the chosen queries' losses per (row, k), with retrain count and time."""
    Q = len(b.queries)
    qidx = sorted(np.random.default_rng(seed).choice(Q, min(num_queries, Q), replace=False).tolist())
    full, sec, cached = retrain_losses(b, [], cache_root)
    retrains, seconds, reused = 1, sec, int(cached)
    rows = {}
    for (name, k), sets in removal_sets(b, scores, qidx, list(ks), seed).items():
        rise, used = [], []
        for q, removed in zip(qidx, sets, strict=True):
            if not removed:  # no document qualifies (e.g. no other fact has this answer): not a removal
                continue
            losses, sec, cached = retrain_losses(b, removed, cache_root)
            retrains, seconds, reused = retrains + 1, seconds + sec, reused + int(cached)
            rise.append(float(losses[q] - full[q]))
            used.append(b.queries[q]["id"])
        if not rise:
            continue
        r = np.asarray(rise)
        rows.setdefault(name, {})[str(k)] = {"mean_rise": float(r.mean()), "queries": len(rise),
                                             "sem": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
                                             "per_query": rise, "query_ids": used}
        log(f"  removal {name} top-{k}: mean rise {r.mean():.4f} over {len(rise)} queries ({retrains} retrains "
            f"so far, {seconds:.0f}s)")
    return {"queries": [b.queries[q]["id"] for q in qidx], "ks": list(ks), "rows": rows,
            "full_corpus_loss_mean": float(full[qidx].mean()), "retrains": retrains, "reused_from_cache": reused,
            "retrain_seconds": seconds, "seed": seed}
