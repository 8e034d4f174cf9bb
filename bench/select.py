"""``python -m bench.select``: data selection. Fine-tune the base on half the corpus, chosen by STRIDE
(``stride.scan.select_indices`` over the default build's scores for a target set of queries), at
random, or by BM25 (the same aggregation of its scores), and on the full corpus; report each
model's loss and top-1 accuracy on the target queries and on the other queries, and its
fine-tuning time. Every fine-tune is the setting's own recipe (``bench.removal.retrain``, cached).

Writes ``bench/results/select.md`` and ``select.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from bench import methods
from bench.removal import retrain
from bench.setting import SETTINGS, add_dir_args, materialise
from stride.result import Query
from stride.scan import aggregate, select_indices

MEASURES = ("target_support_kept", "target_loss", "target_top1", "other_loss", "other_top1", "finetune_s")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.select", description=__doc__)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="reference")
    ap.add_argument("--keep", type=float, default=0.5, help="share of the corpus kept by every selection")
    ap.add_argument("--targets", type=int, default=150, help="target queries (a random subset of the fact queries)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the target subset and the random half (one "
                    "repetition each; the table gives mean ± sd over them)")
    add_dir_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    built = materialise(SETTINGS[args.setting][0], args.work)
    docs, queries = built.docs, built.queries
    n = len(docs)
    facts = [i for i, q in enumerate(queries) if q["relation"] != "behaviour"]
    row = {d["id"]: i for i, d in enumerate(docs)}

    from stride.query import Attributor

    store, build_s, reused = methods.build_or_reuse(methods.DEFAULT_MODE, 0, built, built.dir, None, False)
    attributor = Attributor.from_store(store)
    runs = {}
    for seed in (int(x) for x in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        target = sorted(rng.choice(facts, size=min(args.targets, len(facts)), replace=False).tolist())
        other = sorted(set(facts) - set(target))
        tq = [queries[i] for i in target]
        w, _, _ = attributor.score_matrix([Query(q["prompt"], q["completion"]) for q in tq], ablation=False)
        picks = {"STRIDE (default build, seed 0)": select_indices(aggregate(w), args.keep),
                 "BM25 (same aggregation)": select_indices(aggregate(methods.run_bm25(docs, tq, []).scores), args.keep),
                 "Random half": np.sort(rng.choice(n, size=max(1, round(args.keep * n)), replace=False)),
                 "Full corpus": np.arange(n)}
        support = {row[s] for q in tq for s in q["support"]}
        for name, kept in picks.items():
            r = retrain(built, sorted(set(range(n)) - set(kept.tolist())), args.cache)
            top1 = r["top1"].float() if r["top1"] is not None else None
            runs.setdefault(name, []).append({
                "seed": seed, "kept": int(len(kept)),
                "target_support_kept": len(support & set(kept.tolist())) / len(support),
                "target_loss": float(r["losses"][target].mean()), "other_loss": float(r["losses"][other].mean()),
                "target_top1": None if top1 is None else float(top1[target].mean()),
                "other_top1": None if top1 is None else float(top1[other].mean()),
                "finetune_s": r["seconds"], "cached": r["cached"]})
            print(f"seed {seed} {name}: {runs[name][-1]}", flush=True)
    rows = {name: {**{k: float(np.mean([e[k] for e in es])) for k in MEASURES},
                   **{f"{k}_sd": float(np.std([e[k] for e in es], ddof=1)) if len(es) > 1 else 0.0 for k in MEASURES},
                   "kept": es[0]["kept"], "per_seed": es} for name, es in runs.items()}
    stride, full = rows["STRIDE (default build, seed 0)"], rows["Full corpus"]
    info = {"command": "python -m bench.select" + (f" --setting {args.setting}" if args.setting != "reference" else ""),
            "setting": args.setting, "setting_key": built.setting.key(), "keep": args.keep, "seeds": args.seeds,
            "targets": args.targets, "other": len(facts) - args.targets, "documents": n, "store": str(store),
            "store_build_s": build_s, "store_reused": reused, "rows": rows, "load_avg": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t0,
            "stride_within_10pct_of_full": stride["target_loss"] <= 1.1 * full["target_loss"],
            "stride_beats_random_and_bm25": all(stride["target_loss"] < rows[k]["target_loss"]
                                                for k in ("Random half", "BM25 (same aggregation)"))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "select.json").write_text(json.dumps(info, indent=2))
    (args.out / "select.md").write_text(report(info))
    return info


def report(info: dict) -> str:
    def cell(r: dict, k: str, fmt: str = ".3f") -> str:
        return f"{format(r[k], fmt)} ± {format(r[k + '_sd'], fmt)}"

    L = ["# Data selection: fine-tuning on a selected half\n",
         f"Command: `{info['command']}` (setting `{info['setting']}`, key `{info['setting_key']}`). Per seed "
         f"({info['seeds']}), {info['targets']} target queries drawn at random from the fact queries; each "
         f"selection keeps {info['keep']:.0%} of the {info['documents']} documents; the base is then fine-tuned on "
         "what is kept with the setting's own recipe (the one that made the attributed model). *other*: the "
         f"{info['other']} fact queries not in the target set. Mean ± sd over the seeds (the fine-tuning seed is "
         "the setting's, the same for every row). Load average at the end "
         f"{', '.join(f'{x:.1f}' for x in info['load_avg'])} (shared 2-core machine).\n",
         "| selection | kept | target support kept | target loss | target top-1 | other loss | other top-1 | "
         "fine-tune s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in info["rows"].items():
        L.append(f"| {name} | {r['kept']} | {cell(r, 'target_support_kept', '.2f')} | {cell(r, 'target_loss')} | "
                 f"{cell(r, 'target_top1', '.2f')} | {cell(r, 'other_loss')} | {cell(r, 'other_top1', '.2f')} | "
                 f"{r['finetune_s']:.0f} |")
    L.append("")
    L.append(f"Targets (issue 12): STRIDE's half beats the random and BM25 halves on target loss: "
             f"**{info['stride_beats_random_and_bm25']}**; its target loss within 10% of the full corpus's: "
             f"**{info['stride_within_10pct_of_full']}**. The STRIDE and BM25 selections rank documents by their "
             "summed scores over the target queries (net of negative scores for STRIDE; documents no target query "
             "touches come last, in corpus order; `stride.scan.select_indices`, what `stride select` writes); the "
             f"STRIDE store (default build, design seed 0) took {info['store_build_s']:.0f} s to build"
             + (" (reused from an earlier run, under load)." if info["store_reused"] else "."))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
