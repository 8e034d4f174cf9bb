"""The attribution methods compared, all scoring the same model on the same queries.

Each returns a ``Result``: the full score matrix (Q, n) (positive = proponent), its precompute wall
time, the size of the state it keeps, per-query latencies after warm-up and the peak RSS growth.
STRIDE is used through the core (``worker.build.build`` and ``Attributor.score_matrix``);
Kronfluence through its published Task/Analyzer API.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.measure import PeakRSS, dir_bytes, percentiles, time_calls
from bench.setting import doc_record, doc_text
from stride.config import REFERENCE_MODES, BuildConfig, ConfigError, Query
from stride.corpus import Record, file_sha256
from stride.model import LM


@dataclass
class Result:
    name: str
    scores: torch.Tensor | None = None  # (Q, n)
    precompute_s: float = float("nan")
    state_bytes: int = 0
    state_note: str = ""
    latency_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)
    group: str | None = None  # rows of one method over several design seeds share a group (the table's row)

    def summary(self) -> dict:
        pre = None if math.isnan(self.precompute_s) else self.precompute_s
        return {"precompute_s": pre, "state_bytes": self.state_bytes, "state_note": self.state_note,
                "peak_rss_mb": self.peak_mb, "status": self.status, **percentiles(self.latency_ms), **self.extra}


def records(queries: list[dict]) -> list[Record]:
    return [Record(q["id"], q["prompt"], q["completion"]) for q in queries]


# ---------------------------------------------------------------- STRIDE

MODE_ROWS = {  # fit mode -> row name (DEFAULT_MODE below is what `stride build` picks)
    "revert": "STRIDE revert (reference = base)",
    "add": "STRIDE add (reference = base)",
    "forget": "STRIDE forget (no reference)",
    "fidelity": "STRIDE fidelity (no reference)",
    "finetune": "STRIDE finetune",
}
DEFAULT_MODE = BuildConfig().resolve(1000, 2, has_reference=True).fit  # what `stride build` does by default


# the sources that decide what a build writes; the query side (measure, recovery, query, store reading)
# does not, and stores of older formats keep loading (tests/test_store.py)
BUILD_SOURCES = ("stride/config.py", "stride/corpus.py", "stride/design.py", "stride/fit.py", "stride/model.py",
                 "stride/operators.py", "worker/build.py")


def code_mtime() -> float:
    """Newest modification time of the build's sources: a store older than this is stale."""
    root = Path(__file__).resolve().parent.parent
    return max((root / p).stat().st_mtime for p in BUILD_SOURCES)


def build_or_reuse(mode: str, seed: int, built, work: Path, overrides: dict | None,
                   rebuild: bool, tag: str = "") -> tuple[Path, float, bool]:
    """Build the store of (mode, seed), or reuse one built with the same resolved settings, on the same
    corpus, after the last change to the core's code (so an interrupted benchmark resumes cheaply).

    Returns (store, build seconds, reused). A reused store's seconds come from its manifest. ``tag``
    names a variant of the mode's store (``bench.variants``), kept beside the default one.
    """
    from stride.store import StoreError, read_manifest
    from worker.build import build

    out = work / f"store-{mode}{'-' + tag if tag else ''}-s{seed}"
    cfg = BuildConfig(fit=mode, seed=seed, **(overrides or {}))
    # only revert and add see the base; forget and fidelity are the no-reference modes
    ref = {"reference_model": built.base_dir} if mode in REFERENCE_MODES else {}
    if not rebuild and (out / "manifest.json").is_file():
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(built.model_dir).num_hidden_layers
        resolved = cfg.resolve(len(built.docs), layers, **({"has_reference": True} if ref else {}))
        try:
            man = read_manifest(out)
            # a manifest written before a config field existed holds that field's default
            same = BuildConfig.from_dict(man["config"]).to_dict() == resolved.to_dict()
        except (StoreError, ConfigError):
            man, same = None, False
        if same and (out / "manifest.json").stat().st_mtime > code_mtime() \
                and man.get("corpus", {}).get("sha256") == file_sha256(built.corpus):
            return out, float(man.get("build", {}).get("seconds", float("nan"))), True
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    build(built.model_dir, built.corpus, out, cfg, show_progress=False, **ref)
    return out, time.perf_counter() - t, False


