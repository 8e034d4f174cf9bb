"""Where a build step's time goes: ``python -m bench.profile_step [--steps N]`` -> bench/results/build_profile.md.

Two models: the reference benchmark's tiny Llama (width 64, its ~1.4k-word vocabulary) and a wider,
larger-vocabulary tiny GPT-2 (width 128, 5,562 tokens, random weights: cost only). For each, a
step of every fit configuration named below is profiled with the labels ``stride.fit.step_loss``
sets (cache reads, steered logits, KL) plus sampling, backward and the optimiser.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from stride.corpus import Corpus
from stride.design import random_design
from stride.fit import FeatureSource, OperatorAdam, Targets, sample_step, step_loss
from stride.model import LM
from stride.operators import SteeringOperators

HERE = Path(__file__).resolve().parent
LABELS = ("stride.sample", "stride.features", "stride.steered_logits", "stride.kl", "stride.backward",
          "stride.optimizer")
# (name, fit mode, target_top_k, positions)
CONFIGS = (("revert, top-64 targets, all positions", "revert", 64, 0),
           ("default: revert, top-64 targets, 4 positions", "revert", 64, 4),
           ("fidelity (no reference), top-64 stability targets, 4 positions", "fidelity", 64, 4))
# the previous code's step (commit febb504: fidelity NLL and full-vocabulary stability KL at every
# position, dense operator gradients), timed in a subprocess from a checkout of that commit
BEFORE = """
import sys, time, torch
torch.set_num_threads(1)
from stride.corpus import Corpus
from stride.design import random_design
from stride.fit import FeatureSource, OperatorAdam, sample_step, step_loss
from stride.model import LM
from stride.operators import SteeringOperators
model, data, layer, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
corpus, lm = Corpus.scan(data), LM.load(model, "cpu")
K = min(1000, max(128, len(corpus)))
mem, source = random_design(len(corpus), K, 10, 0), FeatureSource(lm, corpus, layer, 1024)
ops = SteeringOperators(lm.hidden_size, 64, K)
f = source.get(torch.arange(256))
ops.init_basis(f.h[f.mask], 0)
opt = OperatorAdam(ops, 3e-3)
def one(s):
    loss, _ = step_loss(ops, lm, source, sample_step(mem, 32, 4, torch.Generator().manual_seed(s)), 10.0)
    opt.zero_grad(); loss.backward(); opt.step()
for s in range(3):
    one(s)
t = time.perf_counter()
for s in range(3, 3 + steps):
    one(s)
