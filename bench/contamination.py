"""``python -m bench.contamination``: contamination detection by ``stride scan --contamination``.

The ``contamination`` setting (``bench.harder.generate_contamination``) is the reference setting plus
45 benchmark-style test items in the held-out question format: 15 planted in the fine-tuning corpus
verbatim or nearly (the line itself, inside a longer page, re-cased and re-punctuated), 15 whose
facts are in the corpus only in other phrasings, 15 about facts absent from it. The attributed model
is fine-tuned on that corpus; the default STRIDE store is built (``bench.methods.build_or_reuse``)
and ``worker.scan.scan`` runs over the 45 items with the contamination check. Its flags are compared
with the planted truth (an item is contaminated when it was planted), next to the n-gram index alone
(any corpus document holding the item, the same rule) and BM25's top-k documents with the same rule.

Writes ``bench/results/contamination.md`` and ``contamination.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench import methods
from bench.setting import SETTINGS, add_dir_args, filler_sentence, materialise
from stride.ngrams import NgramIndex, check_item, for_store
from stride.scan import ContaminationConfig, ScanConfig

GROUPS = ("verbatim", "paraphrase", "absent")
VARIANTS = ("the line itself", "inside a longer page", "re-cased, re-punctuated")  # bench.harder._planted_variants


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.contamination", description=__doc__)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="contamination")
    ap.add_argument("--quick", action="store_true", help="the setting's small variant (results under quick/)")
    ap.add_argument("--top-k", type=int, default=10, help="proponents checked per item")
    ap.add_argument("--ngram", type=int, default=8)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--visits", type=int, default=None, help="build override (fewer visits: a faster build)")
    ap.add_argument("--scale", type=int, default=100_000, help="documents of the synthetic index-scale measurement")
    add_dir_args(ap, cache=False)
    return ap.parse_args(argv)


def prf(flags: list[bool], truth: list[bool]) -> dict:
    tp = sum(f and t for f, t in zip(flags, truth, strict=True))
    fp, fn = sum(flags) - tp, sum(truth) - tp
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r,
            "f1": None if not p or not r else 2 * p * r / (p + r)}


def index_costs(scale: int, ngram: int) -> dict:
    """Index build time and size on the demo's corpus and on ``scale`` synthetic filler documents."""
    from stride.demo import DemoSpec, generate_corpus

    out = {}
    demo = [d["text"] for d in generate_corpus(DemoSpec())[0]]
    rng = random.Random(0)
    synth = [" ".join(filler_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(scale)]
    for name, texts in (("demo corpus", demo), (f"{scale:,} synthetic filler documents", synth)):
        t = time.perf_counter()
        ix = NgramIndex.build(texts, ngram)
        out[name] = {"documents": len(texts), "seconds": time.perf_counter() - t, "bytes": ix.nbytes,
                     "pairs": int(ix.hashes.size), "word_pairs": int(ix.word_hashes.size)}
    return out


def main(argv: list[str] | None = None) -> dict:
    from stride.query import Attributor
    from worker.scan import scan

    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    built = materialise(SETTINGS[args.setting][1 if args.quick else 0], args.work)
    items = [q for q in built.queries if "contamination" in q]
    if not items:
        raise SystemExit(f"setting {args.setting} has no contamination test items")
    overrides = {"visits": args.visits} if args.visits else None
    store, build_s, reused = methods.build_or_reuse(methods.DEFAULT_MODE, 0, built, built.dir, overrides, False)
    items_path = built.dir / "contamination_items.jsonl"
    items_path.write_text("".join(json.dumps(q) + "\n" for q in items))
    attributor = Attributor.from_store(store)
    corpus = attributor.store.corpus
    assert list(corpus.ids) == [d["id"] for d in built.docs], "store rows follow the generated corpus"
    index_file = Path(f"{store}.ngrams-{args.ngram}.npz")
    index_file.unlink(missing_ok=True)  # measure the build
    scan_dir = built.dir / "contamination-scan"
    shutil.rmtree(scan_dir, ignore_errors=True)
    t = time.perf_counter()
    summary = scan(attributor, items_path, scan_dir, ScanConfig(top_k=args.top_k),
                   contamination=ContaminationConfig(True, args.ngram, args.overlap))
    scan_s = time.perf_counter() - t
    shutil.copyfile(scan_dir / "report.html", built.dir / "contamination-report.html")
    rows = [json.loads(x) for x in (scan_dir / "contamination.jsonl").read_text().splitlines()]
    per_query = [json.loads(x) for x in (scan_dir / "queries.jsonl").read_text().splitlines()]
    index, again = for_store(attributor.store, args.ngram)
    assert not again["built"], "the scan's index is reused"

    def texts(r: list[int]) -> list[str]:
        return [x.text for x in corpus.records(r)]

    bm25 = methods.run_bm25(built.docs, items, []).scores.numpy()
    bm25_top = [[int(i) for i in np.argsort(-s, kind="stable")[: args.top_k] if s[i] > 0] for s in bm25]
    bm25_flags = [check_item(index, q["prompt"], q["completion"], top, texts, args.overlap).flagged
                  for q, top in zip(items, bm25_top, strict=True)]
    truth = [q["contamination"] == "verbatim" for q in items]
    flags = {"STRIDE (default build) + index": [r["flagged"] for r in rows],
             "n-gram index alone (whole corpus)": [r["corpus_match"] is not None for r in rows],
             "BM25 top-k + index": bm25_flags}
    stride_top = [[p["id"] for p in q["proponents"]] for q in per_query]
    tops = {"STRIDE": stride_top, "BM25": [[corpus.ids[i] for i in top] for top in bm25_top]}
    groups = {}
    for g in GROUPS:
        sel = [k for k, q in enumerate(items) if q["contamination"] == g]
        groups[g] = {"items": len(sel), **{name: sum(f[k] for k in sel) for name, f in flags.items()},
                     **{f"{m} top-k holds a support document": sum(bool(set(top[k]) & set(items[k]["support"]))
                                                                   for k in sel) for m, top in tops.items()},
                     "STRIDE answer in a top-k proponent": sum(rows[k]["answer_in_proponent"] for k in sel)}
    variants = {}
    for v, name in enumerate(VARIANTS):
        sel = [k for k, q in enumerate(items) if q["contamination"] == "verbatim" and int(q["id"][-2:]) % 3 == v]
        variants[name] = {"items": len(sel), **{m: sum(f[k] for k in sel) for m, f in flags.items()},
                          "STRIDE rank of the planted copy": [
                              next((r + 1 for r, d in enumerate(stride_top[k]) if d == f"{items[k]['id']}-item"), None)
                              for k in sel]}
    info = {"command": "python -m bench.contamination" + (" --quick" if args.quick else "")
            + (f" --visits {args.visits}" if args.visits else ""),
            "setting": args.setting, "setting_key": built.setting.key(), "documents": len(built.docs),
            "items": len(items), "top_k": args.top_k, "ngram": args.ngram, "overlap": args.overlap,
            "store": str(store), "store_build_s": build_s, "store_reused": reused, "build_overrides": overrides,
            "model_seconds": built.seconds, "scan_s": scan_s, "index": summary["contamination"]["index"],
            "index_costs": index_costs(args.scale, args.ngram),
            "rows": {name: prf(f, truth) for name, f in flags.items()}, "groups": groups, "variants": variants,
            "lexical_only": {r["id"]: [(p["id"], round(p["score"], 3)) for p in q["proponents"][:3]]
                             for r, q in zip(rows, per_query, strict=True) if r["lexical_only"]},
            "load_avg": list(os.getloadavg()), "wall_s": time.perf_counter() - t0}
    out = args.out / "quick" if args.quick else args.out  # never over the reference figures
    out.mkdir(parents=True, exist_ok=True)
    (out / "contamination.json").write_text(json.dumps(info, indent=2))
    (out / "contamination.md").write_text(report(info))
    print(report(info))
    return info


def report(info: dict) -> str:
    def f(v, fmt=".2f"):
        return "—" if v is None else format(v, fmt)

    ix = info["index"]
    L = ["# Contamination: flags of `stride scan --contamination` against planted test items\n",
         f"Command: `{info['command']}` (setting `{info['setting']}`, key `{info['setting_key']}`, "
         f"{info['documents']} documents). {info['items']} test items in the held-out question format "
         "(\"Question : which city is the capital of X ? Answer : Y\"), 15 per group: *verbatim* (planted in the "
         "fine-tuning corpus: the line itself, inside a longer page, or re-cased and re-punctuated; half also "
         "with one plain statement of the fact), *paraphrase* (the fact is in the corpus only in other "
         "phrasings), *absent* (the fact is nowhere). Truth: an item is contaminated when it was planted. "
         f"Rule (`stride.ngrams.check_item`): a document holds an item when it has >= {info['overlap']:.0%} of "
         f"the item's distinct word {info['ngram']}-grams (an item shorter than {info['ngram']} words is one "
         "gram of all its words) and the answer's words verbatim; an item is flagged when one of its top-"
         f"{info['top_k']} documents holds it. Load average at the end "
         f"{', '.join(f'{x:.1f}' for x in info['load_avg'])} (shared 2-core machine).\n",
         "| method | flagged (tp + fp) | precision | recall | F1 |", "|---|---|---|---|---|"]
    for name, r in info["rows"].items():
        L.append(f"| {name} | {r['tp'] + r['fp']} ({r['tp']} + {r['fp']}) | {f(r['precision'])} | "
                 f"{f(r['recall'])} | {f(r['f1'])} |")
    names = list(info["rows"])
    L += ["", "Per group (items flagged; and the attribution's view: items whose top-"
          f"{info['top_k']} documents include a document that states the item's fact, in any phrasing):\n",
          "| group | items | " + " | ".join(names) + " | STRIDE top-k holds a support document | "
          "BM25 top-k holds a support document | STRIDE: answer in a top-k proponent |",
          "|---|---|" + "---|" * (len(names) + 3)]
    for g, r in info["groups"].items():
        L.append(f"| {g} | {r['items']} | " + " | ".join(str(r[n]) for n in names)
                 + f" | {r['STRIDE top-k holds a support document']} | {r['BM25 top-k holds a support document']} | "
                 f"{r['STRIDE answer in a top-k proponent']} |")
    L += ["", "Planted items by how they were planted (flags; STRIDE's rank of the planted copy among the "
          "top-k, — when absent):\n", "| planted as | items | " + " | ".join(names) + " | STRIDE ranks |",
          "|---|---|" + "---|" * (len(names) + 1)]
    for v, r in info["variants"].items():
        ranks = ", ".join("—" if x is None else str(x) for x in r["STRIDE rank of the planted copy"])
        L.append(f"| {v} | {r['items']} | " + " | ".join(str(r[n]) for n in names) + f" | {ranks} |")
    L += ["", f"Items the index finds in the corpus but STRIDE's top-{info['top_k']} does not hold (with "
          "STRIDE's top 3 proponents and scores): "
          + ("; ".join(f"`{x}`: " + ", ".join(f"{d} ({s})" for d, s in top) for x, top in info["lexical_only"].items())
             or "none") + ".", ""]
    L += ["## Index cost\n",
          f"The store's index ({info['ngram']}-grams, `STORE.ngrams-{info['ngram']}.npz` beside the store): "
          f"built in {ix.get('seconds', float('nan')):.2f} s, {ix['bytes']:,} bytes of arrays ({ix['file_bytes']:,} on "
          "disk; 12 bytes, a uint64 hash and an int32 row, per distinct n-gram and per distinct word of each "
          "document), "
          f"reused on the next scan (corpus sha256 unchanged). The whole scan of {info['items']} items took "
          f"{info['scan_s']:.1f} s. Index builds alone:\n",
          "| corpus | documents | (n-gram, document) pairs | (word, document) pairs | bytes | build s |",
          "|---|---|---|---|---|---|"]
    for name, r in info["index_costs"].items():
        L.append(f"| {name} | {r['documents']:,} | {r['pairs']:,} | {r['word_pairs']:,} | {r['bytes']:,} | "
                 f"{r['seconds']:.2f} |")
    over = info["build_overrides"]
    L += ["", f"STRIDE store: default build (`{methods.DEFAULT_MODE}`, seed 0"
          + (f", overrides {over}" if over else ", no override") + f"), {info['store_build_s']:.0f} s to build"
          + (" (reused)" if info["store_reused"] else "") + f"; models: {json.dumps(info['model_seconds'])}."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
