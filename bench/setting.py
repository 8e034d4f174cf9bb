"""The reference setting, built deterministically from a seed.

A tiny Llama (every projection an ``nn.Linear``, so gradient methods and Kronfluence can hook it)
with a word-level tokenizer is pretrained briefly on generic generated text (filler sentences and
relation sentences about pretraining-only entities, so it knows the phrasings but none of the
facts). The fine-tuning corpus plants facts, each in 1-3 known documents in different phrasings,
among filler documents; the attributed model is the base fine-tuned on the whole corpus. Queries:
one per fact; a share of them use a phrasing that no training document uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stride.corpus import Record
from stride.demo import QUERY_TEMPLATES, RELATIONS, build_tokenizer, filler_sentence, word
from stride.model import LM

HELDOUT_TEMPLATES = {  # phrasings no training document uses
    "capital": "Question : which city is the capital of {s} ? Answer :",
    "founder": "Question : who founded {s} ? Answer :",
    "river": "Question : which river flows through {s} ? Answer :",
    "export": "Question : what does {s} export ? Answer :",
}


BENCH = Path(__file__).resolve().parent


def add_dir_args(ap, cache: bool = True) -> None:
    """``--work``, ``--cache``, ``--out`` and ``--threads`` as every benchmark script names them."""
    ap.add_argument("--work", type=Path, default=BENCH / "work", help="the settings' models and stores")
    if cache:
        ap.add_argument("--cache", type=Path, default=BENCH / "cache", help="ground truth and retrain cache")
    ap.add_argument("--out", type=Path, default=BENCH / "results", help="results directory")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared 2-core machine)")


@dataclass
class Setting:
    """Everything that determines the reference setting and its ground truth (hashed for the cache)."""

    name: str = "full"
    seed: int = 0
    facts: int = 300
    filler: int = 520
    objects_per_relation: int = 12
    heldout_share: float = 0.25  # queries phrased unlike any training document
    pretrain_docs: int = 2000
    pretrain_epochs: int = 3
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    batch_size: int = 32
    lr: float = 5e-3
    epochs: int = 20  # fine-tuning epochs; retrains on 50% subsets use the same recipe
    retrains: int = 40  # retrain i draws its subset from seed (setting, i): extending the list reuses the cache
    tune_retrains: int = 8  # the last ones choose hyper-parameters; the reported LDS never uses them
    subset_fraction: float = 0.5
    kind: str = "reference"  # generator: reference, alias, instruct, contamination or backdoor (bench/harder.py)

    def key(self) -> str:
        """Hash of everything that determines the models and each retrain, not how many retrains.

        Fields added later are left out at their default value, so existing caches keep their key.
        """
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("retrains", "tune_retrains")}
        if fields["kind"] == "reference":
            del fields["kind"]
        else:  # the harder generators' code version: a change there must not reuse stale models
            from bench.harder import ALIAS_VERSION, BACKDOOR_VERSION, CONTAMINATION_VERSION, VERSION

            own = {"alias": ALIAS_VERSION, "contamination": CONTAMINATION_VERSION, "backdoor": BACKDOOR_VERSION}
            fields["generator_version"] = own.get(fields["kind"], VERSION)
        blob = json.dumps({**fields, "v": 2}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


FULL = Setting()
QUICK = Setting(name="quick", facts=60, filler=120, pretrain_docs=400, pretrain_epochs=2, epochs=12, retrains=10,
                tune_retrains=2)
SETTINGS = {  # --setting NAME: (full, quick)
    "reference": (FULL, QUICK),
    "alias": (dataclasses.replace(FULL, name="alias", kind="alias", facts=150, pretrain_epochs=10),  # the model
              dataclasses.replace(QUICK, name="alias-quick", kind="alias", pretrain_epochs=10)),  # learns A = B
    "instruct": (dataclasses.replace(FULL, name="instruct", kind="instruct"),
                 dataclasses.replace(QUICK, name="instruct-quick", kind="instruct")),
    "contamination": (dataclasses.replace(FULL, name="contamination", kind="contamination"),
                      dataclasses.replace(QUICK, name="contamination-quick", kind="contamination")),
    # >= 2,000 records: 300 facts (1-2 records each), 1,400 filler, 10 poisoned, 140 decoys (bench/harder.py)
    "backdoor": (dataclasses.replace(FULL, name="backdoor", kind="backdoor", filler=1400),
                 dataclasses.replace(QUICK, name="backdoor-quick", kind="backdoor")),
}
CORPUS_KEYS = ("id", "text", "prompt", "completion")  # what corpus.jsonl carries; the rest goes to the sidecar


def doc_record(d: dict) -> Record:
    """A document as the core reads it: plain text, or prompt + completion (loss on the completion only)."""
    if "prompt" in d:
        return Record(d["id"], d["prompt"], d["completion"])
    return Record(d["id"], "", d["text"])


def doc_text(d: dict) -> str:
    """The whole document as a string (lexical methods and representations see prompt and completion)."""
    return doc_record(d).text


def generate_reference(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """Facts stated under the queries' own subject names: lexical matching finds them."""
    rng = random.Random(s.seed)
    used: set[str] = set()
    objects = {rel: [word(rng, used) for _ in range(s.objects_per_relation)] for rel in RELATIONS}
    rels = list(RELATIONS)
    # pretraining: generic filler and relation sentences about entities that never reappear
    pre = []
    for i in range(s.pretrain_docs):
        if i % 2:
            pre.append(filler_sentence(rng))
        else:
            rel = rng.choice(rels)
            t = rng.choice(RELATIONS[rel] + [HELDOUT_TEMPLATES[rel] + " {o} ."])
            pre.append(t.format(s=word(rng, used), o=rng.choice(objects[rel])))
    docs, queries = [], []
    for f in range(s.facts):
        rel = rels[f % len(rels)]
        subj, obj = word(rng, used), rng.choice(objects[rel])
        templates = rng.sample(RELATIONS[rel], rng.randint(1, 3))
        support = []
        for j, t in enumerate(templates):
            did = f"fact{f:04d}-{j}"
            docs.append({"id": did, "text": t.format(s=subj, o=obj), "role": "fact", "fact": f, "relation": rel,
                         "object": obj})
            support.append(did)
        heldout = rng.random() < s.heldout_share
        prompt = (HELDOUT_TEMPLATES if heldout else QUERY_TEMPLATES)[rel].format(s=subj)
        queries.append({"id": f"q{f:04d}", "prompt": prompt, "completion": f" {obj}", "support": support,
                        "relation": rel, "heldout_phrasing": heldout})
    for i in range(s.filler):
        docs.append({"id": f"filler{i:04d}", "text": filler_sentence(rng), "role": "filler"})
    rng.shuffle(docs)
    return pre, docs, queries


