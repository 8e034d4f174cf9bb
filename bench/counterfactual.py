"""The exact subset-counterfactual ceiling: STRIDE's design and solver fed true subset effects.

For each subset k of the default STRIDE build's design, a copy of the base (pre-fine-tuning) model
is fine-tuned on subset k's documents alone and every query's loss drop y_k = L_base(q) - L_k(q) is
measured; the core's Lasso then recovers scores from these K measurements. It shows what the
design and solver can reach when the operators are perfect, so a reader can tell an operator
problem from a design or solver problem.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.setting import Built, batch_loss, doc_record, query_losses
from stride.model import LM


def measurements(b: Built, K: int, d: int, seed: int, cache_root: Path, steps: int = 10, lr: float | None = None,
                 log=print) -> dict:
    """{'Y': (K, Q) loss drops, 'seconds', 'reused', 'lr', 'steps'}; cached after every 50 subsets.

    Each subset: ``steps`` full-batch Adam steps (constant lr, default the setting's recipe lr) from the
    base weights, mean token NLL (completions only for prompt/completion records).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stride.design import random_design

    s = b.setting
    lr = s.lr if lr is None else lr
    cache = cache_root / s.key() / "counterfactual"
    cache.mkdir(parents=True, exist_ok=True)
    f = cache / f"K{K}-d{d}-seed{seed}-steps{steps}-lr{lr:g}.pt"
    state = torch.load(f) if f.is_file() else {"rows": [], "seconds": 0.0}
    reused = len(state["rows"])
    membership = random_design(len(b.docs), K, d, seed)
    tok = AutoTokenizer.from_pretrained(b.base_dir)
    model = AutoModelForCausalLM.from_pretrained(b.base_dir, dtype=torch.float32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    base = query_losses(model, tok, b.queries)
    batch = LM(model, tok, torch.device("cpu")).encode([doc_record(x) for x in b.docs])
    t = time.perf_counter()
    for k in range(reused, K):
        model.load_state_dict(start)
        model.train().requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        rows = membership.members(k).long()
        for _ in range(steps):
            loss = batch_loss(model, batch, rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval().requires_grad_(False)
        state["rows"].append(base - query_losses(model, tok, b.queries))
        if (k + 1) % 50 == 0 or k + 1 == K:
            state["seconds"] += time.perf_counter() - t
            t = time.perf_counter()
            torch.save(state, f.with_suffix(".tmp"))
            f.with_suffix(".tmp").replace(f)
            log(f"  counterfactual subsets {k + 1}/{K}")
    return {"Y": torch.stack(state["rows"][:K]), "membership": membership, "seconds": state["seconds"],
            "reused": reused, "lr": lr, "steps": steps}


def ceiling_scores(m: dict, lam_ratio: float) -> tuple[torch.Tensor, dict]:
    """(Q, n) Lasso scores from the exact measurements, with the core's solver, and its diagnostics."""
    from stride.recovery import SparseDesign, solve

    sol = solve(SparseDesign(m["membership"]), m["Y"], lam_ratio)
    w = sol.dense().T
    return w, {"lam_ratio": lam_ratio, "converged_share": float(sol.converged.float().mean()),
               "mean_nonzeros": float((w != 0).sum(1).float().mean())}
