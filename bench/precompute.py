"""Precompute cost versus corpus size n, and STRIDE's build on larger shapes (issue 15, item 3).

Why: STRIDE's build is mostly a fixed cost (K <= 1000 operators, ~``visits`` * K / batch steps)
while gradient methods pay per document, so beyond some n its precompute is the cheapest. This
module measures where, on corpora from the benchmark's generator (``bench.setting``):

- ``precompute``: at each n, STRIDE's default build (feature pass and fitting loop timed apart), the
  projected-gradient precompute as TRAK/LoGRA do it (``bench.methods.Grads`` per-example gradients,
  Gaussian projection to k) and Kronfluence's EK-FAC fit plus the training-gradient pass its
  scoring needs (``bench.methods.run_kronfluence``). A run predicted to exceed ``full_limit_s`` is
  timed on a sample (documents, or build steps) and extrapolated linearly; the JSON says which.
- ``gpt2``: examples/s of the frozen forward a build needs (``LM.features``) on the GPT-2-small
  shape with random weights, and the projected activation pass of a 10^7-document build.
- ``wide``: the "larger tiny model" target: a 4-layer width-128 GPT-2 with a ~5.5k-word vocabulary
  on ~1,200 generated documents, built with the current defaults and with the previous ones.

``python -m bench.precompute [--quick] [--parts precompute,gpt2,wide]``: each part's result is
merged into ``precompute.json`` (so parts can be rerun alone), then ``precompute.md`` and
``precompute.png`` are rendered from the merged file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch

from bench.methods import Grads, run_kronfluence
from bench.setting import CORPUS_KEYS, Setting, doc_record, doc_text, generate, make_model, train
from stride.config import BuildConfig, default_layer
from stride.demo import DemoSpec, build_tokenizer, train_model

PARTS = ("precompute", "gpt2", "wide")
METHODS = {"stride": "STRIDE build (defaults)", "projected": "Projected gradients (TRAK/LoGRA-style)",
           "kronfluence": "Kronfluence EK-FAC factors + train-gradient pass"}


@dataclass
class Plan:
    """What one run measures; ``QUICK`` shrinks everything to a smoke test."""

    ns: tuple[int, ...] = (1_000, 10_000, 100_000)
    corpus_docs: int = 100_000  # one generated corpus; each n takes its first n documents
    facts: int = 1_300  # planted facts in that corpus: vocabulary ~1.4k words, like the reference setting
    proj_dim: int = 4096
    chunk: int = 128  # documents per gradient/projection chunk
    full_limit_s: float = 600.0  # a method predicted to take longer at some n is sampled and extrapolated
    sample_docs: int = 2_000  # documents timed when a per-document pass is extrapolated
    probe_steps: int = 300  # build steps timed to predict (or extrapolate) a full build
    cache_mb: int = 8192  # at the largest n, STRIDE again with this activation cache (0: skip)
    stride_full_n: tuple[int, ...] = ()  # n where STRIDE runs in full whatever its prediction (checks it)
    train_docs: int = 2_000  # the precompute model is trained one epoch on this many documents
    gpt2: dict = field(default_factory=dict)  # GPT2Config overrides (none: GPT-2 small)
    seq_len: int = 128
    batch: int = 8
    reps: int = 3
    # 1,205 documents, 5,562 words: the case
    wide: Setting = field(default_factory=lambda: Setting(name="wide", facts=300, filler=591,
                                                          pretrain_docs=10_250))
    wide_model: DemoSpec = field(default_factory=lambda: DemoSpec(n_layer=4, n_embd=128, n_head=4, epochs=12))
    wide_limit_s: float = 1200.0  # run in full up to 20 min: the target is a measured build time
    wide_probe_steps: int = 150


QUICK = Plan(ns=(150, 300), corpus_docs=300, facts=30, proj_dim=128, full_limit_s=3.0, sample_docs=100, probe_steps=4,
             cache_mb=0, train_docs=150, gpt2=dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, bos_token_id=0,
                                       eos_token_id=0), seq_len=32, batch=4, reps=1,
             wide=Setting(name="wide-quick", facts=10, filler=20, pretrain_docs=100),
             wide_model=DemoSpec(n_layer=2, n_embd=32, n_head=2, epochs=1), wide_limit_s=3.0,
             wide_probe_steps=4)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


@contextlib.contextmanager
def timing(owner, name: str, sink: list[float]):
    """Record the wall time of every call of ``owner.name`` while inside (the call itself is unchanged)."""
    orig = getattr(owner, name)

    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t)

    with mock.patch.object(owner, name, wrapped):
        yield sink


def write_corpus(docs: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps({k: d[k] for k in CORPUS_KEYS if k in d}) + "\n" for d in docs))
    return path


def save_model(model, tok, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------- STRIDE


def build_timed(model_dir: Path, corpus: Path, out: Path, cfg: BuildConfig) -> dict:
    """One ``worker.build.build``, with its feature-cache pass and its fitting loop timed apart."""
    import worker.build as wb
    from stride.fit import FeatureSource

    feat: list[float] = []
    fit: list[float] = []
    shutil.rmtree(out, ignore_errors=True)
    with timing(FeatureSource, "__init__", feat), timing(wb, "_fit_fidelity", fit):
        t = time.perf_counter()
        wb.build(model_dir, corpus, out, cfg, show_progress=False)
        total = time.perf_counter() - t
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"total_s": total, "feature_pass_s": sum(feat), "fit_s": sum(fit),
            "other_s": total - sum(feat) - sum(fit), "steps": manifest["config"]["steps"]}


def stride_point(model_dir: Path, corpus: Path, n: int, work: Path, cfg: BuildConfig, probe_steps: int,
                 limit_s: float, layers: int) -> dict:
    """A build with ``cfg``: a short probe predicts it; run in full when that fits ``limit_s``, else extrapolated.

    The extrapolation is linear per step: probe total + (steps - probe steps) x the probe's seconds per step.
    """
    resolved = cfg.resolve(n, layers)
    steps = int(resolved.steps)
    probe = build_timed(model_dir, corpus, work / "store", dataclasses.replace(cfg, steps=min(probe_steps, steps)))
    per_step = probe["fit_s"] / probe["steps"]
    predicted = probe["total_s"] + per_step * (steps - probe["steps"])
    row = {"n": n, "config": resolved.to_dict(), "probe": probe, "steps_per_s": 1 / per_step,
           "predicted_s": predicted}
    if probe["steps"] >= steps:
        return {**row, **probe, "seconds": probe["total_s"], "extrapolated": False}
    if predicted <= limit_s:
        full = build_timed(model_dir, corpus, work / "store", cfg)
        return {**row, **full, "seconds": full["total_s"], "steps_per_s": full["steps"] / full["fit_s"],
                "extrapolated": False}
    return {**row, "seconds": predicted, "feature_pass_s": probe["feature_pass_s"], "fit_s": per_step * steps,
            "other_s": probe["other_s"], "steps": steps, "extrapolated": True,
            "how": f"{probe['steps']} of {steps} steps timed; fitting loop scaled linearly per step"}


# ---------------------------------------------------------------- projected gradients


def projection_matrix(P: int, k: int) -> tuple[torch.Tensor, float]:
    """The Gaussian P x k matrix (seeded) and the seconds it took; made once per run, counted at every n."""
    t = time.perf_counter()
    R = torch.randn(P, k, generator=torch.Generator().manual_seed(0)) / math.sqrt(k)
    return R, time.perf_counter() - t


def projected_point(model, tok, docs: list[dict], n: int, plan: Plan, predicted_s: float,
                    proj: tuple[torch.Tensor, float]) -> dict:
    """Per-example gradients of the nn.Linear weights projected by a Gaussian P x k matrix, for every document.

    Also TRAK's kernel (Phi^T Phi, its inverse, Phi K^-1), reported apart. Per-document parts are timed
    on ``sample_docs`` documents and scaled to n when the full pass is predicted to exceed the limit.
    """
    g = Grads(model, tok)
    R, t_r = proj
    P, k = R.shape
    m = n if predicted_s <= plan.full_limit_s else min(n, plan.sample_docs)
    t_g = t_p = t_k = 0.0
    kern = torch.zeros(k, k)
    phis = []
    for s in range(0, m, plan.chunk):
        recs = [doc_record(d) for d in docs[s : min(m, s + plan.chunk)]]
        t = time.perf_counter()
        G = g.many(recs)
        t_g += time.perf_counter() - t
        t = time.perf_counter()
        phi = G @ R
        t_p += time.perf_counter() - t
        t = time.perf_counter()
        kern += phi.T @ phi
        t_k += time.perf_counter() - t
        if len(phis) * plan.chunk < plan.sample_docs:  # kept only to time Phi K^-1 per document
            phis.append(phi)
    t = time.perf_counter()
    kinv = torch.linalg.inv(kern + 1e-3 * float(kern.diagonal().mean()) * torch.eye(k))
    t_inv = time.perf_counter() - t
    kept = torch.cat(phis)
    t = time.perf_counter()
    kept @ kinv
    t_x = (time.perf_counter() - t) * m / len(kept)
    scale = n / m
    grads, proj = t_g * scale, t_p * scale
    kernel = (t_k + t_x) * scale + t_inv
    return {"n": n, "P": P, "proj_dim": k, "timed_docs": m, "extrapolated": m < n,
            "seconds": t_r + grads + proj, "projection_matrix_s": t_r, "gradients_s": grads, "projection_s": proj,
            "trak_kernel_s": kernel, "with_trak_kernel_s": t_r + grads + proj + kernel,
            "per_doc_ms": (t_g + t_p) / m * 1e3,
            **({"how": f"{m} of {n} documents timed; per-document parts scaled by n/{m}"} if m < n else {})}


# ---------------------------------------------------------------- Kronfluence


def kronfluence_point(model_dir: Path, docs: list[dict], query: dict, n: int, work: Path, plan: Plan,
                      predicted_s: float) -> dict:
    """``run_kronfluence`` on n documents and one query, its factor stages and its pairwise pass timed apart.

    The pairwise pass (one query against all n) recomputes every training gradient: the pass that
    Kronfluence's scoring needs on top of the factors. Per-document stages are scaled when sampled.
    """
    try:
        from kronfluence.analyzer import Analyzer
    except ImportError:
        return {"n": n, "status": "skipped: kronfluence is not installed (pip install -e '.[bench]')"}
    m = n if predicted_s <= plan.full_limit_s else min(n, plan.sample_docs)
    stages = ("fit_covariance_matrices", "perform_eigendecomposition", "fit_lambda_matrices",
              "compute_pairwise_scores")
    times: dict[str, list[float]] = {s: [] for s in stages}
    with contextlib.ExitStack() as stack:
        for s in stages:
            stack.enter_context(timing(Analyzer, s, times[s]))
        t = time.perf_counter()
        res = run_kronfluence(model_dir, docs[:m], [query], [], work / "kf", 0)
        total = time.perf_counter() - t
    shutil.rmtree(work / "kf", ignore_errors=True)
    if res.status != "ok":
        return {"n": n, "status": res.status}
    cov, eig, lam, pair = (sum(times[s]) for s in stages)
    scale = n / m
    factors = (cov + lam) * scale + eig
    return {"n": n, "timed_docs": m, "extrapolated": m < n, "seconds": factors + pair * scale,
            "factors_s": factors, "covariance_s": cov * scale, "eigendecomposition_s": eig, "lambda_s": lam * scale,
            "train_gradient_pass_s": pair * scale, "setup_s": total - cov - eig - lam - pair, "status": "ok",
            **({"how": f"{m} of {n} documents timed; covariance, lambda and pairwise stages scaled by n/{m}, "
                       "the eigendecomposition not"} if m < n else {})}


def run_precompute(plan: Plan, work: Path, methods: tuple[str, ...] = tuple(METHODS), log=print) -> dict:
    """Each method at every n, smallest n first; a method's next n is predicted from its last per-doc rate."""
    n_max = max(plan.corpus_docs, *plan.ns)
    setting = Setting(name="precompute", facts=plan.facts, filler=n_max, pretrain_docs=0)
    _, docs, queries = generate(setting)
    docs = docs[:n_max]
    tok = build_tokenizer([doc_text(d) for d in docs])
    model = make_model(setting, tok)
    t = time.perf_counter()
    train(model, tok, [doc_text(d) for d in docs[: plan.train_docs]], 1, setting.lr, 32, setting.seed)
    train_s = time.perf_counter() - t
    model_dir = save_model(model, tok, work / "model")
    layers = model.config.num_hidden_layers
    out = {"setting": {"generator": "bench.setting.generate", **dataclasses.asdict(setting), "vocab": len(tok),
                       "train_docs": min(plan.train_docs, n_max),
                       "parameters": sum(p.numel() for p in model.parameters()), "train_s": train_s,
                       "mean_tokens": float(np.mean([len(tok(doc_text(d))["input_ids"]) for d in docs[:2000]]))},
           "build_config": BuildConfig().to_dict(), "rows": {k: [] for k in methods}}
    rate: dict[str, float] = {}  # seconds per document at the last measured n
    proj = projection_matrix(Grads(model, tok).dim, plan.proj_dim) if "projected" in methods else None
    for n in plan.ns:
        sub = docs[:n]
        corpus = write_corpus(sub, work / f"corpus-{n}.jsonl")
        for key in methods:
            la = loadavg()
            t = time.perf_counter()
            if key == "stride":
                limit = math.inf if n in plan.stride_full_n else plan.full_limit_s
                row = stride_point(model_dir, corpus, n, work, BuildConfig(), plan.probe_steps, limit, layers)
            elif key == "projected":
                row = projected_point(model, tok, sub, n, plan, rate.get(key, 0.0) * n, proj)
            else:
                row = kronfluence_point(model_dir, sub, queries[0], n, work, plan, rate.get(key, 0.0) * n)
            row.update(loadavg_start=la, loadavg_end=loadavg(), wall_s=time.perf_counter() - t)
            if "seconds" in row:
                rate[key] = row["seconds"] / n
                log(f"  n={n:>7} {key:<12} {row['seconds']:9.1f} s{' (extrapolated)' if row['extrapolated'] else ''}"
                    f"  load {la[0]:.2f}")
            else:
                log(f"  n={n:>7} {key:<12} {row.get('status')}")
            out["rows"][key].append(row)
        if "stride" in methods and plan.cache_mb and n == max(plan.ns):  # the same build with every activation cached
            la, t = loadavg(), time.perf_counter()
            row = stride_point(model_dir, corpus, n, work, BuildConfig(activation_cache_mb=plan.cache_mb),
                               plan.probe_steps, 0.0, layers)  # an aside: the probe's extrapolation is enough
            out["stride_cached"] = {**row, "loadavg_start": la, "loadavg_end": loadavg(),
                                    "wall_s": time.perf_counter() - t}
            log(f"  n={n:>7} stride, activation cache {plan.cache_mb} MiB: {row['seconds']:.1f} s")
        corpus.unlink()
    return out


