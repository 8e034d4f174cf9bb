"""Request examples that are real demo facts, generated from the demo's own generator (never typed by
hand: a made-up example is out of the demo model's vocabulary and gets confident nonsense), and a
ready-to-paste curl command for a running service: ``python -m app.examples QUERIES URL``."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

from stride.demo import DemoSpec, generate_corpus


def demo_queries(n: int = 2) -> list[dict[str, Any]]:
    """The first ``n`` planted-fact queries of the default demo (``stride demo-assets``)."""
    _, queries = generate_corpus(DemoSpec())
    return [{"prompt": q["prompt"], "completion": q["completion"]} for q in queries[:n]]


def _examples() -> list[dict[str, Any]]:
    first, second = demo_queries(2)
    # the span example scores the object's name alone (the completion's characters 1..end)
    return [{**first, "top_k": 5}, {**second, "span": [1, len(second["completion"])], "top_k": 5}]


EXAMPLE_QUERIES = _examples()


def curl_for(queries_path: str, url: str) -> str:
    with open(queries_path) as f:
        q = json.loads(f.readline())
    body = json.dumps({"prompt": q["prompt"], "completion": q.get("completion"), "top_k": 5})
    return f"curl -s {url}/v1/attribute -H 'content-type: application/json' -d {shlex.quote(body)}"


def main() -> None:
    args = sys.argv[1:]
    queries = args[0] if args else "demo/queries.jsonl"
    url = args[1] if len(args) > 1 else "http://127.0.0.1:8000"
    print(f"\nSTRIDE is starting on {url} (OpenAPI: {url}/docs). Once it logs 'ready', in another shell:\n")
    print(f"  {curl_for(queries, url)}\n")


if __name__ == "__main__":
    main()
