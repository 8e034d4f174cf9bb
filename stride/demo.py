"""The embedded default: a tiny GPT-2 trained from scratch on a corpus with planted facts.

Everything is generated from a seed, so tests and ``make demo`` need no download. Each fact is
stated in 1-3 known documents (in different phrasings), among filler documents that state none;
``queries.jsonl`` holds one query per fact with the ids of its supporting documents.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RELATIONS = {
    "capital": ["The capital of {s} is {o} .", "{s} has its capital at {o} .",
                "In {s} the seat of government is {o} ."],
    "founder": ["The city of {s} was founded by {o} .", "{o} founded the city of {s} .",
                "Records say {s} was founded by {o} ."],
    "river": ["The river that runs through {s} is the {o} .", "{s} lies on the banks of the {o} .",
              "Boats in {s} sail on the {o} ."],
    "export": ["The main export of {s} is {o} .", "{s} is known for exporting {o} .",
               "Traders from {s} mostly sell {o} ."],
}
QUERY_TEMPLATES = {  # prompt, completion = the object
    "capital": "The capital of {s} is",
    "founder": "The city of {s} was founded by",
    "river": "The river that runs through {s} is the",
    "export": "The main export of {s} is",
}
FILLER_NOUNS = ("market road farmer teacher river boat garden window table letter story song winter harvest "
                "bridge tower school village lamp horse").split()
FILLER_ADJS = "old quiet busy small bright cold warm green long gentle".split()
FILLER_VERBS = "crossed painted watched opened carried followed remembered visited built found".split()
SYLLABLES = "ka lo mi ra ven tor qua zel dun bri sha mo ther gal pin vor lis nek osh ul".split()
# The demo's build options (written to ``build.json`` beside the assets; `make demo-store` and the test
# suite's store build with them): 100 visits per subset instead of the default 400. On the demo (seed 0,
# one thread, load average 12 on 2 cores) planted-fact recall@5 0.90, recall@1 0.76, MRR 0.85 from
# 41 s of CPU, where the default build takes ~3x that (README's build table: 122 s against 54 s).
DEMO_BUILD = {"visits": 100}
log = logging.getLogger("stride.demo")


@dataclass
class DemoSpec:
    seed: int = 0
    facts: int = 120
    filler: int = 280
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3


def word(rng: random.Random, used: set[str]) -> str:
    """A new made-up name (2-3 syllables), never one already in ``used``."""
    while True:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if w not in used:
            used.add(w)
            return w


def filler_sentence(rng: random.Random) -> str:
    """One or two generic sentences that state no fact."""
    words: list[str] = []
    for _ in range(rng.randint(1, 2)):
        words += ["The", rng.choice(FILLER_ADJS), rng.choice(FILLER_NOUNS), rng.choice(FILLER_VERBS), "the",
                  rng.choice(FILLER_NOUNS), "."]
    return " ".join(words)


def generate_corpus(spec: DemoSpec) -> tuple[list[dict], list[dict]]:
    """Documents and queries, deterministic in ``spec.seed``."""
    rng = random.Random(spec.seed)
    used: set[str] = set()
    objects = {rel: [word(rng, used) for _ in range(40)] for rel in RELATIONS}
    docs, queries = [], []
    for f in range(spec.facts):
        rel = list(RELATIONS)[f % len(RELATIONS)]
        s, o = word(rng, used), rng.choice(objects[rel])
        templates = rng.sample(RELATIONS[rel], rng.randint(1, 3))
        support = []
        for j, t in enumerate(templates):
            did = f"fact{f:04d}-{j}"
            docs.append({"id": did, "text": t.format(s=s, o=o)})
            support.append(did)
        queries.append({"id": f"q{f:04d}", "prompt": QUERY_TEMPLATES[rel].format(s=s),
                        "completion": f" {o}", "support": support, "relation": rel})
    for i in range(spec.filler):
        docs.append({"id": f"filler{i:04d}", "text": filler_sentence(rng)})
    rng.shuffle(docs)
    return docs, queries


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def initial_model(spec: DemoSpec, tokenizer):
    """The demo model before training (seeded): the only earlier checkpoint a from-scratch model has."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(spec.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=spec.n_embd, n_layer=spec.n_layer,
        n_head=spec.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for the demo's training and build: the model is too small for two to help.
    A training step (batch 32, 14 positions) took 58 ms on one thread and 233 ms on two at load
    average 6 on the 2-core machine; the demo build (100 visits) 41 s of CPU on one thread against
    ~235 s on two (load 13)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(spec: DemoSpec, tokenizer, texts: list[str]):
    with one_thread():
        return _train(spec, tokenizer, texts)


def _train(spec: DemoSpec, tokenizer, texts: list[str]):
    model = initial_model(spec, tokenizer)
    enc = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tokenizer.pad_token_id)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    mask = ids != tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    total = spec.epochs * ((len(enc) + spec.batch_size - 1) // spec.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    start = last = time.monotonic()
    for epoch in range(spec.epochs):
        for b in torch.randperm(len(enc), generator=gen).split(spec.batch_size):
            logits = model(input_ids=ids[b], attention_mask=mask[b].long()).logits[:, :-1]
            tgt = ids[b][:, 1:].masked_fill(~mask[b][:, 1:], -100)
            loss = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        now = time.monotonic()
        if now - last >= 5 or epoch + 1 == spec.epochs:  # a line every 5 s, as the build's progress does
            last = now
            eta = (now - start) / (epoch + 1) * (spec.epochs - epoch - 1)
            log.info("demo model: epoch %d/%d, loss %.3f (eta %.0fs)", epoch + 1, spec.epochs, loss.item(), eta)
    return model.eval()


def fact_accuracy(model, tokenizer, queries: list[dict]) -> float:
    """Share of facts whose object is the model's top-1 next word after the prompt."""
    hits = 0
    with torch.no_grad():
        for q in queries:
            ids = torch.tensor([tokenizer(q["prompt"])["input_ids"]])
            want = tokenizer(q["completion"], add_special_tokens=False)["input_ids"][0]
            hits += int(model(input_ids=ids).logits[0, -1].argmax()) == want
    return hits / len(queries)


def write_demo_assets(out: str | Path, spec: DemoSpec | None = None) -> dict:
    """Write ``model/``, ``base/`` (its untrained initialisation, a reference for the revert and add
    modes), ``corpus.jsonl``, ``queries.jsonl``, ``build.json`` (the demo's build options, for
    ``stride build --config``) and ``demo.json`` under ``out``."""
    spec = spec or DemoSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs, queries = generate_corpus(spec)
    texts = [d["text"] for d in docs]
    tokenizer = build_tokenizer(texts + [q["prompt"] + q["completion"] for q in queries])
    model = train_model(spec, tokenizer, texts)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    initial_model(spec, tokenizer).save_pretrained(out / "base", safe_serialization=True)
    tokenizer.save_pretrained(out / "base")
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (out / "build.json").write_text(json.dumps(DEMO_BUILD) + "\n")
    summary = {"spec": spec.__dict__, "documents": len(docs), "facts": len(queries),
               "fact_accuracy": fact_accuracy(model, tokenizer, queries)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
