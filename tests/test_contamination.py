"""Contamination: the n-gram index against brute force, its reuse beside a store, the flag rule,
``stride scan --contamination`` end to end on the demo store, and the benchmark's generator."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from stride.corpus import Corpus, file_sha256
from stride.ngrams import NgramIndex, check_item, for_store, gram_hashes, index_path


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def brute_shares(text: str, docs: list[str], n: int) -> dict[int, float]:
    """Share of the text's distinct n-grams (tuples of words) in each document; a text shorter than
    n words is one gram, held by a document whose words contain it consecutively."""
    q = _words(text)
    if not q:
        return {}
    if len(q) < n:
        return {i: 1.0 for i, d in enumerate(docs) if f" {' '.join(q)} " in f" {' '.join(_words(d))} "}
    grams = {tuple(q[j : j + n]) for j in range(len(q) - n + 1)}
    out = {}
    for i, d in enumerate(docs):
        w = _words(d)
        held = grams & {tuple(w[j : j + n]) for j in range(len(w) - n + 1)}
        if held:
            out[i] = len(held) / len(grams)
    return out


def _random_text(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    out = []
    for _ in range(rng.randint(lo, hi)):
        w = rng.choice(vocab)
        out.append(w.upper() if rng.random() < 0.1 else w)
        if rng.random() < 0.2:
            out.append(rng.choice([",", ".", "?", ":"]))
    return " ".join(out)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_index_overlaps_match_brute_force(n: int) -> None:
    rng = random.Random(n)
    vocab = ["alpha", "beta", "gamma", "delta", "x1", "y_2"]  # few words: grams repeat across documents
    docs = [_random_text(rng, vocab, 0, 25) for _ in range(120)]
    index = NgramIndex.build(docs, n)
    assert index.num_examples == len(docs)

    def texts(rows: list[int]) -> list[str]:
        return [docs[r] for r in rows]

    queries = [_random_text(rng, vocab, 1, 14) for _ in range(80)]
    for d in docs[:40]:  # pieces of documents: guaranteed hits, some shorter than n
        w = d.split()
        a = rng.randint(0, max(0, len(w) - 1))
        queries.append(" ".join(w[a : a + rng.randint(1, 12)]))
    hits = 0
    for q in queries:
        rows, shares, grams = index.overlaps(q, texts)
        got = dict(zip(rows.tolist(), shares.tolist(), strict=True))
        want = brute_shares(q, docs, n)
        assert got.keys() == want.keys(), q
        assert all(abs(got[k] - want[k]) < 1e-12 for k in want), q
        assert list(shares) == sorted(shares, reverse=True)
        qw = _words(q)
        distinct = len({tuple(qw[j : j + n]) for j in range(len(qw) - n + 1)})
        assert grams == (0 if not qw else 1 if len(qw) < n else distinct)
        hits += bool(want)
    assert hits >= 40, "the pieces of documents are found"


def test_gram_hashes_are_the_same_in_another_process() -> None:
    """Never Python's salted hash: an index written by one process is read by another."""
    text = "Question : which city is the capital of Logallo ? Answer : Brira"
    code = ("import sys; from stride.ngrams import gram_hashes; "
            "sys.stdout.write(','.join(str(int(h)) for h in gram_hashes(sys.argv[1], 3)))")
    outs = {subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {",".join(str(int(h)) for h in gram_hashes(text, 3))}
    assert gram_hashes("The CAPITAL, of  Vormo!", 2).tolist() == gram_hashes("the capital of vormo", 2).tolist()


def _store(tmp_path: Path, lines: list[str]) -> SimpleNamespace:
    """What ``for_store`` reads of a store: its path, its manifest's corpus sha256, its corpus."""
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    corpus = store / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(lines)))
    return SimpleNamespace(path=store, manifest={"corpus": {"sha256": file_sha256(corpus)}},
                           corpus=Corpus.scan(corpus))


def test_index_is_built_beside_the_store_reused_and_rebuilt_when_the_corpus_changes(tmp_path: Path) -> None:
    docs = ["one two three four five six seven eight nine", "ten eleven twelve", "one two three"]
    store = _store(tmp_path, docs)
    index, info = for_store(store, n=4)
    assert info["built"] and Path(info["path"]) == index_path(store.path, 4) == tmp_path / "store.ngrams-4.npz"
    assert sorted(p.name for p in store.path.iterdir()) == ["corpus.jsonl"], "nothing written inside the store"
    again, info2 = for_store(store, n=4)
    assert not info2["built"]
    for name in ("hashes", "examples", "word_hashes", "word_examples"):
        np.testing.assert_array_equal(getattr(again, name), getattr(index, name))
    assert for_store(store, n=3)[1]["built"], "another n is another index"

    changed = _store(tmp_path, docs + ["thirteen fourteen fifteen sixteen"])
    rebuilt, info3 = for_store(changed, n=4)
    assert info3["built"] and rebuilt.num_examples == 4
    assert rebuilt.corpus_sha256 == changed.manifest["corpus"]["sha256"] != index.corpus_sha256
    assert rebuilt.overlaps("thirteen fourteen fifteen sixteen")[0].tolist() == [3]

    Path(info3["path"]).write_bytes(b"not an index")
    assert for_store(changed, n=4)[1]["built"], "a damaged index is rebuilt"


