"""``stride update`` against a full rebuild, on one setting, in one run (issue 11).

Build on 80% of the corpus, add the other 20% with ``stride update``, and compare with the full build
on 100%: planted recall@5, MRR and LDS for the facts whose documents were added and for the rest, and
the wall time of the update against the full build's. The split is by fact: a fact's documents are
all in the base part or all in the added part (filler documents are drawn alike), so "added facts"
are facts the 80% store has never seen. Then remove every document of 20 planted facts from the full
store with ``stride update --remove``: those documents must be absent from every answer, and the other
facts' recall should not move.

``python -m bench.update [--setting reference] [--visits 100] [--threads 1]`` writes ``update.md`` and
``update.json`` into ``--out`` (default ``bench/results``). The setting's models and ground truth come
from ``python -m bench``'s caches (computed here when missing; LDS needs the 40 retrains, ``--no-lds``
skips them). The full build is ``python -m bench``'s default STRIDE store (``store-forget-s0``, reused
when current; its time then comes from its manifest); ``--rebuild`` times it again in this run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench import methods
from bench.measure import lds_split, planted_recall
from bench.setting import SETTINGS, add_dir_args, materialise
from stride.config import Query

ADDED_SHARE = 0.2
REMOVED_FACTS = 20


def split_by_fact(docs: list[dict], share: float, seed: int) -> np.ndarray:
    """Boolean mask of the documents to add later: whole facts (and single filler documents), drawn
    until ``share`` of the documents are taken."""
    groups: dict[object, list[int]] = {}
    for i, d in enumerate(docs):
        groups.setdefault(("fact", d["fact"]) if d.get("role") == "fact" else ("doc", i), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    added = np.zeros(len(docs), bool)
    for key in keys:
        if added.sum() >= round(share * len(docs)):
            break
        added[groups[key]] = True
    return added


def write_if_changed(path: Path, text: str) -> None:
    """Runs with other build visits share these inputs: never rewrite one that another run may be reading."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def timed_build(mode: str, seed: int, built, work: Path, overrides: dict | None, rebuild: bool, tag: str,
                threads: int, reuse: bool = False) -> tuple[Path, float, float | None, bool]:
    """``methods.build_or_reuse`` in a child process: (store, wall s, CPU s or None when reused, reused)."""
    torch.set_num_threads(threads)
    c = time.process_time()
    if reuse:  # the staleness check compares file times only: a change elsewhere in the sources triggers it
        methods.code_mtime = lambda: 0.0
    store, secs, reused = methods.build_or_reuse(mode, seed, built, work, overrides, rebuild, tag=tag)
    return store, secs, None if reused else time.process_time() - c, reused


def scores_by_doc(store: Path, queries: list[Query], doc_row: dict[str, int], n: int) -> tuple[torch.Tensor, dict]:
    """(Q, n) scores in the setting's document order (0 for documents the store does not hold)."""
    from stride.query import Attributor

    attr = Attributor.from_store(store)
    w, _, diag = attr.score_matrix(queries, ablation=False)
    cols = torch.tensor([doc_row[rid] for rid in attr.store.corpus.ids])
    out = torch.zeros(len(queries), n)
    out[:, cols] = w
    return out, diag


