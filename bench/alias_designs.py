"""Trial redesigns of the alias setting (bench/harder.py ``generate_alias``), for ``bench.alias_probe``.

Issue 8 wants queries under a name B that no supporting document uses, with a model that learned
B = A so it can answer. The committed generator puts "A , also called B" sentences in the
fine-tuning corpus; the tiny model does not compose them with the facts (the two-hop curse). These
designs try to make the alias *distributional* world knowledge instead: in pretraining every fact
entity gets a profile (sentences with an entity-specific word, its "mark") stated under every one of
its names, plus linking sentences; fine-tuning states the relation fact under the documents' name(s)
only; queries use B. Knobs:

- ``profile``: profile sentences per name (of ``PROFILE_TEMPLATES``);
- ``link_pre``: linking sentences per (documents' name, B) in pretraining;
- ``link_ft``: the committed generator's linking documents in fine-tuning too;
- ``teach``: pretraining-only alias pairs (with profiles) whose relation facts are stated under both
  names (``teach_all``: all four relations, else one), to show the model that aliases share facts;
- ``names``: names per entity used by the fact documents (each supporting document a different one),
  so the fact is learned under several names, favouring storage shared between names;
- ``profile_ft``: that many profile sentences under each name in the fine-tuning corpus too.

The trials run at the reference setting's sizes and epochs (300 facts, 3 pretraining epochs; quick:
60 and 2) plus their own overrides; ``committed`` is bench/harder.py's generator with the alias
SETTINGS entry. "profile-long-ft5" is what ``generate_alias`` became (ALIAS_VERSION 2; with 150
facts). Figures, designs and the verdict: bench/results/alias/PROBE.md.
"""

from __future__ import annotations

import random

from bench.harder import LINK_TEMPLATES, _alias_facts, _entities, _query
from bench.setting import HELDOUT_TEMPLATES, QUERY_TEMPLATES, RELATIONS, Setting, filler_sentence, word
from stride.demo import FILLER_ADJS as ADJS

PROFILE_TEMPLATES = ["{x} is known for its {adj} {mark} .", "Visitors to {x} admire the {mark} .",
                     "{x} is a {adj} town with a famous {mark} .", "The {mark} of {x} is {adj} .",
                     "In {x} people sing about the {adj} {mark} ."]
DEFAULTS = {"profile": 4, "link_pre": 2, "link_ft": True, "teach": 0, "teach_all": False, "names": 1,
            "profile_ft": 0}
WIDE = {"hidden": 128, "intermediate": 256}
DESIGNS = {  # name: (knobs, Setting overrides); "committed" is bench/harder.py's own generator
    "committed": (None, {}),  # generate_alias with the alias SETTINGS entry (sizes and epochs there)
    "links-only": ("links-only", {}),  # the generator before ALIAS_VERSION 2: linking documents only
    "profile": ({}, {}),
    "profile-long": ({"profile": 5}, {"pretrain_epochs": 10}),
    "profile-long-teach": ({"profile": 5, "teach": 400}, {"pretrain_epochs": 10}),
    "profile-long-teach-all": ({"profile": 5, "teach": 300, "teach_all": True}, {"pretrain_epochs": 10}),
    "profile-long-3names": ({"profile": 3, "names": 3}, {"pretrain_epochs": 10}),
    "profile-long-ft": ({"profile": 5, "profile_ft": 1}, {"pretrain_epochs": 10}),
    "profile-long-ft3": ({"profile": 5, "profile_ft": 3}, {"pretrain_epochs": 10}),
    "profile-long-ft5": ({"profile": 5, "profile_ft": 5}, {"pretrain_epochs": 10}),
    "profile-long-teach-ft5": ({"profile": 5, "teach": 400, "profile_ft": 5}, {"pretrain_epochs": 10}),
    "profile-long-h128": ({"profile": 5}, {"pretrain_epochs": 10, **WIDE}),
    "profile-long-h128-ft5": ({"profile": 5, "profile_ft": 5}, {"pretrain_epochs": 10, **WIDE}),
}


