"""Does the alias setting's model learn the link? Top-1 under the alias (as queried) against the
documents' name, on the fine-tuned model (and the base, which must not know the facts).

    nice -n 10 .venv/bin/python -m bench.alias_probe [--full] [--design NAME] [--root DIR] [--set FIELD=VALUE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def doc_named(queries: list[dict]) -> list[dict]:
    return [{**q, "prompt": q["prompt"].replace(q["subject"], q["doc_subject"])} for q in queries]


def probe(s, root: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.setting import materialise, top1_accuracy

    t = time.perf_counter()
    built = materialise(s, root)
    out = {"setting": s.name, "key": s.key(), "build_seconds": built.seconds, "wall": time.perf_counter() - t}
    tok = AutoTokenizer.from_pretrained(built.model_dir)
    named = [q for q in built.queries if q.get("doc_subject")]
    for which, d in (("model", built.model_dir), ("base", built.base_dir)):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        out[f"{which}_alias_named"] = top1_accuracy(m, tok, named)
        out[f"{which}_doc_named"] = top1_accuracy(m, tok, doc_named(named))
    held = [q for q in named if q["heldout_phrasing"]]
    m = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32).eval()
    out["model_alias_named_heldout"] = top1_accuracy(m, tok, held) if held else None
    out["model_alias_named_seen_phrasing"] = top1_accuracy(m, tok, [q for q in named if not q["heldout_phrasing"]])
    out["ratio"] = out["model_alias_named"] / max(out["model_doc_named"], 1e-9)
    return out


def main() -> None:
    from bench import harder
    from bench.alias_designs import DESIGNS, generator
    from bench.setting import SETTINGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full alias setting (default: the quick one)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/alias_probe"), help="where the models go")
    ap.add_argument("--set", action="append", default=[], help="Setting field override, e.g. --set hidden=96")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--design", default="committed", help="a trial generator of bench/alias_designs.py "
                    "(its models go under ROOT/DESIGN: the setting key does not know the design)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    knobs, over = DESIGNS[args.design]
    if knobs is not None:
        harder.GENERATORS["alias"] = generator(knobs)
    i = 0 if args.full else 1
    s = SETTINGS["alias"][i]
    if knobs is not None:  # trials: the reference sizes and epochs, then the design's own
        s = dataclasses.replace(SETTINGS["reference"][i], name=s.name, kind="alias")
    s = dataclasses.replace(s, **over)
    for kv in args.set:
        k, v = kv.split("=")
        s = dataclasses.replace(s, **{k: type(getattr(s, k))(v)})
    print(json.dumps({"design": args.design, **probe(s, args.root / args.design)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
