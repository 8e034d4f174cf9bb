"""`python -m bench.shape --quick` end to end into a tmp dir, and LoGRA's factored projection.

Checks that every part ran, that every number is finite and every time positive, and that the report has
its rows; no timing assertions (the quick shapes say nothing about the real ratios).
"""

from __future__ import annotations

import json

import torch


def _times(obj):
    """Every {wall, cpu} pair anywhere in the result."""
    if isinstance(obj, dict):
        if set(obj) >= {"wall", "cpu"}:
            yield obj
        for v in obj.values():
            yield from _times(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _times(v)


def test_shape_quick(tmp_path):
    from bench.shape import QUICK, main

    main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "shape.json").read_text())
    json.dumps(res, allow_nan=False)  # raises on NaN or inf anywhere
    assert {"gpt2", "llama", "meta", "machine", "targets"} <= set(res)
    g = res["gpt2"]
    assert [r["n"] for r in g["totals"]] == list(QUICK.ns)
    times = list(_times(res))
    assert len(times) > 20 and all(t["wall"] > 0 and t["cpu"] >= 0 for t in times)
    assert all(s["converged"] and s["gap_max"] <= 1e-6 for s in g["solve"])
    for st, dot in zip(g["store"]["rows"], g["dot"], strict=True):
        assert st["bfloat16_bytes"] < st["float32_bytes"] < st["memory_bytes"]
        assert dot["float32_bytes"] == 2 * dot["float16_bytes"] == st["n"] * QUICK.proj_dim * 4
    assert g["store"]["rows"][0]["written"] and 0 < sum(g["store"]["header_bytes"].values()) < 4096
    assert g["gradients"]["kronfluence"]["disk_bytes"] > g["gradients"]["kronfluence"]["memory_bytes"] > 0
    assert res["llama"]["parameters"] > res["llama"]["tracked_parameters"] > 0
    md = (tmp_path / "shape.md").read_text()
    for text in ("Cost only", "## GPT-2-small shape", "### Parts of one query", "### Whole query versus n",
                 "### State on disk and in memory", "### The issue's targets", "## ~1B Llama shape",
                 "| STRIDE | forward", "| projected gradients (LoGRA) |", "| Kronfluence EK-FAC | precondition",
                 "Load averages", "Machine"):
        assert text in md, text
    for n in QUICK.ns:
        assert md.count(f"| {n:,} |") == 2  # one row in the query table, one in the state table


def test_logra_projection_is_the_projected_gradient():
    """The factored projection equals P_out^T (dL/dW) P_in of the full weight gradient, module by module."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.shape import Logra, hooked_backward, logra_widths, random_batch, random_lm, tracked_modules

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    random_lm(model, 12)  # frozen, as the benchmark holds it
    modules = tracked_modules(model)
    assert len(modules) == 4 and sum(logra_widths(4, 64, 4)) * 4 == 64
    batch = random_batch(50, 1, 8, 4, 0)
    logra = Logra(modules, 64, 4)
    hooked_backward(model, batch, modules, logra)
    for m in modules:
        m.weight.requires_grad_(True)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.nn.functional.cross_entropy(out.transpose(1, 2), batch.targets, ignore_index=-100, reduction="sum").backward()
    for i, m in enumerate(modules):
        grad = m.weight.grad.T  # Conv1D keeps (in, out): the gradient as (out, in)
        want = logra.p_out[i].T @ grad @ logra.p_in[i]
        torch.testing.assert_close(logra.blocks[i].reshape(want.shape), want, rtol=1e-4, atol=1e-5)
