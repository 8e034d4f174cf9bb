"""Measurements: the loss drop of a query under every operator, in one batched computation.

Three ways, chosen per call (``loss_drops``):
- exact: the (Q, k, T, V) steered logits, chunked over operators; K T V d multiply-adds per query;
- top-V' slice (``top_v``): exact over each position's V' likeliest tokens and the target, the rest of
  the vocabulary to first order inside the log-partition (K T V' d, independent of V);
- first order (``first_order=True``): y_k = -sum_t g_t . (B(h_t) A_k), never forming steered logits.
By default the top-V' slice, V' = ``TOP_V``, is used wherever it at least halves the vocabulary or the
exact drop would be costly (K T V d > ``EXACT_LIMIT``; GPT-2's V = 50,257 at K = 1000: 3.9e11
multiply-adds, tens of seconds per query on a CPU, against 2.0e9), and the exact drop elsewhere. On
the reference benchmark (V = 1,437) the slice's attributions match the exact ones (LDS 0.402 both,
the same top-10 for every query, Spearman 1.000 mean and 0.954 on the worst query;
``bench/results/variants.md``) at 4.5 ms against 10.9 ms of measurement per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stride.model import LM
from stride.operators import SteeringOperators


def query_losses(lm: LM, z: Tensor, targets: Tensor, logits: Tensor | None = None) -> Tensor:
    """Mean next-token NLL over scored positions, per row: (Q,). ``logits``: lm.logits(z), if at hand."""
    logits = lm.logits(z) if logits is None else logits
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll.sum(1) / (targets != -100).sum(1).clamp_min(1)


def token_nll(lm: LM, z: Tensor, targets: Tensor) -> Tensor:
    """Each target's NLL, 0 where there is none: (Q, T). Only the targeted positions' logits are
    formed, so a query pays the LM head for its completion tokens alone."""
    out = torch.zeros(targets.shape, dtype=torch.float32, device=z.device)
    keep = targets != -100
    if bool(keep.any()):
        out[keep] = F.cross_entropy(lm.logits(z[keep]).float(), targets[keep], reduction="none")
    return out


EXACT_LIMIT = 1 << 33  # K T V d multiply-adds per query beyond which the exact drop is never the default
TOP_V = 256  # the default slice's width


@torch.no_grad()
def loss_drops(
    lm: LM, ops: SteeringOperators, h: Tensor, z: Tensor, targets: Tensor,
    first_order: bool = False, budget_elems: int = 1 << 26, top_v: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(L, Y): query losses (Q,) and drops Y[k, q] = L(q) - L_k(q), shape (K, Q).

    Exact through the softmax, chunked over operators so the (Q, k, T, V) logits stay within
    ``budget_elems``; or over a top-``top_v`` slice of the vocabulary (0: exact; None: TOP_V when
    V > 2 TOP_V or K T V d > EXACT_LIMIT, else exact); or first order, ``y_k = -sum_t g_t . (B(h_t) A_k)``, which
    never forms steered logits.
    """
    keep = targets != -100
    # only scored positions matter: compact them to cut the work
    width = int(keep.sum(1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    take = lambda t: torch.gather(t, 1, order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    h, z, targets = take(h), take(z), take(targets)
    valid = take(keep)
    targets = targets.masked_fill(~valid, -100)
    counts = valid.sum(1).clamp_min(1)
    u = ops.project(h) * valid[..., None]  # (Q, T, r)
    logits = lm.logits(z)  # (Q, T, V), once: at GPT-2's vocabulary each product is a large share of a query
    base = query_losses(lm, z, targets, logits)
    if first_order:
        g = F.softmax(logits, -1)
        g.scatter_add_(-1, targets.clamp_min(0)[..., None], -torch.ones_like(g[..., :1]))
        g = (g @ lm.unembed) * (valid / counts[:, None])[..., None]  # dL/dz_t: (Q, T, d)
        G = torch.einsum("qtr,qtd->qrd", u, g)
        return base, -torch.einsum("krd,qrd->kq", ops.A, G)
    Q, T = targets.shape
    V, d = lm.unembed.shape
    if top_v is None:
        top_v = TOP_V if V > 2 * TOP_V or ops.num_subsets * T * V * d > EXACT_LIMIT else 0
    if 0 < top_v < V:
        return base, _top_slice_drops(lm, ops, u, logits, targets, valid, counts, base, top_v, budget_elems)
    chunk = max(1, budget_elems // max(1, Q * T * V))
    drops = []
    for k0 in range(0, ops.num_subsets, chunk):
        A = ops.A[k0 : k0 + chunk]  # (k, r, d)
        dz = torch.einsum("qtr,krd->qktd", u, A)
        steered = lm.logits(z[:, None] + dz)  # (Q, k, T, V)
        tgt = targets[:, None].expand(-1, A.shape[0], -1)
        nll = F.cross_entropy(steered.permute(0, 3, 1, 2), tgt, ignore_index=-100, reduction="none")
        drops.append(base[:, None] - nll.sum(-1) / counts[:, None])
    return base, torch.cat(drops, 1).T.contiguous()


def _top_slice_drops(lm: LM, ops: SteeringOperators, u: Tensor, logits: Tensor, targets: Tensor, valid: Tensor,
                     counts: Tensor, base: Tensor, top_v: int, budget_elems: int) -> Tensor:
    """Drops with each position's log-partition exact over S_t (its ``top_v`` likeliest tokens and
    the target) and the tail to first order: sum_{v not in S} p_v e^{delta_v} ~ P e^{E[delta]}, with
    P the tail's probability and E[delta] = (B(h_t) A_k) . W_U^T p_tail / P its mean logit shift
    (exact to first order, always positive, a lower bound by Jensen). With S_t = the whole
    vocabulary this is the exact drop."""
    W = lm.unembed.float()  # a no-op for float32 models
    logp = torch.log_softmax(logits.float(), -1)  # (Q, T, V)
    p = logp.exp()
    tgt = targets.clamp_min(0)
    S = torch.topk(logp, top_v, dim=-1).indices  # (Q, T, V')
    has = (S == tgt[..., None]).any(-1)
    S[..., -1] = torch.where(has, S[..., -1], tgt)  # the target is always in the slice
    at_target = (S == tgt[..., None]).float().argmax(-1)  # its slot: (Q, T)
    logp_S = torch.gather(logp, -1, S)
    p_S = logp_S.exp()
    W_S = W[S]  # (Q, T, V', d)
    tail = (1.0 - p_S.sum(-1)).clamp_min(0.0)  # (Q, T)
    g_tail = p @ W - torch.einsum("qtv,qtvd->qtd", p_S, W_S)  # W_U^T p over the tail: (Q, T, d)
    mean_shift_dir = g_tail / tail.clamp_min(1e-30)[..., None]
    Q, T, Vp = S.shape
    chunk = max(1, budget_elems // max(1, Q * T * Vp))
    drops = []
    for k0 in range(0, ops.num_subsets, chunk):
        dz = torch.einsum("qtr,krd->qktd", u, ops.A[k0 : k0 + chunk])  # (Q, k, T, d)
        dS = torch.einsum("qktd,qtvd->qktv", dz, W_S)  # exact logit shifts over the slice
        terms = logp_S[:, None] + dS  # log(p_v e^{delta_v}), v in S
        tail_log = torch.log(tail.clamp_min(1e-30))[:, None] + torch.einsum("qktd,qtd->qkt", dz, mean_shift_dir)
        tail_log = torch.where(tail[:, None] > 0, tail_log, torch.full_like(tail_log, -torch.inf))
        log_z = torch.logsumexp(torch.cat([terms, tail_log[..., None]], -1), -1)  # (Q, k, T)
        target = torch.gather(terms, -1, at_target[:, None, :, None].expand(-1, dz.shape[1], -1, 1))[..., 0]
        nll = (log_z - target) * valid[:, None]
        drops.append(base[:, None] - nll.sum(-1) / counts[:, None])
    return torch.cat(drops, 1).T.contiguous()
