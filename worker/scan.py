"""``stride scan``: attribute every query of a file and rank the training examples over all of them.

Writes DIR/examples.jsonl (every example, most positive aggregate first), DIR/queries.jsonl (each
query's top proponents) and DIR/report.html (self-contained); with ``--contamination`` also
DIR/contamination.jsonl (each query checked as a benchmark item, ``stride.ngrams.check_item``).
Resumable: after each chunk the accumulator's state is written atomically in one file together with
the number of queries done and the byte length of queries.jsonl, so a killed scan truncates the
half-written tail and continues from the last whole chunk. (They used to be two files, and a kill
between the two writes resumed a state one chunk ahead of its counter: that chunk counted twice and
the query indices ran past the file.) Memory is O(n * keep + chunk * n), whatever the number of queries.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from stride.ngrams import ItemCheck, check_item, for_store
from stride.result import Query
from stride.scan import ContaminationConfig, ScanAccumulator, ScanConfig, select_indices
from stride.store import write_json_atomic
from worker.progress import Reporter, reporter

STATE = "scan_state.npz"  # accumulator + resume record, replaced atomically after every chunk


class ScanInputError(Exception):
    """A query file that cannot be scanned; the message names the file and line."""


def read_queries(path: Path) -> tuple[list[str], list[Query], str]:
    """Every query validated before anything is written: ids, queries and the file's sha256."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ScanInputError(f"{path}: {e.strerror or e}") from None
    ids, queries = [], []
    for no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScanInputError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ScanInputError(f"{where}: expected a JSON object")
        qid = obj.pop("id", f"q{len(queries)}")
        for extra in ("support", "relation", "object", "heldout_phrasing", "subject", "doc_subject", "contamination"):
            obj.pop(extra, None)  # benchmark metadata rides along in query files: not part of a query
        try:
            queries.append(Query.model_validate(obj))
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "query"
            raise ScanInputError(f"{where}: {loc}: {first['msg']}") from None
        ids.append(str(qid))
    if not queries:
        raise ScanInputError(f"{path}: no queries (the file is empty)")
    return ids, queries, hashlib.sha256(raw).hexdigest()


