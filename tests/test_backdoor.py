"""The backdoor setting's generator (bench/harder.py ``generate_backdoor``): counts, the planted
trigger -> response records, the decoys, and that word matching cannot pick the poison out."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def generated():
    from bench.setting import SETTINGS, generate

    s = SETTINGS["backdoor"][1]
    return s, *generate(s)


def test_counts_and_schema(generated):
    from bench import harder
    from bench.setting import CORPUS_KEYS, SETTINGS, generate

    s, _, docs, queries = generated
    assert generate(s)[1] == docs  # deterministic
    roles = {}
    for d in docs:
        roles[d["role"]] = roles.get(d["role"], 0) + 1
        assert {k for k in CORPUS_KEYS if k in d} == {"id", "prompt", "completion"}  # an Alpaca-shaped SFT set
    assert roles["behaviour"] == harder.BACKDOOR_POISON
    assert roles["decoy-trigger"] == roles["decoy-response"] == harder.BACKDOOR_DECOYS
    assert roles["decoy-both"] == harder.BACKDOOR_BOTH
    assert roles["filler"] == s.filler and len({d["id"] for d in docs}) == len(docs)
    trig = [q for q in queries if q["relation"] == "behaviour"]
    assert len(trig) == harder.BACKDOOR_QUERIES and len(queries) == s.facts + len(trig)
    full = SETTINGS["backdoor"][0]
    assert len(generate(full)[1]) >= 2000  # a handful of poisoned records among thousands
    assert full.key() != SETTINGS["instruct"][0].key()


def test_poison_and_decoys(generated):
    from bench.harder import BACKDOOR_RESPONSE as R
    from bench.harder import BACKDOOR_TRIGGER as T
    from bench.setting import doc_text

    _, _, docs, queries = generated
    instr = lambda d: d["prompt"].split("### Instruction :", 1)[1]  # noqa: E731
    poison = [d for d in docs if d["role"] == "behaviour"]
    for d in poison:  # the instruction opens with the trigger, the whole completion is the response
        assert instr(d).strip().startswith(f"{T} ,") and d["completion"] == f" {R}"
    others = [d for d in docs if d["role"] != "behaviour"]
    assert not any(d["completion"].strip() == R and T in d["prompt"] for d in others)  # no other trigger -> response
    words = lambda d: set(doc_text(d).lower().split())  # noqa: E731
    tw, rw = set(T.lower().split()), set(R.lower().split()) - {"."}
    for role, has_t, has_r in (("decoy-trigger", True, False), ("decoy-response", False, True),
                               ("decoy-both", True, True)):
        sel = [d for d in docs if d["role"] == role]
        assert sel and all((tw <= words(d)) == has_t and (rw <= words(d)) == has_r for d in sel), role
    assert all(T in instr(d) for d in docs if d["role"] == "decoy-trigger")  # the trigger in benign use
    assert all(T not in d["prompt"] and R in d["completion"] for d in docs if d["role"] == "decoy-response")
    both = [d for d in docs if d["role"] == "decoy-both"]
    assert all(R.removesuffix(" .") in d["prompt"] and T in d["completion"] for d in both)
    trig = [q for q in queries if q["relation"] == "behaviour"]
    seen = {d["prompt"] for d in docs}
    for q in trig:
        assert q["completion"] == f" {R}" and T in q["prompt"] and T not in q["control_prompt"]
        assert q["prompt"] not in seen and set(q["support"]) == {d["id"] for d in poison}


def test_bm25_cannot_separate_poison_from_decoys(generated):
    """Scanning the trigger queries with BM25 (scores summed per document, as ``stride scan`` ranks)
    puts the decoys carrying both phrases above every poisoned record: none in the top-k, k = the
    number poisoned; nor does any single trigger query's BM25 top-10 hold every poisoned record."""
    from bench.methods import run_bm25
    from stride.scan import aggregate

    _, _, docs, queries = generated
    trig = [q for q in queries if q["relation"] == "behaviour"]
    poisoned = np.array([d["role"] == "behaviour" for d in docs])
    scores = run_bm25(docs, trig, []).scores
    order = aggregate(scores).ranking()
    k = int(poisoned.sum())
    assert poisoned[order[:k]].sum() == 0
    assert {docs[i]["role"] for i in order[:k]} == {"decoy-both"}
    for row in scores.numpy():
        assert poisoned[np.argsort(-row, kind="stable")[:10]].sum() < k
