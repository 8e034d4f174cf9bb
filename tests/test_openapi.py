"""The API contract: the served OpenAPI document must equal the committed ``docs/openapi.json``.

A failure here means the API changed. If that was meant, regenerate the snapshot and commit it with
the change, so reviewers and clients see the diff: ``python -m app.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from app.openapi import render, served_schema, settings
from stride.demo import DemoSpec, generate_corpus

SNAPSHOT = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
REGENERATE = "python -m app.openapi > docs/openapi.json"


def _served() -> dict[str, Any]:
    """/openapi.json as the running app serves it (no store is needed for the document)."""
    from app.main import create_app

    async def get() -> dict[str, Any]:
        app = create_app(settings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/openapi.json")
            assert r.status_code == 200
            return r.json()

    return asyncio.run(get())


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in the snapshot" for k in a.keys() - b.keys()]
        out += [f"{where}/{k}: only in the served schema" for k in b.keys() - a.keys()]
        for k in sorted(a.keys() & b.keys()):
            out += _differences(a[k], b[k], f"{where}/{k}")
        return out
    return [] if a == b else [f"{where}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}"]


def test_served_schema_matches_the_committed_snapshot() -> None:
    served = _served()
    assert served == served_schema()  # what `python -m app.openapi` writes is what is served
    committed = json.loads(SNAPSHOT.read_text())
    diff = _differences(committed, served)
    assert not diff, f"the API changed ({len(diff)} differences, first: {diff[:8]}); if meant, run `{REGENERATE}`"
    assert SNAPSHOT.read_text() == render(served), f"docs/openapi.json is not in canonical form: run `{REGENERATE}`"


def test_request_examples_are_demo_facts() -> None:
    """The documented examples are planted facts of the demo (generated, not typed): a made-up
    example is out of the demo model's vocabulary and gets confident nonsense."""
    _, queries = generate_corpus(DemoSpec())
    facts = {(q["prompt"], q["completion"]) for q in queries}
    schemas = json.loads(SNAPSHOT.read_text())["components"]["schemas"]
    examples = schemas["AttributeRequest"]["examples"] + schemas["BatchRequest"]["examples"][0]["queries"]
    assert len(examples) >= 3
    for ex in examples:
        assert (ex["prompt"], ex["completion"].removesuffix(" .")) in facts, ex


def test_readme_queries_are_demo_facts() -> None:
    import re

    _, queries = generate_corpus(DemoSpec())
    facts = {(q["prompt"], q["completion"]) for q in queries}
    readme = (SNAPSHOT.parents[1] / "README.md").read_text()
    pairs = re.findall(r'"prompt": "([^"]*)", "completion": "([^"]*)"', readme)
    assert len(pairs) >= 4
    for prompt, completion in pairs:
        assert (prompt, completion.removesuffix(" .")) in facts, (prompt, completion)


def test_readme_id_query_is_the_same_fact() -> None:
    """The README's id example is the demo tokenizer's ids of its first text example."""
    import re

    from stride.demo import build_tokenizer

    docs, queries = generate_corpus(DemoSpec())
    tok = build_tokenizer([d["text"] for d in docs] + [q["prompt"] + q["completion"] for q in queries])
    readme = (SNAPSHOT.parents[1] / "README.md").read_text()
    (prompt_ids, completion_ids), = re.findall(r'"prompt_ids": (\[[0-9, ]+\]), "completion_ids": (\[[0-9, ]+\])',
                                               readme)
    prompt, completion = re.findall(r'"prompt": "([^"]*)", "completion": "([^"]*)"', readme)[0]
    assert json.loads(prompt_ids) == tok(prompt)["input_ids"]
    assert json.loads(completion_ids) == tok(completion, add_special_tokens=False)["input_ids"]
