"""Operator fitting: the losses of both modes and the frozen-feature source they read.

The loops (checkpoints, progress, data parallelism) live in ``worker.build``; this module is the
math of one step, so it can be tested without any orchestration.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stride.corpus import Corpus
from stride.design import Membership
from stride.model import LM
from stride.operators import SteeringOperators


@dataclass
class Features:
    h: Tensor  # (E, T, d) layer activations
    z: Tensor  # (E, T, d) final normed states
    targets: Tensor  # (E, T) next-token ids, -100 where not scored
    mask: Tensor  # (E, T) bool, real (non-pad) positions


class FeatureSource:
    """Frozen activations of corpus examples: cached when they fit the budget, else recomputed.

    Either way the result for a set of indices is the same, so the budget never changes a build's
    content, only its speed and memory.
    """

    def __init__(self, lm: LM, corpus: Corpus, layer: int, budget_mb: int, chunk: int = 64):
        self.lm, self.corpus, self.layer, self.chunk = lm, corpus, layer, chunk
        self.cache: Features | None = None
        n, d = len(corpus), lm.hidden_size
        est_len = min(lm.max_length, int(corpus.lengths.mean() // 3) + 8)
        if n * est_len * d * 2 * 4 <= budget_mb * 2**20:
            self.cache = self._compute(torch.arange(n))

    def _compute(self, indices: Tensor) -> Features:
        parts = []
        for start in range(0, len(indices), self.chunk):
            idx = indices[start : start + self.chunk].tolist()
            batch = self.lm.encode(self.corpus.records(idx))
            h, z = self.lm.features(batch, self.layer)
            parts.append(Features(h, z, batch.targets.to(h.device), batch.attention_mask.bool().to(h.device)))
        width = max(p.h.shape[1] for p in parts)
        fields = ("h", "z", "targets", "mask")
        return Features(*(torch.cat([_pad(getattr(p, f), width) for p in parts]) for f in fields))

    def get(self, indices: Tensor) -> Features:
        if self.cache is None:
            return self._compute(indices)
        c = self.cache
        idx = indices.to(c.h.device)
        mask = c.mask[idx]
        width = int(mask.sum(1).max())
        return Features(c.h[idx, :width], c.z[idx, :width], c.targets[idx, :width], mask[:, :width])


def _pad(t: Tensor, width: int) -> Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    fill = -100 if t.dtype == torch.long else 0
    shape = (t.shape[0], extra, *t.shape[2:])
    return torch.cat([t, t.new_full(shape, fill)], 1)


@dataclass
class Step:
    """One optimisation step's pairs: (subset, member) for fidelity, (subset, outsider) for stability."""

    ks: Tensor  # (S,) subsets
    fid_k: Tensor  # (P,) subset of each fidelity pair
    fid_e: Tensor  # (P,) corpus index of each fidelity pair
    stab_k: Tensor  # (Q,)
    stab_e: Tensor  # (Q,)


def sample_step(membership: Membership, batch_size: int, members: int, gen: torch.Generator) -> Step:
    """``batch_size`` subsets, ``members`` of each (with replacement) and up to as many outsiders."""
    K, n = membership.num_subsets, membership.num_examples
    S = min(batch_size, K)
    ks = torch.randperm(K, generator=gen)[:S]
    start, size = membership.crow[ks], membership.sizes()[ks]
    pick = (torch.rand(S, members, generator=gen) * size[:, None]).long()
    fid_e = membership.col[start[:, None] + pick]
    cand = torch.randint(n, (S, 2 * members), generator=gen)
    inside = (membership.subsets_of()[cand] == ks[:, None, None]).any(-1)
    # keep the first ``members`` outsiders of each row (a stable sort puts them first)
    order = torch.argsort(inside.to(torch.int8), dim=1, stable=True)[:, :members]
    stab_e = torch.gather(cand, 1, order)
    ok = ~torch.gather(inside, 1, order)
    rows = ks[:, None].expand(-1, members)
    return Step(ks, rows.reshape(-1), fid_e.reshape(-1), rows[ok], stab_e[ok])


