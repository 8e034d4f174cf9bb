"""The alias setting's generator (bench/harder.py ``generate_alias``) and the trial redesigns of
bench/alias_designs.py: counts, that the queried name B never occurs in a supporting document (so
word matching cannot find them), and that the redesigns' pretraining puts A and B in shared contexts."""

from __future__ import annotations

import pytest


def _words(text: str) -> set[str]:
    return set(text.split())


@pytest.fixture(scope="module")
def quick():
    from bench.setting import SETTINGS

    return SETTINGS["alias"][1]


def _check_queries(s, docs, queries, names_per_doc=1):
    by_id = {d["id"]: d for d in docs}
    assert len(queries) == s.facts and len(by_id) == len(docs)
    assert sum(d["role"] == "filler" for d in docs) == s.filler
    for f, q in enumerate(queries):
        b, a = q["subject"], q["doc_subject"]
        assert a != b and b in _words(q["prompt"]) and a not in _words(q["prompt"])
        assert 1 <= len(q["support"]) <= 3
        for sid in q["support"]:
            d = by_id[sid]
            assert d["role"] == "fact" and d["fact"] == f and d["object"] == q["object"]
            assert b not in _words(d["text"])  # the queried name is never in a supporting document
        assert a in _words(by_id[q["support"][0]]["text"])
        # B occurs in no fact document at all (only in linking/profile documents)
        assert not any(b in _words(d["text"]) for d in docs if d["role"] == "fact")


def _check_shared_contexts(pre, queries):
    pre_words = [_words(t) for t in pre]
    for q in queries[:20]:
        a, b = q["doc_subject"], q["subject"]
        ctx_a = [w - {a} for w in pre_words if a in w and b not in w]
        ctx_b = [w - {b} for w in pre_words if b in w and a not in w]
        assert ctx_a and ctx_b
        # the profile's entity-specific word (its "mark") occurs around both names
        shared = set.union(*ctx_a) & set.union(*ctx_b)
        assert any(w.islower() and len(w) > 3 and w not in {"known", "visitors", "admire", "town", "with",
                                                             "famous", "people", "sing", "about", "for"}
                   for w in shared)
        assert any({a, b} <= w for w in pre_words)  # and a linking sentence
        assert not any(q["object"] in w and (a in w or b in w) for w in pre_words)  # the fact is not pretraining


def test_committed_generator(quick):
    from bench import harder
    from bench.setting import SETTINGS, generate

    pre, docs, queries = generate(quick)
    assert generate(quick)[1] == docs  # deterministic
    _check_queries(quick, docs, queries)
    _check_shared_contexts(pre, queries)
    links = [d for d in docs if d["role"] == "link"]
    assert quick.facts <= len(links) <= 2 * quick.facts
    profiles = [d for d in docs if d["role"] == "profile"]
    assert len(profiles) == 2 * harder.ALIAS_PROFILE_FT * quick.facts
    for q in queries:  # each fact's linking documents name both A and B; its profile is under both names
        f = int(q["id"][1:])
        mine = [d for d in links if d["fact"] == f]
        assert mine and all({q["subject"], q["doc_subject"]} <= _words(d["text"]) for d in mine)
        named = [d for d in profiles if d["fact"] == f]
        assert sum(q["subject"] in _words(d["text"]) for d in named) == harder.ALIAS_PROFILE_FT
        assert sum(q["doc_subject"] in _words(d["text"]) for d in named) == harder.ALIAS_PROFILE_FT
    full = SETTINGS["alias"][0]
    assert full.facts == 150 and full.pretrain_epochs == 10  # the sizes at which the model learns A = B


def test_redesign_is_the_probed_design():
    import dataclasses

    from bench.alias_designs import DESIGNS, generator, links_only
    from bench.harder import generate_alias
    from bench.setting import SETTINGS

    s = SETTINGS["alias"][1]
    assert generate_alias(s) == generator(DESIGNS["profile-long-ft5"][0])(s)
    old = links_only(dataclasses.replace(s, facts=8))
    assert not any(d["role"] == "profile" for d in old[1])


def test_alias_version_is_its_own(quick):
    import dataclasses

    from bench import harder
    from bench.setting import SETTINGS

    key = quick.key()
    harder.ALIAS_VERSION += 1
    try:
        assert quick.key() != key  # the alias key follows ALIAS_VERSION ...
        for other in ("instruct", "contamination"):  # ... and the other harder settings' keys do not
            s = SETTINGS[other][1]
            harder.ALIAS_VERSION -= 1
            before = s.key()
            harder.ALIAS_VERSION += 1
            assert s.key() == before
    finally:
        harder.ALIAS_VERSION -= 1
    assert dataclasses.replace(quick).key() == key


@pytest.mark.parametrize("design", ["profile", "profile-long-3names", "profile-long-ft", "profile-long-teach-all"])
def test_designs_share_contexts(quick, design):
    from bench.alias_designs import DESIGNS, generator

    knobs, _ = DESIGNS[design]
    pre, docs, queries = generator(knobs)(quick)
    _check_queries(quick, docs, queries)
    _check_shared_contexts(pre, queries)
