"""Store updates: add and remove training examples without a full rebuild (the method's side).

An update keeps the design's K subsets and the shared basis. Removed examples leave their subsets;
added ones join ``d`` subsets each, the currently smallest (ties broken by a seeded draw), so the
subset sizes stay balanced. Only the operators of subsets whose membership changed are refit, with
the build's own step (``stride.fit.step_loss``) on a *view* of the store restricted to those
subsets: the view's membership lists only their members and maps every other subset to -1, the
view's operators are their rows of A over the frozen basis. Every other operator is copied bit for
bit. The loop, checkpoints and resume are the build's (``worker.update``).

What removal guarantees (README, "Updating a store"): the example is gone from the corpus copy,
the ids, the offsets and the membership matrix, so no answer can name it; every operator whose
subset held it is refit on the remaining members. A warm-started operator can keep a trace of what
it learnt from the removed example (reduced by the refit, not erased); ``reset_removed`` restarts
those operators from zero, so no operator parameter has seen it. The shared basis, fitted once at
build time on every example, is never refit: only a full rebuild removes an example from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stride.config import _arg
from stride.corpus import Corpus, CorpusError
from stride.design import Membership, from_subsets
from stride.operators import SteeringOperators


class UpdateError(ValueError):
    """An update that cannot be applied; the message names the file, line or ids at fault."""


@dataclass
class UpdateConfig:
    """How an update refits; recorded in the new store's manifest (``lineage.update``)."""

    visits: int | None = _arg(None, "Refit: times each affected subset is drawn (default: half the build's "
                                    "visits, 200 at its default 400; README: Updating a store).")
    steps: int | None = _arg(None, "Refit optimiser steps (default: visits x affected subsets / batch size).")
    lr: float | None = _arg(None, "Refit learning rate (default: the build's).")
    seed: int = _arg(0, "Seed of the balanced assignment's tie-breaks and of every refit step's sampling.")
    reset_removed: bool = _arg(False, "Restart the operators of subsets that lost an example from zero instead "
                                      "of warm-starting them: no operator parameter has then seen it.")
    checkpoint_every: int = _arg(200, "Refit steps between checkpoints.")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


