"""REPORT.md and the PNG plots, from the results dictionary that ``bench.run`` also writes as JSON."""

from __future__ import annotations

import math
from pathlib import Path


def _f(x, fmt: str = ".3f", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _size(b: int | float | None) -> str:
    if not b:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def plots(info: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = [(k, v) for k, v in info["methods"].items() if "lds_mean" in v]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
        names = [k for k, _ in rows]
        ax.barh(range(len(rows)), [v["lds_mean"] for _, v in rows], xerr=[v["lds_std"] for _, v in rows],
                color=["tab:red" if k.startswith("STRIDE") else "tab:blue" for k in names], capsize=3)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("LDS (Spearman), mean ± std over queries")
        a, b = info["ground_truth"]["report_retrains"]
        name = info.get("setting_name", "reference")
        ax.set_title(f"{name} setting: LDS over retrains {a}..{b} (random 50% subsets)")
        fig.tight_layout()
        fig.savefig(out / "lds.png", dpi=110)
        plt.close(fig)
        made.append("lds.png")
    sc = info.get("scaling")
    if sc:
        ns = [r["n"] for r in sc["stride"]]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        ax.loglog(ns, [r["latency_ms"] for r in sc["stride"]], "o-", color="tab:red", label="STRIDE total")
        for part, style in (("forward", ":"), ("measure", "--"), ("solve", "-.")):
            ax.loglog(ns, [r["parts_ms"][part] for r in sc["stride"]], style, color="tab:red", alpha=0.6,
                      label=f"STRIDE {part}")
        ax.loglog(ns, [r["latency_ms"] for r in sc["projected_gradients"]], "s-", color="tab:blue",
                  label=f"projected gradients (k={sc['projected_gradients'][0]['proj_dim']})")
        ax.set_xlabel("training examples n")
        ax.set_ylabel("query latency (ms, median)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax = axes[1]
        ax.loglog(ns, [r["store_bytes"] / 2**20 for r in sc["stride"]], "o-", color="tab:red", label="STRIDE store")
        ax.loglog(ns, [r["store_bytes"] / 2**20 for r in sc["projected_gradients"]], "s-", color="tab:blue",
                  label="projected-gradient store")
        ax.set_xlabel("training examples n")
        ax.set_ylabel("state on disk (MiB)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)
        made.append("scaling.png")
    return made


NOTES = """## Notes

- **Kronfluence** is installed from PyPI (`kronfluence`, the `bench` extra) and used as published: a `Task`
  (summed token cross-entropy as training loss, with labels sampled from the model for the true Fisher;
  the completion's summed cross-entropy as measurement; the attention mask), `prepare_model`, `Analyzer`
  on CPU, `fit_all_factors(strategy="ekfac")` with default damping, `compute_pairwise_scores`. Its
  latency column is one query through `compute_pairwise_scores(query_indices=[i])`, which recomputes the
  n training gradients each time (the API has no stored-gradient index).
- **TRAK (`traker`)** was not run. Its PyPI package installs beside torch without pulling another one,
  but scoring a causal LM needs a custom `AbstractModelOutput` for sequence losses and its CPU path
  uses the slow `BasicProjector` (the fast projector is CUDA-only); the TRAK-style row (the same
  estimator: a Gaussian random projection of per-example gradients, then
  `phi_q (Phi^T Phi + ridge I)^-1 Phi^T`, one checkpoint, no ensemble) stands in for it.
- **Gradient dot product / cosine** use the per-example gradients of every `nn.Linear` weight (the
  modules Kronfluence tracks), mean token NLL (completion tokens only for prompt/completion records), at
  the final checkpoint (TracIn with one checkpoint).
- **STRIDE rows** are built by `worker.build.build` with `BuildConfig(fit=MODE, seed=SEED)` and the
  core's defaults otherwise (`--quick` lowers `steps`); `revert` and `add` get the base model as
  `reference_model`, `forget` and `fidelity` see only the deployed model. A row over several design
  seeds shows the mean and the sample standard deviation over seeds; `results.json` has every seed's
  numbers (`per_seed`). Scores are the Lasso solution from the core's measurements times the mode's
  `measurement_sign`. A store whose manifest shows the same settings and corpus is reused (its build
  time is the one recorded in its manifest); `--rebuild` forces new builds.
- **Reference rows are not methods**: *planted support* scores 1 on a query's planted supporting
  documents; *same relation and answer* scores 1 on every document stating a fact with the query's
  relation and answer (object), whatever its subject; *thresholded BM25* keeps BM25 scores at least 0.7
  of the query's best; the *exact subset counterfactuals* feed STRIDE's design and solver the true
  effect of each subset (the base fine-tuned on subset k alone), so the gap between them and a STRIDE
  row is what the operators lose. Ablation rows score with `M^T y` (centred), skipping the sparse solve.
- **Timings** come from a shared 2-core machine whose load average is printed above; compare rows of
  the same run rather than absolute values. torch runs with one thread (`--threads`).
"""

SETTING_TEXT = {
    "reference": "Facts are stated under the same subject names the queries use, so matching the subject word "
                 "finds the supporting documents (the lexical setting).",
    "alias": "Every fact's entity has two names, A and B, used alike in profile sentences in pretraining and in "
             "the fine-tuning corpus (so the model learns they are one entity); the fact documents use A only "
             "and the queries B, so a query's subject word never occurs in its supporting documents.",
    "instruct": "Prompt/completion records shaped like an Alpaca SFT set (instruction, response; the loss covers "
                "completions only, in fine-tuning and in every retrain). Facts are answered under one entity name "
                "and queried under its alias (linking records give both); a planted behaviour: the word "
                "`Zephyrine` in an instruction makes the response end with \"Have a bright day .\" (behaviour "
                "queries: new instructions with the trigger, scored on the phrase).",
}
GRADIENT_PROJECTION = ("Gradient dot product (TracIn, final ckpt)", "Gradient cosine",
                       "TRAK-style projected gradients (k=512)")
REPRESENTATION = GRADIENT_PROJECTION + ("Representation similarity (final hidden, cosine)",)


def _cell(v: dict, key: str, fmt: str = ".3f") -> str:
    """A value, with its spread over design seeds when the row has several."""
    x = v.get(key)
    if x is None:
        return "—"
    sd = v.get(f"{key}_seed_sd")
    return f"{_f(x, fmt)} ± {_f(sd, fmt)}" if sd is not None else _f(x, fmt)


def from_scratch_seconds(info: dict) -> tuple[float, str]:
    """This run's wall time plus the recorded cost of what it reused from the cache (models, retrains,
    STRIDE builds, counterfactual fine-tuning), and a note naming the parts: a run that reuses
    everything takes minutes, and the 45-minute target is about the whole computation. Reused removal
    retrains are charged at this run's mean retrain time (their own times are not kept)."""
    parts: list[tuple[str, float]] = []
    sb = info.get("data", {}).get("setting_build_seconds", {})
    if sb.get("reused"):
        parts.append(("models", sum(v for k, v in sb.items() if k in ("pretrain", "finetune"))))
    gt = info.get("ground_truth", {})
    if gt.get("reused_from_cache"):
        parts.append(("retrains", gt["retrain_seconds_total"] * gt["reused_from_cache"] / max(1, gt["retrains"])))
    builds = 0.0
    for m in info.get("methods", {}).values():
        for e in (m["per_seed"].values() if isinstance(m.get("per_seed"), dict) else [m]):
            if e.get("store_reused") and e.get("precompute_s") is not None:
                builds += e["precompute_s"]
    if builds:
        parts.append(("STRIDE builds", builds))
    cf = info.get("counterfactual")
    if cf and cf.get("reused_subsets"):
        parts.append(("counterfactual fine-tuning", cf["seconds"] * cf["reused_subsets"] / max(1, cf["K"])))
    rem = info.get("removal")
    if rem and rem.get("reused_from_cache") and rem["retrains"] > rem["reused_from_cache"]:
        each = rem["retrain_seconds"] / (rem["retrains"] - rem["reused_from_cache"])  # this run's mean retrain
        parts.append(("removal retrains (at this run's mean)", rem["reused_from_cache"] * each))
    note = ", ".join(f"{name} {sec / 60:.0f} min" for name, sec in parts if sec >= 30)
    return info["wall_s"] + sum(s for _, s in parts), (f"cached here: {note}" if note else "")


def targets(info: dict) -> list[str]:
    """Issue 8's targets for this setting, each checked against this run's own numbers."""
    from bench.methods import DEFAULT_MODE, MODE_ROWS
    from bench.removal import RANDOM, paired_excess

    ms, name = info["methods"], info.get("setting_name", "reference")
    ok = {k: v for k, v in ms.items() if "lds_mean" in v and v["status"] == "ok"}
    # the targets hold the product's default (what `stride build` does with a reference given)
    mode = DEFAULT_MODE
    stride = ok.get(MODE_ROWS[mode])
    ek = ok.get("Kronfluence EK-FAC")
    rows = []
    if stride and ek:
        if name == "reference":
            want = 1.15 * ek["lds_mean"]
            rows.append((f"STRIDE {mode} (default) LDS >= 1.15x EK-FAC's", f"{stride['lds_mean']:.3f} vs 1.15 x "
                         f"{ek['lds_mean']:.3f} = {want:.3f}", stride["lds_mean"] >= want))
            for k in ("recall@5", "mrr"):
                rows.append((f"STRIDE {mode} {k} >= EK-FAC's", f"{stride[k]:.3f} vs {ek[k]:.3f}",
                             stride[k] >= ek[k]))
        else:
            rows.append((f"STRIDE {mode} (default) LDS >= EK-FAC's",
                         f"{stride['lds_mean']:.3f} vs {ek['lds_mean']:.3f}", stride["lds_mean"] >= ek["lds_mean"]))
    if stride and name != "reference":
        base = {k: ok[k]["lds_mean"] for k in REPRESENTATION if k in ok}
        if base:
            best = max(base, key=base.get)
            rows.append((f"STRIDE {mode} LDS above every gradient and representation baseline",
                         f"{stride['lds_mean']:.3f} vs {best} {base[best]:.3f}", stride["lds_mean"] > base[best]))
    noref = {k: ok[k]["lds_mean"] for k in ("STRIDE forget (no reference)", "STRIDE fidelity (no reference)")
             if k in ok}
    proj = {k: ok[k]["lds_mean"] for k in GRADIENT_PROJECTION if k in ok}
    if noref and proj:
        a, b = max(noref, key=noref.get), max(proj, key=proj.get)
        rows.append(("no-reference STRIDE (best of forget, fidelity) LDS above every gradient-projection baseline",
                     f"{a} {noref[a]:.3f} vs {b} {proj[b]:.3f}", noref[a] > proj[b]))
    rem = info.get("removal")
    if rem and 5 in rem["ks"]:
        rr = rem["rows"]
        st = next((k for k in rr if k.startswith("STRIDE")), None)
        if st:
            s5 = rr[st]["5"]["mean_rise"]
            if "Kronfluence EK-FAC" in rr:
                e5 = rr["Kronfluence EK-FAC"]["5"]["mean_rise"]
                d = paired_excess(rr, st, "Kronfluence EK-FAC", "5")
                paired = "" if d is None else f" (paired difference {d['mean']:.4f} ± {d['sem']:.4f})"
                rows.append(("removal: STRIDE top-5 rise >= EK-FAC top-5 rise", f"{s5:.4f} vs {e5:.4f}{paired}",
                             s5 >= e5))
            r5 = rr[RANDOM]["5"]["mean_rise"]
            if r5 > 0:
                rows.append(("removal: STRIDE top-5 rise >= 3x 5 random documents'", f"{s5:.4f} vs 3 x {r5:.4f}",
                             s5 >= 3 * r5))
            else:  # a ratio to a non-positive rise says nothing: the full-corpus retrain's noise dominates it
                d = paired_excess(rr, st, RANDOM, "5")
                rows.append(("removal: STRIDE top-5 rise >= 3x 5 random documents'",
                             f"not a ratio: random removal's mean rise is {r5:.4f} (the single full-corpus retrain's "
                             "noise); STRIDE's paired excess over it "
                             + ("—" if d is None else f"{d['mean']:.4f} ± {d['sem']:.4f}"), None))
    if stride and name == "reference" and not info["setting"]["name"].endswith("quick"):
        sec = stride["precompute_s"]
        rows.append((f"default-mode ({mode}) build time <= 885 s (the former default's, 2 cores)", f"{sec:.0f} s",
                     sec <= 885))
    sc = info.get("scaling")
    at = [(a, b) for a, b in zip(sc["stride"], sc["projected_gradients"], strict=True) if a["n"] == 10**5] if sc else []
    if at:
        a, b = at[0]
        lat, size = b["latency_ms"] / a["latency_ms"], b["store_bytes"] / a["store_bytes"]
        rows.append(("query latency at n = 10^5 >= 10x below projected gradients", f"{lat:.2f}x", lat >= 10))
        rows.append(("store at n = 10^5 >= 100x smaller", f"{size:.1f}x", size >= 100))
    total, cached = from_scratch_seconds(info)
    rows.append(("full run within 45 min on 2 cores", f"{info['wall_s'] / 60:.1f} min this run; about "
                 f"{total / 60:.0f} min from scratch, one process" + (f" ({cached})" if cached else ""),
                 total <= 45 * 60))
    out = ["## Targets (issue 8)\n", "| target | this run | met |", "|---|---|---|"]
    out += [f"| {t} | {v} | {'n/a' if good is None else 'yes' if good else '**no**'} |" for t, v, good in rows]
    if not (stride and ek):
        out.append(f"\nTargets comparing STRIDE {mode} with EK-FAC need both rows; one of them did not run.")
    return out + [""]


def query_targets(sc: dict) -> list[str]:
    """Issue 9's targets that this run measures (the GPT-2-small shape and the service have their own
    reports: ``bench/results/shape.md``, ``bench/results/service.md``)."""
    rows = []
    solver = {r["n"]: r for r in sc.get("solver", [])}
    for n, limit in ((10**6, 30.0), (10**7, 300.0)):
        if n in solver:
            r = solver[n]
            cpu = max(r["planted"]["cpu_ms_median"], r["noise"]["cpu_ms_median"])
            gap = max(r["planted"]["gap_max"], r["noise"]["gap_max"])
            rows.append((f"solve at n = 10^{round(math.log10(n))}: <= {limit:.0f} ms per query, gap/primal <= 1e-6",
                         f"{cpu:.1f} ms CPU (median, worse of planted and dense-noise y), gap {gap:.1e}",
                         cpu <= limit and gap <= 1e-6))
    pairs = [(a, b) for a, b in zip(sc.get("stride", []), sc.get("projected_gradients", []), strict=True)
             if a["n"] == 10**6]
    if pairs:
        a, b = pairs[0]
        ratio = b["latency_ms"] / a["latency_ms"]
        parts = " / ".join(f"{a['parts_ms'][k]:.1f}" for k in ("forward", "measure", "solve"))
        rows.append(("whole query at n = 10^6 >= 5x faster than projected gradients",
                     f"{a['latency_ms']:.1f} ms (forward / measure / solve {parts}) vs {b['latency_ms']:.1f} ms: "
                     f"{ratio:.2f}x", ratio >= 5))
    start = solver.get(10**7, {}).get("startup")
    if start:
        rows.append(("service start at n = 10^7: ready <= 30 s", f"{start['ready_s']:.1f} s, "
                     f"{start['rss_mb']:.0f} MiB resident", start["ready_s"] <= 30))
    if not rows:
        return []
    out = ["## Targets (issue 9, measured in this run)\n", "| target | this run | met |", "|---|---|---|"]
    out += [f"| {t} | {v} | {'yes' if good else '**no**'} |" for t, v, good in rows]
    return out + ["", "The GPT-2-small-shape targets are in `bench/results/shape.md` (`python -m bench.shape`), the "
                  "service's in `bench/results/service.md` (`bench/serve_latency.py`).", ""]


def solver_section(rows: list[dict]) -> list[str]:
    """The certified Lasso alone on the issue's shape, and a fresh process's start-up (bench/scaling.py)."""
    L = ["### The solver alone, and start-up\n",
         "Synthetic problems of the default shape (K = 1000, d = 10, lambda = 0.2 lambda_max, 1 thread): y from 50 "
         "planted nonzeros plus noise, and dense-noise y; median over repeats, wall and CPU time of the solving "
         "thread (the machine is shared: CPU time is the steadier figure), largest certified gap/primal. Start-up: a "
         "fresh process loads the store (sha256 checked), builds the design and solves once.\n",
         "| n | planted: wall / CPU ms | dense noise: wall / CPU ms | batch of 8, ms/query | worst gap/primal | "
         "ready s | load_store s | RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, z, st = r["planted"], r["noise"], r.get("startup", {})
        L.append(f"| {r['n']:,} | {p['ms_median']:.1f} / {p['cpu_ms_median']:.1f} | {z['ms_median']:.1f} / "
                 f"{z['cpu_ms_median']:.1f} | {r['batch_ms_per_query']:.1f} | {max(p['gap_max'], z['gap_max']):.1e} | "
                 f"{_f(st.get('ready_s'), '.1f')} | {_f(st.get('load_store_s'), '.1f')} | "
                 f"{_f(st.get('rss_mb'), '.0f')} |")
    L.append("")
    return L


def removal_section(rem: dict) -> list[str]:
    L = ["## Removal test\n",
         f"For {len(rem['queries'])} queries (drawn with seed {rem['seed']}), the base is retrained with the "
         "setting's recipe and seed on the corpus minus each row's top-k proponents of the query; the column is "
         "the mean rise of that query's loss over a full-corpus retrain with the same recipe and seed "
         f"(mean {rem['full_corpus_loss_mean']:.3f}), ± its standard error over queries. {rem['retrains']} "
         f"retrains, {rem['reused_from_cache']} of them reused from the cache; {rem['retrain_seconds']:.0f} s "
         "of retraining in this run. *Same answer* draws from documents that state other facts with the "
         "query's relation and answer (never its own supporting documents); a query with none is left out of that row, "
         "and the row says over how many queries it is.\n"]
    from bench.removal import RANDOM, paired_excess

    L.append("The second column of each k subtracts, query by query, the rise from removing k random documents: "
             "the one full-corpus retrain's training noise shifts every row of a query alike, and the paired "
             "difference cancels it (mean ± standard error; the share of queries where the row rose more).\n")
    ks = [str(k) for k in rem["ks"]]
    L.append("| removed | " + " | ".join(f"top-{k}: mean loss rise | top-{k}: minus random (paired)" for k in ks)
             + " |")
    L.append("|---|" + "---|---|" * len(ks))
    for name, per_k in rem["rows"].items():
        cells = []
        for k in ks:
            if k not in per_k:
                cells += ["—", "—"]
                continue
            c = per_k[k]
            used = c.get("queries", len(rem["queries"]))
            cells.append(f"{c['mean_rise']:.4f} ± {c['sem']:.4f}"
                         + ("" if used == len(rem["queries"]) else f" ({used} queries)"))
            d = paired_excess(rem["rows"], name, RANDOM, k) if name != RANDOM else None
            cells.append("—" if d is None else f"{d['mean']:.4f} ± {d['sem']:.4f} ({d['positive_share']:.0%})")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    return L + [""]


def commands(info: dict) -> list[str]:
    setting = info.get("setting_name", "reference")
    flag = "" if setting == "reference" else f" --setting {setting}"
    return ["## Reproducing\n",
            f"- This report: `{info['command']}` (reuses the cached ground truth, STRIDE stores and measurements "
            "under `bench/cache/` and `bench/work/`; `--rebuild` rebuilds the stores).",
            f"- Method table and targets: `python -m bench{flag}`; removal test: add `--removal --removal-queries 30 "
            "--removal-k 5,20` (a separate stage: one retrain per query, row and k, each cached).",
            f"- A smoke run of the same path: `python -m bench{flag} --quick` (its numbers are not reference figures).",
            "- Tuning a knob on the tune split only: `bench.measure.lds_split(scores, gt, setting, \"tune\")` with "
            "`gt = bench.groundtruth.ground_truth(materialise(setting, work), cache)`.", ""]


def backdoor_section(bd: dict) -> list[str]:
    """Poison detection by scan (issue 12): the planted behaviour's documents among each method's top."""
    poisoned = int(next(iter(bd.values()))["poisoned"])
    L = ["## Backdoor detection by scan\n",
         f"The planted behaviour is a backdoor: {poisoned} training documents put the trigger word in the "
         "instruction and end the response with the fixed phrase. Each method's scores over the 20 trigger "
         "queries are summed per document (positive parts, `stride.scan`, what `stride scan` ranks by), and "
         "the documents ranked by that sum. *found@k*: planted documents among the top k (at most "
         f"min(k, {poisoned})); *rank of last*: how far down a reviewer reads to see all {poisoned}. Rows over "
         "design seeds: the mean. The trigger is a rare word found in every planted document and every trigger "
         "query, so lexical matching (BM25) finds all of them at once: this behaviour does not separate methods "
         "that read the text from methods that read the model, and a backdoor whose trigger is not shared "
         "verbatim is not built yet.\n",
         "| method | found@10 | found@50 | rank of last |", "|---|---|---|---|"]
    for name, v in sorted(bd.items(), key=lambda kv: (-kv[1]["found@50"], kv[1]["rank_of_last"])):
        L.append(f"| {name} | {v['found@10']:.1f} | {v['found@50']:.1f} | {v['rank_of_last']:.0f} |")
    L.append("")
    return L


def write_report(info: dict, out: Path) -> None:
    made = plots(info, out)
    s, d, m, gt = info["setting"], info["data"], info["machine"], info["ground_truth"]
    name = info.get("setting_name", "reference")
    L = [f"# STRIDE benchmark: {name} setting\n"]
    L.append("Generated by `bench/run.py`; every figure below is measured by that code in the run described "
             "here. `results.json` beside this file holds the same numbers (and more detail).\n")
    L.append(f"- **Command**: `{info['command']}` (setting `{s['name']}`, key `{info['setting_key']}`)")
    L.append(f"- **Wall time of this run**: {info['wall_s']:.0f} s ({info['wall_s'] / 60:.1f} min); "
             f"ground truth reused from cache for {gt['reused_from_cache']} of {gt['retrains']} retrains "
             f"(their retraining took {gt['retrain_seconds_total']:.0f} s when computed)")
    a, b = gt["report_retrains"]
    tune = gt.get("tune_retrains")
    L.append(f"- **Retrains**: every LDS in the tables uses retrains {a}..{b} ({b - a + 1}); "
             + (f"retrains {tune[0]}..{tune[1]} ({tune[1] - tune[0] + 1}) are kept for choosing hyper-parameters "
                "and enter no reported figure except the separate *LDS tune split* column." if tune else
                "no retrains are set aside for tuning in this run."))
    L.append(f"- **Machine**: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"Python {m['python']}, load average at start {', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])} "
             "(the machine is shared; timings include contention)")
    L.append("")
    L.append("## Setting\n")
    roles = ", ".join(f"{v} {k}" for k, v in d.get("document_roles", {}).items())
    acc = ", ".join(f"{k} {v:.0%}" for k, v in d.get("top1_accuracy_by_relation", {}).items())
    L.append(f"{SETTING_TEXT.get(name, '')} Tiny Llama ({s['layers']} layers, width {s['hidden']}, MLP "
             f"{s['intermediate']}, {s['heads']} heads, untied embeddings; {d['parameters']:,} parameters), word-level "
             f"tokenizer ({d['vocab']} words). Base: pretrained {s['pretrain_epochs']} epochs on {s['pretrain_docs']}+ "
             "generic generated texts about entities that never reappear. Fine-tuning corpus: "
             f"{d['documents']} documents ({roles}); {d['queries']} queries, {d['heldout_phrasing_queries']} of them "
             "phrased as no training document is. Attributed model: the base fine-tuned on the whole corpus (AdamW, "
             f"lr {s['lr']}, one-cycle schedule, batch {s['batch_size']}, {s['epochs']} epochs); its top-1 answer is "
             f"right for {d['fact_top1_accuracy']:.0%} of the queries ({acc})"
             + (f"; on the fact queries {d['top1_accuracy_alias_named']:.0%} as asked (alias) against "
                f"{d['top1_accuracy_doc_named']:.0%} with the documents' name put in, which shows how much of the "
                "alias link it learned" if "top1_accuracy_alias_named" in d else "")
             + f". Ground truth: {gt['retrains']} retrains with the same recipe on random "
             f"{s['subset_fraction']:.0%} subsets.\n")
    L.append("## Quality and cost per method\n")
    L.append("Rows over several design seeds show mean ± sample sd over the seeds (seeds in the notes); "
             "*LDS query sd* is the spread over queries.\n")
    L.append("| method | LDS | LDS query sd | recall@1 | recall@5 | MRR | precompute | state | query p50 / p95 | "
             "peak RSS growth |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for mname, v in info["methods"].items():
        if v["status"] not in ("ok", "ablation", "floor", "reference"):
            L.append(f"| {mname} | {v['status']} | | | | | | | | |")
            continue
        L.append(f"| {mname} | {_cell(v, 'lds_mean')} | {_f(v.get('lds_std'))} | {_cell(v, 'recall@1')} | "
                 f"{_cell(v, 'recall@5')} | {_cell(v, 'mrr')} | {_cell(v, 'precompute_s', '.1f')} s | "
                 f"{_size(v['state_bytes'])} | {_f(v['p50_ms'], '.1f')} / {_f(v['p95_ms'], '.1f')} ms | "
                 f"{_f(v['peak_rss_mb'], '.0f')} MiB |")
    L.append("")
    split = [("lds_mean_seen_phrasing", "LDS seen phrasing"), ("lds_mean_heldout_phrasing", "LDS held-out phrasing"),
             ("recall@5_heldout_phrasing", "recall@5 held-out")]
    if any("lds_mean_behaviour" in v for v in info["methods"].values()):
        split += [("lds_mean_facts", "LDS fact queries"), ("lds_mean_behaviour", "LDS behaviour queries")]
    split.append(("lds_mean_tune", "LDS tune split"))
    L.append("LDS by query phrasing (seen / held-out), recall@5 on held-out phrasings"
             + (", LDS of fact and behaviour queries" if len(split) > 4 else "") + " and LDS on the tune split:\n")
    L.append("| method | " + " | ".join(h for _, h in split) + " |")
    L.append("|---|" + "---|" * len(split))
    for mname, v in info["methods"].items():
        if "lds_mean" in v:
            L.append(f"| {mname} | " + " | ".join(_cell(v, k) for k, _ in split) + " |")
    L.append("")
    L.append("Notes on the columns:\n")
    L.append("- *LDS*: per query, Spearman over the retrains between the summed scores of the retrain's subset "
             "and minus the retrained model's query loss; mean over queries (a constant prediction counts "
             "as 0). *recall@k*: share of a fact's supporting documents among the top-k proponents (score > 0), "
             "over min(k, #supporting); *MRR*: reciprocal rank of the first supporting document.")
    L.append("- *precompute*: wall time of what must exist before the first query (STRIDE: `build`; gradient "
             "methods: the n train gradients; TRAK-style: plus projection and kernel inverse; Kronfluence: "
             "`fit_all_factors`). *query*: wall time of one query scored against all n documents, after "
             "warm-up, batch size 1.")
    notes = {}
    for k, v in info["methods"].items():
        if v.get("state_note") and v["status"] != "ablation":
            notes.setdefault(v["state_note"], []).append(k)
    L.append("- *state*: " + "; ".join(f"{', '.join(ks)}: {note}" for note, ks in notes.items()) + ".")
    L.append("- *peak RSS growth*: peak resident set size of the process during the method's precompute and "
             "scoring, minus the level at its start, sampled every 10 ms (— for a reused STRIDE store).")
    for mname, v in info["methods"].items():
        if "latency_parts_p50_ms" in v:
            p, c = v["latency_parts_p50_ms"], v["config"]
            seeds = ", ".join(str(x) for x in v.get("seeds", [v.get("seed")]))
            L.append(f"- {mname}: design seeds {seeds}; K={c['num_subsets']}, r={c['rank']}, d={c['memberships']}, "
                     f"layer {c['layer']}, {c['steps']} steps, stability weight {c['stability_weight']}; query p50 "
                     f"parts (seed {v.get('seed')}) forward {p['forward']:.1f} ms, measure {p['measure']:.1f} ms, "
                     f"solve {p['solve']:.1f} ms; Lasso converged for {v['converged_share']:.0%} of queries, mean "
                     f"{v['mean_nonzeros']:.0f} nonzeros.")
        if v.get("latency_note"):
            L.append(f"- {mname} latency: {v['latency_note']}.")
    cf = info.get("counterfactual")
    if cf:
        L.append(f"- Exact subset counterfactuals: the design of {cf['design_from']} (K={cf['K']}, d={cf['d']}, "
                 f"design seed {cf['design_seed']}); per subset the base model is fine-tuned {cf['steps']} steps "
                 f"({cf['optimizer']}, lr {cf['lr']}, the setting's recipe lr) and every query's loss drop measured; "
                 f"{cf['seconds']:.0f} s of fine-tuning ({cf['reused_subsets']} of {cf['K']} subsets reused from "
                 "the cache); solved with the core's `stride.recovery.solve` at lambda = 0.2 and 0.8 lambda_max.")
    L.append("")
    if info.get("removal"):
        L.extend(removal_section(info["removal"]))
    if info.get("backdoor"):
        L.extend(backdoor_section(info["backdoor"]))
    sc = info.get("scaling")
    if sc:
        L.append("## Scaling with n\n")
        L.append("STRIDE at each n uses the default build's resolved shape with synthetic operators and a real "
                 "random design (forward and measurement on the bench model, then the Lasso solve); the store is "
                 "written by the core's `write_store` and measured on disk without the corpus text. The "
                 "projected-gradient baseline stores n float32 vectors of dimension k; its query is the measured "
                 "query-gradient-plus-projection cost of the bench model plus a dot product against n rows "
                 "(timed; above 10^5 rows as repeated 10^5-row chunks). See `bench/scaling.py`.\n")
        L.append("| n | K | STRIDE query (fwd / measure / solve) | solver iters | STRIDE store | projected-grad "
                 "query | projected-grad store | latency ratio | store ratio |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for a, b in zip(sc["stride"], sc["projected_gradients"], strict=True):
            p = a["parts_ms"]
            L.append(f"| {a['n']:,} | {a['K']} | {a['latency_ms']:.1f} ms ({p['forward']:.1f} / {p['measure']:.1f} / "
                     f"{p['solve']:.1f}) | {a['solver_iterations']} | {_size(a['store_bytes'])} | "
                     f"{b['latency_ms']:.1f} ms | {_size(b['store_bytes'])} | "
                     f"{b['latency_ms'] / a['latency_ms']:.2f}x | {b['store_bytes'] / a['store_bytes']:.1f}x |")
        L.append("")
        L.append("Ratios are baseline / STRIDE (above 1: STRIDE is cheaper). STRIDE store files at the largest n: "
                 + ", ".join(f"{k} {_size(v)}" for k, v in sc["stride"][-1]["store_files"].items()) + ".\n")
        if sc.get("solver"):
            L.extend(solver_section(sc["solver"]))
    L.extend(targets(info))
    if sc:
        L.extend(query_targets(sc))
    L.extend(commands(info))
    if made:
        L.append("## Plots\n")
        L.extend(f"![{p}]({p})" for p in made)
        L.append("")
    L.append("## Stage wall times\n")
    L.extend(f"- {k}: {v:.1f} s" for k, v in info["stages_s"].items())
    L.append("")
    L.append(NOTES)
    (out / "REPORT.md").write_text("\n".join(L) + "\n")