# ---------------------------------------------------------------- GPT-2-small activation pass


def run_gpt2(plan: Plan, log=print) -> dict:
    """Frozen forward of random GPT-2 weights (nothing downloaded), as ``LM.features`` runs it in a build.

    Also timed: the build's target distributions on top (logits, log-softmax, top-64 compression, as
    ``FeatureSource`` computes them), and the base model alone (the LM head's logits, which
    ``features`` computes and discards).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from stride.fit import compress
    from stride.model import LM, Batch

    cfg = GPT2Config(**plan.gpt2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    lm = LM(model, SimpleNamespace(pad_token_id=None, eos_token_id=cfg.eos_token_id), torch.device("cpu"),
            plan.seq_len)
    layer = default_layer(lm.num_layers)
    ids = torch.randint(cfg.vocab_size, (plan.batch, plan.seq_len), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, torch.ones_like(ids), torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1))

    def features():
        return lm.features(batch, layer)

    def with_targets():
        _, z = lm.features(batch, layer)
        with torch.no_grad():
            compress(torch.log_softmax(lm.logits(z).float(), -1), 64)

    def base_only():
        with torch.no_grad():
            model.transformer(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              output_hidden_states=True, use_cache=False)

    rows = {}
    for name, fn in (("features", features), ("features_and_targets", with_targets), ("base_model_only", base_only)):
        fn()  # warm-up
        la = loadavg()
        ts = []
        for _ in range(plan.reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        s = float(np.median(ts))
        rows[name] = {"batch_s": s, "examples_per_s": plan.batch / s, "tokens_per_s": plan.batch * plan.seq_len / s,
                      "projected_1e7_docs_h": 1e7 / (plan.batch / s) / 3600, "loadavg": la, "times_s": ts}
        log(f"  GPT-2 {name}: {plan.batch / s:.2f} examples/s (load {la[0]:.2f})")
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    return {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "layer": layer,
            "seq_len": plan.seq_len, "batch": plan.batch, "reps": plan.reps, "rows": rows}


# ---------------------------------------------------------------- the larger tiny model


def run_wide(plan: Plan, work: Path, log=print) -> dict:
    """A 4-layer width-128 GPT-2 on ~1,200 documents with a ~5.5k-word vocabulary, built with the defaults.

    The vocabulary spans the generator's pretraining texts too (its entities' names), as in the issue's
    5,562-word case; the model is trained briefly on the documents only.
    """
    s = plan.wide
    pre, docs, queries = generate(s)
    tok = build_tokenizer(pre + [doc_text(d) for d in docs] + [q["prompt"] + q["completion"] for q in queries])
    t = time.perf_counter()
    model = train_model(plan.wide_model, tok, [doc_text(d) for d in docs])
    train_s = time.perf_counter() - t
    model_dir = save_model(model, tok, work / "wide-model")
    corpus = write_corpus(docs, work / "wide-corpus.jsonl")
    layers = model.config.n_layer
    log(f"  wide: n={len(docs)} vocab={len(tok)} trained in {train_s:.0f} s")
    out = {"setting": {"generator": "bench.setting.generate", **dataclasses.asdict(s), "n": len(docs),
                       "vocab": len(tok), "model": dataclasses.asdict(plan.wide_model),
                       "parameters": sum(p.numel() for p in model.parameters()), "train_s": train_s}, "rows": {}}
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    configs = {"defaults": {}, "--visits 100 (4x fewer steps)": {"visits": 100},
               "previous step (all positions, whole-vocabulary targets)": {"positions": 0, "target_top_k": 0}}
    for name, over in configs.items():
        if not set(over) <= fields:
            out["rows"][name] = {"status": f"not run: BuildConfig has no field(s) {sorted(set(over) - fields)}"}
            continue
        la = loadavg()
        t = time.perf_counter()
        row = stride_point(model_dir, corpus, len(docs), work, BuildConfig(**over), plan.wide_probe_steps,
                           plan.wide_limit_s, layers)
        row.update(loadavg_start=la, loadavg_end=loadavg(), wall_s=time.perf_counter() - t, status="ok")
        out["rows"][name] = row
        log(f"  wide {name}: {row['seconds']:.0f} s, {row['steps_per_s']:.2f} steps/s"
            f"{' (extrapolated)' if row['extrapolated'] else ''} load {la[0]:.2f}")
    return out


# ---------------------------------------------------------------- fits, crossover, report


def fit_laws(rows: list[dict]) -> dict:
    """a + b n (least squares on relative error) and c n^p (log-log), with their worst relative residual."""
    n = np.array([r["n"] for r in rows], float)
    t = np.array([r["seconds"] for r in rows], float)
    A = np.stack([1 / t, n / t], 1)
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    p, logc = np.polyfit(np.log(n), np.log(t), 1)
    lin_res = float(np.max(np.abs((a + b * n) / t - 1)))
    pow_res = float(np.max(np.abs(np.exp(logc) * n**p / t - 1)))
    return {"linear": {"a_s": float(a), "b_s_per_doc": float(b), "max_rel_residual": lin_res},
            "power": {"c": float(np.exp(logc)), "p": float(p), "max_rel_residual": pow_res}}


def crossover(stride: dict, other: dict) -> float | None:
    """n where STRIDE's affine law drops below the other's for good (None: never, given the fitted slopes)."""
    a_s, b_s = stride["linear"]["a_s"], stride["linear"]["b_s_per_doc"]
    a_o, b_o = other["linear"]["a_s"], other["linear"]["b_s_per_doc"]
    if b_o <= b_s:
        return 0.0 if a_s <= a_o else None
    return max(0.0, (a_s - a_o) / (b_o - b_s))


def analyse(pre: dict) -> dict:
    fits = {k: fit_laws(v) for k, v in pre["rows"].items() if len([r for r in v if "seconds" in r]) >= 2}
    cross = {k: crossover(fits["stride"], fits[k]) for k in fits if k != "stride" and "stride" in fits}
    known = [c for c in cross.values() if c is not None]
    overall = max(known) if len(known) == len(cross) and cross else None
    return {"fits": fits, "crossover_n": cross, "stride_cheapest_beyond_n": overall,
            "below_1e6": None if overall is None else overall < 1e6}


def plot(pre: dict, ana: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    grid = np.logspace(2.5, 7, 200)
    for (key, label), color in zip(METHODS.items(), ("C3", "C0", "C2"), strict=True):
        rows = [r for r in pre["rows"].get(key, []) if "seconds" in r]
        if not rows:
            continue
        for r in rows:
            ax.loglog(r["n"], r["seconds"], "o", color=color, mfc="white" if r["extrapolated"] else color, ms=7)
        if key in ana["fits"]:
            lin = ana["fits"][key]["linear"]
            ax.loglog(grid, lin["a_s"] + lin["b_s_per_doc"] * grid, "--", color=color, lw=1, label=label)
    c = pre.get("stride_cached")
    if c:
        ax.loglog(c["n"], c["seconds"], "*", color="C3", ms=10, mfc="white" if c["extrapolated"] else "C3",
                  label=f"STRIDE, activation cache {c['config']['activation_cache_mb']} MiB")
    ax.plot([], [], "o", color="k", label="measured")
    ax.plot([], [], "o", color="k", mfc="white", label="extrapolated from a sample")
    x = ana.get("stride_cheapest_beyond_n")
    if x:
        ax.axvline(x, color="grey", lw=0.8)
        ax.text(x * 1.1, ax.get_ylim()[0] * 2, f"STRIDE cheapest beyond n ~ {_sig(x)}", fontsize=8, color="grey")
    ax.set_xlabel("documents n")
    ax.set_ylabel("precompute wall time (s, 1 thread)")
    ax.set_title("Precompute versus n (filled: measured, hollow: extrapolated; dashed: a + b n)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sig(x: float) -> str:
    """Two significant figures: a fitted crossover is no more precise than that."""
    return f"{float(f'{x:.2g}'):,.0f}"


def _fmt_s(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 600:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _la(x: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in x)


def render(res: dict, command: str) -> str:
    L = ["# Precompute versus n, and STRIDE's build on larger shapes", "",
         "Generated by `bench/precompute.py` (issue 15, item 3 and the larger-tiny-model target). Every figure is "
         "measured by that code in the runs described here; rows marked *extrapolated* were timed on a sample "
         "(documents or build steps) and scaled linearly, as each row's note says.", "",
         f"- **Command** (every part, in one go): `{command}`; the parts below were run as listed:"]
    for part, r in res.get("meta", {}).items():
        L.append(f"- **{part}**: `{r.get('command', '')}`, run {r['started']} ({r['wall_s']:.0f} s), code `{r['git']}`"
                 f"{' (uncommitted changes in ' + ', '.join(r['dirty']) + ')' if r['dirty'] else ''}, load average "
                 f"at start {_la(r['loadavg_start'])}, at end {_la(r['loadavg_end'])}")
    m = res.get("machine")
    if m:
        L.append(f"- **Machine**: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} thread), "
                 f"Python {m['python']}; shared with other engineers' builds, so the load averages above matter")
    pre = res.get("precompute")
    if pre:
        s = pre["setting"]
        ana = analyse(pre)
        L += ["", "## 1. Precompute versus n", "",
              f"Corpus: the first n documents of one `bench.setting.generate` corpus of {max(s['filler'], 1):,} "
              f"filler and {s['facts']:,} planted facts (shuffled; mean {s['mean_tokens']:.1f} tokens per document), "
              f"word-level tokenizer ({s['vocab']:,} words). Model: the benchmark's tiny Llama shape "
              f"({s['layers']} layers, width {s['hidden']}; {s['parameters']:,} parameters) trained one epoch "
              f"on {s['train_docs']:,} documents ({s['train_s']:.0f} s); quality is not measured here. "
              "One torch thread.", "",
              "| n | method | precompute | parts | load avg (1 min) | how |", "|---|---|---|---|---|---|"]
        for key, label in METHODS.items():
            for r in pre["rows"].get(key, []):
                if "seconds" not in r:
                    L.append(f"| {r['n']:,} | {label} | {r.get('status')} | | | |")
                    continue
                if key == "stride":
                    parts = (f"feature cache {r['feature_pass_s']:.1f} s, fit {r['fit_s']:.1f} s "
                             f"({r['steps']:,} steps, {r['steps_per_s']:.1f} steps/s), other {r['other_s']:.1f} s; "
                             f"K={r['config']['num_subsets']}")
                elif key == "projected":
                    parts = (f"P x k matrix {r['projection_matrix_s']:.1f} s, gradients {r['gradients_s']:.1f} s, "
                             f"projection {r['projection_s']:.1f} s (P={r['P']:,}, k={r['proj_dim']}); "
                             f"TRAK kernel +{_fmt_s(r['trak_kernel_s'])}")
                else:
                    parts = (f"factors {r['factors_s']:.1f} s (eigendecomposition {r['eigendecomposition_s']:.1f} s), "
                             f"train-gradient pass {r['train_gradient_pass_s']:.1f} s")
                how = r.get("how", "measured in full")
                ext = " (extrapolated)" if r["extrapolated"] else ""
                L.append(f"| {r['n']:,} | {label} | {_fmt_s(r['seconds'])}{ext} | {parts} | "
                         f"{r['loadavg_start'][0]:.2f} | {how} |")
        srows = [r for r in pre["rows"].get("stride", []) if "config" in r]
        if srows:
            cfg = srows[0]["config"]
            L += ["", "STRIDE's resolved defaults (no reference checkpoint given, as a new user builds): "
                  + ", ".join(f"{k}={cfg.get(k)}" for k in ("fit", "positions", "visits", "target_top_k", "rank",
                                                            "memberships", "batch_size", "activation_cache_mb")
                              if k in cfg) + "."]
        c = pre.get("stride_cached")
        if c:
            L += ["", f"STRIDE at n = {c['n']:,} with `activation_cache_mb={c['config']['activation_cache_mb']}` "
                  f"(every activation cached instead of streamed): {_fmt_s(c['seconds'])}"
                  f"{' (extrapolated: ' + c['how'] + ')' if c['extrapolated'] else ''}; feature cache "
                  f"{c['feature_pass_s']:.1f} s, fit {_fmt_s(c['fit_s'])} ({c['steps_per_s']:.1f} steps/s), load "
                  f"{c['loadavg_start'][0]:.2f}. Not in the fits (the default budget is what a user gets)."]
        L += ["", "Growth laws fitted to the rows above (affine: least squares on relative error; power: log-log):",
              "", "| method | a + b n | max rel. residual | c n^p | max rel. residual |", "|---|---|---|---|---|"]
        for key, f in ana["fits"].items():
            lin, pw = f["linear"], f["power"]
            L.append(f"| {METHODS[key]} | {lin['a_s']:.1f} s + {lin['b_s_per_doc'] * 1e3:.3f} ms x n | "
                     f"{lin['max_rel_residual']:.2f} | {pw['c']:.3g} n^{pw['p']:.2f} | {pw['max_rel_residual']:.2f} |")
        L.append("")
        for key, c in ana["crossover_n"].items():
            L.append(f"- STRIDE's precompute is cheaper than {METHODS[key]} beyond n ~ "
                     f"{'never (its per-document slope is not lower)' if c is None else _sig(c)}.")
        x = ana["stride_cheapest_beyond_n"]
        if x is not None:
            L.append(f"- **STRIDE's precompute is the cheapest of the three beyond n ~ {_sig(x)}**, which is "
                     f"{'below' if x < 1e6 else 'not below'} 10^6 (from the fitted affine laws).")
        L += ["", "![precompute.png](precompute.png)"]
    if res.get("checks"):
        L += ["", "Check of the per-step extrapolation: STRIDE builds run in full beside what their probe predicted "
              "(the probe is the same build stopped after its first steps):", "",
              "| n | config | probe steps | predicted | measured | predicted / measured | steps/s probe, full | "
              "load avg (start, end) | command, when |", "|---|---|---|---|---|---|---|---|---|"]
        for c in res["checks"]:
            cfg = ", ".join(f"{k}={v}" for k, v in c["config"].items())
            L.append(f"| {c['n']:,} | {cfg} | {c['probe_steps']} | {_fmt_s(c['predicted_s'])} | "
                     f"{_fmt_s(c['measured_s'])} | {c['ratio']:.2f} | {c['probe_steps_per_s']:.2f}, "
                     f"{c['full_steps_per_s']:.2f} | {c['loadavg_start'][0]:.2f}, {c['loadavg_end'][0]:.2f} | "
                     f"`{c['command']}`, {c['started']} |")
    g = res.get("gpt2")
    if g:
        sh = g["shape"]
        L += ["", "## 2. Activation pass on the GPT-2-small shape", "",
              f"Random weights from `GPT2Config()` ({sh['n_layer']} layers, width {sh['n_embd']}, {sh['n_head']} "
              f"heads, vocabulary {sh['vocab_size']:,}; {g['parameters']:,} parameters), nothing downloaded; "
              f"sequence length {g['seq_len']}, batch {g['batch']}, layer {g['layer']}, one thread, median of "
              f"{g['reps']} batches after one warm-up.", "",
              "| pass | s per batch | examples/s | tokens/s | 10^7-document pass | load avg (1 min) |",
              "|---|---|---|---|---|---|"]
        names = {"features": "`LM.features` (what a build's frozen forward runs)",
                 "features_and_targets": "+ logits, log-softmax, top-64 targets (`FeatureSource`'s pass)",
                 "base_model_only": "base model without the LM head (what `features` needs)"}
        for k, r in g["rows"].items():
            L.append(f"| {names[k]} | {r['batch_s']:.2f} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{_fmt_s(r['projected_1e7_docs_h'] * 3600)} | {r['loadavg'][0]:.2f} |")
        L += ["", "The 10^7-document figure is 10^7 / (examples/s): one pass over the corpus on one thread at this "
              "length, projected, not run."]
    w = res.get("wide")
    if w:
        s = w["setting"]
        L += ["", "## 3. The larger tiny model: default build", "",
              f"Target: a 1,200-document corpus with a 5.5k-word vocabulary and width 128, default build <= 10 min. "
              f"Setting: `bench.setting.generate` with {s['facts']} facts, {s['filler']} filler documents and "
              f"{s['pretrain_docs']:,} pretraining texts (their entity names fill the vocabulary): n = {s['n']:,} "
              f"documents, vocabulary {s['vocab']:,} words; a GPT-2 with {s['model']['n_layer']} layers, width "
              f"{s['model']['n_embd']}, {s['model']['n_head']} heads ({s['parameters']:,} parameters), trained "
              f"{s['model']['epochs']} epochs on the documents ({s['train_s']:.0f} s).", "",
              "| build | K | steps | steps/s | feature cache | fit | total | <= 10 min | load avg (1 min) | how |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in w["rows"].items():
            if r.get("status") != "ok":
                L.append(f"| {name} | {r.get('status')} | | | | | | | | |")
                continue
            ext = " (extrapolated)" if r["extrapolated"] else ""
            L.append(f"| {name} | {r['config']['num_subsets']} | {r['steps']:,} | {r['steps_per_s']:.2f} | "
                     f"{r['feature_pass_s']:.1f} s | {_fmt_s(r['fit_s'])} | {_fmt_s(r['seconds'])}{ext} | "
                     f"{'yes' if r['seconds'] <= 600 else '**no**'} | {r['loadavg_start'][0]:.2f} | "
                     f"{r.get('how', 'measured in full')} |")
        cfg = next((r["config"] for r in w["rows"].values() if r.get("status") == "ok"), None)
        if cfg:
            keys = ("fit", "positions", "visits", "target_top_k", "stability_weight", "rank", "batch_size", "layer")
            L += ["", "Resolved default config: " + ", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg) + "."]
    L += ["", "## Notes", "",
          "- **What is extrapolated**: a STRIDE row marked so ran a probe build with the first "
          "`probe_steps` steps (same config otherwise: the same feature pass, design and store writing) and scales "
          "its fitting loop linearly to the resolved step count; the per-step cost is flat after the first few "
          "steps (every step samples the same number of subsets and examples). A projected-gradient or Kronfluence "
          "row marked so timed its per-document stages on the first documents of the n-document corpus and scales "
          "them by n / timed; fixed stages (the P x k matrix and the kernel inverse; the EK-FAC eigendecomposition) "
          "are counted once. Those methods' per-document work does not depend on n.",
          "- **STRIDE's cost is mostly fixed**: K = n clamped to 128..1000 and steps = visits x K / batch, so from "
          "n = 1000 on the fitting loop is the same length; what grows with n is the frozen feature pass, the "
          "design and the store's membership and ids. Once the activation cache would exceed "
          "`activation_cache_mb` (default 1024 MiB) the build streams: every step recomputes its examples' "
          "activations, so the per-step cost jumps (seen at the largest n when its feature cache is 0 s).",
          "- **Projected gradients** follow TRAK/LoGRA's recipe at k = 4096 with a dense Gaussian matrix on CPU "
          "(TRAK's CUDA projector and LoGRA's factored projection are cheaper per document; the gradient pass "
          "alone is in the parts column). TRAK's kernel (Phi^T Phi, its inverse, Phi K^-1) is shown apart and "
          "not in the precompute column.",
          "- **Kronfluence**: `bench.methods.run_kronfluence` as the benchmark runs it (EK-FAC, default damping, "
          "batch 64), given one query so that its pairwise pass is one training-gradient pass over all n. Its "
          "`covariance_max_examples` and `lambda_max_examples` default to 100,000, so above 10^5 documents its "
          "factor fit stops growing and only the gradient pass does.",
          "- Documents here are short (one or two generated sentences); per-document costs grow with length for "
          "every method, STRIDE's fixed fitting loop does not.",
          "- Timings come from a shared 2-core machine (load averages beside each row); compare rows of one run.",
          *(f"- {note}" for note in res.get("notes", []))]
    return "\n".join(L) + "\n"


def git_state() -> tuple[str, list[str]]:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "stride", "worker"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown", []
    return rev, [line[3:] for line in dirty if line.strip()]


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def extrapolation_checks(pre: dict) -> list[dict]:
    """STRIDE rows that ran in full beside their probe's prediction: how good the per-step extrapolation is."""
    rows = [*pre["rows"].get("stride", []), pre.get("stride_cached")]
    return [{"n": r["n"], "steps": r["steps"], "probe_steps": r["probe"]["steps"], "predicted_s": r["predicted_s"],
             "measured_s": r["seconds"], "ratio": r["predicted_s"] / r["seconds"],
             "probe_steps_per_s": r["probe"]["steps"] / r["probe"]["fit_s"], "full_steps_per_s": r["steps_per_s"],
             "loadavg_start": r["loadavg_start"], "loadavg_end": r["loadavg_end"],
             "config": {k: r["config"].get(k) for k in ("fit", "positions", "visits", "num_subsets", "steps")}}
            for r in rows if r and not r["extrapolated"] and r["probe"]["steps"] < r["steps"]]