print((time.perf_counter() - t) / steps * 1e3)
"""


def wide_model(out: Path, corpus: Path, vocab: int = 5562) -> Path:
    """A random tiny GPT-2 (4 layers, width 128) whose word-level vocabulary is padded to ``vocab``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from stride.demo import build_tokenizer

    if (out / "config.json").is_file():
        return out
    words = {w for line in corpus.read_text().splitlines() for w in json.loads(line)["text"].split()}
    extra = [f"w{i}" for i in range(max(0, vocab - len(words) - 8))]
    tok = build_tokenizer([" ".join(sorted(words)), " ".join(extra)])
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=128, n_layer=4, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def profile_config(lm: LM, ref: LM, corpus: Corpus, mode: str, top_k: int, positions: int, steps: int) -> dict:
    K = min(1000, max(128, len(corpus)))
    mem = random_design(len(corpus), K, 10, 0)
    t = time.perf_counter()
    source = FeatureSource(lm, corpus, 0, 1024, Targets(mode, top_k, ref if mode == "revert" else None))
    cache_s = time.perf_counter() - t
    ops = SteeringOperators(lm.hidden_size, 64, K)
    feats = source.get(torch.arange(min(256, len(corpus))))
    ops.init_basis(feats.h[feats.mask], 0)
    opt = OperatorAdam(ops, 3e-3)

    def one(s: int) -> None:
        with record_function("stride.sample"):
            batch = sample_step(mem, 32, 4, torch.Generator().manual_seed(s))
        loss, _ = step_loss(ops, lm, source, batch, 10.0, positions)
        with record_function("stride.backward"):
            opt.zero_grad()
            loss.backward()
        with record_function("stride.optimizer"):
            opt.step()

    for s in range(3):
        one(s)
    t = time.perf_counter()
    for s in range(3, 3 + steps):
        one(s)
    wall = (time.perf_counter() - t) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(3 + steps, 3 + 2 * steps):
            one(s)
    events = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key in LABELS}
    return {"ms_per_step": wall, "cache_s": cache_s, "cached": source.cache is not None,
            "parts_ms": {k.removeprefix("stride."): events.get(k, 0.0) for k in LABELS}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    ap.add_argument("--steps", type=int, default=20, help="steps timed (and as many profiled) per config")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="the benchmark's models (bench/work)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--before-tree", type=Path, default=None,
                    help="a checkout of the previous code (git worktree add /tmp/before febb504) to time its step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bench.setting import FULL, materialise

    built = materialise(FULL, args.work)
    corpus = Corpus.scan(built.corpus)
    models = {"benchmark Llama (width 64)": (LM.load(built.model_dir, "cpu"), LM.load(built.base_dir, "cpu"))}
    wide = LM.load(wide_model(args.work / "wide-gpt2", built.corpus), "cpu")
    models["wide GPT-2 (width 128, vocabulary 5,562, random)"] = (wide, wide)  # revert toward itself: cost only
    rows = []
    for name, (lm, ref) in models.items():
        if args.before_tree:
            layer = str(lm.num_layers // 2)  # the previous default layer
            env = {**os.environ, "PYTHONPATH": str(args.before_tree), "OMP_NUM_THREADS": "1"}
            model_dir = str(built.model_dir if lm is not wide else args.work / "wide-gpt2")
            out = subprocess.run([sys.executable, "-c", BEFORE, model_dir, str(built.corpus), layer, str(args.steps)],
                                 capture_output=True, text=True, env=env, cwd=args.before_tree, check=True)
            rows.append({"model": name, "vocab": int(lm.unembed.shape[0]), "width": lm.hidden_size,
                         "config": "previous code (febb504): fidelity, full-vocabulary KL, all positions",
                         "ms_per_step": float(out.stdout.split()[-1]), "parts_ms": {}})
            print(json.dumps(rows[-1]), flush=True)
        for label, mode, top_k, positions in CONFIGS:
            r = profile_config(lm, ref, corpus, mode, top_k, positions, args.steps)
            rows.append({"model": name, "vocab": int(lm.unembed.shape[0]), "width": lm.hidden_size,
                         "config": label, **r})
            print(json.dumps(rows[-1]), flush=True)
    info = {"rows": rows, "load_avg": list(os.getloadavg()), "torch": torch.__version__,
            "command": "python -m bench.profile_step"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_profile.json").write_text(json.dumps(info, indent=2))
    lines = ["# Where a build step's time goes", "",
             f"`{info['command']}`; 1 thread, K = 1000 (n = {len(corpus)}), r = 64, 32 subsets x 4 members and 4 "
             f"outsiders per step; load average {', '.join(f'{x:.1f}' for x in info['load_avg'])} (a shared "
             "2-core machine: compare rows of this run, not absolute values). Parts are profiler CPU time "
             "per step under the labels `stride.fit.step_loss` sets; the profiler adds its own overhead.", "",
             "| model | configuration | ms/step | sample | cache read | steered logits | KL | backward | optimiser |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["parts_ms"]
        parts = " | ".join(f"{p[k.removeprefix('stride.')]:.1f}" if p else "—" for k in LABELS)
        lines.append(f"| {r['model']} | {r['config']} | {r['ms_per_step']:.1f} | {parts} |")
    (args.out / "build_profile.md").write_text("\n".join(lines) + "\n")
    return info


if __name__ == "__main__":
    main()
