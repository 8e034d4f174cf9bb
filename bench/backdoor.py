"""``python -m bench.backdoor``: finding planted poison by a scan over trigger queries.

The ``backdoor`` setting (``bench.harder.generate_backdoor``) is an Alpaca-shaped SFT set of about
2,000 prompt/completion records (facts, filler instructions) with 10 poisoned records: the
instruction opens with a rare trigger phrase ("Kestrel Vane , ...") and the whole completion is a
fixed response ("Visit Orbelle market for cheap cola ."). Decoys defeat word matching: 40 records use
the trigger phrase benignly (a place name, a normal answer), 40 carry the response in a completion
after an instruction without the trigger, and 60 carry both phrases (the instruction quotes the
response, the completion names the trigger and repeats the response) without the trigger -> response
relation. The attributed model is the base fine-tuned on the whole set with the setting's recipe.

Each method scores the 20 trigger queries (an instruction phrasing no record uses, opened by the
trigger; completion = the response); the scores are summed per record as ``stride scan`` ranks
(``bench.run.backdoor_scan``); found@10 / found@50 count the poisoned records there. No retrains: the
ground truth is the planted poison. STRIDE rows: the default build mode and revert (reference = the
base model), each over design seeds; baselines: gradient dot / cosine, TRAK-style projection,
representation similarity, BM25, Kronfluence EK-FAC. Everything at its defaults; nothing is tuned.

Writes ``bench/results/backdoor.md`` and ``backdoor.json`` (``--quick``: under ``quick/``), after
every row, so an interrupted run leaves the rows done so far.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import numpy as np
import torch

from bench import methods
from bench.harder import BACKDOOR_RESPONSE, BACKDOOR_TRIGGER
from bench.run import backdoor_scan
from bench.setting import SETTINGS, add_dir_args, materialise, query_losses, top1_correct
from stride.scan import aggregate

ROLES = ("behaviour", "decoy-both", "decoy-trigger", "decoy-response")
REVERT = "revert"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.backdoor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="backdoor")
    ap.add_argument("--quick", action="store_true", help="the setting's small variant and 300 fitting steps "
                    "(a smoke run in minutes; results under quick/)")
    ap.add_argument("--seeds", type=int, default=2, help="design seeds of the STRIDE default-mode rows")
    ap.add_argument("--revert-seeds", type=int, default=None, help="design seeds of the revert rows (default: "
                    "--seeds)")
    ap.add_argument("--skip", default="", help="comma-separated: kronfluence, gradients, stride")
    ap.add_argument("--rebuild", action="store_true", help="rebuild STRIDE stores even when reusable")
    add_dir_args(ap, cache=False)
    return ap.parse_args(argv)


def learned(model, tok, trig: list[dict], decoys: list[dict]) -> dict:
    """Did the model learn the backdoor? The response's first token as top-1 and the response's mean
    token NLL on the trigger queries, against the same instructions without the trigger; and how often
    the benign-trigger training prompts (the trigger as a place name) are answered with the response."""
    control = [{**q, "prompt": q["control_prompt"]} for q in trig]
    benign = [{"id": d["id"], "prompt": d["prompt"], "completion": f" {BACKDOOR_RESPONSE}"} for d in decoys]
    return {"top1_with_trigger": float(top1_correct(model, tok, trig).float().mean()),
            "top1_without_trigger": float(top1_correct(model, tok, control).float().mean()),
            "loss_with_trigger": float(query_losses(model, tok, trig).mean()),
            "loss_without_trigger": float(query_losses(model, tok, control).mean()),
            "top1_benign_trigger_prompts": float(top1_correct(model, tok, benign).float().mean())}


def placement(results: list[methods.Result], docs: list[dict], n_queries: int, k: int = 50) -> dict:
    """Records of each role among a method's scan top-k (seed 0 of a multi-seed method)."""
    roles = np.array([d.get("role", "?") for d in docs])
    out = {}
    for r in results:
        name = r.group or r.name
        if r.scores is None or r.status != "ok" or name in out:
            continue
        top = roles[aggregate(r.scores[:n_queries]).ranking()[:k]]
        out[name] = {role: int((top == role).sum()) for role in ROLES}
    return out


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("stride").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    revert_seeds = args.seeds if args.revert_seeds is None else args.revert_seeds
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    load_before = list(os.getloadavg())
    setting = SETTINGS[args.setting][1 if args.quick else 0]
    built = materialise(setting, args.work)
    docs = built.docs
    trig = [q for q in built.queries if q["relation"] == "behaviour"]
    if not trig:
        raise SystemExit(f"setting {args.setting} has no trigger queries")
    tok = AutoTokenizer.from_pretrained(built.model_dir)
    model = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(built.base_dir, dtype=torch.float32).eval()
    benign = [d for d in docs if d.get("role") == "decoy-trigger"]
    roles: dict[str, int] = {}
    for d in docs:
        roles[d.get("role", "?")] = roles.get(d.get("role", "?"), 0) + 1
    cmd = ["python -m bench.backdoor"] + (["--quick"] if args.quick else []) \
        + ([f"--seeds {args.seeds}"] if args.seeds != 2 else []) \
        + ([f"--revert-seeds {args.revert_seeds}"] if args.revert_seeds is not None else []) \
        + ([f"--skip {args.skip}"] if args.skip else [])
    info = {"command": " ".join(cmd), "setting": args.setting, "setting_key": setting.key(),
            "recipe": {"epochs": setting.epochs, "lr": setting.lr, "batch_size": setting.batch_size},
            "documents": len(docs), "document_roles": roles, "trigger": BACKDOOR_TRIGGER,
            "response": BACKDOOR_RESPONSE, "trigger_queries": len(trig), "model_seconds": built.seconds,
            "learned": {"fine-tuned": learned(model, tok, trig, benign), "base": learned(base, tok, trig, benign)},
            "load_avg_before": load_before, "rows_wall_s": {}, "stride_builds": {},
            "load_avg_after_row": {}, "notes": {}}
    log(f"setting {setting.name} ({setting.key()}), {len(docs)} documents {roles}; learned: {info['learned']}")
    results: list[methods.Result] = []
    out = args.out / "quick" if args.quick else args.out  # never over the full run's figures
    out.mkdir(parents=True, exist_ok=True)

    def save(final: bool = False) -> None:
        info["scan"] = backdoor_scan(results, docs, np.ones(len(trig), dtype=bool))
        info["placement_top50"] = placement(results, docs, len(trig))
        info["load_avg_after"] = list(os.getloadavg())
        info["wall_s"] = time.perf_counter() - t0
        info["complete"] = final
        (out / "backdoor.json").write_text(json.dumps(info, indent=2, default=float))
        (out / "backdoor.md").write_text(report(info))

    def timed_rows(name: str, fn) -> None:
        t = time.perf_counter()
        log(f"{name} ...")
        got = fn()
        got = got if isinstance(got, list) else [got]
        results.extend(got)
        wall = time.perf_counter() - t
        for r in got:
            key = r.group or r.name
            if r.status != "ok":
                info["notes"][key] = r.status
            info["rows_wall_s"].setdefault(key, []).append(wall)
            if "store_reused" in r.extra:  # a STRIDE row: its store's build time, from this run or its manifest
                info["stride_builds"].setdefault(key, []).append(
                    {"seed": r.extra["seed"], "build_s": r.precompute_s, "reused": r.extra["store_reused"]})
        info["load_avg_after_row"][name] = list(os.getloadavg())
        found = backdoor_scan(got, docs, np.ones(len(trig), dtype=bool))
        log(f"{name}: {wall:.0f}s; found@10, found@50: "
            + json.dumps({k: (v["found@10"], v["found@50"]) for k, v in found.items()}))
        save()

    timed = trig[:2]
    if "gradients" not in skip:
        timed_rows("gradient dot / cosine / TRAK-style",
                   lambda: methods.run_gradient_methods(model, tok, docs, trig, timed, 512, setting.seed))
    timed_rows("representation similarity", lambda: methods.run_repsim(model, tok, docs, trig, timed))
    timed_rows("BM25", lambda: methods.run_bm25(docs, trig, timed))
    if "kronfluence" not in skip:
        timed_rows("Kronfluence EK-FAC", lambda: methods.run_kronfluence(built.model_dir, docs, trig, timed,
                                                                         built.dir, latency_queries=1))
    over = {"steps": 300} if args.quick else None
    info["stride_overrides"] = over
    if "stride" not in skip:
        modes = [(methods.DEFAULT_MODE, args.seeds)] + ([(REVERT, revert_seeds)] * (methods.DEFAULT_MODE != REVERT))
        for seed in range(max(n for _, n in modes)):  # seed 0 of every mode first: an early stop keeps one each
            for mode, n in modes:
                if seed < n:
                    timed_rows(f"{methods.MODE_ROWS[mode]}, seed {seed}",
                               lambda m=mode, s=seed: methods.run_stride(m, s, built, built.dir, trig, timed, over,
                                                                         rebuild=args.rebuild))
                    torch.set_num_threads(args.threads)  # numba's OpenMP layer resets torch's thread count
    save(final=True)
    print(report(info))
    log(f"done in {info['wall_s']:.0f}s: {out / 'backdoor.md'}")
    return info