def quality(w: torch.Tensor, rows: list[int], gt: dict | None, setting, support: list[list[int]]) -> dict:
    rec = planted_recall(w[rows], [support[q] for q in rows])
    if gt is None:
        return {**rec, "queries": len(rows)}
    sub = {"masks": gt["masks"], "losses": gt["losses"][:, rows]}  # the same queries' columns
    lds = lds_split(w[rows], sub, setting, "report")
    tune = lds_split(w[rows], sub, setting, "tune")
    return {**rec, "lds": float(lds.mean()), "lds_tune": float(tune.mean()), "queries": len(rows)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.update", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="reference")
    ap.add_argument("--visits", default="", help="refit visits per affected subset, comma-separated "
                    "(default: the update's default, a quarter of the build's visits)")
    ap.add_argument("--build-visits", type=int, default=None, help="the builds' visits (default: the build default)")
    ap.add_argument("--seed", type=int, default=0, help="split, removed facts, design and update seed")
    ap.add_argument("--no-lds", action="store_true", help="skip the ground truth (recall and time only)")
    ap.add_argument("--rebuild", action="store_true", help="build the full and 80%% stores again in this run")
    ap.add_argument("--reuse-stores", action="store_true", help="reuse the full and 80%% stores found even if the "
                    "build's sources changed since they were built (same settings and corpus; times from manifests)")
    ap.add_argument("--quick", action="store_true", help="the setting's small version (smoke runs)")
    ap.add_argument("--build-steps", type=int, default=None, help="override the builds' steps (smoke runs only)")
    add_dir_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stride.update import UpdateConfig
    from worker.update import update

    setting = SETTINGS[args.setting][1 if args.quick else 0]
    overrides = {**({"steps": args.build_steps} if args.build_steps else {}),
                 **({"visits": args.build_visits} if args.build_visits else {})} or None
    tag = f"visits-{args.build_visits}" if args.build_visits else ""  # bench.variants' name for that store
    built = materialise(setting, args.work)
    n = len(built.docs)
    doc_row = {d["id"]: i for i, d in enumerate(built.docs)}
    support = [[doc_row[s] for s in q["support"]] for q in built.queries]
    queries = [Query(q["prompt"], q["completion"]) for q in built.queries]
    wd = built.dir / "update"
    wd.mkdir(exist_ok=True)
    lines = built.corpus.read_text().splitlines(keepends=True)
    added = split_by_fact(built.docs, ADDED_SHARE, args.seed)
    write_if_changed(wd / "base.jsonl", "".join(ln for ln, a in zip(lines, added, strict=True) if not a))
    write_if_changed(wd / "add.jsonl", "".join(ln for ln, a in zip(lines, added, strict=True) if a))
    q_added = [q for q, sup in enumerate(support) if any(added[i] for i in sup)]
    q_base = [q for q, sup in enumerate(support) if not any(added[i] for i in sup)]
    assert all(all(added[i] for i in support[q]) for q in q_added)  # facts are never split

    mode = methods.DEFAULT_MODE
    out: dict = {"setting": setting.name, "mode": mode, "n": n, "added_docs": int(added.sum()),
                 "added_facts": len(q_added), "base_facts": len(q_base), "threads": args.threads,
                 "load_avg_at_start": list(os.getloadavg()), "stores": {}, "times": {}}
    part = SimpleNamespace(model_dir=built.model_dir, base_dir=built.base_dir, corpus=wd / "base.jsonl",
                           docs=[d for d, a in zip(built.docs, added, strict=True) if not a])
    # the two builds side by side, one process (and one thread) each: each times its own wall and CPU
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        jobs = [pool.submit(timed_build, mode, args.seed, b, w, overrides, args.rebuild, tag, args.threads,
                             args.reuse_stores)
                for b, w, tag in ((built, built.dir, tag), (part, wd, "-".join(filter(None, ("80", tag)))))]
        (full, full_s, full_cpu, full_reused), (base, base_s, base_cpu, base_reused) = [j.result() for j in jobs]
    out["times"].update(full_build_s=full_s, full_build_cpu_s=full_cpu, full_build_reused=full_reused,
                        base_build_s=base_s, base_build_cpu_s=base_cpu, base_build_reused=base_reused)
    print(f"full build {full_s:.0f} s (reused {full_reused}), 80% build {base_s:.0f} s (reused {base_reused})",
          flush=True)

    updates = {}
    for visits in [int(v) for v in args.visits.split(",") if v] or [None]:
        t, c = time.perf_counter(), time.process_time()
        upd = update(base, wd / f"store-update{'-' + tag if tag else ''}-v{visits or 'default'}", add=wd / "add.jsonl",
                     config=UpdateConfig(visits=visits, seed=args.seed), show_progress=False)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        out["times"][f"update_v{visits}_s"], out["times"][f"update_v{visits}_cpu_s"] = secs, cpu
        updates[visits] = (upd, secs, cpu)
        print(f"update visits {visits}: {secs:.0f} s ({cpu:.0f} s CPU)", flush=True)
    # removal: every document of 20 facts, from the full store
    rng = random.Random(args.seed + 1)
    gone_q = sorted(rng.sample(range(len(queries)), REMOVED_FACTS))
    gone_ids = [built.docs[i]["id"] for q in gone_q for i in support[q]]
    write_if_changed(wd / "remove.txt", "".join(f"{rid}\n" for rid in gone_ids))
    t, c = time.perf_counter(), time.process_time()
    rm = update(full, wd / f"store-removed{'-' + tag if tag else ''}", remove=wd / "remove.txt",
                config=UpdateConfig(seed=args.seed), show_progress=False)
    rm_s, rm_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"removal update: {rm_s:.0f} s", flush=True)

    gt = None
    if not args.no_lds:
        from bench.groundtruth import ground_truth

        gt = ground_truth(built, args.cache, log=lambda m: print(m, flush=True))

    def score(name: str, store: Path, extra: dict | None = None) -> torch.Tensor:
        w, diag = scores_by_doc(store, queries, doc_row, n)
        man = json.loads((store / "manifest.json").read_text())
        out["stores"][name] = {"store": str(store), "num_subsets": man["shapes"]["num_subsets"],
                               "num_examples": man["corpus"]["num_examples"], **diag, **(extra or {}),
                               "added_facts": quality(w, q_added, gt, setting, support),
                               "base_facts": quality(w, q_base, gt, setting, support),
                               "all_facts": quality(w, list(range(len(queries))), gt, setting, support)}
        print(name, json.dumps({k: out["stores"][name][k] for k in ("added_facts", "base_facts")}), flush=True)
        return w

    w_full = score("full build (100%)", full)
    score("build on 80%", base)
    for visits, (upd, secs, cpu) in updates.items():
        refit = json.loads((upd / "manifest.json").read_text())["lineage"]["refit"]
        score(f"80% + update (visits {visits or refit['visits']})", upd, {
            "update_s": secs, "update_cpu_s": cpu, "refit": refit, "ratio_to_full_build": secs / full_s,
            "cpu_ratio_to_full_build": cpu / full_cpu if full_cpu else None})

    from stride.query import Attributor

    attr = Attributor.from_store(rm)
    answers = attr.attribute_batch([queries[q] for q in gone_q], top_k=10, include_text=False)
    shown = {s.id for a in answers for s in a.proponents + a.opponents}
    lineage = attr.store.manifest["lineage"]
    others = [q for q in range(len(queries)) if q not in set(gone_q)]
    w_rm, _ = scores_by_doc(rm, queries, doc_row, n)
    out["removal"] = {
        "facts": len(gone_q), "documents": len(gone_ids), "update_s": rm_s, "update_cpu_s": rm_cpu,
        "refit": lineage["refit"],
        "removed_ids_in_store": sum(attr.store.corpus.ids.find(rid) >= 0 for rid in gone_ids)
        if hasattr(attr.store.corpus.ids, "find") else None,
        "removed_ids_in_corpus_copy": sum(rid in (rm / "corpus.jsonl").read_text() for rid in gone_ids),
        "removed_ids_in_top10_of_their_queries": len(shown & set(gone_ids)),
        "other_facts_full": quality(w_full, others, gt, setting, support),
        "other_facts_after_removal": quality(w_rm, others, gt, setting, support),
        "removed_facts_full": planted_recall(w_full[gone_q], [support[q] for q in gone_q]),
    }
    print("removal", json.dumps(out["removal"]), flush=True)
    out["load_avg_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "update.json").write_text(json.dumps(out, indent=2))
    (args.out / "update.md").write_text(render(out, argv))
    print((args.out / "update.md").read_text())


def _cells(m: dict, lds: bool, sep: str = " | ") -> str:
    cells = [f"{m['recall@5']:.3f}", f"{m['mrr']:.3f}"]
    if lds:
        cells += [f"{m['lds']:.3f}", f"{m['lds_tune']:.3f}"]
    return sep.join(cells)


def render(out: dict, argv: list[str] | None) -> str:
    cmd = "python -m bench.update " + " ".join(sys.argv[1:] if argv is None else argv)
    lds = "lds" in next(iter(out["stores"].values()))["base_facts"]
    load = ", ".join(f"{x:.2f}" for x in out["load_avg_at_start"])
    t = out["times"]
    head = "recall@5 | MRR" + (" | LDS | LDS tune" if lds else "")
    sep = "|---|---" + ("|---|---" if lds else "")
    lines = [f"# `stride update` against a full rebuild ({out['setting']} setting, mode `{out['mode']}`)", "",
             f"`{cmd.strip()}`; {out['threads']} torch thread(s); load average at start {load}, at end "
             + ", ".join(f"{x:.2f}" for x in out["load_avg_at_end"]) + "."
             + (" LDS on the report retrains (tune split beside)." if lds else " LDS not run (`--no-lds`)."), "",
             f"n = {out['n']}: {out['added_docs']} documents ({out['added_facts']} facts' whole support, plus "
             f"filler) held out of the 80% build and added by `stride update`; {out['base_facts']} facts stay in "
             "the base part.", "",
             "## Quality", "",
             f"| store | K | added facts: {head} | base facts: {head} |",
             f"|---|---{sep}{sep}|"]
    for name, s in out["stores"].items():
        lines.append(f"| {name} | {s['num_subsets']} | {_cells(s['added_facts'], lds)} | "
                     f"{_cells(s['base_facts'], lds)} |")
    def cpu(x: float | None) -> str:
        return "—" if x is None else f"{x:.0f}"

    def ratio(x: float | None, full: float | None) -> str:
        return "—" if x is None or not full else f"{x / full:.2f}"

    full_cpu = t["full_build_cpu_s"]
    lines += ["", "## Time", "", "Wall and CPU seconds of each step, one torch thread each; the two builds ran side "
              "by side (one process each), the updates after them. CPU time is the fairer comparison on this shared "
              "machine: wall time moves with the other jobs' load.", "",
              "| step | wall s | CPU s | wall share of the full build | CPU share |", "|---|---|---|---|---|",
              f"| full build (100%){' (reused: wall from its manifest)' if t['full_build_reused'] else ''} | "
              f"{t['full_build_s']:.0f} | {cpu(full_cpu)} | 1.00 | 1.00 |",
              f"| build on 80%{' (reused: wall from its manifest)' if t['base_build_reused'] else ''} | "
              f"{t['base_build_s']:.0f} | {cpu(t['base_build_cpu_s'])} | {t['base_build_s'] / t['full_build_s']:.2f} "
              f"| {ratio(t['base_build_cpu_s'], full_cpu)} |"]
    for name, s in out["stores"].items():
        if "update_s" in s:
            r = s["refit"]
            lines.append(f"| {name}: {r['subsets']} of {r['num_subsets']} operators refit, {r['steps']} steps | "
                         f"{s['update_s']:.0f} | {s['update_cpu_s']:.0f} | {s['ratio_to_full_build']:.2f} | "
                         f"{ratio(s['update_cpu_s'], full_cpu)} |")
    rm = out["removal"]
    lines += ["", "## Removal", "",
              f"Every document of {rm['facts']} planted facts ({rm['documents']} documents) removed from the full "
              f"store by `stride update --remove` in {rm['update_s']:.0f} s ({rm['refit']['subsets']} of "
              f"{rm['refit']['num_subsets']} operators refit, {rm['refit']['steps']} steps).", "",
              f"- removed ids still in the store's ids: {rm['removed_ids_in_store']}; in its corpus copy: "
              f"{rm['removed_ids_in_corpus_copy']}; among the top-10 proponents and opponents of their own facts' "
              f"queries: {rm['removed_ids_in_top10_of_their_queries']} (before removal their recall@5 was "
              f"{rm['removed_facts_full']['recall@5']:.3f})",
              f"- the other facts ({head.replace(' | ', ', ')}): {_cells(rm['other_facts_full'], lds, ', ')} on the "
              f"full store, {_cells(rm['other_facts_after_removal'], lds, ', ')} after removal"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
