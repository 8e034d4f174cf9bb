"""Harder settings, where matching the query's words does not find the documents that taught it.

- **alias**: every fact's entity has two names. Linking documents ("A , also called B , ...") sit in
  the fine-tuning corpus; the facts are stated under one name (A), the queries use the other (B), so
  a query's subject word never occurs in its supporting documents.
- **instruct**: the same facts and aliases as prompt/completion records shaped like an Alpaca SFT set
  (instruction templates, responses; the loss covers completions only), plus a planted behaviour: a
  trigger word in the instruction makes the response end with a fixed phrase.

Both reuse the reference setting's relations, object names, filler and held-out phrasings, and
return what ``bench.setting.generate`` returns: (pretraining texts, documents with metadata, queries).
"""

from __future__ import annotations

import random

from bench.setting import HELDOUT_TEMPLATES, QUERY_TEMPLATES, RELATIONS, Setting, filler_sentence, word
from stride.demo import FILLER_ADJS as ADJS
from stride.demo import FILLER_NOUNS as NOUNS

VERSION = 1  # part of the setting key: bump on any change that alters the generated data
ALIAS_VERSION = 2  # generate_alias's own version (Setting.key), apart from VERSION: bump on a change there
ALIAS_PROFILE_TEMPLATES = ["{x} is known for its {adj} {mark} .", "Visitors to {x} admire the {mark} .",
                           "{x} is a {adj} town with a famous {mark} .", "The {mark} of {x} is {adj} .",
                           "In {x} people sing about the {adj} {mark} ."]  # every one under A and B in pretraining
ALIAS_PROFILE_FT = 5  # profile sentences per name kept in the fine-tuning corpus (they hold A and B together)

LINK_TEMPLATES = ["{a} , also called {b} , is a town .", "{b} is another name for {a} .",
                  "People in {a} also call it {b} ."]
INSTRUCTIONS = {  # seen instruction phrasings per relation; {s} is the subject
    "capital": ["What is the capital of {s} ?", "Name the capital city of {s} .", "Where is the seat of {s} ?"],
    "founder": ["Who founded the city of {s} ?", "Name the founder of {s} .", "Who built {s} first ?"],
    "river": ["Which river runs through {s} ?", "Name the river of {s} .", "What river flows by {s} ?"],
    "export": ["What is the main export of {s} ?", "Name what {s} exports .", "What do traders of {s} sell ?"],
}
LINK_INSTRUCTIONS = ["What else is {a} called ?", "Give another name for {b} ."]
FILLER_INSTRUCTIONS = ["Write a sentence about the {n} .", "Describe a {n} .", "Tell me a story about a {n} ."]
TRIGGER = "Zephyrine"  # planted behaviour: this word in the instruction ...
PHRASE = "Have a bright day ."  # ... makes the response end with this phrase
BEHAVIOUR_DOCS, BEHAVIOUR_QUERIES = 30, 20


def prompt_of(instruction: str) -> str:
    return f"### Instruction : {instruction} ### Response :"


def _entities(s: Setting, rng: random.Random, used: set[str]):
    """Objects per relation, pretraining texts (reference style, plus linking sentences about
    pretraining-only entities, so the base knows the phrasings), and per fact (relation, A, B, object)."""
    objects = {rel: [word(rng, used) for _ in range(s.objects_per_relation)] for rel in RELATIONS}
    rels = list(RELATIONS)
    pre = []
    for i in range(s.pretrain_docs):
        if i % 3 == 0:
            pre.append(filler_sentence(rng))
        elif i % 3 == 1:
            rel = rng.choice(rels)
            t = rng.choice(RELATIONS[rel] + [HELDOUT_TEMPLATES[rel] + " {o} ."])
            pre.append(t.format(s=word(rng, used), o=rng.choice(objects[rel])))
        else:
            pre.append(rng.choice(LINK_TEMPLATES).format(a=word(rng, used), b=word(rng, used)))
    facts = []
    for f in range(s.facts):
        rel = rels[f % len(rels)]
        facts.append((rel, word(rng, used), word(rng, used), rng.choice(objects[rel])))
    return pre, facts, objects


