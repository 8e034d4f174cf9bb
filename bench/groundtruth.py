"""LDS ground truth: retrain from the base on random 50% subsets and record every query's loss.

Cached on disk under ``bench/cache/<setting key>/`` after every retrain, so an interrupted run
resumes and later runs reuse it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.setting import Built, doc_record, query_losses, train


def ground_truth(b: Built, cache_root: Path, log=print) -> dict:
    """{'masks': (S, n) bool, 'losses': (S, Q), 'seconds': retraining time, 'cached': reused count}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = b.setting
    cache = cache_root / s.key()
    cache.mkdir(parents=True, exist_ok=True)
    f = cache / "ground_truth.pt"
    state = torch.load(f) if f.is_file() else {"masks": [], "losses": [], "seconds": []}
    reused = len(state["masks"])
    n = len(b.docs)
    recs = [doc_record(d) for d in b.docs]
    tok = AutoTokenizer.from_pretrained(b.base_dir)
    for i in range(reused, s.retrains):
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(10_000 + s.seed * 1000 + i)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[: int(round(n * s.subset_fraction))]] = True
        model = AutoModelForCausalLM.from_pretrained(b.base_dir, dtype=torch.float32)
        train(model, tok, [recs[j] for j in mask.nonzero().flatten().tolist()], s.epochs, s.lr, s.batch_size,
              s.seed + 1)
        state["masks"].append(mask)
        state["losses"].append(query_losses(model, tok, b.queries))
        state["seconds"].append(time.perf_counter() - t)
        torch.save(state, cache / "ground_truth.pt.tmp")
        (cache / "ground_truth.pt.tmp").replace(f)
        log(f"  retrain {i + 1}/{s.retrains}: {state['seconds'][-1]:.1f}s")
    return {"masks": torch.stack(state["masks"][: s.retrains]), "losses": torch.stack(state["losses"][: s.retrains]),
            "seconds": float(sum(state["seconds"][: s.retrains])), "reused": min(reused, s.retrains)}