def step_loss(
    ops: SteeringOperators, lm: LM, source: FeatureSource, step: Step, stability_weight: float
) -> tuple[Tensor, dict[str, float]]:
    """Fidelity NLL of each subset's own examples plus KL stability on examples outside it."""
    uniq = torch.unique(torch.cat([step.fid_e, step.stab_e]))
    feats = source.get(uniq)
    dev = feats.h.device
    u = ops.project(feats.h)  # (E, T, r)

    def steered_logits(e_idx: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.searchsorted(uniq, e_idx).to(dev)
        return rows, lm.logits(feats.z[rows] + ops.shift(u[rows], k.to(dev)))

    # fidelity: operator k should make its members likelier, as training on them would
    rows, logits = steered_logits(step.fid_e, step.fid_k)
    targets = feats.targets[rows]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    fid = (nll.sum(1) / (targets != -100).sum(1).clamp_min(1)).mean()
    stats = {"fidelity": float(fid.detach())}
    loss = fid
    if stability_weight > 0 and step.stab_e.numel():
        # stability: outside its subset, operator k should leave the model's predictions alone
        rows, logits = steered_logits(step.stab_e, step.stab_k)
        base = F.log_softmax(lm.logits(feats.z[rows]), -1)
        kl = (base.exp() * (base - F.log_softmax(logits, -1))).sum(-1)  # (Q, T)
        mask = feats.mask[rows]
        stab = (kl * mask).sum() / mask.sum().clamp_min(1)
        stats["stability"] = float(stab.detach())
        loss = loss + stability_weight * stab
    return loss, stats


def finetune_shift(
    lm: LM, work: torch.nn.Module, base_state: dict[str, Tensor], train: list, probes: list,
    layer: int, steps: int, lr: float,
) -> tuple[Tensor, Tensor]:
    """Fine-tune ``work`` (a copy of the model) on ``train`` for a few steps from ``base_state``.

    Returns the probes' layer activations under the base model and the change in their final
    normed states, on real positions only: (P_tok, d) each.
    """
    work.load_state_dict(base_state)
    work.train().requires_grad_(True)
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    batch = lm.encode(train).to(lm.device)
    for _ in range(steps):
        logits = work(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        loss = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    work.eval().requires_grad_(False)
    pb = lm.encode(probes).to(lm.device)
    h, z0 = lm.features(pb, layer)
    with torch.no_grad():
        z1 = work(input_ids=pb.input_ids, attention_mask=pb.attention_mask, output_hidden_states=True,
                  use_cache=False).hidden_states[-1]
    real = pb.attention_mask.bool()
    return h[real], (z1 - z0)[real]


def ridge_operator(u: Tensor, dz: Tensor, ridge: float) -> Tensor:
    """A_k = argmin ||u A - dz||^2 + ridge * n * ||A||^2, in closed form: (r, d)."""
    r = u.shape[1]
    gram = u.T @ u + ridge * u.shape[0] * torch.eye(r, device=u.device)
    return torch.linalg.solve(gram, u.T @ dz)


def model_copy(lm: LM) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    work = copy.deepcopy(lm.model)
    return work, {k: v.clone() for k, v in lm.model.state_dict().items()}


class OperatorAdam:
    """Adam for the shared basis, lazy (row-wise) Adam for the operators.

    A step samples a few subsets, so only their rows of A get gradient; a dense Adam would still
    rewrite all K x r x d entries (most of a step's time at K ~ 1000) and keep moving operators
    that saw no data through stale momentum.
    """

    def __init__(self, ops: SteeringOperators, lr: float):
        self.ops = ops
        self.basis = torch.optim.Adam([ops.w_psi], lr=lr)
        self.rows = torch.optim.SparseAdam([ops.A], lr=lr)

    def zero_grad(self) -> None:
        self.basis.zero_grad(set_to_none=True)
        self.rows.zero_grad(set_to_none=True)

    def step(self) -> None:
        A = self.ops.A
        if A.grad is not None and not A.grad.is_sparse:
            g = A.grad
            touched = torch.nonzero(g.flatten(1).abs().amax(1) > 0).squeeze(1)
            A.grad = torch.sparse_coo_tensor(touched[None], g[touched], g.shape, check_invariants=False)
        self.basis.step()
        self.rows.step()

    def state_dict(self) -> dict:
        return {"basis": self.basis.state_dict(), "rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.basis.load_state_dict(state["basis"])
        self.rows.load_state_dict(state["rows"])
