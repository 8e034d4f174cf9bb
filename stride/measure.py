"""Measurements: the loss drop of a query under every operator, in one batched computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stride.model import LM
from stride.operators import SteeringOperators


def query_losses(lm: LM, z: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token NLL over scored positions, per row: (Q,)."""
    nll = F.cross_entropy(lm.logits(z).transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll.sum(1) / (targets != -100).sum(1).clamp_min(1)


@torch.no_grad()
def loss_drops(
    lm: LM, ops: SteeringOperators, h: Tensor, z: Tensor, targets: Tensor,
    first_order: bool = False, budget_elems: int = 1 << 26,
) -> tuple[Tensor, Tensor]:
    """(L, Y): query losses (Q,) and drops Y[k, q] = L(q) - L_k(q), shape (K, Q).

    Exact through the softmax, chunked over operators so the (Q, k, T, V) logits stay within
    ``budget_elems``; or first order, ``y_k = -sum_t g_t . (B(h_t) A_k)``, which never forms
    steered logits and so suits huge vocabularies.
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
    base = query_losses(lm, z, targets)
    if first_order:
        logits = lm.logits(z)
        g = F.softmax(logits, -1)
        g.scatter_add_(-1, targets.clamp_min(0)[..., None], -torch.ones_like(g[..., :1]))
        g = (g @ lm.unembed) * (valid / counts[:, None])[..., None]  # dL/dz_t: (Q, T, d)
        G = torch.einsum("qtr,qtd->qrd", u, g)
        return base, -torch.einsum("krd,qrd->kq", ops.A, G)
    Q, T = targets.shape
    V = lm.unembed.shape[0]
    chunk = max(1, budget_elems // max(1, Q * T * V))
    drops = []
    for k0 in range(0, ops.num_subsets, chunk):
        A = ops.A[k0 : k0 + chunk]  # (k, r, d)
        dz = torch.einsum("qtr,krd->qktd", u, A)
        logits = lm.logits(z[:, None] + dz)  # (Q, k, T, V)
        tgt = targets[:, None].expand(-1, A.shape[0], -1)
        nll = F.cross_entropy(logits.permute(0, 3, 1, 2), tgt, ignore_index=-100, reduction="none")
        drops.append(base[:, None] - nll.sum(-1) / counts[:, None])
    return base, torch.cat(drops, 1).T.contiguous()