def _same(setting: dict) -> dict:
    """The fields of a precompute setting that fix its corpus and model (not its timings)."""
    return {k: v for k, v in setting.items() if k != "train_s"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, numbers are not reference figures")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default bench/results, quick: .../quick)")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default bench/work/precompute[-quick])")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="precompute part only: methods to (re)measure; the others' rows are kept from the JSON")
    ap.add_argument("--ns", default=None, help="precompute part: comma-separated n (default 1000,10000,100000)")
    ap.add_argument("--stride-full-n", default="", help="precompute part: n where STRIDE's build runs in full "
                    "whatever its predicted time (checks the per-step extrapolation)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := set(parts) - set(PARTS):
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    here = Path(__file__).resolve().parent
    plan = QUICK if args.quick else Plan()
    if args.ns:
        plan = dataclasses.replace(plan, ns=tuple(int(x) for x in args.ns.split(",")))
    if args.stride_full_n:
        plan = dataclasses.replace(plan, stride_full_n=tuple(int(x) for x in args.stride_full_n.split(",")))
    out = args.out or (here / "results" / ("quick" if args.quick else ""))
    work = args.work or here / "work" / ("precompute-quick" if args.quick else "precompute")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path = out / "precompute.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    for part in parts:
        print(f"{part}:", flush=True)
        la, started, t = loadavg(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
        key = part
        if part == "precompute":
            new = run_precompute(plan, work, methods)
            kept = {k: v for k, v in res.get(part, {}).get("rows", {}).items() if k not in methods}
            if kept and _same(res[part]["setting"]) != _same(new["setting"]):  # another corpus or model
                print(f"  dropping earlier rows of {sorted(kept)}: their setting differs", file=sys.stderr)
                kept = {}
            carried = {"stride_cached": res[part]["stride_cached"]} if "stride" in kept and \
                "stride_cached" in res[part] else {}
            res[part] = {**carried, **new, "rows": {k: kept.get(k) or new["rows"].get(k, []) for k in METHODS
                                                    if k in kept or k in new["rows"]}}
            key = f"{part} ({', '.join(methods)})"
            cmd = " ".join(["python -m bench.precompute", *(sys.argv[1:] if argv is None else argv)])
            res["checks"] = res.get("checks", []) + [{**c, "command": cmd, "started": started}
                                                     for c in extrapolation_checks(new)]
            for old in [k for k in res.get("meta", {}) if k.startswith(part)]:
                if set(old[len(part) + 2 : -1].split(", ")) <= set(methods):
                    del res["meta"][old]
        elif part == "gpt2":
            res[part] = run_gpt2(plan)
        else:
            res[part] = run_wide(plan, work)
        rev, dirty = git_state()
        cmd = " ".join(["python -m bench.precompute", *(sys.argv[1:] if argv is None else argv)])
        res.setdefault("meta", {})[key] = {"command": cmd, "started": started, "wall_s": time.perf_counter() - t,
                                           "git": rev, "dirty": dirty, "loadavg_start": la, "loadavg_end": loadavg()}
        res["machine"] = machine()
        if "precompute" in res:
            res["precompute"]["analysis"] = analyse(res["precompute"])
        path.write_text(json.dumps(res, indent=1))  # after every part: a later failure keeps the earlier ones
    command = "python -m bench.precompute" + (" --quick" if args.quick else "")
    (out / "precompute.md").write_text(render(res, command))
    if "precompute" in res:
        plot(res["precompute"], res["precompute"]["analysis"], out / "precompute.png")
    print(f"wrote {out / 'precompute.md'}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
