"""Corpus validation: every bad line names its file and line; the CLI refuses it cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import write_corpus, write_model

from stride.corpus import Corpus, CorpusError, Record
from stride.model import LM

GOOD = [json.dumps({"id": "a", "text": "the old farmer ."}), json.dumps({"id": "b", "text": "a green boat ."})]

BAD_LINES = {
    "invalid json": '{"id": "x", "text": "unterminated',
    "not an object": json.dumps(["the", "old", "farmer"]),
    "a bare string": json.dumps("the old farmer"),
    "missing text": json.dumps({"id": "x"}),
    "empty text": json.dumps({"id": "x", "text": ""}),
    "whitespace text": json.dumps({"id": "x", "text": "   "}),
    "non-string text": json.dumps({"id": "x", "text": 3}),
    "prompt without completion": json.dumps({"id": "x", "prompt": "the old"}),
    "completion without prompt": json.dumps({"id": "x", "completion": " farmer"}),
    "empty completion": json.dumps({"id": "x", "prompt": "the old", "completion": ""}),
    "text and prompt": json.dumps({"id": "x", "text": "the old farmer", "prompt": "the", "completion": " old"}),
    "duplicate id": json.dumps({"id": "a", "text": "again ."}),
    "integer id": json.dumps({"id": 7, "text": "the old farmer ."}),
    "null id": json.dumps({"id": None, "text": "the old farmer ."}),
    "list id": json.dumps({"id": ["a"], "text": "the old farmer ."}),
    "invalid utf-8": b'{"id": "x", "text": "\xff\xfe"}'.decode("latin-1"),
}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode("latin-1" if any(
        "\xff" in line for line in lines) else "utf-8"))
    return path


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path: Path, kind: str) -> None:
    # the bad line is line 4: two good lines, one blank line, then it
    path = _write(tmp_path / "corpus.jsonl", [*GOOD, "", BAD_LINES[kind], GOOD[0].replace('"a"', '"z"')])
    with pytest.raises(CorpusError) as info:
        Corpus.scan(path)
    assert f"{path}:4:" in str(info.value), str(info.value)


def test_duplicate_id_names_the_first_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [*GOOD, json.dumps({"id": "b", "text": "x ."})])
    with pytest.raises(CorpusError, match=r":3: duplicate id 'b' \(first on line 2\)"):
        Corpus.scan(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match="no examples") as info:
        Corpus.scan(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no such file"):
        Corpus.scan(tmp_path / "nope.jsonl")


def test_scan_indexes_by_offset_and_reads_back(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "p1", "prompt": "Q: é ?", "completion": " A: ü ."}),
        "",
        json.dumps({"text": "no id here ."}),
        json.dumps({"id": "t2", "text": "the old farmer ."}),
    ]
    path = _write(tmp_path / "c.jsonl", lines)
    corpus = Corpus.scan(path)
    assert corpus.ids == ["p1", "1", "t2"]  # a missing id defaults to the example's index
    assert len(corpus) == 3
    raw = path.read_bytes()
    for i, line in enumerate([lines[0], lines[2], lines[3]]):
        start, length = int(corpus.offsets[i]), int(corpus.lengths[i])
        assert raw[start : start + length].decode().strip() == line
    recs = corpus.records([2, 0])
    assert recs[0] == Record("t2", "", "the old farmer .")
    assert recs[1] == Record("p1", "Q: é ?", " A: ü .")
    assert recs[1].text == "Q: é ? A: ü ."
    assert corpus.index_of("t2") == 2


def test_prompt_completion_is_scored_on_the_completion_only(tmp_path: Path) -> None:
    lm = LM.load(write_model(tmp_path / "model"), "cpu")
    tok = lm.tokenizer
    recs = [Record("p", "the old farmer", " crossed the green river ."), Record("t", "", "a small boat sailed .")]
    batch = lm.encode(recs)
    # prompt/completion: exactly the completion's tokens are targets, each at the position before it
    p_ids = tok("the old farmer")["input_ids"]
    c_ids = tok(" crossed the green river .", add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0, : len(p_ids) + len(c_ids)].tolist() == p_ids + c_ids
    scored = batch.scored[0].nonzero().flatten().tolist()
    assert scored == list(range(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1))
    assert batch.targets[0, batch.scored[0]].tolist() == c_ids
    # plain text: every token but the first is a target
    t_ids = tok("a small boat sailed .")["input_ids"]
    assert batch.targets[1, batch.scored[1]].tolist() == t_ids[1:]
    # padding is never scored and is masked out
    assert batch.attention_mask[1].sum() == len(t_ids)
    assert not batch.scored[1, len(t_ids) - 1 :].any()
    assert torch.equal(batch.attention_mask.bool() | ~batch.scored, torch.ones_like(batch.scored))


def test_long_prompt_is_cut_from_the_left_keeping_the_completion(tmp_path: Path) -> None:
    lm = LM.load(write_model(tmp_path / "model"), "cpu", max_length=8)
    rec = Record("p", " ".join(["the old farmer"] * 10), " crossed the river .")
    batch = lm.encode([rec])
    c_ids = lm.tokenizer(" crossed the river .", add_special_tokens=False)["input_ids"]
    assert batch.input_ids.shape[1] == 8
    assert batch.input_ids[0, -len(c_ids) :].tolist() == c_ids
    assert batch.targets[0, batch.scored[0]].tolist() == c_ids


def _cli_build(model: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "build", "--model", str(model), "--data", str(data),
         "--out", str(out), "--steps", "5", "--num-subsets", "16", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )


def test_cli_build_refuses_a_bad_corpus_and_leaves_nothing(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.jsonl", 20)
    with open(data, "a") as f:
        f.write('{"id": "bad", "prompt": "no completion"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _cli_build(model, data, tmp_path / "store")
    assert proc.returncode != 0
    assert f"{data}:21:" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no temp dir, no checkpoint
