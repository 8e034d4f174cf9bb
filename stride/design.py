"""Random subset design: each example joins exactly ``d`` of ``K`` subsets.

The membership matrix M (K x n) is then a left-d-regular bipartite graph, an expander with high
probability, which is what makes sparse recovery from K << n measurements work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Membership:
    """M in CSR form: row k lists the examples of subset k, in increasing order."""

    crow: Tensor  # (K+1,) int64
    col: Tensor  # (K*avg,) int64
    num_examples: int
    _subsets_of: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_subsets(self) -> int:
        return int(self.crow.numel() - 1)

    @property
    def memberships(self) -> int:
        return int(self.col.numel() // self.num_examples)

    def members(self, k: int) -> Tensor:
        return self.col[self.crow[k] : self.crow[k + 1]]

    def subsets_of(self) -> Tensor:
        """(n, d): the subsets each example belongs to, computed once."""
        if self._subsets_of is None:
            rows = torch.repeat_interleave(torch.arange(self.num_subsets), self.sizes())
            order = torch.argsort(self.col, stable=True)
            self._subsets_of = rows[order].reshape(self.num_examples, -1)
        return self._subsets_of

    def sizes(self) -> Tensor:
        return self.crow[1:] - self.crow[:-1]

    def sparse(self, device: torch.device | str = "cpu", dtype=torch.float32) -> Tensor:
        values = torch.ones(self.col.numel(), dtype=dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is used on purpose
            warnings.simplefilter("ignore", UserWarning)
            m = torch.sparse_csr_tensor(self.crow, self.col, values, size=(self.num_subsets, self.num_examples),
                                        check_invariants=False)
        return m.to(device)

    def dense(self) -> Tensor:
        return self.sparse().to_dense()


def random_design(num_examples: int, num_subsets: int, d: int, seed: int) -> Membership:
    """Each example picks d distinct subsets uniformly; done in chunks to bound memory."""
    if not 1 <= d <= num_subsets:
        raise ValueError(f"need 1 <= memberships ({d}) <= num_subsets ({num_subsets})")
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, (1 << 22) // num_subsets)
    picks = []
    for start in range(0, num_examples, chunk):
        rows = min(chunk, num_examples - start)
        picks.append(torch.rand(rows, num_subsets, generator=gen).topk(d, dim=1).indices)
    return from_subsets(torch.cat(picks), num_subsets)


def from_subsets(subsets: Tensor, num_subsets: int) -> Membership:
    """The membership whose example i belongs to the subsets in row i of ``subsets`` (n, d)."""
    n, d = subsets.shape
    examples = torch.arange(n).repeat_interleave(d)
    flat = subsets.reshape(-1).cpu()
    order = torch.argsort(flat * n + examples)
    counts = torch.bincount(flat, minlength=num_subsets)
    crow = torch.zeros(num_subsets + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(counts, 0)
    return Membership(crow, examples[order], n)
