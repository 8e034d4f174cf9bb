"""Tiny real models and corpora for the unit tests: built in milliseconds, nothing downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the a old quiet busy small bright cold warm green market road farmer teacher river boat "
         "garden window table letter story song crossed painted watched opened carried followed").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + " ." for _ in range(n)]


def write_corpus(path: Path, n: int = 64, seed: int = 0, prompt_every: int = 0) -> Path:
    """``n`` examples; every ``prompt_every``-th one (if > 0) is a prompt/completion record."""
    lines = []
    for i, s in enumerate(sentences(n, seed)):
        if prompt_every and i % prompt_every == 0:
            words = s.split()
            rec = {"id": f"ex{i}", "prompt": " ".join(words[:3]), "completion": " " + " ".join(words[3:])}
        else:
            rec = {"id": f"ex{i}", "text": s}
        lines.append(json.dumps(rec) + "\n")
    path.write_text("".join(lines))
    return path


def tokenizer():
    from stride.demo import build_tokenizer

    return build_tokenizer([" ".join(WORDS) + " ."])


def model_config(arch: str, vocab: int, tok, width: int = 32):
    """A random-initialised config of each supported family: 2 layers, width 32."""
    import transformers as tf

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=2, n_head=2, **ids)
    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, **ids)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.25, **common)
    raise ValueError(arch)


def write_model(out: Path, arch: str = "gpt2", seed: int = 0, width: int = 32) -> Path:
    """save_pretrained (safetensors) of a random tiny model plus its tokenizer, in ``out``."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, len(tok), tok, width))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
