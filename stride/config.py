"""Serialisable settings for a build and for the solver."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

FitMode = Literal["revert", "add", "forget", "fidelity", "finetune"]
FIT_MODES = ("revert", "add", "forget", "fidelity", "finetune")
REFERENCE_MODES = ("revert", "add")  # modes that need a reference (pre-fine-tuning) checkpoint
LEAVE_OUT_MODES = ("revert", "forget")  # operators simulate removing a subset: y_k = L_k(q) - L(q)


class ConfigError(ValueError):
    """A build setting that cannot be used; the message names the field."""


@dataclass
class BuildConfig:
    """Everything that determines a store's content; stored verbatim in its manifest.

    ``None`` means "choose from the corpus and model" (see ``resolve``): the defaults must serve an
    unseen model and corpus without tuning.
    """

    layer: int | None = None  # None: the middle block, never the last one (see ``default_layer``)
    rank: int = 64
    num_subsets: int | None = None  # None: n, clamped to [128, 1000]
    memberships: int = 10  # d: subsets each example joins
    steps: int | None = None  # None: enough for each subset to be visited ~``visits`` times
    visits: int = 100  # default steps = visits * K / batch_size: times each subset is drawn (README)
    batch_size: int = 32  # subsets per optimisation step
    members_per_subset: int = 4
    lr: float = 3e-3
    stability_weight: float = 10.0  # KL on non-members; higher makes operators subset-specific (README)
    seed: int = 0
    fit: FitMode | None = None  # None: "revert" when a reference model is given, else "fidelity"
    target_top_k: int = 64  # soft targets kept per position: top tokens plus one tail bucket (0: all)
    positions: int = 0  # scored positions sampled per example per step (0: all)
    forget_factor: float = 0.1  # "forget" mode: the observed token's probability is scaled by this
    max_length: int = 256
    activation_cache_mb: int = 1024  # cache frozen activations up to this size, else stream
    finetune_steps: int = 4
    finetune_lr: float = 1e-3
    finetune_probes: int = 32
    ridge: float = 1e-2
    checkpoint_every: int = 200

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
        fit = self.fit or ("revert" if has_reference else "fidelity")
        if fit in REFERENCE_MODES and not has_reference:
            raise ConfigError(f"fit mode {fit!r} needs a reference model (--reference-model: the checkpoint the "
                              "deployed model was fine-tuned from); without one use 'forget' or 'fidelity'")
        if fit not in FIT_MODES:
            raise ConfigError(f"fit mode {fit!r} is not one of {', '.join(FIT_MODES)}")
        return dataclasses.replace(self, num_subsets=k, steps=steps, layer=layer, fit=fit)


def default_layer(num_layers: int) -> int:
    """The middle block, but never the last: its output is replaced by the final normed state."""
    return max(-1, min(num_layers // 2, num_layers - 2))


@dataclass
class SolverConfig:
    """Lasso settings; part of the cache key, so results never mix settings."""

    lam_ratio: float = 0.2  # lambda = lam_ratio * lambda_max
    max_iter: int = 500
    tol: float = 1e-4  # stop when duality gap <= tol * 0.5 * ||y_c||^2
    first_order: bool = False  # linearised measurement for huge vocabularies

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Query:
    prompt: str
    completion: str | None = None


@dataclass
class Example:
    index: int
    id: str
    text: str


@dataclass
class Scored:
    rank: int
    index: int
    id: str
    score: float
    text: str | None = None


@dataclass
class Attribution:
    loss: float
    proponents: list[Scored]
    opponents: list[Scored]
    diagnostics: dict[str, Any]
    timing_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