def run_stride(mode: str, seed: int, built, work: Path, queries: list[dict], timed: list[dict],
               build_overrides: dict | None = None, ablation: bool = False, rebuild: bool = False) -> list[Result]:
    """One STRIDE row for one design seed (plus the M^T y ablation when asked), built through the core."""
    from stride.query import Attributor

    name = MODE_ROWS[mode]
    with PeakRSS() as mem:
        out, pre, reused = build_or_reuse(mode, seed, built, work, build_overrides, rebuild)
        attr = Attributor.from_store(out)
        w, raw, diag = attr.score_matrix([Query(q["prompt"], q["completion"]) for q in queries])
        lat = time_calls(lambda q: attr.attribute_batch([Query(q["prompt"], q["completion"])], 10, False), timed)
    parts = {k: [] for k in ("forward", "measure", "solve")}
    for q in timed[:10]:
        a = attr.attribute_batch([Query(q["prompt"], q["completion"])], 10, False)[0]
        for k in parts:
            parts[k].append(a.timing_ms[k])
    extra = {**diag, "seed": seed, "config": attr.store.config.to_dict(), "store": str(out), "store_reused": reused,
             "latency_parts_p50_ms": {k: float(np.median(v)) for k, v in parts.items()},
             "store_bytes_total": dir_bytes(out)}
    main = Result(name, w, pre, dir_bytes(out, exclude=("corpus.jsonl",)),
                  "store directory without its copy of the corpus text", lat, None if reused else mem.delta_mb,
                  extra=extra, group=name)
    if not ablation:
        return [main]
    abl = f"{name}: M^T y, no sparse solve (ablation)"
    return [main, Result(abl, raw, pre, main.state_bytes, main.state_note, status="ablation", extra={"seed": seed},
                         group=abl)]


# ---------------------------------------------------------------- gradients


def linear_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


class Grads:
    """Per-example gradients of every nn.Linear weight (the modules Kronfluence tracks)."""

    def __init__(self, model, tok):
        self.model = model.eval()
        self.lm = LM(model, tok, torch.device("cpu"))
        self.params = linear_weights(model)
        self.dim = sum(p.numel() for p in self.params)

    def one(self, rec: Record) -> torch.Tensor:
        b = self.lm.encode([rec])
        for p in self.params:
            p.requires_grad_(True)
        logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        loss = F.cross_entropy(logits.transpose(1, 2), b.targets, ignore_index=-100)
        g = torch.autograd.grad(loss, self.params)
        for p in self.params:
            p.requires_grad_(False)
        return torch.cat([x.reshape(-1) for x in g])

    def many(self, recs: list[Record]) -> torch.Tensor:
        out = torch.empty(len(recs), self.dim)
        for i, r in enumerate(recs):
            out[i] = self.one(r)
        return out


