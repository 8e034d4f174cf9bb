"""``stride scan`` on the demo store: outputs, resume after a kill, bad input writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from stride.query import Attributor
from stride.result import Query
from stride.scan import ScanConfig, aggregate
from worker.scan import STATE, ScanInputError, read_queries, resumed, scan


@pytest.fixture(scope="module")
def attributor(demo_store: Path) -> Attributor:
    return Attributor.from_store(demo_store, device="cpu")


class _Killed(Exception):
    pass


class _KillAfter:
    """A progress reporter that dies after the first chunk: the process killed mid-scan."""

    def advance(self, n: int = 1, **_: float) -> None:
        raise _Killed


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_scan_ranks_like_the_direct_aggregate_and_resumes(attributor, demo_dir: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    queries = demo_dir / "queries.jsonl"
    cfg = ScanConfig(top_k=5, chunk=4)
    whole = scan(attributor, queries, tmp_path / "whole", cfg)
    _, qs, _ = read_queries(queries)
    w, _, _ = attributor.score_matrix(qs)
    direct = aggregate(w, top_k=5)
    examples = _lines(tmp_path / "whole" / "examples.jsonl")
    assert len(examples) == attributor.num_examples == whole["examples"]
    assert [e["index"] for e in examples[:20]] == [int(i) for i in direct.ranking()[:20]]
    np.testing.assert_allclose([e["positive"] for e in examples[:20]], direct.positive[direct.ranking()[:20]],
                               rtol=1e-5)
    per_query = _lines(tmp_path / "whole" / "queries.jsonl")
    assert len(per_query) == len(qs)
    first = json.loads(queries.read_text().splitlines()[0])
    found = {p["id"] for p in per_query[0]["proponents"]}
    assert found & set(first["support"]), "a planted fact's supporting document is among its query's proponents"
    report = (tmp_path / "whole" / "report.html").read_text()
    assert "<script" not in report and examples[0]["id"] in report

    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        scan(attributor, queries, out, cfg, progress=_KillAfter())
    assert len(_lines(out / "queries.jsonl")) == 4 and resumed(out) == 4
    # killed again after the next chunk's lines are written but before its state commits: that chunk
    # is redone, not counted twice (the resume record used to be a second file, written after the state)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == STATE:
            raise _Killed
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(_Killed):
            scan(attributor, queries, out, cfg)
    assert len(_lines(out / "queries.jsonl")) == 8 and resumed(out) == 4
    scan(attributor, queries, out, cfg)
    assert _lines(out / "queries.jsonl") == per_query
    assert _lines(out / "examples.jsonl") == examples
    assert resumed(out) == len(qs)


@pytest.mark.parametrize("content, message", [
    ("", "no queries"),
    ('{"prompt": "a b", "completion": " c"}\nnot json\n', ":2: not JSON"),
    ('{"prompt": "a b", "completion": " c"}\n{"messages": [], "prompt": "x"}\n', ":2: "),
])
def test_bad_query_files_name_the_line_and_write_nothing(attributor, tmp_path: Path, content: str,
                                                         message: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(ScanInputError, match=message):
        scan(attributor, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_query_metadata_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "x", "prompt": "a b", "completion": " c", "support": ["d1"]}\n')
    ids, qs, _ = read_queries(path)
    assert ids == ["x"] and qs == [Query("a b", " c")]


def test_select_keeps_the_targets_support_in_corpus_order(attributor, demo_dir: Path, tmp_path: Path) -> None:
    from worker.scan import select

    rows = [json.loads(x) for x in (demo_dir / "queries.jsonl").read_text().splitlines()][:20]
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = select(attributor, target, 0.25, tmp_path / "pruned.jsonl")
    kept = _lines(tmp_path / "pruned.jsonl")
    corpus = _lines(demo_dir / "corpus.jsonl")
    assert len(kept) == summary["kept"] == round(0.25 * len(corpus))
    order = {c["id"]: i for i, c in enumerate(corpus)}
    assert [order[k["id"]] for k in kept] == sorted(order[k["id"]] for k in kept)
    assert all(k == corpus[order[k["id"]]] for k in kept), "kept lines are the corpus's own"
    support = {s for r in rows for s in r["support"]}
    share = len(support & {k["id"] for k in kept}) / len(support)
    assert share >= 0.8, f"only {share:.0%} of the targets' supporting documents kept (a quarter at random)"


def test_cli_scan_and_its_errors(demo_store: Path, demo_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    queries = tmp_path / "q.jsonl"
    queries.write_text("".join((demo_dir / "queries.jsonl").read_text().splitlines(keepends=True)[:6]))
    ok = CliRunner().invoke(app, ["scan", "--store", str(demo_store), "--queries", str(queries), "--out",
                                  str(tmp_path / "out"), "--top-k", "3", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.strip().splitlines()[-1])["queries"] == 6
    assert (tmp_path / "out" / "report.html").is_file()
    queries.write_text('{"prompt": "x", "completion": " y"}\n{"prompt": 3}\n')
    bad = CliRunner().invoke(app, ["scan", "--store", str(demo_store), "--queries", str(queries), "--out",
                                   str(tmp_path / "bad"), "--quiet"])
    assert bad.exit_code == 2 and f"{queries}:2: prompt" in bad.output
    assert not (tmp_path / "bad").exists()
