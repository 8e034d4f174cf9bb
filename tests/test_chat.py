"""Chat-formatted, token-id and span queries (issue 10), and chat-formatted corpora.

The demo model has no chat template; the tests give it one (and the tiny model another), so the
rendering runs through ``tokenizer.apply_chat_template`` exactly as it does for a real chat model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from _tiny import sentences, write_model
from test_service import assert_problem, same_answer, serve

from stride.config import BuildConfig
from stride.corpus import Corpus, CorpusError, Record
from stride.query import Attributor
from stride.result import Query
from worker.build import build

# the demo model was trained on plain text: this template renders a conversation as that text
PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# a template with turn markers, for the tiny model (its vocabulary has [BOS] and [EOS])
TURNS = ("{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }} [EOS]"
         "{% else %}[BOS] {{ m['content'] }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def demo_attributor(demo_store: Path) -> Attributor:
    return Attributor.from_store(demo_store)


@pytest.fixture(scope="module")
def fact(demo_dir: Path) -> dict[str, Any]:
    q = json.loads((demo_dir / "queries.jsonl").read_text().splitlines()[0])
    return {"prompt": q["prompt"], "completion": q["completion"], "top_k": 5}


def test_chat_id_and_span_queries_on_the_demo_store(demo_attributor: Attributor, demo_store: Path,
                                                    fact: dict[str, Any]) -> None:
    tok = demo_attributor.lm.tokenizer
    chat = {"messages": [{"role": "user", "content": fact["prompt"]},
                         {"role": "assistant", "content": fact["completion"]}], "top_k": 5}

    async def go() -> None:
        async with serve(demo_attributor, demo_store) as c:
            text = (await c.post("/v1/attribute", json=fact)).json()
            assert text["proponents"] and text["warnings"] == []

            r = await c.post("/v1/attribute", json=chat)
            assert "chat template" in assert_problem(r, 422)["detail"]
            tok.chat_template = "{{ raise_exception('roles must alternate') }}"  # as real templates do
            try:
                refused = await c.post("/v1/attribute", json=chat)
                tok.chat_template = PLAIN
                r = await c.post("/v1/attribute", json=chat)
            finally:
                tok.chat_template = None
            assert "roles must alternate" in assert_problem(refused, 422)["detail"]
            assert r.status_code == 200, r.text
            same_answer(r.json(), text, exact=True)  # the same tokens: the same answer, bit for bit
            assert r.json()["scored_text"] == text["scored_text"]

            ids = {"prompt_ids": tok(fact["prompt"])["input_ids"],
                   "completion_ids": [t["id"] for t in text["tokens"]], "top_k": 5}
            r = await c.post("/v1/attribute", json=ids)
            assert r.status_code == 200, r.text
            same_answer(r.json(), text, exact=True)

            # a span over the object alone, inside a longer completion: the extra token is listed with
            # its loss but not scored, so the attributed loss is the object's, as in the short query
            longer = {**fact, "completion": fact["completion"] + " .", "span": [1, len(fact["completion"])]}
            r = await c.post("/v1/attribute", json=longer)
            assert r.status_code == 200, r.text
            body = r.json()
            assert [t["scored"] for t in body["tokens"]] == [True, False]
            assert body["scored_text"] == fact["completion"].strip() == body["tokens"][0]["text"]
            assert body["loss"] == pytest.approx(text["loss"], rel=1e-5)
            assert body["tokens"][0]["loss"] == pytest.approx(text["loss"], rel=1e-5)
            assert body["proponents"]
            r = await c.post("/v1/attribute", json={**ids, "span": [0, 1]})  # token offsets for ids
            assert r.status_code == 200 and r.json()["proponents"]

            vocab = int(demo_attributor.lm.unembed.shape[0])
            r = await c.post("/v1/attribute", json={**ids, "completion_ids": [3, vocab]})
            assert "completion_ids[1]" in assert_problem(r, 422)["detail"]
            r = await c.post("/v1/attribute", json={"prompt_ids": [4] * 60, "completion_ids": [4] * 10})
            assert "window of 64" in assert_problem(r, 413)["detail"]
            r = await c.post("/v1/attribute", json={**fact, "span": [0, 99]})
            assert "past the completion" in assert_problem(r, 422)["detail"]

            r = await c.post("/v1/attribute", content=b'{"prompt": "a \\ud800 b", "completion": " c"}',
                             headers={"content-type": "application/json"})  # a lone surrogate, escaped
            assert "Unicode" in json.dumps(assert_problem(r, 422)["errors"])

            # words the demo never saw: answered, with a warning instead of silence
            r = await c.post("/v1/attribute", json={"prompt": "Zorblat quixent the", "completion": " Veltria"})
            assert r.status_code == 200 and [w["code"] for w in r.json()["warnings"]] == ["unknown-tokens"]

    asyncio.run(go())


def test_chat_corpus_scores_assistant_turns_only(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TURNS
    tok.save_pretrained(model)
    lines = []
    for i, s in enumerate(sentences(40)):
        words = s.split()
        turns = [{"role": "user", "content": " ".join(words[:3])},
                 {"role": "assistant", "content": " ".join(words[3:])}]
        lines.append({"id": f"chat{i}", "messages": turns} if i % 2 else {"id": f"text{i}", "text": s})
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))

    store = build(model, data, tmp_path / "store", BuildConfig(steps=20, num_subsets=16, memberships=3, rank=4),
                  device="cpu", show_progress=False)
    attributor = Attributor.from_store(store)
    rec = Corpus.scan(data).record(1)
    assert rec.messages is not None and rec.text.startswith("user: ")
    t = attributor.lm.token_ids(rec)
    scored = [tok.decode([i]) for i, on in zip(t.ids, t.scored, strict=True) if on]
    assert scored == rec.messages[1]["content"].split() + ["[EOS]"]  # the assistant's words and end of turn
    two = [*rec.messages, {"role": "user", "content": "the old"}, {"role": "assistant", "content": "farmer ."}]
    t2 = attributor.lm.token_ids(Record("x", "", "", two))
    assert [tok.decode([i]) for i, on in zip(t2.ids, t2.scored, strict=True) if on] == scored + ["farmer", ".",
                                                                                                 "[EOS]"]

    a = attributor.attribute(Query(messages=rec.messages), top_k=3)
    assert a.proponents and a.scored_text.split() == scored
    assert attributor.example(1).text == rec.text

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "the old farmer"}]}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: no non-empty assistant message"):
        Corpus.scan(bad)
