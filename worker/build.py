"""Build an operator store: scan, design, fit (with checkpoints), write atomically.

Resumable: a checkpoint (operators, optimiser, step) is written atomically every
``checkpoint_every`` steps beside the output; each step's sampling is seeded by (seed, step,
rank) alone, so a resumed build ends with the same store as an uninterrupted one.
Data-parallel under ``torchrun``: each rank samples its own subsets, gradients are averaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from stride.config import REFERENCE_MODES, BuildConfig
from stride.corpus import Corpus, file_sha256
from stride.design import Membership, random_design
from stride.fit import (
    FeatureSource,
    Linearity,
    OperatorAdam,
    Targets,
    finetune_shift,
    model_copy,
    ridge_operator,
    sample_step,
    step_loss,
)
from stride.model import LM, check_same_family, pick_device, weights_sha256
from stride.operators import SteeringOperators
from stride.store import write_store
from worker.progress import reporter

log = logging.getLogger("stride.build")
BASIS_SAMPLE = 256  # examples whose activations fix the standardisation and basis
CHECKPOINT_FORMAT = 3  # bump when checkpoint contents change: older ones are then ignored


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(int(os.environ.get("RANK", "0")), size)

    def mean_grads(self, params) -> None:
        if self.size > 1:
            for p in params:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        # each rank touched its own rows: gloo sums them sparse (the dense 16 MiB operator
                        # gradient made a 2-process CPU build slower than one process); NCCL has no sparse
                        # all-reduce
                        p.grad = p.grad.coalesce() if dist.get_backend() == "gloo" else p.grad.to_dense()
                    dist.all_reduce(p.grad)
                    p.grad /= self.size

    def sum_(self, t: torch.Tensor) -> None:
        if self.size > 1:
            dist.all_reduce(t)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def build(
    model_dir: str | Path, data: str | Path, out: str | Path, config: BuildConfig | None = None,
    device: str | None = None, show_progress: bool = True, reference_model: str | Path | None = None,
) -> Path:
    """Fit the operators of ``model_dir`` on ``data`` and write the store ``out``.

    ``reference_model`` is the checkpoint the deployed model was fine-tuned from (same tokenizer and
    architecture); the ``revert`` and ``add`` modes need it. In ``add`` mode it becomes the frozen
    model the service runs (recorded in the manifest as the store's model).
    """
    t_start = time.perf_counter()
    config = config or BuildConfig()
    out = Path(out).resolve()
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
        torch.cuda.set_device(dev)
    world = World.from_env(dev)
    corpus = Corpus.scan(data)
    lm = LM.load(model_dir, dev, config.max_length)
    cfg = config.resolve(len(corpus), lm.num_layers, has_reference=reference_model is not None)
    ref = None
    if reference_model is not None:
        check_same_family(lm, reference_model)
        if cfg.fit in REFERENCE_MODES:  # its weights load only when the mode uses them
            ref = LM.load(reference_model, dev, config.max_length)
        else:
            log.warning("build: fit mode %s does not use the reference model %s (README: Fit modes); pass --fit "
                        "revert or --fit add to use it", cfg.fit, reference_model)
    model_sha = weights_sha256(model_dir)
    ref_sha = weights_sha256(reference_model) if ref is not None else None
    frozen = (model_dir, model_sha)
    models = {}
    if ref is not None:
        models["reference"] = {"path": str(Path(reference_model).resolve()), "sha256": ref_sha}
    if cfg.fit == "add":  # the operators add subsets to the reference: the service must run it
        lm, ref, frozen = ref, None, (reference_model, ref_sha)
        models["deployed"] = {"path": str(Path(model_dir).resolve()), "sha256": model_sha}
    settings = [cfg.to_dict(), file_sha256(data), model_sha, ref_sha, world.size, CHECKPOINT_FORMAT]
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    membership = random_design(len(corpus), cfg.num_subsets, cfg.memberships, cfg.seed)
    log.info("build: n=%d K=%d d=%d rank=%d layer=%d mode=%s steps=%d device=%s world=%d",
             len(corpus), cfg.num_subsets, cfg.memberships, cfg.rank, cfg.layer, cfg.fit,
             cfg.steps, dev, world.size)
    source = FeatureSource(lm, corpus, cfg.layer, cfg.activation_cache_mb, Targets.of(cfg, ref))
    ops = SteeringOperators(lm.hidden_size, cfg.rank, cfg.num_subsets)
    sample = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(cfg.seed))[:BASIS_SAMPLE]
    feats = source.get(sample.sort().values)
    h_sample = feats.h[feats.mask].cpu()
    ops.init_basis(h_sample, cfg.seed)
    if cfg.fit == "finetune":
        ops.pca_basis(h_sample)
    ops = ops.to(dev)
    ckpt = out.with_name(f".{out.name}.ckpt")
    show = show_progress and world.rank == 0
    if cfg.fit != "finetune":
        _fit_fidelity(ops, lm, source, membership, cfg, world, ckpt, fingerprint, show)
    else:
        _fit_finetune(ops, lm, corpus, membership, cfg, world, ckpt, fingerprint, show)
    if world.rank == 0:
        write_store(out, config=cfg, ops=ops, membership=membership, corpus=corpus,
                    model_path=frozen[0], model_sha256=frozen[1],
                    extra={**models, "build": {"seconds": round(time.perf_counter() - t_start, 2),
                                               "world_size": world.size, "device": str(dev)}})
        shutil.rmtree(ckpt, ignore_errors=True)
        log.info("build: wrote %s in %.1fs", out, time.perf_counter() - t_start)
    if world.size > 1:
        dist.barrier()
    return out


def _load_checkpoint(ckpt: Path, fingerprint: str) -> dict | None:
    f = ckpt / "state.pt"
    if not f.is_file():
        return None
    state = torch.load(f, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        log.warning("build: ignoring checkpoint %s from different settings", f)
        return None
    return state


def _save_checkpoint(ckpt: Path, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f"state.pt.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / "state.pt")


def _fit_fidelity(ops: SteeringOperators, lm: LM, source: FeatureSource, membership: Membership,
                  cfg: BuildConfig, world: World, ckpt: Path, fingerprint: str, show: bool) -> None:
    opt = OperatorAdam(ops, cfg.lr)
    linearity = Linearity.of(membership, cfg.linearity_weight, cfg.linearity_probes, cfg.seed) \
        if cfg.linearity_weight > 0 else None
    start = 0
    if state := _load_checkpoint(ckpt, fingerprint):
        ops.load_state_dict(state["ops"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("build: resuming at step %d from %s", start, ckpt)
    steps = int(cfg.steps)
    with reporter("fitting operators", steps, start, "steps", show) as bar:
        for step in range(start, steps):
            batch = sample_step(membership, cfg.batch_size, cfg.members_per_subset,
                                step_generator(cfg.seed, step, world.rank))
            loss, stats = step_loss(ops, lm, source, batch, cfg.stability_weight, cfg.positions, linearity)
            opt.zero_grad()
            loss.backward()
            world.mean_grads(ops.parameters())
            opt.step()
            bar.advance(1, **stats)
            done = step + 1
            if world.rank == 0 and done < steps and done % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, {"ops": ops.state_dict(), "opt": opt.state_dict(),
                                        "step": done, "fingerprint": fingerprint})


def _fit_finetune(ops: SteeringOperators, lm: LM, corpus: Corpus, membership: Membership,
                  cfg: BuildConfig, world: World, ckpt: Path, fingerprint: str, show: bool) -> None:
    """Per subset: fine-tune a copy briefly, record the shift of final states, fit A_k by ridge."""
    K = membership.num_subsets
    start = 0
    if state := _load_checkpoint(ckpt, fingerprint):
        ops.load_state_dict(state["ops"])
        start = state["step"]
        log.info("build: resuming at subset %d from %s", start, ckpt)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    probe_idx = torch.randperm(len(corpus), generator=gen)[: cfg.finetune_probes].tolist()
    probes = corpus.records(probe_idx)
    work, base_state = model_copy(lm)
    block = max(1, cfg.checkpoint_every // 10) * world.size  # subsets between checkpoints
    with reporter("fine-tuning subsets", K, start, "subsets", show) as bar:
        for b0 in range(start, K, block):
            ks = range(b0, min(K, b0 + block))
            fresh = torch.zeros_like(ops.A[b0 : b0 + len(ks)])
            for j, k in enumerate(ks):
                if k % world.size != world.rank:
                    continue
                members = corpus.records(membership.members(k).tolist())
                # dropout draws from the global RNG: seed it per subset so a resumed (or repeated)
                # build fine-tunes each subset exactly as an uninterrupted one does
                devices = [lm.device.index or 0] if lm.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(step_generator(cfg.seed, k, -1).initial_seed())
                    h, dz = finetune_shift(lm, work, base_state, members, members + probes, cfg.layer,
                                           cfg.finetune_steps, cfg.finetune_lr)
                fresh[j] = ridge_operator(ops.project(h), dz.float(), cfg.ridge)
            world.sum_(fresh)
            with torch.no_grad():
                ops.A[b0 : b0 + len(ks)] = fresh
            bar.advance(len(ks))
            done = b0 + len(ks)
            if world.rank == 0 and done < K:
                _save_checkpoint(ckpt, {"ops": ops.state_dict(), "step": done, "fingerprint": fingerprint})
