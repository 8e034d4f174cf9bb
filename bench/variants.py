"""STRIDE variants side by side on one setting, against the same retrains and queries.

Two questions a user asks before trusting a default, each answered in one run:

- **build step** (issue 15): does the cheap default step (4 sampled positions per example, top-64
  + tail targets) learn what the previous, slow step learnt (every position, whole-vocabulary
  targets), and how many visits per subset does it need? Each variant is built over the same design seeds in the
  default mode and scored on the report retrains (tune split beside), with its build time.
- **measurement** (issue 9): what does the fast measurement of large vocabularies (the top-V' slice,
  or first order) cost in quality? On one store, the attributions of each measurement against the
  exact one: Spearman over the n examples per query, top-10 overlap, and LDS.

``python -m bench.variants [--setting reference] [--seeds 2] [--builds default,slow] [--measures ...]``
writes ``variants.md`` and ``variants.json`` into ``--out`` (default ``bench/results``). The setting's
models and ground truth come from ``python -m bench``'s caches (computed here when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from bench import methods
from bench.groundtruth import ground_truth
from bench.measure import lds_split, planted_recall
from bench.setting import SETTINGS, add_dir_args, materialise
from stride.config import Query, SolverConfig

# build-step variants: BuildConfig overrides of the default mode (README: defaults table)
BUILDS = {
    "default": {},
    "slow": {"positions": 0, "target_top_k": 0, "visits": 400},  # the step before issue 15
    "visits-100": {"visits": 100},  # the default until the screen in bench/results/variants.md
    "visits-200": {"visits": 200},
    # one knob at a time against visits-100 (screened while 100 was the default, at a quarter of the cost)
    "all-positions": {"positions": 0, "visits": 100},
    "full-targets": {"target_top_k": 0, "visits": 100},
    "linearity-0.1": {"linearity_weight": 0.1, "visits": 100},  # the optional linearity term (off by default)
    "linearity-1": {"linearity_weight": 1.0, "visits": 100},
}
# measurement variants: SolverConfig overrides (the store and the solve are unchanged)
MEASURES = {
    "exact": {"top_v": 0},
    "top-256": {"top_v": 256},  # the default where the exact drop is costly (stride.measure.TOP_V)
    "top-64": {"top_v": 64},
    "first-order": {"first_order": True},
}


def quality(w: torch.Tensor, gt: dict, setting, support: list[list[int]]) -> dict:
    rep, tune = lds_split(w, gt, setting, "report"), lds_split(w, gt, setting, "tune")
    return {"lds": float(rep.mean()), "lds_tune": float(tune.mean()) if tune.size else None,
            **planted_recall(w, support)}


def agreement(w: torch.Tensor, ref: torch.Tensor, k: int = 10) -> dict:
    """Per query: Spearman of the n scores against the reference's, and top-k proponent overlap."""
    rho, overlap = [], []
    for a, b in zip(w.numpy(), ref.numpy(), strict=True):
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            rho.append(spearmanr(a, b).statistic)
        ta, tb = set(np.argsort(-a, kind="stable")[:k]), set(np.argsort(-b, kind="stable")[:k])
        overlap.append(len(ta & tb) / k)
    return {"spearman_mean": float(np.mean(rho)) if rho else None,
            "spearman_min": float(np.min(rho)) if rho else None, f"top{k}_overlap": float(np.mean(overlap))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="reference")
    ap.add_argument("--seeds", type=int, default=2, help="design seeds per build variant")
    ap.add_argument("--builds", default="default,slow", help=f"build variants, from {','.join(BUILDS)}; "
                    "NAME:S runs that one over S seeds instead of --seeds")
    ap.add_argument("--measures", default=",".join(MEASURES), help=f"from {','.join(MEASURES)} ('' to skip)")
    add_dir_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    builds = dict((b.split(":")[0], int(b.split(":")[1]) if ":" in b else args.seeds)
                  for b in args.builds.split(",") if b)
    measures = [m for m in args.measures.split(",") if m]
    for name in list(builds) + measures:
        if name not in BUILDS and name not in MEASURES:
            ap.error(f"unknown variant {name!r}: builds {list(BUILDS)}, measures {list(MEASURES)}")

    from stride.query import Attributor

    setting = SETTINGS[args.setting][0]  # (full, quick): the full setting
    built = materialise(setting, args.work)
    gt = ground_truth(built, args.cache, log=lambda m: print(m, flush=True))
    row = {d["id"]: i for i, d in enumerate(built.docs)}
    support = [[row[s] for s in q["support"]] for q in built.queries]
    queries = [Query(q["prompt"], q["completion"]) for q in built.queries]
    mode = methods.DEFAULT_MODE
    out: dict = {"setting": setting.name, "mode": mode, "seeds": args.seeds, "builds": {}, "measures": {},
                 "load_avg_at_start": list(os.getloadavg())}

    for name, seeds in builds.items():
        per_seed = []
        for seed in range(seeds):
            t = time.perf_counter()
            store, secs, reused = methods.build_or_reuse(mode, seed, built, built.dir, BUILDS[name] or None,
                                                         rebuild=False, tag="" if name == "default" else name)
            w, _, diag = Attributor.from_store(store).score_matrix(queries, ablation=False)
            per_seed.append({"seed": seed, "build_s": secs, "reused": reused, "load_avg": list(os.getloadavg()),
                             "steps": json.loads((store / "manifest.json").read_text())["config"]["steps"],
                             **quality(w, gt, setting, support), **diag})
            print(f"build {name} seed {seed}: {per_seed[-1]} ({time.perf_counter() - t:.0f} s)", flush=True)
        out["builds"][name] = {"overrides": BUILDS[name], "per_seed": per_seed, **mean_sd(per_seed)}

    if measures:
        store, _, _ = methods.build_or_reuse(mode, 0, built, built.dir, None, rebuild=False)
        base = Attributor.from_store(store)
        scores = {}
        for name in measures:
            attr = Attributor(base.store, base.lm, SolverConfig(**MEASURES[name]))
            t = time.perf_counter()
            scores[name] = attr.score_matrix(queries, ablation=False)[0]
            out["measures"][name] = {"overrides": MEASURES[name], "seconds": time.perf_counter() - t,
                                     **quality(scores[name], gt, setting, support)}
        ref = scores.get("exact")
        for name in measures:
            if ref is not None:
                out["measures"][name].update(agreement(scores[name], ref))
        out["vocab"], out["num_subsets"] = base.lm.unembed.shape[0], base.ops.num_subsets

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(out, indent=2))
    (args.out / "variants.md").write_text(render(out, argv))
    print((args.out / "variants.md").read_text())


