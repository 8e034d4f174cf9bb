"""Per-query cost on a realistic model shape: STRIDE against projected gradients and Kronfluence (issue 9, item 4).

Why: the reference benchmark's model has 266K parameters, so a backward pass there is nearly free and
the gradient methods look cheaper per query than they are on a real LM. Here every method's query is
timed side by side, in one run and one thread, on a randomly initialised GPT-2-small shape (12 layers,
width 768, vocabulary 50,257; ``GPT2Config()``, nothing downloaded) at n = 10^4 .. 10^7:

- STRIDE: the query's forward (``LM.features``), the K measurements (``stride.measure.loss_drops``: the
  default at this vocabulary, which is the top-V' slice; first order; and exact, timed on a slice of the
  operators and scaled linearly in K) and the Lasso (``bench.scaling.solver_scan``: a real random design
  at each n, synthetic y). Operators are Gaussian at the default build's resolved shape (cost only).
- Projected gradients: LoGRA's factored projection to k = 4096 inside one backward pass (activation
  gradients only), and TRAK's naive dense Gaussian projection of the full linear-weight gradient (timed on
  a slice of its rows, scaled); then the dot product with n stored k-vectors (``bench.scaling.projected_at``).
- Kronfluence EK-FAC: its pairwise scoring recomputes every training gradient per query call, so one query
  costs the preconditioning of its gradient plus n x (per-example gradient + dot), extrapolated from a
  measured training batch.
- State: STRIDE's store (computed from ``write_store``'s layout, checked against a written store), k = 4096
  projected gradients, EK-FAC factors.
- Optionally a ~1B-parameter Llama shape, forward and backward only.

Quality is meaningless on random weights; nothing here measures it.
``python -m bench.shape [--quick] [--parts gpt2,llama]`` -> ``bench/results/shape.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from bench.precompute import _fmt_s, _la, git_state, loadavg, machine
from bench.scaling import _median_ms, solver_scan
from stride.config import BuildConfig
from stride.corpus import Corpus
from stride.design import random_design
from stride.measure import EXACT_LIMIT, TOP_V, loss_drops
from stride.model import LM, Batch
from stride.operators import SteeringOperators
from stride.store import write_store

HERE = Path(__file__).resolve().parent
PARTS = ("gpt2", "llama")
# Llama-3.2-1B's shape (1.24B parameters with tied embeddings), random weights
LLAMA_1B = dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)


@dataclass
class Plan:
    """What one run measures; ``QUICK`` shrinks every shape to a smoke test."""

    ns: tuple[int, ...] = (10**4, 10**5, 10**6, 10**7)
    gpt2: dict = field(default_factory=dict)  # GPT2Config overrides (none: GPT-2 small)
    llama: dict = field(default_factory=lambda: dict(LLAMA_1B))
    prompt_len: int = 48  # query tokens, unscored
    completion_len: int = 16  # query tokens scored (the attributed answer)
    train_len: int = 128  # tokens per training example (Kronfluence's per-example gradient)
    train_batch: int = 2
    proj_dim: int = 4096
    logra_in: int = 8  # LoGRA: input-side projection width per module; output widths fill k
    exact_ops: int = 32  # operators the exact measurement is timed on
    dense_rows: int = 1 << 14  # rows of the dense Gaussian projection timed (x k floats)
    dot_chunk: int = 100_000  # stored rows the dot product is timed over (as bench.scaling)
    reps: int = 3
    kf_reps: int = 2  # calls of seconds each (a training batch; the 1B model's passes)
    op_scale: float = 0.01  # std of the synthetic operators' entries


QUICK = Plan(ns=(1_000, 3_000), gpt2=dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64,
                                          bos_token_id=0, eos_token_id=0),
             llama=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
             prompt_len=6, completion_len=4, train_len=16, train_batch=2, proj_dim=128, exact_ops=4,
             dense_rows=256, dot_chunk=1_000, reps=1, kf_reps=1)


# ---------------------------------------------------------------- models and queries


def random_lm(model, seq_len: int) -> LM:
    """The core's LM around random weights; a query is built from ids, so no tokenizer is needed."""
    cfg = model.config
    return LM(model, SimpleNamespace(pad_token_id=None, eos_token_id=getattr(cfg, "eos_token_id", 0)),
              torch.device("cpu"), seq_len)


def random_batch(vocab: int, rows: int, prompt: int, scored: int, seed: int) -> Batch:
    """Random ids; the last ``scored`` positions of each row are the loss's targets (a completion)."""
    ids = torch.randint(vocab, (rows, prompt + scored), generator=torch.Generator().manual_seed(seed))
    targets = torch.full_like(ids, -100)
    targets[:, prompt - 1 : -1] = ids[:, prompt:]
    return Batch(ids, torch.ones_like(ids), targets)


def tracked_modules(model) -> list[torch.nn.Module]:
    """The linear maps gradient methods track (nn.Linear, GPT-2's Conv1D), not the tied output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head]


def io_dims(module) -> tuple[int, int]:
    """(inputs, outputs): Conv1D stores its weight as (in, out), nn.Linear as (out, in)."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, torch.nn.Linear) else (w.shape[0], w.shape[1])


