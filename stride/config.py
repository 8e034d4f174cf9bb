"""Serialisable settings for a build and for the solver."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# the query and result types live in stride.result; these names stay importable from here
from stride.result import Attribution, Example, Query, Scored  # noqa: F401

FitMode = Literal["revert", "add", "forget", "fidelity", "finetune"]
FIT_MODES = ("revert", "add", "forget", "fidelity", "finetune")
REFERENCE_MODES = ("revert", "add")  # modes that need a reference (pre-fine-tuning) checkpoint
LEAVE_OUT_MODES = ("revert", "forget")  # operators simulate removing a subset: y_k = L_k(q) - L(q)


def _arg(default: Any, help: str, *flags: str) -> Any:
    """A config field whose help text (and extra CLI flags) the generated command line reads."""
    return field(default=default, metadata={"help": help, "flags": flags})


class ConfigError(ValueError):
    """A build setting that cannot be used; the message names the field."""


@dataclass
class BuildConfig:
    """Everything that determines a store's content; stored verbatim in its manifest.

    ``None`` means "choose from the corpus and model" (see ``resolve``): the defaults must serve an
    unseen model and corpus without tuning.
    """

    layer: int | None = _arg(None, "Block whose output the basis reads (default: the middle one, never the last: "
                                   "its output is the final normed state the operators steer).")
    rank: int = _arg(64, "Basis rank r.")
    num_subsets: int | None = _arg(None, "K, the number of subsets (default: n, clamped to 128..1000).", "-K")
    memberships: int = _arg(10, "d, the subsets each example joins.", "-d")
    steps: int | None = _arg(None, "Optimiser steps (default: visits x K / batch-size).")
    visits: int = _arg(400, "For the default steps: times each subset is drawn (README: defaults table).")
    batch_size: int = _arg(32, "Subsets per optimisation step.")
    members_per_subset: int = _arg(4, "Members (and as many outsiders) of each subset per step.")
    lr: float = _arg(3e-3, "Adam learning rate.")
    stability_weight: float = _arg(10.0, "Weight of the KL stability term on non-members (README).")
    seed: int = _arg(0, "Seed of the design, the basis and every step's sampling.")
    fit: FitMode | None = _arg(None, "forget | revert | add (both need --reference-model) | fidelity | finetune "
                                     "(default: forget; README: Fit modes).")
    target_top_k: int = _arg(64, "Target tokens kept per position, plus one tail bucket (0: the whole vocabulary).")
    positions: int = _arg(4, "Positions scored per example per step (0: all of them; README: defaults table).")
    forget_factor: float = _arg(0.03, "forget mode: the observed token's probability is scaled by this.")
    token_weights: bool = _arg(False, "revert mode: weight positions by reference NLL - deployed NLL, floored at 0.")
    linearity_weight: float = _arg(0.0, "Weight of the linearity term: probe texts' subset effects should add up "
                                        "over examples (METHOD.md; README: defaults table).")
    linearity_probes: int = _arg(4, "Probe examples of the linearity term per step.")
    max_length: int = _arg(256, "Tokens per example (longer ones are cut).")
    activation_cache_mb: int = _arg(1024, "Cache frozen activations and targets up to this many MiB; stream beyond.")
    finetune_steps: int = _arg(4, "finetune mode: optimiser steps per subset.")
    finetune_lr: float = _arg(1e-3, "finetune mode: learning rate.")
    finetune_probes: int = _arg(32, "finetune mode: probe examples beside the subset's own.")
    ridge: float = _arg(1e-2, "finetune mode: ridge of the closed-form operator fit.")
    checkpoint_every: int = _arg(200, "Steps between checkpoints.")

    def __post_init__(self) -> None:
        if self.fit is not None and self.fit not in FIT_MODES:  # from the CLI, a JSON config or a manifest
            raise ConfigError(f"--fit must be one of {', '.join(FIT_MODES)}, not {self.fit!r} (config field 'fit')")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def measurement_sign(self) -> float:
        """+1: y_k = L(q) - L_k(q) (operator k adds subset k); -1: y_k = L_k(q) - L(q) (it removes it).

        Either way a positive Lasso weight means "training on this example lowered the query's loss".
        """
        return -1.0 if self.fit in LEAVE_OUT_MODES else 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown build config field(s): {sorted(unknown)}")
        return cls(**data)

    def resolve(self, num_examples: int, num_layers: int, has_reference: bool = False) -> BuildConfig:
        """Fill the ``None`` fields from the corpus size, model depth and whether a reference exists."""
        k = self.num_subsets or int(min(1000, max(128, num_examples)))
        k = max(k, self.memberships)
        steps = self.steps or int(max(500, self.visits * k // self.batch_size))
        last = num_layers - 2  # hidden_states[num_layers] is the final *normed* state (transformers >= 5)
        layer = default_layer(num_layers) if self.layer is None else self.layer
        if not -1 <= layer <= last:
            raise ConfigError(f"layer {layer}: the basis must read a block before the last one, so the layer "
                              f"must be in -1..{last} (-1: the embeddings); the last block's output is the final "
                              "normed state the operators steer")
        if self.memberships > k:
            raise ConfigError(f"memberships ({self.memberships}) exceeds num_subsets ({k})")
        fit = self.fit or "forget"  # README, "Fit modes": it led on the tuning retrains, with or without a reference
        if fit in REFERENCE_MODES and not has_reference:
            raise ConfigError(f"fit mode {fit!r} needs a reference model (--reference-model: the checkpoint the "
                              "deployed model was fine-tuned from); without one use 'forget' or 'fidelity'")
        return dataclasses.replace(self, num_subsets=k, steps=steps, layer=layer, fit=fit)


def default_layer(num_layers: int) -> int:
    """The middle block, but never the last: its output is replaced by the final normed state."""
    return max(-1, min(num_layers // 2, num_layers - 2))


@dataclass
class SolverConfig:
    """Lasso settings; part of the cache key, so results never mix settings."""

    lam_ratio: float = 0.2  # lambda = lam_ratio * lambda_max
    max_iter: int = 10_000  # coordinate-descent epochs per query; dense-noise y at K = 1000 needs up to ~770
    tol: float = 1e-6  # stop when duality gap <= tol * primal objective (certified)
    first_order: bool = False  # linearised measurement for huge vocabularies
    top_v: int | None = None  # measurement: vocabulary slice (None: 256 when V > 512 or K*T*V*d > 2^33; 0: exact)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
