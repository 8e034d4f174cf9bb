"""The frozen causal LM: loading, encoding, and the two activations STRIDE reads.

Any Hugging Face causal LM works without per-architecture code: ``output_hidden_states`` gives
the residual stream after every block (index ``layer + 1``) and, last, the state after the final
norm, which the unembedding maps to logits.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from stride.corpus import Record

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Batch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    targets: Tensor  # (B, T): next token at each position, -100 where it is not scored

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.targets)))

    @property
    def scored(self) -> Tensor:
        return self.targets != -100


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_sha256(model_dir: str | Path) -> str:
    """One digest over the model's weight files (name and content), in name order."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return _digest(tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """Memoised on each file's path, size and modification time: ``stride serve`` checks the weights
    before anything loads and the app again as it loads them (seconds per GB each)."""
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


@dataclass
class Tokens:
    """One row's token ids and which of them are scored (targets; token 0 never is: nothing predicts it)."""

    ids: list[int]
    scored: list[bool]
    first: int  # the completion's first token: answers list tokens[first:] with their losses
    offsets: list[tuple[int, int]] | None = None  # character range of each token in ``text``
    text: str | None = None
    start: int = 0  # where the (last) scored stretch starts in ``text``


class ChatRenderError(ValueError):
    """A chat conversation for a tokenizer that cannot render one (no template, or no offsets to
    locate the assistant's tokens with)."""


class ModelMismatchError(ValueError):
    """Two models that must share tokenizer and architecture do not; the message says what differs."""


def check_same_family(deployed: LM, reference_dir: str | Path) -> None:
    """A reference checkpoint must tokenise and shape activations exactly as the deployed model does.

    Reads only the reference's config and tokenizer, so a mismatch is refused before any weights load.
    """
    from transformers import AutoConfig, AutoTokenizer

    if not (Path(reference_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{reference_dir}: not a Hugging Face model directory (no config.json)")
    a, b = deployed.model.config, AutoConfig.from_pretrained(reference_dir)
    for field in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(a, field, None) != getattr(b, field, None):
            raise ModelMismatchError(f"{reference_dir}: {field} is {getattr(b, field, None)!r}, the deployed model's "
                                     f"is {getattr(a, field, None)!r}; the reference must be the same architecture")
    if deployed.tokenizer.get_vocab() != AutoTokenizer.from_pretrained(reference_dir).get_vocab():
        raise ModelMismatchError(f"{reference_dir}: its tokenizer's vocabulary differs from the deployed model's")


class LM:
    """A frozen causal LM with its tokenizer, on one device."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, max_length: int = 256):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = device
        cfg = model.config
        # the model's position window bounds every row: past it the forward pass fails (on CUDA with a
        # device-side assert that poisons the process); the demo model has 64 positions, its store 256
        window = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        self.max_length = min(max_length, int(window)) if window else max_length
        self.num_layers = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)))
        head = model.get_output_embeddings()
        self.unembed = head.weight  # (V, d)
        self.unembed_bias = getattr(head, "bias", None)
        self.pad_id = next(
            (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
        )

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None, max_length: int = 256) -> LM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return cls(model, tok, pick_device(device), max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.unembed.shape[1])

    def token_ids(self, rec: Record) -> Tokens:
        """A corpus record's tokens: prompt (not scored) then completion, or a chat conversation
        scored on its assistant turns. Over-long records keep the completion and lose the prompt's start."""
        tok = self.tokenizer
        if rec.messages is not None:
            t = self.chat_tokens(rec.messages, last_only=False)
            cut = max(0, len(t.ids) - self.max_length)  # a long conversation loses its start
            return Tokens(t.ids[cut:], [False] + t.scored[cut + 1 :], max(t.first - cut, 1))
        if not rec.prompt:
            ids = tok(rec.completion, add_special_tokens=True)["input_ids"][-self.max_length :]
            return Tokens(ids, [False] + [True] * (len(ids) - 1), 1)
        p = tok(rec.prompt, add_special_tokens=True)["input_ids"]
        c = tok(rec.completion, add_special_tokens=False)["input_ids"]
        c = c[: self.max_length - 1]
        p = p[-(self.max_length - len(c)) :] if len(p) + len(c) > self.max_length else p
        skip = max(len(p), 1)
        return Tokens(p + c, [t >= skip for t in range(len(p) + len(c))], skip)

    def chat_tokens(self, messages: list, last_only: bool) -> Tokens:
        """A conversation rendered with the tokenizer's own chat template, scored on the assistant
        turns (``last_only``: the last message alone, the completion of a chat query).

        Each assistant turn is the text between the conversation rendered up to it (with the
        generation prompt) and rendered through it; tokens starting inside such a stretch are scored.
        """
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ChatRenderError("chat rendering needs a fast tokenizer (tokenizer.json), which maps tokens to "
                                  "characters; send prompt and completion text instead")
        if not getattr(tok, "chat_template", None):
            raise ChatRenderError("the model's tokenizer has no chat template (chat_template in "
                                 "tokenizer_config.json); send prompt and completion text instead")
        from jinja2 import TemplateError

        msgs = [m if isinstance(m, dict) else m.model_dump() for m in messages]

        def render(ms: list[dict], gen: bool) -> str:
            try:
                return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
            except TemplateError as e:  # templates raise on conversations they refuse (roles out of order ...)
                raise ChatRenderError(f"the chat template refuses this conversation: {e}") from None

        full = render(msgs, False)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        stretches = []
        for i in turns[-1:] if last_only else turns:
            before, through = render(msgs[:i], True) if i else "", render(msgs[: i + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ChatRenderError("the chat template does not render a conversation's start as a prefix of "
                                     "the whole, so the assistant's tokens cannot be located")
            stretches.append((len(before), len(through)))
        start = stretches[-1][0] if stretches else len(full)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        scored = [any(a <= s < b for a, b in stretches) for s, _ in enc["offset_mapping"]]
        first = next((t for t, on in enumerate(scored) if on), len(ids))
        return Tokens(ids, [False] + scored[1:], first, offsets=[tuple(o) for o in enc["offset_mapping"]],
                      text=full, start=start)

    def encode(self, records: list[Record] | list[Tokens]) -> Batch:
        """Right-padded batch; targets[b, t] is the token at t+1 when t+1 is scored."""
        rows = [r if isinstance(r, Tokens) else self.token_ids(r) for r in records]
        width = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.ids)
            input_ids[b, :n] = torch.tensor(r.ids)
            mask[b, :n] = 1
            on = torch.tensor(r.scored[1:n], dtype=torch.bool)
            targets[b, : n - 1] = input_ids[b, 1:n].masked_fill(~on, -100)
        return Batch(input_ids, mask, targets)

    @torch.no_grad()
    def features(self, batch: Batch, layer: int) -> tuple[Tensor, Tensor]:
        """(h, z): the residual stream after block ``layer`` and the final normed state."""
        batch = batch.to(self.device)
        # the base transformer, not the LM: its head would compute (B, T, V) logits that every caller
        # discards (the forward pass 238 -> 159 ms on the GPT-2-small shape, bench/results/shape.md)
        out = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        return out.hidden_states[layer + 1], out.hidden_states[-1]

    def logits(self, z: Tensor) -> Tensor:
        out = z @ self.unembed.T
        return out if self.unembed_bias is None else out + self.unembed_bias