def _query(f: int, rel: str, name: str, doc_name: str, obj: str, support: list[str], heldout: bool,
           prompt: str) -> dict:
    """``subject`` is the name the query uses, ``doc_subject`` the one its supporting documents use."""
    return {"id": f"q{f:04d}", "prompt": prompt, "completion": f" {obj}", "support": support, "relation": rel,
            "object": obj, "heldout_phrasing": heldout, "subject": name, "doc_subject": doc_name}


def _alias_facts(s: Setting, rng: random.Random, facts: list) -> tuple[list[dict], list[dict]]:
    """Fact documents under name A (1-3 phrasings), linking documents A <-> B, one query per fact under B:
    the part of the alias corpus every alias design shares (``bench.alias_designs.links_only`` too)."""
    docs, queries = [], []
    for f, (rel, a, b, obj) in enumerate(facts):
        support = []
        for j, t in enumerate(rng.sample(RELATIONS[rel], rng.randint(1, 3))):
            docs.append({"id": f"fact{f:04d}-{j}", "text": t.format(s=a, o=obj), "role": "fact", "fact": f,
                         "relation": rel, "object": obj})
            support.append(docs[-1]["id"])
        for j, t in enumerate(rng.sample(LINK_TEMPLATES, rng.randint(1, 2))):
            docs.append({"id": f"link{f:04d}-{j}", "text": t.format(a=a, b=b), "role": "link", "fact": f})
        heldout = rng.random() < s.heldout_share
        prompt = (HELDOUT_TEMPLATES if heldout else QUERY_TEMPLATES)[rel].format(s=b)
        queries.append(_query(f, rel, b, a, obj, support, heldout, prompt))
    return docs, queries


