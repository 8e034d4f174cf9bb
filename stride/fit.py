"""Operator fitting: the losses of both modes and the frozen-feature source they read.

The loops (checkpoints, progress, data parallelism) live in ``worker.build``; this module is the
math of one step, so it can be tested without any orchestration.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from stride.config import BuildConfig
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
    fid_ids: Tensor  # (E, T, m) tokens of each position's fidelity target distribution
    fid_logq: Tensor  # (E, T, m + 1) their log-probabilities, then the rest's (one tail bucket)
    stab_ids: Tensor  # (E, T, m') the frozen model's own top tokens: the stability target
    stab_logq: Tensor  # (E, T, m' + 1)
    fid_w: Tensor  # (E, T) weight of each position in the fidelity term (1 unless token weighting)

    FIELDS = ("h", "z", "targets", "mask", "fid_ids", "fid_logq", "stab_ids", "stab_logq", "fid_w")

    def take(self, rows: Tensor, width: int) -> Features:
        return Features(*(getattr(self, f)[rows, :width] for f in self.FIELDS))


@dataclass
class Targets:
    """What the operators are fitted toward, per mode (METHOD.md).

    ``fidelity``/``add``: the observed next token (make the subset likelier); ``revert``: the
    reference checkpoint's next-token distribution (undo what training on the subset did);
    ``forget``: the frozen model's distribution with the observed token's probability scaled by
    ``forget_factor`` (a reference-free stand-in for leaving the subset out). Stability always
    targets the frozen model's own distribution on outsiders.
    """

    mode: str
    top_k: int = BuildConfig.target_top_k
    reference: LM | None = None
    forget_factor: float = BuildConfig.forget_factor
    token_weights: bool = BuildConfig.token_weights  # revert: weight positions by how much training lowered NLL

    @classmethod
    def of(cls, cfg: BuildConfig, reference: LM | None) -> Targets:
        """The targets a resolved build config asks for; ``reference`` is used by revert only."""
        return cls(cfg.fit, cfg.target_top_k, reference if cfg.fit == "revert" else None, cfg.forget_factor,
                   cfg.token_weights)


def compress(logp: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """A distribution (..., V) as its top-k tokens plus one tail bucket: ids (..., k), log q (..., k + 1).

    Keeping ~64 of V tokens bounds the cache and the per-step work at any vocabulary; the tail bucket
    keeps the KL a proper divergence between the coarsened distributions.
    """
    V = logp.shape[-1]
    if top_k <= 0 or top_k >= V:
        ids = torch.arange(V, device=logp.device).expand(logp.shape)
        return ids, torch.cat([logp, torch.full_like(logp[..., :1], -80.0)], -1)
    top, ids = logp.topk(top_k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return ids, torch.cat([top, rest], -1).clamp_min(-80.0)  # -80: exp() is 0, no inf - inf


def soft_kl(logits: Tensor, ids: Tensor, logq: Tensor) -> Tensor:
    """KL(q || softmax(logits)) per position over the coarsened distributions: (..., V) -> (...).

    Only the target's tokens are gathered, so no (..., V) probability tensor is formed beyond the
    log-sum-exp; a one-hot target (k = 1, empty tail) makes this the NLL of that token.
    """
    top = torch.gather(logits, -1, ids) - logits.logsumexp(-1, keepdim=True)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    logp = torch.cat([top, tail[..., None]], -1)
    return (logq.exp() * (logq - logp)).sum(-1)


class FeatureSource:
    """Frozen activations and targets of corpus examples: cached when they fit the budget, else recomputed.

    Either way the result for a set of indices is the same, so the budget never changes a build's
    content, only its speed and memory.
    """

    def __init__(self, lm: LM, corpus: Corpus, layer: int, budget_mb: int, targets: Targets | None = None,
                 chunk: int = 64):
        self.lm, self.corpus, self.layer, self.chunk = lm, corpus, layer, chunk
        self.spec = targets or Targets("fidelity")
        self.cache: Features | None = None
        n, d = len(corpus), lm.hidden_size
        est_len = min(lm.max_length, int(corpus.lengths.mean() // 3) + 8)
        m = self.spec.top_k if self.spec.top_k > 0 else lm.unembed.shape[0]
        if n * est_len * (2 * d * 4 + 2 * m * 12) <= budget_mb * 2**20:
            self.cache = self._compute(torch.arange(n))

    @torch.no_grad()
    def _compute(self, indices: Tensor) -> Features:
        parts = []
        for start in range(0, len(indices), self.chunk):
            idx = indices[start : start + self.chunk].tolist()
            batch = self.lm.encode(self.corpus.records(idx))
            h, z = self.lm.features(batch, self.layer)
            targets, mask = batch.targets.to(h.device), batch.attention_mask.bool().to(h.device)
            logp = torch.log_softmax(self.lm.logits(z).float(), -1)
            stab = compress(logp, self.spec.top_k)
            fid_ids, fid_logq, fid_w = self._fidelity(batch, targets, logp)
            parts.append(Features(h, z, targets, mask, fid_ids, fid_logq, *stab, fid_w))
        width = max(p.h.shape[1] for p in parts)
        return Features(*(torch.cat([_pad(getattr(p, f), width) for p in parts]) for f in Features.FIELDS))

    def _fidelity(self, batch, targets: Tensor, logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        ones = torch.ones_like(logp[..., 0])
        tok = targets.clamp_min(0)[..., None]
        if spec.mode == "revert":
            _, z_ref = spec.reference.features(batch, 0)
            ref = torch.log_softmax(spec.reference.logits(z_ref).float(), -1).to(logp.device)
            w = ones
            if spec.token_weights:  # reference NLL minus deployed NLL of the observed token, floored at 0
                w = (torch.gather(logp, -1, tok) - torch.gather(ref, -1, tok)).squeeze(-1).clamp_min(0)
            return *compress(ref, spec.top_k), w
        if spec.mode == "forget":
            # leaving an example out makes its observed token less likely; the rest renormalises
            drop = torch.zeros_like(logp).scatter(-1, tok, math.log(spec.forget_factor))
            return *compress(torch.log_softmax(logp + drop, -1), spec.top_k), ones
        return tok, torch.stack([torch.zeros_like(ones), torch.full_like(ones, -80.0)], -1), ones

    def get(self, indices: Tensor) -> Features:
        if self.cache is None:
            return self._compute(indices)
        c = self.cache
        idx = indices.to(c.h.device)
        width = int(c.mask[idx].sum(1).max())
        return c.take(idx, width)


def _pad(t: Tensor, width: int) -> Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    fill = -100 if t.dtype == torch.long and t.dim() == 2 else 0
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
    seed: int = 0  # draws the scored positions when a step samples them


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
    seed = int(torch.randint(2**62, (1,), generator=gen))
    return Step(ks, rows.reshape(-1), fid_e.reshape(-1), rows[ok], stab_e[ok], seed)


def _select(t: Tensor, rows: Tensor, pick: Tensor | None) -> Tensor:
    """Rows of a (E, T, ...) feature, then (when sampling) the picked positions of each."""
    t = t[rows]
    if pick is None:
        return t
    return torch.gather(t, 1, pick if t.dim() == 2 else pick[..., None].expand(-1, -1, t.shape[-1]))


def _positions(valid: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """Up to ``count`` random valid positions per row, as a (P, count) index (invalid ones repeat 0)."""
    score = torch.rand(valid.shape, generator=gen).to(valid.device) + valid.float()
    return score.topk(min(count, valid.shape[1]), dim=1).indices


@dataclass
class Linearity:
    """The optional linearity term of METHOD.md: subset effects on probe texts should add up.

    On each step's sampled subsets S and a few random probe examples, the effects y_k = L_k(p) - L(p)
    are regressed (ridge, with intercept) on the subsets' sketched membership M_S R (R: n x q Gaussian);
    the term is the residual's share of the centred effects, so it is scale-free and cannot be met
    by shrinking every operator.
    """

    sketch: Tensor  # (K, q): row k sums the sketch rows R[i] of subset k's members
    num_examples: int
    weight: float
    probes: int
    ridge: float = 1e-3  # relative to the sketch Gram matrix's mean diagonal

    @classmethod
    def of(cls, membership: Membership, weight: float, probes: int, seed: int, width: int = 16) -> Linearity:
        R = torch.randn(membership.num_examples, width, generator=torch.Generator().manual_seed(seed + 2))
        rows = torch.repeat_interleave(torch.arange(membership.num_subsets), membership.sizes())
        sketch = torch.zeros(membership.num_subsets, width).index_add_(0, rows, R[membership.col.long()])
        return cls(sketch, membership.num_examples, weight, probes)


def ridge_residual_share(Y: Tensor, X: Tensor, ridge: float) -> Tensor:
    """||Y_c - X_c B||^2 / ||Y_c||^2 for the ridge fit B of centred Y (S, P) on centred X (S, q)."""
    Yc, Xc = Y - Y.mean(0), X - X.mean(0)
    gram = Xc.T @ Xc
    gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(X.shape[1], device=X.device)
    res = Yc - Xc @ torch.linalg.solve(gram, Xc.T @ Yc)
    return (res**2).sum() / (Yc**2).sum().clamp_min(1e-12)


def step_loss(
    ops: SteeringOperators, lm: LM, source: FeatureSource, step: Step, stability_weight: float,
    positions: int = 0, linearity: Linearity | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Fidelity toward each subset's targets on its members plus KL stability on examples outside it
    (plus the linearity term when given a positive weight).

    ``positions`` > 0 scores that many random positions per example instead of all of them: the
    steered logits over the vocabulary are most of a step's cost.
    """
    probes = None
    if linearity is not None and linearity.weight > 0:
        probes = torch.randint(linearity.num_examples, (linearity.probes,),
                               generator=torch.Generator().manual_seed(step.seed + 1))
    uniq = torch.unique(torch.cat([step.fid_e, step.stab_e] + ([probes] if probes is not None else [])))
    with record_function("stride.features"):
        feats = source.get(uniq)
    dev = feats.h.device
    gen = torch.Generator().manual_seed(step.seed)

    def divergence(e_idx: Tensor, k: Tensor, valid_of, ids_of, logq_of, weight_of=None) -> Tensor:
        rows = torch.searchsorted(uniq, e_idx).to(dev)
        valid = valid_of(rows)
        weight = valid.float() if weight_of is None else weight_of[rows] * valid
        pick = None
        if positions > 0 and positions < valid.shape[1]:
            pick = _positions(valid, positions, gen)
            valid, weight = torch.gather(valid, 1, pick), torch.gather(weight, 1, pick)

        def sel(t: Tensor) -> Tensor:
            return _select(t, rows, pick)

        with record_function("stride.steered_logits"):
            logits = lm.logits(sel(feats.z) + ops.shift(ops.project(sel(feats.h)), k.to(dev)))
        with record_function("stride.kl"):
            kl = soft_kl(logits, sel(ids_of), sel(logq_of)) * weight
        return (kl.sum(1) / valid.sum(1).clamp_min(1)).mean()

    fid = divergence(step.fid_e, step.fid_k, lambda r: feats.targets[r] != -100, feats.fid_ids, feats.fid_logq,
                     feats.fid_w)
    stats = {"fidelity": float(fid.detach())}
    loss = fid
    if stability_weight > 0 and step.stab_e.numel():
        stab = divergence(step.stab_e, step.stab_k, lambda r: feats.mask[r], feats.stab_ids, feats.stab_logq)
        stats["stability"] = float(stab.detach())
        loss = loss + stability_weight * stab
    if probes is not None:
        rows = torch.searchsorted(uniq, probes).to(dev)
        valid = feats.targets[rows] != -100
        pick = _positions(valid, positions, gen) if 0 < positions < valid.shape[1] else None

        h, z, tgt = (_select(t, rows, pick) for t in (feats.h, feats.z, feats.targets))
        S, P = len(step.ks), len(probes)
        count = (tgt != -100).sum(1).clamp_min(1)

        def nll(logits: Tensor, t: Tensor) -> Tensor:
            ce = F.cross_entropy(logits.transpose(1, 2), t, ignore_index=-100, reduction="none")
            return ce.sum(1) / count.repeat(len(t) // P)

        with record_function("stride.linearity"):
            with torch.no_grad():
                base = nll(lm.logits(z), tgt)
            u = ops.project(h).repeat(S, 1, 1)
            steered = lm.logits(z.repeat(S, 1, 1) + ops.shift(u, step.ks.repeat_interleave(P).to(dev)))
            effects = nll(steered, tgt.repeat(S, 1)).view(S, P) - base  # (S, P)
            lin = ridge_residual_share(effects, linearity.sketch[step.ks].to(dev), linearity.ridge)
        stats["linearity"] = float(lin.detach())
        loss = loss + linearity.weight * lin
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