def run_gradient_methods(model, tok, docs: list[dict], queries: list[dict], timed: list[dict],
                         proj_dim: int, seed: int) -> list[Result]:
    """Gradient dot product, gradient cosine (TracIn at the final checkpoint), TRAK-style projection."""
    g = Grads(model, tok)
    train_recs = [doc_record(d) for d in docs]
    with PeakRSS() as mem:
        t = time.perf_counter()
        G = g.many(train_recs)  # (n, P)
        t_grads = time.perf_counter() - t
        Gq = g.many(records(queries))
        norms = G.norm(dim=1).clamp_min(1e-12)
        dot = Gq @ G.T
        cos = (Gq / Gq.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (G / norms[:, None]).T
        lat_dot = time_calls(lambda q, G=G: g.one(records([q])[0]) @ G.T, timed)
        Gn = G / norms[:, None]

        def cos_one(q: dict, Gn: torch.Tensor = Gn) -> torch.Tensor:
            v = g.one(records([q])[0])
            return (v / v.norm().clamp_min(1e-12)) @ Gn.T

        lat_cos = time_calls(cos_one, timed)
        Gn = None
    peak_dot = mem.delta_mb
    n, P = G.shape
    # TRAK-style: Gaussian random projection to proj_dim, then phi_q (Phi^T Phi + ridge I)^-1 Phi^T
    with PeakRSS() as mem:
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        R = torch.randn(P, proj_dim, generator=gen) / math.sqrt(proj_dim)
        Phi = G @ R
        kern = Phi.T @ Phi
        ridge = 1e-3 * float(kern.diagonal().mean())
        kinv = torch.linalg.inv(kern + ridge * torch.eye(proj_dim))
        Xt = (Phi @ kinv).T.contiguous()  # (k, n): the state a query is scored against
        t_trak = time.perf_counter() - t + t_grads
        trak = (Gq @ R) @ Xt
        lat_trak = time_calls(lambda q: (g.one(records([q])[0]) @ R) @ Xt, timed)
    G = None
    note_g = f"n x P float32 train gradients, P={P} (nn.Linear weights); held in memory, size computed"
    return [
        Result("Gradient dot product (TracIn, final ckpt)", dot, t_grads, n * P * 4, note_g, lat_dot, peak_dot),
        Result("Gradient cosine", cos, t_grads, n * P * 4 + n * 4, note_g, lat_cos, peak_dot),
        Result(f"TRAK-style projected gradients (k={proj_dim})", trak, t_trak, n * proj_dim * 4,
               f"n x k float32 projected train features (+ the P x k projection, {P * proj_dim * 4} B, "
               "regenerable from a seed)", lat_trak, mem.delta_mb, extra={"proj_dim": proj_dim, "ridge": ridge}),
    ]


# ---------------------------------------------------------------- representation similarity, BM25


def run_repsim(model, tok, docs: list[dict], queries: list[dict], timed: list[dict]) -> Result:
    lm = LM(model, tok, torch.device("cpu"))

    def embed(recs: list[Record]) -> torch.Tensor:
        out = []
        for s in range(0, len(recs), 128):
            b = lm.encode(recs[s : s + 128])
            _, z = lm.features(b, lm.num_layers - 1)
            m = b.attention_mask[..., None].float()
            out.append(F.normalize((z * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    with PeakRSS() as mem:
        t = time.perf_counter()
        E = embed([Record(d["id"], "", doc_text(d)) for d in docs])
        pre = time.perf_counter() - t
        S = embed([Record(q["id"], "", q["prompt"] + q["completion"]) for q in queries]) @ E.T
        lat = time_calls(lambda q: embed([Record("q", "", q["prompt"] + q["completion"])]) @ E.T, timed)
    return Result("Representation similarity (final hidden, cosine)", S, pre, E.numel() * 4,
                  "n x d float32 mean-pooled final hidden states", lat, mem.delta_mb)


def _words(text: str) -> list[str]:
    return text.lower().split()


def run_bm25(docs: list[dict], queries: list[dict], timed: list[dict], k1: float = 1.5, b: float = 0.75) -> Result:
    with PeakRSS() as mem:
        t = time.perf_counter()
        toks = [Counter(_words(doc_text(d))) for d in docs]
        lens = np.array([sum(c.values()) for c in toks], dtype=np.float64)
        avg = lens.mean()
        df = Counter(w for c in toks for w in c)
        N = len(docs)
        idf = {w: math.log(1 + (N - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        postings: dict[str, list[tuple[int, float]]] = {}
        for i, c in enumerate(toks):
            for w, tf in c.items():
                postings.setdefault(w, []).append((i, tf * (k1 + 1) / (tf + k1 * (1 - b + b * lens[i] / avg))))
        index = {w: (np.array([i for i, _ in p]), np.array([v for _, v in p])) for w, p in postings.items()}
        pre = time.perf_counter() - t

        def score(q: dict) -> np.ndarray:
            s = np.zeros(N)
            for w in set(_words(q["prompt"] + q["completion"])):
                if w in index:
                    ids, vals = index[w]
                    s[ids] += idf[w] * vals
            return s

        S = torch.from_numpy(np.stack([score(q) for q in queries])).float()
        lat = time_calls(score, timed)
    state = sum(ids.nbytes + vals.nbytes for ids, vals in index.values())
    return Result("BM25", S, pre, state, "inverted index (int64 ids + float64 weights)", lat, mem.delta_mb)


def run_forward_floor(model, tok, timed: list[dict]) -> Result:
    lm = LM(model, tok, torch.device("cpu"))

    def fwd(q: dict) -> None:
        b = lm.encode(records([q]))
        with torch.no_grad():
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    return Result("Floor: bare forward pass", None, 0.0, 0, "", time_calls(fwd, timed), status="floor")


# ---------------------------------------------------------------- Kronfluence (EK-FAC), as published


def run_kronfluence(model_dir: Path, docs: list[dict], queries: list[dict], timed: list[dict], work: Path,
                    latency_queries: int) -> Result:
    name = "Kronfluence EK-FAC"
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task
    except ImportError:
        return Result(name, status="skipped: kronfluence is not installed (pip install -e '.[bench]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for lg in ("kronfluence", "accelerate"):
        logging.getLogger(lg).setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lm = LM(model, tok, torch.device("cpu"))

    def dataset(recs: list[Record]) -> list[dict]:
        b = lm.encode(recs)
        return [{"input_ids": b.input_ids[i], "attention_mask": b.attention_mask[i], "labels": b.targets[i]}
                for i in range(len(recs))]

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits.float()
            logits = logits.reshape(-1, logits.size(-1))
            labels = batch["labels"].reshape(-1)
            if sample:  # true Fisher: labels sampled from the model
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                labels = drawn.masked_fill(labels == -100, -100)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits.float()
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1),
                                   ignore_index=-100, reduction="sum")

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    train_ds = dataset([doc_record(d) for d in docs])
    query_ds = dataset(records(queries))
    out = work / "kronfluence"
    shutil.rmtree(out, ignore_errors=True)
    with PeakRSS() as mem:
        task = LMTask()
        model = prepare_model(model, task)
        an = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=str(out))
        t = time.perf_counter()
        an.fit_all_factors("ekfac", dataset=train_ds, per_device_batch_size=64,
                           factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        pre = time.perf_counter() - t
        an.compute_pairwise_scores("all", factors_name="ekfac", query_dataset=query_ds, train_dataset=train_ds,
                                   per_device_query_batch_size=32, per_device_train_batch_size=64,
                                   overwrite_output_dir=True)
        S = an.load_pairwise_scores("all")["all_modules"].float()
        idx = {q["id"]: i for i, q in enumerate(queries)}

        def one(q: dict) -> None:
            an.compute_pairwise_scores(f"one-{q['id']}", factors_name="ekfac", query_dataset=query_ds,
                                       train_dataset=train_ds, per_device_query_batch_size=1,
                                       per_device_train_batch_size=64, query_indices=[idx[q["id"]]],
                                       overwrite_output_dir=True)

        lat = time_calls(one, timed[:latency_queries], warmup=1)
    factors = next(out.rglob("factors_ekfac"), None)
    state = dir_bytes(factors) if factors else 0
    return Result(name, S, pre, state, "EK-FAC factors directory (eigenbases + eigenvalue corrections)", lat,
                  mem.delta_mb, extra={"latency_note": "one query against all n, train gradients recomputed "
                                                       "(Kronfluence's pairwise-score API)"})


# ---------------------------------------------------------------- reference rows (not methods)


def reference_rows(docs: list[dict], queries: list[dict], support: list[list[int]], bm25: torch.Tensor | None,
                   keep: float = 0.7) -> list[Result]:
    """What a reader needs to tell lexical from causal: the planted support, the documents sharing the
    query's relation and answer, and BM25 cut at ``keep`` x the query's best score."""
    Q, n = len(queries), len(docs)
    oracle = torch.zeros(Q, n)
    for q, sup in enumerate(support):
        oracle[q, sup] = 1.0
    pairs = [(d.get("relation"), d.get("object")) for d in docs]
    same = torch.tensor([[float(p == (q["relation"], q.get("object", q["completion"].strip())) and p[0] is not None)
                          for p in pairs] for q in queries])
    rows = [Result("Reference: planted-support indicator (oracle, not a method)", oracle, status="reference"),
            Result("Reference: same relation and answer indicator", same, status="reference")]
    if bm25 is not None:
        cut = bm25 * (bm25 >= keep * bm25.amax(1, keepdim=True)) * (bm25 > 0)
        rows.append(Result(f"Reference: BM25 thresholded at {keep} x the query's max (lexical)", cut,
                           status="reference"))
    return rows
