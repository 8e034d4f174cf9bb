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
from pathlib import Path

import numpy as np
import torch

from bench import methods
from bench.removal import retrain
from bench.setting import SETTINGS, materialise
from stride.result import Query
from stride.scan import aggregate, select_indices

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.select", description=__doc__)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="reference")
    ap.add_argument("--keep", type=float, default=0.5, help="share of the corpus kept by every selection")
    ap.add_argument("--targets", type=int, default=150, help="target queries (a random subset of the fact queries)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the target subset and of the random half")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--cache", type=Path, default=HERE / "cache")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    built = materialise(SETTINGS[args.setting][0], args.work)
    docs, queries = built.docs, built.queries
    n = len(docs)
    facts = [i for i, q in enumerate(queries) if q["relation"] != "behaviour"]
    rng = np.random.default_rng(args.seed)
    target = sorted(rng.choice(facts, size=min(args.targets, len(facts)), replace=False).tolist())
    other = sorted(set(facts) - set(target))
    tq = [queries[i] for i in target]

    from stride.query import Attributor

    store, build_s, reused = methods.build_or_reuse(methods.DEFAULT_MODE, 0, built, built.dir, None, False)
    w, _, _ = Attributor.from_store(store).score_matrix([Query(q["prompt"], q["completion"]) for q in tq])
    bm25 = methods.run_bm25(docs, tq, []).scores
    picks = {"STRIDE (default build, seed 0)": select_indices(aggregate(w), args.keep),
             "BM25 (same aggregation)": select_indices(aggregate(bm25), args.keep),
             "Random half": np.sort(rng.choice(n, size=max(1, round(args.keep * n)), replace=False)),
             "Full corpus": np.arange(n)}
    row = {d["id"]: i for i, d in enumerate(docs)}
    support = {row[s] for q in tq for s in q["support"]}
    rows = {}
    for name, kept in picks.items():
        removed = sorted(set(range(n)) - set(kept.tolist()))
        r = retrain(built, removed, args.cache)
        top1 = r["top1"].float() if r["top1"] is not None else None
        rows[name] = {
            "kept": int(len(kept)), "target_support_kept": len(support & set(kept.tolist())) / len(support),
            "target_loss": float(r["losses"][target].mean()), "other_loss": float(r["losses"][other].mean()),
            "target_top1": None if top1 is None else float(top1[target].mean()),
            "other_top1": None if top1 is None else float(top1[other].mean()),
            "finetune_s": r["seconds"], "cached": r["cached"]}
        print(f"{name}: {rows[name]}", flush=True)
    full = rows["Full corpus"]["target_loss"]
    info = {"command": "python -m bench.select" + (f" --setting {args.setting}" if args.setting != "reference" else ""),
            "setting": args.setting, "setting_key": built.setting.key(), "keep": args.keep,
            "targets": len(target), "other": len(other), "documents": n, "store": str(store),
            "store_build_s": build_s, "store_reused": reused, "rows": rows, "load_avg": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t0,
            "stride_within_10pct_of_full": rows["STRIDE (default build, seed 0)"]["target_loss"] <= 1.1 * full}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "select.json").write_text(json.dumps(info, indent=2))
    (args.out / "select.md").write_text(report(info))
    return info


def report(info: dict) -> str:
    def f(v, fmt=".3f"):
        return "—" if v is None else format(v, fmt)

    L = ["# Data selection: fine-tuning on a selected half\n",
         f"Command: `{info['command']}` (setting `{info['setting']}`, key `{info['setting_key']}`). "
         f"{info['targets']} target queries drawn at random from the fact queries; each selection keeps "
         f"{info['keep']:.0%} of the {info['documents']} documents; the base is then fine-tuned on what is kept "
         "with the setting's own recipe (the one that made the attributed model). *other*: the "
         f"{info['other']} fact queries not in the target set. Load average at the end "
         f"{', '.join(f'{x:.1f}' for x in info['load_avg'])} (shared 2-core machine).\n",
         "| selection | kept | target support kept | target loss | target top-1 | other loss | other top-1 | "
         "fine-tune s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in info["rows"].items():
        L.append(f"| {name} | {r['kept']} | {r['target_support_kept']:.0%} | {f(r['target_loss'])} | "
                 f"{f(r['target_top1'], '.0%')} | {f(r['other_loss'])} | {f(r['other_top1'], '.0%')} | "
                 f"{f(r['finetune_s'], '.0f')} |")
    L.append("")
    L.append(f"STRIDE's target loss within 10% of the full corpus's: **{info['stride_within_10pct_of_full']}**. "
             "The STRIDE and BM25 selections rank documents by their summed scores over the target queries "
             "(net of negative scores for STRIDE; documents no target query touches come last, in corpus order); "
             f"the STRIDE store took {info['store_build_s']:.0f} s to build"
             + (" (reused)." if info["store_reused"] else "."))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
