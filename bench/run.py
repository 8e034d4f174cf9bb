"""``python -m bench [--quick] [--out DIR]``: the reference benchmark, end to end."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench import methods
from bench.groundtruth import ground_truth
from bench.measure import PeakRSS, lds_split, planted_recall
from bench.setting import FULL, QUICK, materialise

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load_avg_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small setting, 8 retrains: a smoke run in minutes")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results, "
                    "or bench/results/quick with --quick)")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="ground truth and setting cache")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="models and stores of the setting")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip: kronfluence,finetune,scaling")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core "
                    "machine more threads oversubscribe and run tens of times slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    out = args.out or (HERE / "results" / ("quick" if args.quick else ""))
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

    cmd = "python -m bench" + (" --quick" if args.quick else "") + (f" --skip {args.skip}" if skip else "")
    info = {"command": cmd,
            "setting": setting.__dict__, "setting_key": setting.key(), "machine": machine()}
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
    info["data"] = {"documents": n, "fact_documents": sum(len(s) for s in support), "queries": Q,
                    "heldout_phrasing_queries": int(held.sum()), "vocab": len(tok),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "fact_top1_accuracy": top1_accuracy(model, tok, queries),
                    "setting_build_seconds": built.seconds}
    log(f"data: {info['data']}")

    t = time.perf_counter()
    gt = ground_truth(built, args.cache, log=log)
    stage("ground truth (retrains)", t)
    info["ground_truth"] = {"retrains": int(gt["masks"].shape[0]), "retrain_seconds_total": gt["seconds"],
                            "reused_from_cache": gt["reused"]}
    rng = np.random.default_rng(0)
    timed = [queries[i] for i in rng.permutation(Q)[: (8 if args.quick else 30)]]

    results: list[methods.Result] = []
    work = built.dir
    for fit in ("fidelity", "finetune"):
        if fit in skip:
            continue
        t = time.perf_counter()
        log(f"STRIDE {fit}: build + score")
        # --quick is a smoke run: fewer fitting steps (a `stride build --steps` option) to stay within minutes
        over = {"steps": 300} if args.quick and fit == "fidelity" else None
        results += methods.run_stride(fit, built.model_dir, built.corpus, work, queries, timed, over)
        stage(f"STRIDE {fit}", t)
    t = time.perf_counter()
    log("gradient dot / cosine / TRAK-style")
    proj_dim = 512
    results += methods.run_gradient_methods(model, tok, docs, queries, timed, proj_dim, setting.seed)
    stage("gradient methods", t)
    t = time.perf_counter()
    log("representation similarity, BM25, forward floor")
    results.append(methods.run_repsim(model, tok, docs, queries, timed))
    results.append(methods.run_bm25(docs, queries, timed))
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
    # calibration, not a method: 1 on each query's planted supporting documents, 0 elsewhere
    oracle = torch.zeros(Q, n)
    for q, sup in enumerate(support):
        oracle[q, sup] = 1.0
    results.append(methods.Result("Reference: planted-support indicator (oracle, not a method)", oracle,
                                  status="reference"))

    table = {}
    for r in results:
        entry = r.summary()
        if r.scores is not None:
            per_q = lds_split(r.scores, gt, setting, "report")
            entry.update({"lds_mean": float(per_q.mean()), "lds_std": float(per_q.std()),
                          "lds_mean_seen_phrasing": float(per_q[~held].mean()) if (~held).any() else None,
                          "lds_mean_heldout_phrasing": float(per_q[held].mean()) if held.any() else None,
                          **planted_recall(r.scores, support)})
            if held.any():
                entry["recall@5_heldout_phrasing"] = planted_recall(
                    r.scores[torch.from_numpy(held)], [s for s, h in zip(support, held, strict=True) if h])["recall@5"]
        table[r.name] = entry
        log(f"{r.name}: " + ", ".join(f"{k}={v:.3g}" for k, v in entry.items()
                                      if isinstance(v, float) and k in ("lds_mean", "recall@5", "p50_ms")))

    if "scaling" not in skip:
        t = time.perf_counter()
        log("scaling")
        from bench.scaling import run_scaling

        grad_q = table[f"TRAK-style projected gradients (k={proj_dim})"]["p50_ms"]
        ns = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
        store_dir = work / ("store-fidelity" if "fidelity" not in skip else "store-finetune")
        # the baseline's fixed part: its measured query latency minus its dot product at the bench's n
        base_dot = methods.time_calls(lambda _: (torch.randn(n, proj_dim) @ torch.randn(proj_dim)).sum(), [0] * 5)
        with PeakRSS():
            info["scaling"] = run_scaling(ns, built.model_dir, store_dir, queries[0], proj_dim,
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