def read_removals(path: str | Path) -> list[str]:
    """One id per line (line endings stripped, blank lines skipped); a repeated id names both lines."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UpdateError(f"{path}: cannot read the ids to remove ({e})") from None
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line in seen:
            raise UpdateError(f"{path}:{lineno}: id {line!r} is listed twice (first on line {seen[line]})")
        seen[line] = lineno
    return list(seen)


def balanced_assignment(sizes: np.ndarray, count: int, d: int, seed: int) -> np.ndarray:
    """(count, d) int32: each new example joins the d currently smallest subsets (sizes updated as it
    goes), ties broken by a seeded uniform draw, so sizes end as even as d-subsets allow.

    O(count K): an argpartition of K per example (224 examples at K = 894 on the benchmark: ~10 ms).
    """
    K = sizes.size
    if not 1 <= d <= K:
        raise UpdateError(f"need 1 <= memberships ({d}) <= num_subsets ({K})")
    rng = np.random.default_rng(seed)
    load = sizes.astype(np.float64).copy()
    out = np.empty((count, d), np.int32)
    for i in range(count):
        pick = np.argpartition(load + rng.random(K), d - 1)[:d]  # jitter < 1: only breaks ties
        out[i] = np.sort(pick)
        load[pick] += 1
    return out


@dataclass
class Plan:
    """What an update changes: which old rows stay, the new design, which subsets must be refit."""

    keep: np.ndarray  # (n_kept,) old row of each kept example, increasing
    removed: list[str]  # ids, in the order given
    added: list[str]  # ids of the new examples, in file order (rows n_kept.. of the new store)
    membership: Membership  # the new design (n_kept + added examples)
    affected: Tensor  # (K',) subsets whose membership changed and still have members, increasing
    emptied: Tensor  # subsets left without members (their operator is zeroed, nothing to fit)
    lost: Tensor  # subsets that lost at least one example (reset when ``reset_removed``)


def plan_update(old_ids, old_membership: Membership, removed: list[str], added: Corpus | None,
                seed: int, where: str = "--remove") -> Plan:
    """Check the ids (unknown removals, ids clashing with kept ones) and lay out the new design.

    ``old_ids`` is the store's id sequence (with ``find`` or a list). An added example may reuse the
    id of one removed in the same update (a replaced document). Raises UpdateError naming the ids.
    """
    n = old_membership.num_examples
    find = _finder(old_ids)
    rows = []
    unknown = []
    for rid in removed:
        i = int(find(rid))
        (unknown if i < 0 else rows).append(rid if i < 0 else i)
    if unknown:
        raise UpdateError(f"{where}: {len(unknown)} id(s) not in the store: {_some(unknown)}")
    gone = np.zeros(n, bool)
    gone[np.asarray(rows, np.int64)] = True
    new_ids = list(added.ids) if added is not None else []
    clash = [rid for rid in new_ids if (i := int(find(rid))) >= 0 and not gone[i]]
    if clash:
        raise UpdateError(f"--add: {len(clash)} id(s) already in the store: {_some(clash)} (ids must be unique; "
                          "remove them in the same update to replace them)")
    keep = np.flatnonzero(~gone)
    if keep.size + len(new_ids) == 0:
        raise UpdateError("the update removes every example and adds none: nothing would be left")
    old_rows = old_membership.rows(np.int32)  # (n, d)
    K, d = old_membership.num_subsets, old_membership.memberships
    kept_rows = old_rows[keep]
    sizes = np.bincount(kept_rows.ravel(), minlength=K)
    lost = np.unique(old_rows[gone].ravel())
    new_rows = balanced_assignment(sizes, len(new_ids), d, seed)
    membership = from_subsets(torch.from_numpy(np.concatenate([kept_rows, new_rows])), K)
    changed = np.zeros(K, bool)
    changed[lost] = True
    changed[np.unique(new_rows.ravel())] = True
    empty = membership.sizes().numpy() == 0
    return Plan(keep, list(removed), new_ids, membership, torch.from_numpy(np.flatnonzero(changed & ~empty)),
                torch.from_numpy(np.flatnonzero(empty)), torch.from_numpy(lost.astype(np.int64)))


def _finder(ids):
    """``ids.find`` (packed or index ids), or a dict lookup for the plain lists of format <= 2 stores."""
    find = getattr(ids, "find", None)
    if find is not None:
        return find
    rows = {r: i for i, r in enumerate(ids)}
    return lambda rid: rows.get(rid, -1)


def _some(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(r) for r in ids[:limit])
    return shown + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def view(membership: Membership, subsets: Tensor) -> Membership:
    """The design restricted to ``subsets``: row j lists the members of ``subsets[j]``, and each
    example's subsets are renumbered into the view (-1 for the others), which is all
    ``stride.fit.sample_step`` reads: members for fidelity, non-members for stability."""
    sizes = membership.sizes()[subsets]
    crow = torch.zeros(len(subsets) + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(sizes, 0)
    col = torch.cat([membership.members(int(k)) for k in subsets]) if len(subsets) else membership.col[:0]
    remap = torch.full((membership.num_subsets,), -1, dtype=torch.int32)
    remap[subsets] = torch.arange(len(subsets), dtype=torch.int32)
    rows = remap[membership.subsets_of().long()]
    return Membership(crow, col, membership.num_examples, _subsets_of=rows)


def operator_view(ops: SteeringOperators, subsets: Tensor, reset: Tensor | None = None) -> SteeringOperators:
    """Operators of ``subsets`` over ``ops``'s basis, which is copied and frozen (no gradient); the rows
    listed in ``reset`` (global subset ids) start from zero, the others from their current value."""
    part = SteeringOperators(ops.A.shape[2], ops.rank, len(subsets))
    with torch.no_grad():
        part.h_mean.copy_(ops.h_mean)
        part.h_scale.copy_(ops.h_scale)
        part.w_psi.copy_(ops.w_psi)
        part.A.copy_(ops.A[subsets])
        if reset is not None and len(reset):
            part.A[torch.isin(subsets, reset)] = 0
    part.w_psi.requires_grad_(False)
    return part


def merge(ops: SteeringOperators, part: SteeringOperators, subsets: Tensor, emptied: Tensor) -> SteeringOperators:
    """``ops`` with the refit rows of ``part`` put back and emptied subsets zeroed; the rest unchanged."""
    out = SteeringOperators(ops.A.shape[2], ops.rank, ops.num_subsets)
    out.load_state_dict(ops.state_dict())
    with torch.no_grad():
        out.A[subsets] = part.A.detach().to(out.A.device)
        out.A[emptied] = 0
    return out.requires_grad_(False)


def refit_visits(cfg: UpdateConfig, build_visits: int) -> int:
    """Half the build's visits unless set. Adding 20% of the benchmark corpus to a store built at 100 visits,
    a quarter (25) left the added facts' recall@5 0.14 below a full build's and half (50) came within 0.03
    (``bench/results/update.visits-100.md``); at the default 400, 100 and 200 both did (``update.md``)."""
    return cfg.visits if cfg.visits is not None else max(1, build_visits // 2)


def refit_steps(cfg: UpdateConfig, visits: int, affected: int, batch_size: int) -> int:
    """Steps so that each affected subset is drawn ``visits`` times (a step draws min(batch, K'))."""
    if cfg.steps is not None:
        return int(cfg.steps)
    if affected == 0:
        return 0
    return -(-visits * affected // min(batch_size, affected))


def write_merged_corpus(old: Corpus, keep: np.ndarray, added: Corpus | None, out: Path) -> Corpus:
    """The new corpus file: the kept lines of ``old`` (bytes as stored) then the added file's lines,
    indexed by the offsets written (no second parse); ids: the kept ones, then the added ones."""
    tmp = out.with_name(f".{out.name}.tmp")
    lengths = []
    with open(tmp, "wb") as f:
        for corpus, rows in ((old, keep), (added, range(len(added)) if added is not None else None)):
            for raw in raw_lines(corpus, rows) if rows is not None else ():
                raw = raw if raw.endswith(b"\n") else raw + b"\n"
                f.write(raw)
                lengths.append(len(raw))
    tmp.replace(out)
    lengths = np.asarray(lengths, np.int64)
    offsets = np.zeros_like(lengths)
    np.cumsum(lengths[:-1], out=offsets[1:])
    ids = [old.ids[int(i)] for i in keep] + (list(added.ids) if added is not None else [])
    return Corpus(out, ids, offsets, lengths)


def raw_lines(corpus: Corpus, rows):
    """The stored bytes of some records, read by offset (the corpus is never parsed again)."""
    with open(corpus.path, "rb") as f:
        for i in rows:
            size = int(corpus.lengths[i])
            f.seek(int(corpus.offsets[i]))
            raw = f.read(size)
            if len(raw) != size:
                raise CorpusError(f"{corpus.path}#{i}: the file ends before this record (changed since it was read)")
            yield raw


def check_added_ids(added: Corpus) -> None:
    """Every added line must name its id: the default (its row number) would clash with the store's."""
    for i, raw in enumerate(raw_lines(added, range(len(added)))):
        if "id" not in json.loads(raw):
            with open(added.path, "rb") as f:
                line = f.read(int(added.offsets[i])).count(b"\n") + 1
            raise UpdateError(f"{added.path}:{line}: an added example needs an 'id' field (ids must stay unique "
                              "across the store's examples and the new ones)")


def ids_digest(ids) -> str:
    h = hashlib.sha256()
    for rid in ids:
        h.update(rid.encode())
        h.update(b"\n")
    return h.hexdigest()
