"""``python -m bench [--setting reference|alias|instruct] [--quick]``: one benchmark setting, end to end.

Stages: the setting's models, the LDS ground truth (retrains), STRIDE in every fit mode over design
seeds, the baselines, the reference rows (planted support, same relation and answer, thresholded
BM25, the exact subset-counterfactual ceiling), optionally the removal test (``--removal``), the
scaling study (reference setting only), then ``results.json`` and ``REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench import methods
from bench.groundtruth import ground_truth
from bench.measure import PeakRSS, lds_split, planted_recall, split_rows
from bench.setting import SETTINGS, materialise

HERE = Path(__file__).resolve().parent
REMOVAL_METHODS = {"kronfluence": "Kronfluence EK-FAC", "bm25": "BM25",
                   "gradient-dot": "Gradient dot product (TracIn, final ckpt)"}
AGGREGATED = ("lds_mean", "lds_std", "lds_mean_tune", "lds_mean_seen_phrasing", "lds_mean_heldout_phrasing",
              "lds_mean_facts", "lds_mean_behaviour",
              "recall@1", "recall@5", "mrr", "recall@5_heldout_phrasing", "precompute_s", "p50_ms", "p95_ms",
              "state_bytes", "peak_rss_mb")


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load_avg_at_start": list(os.getloadavg())}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="reference",
                    help="reference (lexical), alias (queries name entities by their other name) or instruct "
                         "(prompt/completion records, completion-only loss)")
    ap.add_argument("--quick", action="store_true", help="small setting, 10 retrains: a smoke run in minutes")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results for the "
                    "reference setting, bench/results/<setting> otherwise; .../quick with --quick)")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="ground truth and measurement cache")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="models and stores of the setting")
    ap.add_argument("--seeds", type=int, default=2, help="STRIDE design seeds per fit mode (finetune: 1)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: revert,add,forget,fidelity,finetune,"
                    "kronfluence,counterfactual,scaling")
    ap.add_argument("--rebuild", action="store_true", help="rebuild STRIDE stores even when an identical one exists")
    ap.add_argument("--removal", action="store_true", help="run the removal test (retrains; cached, resumable)")
    ap.add_argument("--removal-queries", type=int, default=30)
    ap.add_argument("--removal-k", default="5", help="comma-separated numbers of top proponents removed, e.g. 5,20")
    ap.add_argument("--removal-methods", default=",".join(REMOVAL_METHODS),
                    help="baselines whose top proponents are removed besides STRIDE's default row: "
                         + ",".join(REMOVAL_METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core "
                    "machine more threads oversubscribe and run tens of times slower)")
    return ap.parse_args(argv)


def command(args: argparse.Namespace) -> str:
    parts = ["python -m bench"]
    if args.setting != "reference":
        parts.append(f"--setting {args.setting}")
    if args.quick:
        parts.append("--quick")
    if args.seeds != 2:
        parts.append(f"--seeds {args.seeds}")
    if args.skip:
        parts.append(f"--skip {args.skip}")
    if args.removal:
        parts.append(f"--removal --removal-queries {args.removal_queries} --removal-k {args.removal_k}")
        if args.removal_methods != ",".join(REMOVAL_METHODS):
            parts.append(f"--removal-methods {args.removal_methods}")
    if args.out is not None:  # a report written elsewhere says where, or its command would overwrite another
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def evaluate(r: methods.Result, gt: dict, setting, support: list[list[int]], held: np.ndarray,
             behaviour: np.ndarray) -> dict:
    """The quality columns of one row: LDS on the report split (and the tune split apart), recall, MRR."""
    entry = r.summary()
    if r.scores is None:
        return entry
    per_q = lds_split(r.scores, gt, setting, "report")
    if behaviour.any():  # the planted behaviour's queries, apart from the facts'
        entry["lds_mean_behaviour"] = float(per_q[behaviour].mean())
        entry["lds_mean_facts"] = float(per_q[~behaviour].mean())
    entry.update({"lds_mean": float(per_q.mean()), "lds_std": float(per_q.std()),
                  "lds_mean_seen_phrasing": float(per_q[~held].mean()) if (~held).any() else None,
                  "lds_mean_heldout_phrasing": float(per_q[held].mean()) if held.any() else None,
                  **planted_recall(r.scores, support)})
    if setting.tune_retrains:
        entry["lds_mean_tune"] = float(lds_split(r.scores, gt, setting, "tune").mean())
    if held.any():
        entry["recall@5_heldout_phrasing"] = planted_recall(
            r.scores[torch.from_numpy(held)], [s for s, h in zip(support, held, strict=True) if h])["recall@5"]
    return entry


def aggregate(entries: list[dict]) -> dict:
    """One table row from a method's per-seed rows: means, the sample sd over seeds, and every seed's row."""
    if len(entries) == 1:
        return entries[0]
    out = dict(entries[0])
    for k in AGGREGATED:
        vals = [e[k] for e in entries if isinstance(e.get(k), (int, float))]
        if len(vals) == len(entries):
            out[k] = float(np.mean(vals))
            out[f"{k}_seed_sd"] = float(np.std(vals, ddof=1))
    out["seeds"] = [e.get("seed") for e in entries]
    out["per_seed"] = {str(e.get("seed")): {k: e.get(k) for k in AGGREGATED + ("config", "store_reused",
                                                                                "converged_share", "mean_nonzeros")}
                       for e in entries}
    return out


def backdoor_scan(results: list[methods.Result], docs: list[dict], behaviour: np.ndarray) -> dict:
    """Poison detection as a scan: each method's scores over the trigger queries summed per document
    (``stride.scan``, what ``stride scan`` ranks by); how many planted behaviour documents are in the
    top 10 and top 50, and how deep the last one is. Rows of one method over design seeds: mean, sd."""
    from stride.scan import aggregate as scan

    poisoned = np.array([d.get("role") == "behaviour" for d in docs])
    rows: dict[str, list[dict]] = {}
    for r in results:
        if r.scores is None or r.status not in ("ok", "reference"):
            continue
        order = scan(r.scores[torch.from_numpy(behaviour)]).ranking()
        hit = poisoned[order]
        rows.setdefault(r.group or r.name, []).append(
            {"found@10": int(hit[:10].sum()), "found@50": int(hit[:50].sum()),
             "rank_of_last": int(np.nonzero(hit)[0].max()) + 1, "poisoned": int(poisoned.sum())})
    out = {}
    for name, entries in rows.items():
        out[name] = {k: float(np.mean([e[k] for e in entries])) for k in entries[0]}
        if len(entries) > 1:
            out[name]["per_seed"] = entries
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    full, quick = SETTINGS[args.setting]
    setting = quick if args.quick else full
    sub = [] if args.setting == "reference" else [args.setting]
    out = args.out or HERE.joinpath("results", *sub, *(["quick"] if args.quick else []))
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    warnings.filterwarnings("ignore")
    logging.getLogger("stride").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str, t: float) -> None:
        stages[name] = time.perf_counter() - t
        # numba's OpenMP layer (the core's solver) leaves torch's intra-op threads at numba's count: pin again
        torch.set_num_threads(args.threads)

    info = {"command": command(args), "setting_name": args.setting, "setting": setting.__dict__,
            "setting_key": setting.key(), "machine": machine()}
    log(f"setting {setting.name} ({setting.key()}); machine {info['machine']['cpu']}")

    t = time.perf_counter()
    built = materialise(setting, args.work)
    stage("setting (pretrain + fine-tune, or reuse)", t)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.setting import top1_accuracy

    tok = AutoTokenizer.from_pretrained(built.model_dir)
    model = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32).eval()
    docs, queries = built.docs, built.queries
    n, Q = len(docs), len(queries)
    row = {d["id"]: i for i, d in enumerate(docs)}
    support = [[row[s] for s in q["support"]] for q in queries]
    held = np.array([q["heldout_phrasing"] for q in queries])
    behaviour = np.array([q["relation"] == "behaviour" for q in queries])
    roles: dict[str, int] = {}
    for d in docs:
        roles[d.get("role", "?")] = roles.get(d.get("role", "?"), 0) + 1
    kinds = sorted({q["relation"] for q in queries})
    info["data"] = {"documents": n, "support_documents": len({i for s in support for i in s}), "queries": Q,
                    "heldout_phrasing_queries": int(held.sum()), "vocab": len(tok), "document_roles": roles,
                    "prompt_completion_records": sum("prompt" in d for d in docs),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "fact_top1_accuracy": top1_accuracy(model, tok, queries),
                    "top1_accuracy_by_relation": {k: top1_accuracy(model, tok, [q for q in queries
                                                                                if q["relation"] == k]) for k in kinds},
                    "setting_build_seconds": built.seconds}
    named = [q for q in queries if q.get("doc_subject")]
    if named:  # does the model use the alias link? the same queries under the documents' name, for comparison
        info["data"]["top1_accuracy_alias_named"] = top1_accuracy(model, tok, named)
        info["data"]["top1_accuracy_doc_named"] = top1_accuracy(
            model, tok, [{**q, "prompt": q["prompt"].replace(q["subject"], q["doc_subject"])} for q in named])
    log(f"data: {info['data']}")

    t = time.perf_counter()
    gt = ground_truth(built, args.cache, log=log)
    stage("ground truth (retrains)", t)
    rep, tune = split_rows(setting, "report"), split_rows(setting, "tune")
    info["ground_truth"] = {"retrains": int(gt["masks"].shape[0]), "retrain_seconds_total": gt["seconds"],
                            "reused_from_cache": gt["reused"], "report_retrains": [rep.start, rep.stop - 1],
                            "tune_retrains": [tune.start, tune.stop - 1] if tune.stop > tune.start else None}
    rng = np.random.default_rng(0)
    timed = [queries[i] for i in rng.permutation(Q)[: (8 if args.quick else 30)]]

    results: list[methods.Result] = []
    work = built.dir
    for mode in methods.MODE_ROWS:
        if mode in skip:
            continue
        seeds = range(1 if mode == "finetune" else args.seeds)
        # --quick is a smoke run: fewer fitting steps (a `stride build --steps` option) to stay within minutes
        over = {"steps": 300} if args.quick and mode != "finetune" else None
        for seed in seeds:
            t = time.perf_counter()
            log(f"{methods.MODE_ROWS[mode]}, seed {seed}: build (or reuse) + score")
            rows = methods.run_stride(mode, seed, built, work, queries, timed, over,
                                      ablation=mode == methods.DEFAULT_MODE, rebuild=args.rebuild)
            results += rows
            stage(f"{methods.MODE_ROWS[mode]}, seed {seed}", t)
            if rows[0].status != "ok":
                break
    t = time.perf_counter()
    log("gradient dot / cosine / TRAK-style")
    proj_dim = 512
    results += methods.run_gradient_methods(model, tok, docs, queries, timed, proj_dim, setting.seed)
    stage("gradient methods", t)
    t = time.perf_counter()
    log("representation similarity, BM25, forward floor")
    results.append(methods.run_repsim(model, tok, docs, queries, timed))
    bm25 = methods.run_bm25(docs, queries, timed)
    results.append(bm25)
    results.append(methods.run_forward_floor(model, tok, timed))
    stage("repsim + BM25 + floor", t)
    if "kronfluence" in skip:
        results.append(methods.Result("Kronfluence EK-FAC", status="skipped: --skip kronfluence"))
    else:
        t = time.perf_counter()
        log("Kronfluence EK-FAC")
        results.append(methods.run_kronfluence(built.model_dir, docs, queries, timed, work,
                                               latency_queries=1 if args.quick else 4))
        stage("Kronfluence", t)
    results.append(methods.Result("TRAK (traker package)", status="not run: see the notes below"))
    results += methods.reference_rows(docs, queries, support, bm25.scores)
    default = next((r for r in results if r.status == "ok" and r.group == methods.MODE_ROWS[methods.DEFAULT_MODE]
                    and r.extra.get("seed") == 0), None) or \
        next((r for r in results if r.status == "ok" and r.group in methods.MODE_ROWS.values()), None)
    if "counterfactual" not in skip:
        t = time.perf_counter()
        from bench.counterfactual import ceiling_scores, measurements
        from stride.config import BuildConfig

        cfg = default.extra["config"] if default else BuildConfig().resolve(n, model.config.num_hidden_layers).to_dict()
        K, d, seed = cfg["num_subsets"], cfg["memberships"], cfg["seed"]
        log(f"exact subset counterfactuals: K={K}, d={d}, design seed {seed}")
        m = measurements(built, K, d, seed, args.cache, log=log)
        info["counterfactual"] = {"K": K, "d": d, "design_seed": seed, "steps": m["steps"], "lr": m["lr"],
                                  "optimizer": "Adam, constant lr, full batch of the subset, from the base weights",
                                  "seconds": m["seconds"], "reused_subsets": m["reused"],
                                  "design_from": default.name if default else "BuildConfig() defaults"}
        for lam in (0.2, 0.8):
            w, diag = ceiling_scores(m, lam)
            results.append(methods.Result(f"Reference: exact subset counterfactuals, same design and solver "
                                          f"(lambda {lam} lambda_max)", w, status="reference", extra=diag))
        stage("exact subset counterfactuals", t)

    groups: dict[str, list[dict]] = {}
    for r in results:
        entry = evaluate(r, gt, setting, support, held, behaviour)
        groups.setdefault(r.group or r.name, []).append(entry)
        log(f"{r.name}{'' if r.extra.get('seed') is None else ' seed ' + str(r.extra['seed'])}: "
            + ", ".join(f"{k}={v:.3g}" for k, v in entry.items()
                        if isinstance(v, float) and k in ("lds_mean", "recall@5", "p50_ms")))
    table = {name: aggregate(entries) for name, entries in groups.items()}
    if behaviour.any():
        info["backdoor"] = backdoor_scan(results, docs, behaviour)
        log(f"backdoor scan: {json.dumps({k: v['found@50'] for k, v in info['backdoor'].items()})}")

    if args.removal:
        t = time.perf_counter()
        from bench.removal import removal_test

        # each row costs one retrain per query and k: --removal-methods trims the baselines (STRIDE always runs)
        picks = [REMOVAL_METHODS[m.strip()] for m in args.removal_methods.split(",") if m.strip()]
        scores = {f"{default.name} (seed {default.extra['seed']})": default.scores} if default else {}
        scores.update({r.name: r.scores for r in results if r.name in picks and r.scores is not None})
        ks = tuple(int(k) for k in args.removal_k.split(","))
        log(f"removal test: {args.removal_queries} queries, top-{ks}, rows {list(scores)}")
        info["removal"] = removal_test(built, scores, args.cache, args.removal_queries, ks, log=log)
        stage("removal test (retrains)", t)

    if "scaling" not in skip and args.setting == "reference" and default is not None:
        t = time.perf_counter()
        log("scaling")
        from bench.scaling import run_scaling

        grad_q = table[f"TRAK-style projected gradients (k={proj_dim})"]["p50_ms"]
        ns = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
        # the baseline's fixed part: its measured query latency minus its dot product at the bench's n
        base_dot = methods.time_calls(lambda _: (torch.randn(n, proj_dim) @ torch.randn(proj_dim)).sum(), [0] * 5)
        with PeakRSS():
            info["scaling"] = run_scaling(ns, built.model_dir, Path(default.extra["store"]), queries[0], proj_dim,
                                          max(0.0, grad_q - float(np.median(base_dot))), log=log)
        stage("scaling", t)
    info["methods"] = table
    info["stages_s"] = stages
    info["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(info, indent=2, default=float))
    from bench.report import write_report

    write_report(info, out)
    log(f"done in {info['wall_s']:.0f}s: {out / 'REPORT.md'}")
    return info


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