def test_flag_rule_on_a_handmade_corpus() -> None:
    docs = ["Question : who founded Lisul ? Answer : Raneksha",  # the item itself
            "Raneksha founded the city of Lisul .",  # the fact, in other words
            "Quiz . QUESTION - who founded Lisul ? ANSWER = Raneksha ! and a few more words after it",  # nearly
            "Question : who founded Lisul ? Answer : Bridun",  # the question, another answer
            "which city is the capital of Logallo ? Answer : Brira",  # 2 of the long item's 3 8-grams
            "Question : which city is the capital of Logallo ? The answer is surely Brira"]  # 1 of 3
    index = NgramIndex.build(docs, 8)

    def texts(rows: list[int]) -> list[str]:
        return [docs[r] for r in rows]

    short = ("Question : who founded Lisul ? Answer :", " Raneksha")
    c = check_item(index, *short, [1, 2, 0], texts)
    assert (c.flagged, c.match, c.rank, c.overlap, c.answer_in_proponent) == (True, 2, 2, 1.0, True)
    assert c.proponent_overlaps == [0.0, 1.0, 1.0] and c.corpus_match == 0
    c = check_item(index, *short, [1, 3], texts)
    assert not c.flagged and c.answer_in_proponent and c.corpus_match == 0, "in the corpus, not in the proponents"
    c = check_item(index, *short, [3], texts)
    assert not c.flagged and not c.answer_in_proponent and c.proponent_overlaps == [0.0]

    long = ("Question : which city is the capital of Logallo ? Answer :", " Brira")
    c = check_item(index, *long, [5, 4], texts)
    assert c.grams == 3 and c.flagged and (c.match, c.rank) == (4, 2) and abs(c.overlap - 2 / 3) < 1e-12
    c = check_item(index, *long, [5], texts)
    assert not c.flagged and c.answer_in_proponent and c.corpus_match == 4
    assert check_item(index, *long, [5], texts, threshold=0.3).flagged
    wrong = check_item(index, long[0], " Vormo", [4, 5], texts)
    assert not wrong.flagged and wrong.corpus_match is None, "the answer must be there verbatim"


def test_cli_scan_contamination_on_the_demo_store(demo_store: Path, demo_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    rows = [json.loads(x) for x in (demo_dir / "queries.jsonl").read_text().splitlines()[:12]]
    queries = tmp_path / "items.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["scan", "--store", str(demo_store), "--queries", str(queries), "--out", str(out),
                                  "--top-k", "5", "--contamination", "--quiet"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])["contamination"]
    assert Path(summary["index"]["path"]) == index_path(demo_store)
    got = [json.loads(x) for x in (out / "contamination.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]

    corpus = [json.loads(x) for x in (demo_dir / "corpus.jsonl").read_text().splitlines()]
    ids = [c["id"] for c in corpus]
    docs = [c.get("text") or c["prompt"] + c["completion"] for c in corpus]
    props = [[p["id"] for p in json.loads(x)["proponents"]] for x in (out / "queries.jsonl").read_text().splitlines()]
    for r, g, top in zip(rows, got, props, strict=True):  # the rule, by brute force over the same proponents
        item = r["prompt"] + r["completion"]
        shares = brute_shares(item, docs, 8)
        holds = [i for i, s in shares.items() if s >= 0.5 and f" {' '.join(_words(r['completion']))} "
                 in f" {' '.join(_words(docs[i]))} "]
        held_ids = {ids[i] for i in holds}
        first = next((k for k, d in enumerate(top) if d in held_ids), None)
        assert g["flagged"] == (first is not None), r["id"]
        assert g["match"] == (None if first is None else top[first]) and g["rank"] == (None if first is None
                                                                                         else first + 1)
        assert g["lexical_only"] == (bool(holds) and first is None)
    assert sum(g["flagged"] for g in got) == summary["flagged"] >= 1, "demo queries restate planted documents"
    report = (out / "report.html").read_text()
    assert "<h2>Contamination</h2>" in report and "<script" not in report

    again = CliRunner().invoke(app, ["scan", "--store", str(demo_store), "--queries", str(queries), "--out",
                                     str(tmp_path / "again"), "--top-k", "5", "--contamination", "--quiet"])
    assert again.exit_code == 0 and not json.loads(again.stdout.strip().splitlines()[-1])["contamination"]["index"][
        "built"], "the index is reused"

    queries.write_text('{"prompt": "a b", "completion": " c"}\n{"id": "chat", "messages": [{"role": "user", '
                       '"content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    bad = CliRunner().invoke(app, ["scan", "--store", str(demo_store), "--queries", str(queries), "--out",
                                   str(tmp_path / "bad"), "--contamination", "--quiet"])
    assert bad.exit_code == 2 and "query chat: --contamination needs a prompt" in bad.output
    assert not (tmp_path / "bad").exists()


def test_contamination_setting_plants_its_items_and_leaves_other_settings_keys() -> None:
    from bench.setting import SETTINGS, doc_text, generate

    assert {k: SETTINGS[k][0].key() for k in ("reference", "alias", "instruct")} == {
        "reference": "9ff3abcc82f78614", "alias": "95b371498bab5fa6", "instruct": "55157871bbde0e02"}
    s = SETTINGS["contamination"][1]
    _, docs, queries = generate(s)
    assert generate(s)[1] == docs
    texts = [doc_text(d) for d in docs]
    items = [q for q in queries if "contamination" in q]
    assert [sum(q["contamination"] == g for q in items) for g in ("verbatim", "paraphrase", "absent")] == [15] * 3
    for q in items:
        assert q["prompt"].startswith("Question : ")
        held = brute_shares(q["prompt"] + q["completion"], texts, 8)
        assert bool(held) == (q["contamination"] == "verbatim"), q["id"]
        facts = [t for t in texts if q["subject"] in t.split()]
        assert bool(facts) == (q["contamination"] != "absent")