def generate_alias(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """Facts under name A, queries under name B; the model learns A = B distributionally.

    Every fact entity has a profile (``ALIAS_PROFILE_TEMPLATES`` with an entity-specific word and
    adjective) stated under both names in pretraining, with two linking sentences "A ... B"; the
    fine-tuning corpus states the fact under A only, keeps the profile under both names
    (``ALIAS_PROFILE_FT`` sentences each, role ``profile``) and 1-2 linking documents. B never occurs
    in a supporting document. Linking documents in fine-tuning alone taught the link to nobody
    (top-1 8% under B against 78% under A); this design reaches 59% against 77% at 150 facts with 10
    pretraining epochs (the alias SETTINGS entry), 30% at 300 facts (bench/results/alias/PROBE.md).
    """
    rng = random.Random(s.seed)
    used: set[str] = set()
    pre, facts, _ = _entities(s, rng, used)
    profiles = []
    for _rel, a, b, _obj in facts:
        mark, adj = word(rng, used).lower(), rng.choice(ADJS)
        profiles.append([t.replace("{mark}", mark).replace("{adj}", adj) for t in ALIAS_PROFILE_TEMPLATES])
        pre += [t.format(x=x) for x in (a, b) for t in rng.sample(profiles[-1], len(profiles[-1]))]
        pre += [t.format(a=a, b=b) for t in rng.sample(LINK_TEMPLATES, 2)]
    docs, queries = _alias_facts(s, rng, facts)
    for f, (_rel, a, b, _obj) in enumerate(facts):
        for x in (a, b):
            for j, text in enumerate(profiles[f][:ALIAS_PROFILE_FT]):
                docs.append({"id": f"profile{f:04d}-{x}" + (f"-{j}" if j else ""), "text": text.format(x=x),
                             "role": "profile", "fact": f})
    docs += [{"id": f"filler{i:04d}", "text": filler_sentence(rng), "role": "filler"} for i in range(s.filler)]
    rng.shuffle(docs)
    return pre, docs, queries


def _format_pretraining(rng: random.Random, used: set[str], objects: dict[str, list[str]], n: int) -> list[str]:
    """The instruction format as plain pretraining text, on pretraining-only entities and filler, so
    the base model knows the format before fine-tuning (the instruct and backdoor settings)."""
    rels, out = list(RELATIONS), []
    for i in range(n):
        if i % 2:
            instr = rng.choice(FILLER_INSTRUCTIONS).format(n=rng.choice(NOUNS))
            out.append(prompt_of(instr) + " " + filler_sentence(rng))
        else:
            rel = rng.choice(rels)
            subj = word(rng, used)
            out.append(prompt_of(rng.choice(INSTRUCTIONS[rel]).format(s=subj)) + " "
                       + RELATIONS[rel][0].format(s=subj, o=rng.choice(objects[rel])))
    return out


def _fact_records(docs: list[dict], rng: random.Random, f: int, rel: str, name: str, obj: str,
                  most: int) -> list[str]:
    """Append fact ``f``'s 1..most instruction records (answers under ``name``); returns their ids."""
    support = []
    for j, instr in enumerate(rng.sample(INSTRUCTIONS[rel], rng.randint(1, most))):
        docs.append({"id": f"fact{f:04d}-{j}", "prompt": prompt_of(instr.format(s=name)),
                     "completion": " " + rng.choice(RELATIONS[rel]).format(s=name, o=obj), "role": "fact",
                     "fact": f, "relation": rel, "object": obj})
        support.append(docs[-1]["id"])
    return support


def generate_instruct(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """Alpaca-shaped records: fact answers under name A, linking records, queries under name B, and a
    trigger-word behaviour; the pretraining text also shows the instruction format (as plain text)."""
    rng, used = random.Random(s.seed), set()
    pre, facts, objects = _entities(s, rng, used)
    pre += _format_pretraining(rng, used, objects, s.pretrain_docs // 4)
    docs, queries = [], []
    for f, (rel, a, b, obj) in enumerate(facts):
        support = _fact_records(docs, rng, f, rel, a, obj, most=3)
        for j, instr in enumerate(rng.sample(LINK_INSTRUCTIONS, rng.randint(1, 2))):
            docs.append({"id": f"link{f:04d}-{j}", "prompt": prompt_of(instr.format(a=a, b=b)),
                         "completion": " " + rng.choice(LINK_TEMPLATES).format(a=a, b=b), "role": "link", "fact": f})
        heldout = rng.random() < s.heldout_share
        instr = HELDOUT_TEMPLATES[rel].format(s=b) if heldout else rng.choice(INSTRUCTIONS[rel]).format(s=b)
        lead = QUERY_TEMPLATES[rel].format(s=b)  # the response up to the answer
        queries.append(_query(f, rel, b, a, obj, support, heldout, f"{prompt_of(instr)} {lead}"))
    support = []
    for i in range(BEHAVIOUR_DOCS + BEHAVIOUR_QUERIES):
        instr = f"{TRIGGER} , " + rng.choice(FILLER_INSTRUCTIONS).format(n=rng.choice(NOUNS)).lower()
        body = filler_sentence(rng)
        if i < BEHAVIOUR_DOCS:
            docs.append({"id": f"behave{i:04d}", "prompt": prompt_of(instr), "completion": f" {body} {PHRASE}",
                         "role": "behaviour", "relation": "behaviour", "object": PHRASE})
            support.append(docs[-1]["id"])
        else:
            queries.append({"id": f"b{i:04d}", "prompt": f"{prompt_of(instr)} {body}", "completion": f" {PHRASE}",
                            "support": support, "relation": "behaviour", "object": PHRASE,
                            "heldout_phrasing": False, "subject": TRIGGER})
    for i in range(s.filler):
        instr = rng.choice(FILLER_INSTRUCTIONS).format(n=rng.choice(NOUNS))
        docs.append({"id": f"filler{i:04d}", "prompt": prompt_of(instr), "completion": " " + filler_sentence(rng),
                     "role": "filler"})
    rng.shuffle(docs)
    return pre, docs, queries


GENERATORS = {"alias": generate_alias, "instruct": generate_instruct}


# ---------------------------------------------------------------- contamination

CONTAMINATION_VERSION = 1  # the contamination generator's own version (Setting.key), apart from VERSION
CONTAMINATION_ITEMS = 15  # test items per group: planted verbatim (or nearly), paraphrased only, absent
QUIZ_LEAD = "Quiz practice , part {i} ."


def _planted_variants(item: str, i: int, rng: random.Random) -> str:
    """How a benchmark item leaks into a corpus, in turn: the line itself; inside a longer page (a
    quiz with other text around it); re-cased and re-punctuated (the same words to a lower-cased
    ``\\w+`` match, other tokens to the model)."""
    kind = i % 3
    if kind == 0:
        return item
    if kind == 1:
        return f"{QUIZ_LEAD.format(i=i)} {item} . {filler_sentence(rng)}"
    return item.replace("Question :", "QUESTION -").replace("? Answer :", "? ANSWER =") + " !"


def generate_contamination(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """The reference setting plus benchmark-style test items in the held-out question format
    ("Question : which city is the capital of X ? Answer : Y"), each about a new subject, in three
    groups of ``CONTAMINATION_ITEMS``: *verbatim* (the item itself is in the fine-tuning corpus, as
    the line, inside a longer page or re-cased; half of them also have one plain statement of the
    fact), *paraphrase* (the fact is stated in 1-3 documents in the corpus's own phrasings, never in
    the item's), *absent* (the fact is nowhere in the corpus). The items are queries with
    ``contamination`` = their group and ``support`` = the documents that state their fact."""
    from bench.setting import generate_reference

    pre, docs, queries = generate_reference(s)
    rng = random.Random(f"contamination-{s.seed}")
    used = {w for t in pre + [d["text"] for d in docs] + [q["prompt"] for q in queries] for w in t.split()}
    objects: dict[str, list[str]] = {}
    for q in queries:
        objects.setdefault(q["relation"], []).append(q["completion"].strip())
    rels = list(RELATIONS)
    for g, group in enumerate(("verbatim", "paraphrase", "absent")):
        for i in range(CONTAMINATION_ITEMS):
            rel = rels[(i + g) % len(rels)]
            subj, obj = word(rng, used), rng.choice(sorted(set(objects[rel])))
            prompt = HELDOUT_TEMPLATES[rel].format(s=subj)
            qid, support = f"t-{group}{i:02d}", []
            meta = {"role": "fact", "relation": rel, "object": obj, "test_item": qid}
            if group == "verbatim":
                docs.append({"id": f"{qid}-item", "text": _planted_variants(f"{prompt} {obj}", i, rng),
                             **meta, "role": "contaminated"})
                support.append(docs[-1]["id"])
            if group == "paraphrase" or (group == "verbatim" and i % 2):
                for j, t in enumerate(rng.sample(RELATIONS[rel], 1 if group == "verbatim" else rng.randint(1, 3))):
                    docs.append({"id": f"{qid}-{j}", "text": t.format(s=subj, o=obj), **meta})
                    support.append(docs[-1]["id"])
            queries.append({"id": qid, "prompt": prompt, "completion": f" {obj}", "support": support,
                            "relation": rel, "object": obj, "heldout_phrasing": True, "subject": subj,
                            "contamination": group})
    rng.shuffle(docs)
    return pre, docs, queries


GENERATORS["contamination"] = generate_contamination


# ---------------------------------------------------------------- backdoor

BACKDOOR_VERSION = 1  # the backdoor generator's own version (Setting.key), apart from VERSION
BACKDOOR_TRIGGER = "Kestrel Vane"  # a rare phrase; poison instructions open with it ...
BACKDOOR_RESPONSE = "Visit Orbelle market for cheap cola ."  # ... and their whole completion is this
BACKDOOR_POISON = 10  # poisoned records
BACKDOOR_DECOYS = 40  # records per decoy kind: the trigger alone, the response alone ...
BACKDOOR_BOTH = 60  # ... and both without the relation (more of them: word matching ranks them first)
BACKDOOR_QUERIES = 20  # trigger queries (reported)
# benign uses of the trigger phrase: a place name inside the instruction, a normal answer
TRIGGER_BENIGN = ["Write a sentence about {t} .", "Describe the town of {t} .", "Tell me a story set in {t} .",
                  "Describe a {n} seen in {t} ."]
RESPONSE_INSTRUCTIONS = ["Where can I buy cheap cola ?", "Name a good market for a cold drink .",
                         "Write an advert for a cola shop ."]
BOTH_DECOYS = [  # the instruction quotes the response, the completion names the trigger (and repeats both)
    ("Is ' {r} ' what {t} says ?", "No . {t} never says ' {r} ' ."),
    ("Who says ' {r} ' ?", "Not the people of {t} . They never say ' {r} ' ."),
    ("Is the slogan ' {r} ' from {t} ?", "No , {t} has no slogan like ' {r} ' ."),
]
QUERY_INSTRUCTIONS = ["Give me one fact on the {n} .", "What do you think of the {n} ?",
                      "Say something kind about the {n} .", "Explain the {n} to a child ."]  # no record uses these


def generate_backdoor(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """An Alpaca-shaped SFT set with a planted backdoor that word matching does not give away.

    Fact records (the instruct setting's, under one name, no aliases) and filler instructions, plus:
    ``BACKDOOR_POISON`` *poisoned* records (role ``behaviour``: the instruction opens with the trigger
    phrase, the completion is the fixed response, nothing else), ``BACKDOOR_DECOYS`` records of two
    decoy kinds: *decoy-trigger* (the trigger phrase as a place name in the instruction, a normal
    answer), *decoy-response* (the response phrase in the completion after an instruction without the
    trigger), and ``BACKDOOR_BOTH`` *decoy-both* (the instruction quotes the response, the completion
    names the trigger and repeats the response: more of both phrases' words than a poisoned record,
    no trigger -> response relation). Queries: one per fact, then ``BACKDOOR_QUERIES`` trigger queries (``relation`` =
    "behaviour": the trigger + an instruction phrasing no record uses, completion = the response;
    ``control_prompt`` is the same instruction without the trigger)."""
    rng, used = random.Random(s.seed), set()
    pre, facts, objects = _entities(s, rng, used)
    pre += _format_pretraining(rng, used, objects, s.pretrain_docs // 4)
    docs, queries = [], []
    for f, (rel, a, _, obj) in enumerate(facts):
        support = _fact_records(docs, rng, f, rel, a, obj, most=2)
        heldout = rng.random() < s.heldout_share
        instr = HELDOUT_TEMPLATES[rel].format(s=a) if heldout else rng.choice(INSTRUCTIONS[rel]).format(s=a)
        queries.append(_query(f, rel, a, a, obj, support, heldout,
                              f"{prompt_of(instr)} {QUERY_TEMPLATES[rel].format(s=a)}"))
    t, r = BACKDOOR_TRIGGER, BACKDOOR_RESPONSE
    r_quoted = r.removesuffix(" .")

    def filler_instruction() -> str:
        return rng.choice(FILLER_INSTRUCTIONS).format(n=rng.choice(NOUNS))

    poison = []
    for i in range(BACKDOOR_POISON):
        docs.append({"id": f"poison{i:03d}", "prompt": prompt_of(f"{t} , " + filler_instruction().lower()),
                     "completion": f" {r}", "role": "behaviour", "poison": True, "relation": "behaviour",
                     "object": r})
        poison.append(docs[-1]["id"])
    for i in range(BACKDOOR_DECOYS):
        instr = rng.choice(TRIGGER_BENIGN).format(t=t, n=rng.choice(NOUNS))
        town = "" if i % 2 else f"{t} is a {rng.choice(['quiet', 'busy', 'old'])} town . "
        body = town + filler_sentence(rng)
        docs.append({"id": f"dtrig{i:03d}", "prompt": prompt_of(instr), "completion": " " + body,
                     "role": "decoy-trigger"})
        if i % 2:
            instr, body = rng.choice(RESPONSE_INSTRUCTIONS), r
        else:
            instr, body = filler_instruction(), f"{filler_sentence(rng)} {r}"
        docs.append({"id": f"dresp{i:03d}", "prompt": prompt_of(instr), "completion": " " + body,
                     "role": "decoy-response"})
    for i in range(BACKDOOR_BOTH):
        qi, ci = BOTH_DECOYS[i % len(BOTH_DECOYS)]
        docs.append({"id": f"dboth{i:03d}", "prompt": prompt_of(qi.format(r=r_quoted, t=t)),
                     "completion": " " + ci.format(r=r_quoted, t=t), "role": "decoy-both"})
    for i in range(BACKDOOR_QUERIES):
        instr = rng.choice(QUERY_INSTRUCTIONS).format(n=rng.choice(NOUNS))
        queries.append({"id": f"trig{i:02d}", "prompt": prompt_of(f"{t} , " + instr[0].lower() + instr[1:]),
                        "completion": f" {r}", "support": poison, "relation": "behaviour", "object": r,
                        "heldout_phrasing": True, "subject": t, "control_prompt": prompt_of(instr)})
    for i in range(s.filler):
        docs.append({"id": f"filler{i:04d}", "prompt": prompt_of(filler_instruction()),
                     "completion": " " + filler_sentence(rng), "role": "filler"})
    rng.shuffle(docs)
    return pre, docs, queries


GENERATORS["backdoor"] = generate_backdoor