def hooked_backward(model, batch: Batch, modules: list, on_module) -> None:
    """One forward and backward of the batch's summed loss in which autograd computes only activation
    gradients; ``on_module(i, x, g)`` receives module i's input and output gradient, (B, T, in) and
    (B, T, out): all LoGRA's projection and a per-example gradient need, nothing held for the rest."""
    handles = [model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: out.detach().requires_grad_(True))]  # the graph starts at the embeddings

    def hook(i):
        def fwd(mod, args, out):
            x = args[0].detach()
            out.register_hook(lambda g: on_module(i, x, g))
        return fwd

    handles += [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=-100, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()


def logra_widths(num_modules: int, k: int, a: int) -> list[int]:
    """Output-side widths b_m with sum_m a b_m = k (LoGRA projects module m's gradient to a x b_m)."""
    per, rem = divmod(k // a, num_modules)
    if k % a or per < 1:
        raise ValueError(f"k = {k} must be a multiple of {a} and at least {a} x {num_modules} modules")
    return [per + (i < rem) for i in range(num_modules)]


class Logra:
    """LoGRA's factored projection: module m's gradient sum_t g_t x_t^T becomes (P_out^T g_t)(P_in^T x_t)^T
    summed over t, an a x b_m block, without forming the (out, in) gradient; blocks concatenate to k."""

    def __init__(self, modules: list, k: int, a: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.p_in, self.p_out = [], []
        for m, b in zip(modules, logra_widths(len(modules), k, a), strict=True):
            fan_in, fan_out = io_dims(m)
            self.p_in.append(torch.randn(fan_in, a, generator=gen) / math.sqrt(a))
            self.p_out.append(torch.randn(fan_out, b, generator=gen) / math.sqrt(b))
        self.blocks: list[torch.Tensor | None] = [None] * len(modules)

    def __call__(self, i: int, x: torch.Tensor, g: torch.Tensor) -> None:
        xs = x.reshape(-1, x.shape[-1]) @ self.p_in[i]
        gs = g.reshape(-1, g.shape[-1]) @ self.p_out[i]
        self.blocks[i] = (gs.T @ xs).reshape(-1)

    def vector(self) -> torch.Tensor:
        return torch.cat(self.blocks)


def _timed(fn, reps: int, warmup: int = 1) -> dict:
    """Median wall and process-CPU seconds of ``fn()``. On this shared CPU, under ``nice``, the CPU time is
    the closer estimate of an idle machine's wall time (first run: the solve at n = 10^6 took 169 ms wall and
    18 ms CPU at load 4, two other jobs holding both cores)."""
    wall, cpu = _median_ms(fn, reps, warmup)
    return {"wall": wall / 1e3, "cpu": cpu / 1e3}


def _scale(t: dict, f: float) -> dict:
    return {k: v * f for k, v in t.items()}


def _sum(*ts: dict) -> dict:
    return {k: sum(t[k] for t in ts) for k in ("wall", "cpu")}


# ---------------------------------------------------------------- STRIDE


def synthetic_operators(lm: LM, h: torch.Tensor, K: int, rank: int, scale: float) -> SteeringOperators:
    """Gaussian operators at the resolved shape; the basis standardised on the query's own activations."""
    ops = SteeringOperators(lm.hidden_size, rank, K)
    ops.init_basis(h, 0)
    with torch.no_grad():
        ops.A.normal_(0.0, scale, generator=torch.Generator().manual_seed(1))
    return ops.requires_grad_(False)


def stride_parts(lm: LM, plan: Plan, log=print) -> dict:
    """Forward and measurement (n-independent: K is 1000 for every n >= 1000) at the resolved shape."""
    cfg = BuildConfig().resolve(max(plan.ns), lm.num_layers)
    K, r, d, layer = int(cfg.num_subsets), cfg.rank, cfg.memberships, int(cfg.layer)
    batch = random_batch(lm.unembed.shape[0], 1, plan.prompt_len, plan.completion_len, 0)
    h, z = lm.features(batch, layer)
    ops = synthetic_operators(lm, h, K, r, plan.op_scale)
    V, dm = lm.unembed.shape
    T = plan.completion_len
    default_top_v = 0 if K * T * V * dm <= EXACT_LIMIT else TOP_V  # what loss_drops picks with top_v=None
    times = {"forward": _timed(lambda: lm.features(batch, layer), plan.reps),
             "measure_default": _timed(lambda: loss_drops(lm, ops, h, z, batch.targets), plan.reps),
             "measure_first_order": _timed(lambda: loss_drops(lm, ops, h, z, batch.targets, True), plan.reps)}

    @torch.no_grad()
    def body():  # what `features` needs: the hidden states, without the LM head's logits at every position
        lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            output_hidden_states=True, use_cache=False)

    times["forward_base"] = _timed(body, plan.reps)
    k = min(plan.exact_ops, K)
    part = SteeringOperators(dm, r, k)
    part.load_state_dict({**ops.state_dict(), "A": ops.A[:k]})
    part.requires_grad_(False)
    exact_k = _timed(lambda: loss_drops(lm, part, h, z, batch.targets, top_v=0), plan.reps)
    times["measure_exact"] = _scale(exact_k, K / k)  # linear in K, the fixed part scaled too: an upper bound
    log(f"  STRIDE (CPU s): forward {times['forward']['cpu']:.3f}, measure (default top_v={default_top_v}) "
        f"{times['measure_default']['cpu']:.3f}, first order {times['measure_first_order']['cpu']:.3f}, exact "
        f"{exact_k['cpu']:.3f} on {k} operators -> {times['measure_exact']['cpu']:.1f} at K={K}")
    return {"config": {"num_subsets": K, "rank": r, "memberships": d, "layer": layer, "fit": cfg.fit},
            "query": {"prompt_tokens": plan.prompt_len, "scored_tokens": T}, "default_top_v": default_top_v,
            "kTVd": K * T * V * dm, "exact_limit": EXACT_LIMIT, "exact_timed_ops": k, "exact_timed": exact_k,
            "times": times}


def store_sizes(ns: tuple[int, ...], K: int, rank: int, width: int, d: int, log=print) -> dict:
    """Operators + basis + membership bytes per n, fp32 and bf16, from ``write_store``'s layout; the
    layout is checked against a store written at the smallest n (the difference is headers)."""
    def data_bytes(n: int, b: int) -> dict:
        return {"operators": K * rank * width * b, "basis": (width * rank + width + 1) * b,
                "membership": (K + 1) * 8 + n * d * 4}  # crow int64, col int32 (format 2)

    n0 = min(ns)
    tmp = Path(tempfile.mkdtemp(prefix="stride-shape-"))
    try:
        stub = tmp / "stub.jsonl"
        stub.write_text('{"id": "x", "text": "x"}\n')
        corpus = Corpus(stub, [str(i) for i in range(n0)], np.zeros(n0, np.int64), np.ones(n0, np.int64))
        ops = SteeringOperators(width, rank, K).requires_grad_(False)
        cfg = BuildConfig(num_subsets=K, memberships=d, rank=rank, layer=0, steps=1)
        out = write_store(tmp / "store", config=cfg, ops=ops, membership=random_design(n0, K, d, 0),
                          corpus=corpus, model_path=tmp, model_sha256="synthetic")
        written = {f: (out / f"{f}.safetensors").stat().st_size for f in ("operators", "basis", "membership")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    headers = {f: written[f] - v for f, v in data_bytes(n0, 4).items()}
    log(f"  store layout checked at n={n0}: written {sum(written.values()):,} B, headers {sum(headers.values()):,} B")
    rows = []
    for n in ns:
        f32 = {f: v + headers[f] for f, v in data_bytes(n, 4).items()}
        bf16 = {f: v + headers[f] for f, v in data_bytes(n, 2).items()}
        # in memory as the service holds it: load_store widens col to int64; the solver adds (n, d) uint16 ids
        mem = f32["operators"] + f32["basis"] + (K + 1) * 8 + n * d * 8 + n * d * 2
        rows.append({"n": n, "float32_bytes": sum(f32.values()), "bfloat16_bytes": sum(bf16.values()),
                     "float32_files": f32, "memory_bytes": mem, "written": n == n0})
    return {"checked_n": n0, "written_bytes": written, "header_bytes": headers, "rows": rows}


def solve_times(rows: list[dict]) -> list[dict]:
    """Per n, the slower of the planted-y and dense-noise medians of ``bench.scaling.solve_at`` (a random
    model's y is closer to noise), wall and CPU, with the certificate."""
    return [{"n": r["n"], "wall": max(r["planted"]["ms_median"], r["noise"]["ms_median"]) / 1e3,
             "cpu": max(r["planted"]["cpu_ms_median"], r["noise"]["cpu_ms_median"]) / 1e3,
             "gap_max": max(r["planted"]["gap_max"], r["noise"]["gap_max"]),
             "converged": r["planted"]["converged"] and r["noise"]["converged"]} for r in rows]


# ---------------------------------------------------------------- gradient methods


def gradient_parts(model, lm: LM, plan: Plan, log=print) -> dict:
    """Per-query projected-gradient costs (n-independent parts) and Kronfluence's per-example cost."""
    modules = tracked_modules(model)
    P = sum(m.weight.numel() for m in modules)
    q = random_batch(lm.unembed.shape[0], 1, plan.prompt_len, plan.completion_len, 0)
    logra = Logra(modules, plan.proj_dim, plan.logra_in)
    grads: list[torch.Tensor | None] = [None] * len(modules)

    def weight_grad(i, x, g):  # the (out, in) gradient a dense projection or an EK-FAC score needs
        grads[i] = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    s = {"forward_backward": _timed(lambda: hooked_backward(model, q, modules, lambda *a: None), plan.reps),
         "logra_query": _timed(lambda: (hooked_backward(model, q, modules, logra), logra.vector()), plan.reps),
         "weight_gradient_query": _timed(lambda: hooked_backward(model, q, modules, weight_grad), plan.reps)}
    flat = torch.cat([g.reshape(-1) for g in grads])
    grads.clear()
    rows = min(plan.dense_rows, P)
    gen = torch.Generator().manual_seed(2)
    R = torch.randn(rows, plan.proj_dim, generator=gen)
    s["dense_product"] = _scale(_timed(lambda: flat[:rows] @ R, plan.reps), P / rows)
    s["dense_generate"] = _scale(_timed(lambda: torch.randn(rows, plan.proj_dim, generator=gen), 1, 0), P / rows)
    R = flat = None  # 340 MB each on GPT-2 small, before the Kronfluence timing
    log(f"  projected gradients (CPU s): P={P:,} in {len(modules)} modules; fwd+bwd "
        f"{s['forward_backward']['cpu']:.2f}, LoGRA query {s['logra_query']['cpu']:.2f}, weight-gradient query "
        f"{s['weight_gradient_query']['cpu']:.2f}, dense projection {s['dense_product']['cpu']:.1f} "
        f"(+{s['dense_generate']['cpu']:.0f} generating it)")
    kf = kronfluence_parts(model, lm, modules, plan, log)
    widths = logra_widths(len(modules), plan.proj_dim, plan.logra_in)
    return {"P": P, "modules": len(modules), "proj_dim": plan.proj_dim, "logra_in": plan.logra_in,
            "logra_out": sorted(set(widths)), "dense_timed_rows": rows, "times": s, "kronfluence": kf}


def kronfluence_parts(model, lm: LM, modules: list, plan: Plan, log=print) -> dict:
    """EK-FAC's per-query work: precondition the query gradient (rotate into both eigenbases, divide by
    the corrected eigenvalues, rotate back; timed on one block's modules, scaled by the block count),
    then per training example a gradient and its dot with the preconditioned query gradient."""
    gen = torch.Generator().manual_seed(3)
    dims = [io_dims(m) for m in modules]
    layers = lm.num_layers
    block = dims[: len(dims) // layers]

    def rotate(fan_in: int, fan_out: int) -> dict:
        Qi, Qo = torch.randn(fan_in, fan_in, generator=gen), torch.randn(fan_out, fan_out, generator=gen)
        G, lam = torch.randn(fan_out, fan_in, generator=gen), torch.rand(fan_out, fan_in, generator=gen)
        return _timed(lambda: Qo @ ((Qo.T @ G @ Qi) / (lam + 1e-8)) @ Qi.T, 1, 0)

    precond = _scale(_sum(*(rotate(*d) for d in block)), layers)
    pre_q = [torch.randn(fo, fi, generator=gen) for fi, fo in dims]  # the preconditioned query gradient
    train = random_batch(lm.unembed.shape[0], plan.train_batch, 1, plan.train_len - 1, 4)
    scores = torch.zeros(plan.train_batch)

    def per_example(i, x, g):  # Kronfluence's per-sample gradient, then its dot with the query's
        G = torch.einsum("btp,btm->bpm", g, x)
        scores.add_((G * pre_q[i]).sum((1, 2)))

    # the model is warm from the query timings: no untimed call (each costs seconds at this shape)
    batch_t = _timed(lambda: hooked_backward(model, train, modules, per_example), plan.kf_reps, 0)
    per_ex = _scale(batch_t, 1 / plan.train_batch)
    log(f"  Kronfluence (CPU s): precondition {precond['cpu']:.1f} ({len(block)} modules timed x {layers} blocks), "
        f"per example {per_ex['cpu']:.2f} (batch of {plan.train_batch} x {plan.train_len} tokens)")
    # factor state: covariances m^2 + p^2, eigenvectors the same, eigenvalues m + p, lambda p m (m with the bias)
    state = {"covariances": 0, "eigenvectors": 0, "eigenvalues": 0, "lambda": 0}
    for m, (fan_in, fan_out) in zip(modules, dims, strict=True):
        fi = fan_in + (m.bias is not None)
        state["covariances"] += (fi * fi + fan_out * fan_out) * 4
        state["eigenvectors"] += (fi * fi + fan_out * fan_out) * 4
        state["eigenvalues"] += (fi + fan_out) * 4
        state["lambda"] += fi * fan_out * 4
    return {"precondition": precond, "precondition_timed_modules": len(block), "blocks": layers,
            "per_example": per_ex, "train_batch": plan.train_batch, "train_tokens": plan.train_len,
            "batch": batch_t, "factor_bytes": state, "disk_bytes": sum(state.values()),
            "memory_bytes": state["eigenvectors"] + state["eigenvalues"] + state["lambda"]}


def dot_times(ns: tuple[int, ...], k: int, chunk: int, reps: int, log=print) -> list[dict]:
    """The query's dot product with n stored k-vectors (float32): timed in full up to ``chunk`` rows,
    beyond over one chunk and scaled by n / chunk (memory-bound: one pass over the rows either way)."""
    X = torch.randn(min(max(ns), chunk), k, generator=torch.Generator().manual_seed(1))
    phi = torch.randn(k)
    out = []
    for n in ns:
        rows = min(n, chunk)
        t = _scale(_timed(lambda rows=rows: X[:rows] @ phi, reps), n / rows)
        out.append({"n": n, **t, "timed_rows": rows, "extrapolated": n > rows,
                    "float32_bytes": n * k * 4, "float16_bytes": n * k * 2})
        log(f"  dot product n={n:>9}: {t['cpu'] * 1e3:.0f} ms CPU ({rows:,} rows timed)")
    return out


# ---------------------------------------------------------------- the runs


def run_gpt2(plan: Plan, log=print) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    la = loadavg()
    cfg = GPT2Config(**plan.gpt2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    lm = random_lm(model, plan.prompt_len + plan.completion_len)
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    params = sum(p.numel() for p in model.parameters())
    log(f"GPT-2 shape {shape}: {params:,} parameters (load {la[0]:.2f})")
    stride = stride_parts(lm, plan, log)
    c = stride["config"]
    grad = gradient_parts(model, lm, plan, log)
    del model, lm
    gc.collect()
    store = store_sizes(plan.ns, c["num_subsets"], c["rank"], cfg.n_embd, c["memberships"], log)
    solver = solver_scan(list(plan.ns), c["num_subsets"], c["memberships"], startup=False, log=log)
    dots = dot_times(plan.ns, plan.proj_dim, plan.dot_chunk, plan.reps, log)
    gc.collect()
    solves = solve_times(solver)
    return {"shape": shape, "parameters": params, "stride": stride, "gradients": grad, "store": store,
            "solver": solver, "solve": solves, "dot": dots, "totals": totals(stride, grad, solves, dots),
            "loadavg_start": la, "loadavg_end": loadavg()}


def totals(stride: dict, grad: dict, solves: list[dict], dots: list[dict]) -> list[dict]:
    """Whole-query seconds ({wall, cpu}) per method at each n."""
    s, g, kf = stride["times"], grad["times"], grad["kronfluence"]
    out = []
    for sv, dt in zip(solves, dots, strict=True):
        n = sv["n"]
        head = _sum(s["forward"], sv)
        row = {"n": n, "stride": _sum(head, s["measure_default"]),
               "stride_first_order": _sum(head, s["measure_first_order"]),
               "stride_exact": _sum(head, s["measure_exact"]), "logra": _sum(g["logra_query"], dt),
               "trak_dense": _sum(g["weight_gradient_query"], g["dense_product"], dt),
               "kronfluence": _sum(kf["precondition"], _scale(kf["per_example"], n))}
        row["logra_over_stride"] = {k: row["logra"][k] / row["stride"][k] for k in ("wall", "cpu")}
        out.append(row)
    return out


def run_llama(plan: Plan, log=print) -> dict:
    """A ~1B Llama shape: forward (STRIDE's query), backward with activation gradients only plus LoGRA's
    projection, and backward with every linear weight's gradient formed (then dropped: at 1B the full
    gradient would add 3.9 GB; the work is the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    la = loadavg()
    cfg = LlamaConfig(**plan.llama)
    torch.manual_seed(0)
    init = time.process_time()
    model = LlamaForCausalLM(cfg)
    init_s = time.process_time() - init
    params = sum(p.numel() for p in model.parameters())
    log(f"Llama shape: {params:,} parameters, initialised in {init_s:.0f} s CPU (load {la[0]:.2f})")
    lm = random_lm(model, plan.prompt_len + plan.completion_len)
    modules = tracked_modules(model)
    q = random_batch(cfg.vocab_size, 1, plan.prompt_len, plan.completion_len, 0)
    layer = BuildConfig().resolve(max(plan.ns), lm.num_layers).layer
    logra = Logra(modules, plan.proj_dim, plan.logra_in)

    def weight_grad(i, x, g):
        g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    reps = plan.kf_reps  # seconds per call at 1B: two timed calls each, the backward ones after a warm forward
    s = {"forward": _timed(lambda: lm.features(q, layer), reps),
         "logra_query": _timed(lambda: (hooked_backward(model, q, modules, logra), logra.vector()), reps, 0),
         "weight_gradient_query": _timed(lambda: hooked_backward(model, q, modules, weight_grad), reps, 0)}
    log(f"  Llama (CPU s): forward {s['forward']['cpu']:.2f}, LoGRA query {s['logra_query']['cpu']:.2f}, "
        f"weight-gradient query {s['weight_gradient_query']['cpu']:.2f}")
    shape = {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size")}
    P = sum(m.weight.numel() for m in modules)
    return {"shape": shape, "parameters": params, "tracked_parameters": P, "modules": len(modules),
            "init_cpu_s": init_s, "times": s, "loadavg_start": la, "loadavg_end": loadavg()}


# ---------------------------------------------------------------- report


def _t(s: float) -> str:
    """Seconds as ``bench.precompute`` writes them from 10 s up, finer below (queries take milliseconds)."""
    if s >= 10:
        return _fmt_s(s)
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.1f} ms"


def _b(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:,.1f} {unit}"
    return f"{x:.0f} B"


def _x(r: float) -> str:
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x"


def peak_rss_mb() -> float:
    """The process's peak resident memory (VmHWM): the run must stay within a shared machine's means."""
    with open("/proc/self/status") as f:
        return next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM")), float("nan"))


def targets(res: dict, n: int = 10**6) -> list[dict]:
    """The issue's GPT-2-small targets at n, from this run's own numbers (speed: CPU time, wall beside)."""
    g = res.get("gpt2")
    if not g:
        return []
    row = next((r for r in g["totals"] if r["n"] == n), None)
    st = next((r for r in g["store"]["rows"] if r["n"] == n), None)
    dot = next((r for r in g["dot"] if r["n"] == n), None)
    if row is None or st is None or dot is None:
        return [{"target": f"n = {n:,} not in this run", "met": None}]
    k = g["gradients"]["proj_dim"]
    speed = row["logra_over_stride"]
    size32 = dot["float32_bytes"] / st["float32_bytes"]
    size16 = dot["float16_bytes"] / st["bfloat16_bytes"]
    return [{"target": f"whole query >= 10x faster than projected gradients (LoGRA, k = {k}) at n = {n:,}",
             "kind": "time", "value": speed["cpu"], "value_wall": speed["wall"],
             "figures": (row["stride"]["cpu"], row["logra"]["cpu"]), "met": speed["cpu"] >= 10,
             "met_wall": speed["wall"] >= 10},
            {"target": f"store >= 10x smaller than k = {k} projected gradients at n = {n:,} (float32 both)",
             "kind": "bytes", "value": size32, "figures": (st["float32_bytes"], dot["float32_bytes"]),
             "met": size32 >= 10},
            {"target": "the same in 16 bits (STRIDE bfloat16, gradients float16)", "kind": "bytes", "value": size16,
             "figures": (st["bfloat16_bytes"], dot["float16_bytes"]), "met": size16 >= 10}]


def _c(t: dict) -> str:
    """CPU time, wall in brackets."""
    return f"{_t(t['cpu'])} ({_t(t['wall'])})"


def render(res: dict) -> str:
    m, meta = res["machine"], res["meta"]
    L = ["# Per-query cost on a realistic shape: STRIDE, projected gradients, Kronfluence", "",
         "Generated by `bench/shape.py` (issue 9, item 4). **Cost only: every model here has random weights, so "
         "no figure says anything about attribution quality.** Every method is timed in the same process, "
         "one after the other, on one torch thread. Times are the process's CPU time with the wall time in "
         "brackets: the run shares 2 cores with other jobs under `nice`, so wall time mostly measures waiting "
         "for a core, and CPU time is the closer estimate of an idle machine's wall time. Figures marked "
         "*extrapolated* (\\*) were timed on a part of the work and scaled, as each note says.", "",
         f"- **Command**: `{meta['command']}` (under `nice -n 10 env OMP_NUM_THREADS=1`), run {meta['started']} "
         f"({meta['wall_s']:.0f} s wall), code `{meta['git']}`"
         f"{' (uncommitted changes in ' + ', '.join(meta['dirty']) + ')' if meta['dirty'] else ''}; peak "
         f"resident memory {meta['peak_rss_mb']:,.0f} MiB",
         f"- **Machine**: {m['cpu']}, {m['cores']} cores shared with other jobs, torch {m['torch']} with "
         f"{m['threads']} thread, Python {m['python']}",
         f"- **Load averages** (1, 5, 15 min): at start {_la(meta['loadavg_start'])}, at end "
         f"{_la(meta['loadavg_end'])}" + "".join(f"; {p} part: {_la(res[p]['loadavg_start'])} -> "
                                                 f"{_la(res[p]['loadavg_end'])}" for p in PARTS if p in res)]
    g = res.get("gpt2")
    if g:
        L += gpt2_section(g, res)
    lr = res.get("llama")
    if lr:
        sh, s = lr["shape"], lr["times"]
        L += ["", "## ~1B Llama shape: forward and backward only", "",
              f"`LlamaConfig` ({sh['num_hidden_layers']} layers, width {sh['hidden_size']}, MLP "
              f"{sh['intermediate_size']}, {sh['num_attention_heads']} heads / {sh['num_key_value_heads']} KV, "
              f"vocabulary {sh['vocab_size']:,}; {lr['parameters']:,} parameters, {lr['tracked_parameters']:,} in "
              f"{lr['modules']} linear modules), random weights (initialised in {lr['init_cpu_s']:.0f} s CPU), the "
              "same query shape.", "",
              "| pass | CPU (wall) | what it stands for |", "|---|---|---|",
              f"| forward (`LM.features`) | {_c(s['forward'])} | STRIDE's query forward |",
              f"| forward + backward (activation gradients) + LoGRA projection | {_c(s['logra_query'])} | "
              "a projected-gradient query before its dot product |",
              f"| forward + backward forming every linear weight's gradient | {_c(s['weight_gradient_query'])} | "
              "TRAK-style query gradient; about Kronfluence's per-example cost at this length |"]
    elif "llama_skipped" in res:
        L += ["", "## ~1B Llama shape", "", res["llama_skipped"]]
    L += ["", "## Notes", "",
          "- Random weights: the losses, measurements and scores are meaningless; only time and bytes are reported.",
          "- STRIDE's forward and measurement do not depend on n (K = 1000 for every n >= 1000); the solve does, and "
          "is measured at each n on a real random design from `stride.design.random_design`.",
          "- Projected gradients: LoGRA's factored projection (each linear module's gradient projected as "
          "(P_out^T g_t)(P_in^T x_t)^T summed over positions, blocks concatenated to k; no weight gradient is "
          "formed) is the fair, cheap version and the one the targets compare against; TRAK's dense Gaussian "
          "projection of the full gradient is the naive cost. Both include the query's forward pass. The tracked "
          "modules are the blocks' linear maps (GPT-2's Conv1D), not the tied output embedding.",
          "- Kronfluence was not run on this shape (fitting its factors means two eigendecompositions per tracked "
          "module, up to 3,072 wide on GPT-2 small, on one thread); its per-query cost is modelled from the work "
          "its pairwise scoring does, timed with the same hooked backward: per-sample gradients of every tracked "
          "module and their dot with the preconditioned query gradient. The bias column Kronfluence appends is "
          "left out (< 0.2% of the work).",
          "- The machine is shared: compare rows of this run, not absolute values across runs."]
    return "\n".join(L) + "\n"


def gpt2_section(g: dict, res: dict) -> list[str]:
    sh, st, gr = g["shape"], g["stride"], g["gradients"]
    c, s, gs, kf = st["config"], st["times"], gr["times"], gr["kronfluence"]
    if st["default_top_v"]:
        default = (f"| STRIDE | measurement, default at this vocabulary (top-{st['default_top_v']} slice + target, "
                   f"tail to first order) | {_c(s['measure_default'])} | measured; K T V d = {st['kTVd']:.2e} > "
                   "2^33, so `loss_drops` picks the slice |")
    else:
        default = (f"| STRIDE | measurement, default at this vocabulary (exact: K T V d = {st['kTVd']:.2e} <= 2^33) | "
                   f"{_c(s['measure_default'])} | measured |")
    L = ["", "## GPT-2-small shape", "",
         f"`GPT2Config` ({sh['n_layer']} layers, width {sh['n_embd']}, {sh['n_head']} heads, vocabulary "
         f"{sh['vocab_size']:,}; {g['parameters']:,} parameters), random weights. Query: "
         f"{st['query']['prompt_tokens']} prompt tokens and {st['query']['scored_tokens']} scored completion tokens "
         f"(random ids). STRIDE at the default build's resolved shape: K = {c['num_subsets']}, rank {c['rank']}, "
         f"d = {c['memberships']}, layer {c['layer']}; Gaussian operators.", "",
         "### Parts of one query (the same at every n unless said)", "",
         "| method | part | CPU (wall) | how |", "|---|---|---|---|",
         f"| STRIDE | forward (`LM.features`) | {_c(s['forward'])} | measured |",
         f"| STRIDE | (the same without the LM head's logits: the base model) | {_c(s['forward_base'])} | measured; "
         "not in the totals |", default,
         f"| STRIDE | measurement, first order | {_c(s['measure_first_order'])} | measured |",
         f"| STRIDE | measurement, exact (all {sh['vocab_size']:,} logits) | {_c(s['measure_exact'])}\\* | "
         f"**extrapolated**: {_c(st['exact_timed'])} on {st['exact_timed_ops']} operators x "
         f"{c['num_subsets']}/{st['exact_timed_ops']} |",
         "| STRIDE | Lasso solve | per n, below | measured at every n (real random design) |",
         f"| projected gradients | forward + backward, activation gradients only | {_c(gs['forward_backward'])} "
         "| measured |",
         f"| projected gradients (LoGRA) | forward + backward + factored projection to k = {gr['proj_dim']} | "
         f"{_c(gs['logra_query'])} | measured; {gr['modules']} linear modules, each to {gr['logra_in']} x "
         f"{'/'.join(map(str, gr['logra_out']))} |",
         f"| projected gradients (TRAK-style, dense) | forward + backward forming the full gradient "
         f"(P = {gr['P']:,}) | {_c(gs['weight_gradient_query'])} | measured |",
         f"| projected gradients (TRAK-style, dense) | P x k Gaussian product | {_c(gs['dense_product'])}\\* | "
         f"**extrapolated** from {gr['dense_timed_rows']:,} rows x P/rows; the matrix "
         f"({_b(gr['P'] * gr['proj_dim'] * 4)}) cannot be held, and generating it costs "
         f"{_c(gs['dense_generate'])} more (not counted) |",
         f"| Kronfluence EK-FAC | precondition the query gradient | {_c(kf['precondition'])}\\* | "
         f"**extrapolated**: {kf['precondition_timed_modules']} modules of one block timed x {kf['blocks']} blocks |",
         f"| Kronfluence EK-FAC | per training example: gradient + dot with the preconditioned query | "
         f"{_c(kf['per_example'])} | measured on a batch of {kf['train_batch']} x {kf['train_tokens']} tokens; "
         "x n per query: **extrapolated** |", "",
         "### Whole query versus n", "",
         "| n | STRIDE solve | STRIDE (default) | STRIDE, first order | STRIDE, exact | dot with n x k | "
         "projected, LoGRA | projected, TRAK dense | Kronfluence EK-FAC | LoGRA / STRIDE |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r, sv, dt in zip(g["totals"], g["solve"], g["dot"], strict=True):
        gap = f"gap {sv['gap_max']:.0e}{'' if sv['converged'] else ', **not converged**'}"
        star = "\\*" if dt["extrapolated"] else ""
        ratio = r["logra_over_stride"]
        L.append(f"| {r['n']:,} | {_c(sv)}, {gap} | {_c(r['stride'])} | {_c(r['stride_first_order'])} | "
                 f"{_c(r['stride_exact'])}\\* | {_c(dt)}{star} | {_c(r['logra'])}{star} | "
                 f"{_c(r['trak_dense'])}\\* | {_c(r['kronfluence'])}\\* | {_x(ratio['cpu'])} ({_x(ratio['wall'])}) |")
    chunk = res["plan"]["dot_chunk"]
    L += ["", "\\* extrapolated (see the parts above). STRIDE's solve is the slower of the planted-y and dense-noise "
          "medians of `bench.scaling.solve_at` (8 synthetic queries, 1 thread; gap = the largest certified gap / "
          f"primal). The dot product is timed in full up to n = {chunk:,} rows and, beyond, over {chunk:,} rows "
          "held in RAM and scaled by n / rows (at n = 10^7 the float32 vectors are 164 GB and would stream from "
          "disk: slower). Kronfluence's pairwise scoring recomputes every training gradient per call; a batch of "
          "Q queries shares that pass (n/Q examples per query), as it shares the projected-gradient dot and "
          "STRIDE's full passes; all rows here are one query alone.", "",
          "### State on disk and in memory", "",
          "| n | STRIDE store float32 | STRIDE store bfloat16 | STRIDE in memory | projected k float32 | "
          "projected k float16 | EK-FAC factors (disk / memory) | projected / STRIDE (32-bit) |",
          "|---|---|---|---|---|---|---|---|"]
    for s_row, dt in zip(g["store"]["rows"], g["dot"], strict=True):
        L.append(f"| {s_row['n']:,} | {_b(s_row['float32_bytes'])}{' (written)' if s_row['written'] else ''} | "
                 f"{_b(s_row['bfloat16_bytes'])} | {_b(s_row['memory_bytes'])} | {_b(dt['float32_bytes'])} | "
                 f"{_b(dt['float16_bytes'])} | {_b(kf['disk_bytes'])} / {_b(kf['memory_bytes'])} | "
                 f"{_x(dt['float32_bytes'] / s_row['float32_bytes'])} |")
    L += ["", "STRIDE's store: operators + basis + membership, the files `write_store` writes, computed from its "
          f"layout (checked: the store written at n = {g['store']['checked_n']:,} matches to its "
          f"{sum(g['store']['header_bytes'].values()):,} header bytes). bfloat16 halves the operators and basis "
          "(the core writes float32 today; computed). In memory: float32 operators, the membership as "
          "`load_store` holds it (int64 columns) and the solver's (n, d) uint16 ids. Not counted for any method: "
          "the corpus index (ids, offsets) every method needs, and the model. EK-FAC factors: covariances, "
          "eigenvectors, eigenvalues and the lambda matrix of every tracked module, float32, as Kronfluence saves "
          "them (computed from the shapes; eigenvectors, eigenvalues and lambda are what scoring loads), the same "
          "at every n."]
    tg = targets(res)
    if tg:
        L += ["", "### The issue's targets (GPT-2-small shape, this run)", "", "| target | this run | met |",
              "|---|---|---|"]
        for t in tg:
            if t["met"] is None:
                L.append(f"| {t['target']} | | |")
            elif t["kind"] == "time":
                a, b = t["figures"]
                L.append(f"| {t['target']} | CPU: {_t(a)} vs {_t(b)}, {_x(t['value'])} (wall: {_x(t['value_wall'])}) "
                         f"| {'yes' if t['met'] else '**no**'} (wall: {'yes' if t['met_wall'] else 'no'}) |")
            else:
                a, b = t["figures"]
                met = "yes" if t["met"] else "**no**"
                L.append(f"| {t['target']} | {_b(a)} vs {_b(b)}: {_x(t['value'])} | {met} |")
        L += breakdown(g)
    return L


def breakdown(g: dict, n: int = 10**6) -> list[str]:
    """Where the time goes at n, and the ratio's ceiling: STRIDE's query cannot cost less than its forward."""
    row = next((r for r in g["totals"] if r["n"] == n), None)
    if row is None:
        return []
    s, gs = g["stride"]["times"], g["gradients"]["times"]
    sv = next(v for v in g["solve"] if v["n"] == n)
    dt = next(d for d in g["dot"] if d["n"] == n)
    logra = row["logra"]["cpu"]
    fwd, base = s["forward"]["cpu"], s["forward_base"]["cpu"]
    return ["", f"Where the time goes at n = {n:,} (CPU): STRIDE {_t(row['stride']['cpu'])} = forward {_t(fwd)} "
            f"(the base model alone, as `LM.features` runs it: {_t(base)}) + measurement "
            f"{_t(s['measure_default']['cpu'])} (first order: "
            f"{_t(s['measure_first_order']['cpu'])}) + solve {_t(sv['cpu'])}. LoGRA {_t(logra)} = forward + "
            f"backward + projection {_t(gs['logra_query']['cpu'])} + dot {_t(dt['cpu'])}. With the measurement and "
            f"the solve free, the ratio could reach {_x(logra / min(fwd, base))}: the speed target at this n needs "
            "STRIDE's whole query within about one forward pass of the model body."]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.shape", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, numbers are not reference figures")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default bench/results, quick: .../quick)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    torch.set_num_threads(1)
    plan = QUICK if args.quick else Plan()
    out = args.out or (HERE / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    la, started, t = loadavg(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    res: dict = {"plan": dataclasses.asdict(plan)}
    if "gpt2" in parts:
        res["gpt2"] = run_gpt2(plan)
    if "llama" in parts:
        res["llama"] = run_llama(plan)
    else:
        res["llama_skipped"] = "Not run (`--parts` left it out)."
    rev, dirty = git_state()
    cmd = " ".join(["python -m bench.shape", *(sys.argv[1:] if argv is None else argv)])
    res["meta"] = {"command": cmd, "started": started, "wall_s": time.perf_counter() - t, "git": rev,
                   "dirty": dirty, "loadavg_start": la, "loadavg_end": loadavg(), "peak_rss_mb": peak_rss_mb()}
    res["machine"] = machine()
    res["targets"] = targets(res)
    (out / "shape.json").write_text(json.dumps(res, indent=1))
    (out / "shape.md").write_text(render(res))
    print(f"wrote {out / 'shape.md'}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