def scan(attributor, queries_path: str | Path, out: str | Path, cfg: ScanConfig | None = None,
         progress: Reporter | None = None, show_progress: bool = False,
         contamination: ContaminationConfig | None = None) -> dict:
    """Run (or resume) a scan; returns the summary written to DIR/scan.json."""
    cfg = cfg or ScanConfig()
    queries_path, out = Path(queries_path), Path(out)
    ids, queries, digest = read_queries(queries_path)
    check = contamination if contamination is not None and contamination.contamination else None
    if check is not None:
        _check_items(queries_path, ids, queries, check)
    n = attributor.num_examples
    key = {"queries_sha256": digest, "store_version": attributor.store.version, "top_k": cfg.top_k,
           "keep": cfg.queries_per_example}
    out.mkdir(parents=True, exist_ok=True)
    state_path, qpath = out / STATE, out / "queries.jsonl"
    acc, done, qbytes = ScanAccumulator(n, cfg.top_k, cfg.queries_per_example), 0, 0
    saved = _load_state(state_path)
    if saved is not None and saved[1]["key"] == key:
        acc, done, qbytes = saved[0], saved[1]["done"], saved[1]["queries_bytes"]
    with open(qpath, "ab") as f:
        f.truncate(qbytes)  # drop a chunk written after the last saved state
    corpus = attributor.store.corpus
    bar_cm = nullcontext(progress) if progress is not None else reporter("scan", len(queries), done, "queries",
                                                                         show_progress)
    with bar_cm as bar:
        while done < len(queries):
            part = queries[done : done + cfg.chunk]
            w, _, _ = attributor.score_matrix(part, chunk=cfg.chunk, ablation=False)
            acc.add(w)
            lines = []
            for row, qid in zip(w.numpy(), ids[done : done + len(part)], strict=True):
                top = np.argsort(-row, kind="stable")[: cfg.top_k]
                top = top[row[top] > 0]
                lines.append(json.dumps({"id": qid, "proponents": [
                    {"index": int(i), "id": corpus.ids[int(i)], "score": float(row[i])} for i in top]}) + "\n")
            with open(qpath, "ab") as f:
                f.write("".join(lines).encode())
                f.flush()
                os.fsync(f.fileno())
                qbytes = f.tell()
            done += len(part)
            resume = json.dumps({"key": key, "done": done, "queries_bytes": qbytes}).encode()
            buf = io.BytesIO()
            np.savez(buf, **acc.state_dict(), resume=np.frombuffer(resume, dtype=np.uint8))
            tmp = state_path.with_name(f".{STATE}.tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, state_path)  # the one commit point of the chunk
            bar.advance(len(part))
    items = None
    if check is not None:
        items, summary_c = _contamination(attributor.store, ids, queries, qpath, out, check)
    summary = _write_outputs(acc, ids, corpus, out, items)
    summary.update({"queries": len(queries), "examples": n, **key})
    if check is not None:
        summary["contamination"] = summary_c
    write_json_atomic(out / "scan.json", summary)
    return summary


def _load_state(path: Path) -> tuple[ScanAccumulator, dict] | None:
    """The last committed chunk's accumulator and resume record ({key, done, queries_bytes}), or
    None (no state, an unreadable one, or one written before the record lived inside it)."""
    try:
        with np.load(path) as z:
            resume = json.loads(bytes(z["resume"]).decode())
            return ScanAccumulator.from_state(dict(z)), resume
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def resumed(out: str | Path) -> int:
    """Queries an earlier run of the scan into ``out`` committed (0 if none): where a resumed run starts."""
    saved = _load_state(Path(out) / STATE)
    return int(saved[1]["done"]) if saved is not None else 0


def _check_items(path: Path, ids: list[str], queries: list[Query], check: ContaminationConfig) -> None:
    """Before anything is written: contamination needs question/answer items and sane options."""
    if check.ngram < 1:
        raise ScanInputError(f"--ngram must be >= 1, got {check.ngram}")
    if not 0 < check.overlap <= 1:
        raise ScanInputError(f"--overlap must be in (0, 1], got {check.overlap}")
    for qid, q in zip(ids, queries, strict=True):
        if q.prompt is None or q.completion is None:
            raise ScanInputError(f"{path}: query {qid}: --contamination needs a prompt (the question) and a "
                                 "completion (the answer)")


def _contamination(store, ids: list[str], queries: list[Query], queries_jsonl: Path, out: Path,
                   check: ContaminationConfig) -> tuple[list[dict], dict]:
    """Each query checked as a benchmark item against its top proponents (read back from
    queries.jsonl) and the store's n-gram index; writes DIR/contamination.jsonl atomically."""
    index, info = for_store(store, check.ngram)
    corpus = store.corpus

    def texts(rows: list[int]) -> list[str]:
        return [r.text for r in corpus.records(rows)]

    def doc(row: int | None) -> str | None:
        return None if row is None else corpus.ids[row]

    items = []
    with open(queries_jsonl) as f:
        for qid, q, line in zip(ids, queries, f, strict=True):
            props = [p["index"] for p in json.loads(line)["proponents"]]
            c: ItemCheck = check_item(index, q.prompt, q.completion, props, texts, check.overlap)
            items.append({"id": qid, "flagged": c.flagged, "match": doc(c.match), "overlap": c.overlap, "rank": c.rank,
                          "answer_in_proponent": c.answer_in_proponent,
                          "best_proponent_overlap": max(c.proponent_overlaps, default=0.0),
                          "corpus_match": doc(c.corpus_match), "corpus_overlap": c.corpus_overlap,
                          "lexical_only": c.corpus_match is not None and not c.flagged, "grams": c.grams,
                          "item": q.prompt + q.completion})
    tmp = out / ".contamination.jsonl.tmp"
    tmp.write_text("".join(json.dumps({k: v for k, v in it.items() if k != "item"}) + "\n" for it in items))
    os.replace(tmp, out / "contamination.jsonl")
    return items, {"flagged": sum(it["flagged"] for it in items),
                   "lexical_only": sum(it["lexical_only"] for it in items),
                   "ngram": check.ngram, "overlap": check.overlap, "index": info}


def _write_outputs(acc: ScanAccumulator, qids: list[str], corpus, out: Path, items: list[dict] | None = None) -> dict:
    order = acc.ranking()
    tmp = out / ".examples.jsonl.tmp"
    with open(tmp, "w") as f:
        for rank, i in enumerate(order, 1):
            r = acc.row(int(i))
            f.write(json.dumps({"rank": rank, "index": r.index, "id": corpus.ids[r.index], "positive": r.positive,
                                "negative": r.negative, "top_count": r.top_count,
                                "queries": [{"id": qids[q], "score": s} for q, s in r.queries]}) + "\n")
    os.replace(tmp, out / "examples.jsonl")
    report = out / ".report.html.tmp"
    report.write_text(_html(acc, order, qids, corpus, out / "queries.jsonl", items))
    os.replace(report, out / "report.html")
    return {"top": [corpus.ids[int(i)] for i in order[:10]]}


def _histogram_svg(values: np.ndarray, bins: int = 30) -> str:
    """Inline SVG bars of the positive aggregates (log count: most examples sit at zero)."""
    pos = values[values > 0]
    if pos.size == 0:
        return "<p>No example has a positive aggregate score.</p>"
    counts, edges = np.histogram(pos, bins=bins)
    h = np.log1p(counts) / np.log1p(counts.max()) * 100
    bars = "".join(f'<rect x="{i * 10}" y="{100 - v:.1f}" width="9" height="{v:.1f}"><title>'
                   f"{edges[i]:.3g}-{edges[i + 1]:.3g}: {c}</title></rect>"
                   for i, (v, c) in enumerate(zip(h, counts, strict=True)))
    return (f'<svg viewBox="0 0 {bins * 10} 110" width="600" height="220" role="img" '
            f'aria-label="histogram">{bars}<text x="0" y="110" font-size="8">{edges[0]:.3g}</text>'
            f'<text x="{bins * 10 - 40}" y="110" font-size="8">{edges[-1]:.3g}</text></svg>'
            f"<p>{pos.size} of {values.size} examples have a positive aggregate (bar height: log count).</p>")


def _contamination_html(items: list[dict], corpus, rows: int = 200) -> list[str]:
    """The flagged items and those only the n-gram index finds, with the matching document's text."""
    e = html.escape
    flagged = [it for it in items if it["flagged"]]
    lexical = [it for it in items if it["lexical_only"]]
    body = ["<h2>Contamination</h2>",
            f"<p>{len(flagged)} of {len(items)} items flagged: a top-k proponent holds the item (its share of the "
            "item's n-grams at the threshold or above, and the answer's words verbatim). "
            f"{len(lexical)} more are held by some corpus document per the n-gram index, but by none of their "
            "top-k proponents.</p>"]
    for title, part, key, extra in (("Flagged", flagged, "match", "rank"),
                                    ("In the corpus, not among the top proponents", lexical, "corpus_match", None)):
        body.append(f"<h3>{title} ({len(part)})</h3><table><tr><th>item</th><th>question and answer</th>"
                    f"<th>document</th><th>overlap</th>{'<th>rank</th>' if extra else ''}<th>its text</th></tr>")
        shown = part[:rows]
        texts = [r.text for r in corpus.records([corpus.index_of(it[key]) for it in shown])] if shown else []
        for it, text in zip(shown, texts, strict=True):
            share = it["overlap"] if key == "match" else it["corpus_overlap"]
            body.append(f"<tr><td>{e(it['id'])}</td><td>{e(it['item'][:300])}</td><td>{e(it[key])}</td>"
                        f"<td>{share:.2f}</td>{f'<td>{it[extra]}</td>' if extra else ''}<td>{e(text[:300])}</td></tr>")
        if len(part) > rows:
            body.append(f"<tr><td colspan=6>... {len(part) - rows} more in contamination.jsonl</td></tr>")
        body.append("</table>")
    return body


def _html(acc: ScanAccumulator, order: np.ndarray, qids: list[str], corpus, queries_jsonl: Path,
          items: list[dict] | None = None, rows: int = 100) -> str:
    """Self-contained: no script, no external asset; every corpus text escaped."""
    e = html.escape
    top = [int(i) for i in order[:rows]]
    texts = {i: r.text for i, r in zip(top, corpus.records(top), strict=True)}
    body = ["<h1>STRIDE scan</h1>", f"<p>{acc.queries} queries, {acc.n} training examples.</p>",
            "<h2>Aggregate scores</h2>", _histogram_svg(acc.positive),
            f"<h2>Top {len(top)} examples</h2>",
            "<table><tr><th>#</th><th>id</th><th>positive</th><th>negative</th><th>top-k in</th>"
            "<th>text</th></tr>"]
    for rank, i in enumerate(top, 1):
        r = acc.row(i)
        body.append(f"<tr><td>{rank}</td><td>{e(corpus.ids[i])}</td><td>{r.positive:.4g}</td>"
                    f"<td>{r.negative:.4g}</td><td>{r.top_count}</td><td>{e(texts[i][:300])}</td></tr>")
    body.append("</table><h2>Top documents per query</h2><table><tr><th>query</th><th>proponents</th></tr>")
    with open(queries_jsonl) as f:
        for k, line in enumerate(f):
            if k >= 200:
                body.append(f"<tr><td colspan=2>... {acc.queries - 200} more in queries.jsonl</td></tr>")
                break
            q = json.loads(line)
            props = ", ".join(f"{e(p['id'])} ({p['score']:.3g})" for p in q["proponents"][:5])
            body.append(f"<tr><td>{e(q['id'])}</td><td>{props}</td></tr>")
    body.append("</table>")
    if items is not None:
        body += _contamination_html(items, corpus)
    style = ("body{font:14px system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}rect{fill:#4a7}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>STRIDE scan</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def select(attributor, target_path: str | Path, keep: float, out_path: str | Path,
           cfg: ScanConfig | None = None, show_progress: bool = False) -> dict:
    """Keep the ``keep`` share of the corpus with the most net influence on the target queries
    (opponents, net < 0, go first; ties in corpus order) and write their original lines, in corpus
    order, to ``out_path`` (atomically)."""
    if not 0 < keep <= 1:
        raise ScanInputError(f"--keep must be in (0, 1], got {keep}")
    cfg = cfg or ScanConfig()
    _, queries, _ = read_queries(Path(target_path))
    n = attributor.num_examples
    acc = ScanAccumulator(n, cfg.top_k, 1)
    with reporter("select", len(queries), 0, "queries", show_progress) as bar:
        for s in range(0, len(queries), cfg.chunk):
            part = queries[s : s + cfg.chunk]
            acc.add(attributor.score_matrix(part, chunk=cfg.chunk, ablation=False)[0])
            bar.advance(len(part))
    kept, net = select_indices(acc, keep), acc.positive + acc.negative
    corpus, out_path = attributor.store.corpus, Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(corpus.path, "rb") as src, open(tmp, "wb") as dst:
        for i in kept:
            src.seek(int(corpus.offsets[i]))
            line = src.read(int(corpus.lengths[i]))
            dst.write(line if line.endswith(b"\n") else line + b"\n")
    os.replace(tmp, out_path)
    return {"kept": int(kept.size), "examples": n, "target_queries": len(queries),
            "opponents_dropped": int(min((net < 0).sum(), n - kept.size)),
            "kept_with_positive_influence": int((net[kept] > 0).sum())}