def links_only(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """The alias generator of ALIAS_VERSION 1: facts under A, linking documents A <-> B, queries under B."""
    rng = random.Random(s.seed)
    pre, facts, _ = _entities(s, rng, set())
    docs, queries = _alias_facts(s, rng, facts)
    docs += [{"id": f"filler{i:04d}", "text": filler_sentence(rng), "role": "filler"} for i in range(s.filler)]
    rng.shuffle(docs)
    return pre, docs, queries


def generator(knobs: dict | str):
    """A drop-in for ``generate_alias`` with these knobs (the return shape and query fields unchanged)."""
    if knobs == "links-only":
        return links_only
    k = {**DEFAULTS, **knobs}

    def generate(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
        rng = random.Random(s.seed)
        used: set[str] = set()
        pre, facts, objects = _entities(s, rng, used)
        rels = list(RELATIONS)

        def profile(names, mark, adj):
            return [t.format(x=x, mark=mark, adj=adj) for x in names
                    for t in rng.sample(PROFILE_TEMPLATES, min(k["profile"], len(PROFILE_TEMPLATES)))]

        extra = [[word(rng, used) for _ in range(k["names"] - 1)] for _ in facts]
        prof_text = []
        for (_rel, a, b, _obj), ex in zip(facts, extra, strict=True):
            mark, adj = word(rng, used).lower(), rng.choice(ADJS)
            prof_text.append([t.replace("{mark}", mark).replace("{adj}", adj) for t in PROFILE_TEMPLATES])
            pre += profile([a, b] + ex, mark, adj)
            for x in [a] + ex:
                for t in rng.sample(LINK_TEMPLATES, min(k["link_pre"], len(LINK_TEMPLATES))):
                    pre.append(t.format(a=x, b=b))
        for i in range(k["teach"]):
            rel = rels[i % len(rels)]
            c, d, obj = word(rng, used), word(rng, used), rng.choice(objects[rel])
            pre += profile([c, d], word(rng, used).lower(), rng.choice(ADJS))
            pre.append(rng.choice(LINK_TEMPLATES).format(a=c, b=d))
            for r in (rels if k["teach_all"] else [rel]):
                o = obj if r == rel else rng.choice(objects[r])
                for x in (c, d):
                    pre.append(rng.choice(RELATIONS[r]).format(s=x, o=o))
        docs, queries = [], []
        for f, (rel, a, b, obj) in enumerate(facts):
            support, names = [], [a] + extra[f]
            nd = rng.randint(len(names), 3) if len(names) > 1 else rng.randint(1, 3)
            for j, t in enumerate(rng.sample(RELATIONS[rel], nd)):
                docs.append({"id": f"fact{f:04d}-{j}", "text": t.format(s=names[j % len(names)], o=obj),
                             "role": "fact", "fact": f, "relation": rel, "object": obj})
                support.append(docs[-1]["id"])
            if k["link_ft"]:
                for j, t in enumerate(rng.sample(LINK_TEMPLATES, rng.randint(1, 2))):
                    docs.append({"id": f"link{f:04d}-{j}", "text": t.format(a=a, b=b), "role": "link", "fact": f})
            heldout = rng.random() < s.heldout_share
            prompt = (HELDOUT_TEMPLATES if heldout else QUERY_TEMPLATES)[rel].format(s=b)
            queries.append(_query(f, rel, b, a, obj, support, heldout, prompt))
        if k["profile_ft"]:
            for f, (_rel, a, b, _obj) in enumerate(facts):
                for x in (a, b):
                    for j, text in enumerate(prof_text[f][: int(k["profile_ft"])]):
                        docs.append({"id": f"profile{f:04d}-{x}" + (f"-{j}" if j else ""), "text": text.format(x=x),
                                     "role": "profile", "fact": f})
        docs += [{"id": f"filler{i:04d}", "text": filler_sentence(rng), "role": "filler"} for i in range(s.filler)]
        rng.shuffle(docs)
        return pre, docs, queries

    return generate