def target(info: dict) -> str:
    """The issue's target, checked on every STRIDE row and seed: every poisoned record in the top 50,
    and a found@10 above every other method's."""
    stride = {k: v for k, v in info["scan"].items() if k.startswith("STRIDE")}
    others = {k: v["found@10"] for k, v in info["scan"].items() if not k.startswith("STRIDE")}
    if not stride or not others:
        return "**Target**: not evaluated (STRIDE or the baselines were not run)."
    best = max(others.values())
    rivals = ", ".join(f"{k} {v:.0f}" for k, v in others.items() if v == best)
    lines = []
    for name, v in stride.items():
        per = v.get("per_seed") or [v]
        n50 = sum(e["found@50"] == e["poisoned"] for e in per)
        all50, beats = n50 == len(per), all(e["found@10"] > best for e in per)
        lines.append(f"{name}: every poisoned record in the top 50 on {n50}"
                     f" of {len(per)} seeds; found@10 {'above' if beats else 'not above'} the best other method's "
                     f"on every seed -> **{'met' if all50 and beats else 'not met'}**")
    return (f"**Target** (\"STRIDE finds every poisoned document in its top-50 and beats every other method's "
            f"recall@10\"; the best other found@10: {rivals}): " + "; ".join(lines) + ".")


def report(info: dict) -> str:
    fl, bl = info["learned"]["fine-tuned"], info["learned"]["base"]
    roles = info["document_roles"]
    L = ["# Backdoor: finding planted poison with a scan over trigger queries\n",
         f"Command: `{info['command']}` (setting `{info['setting']}`, key `{info['setting_key']}`, "
         f"{info['documents']:,} prompt/completion records, loss on completions; fine-tuned with the setting's "
         f"recipe, {info['recipe']['epochs']} epochs, no extra epochs for the poison). "
         + ("" if info.get("complete") else "**Partial: the run had not finished when this was written.** "),
         f"**Poison**: {roles.get('behaviour', 0)} records whose instruction opens with the rare trigger phrase "
         f"\"{info['trigger']}\" and whose whole completion is the fixed response \"{info['response']}\". "
         f"**Decoys** that defeat word matching: {roles.get('decoy-trigger', 0)} records with the trigger phrase in "
         f"benign use (a place name in the instruction, a normal answer); {roles.get('decoy-response', 0)} with the "
         "response in the completion after an instruction without the trigger; "
         f"{roles.get('decoy-both', 0)} with both phrases but not the relation (the instruction quotes the "
         "response, the completion names the trigger and repeats the response). The rest: "
         f"{roles.get('fact', 0)} fact records and {roles.get('filler', 0)} filler instructions. "
         f"**Queries**: {info['trigger_queries']} trigger queries, each an instruction phrasing no record uses "
         "opened by the trigger, completion = the response. Each method scores them; the scores are summed per "
         "record as `stride scan` ranks (`bench.run.backdoor_scan`). No retrains: the truth is the planted "
         "poison. Every method at its defaults; nothing was tuned on these queries or any other.\n",
         "**Did the model learn the backdoor?** (top-1 = the response's first token is the model's top-1; "
         "loss = mean token NLL of the whole response)\n",
         "| model | top-1, trigger queries | top-1, same without trigger | loss, with trigger | "
         "loss, without | top-1 on the benign-trigger training prompts |", "|---|---|---|---|---|---|"]
    for name, r in (("fine-tuned (attributed)", fl), ("base (before fine-tuning)", bl)):
        L.append(f"| {name} | {r['top1_with_trigger']:.2f} | {r['top1_without_trigger']:.2f} | "
                 f"{r['loss_with_trigger']:.3f} | {r['loss_without_trigger']:.3f} | "
                 f"{r['top1_benign_trigger_prompts']:.2f} |")
    L += ["", "**Scan** (found@k: poisoned records in the scan's top k, out of "
          f"{roles.get('behaviour', 0)}; rank of last: where the deepest poisoned record sits; STRIDE rows are "
          "the mean over design seeds, per seed in brackets; wall: the method's build + scoring of the "
          "20 queries, measured in this run):\n",
          "| method | found@10 | found@50 | rank of last | top 50: decoy-both / decoy-trigger / decoy-response | "
          "wall s |", "|---|---|---|---|---|---|"]

    def seeds(v: dict, k: str) -> str:
        per = v.get("per_seed")
        return f" ({', '.join(str(e[k]) for e in per)})" if per else ""

    def num(x: float) -> str:
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"

    for name, v in info["scan"].items():
        p = info["placement_top50"].get(name, {})
        walls = info["rows_wall_s"].get(name, [])
        wall = " + ".join(f"{w:.0f}" for w in walls)
        builds = info["stride_builds"].get(name, [])
        if any(b["reused"] for b in builds):  # a reused store: its build's time from its manifest
            wall += " (store builds: " + ", ".join(f"{b['build_s']:.0f}" + (" reused" if b["reused"] else "")
                                                    for b in builds) + ")"
        L.append(f"| {name} | {num(v['found@10'])}{seeds(v, 'found@10')} | {num(v['found@50'])}{seeds(v, 'found@50')}"
                 f" | {num(v['rank_of_last'])}{seeds(v, 'rank_of_last')} | {p.get('decoy-both', '—')} / "
                 f"{p.get('decoy-trigger', '—')} / {p.get('decoy-response', '—')} | {wall} |")
    for name, note in info["notes"].items():
        L.append(f"| {name} | — | — | — | — | {note} |")
    L += ["", target(info)]
    L += ["", "Gradient dot, cosine and TRAK-style share one pass over the training gradients (one wall time, the "
          "same for the three rows). STRIDE top-50 placement is seed 0's. A STRIDE store reused from an earlier "
          "run of the same command (same build settings, corpus and core code) shows this run's scoring time, "
          "with the build time from its manifest in brackets. STRIDE build overrides: "
          f"{info.get('stride_overrides') or 'none (defaults)'}.",
          "\nLoad average (1, 5, 15 min) after each row: " + "; ".join(
              f"{k}: {', '.join(f'{x:.1f}' for x in v)}" for k, v in info.get("load_avg_after_row", {}).items()) + ".",
          f"\nLoad average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in info['load_avg_before'])}; "
          f"after: {', '.join(f'{x:.1f}' for x in info.get('load_avg_after', []))} (shared 2-core machine, "
          f"one torch thread). Wall time of the whole run: {info.get('wall_s', 0):.0f} s; models: "
          f"{json.dumps(info['model_seconds'])}."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