def mean_sd(rows: list[dict]) -> dict:
    keys = ("lds", "lds_tune", "recall@5", "mrr", "build_s")
    return {f"{k}_mean": float(np.mean([r[k] for r in rows])) for k in keys} | \
        {f"{k}_sd": float(np.std([r[k] for r in rows])) for k in keys}


def pm(b: dict, key: str, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(b[key + '_mean'])} ± {fmt.format(b[key + '_sd'])}"


def render(out: dict, argv: list[str] | None) -> str:
    cmd = "python -m bench.variants " + " ".join(sys.argv[1:] if argv is None else argv)
    load = ", ".join(f"{x:.2f}" for x in out["load_avg_at_start"])
    lines = [f"# STRIDE variants ({out['setting']} setting, mode `{out['mode']}`)", "",
             f"`{cmd.strip()}`; load average at start {load}; 1 torch thread. "
             "LDS on the report retrains, tune split beside; mean ± sd over design seeds.", ""]
    if out["builds"]:
        lines += ["## Build step", "", "| variant | overrides | steps | build s | LDS | LDS tune | recall@5 | MRR |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, b in out["builds"].items():
            cells = [pm(b, "build_s", "{:.0f}")] + [pm(b, k) for k in ("lds", "lds_tune", "recall@5", "mrr")]
            lines.append(f"| {name} | `{b['overrides'] or 'defaults'}` | {b['per_seed'][0]['steps']} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Per seed (build time from the store's manifest when the store was reused; load average "
                  "when scored):", ""]
        for name, b in out["builds"].items():
            for r in b["per_seed"]:
                lines.append(f"- {name}, seed {r['seed']}: LDS {r['lds']:.3f}, tune {r['lds_tune']:.3f}, "
                             f"recall@5 {r['recall@5']:.3f}, MRR {r['mrr']:.3f}, build {r['build_s']:.0f} s"
                             f"{' (reused)' if r['reused'] else ''}, load {r['load_avg'][0]:.1f}")
        lines.append("")
    if out["measures"]:
        lines += ["## Measurement", "",
                  f"One store (seed 0; K = {out['num_subsets']}, vocabulary {out['vocab']}); only the measurement "
                  "changes. Agreement with the exact measurement's attributions: Spearman over the n examples per "
                  "query (mean, worst), top-10 proponent overlap.", "",
                  "| measurement | LDS | recall@5 | MRR | Spearman vs exact (mean / min) | top-10 overlap "
                  "| scoring s |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in out["measures"].items():
            rho = "—" if m.get("spearman_mean") is None else f"{m['spearman_mean']:.3f} / {m['spearman_min']:.3f}"
            ov = m.get("top10_overlap")
            lines.append(f"| {name} | {m['lds']:.3f} | {m['recall@5']:.3f} | {m['mrr']:.3f} | {rho} | "
                         f"{'—' if ov is None else f'{ov:.2f}'} | {m['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
