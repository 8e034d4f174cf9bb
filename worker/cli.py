"""The ``stride`` command: build, attribute, demo-assets, serve, bench."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
import types
import typing
from pathlib import Path

import typer

from stride.config import BuildConfig, SolverConfig
from stride.update import UpdateConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _config_options(cls) -> list[inspect.Parameter]:
    """One ``--option`` per config field, typed and documented by the field itself (never restated here)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (types.UnionType, typing.Union):  # X | None
            inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
            kind = (str if typing.get_origin(inner) is typing.Literal else inner) | None
        flags = (f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ()))
        option = typer.Option(f.default, *flags, help=f.metadata.get("help", ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    return params


def build(
    model: Path = typer.Option(..., help="Hugging Face causal-LM directory (local)."),
    data: Path = typer.Option(..., help="JSONL corpus: {id?, text} or {id?, prompt, completion} per line."),
    out: Path = typer.Option(..., help="Store directory to write (replaced atomically)."),
    reference_model: Path | None = typer.Option(
        None, help="The checkpoint MODEL was fine-tuned from (same tokenizer and architecture), for the "
                   "revert and add fit modes."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    config: Path | None = typer.Option(None, help="JSON BuildConfig; the config options below are then ignored."),
    quiet: bool = typer.Option(False, help="No progress output."),
    **options,
) -> None:
    """Learn the steering operators for a model and corpus; write an operator store."""
    from stride.config import ConfigError
    from stride.corpus import CorpusError
    from stride.model import ModelMismatchError
    from worker.build import build as run_build

    _logging()
    try:
        if config is not None:
            cfg = BuildConfig.from_dict(json.loads(config.read_text()))
        else:
            cfg = BuildConfig(**options)
        path = run_build(model, data, out, cfg, device=device, show_progress=not quiet,
                         reference_model=reference_model)
    except (CorpusError, ConfigError, ModelMismatchError, FileNotFoundError, json.JSONDecodeError) as e:
        _fail(e)
    typer.echo(str(path))


_fixed = [p for p in inspect.signature(build).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
build.__signature__ = inspect.Signature(_fixed + _config_options(BuildConfig))
app.command()(build)


def update(
    store: Path = typer.Option(..., help="The operator store to update (left untouched)."),
    out: Path = typer.Option(..., help="The new store version to write (replaced atomically)."),
    add: Path | None = typer.Option(None, help="JSONL of examples to add, each with an 'id'."),
    remove: Path | None = typer.Option(None, help="Ids to remove, one per line."),
    model: Path | None = typer.Option(None, help="The store's model, if it moved since the build (same weights)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    quiet: bool = typer.Option(False, help="No progress output."),
    **options,
) -> None:
    """Add and remove examples without a full rebuild: only the affected operators are refit."""
    from stride.corpus import CorpusError
    from stride.store import StoreError
    from stride.update import UpdateError
    from worker.update import update as run_update

    _logging()
    try:
        path = run_update(store, out, add=add, remove=remove, config=UpdateConfig(**options), model=model,
                          device=device, show_progress=not quiet)
    except (UpdateError, CorpusError, StoreError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(str(path))


_fixed = [p for p in inspect.signature(update).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
update.__signature__ = inspect.Signature(_fixed + _config_options(UpdateConfig))
app.command()(update)


@app.command()
def attribute(
    store: Path = typer.Option(..., help="Operator store directory."),
    prompt: str = typer.Option(..., help="Prompt text (or the whole text, without --completion)."),
    completion: str | None = typer.Option(None, help="Completion whose loss is attributed."),
    top_k: int = typer.Option(10, help="Proponents and opponents to show."),
    device: str | None = typer.Option(None),
    model: Path | None = typer.Option(None, help="Model directory, if moved since the build."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Attribute one output in-process (no server needed)."""
    from stride.query import Attributor
    from stride.store import StoreError

    try:
        attributor = Attributor.from_store(store, device=device, model=model)
        result = attributor.attribute(prompt, completion, top_k=top_k)
    except (StoreError, ValueError) as e:
        _fail(e)
    if as_json:
        d = result.to_dict()
        for side in ("proponents", "opponents"):
            d[side] = [{k: s[k] for k in ("index", "id", "score", "text")} for s in d[side]]
        typer.echo(json.dumps(d))
        return
    typer.echo(f"loss {result.loss:.4f}  ({result.timing_ms['total']:.1f} ms)")
    for title, rows in (("proponents", result.proponents), ("opponents", result.opponents)):
        typer.echo(f"{title}:")
        for s in rows:
            typer.echo(f"  {s.rank:>3}  {s.score:+.4f}  {s.id}  {(s.text or '')[:100]}")


@app.command("demo-assets")
def demo_assets(out: Path = typer.Option(..., help="Directory for model/, corpus.jsonl, queries.jsonl."),
                seed: int = typer.Option(0)) -> None:
    """Write the embedded default: a tiny GPT-2 trained on planted facts, with its corpus and queries."""
    from stride.demo import DemoSpec, write_demo_assets

    _logging()  # the training's progress lines
    summary = write_demo_assets(out, DemoSpec(seed=seed))
    typer.echo(json.dumps(summary))


@app.command()
def serve(
    store: Path = typer.Option(..., envvar="STRIDE_STORE", help="Operator store directory."),
    host: str = typer.Option("127.0.0.1", envvar="STRIDE_HOST"),
    port: int = typer.Option(8000, envvar="STRIDE_PORT"),
    device: str | None = typer.Option(None, envvar="STRIDE_DEVICE", help="cpu, cuda ... (default: cuda if present)."),
    redis_url: str | None = typer.Option(None, envvar="STRIDE_REDIS_URL", help="Result cache; unset: no cache."),
) -> None:
    """Serve the HTTP API (POST /v1/attribute ...); other settings come from STRIDE_* (see the README)."""
    import os

    import uvicorn

    os.environ["STRIDE_STORE"] = str(store)
    if device:
        os.environ["STRIDE_DEVICE"] = device
    if redis_url:
        os.environ["STRIDE_REDIS_URL"] = redis_url
    # one process, one model copy: concurrency comes from the micro-batcher, not from workers;
    # log_config=None leaves logging to the app, which writes JSON lines
    uvicorn.run("app.main:app", host=host, port=port, log_config=None, access_log=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


_ = SolverConfig  # re-exported for configs that name solver settings