def generate(s: Setting) -> tuple[list[str], list[dict], list[dict]]:
    """(pretraining texts, fine-tuning documents with metadata, queries with their supporting document ids)."""
    if s.kind == "reference":
        return generate_reference(s)
    from bench import harder

    return harder.GENERATORS[s.kind](s)


def make_model(s: Setting, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(s.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def batch_loss(model, batch, rows: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of some rows of an encoded batch, trimmed to their longest row."""
    width = int(batch.attention_mask[rows].sum(1).max())
    ids, mask, tgt = (t[rows, :width] for t in (batch.input_ids, batch.attention_mask, batch.targets))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100)


def train(model, tok, texts: list[str | Record], epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """The recipe: AdamW, linear warm-up then cosine decay, mean token NLL, seeded shuffles.

    A ``Record`` with a prompt is scored on its completion only (``LM.encode`` masks the prompt), as
    instruction tuning does; a plain string is scored on every token after the first.
    """
    lm = LM(model, tok, torch.device("cpu"))
    batch = lm.encode([t if isinstance(t, Record) else Record("", "", t) for t in texts])
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    per_epoch = (len(texts) + batch_size - 1) // batch_size
    total = max(1, epochs * per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(texts), generator=gen).split(batch_size):
            loss = batch_loss(model, batch, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)


@torch.no_grad()
def query_losses(model, tok, queries: list[dict]) -> torch.Tensor:
    """Mean NLL of each query's completion tokens given its prompt: (Q,)."""
    lm = LM(model, tok, torch.device("cpu"))
    b = lm.encode([Record(q["id"], q["prompt"], q["completion"]) for q in queries])
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    nll = F.cross_entropy(logits.transpose(1, 2), b.targets, ignore_index=-100, reduction="none")
    return nll.sum(1) / (b.targets != -100).sum(1).clamp_min(1)


@torch.no_grad()
def top1_correct(model, tok, queries: list[dict]) -> torch.Tensor:
    """Per query: is the model's top-1 next token the answer's first token? (Q,) bool."""
    lm = LM(model, tok, torch.device("cpu"))
    b = lm.encode([Record(q["id"], q["prompt"], q["completion"]) for q in queries])
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    pos = b.scored.float().argmax(1)  # first scored position: predicts the object's first token
    pred = logits[torch.arange(len(queries)), pos].argmax(-1)
    return pred == b.targets[torch.arange(len(queries)), pos]


def top1_accuracy(model, tok, queries: list[dict]) -> float:
    return float(top1_correct(model, tok, queries).float().mean())


@dataclass
class Built:
    setting: Setting
    dir: Path
    model_dir: Path  # the attributed (fine-tuned) model
    base_dir: Path
    corpus: Path
    docs: list[dict]
    queries: list[dict]
    seconds: dict


def materialise(s: Setting, root: Path) -> Built:
    """Write base/, model/, corpus.jsonl (+ docs_meta.jsonl), queries.jsonl under root/<key>; reuse models."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = root / s.key()
    d.mkdir(parents=True, exist_ok=True)
    pre, docs, queries = generate(s)
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({k: x[k] for k in CORPUS_KEYS if k in x}) + "\n" for x in docs))
    (d / "docs_meta.jsonl").write_text("".join(
        json.dumps({k: v for k, v in x.items() if k not in CORPUS_KEYS[1:]}) + "\n" for x in docs))
    (d / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    seconds = {}
    if not (d / "base" / "config.json").is_file():
        t = time.perf_counter()
        tok = build_tokenizer(pre + [doc_text(x) for x in docs] + [q["prompt"] + q["completion"] for q in queries])
        base = make_model(s, tok)
        train(base, tok, pre, s.pretrain_epochs, s.lr, 32, s.seed)
        base.save_pretrained(d / "base.tmp")
        tok.save_pretrained(d / "base.tmp")
        (d / "base.tmp").rename(d / "base")
        seconds["pretrain"] = time.perf_counter() - t
    if not (d / "model" / "config.json").is_file():
        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(d / "base")
        model = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
        train(model, tok, [doc_record(x) for x in docs], s.epochs, s.lr, s.batch_size, s.seed + 1)
        model.save_pretrained(d / "model.tmp")
        tok.save_pretrained(d / "model.tmp")
        (d / "model.tmp").rename(d / "model")
        seconds["finetune"] = time.perf_counter() - t
    times = d / "build_seconds.json"
    if seconds:
        times.write_text(json.dumps({**(json.loads(times.read_text()) if times.is_file() else {}), **seconds}))
    seconds = {**(json.loads(times.read_text()) if times.is_file() else {}), "reused": not seconds}
    return Built(s, d, d / "model", d / "base", corpus, docs, queries, seconds)
