"""The ``stride`` command: build, update, attribute, scan, select, demo-assets, serve, worker-jobs."""

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
from stride.scan import ContaminationConfig, ScanConfig
from stride.update import UpdateConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _config_options(cls) -> list[inspect.Parameter]:
    """One ``--option`` per config field, typed and documented by the field itself (never restated here).

    Every option defaults to None, "not given", so that ``--config FILE`` can supply the defaults
    and the flags given override them; the field's own default is shown in the help."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (types.UnionType, typing.Union):  # X | None
            kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
        if typing.get_origin(kind) is typing.Literal:
            kind = str
        flags = (f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ()))
        if kind is bool:
            flags = (f"{flags[0]}/--no-{f.name.replace('_', '-')}", *flags[1:])
        shown = "chosen from the corpus and model" if f.default is None else repr(f.default)
        option = typer.Option(None, *flags, help=f"{f.metadata.get('help', '')} [default: {shown}]",
                              show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=kind | None))
    return params


def _command(*configs: type):
    """Register a command whose ``**options`` are the fields of ``configs`` (the CLI is generated from
    them, help text included, never restated here)."""

    def register(fn):
        fixed = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = inspect.Signature(fixed + [p for c in configs for p in _config_options(c)])
        return app.command()(fn)

    return register


def _given(options: dict) -> dict:
    """The config options given on the command line (those left out are None: the field's default)."""
    return {k: v for k, v in options.items() if v is not None}


def _config(cls, options: dict):
    """``cls`` from its own fields among the options given (a command may take several configs)."""
    given = _given(options)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


@_command(BuildConfig)
def build(
    model: Path = typer.Option(..., help="Hugging Face causal-LM directory (local)."),
    data: Path = typer.Option(..., help="JSONL corpus: {id?, text} or {id?, prompt, completion} per line."),
    out: Path = typer.Option(..., help="Store directory to write (replaced atomically)."),
    reference_model: Path | None = typer.Option(
        None, help="The checkpoint MODEL was fine-tuned from (same tokenizer and architecture), for the "
                   "revert and add fit modes."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    config: Path | None = typer.Option(None, help="JSON file of BuildConfig fields: the defaults, which the "
                                                 "options below override."),
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
        given = {k: v for k, v in options.items() if v is not None}
        base = json.loads(config.read_text()) if config is not None else {}
        if not isinstance(base, dict):
            raise ConfigError(f"{config}: expected a JSON object of BuildConfig fields")
        cfg = BuildConfig.from_dict({**base, **given})
        path = run_build(model, data, out, cfg, device=device, show_progress=not quiet,
                         reference_model=reference_model)
    except (CorpusError, ConfigError, ModelMismatchError, FileNotFoundError, json.JSONDecodeError) as e:
        _fail(e)
    typer.echo(str(path))


@_command(UpdateConfig)
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
        path = run_update(store, out, add=add, remove=remove, config=_config(UpdateConfig, options), model=model,
                          device=device, show_progress=not quiet)
    except (UpdateError, CorpusError, StoreError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(str(path))


@_command(ScanConfig, ContaminationConfig)
def scan(
    store: Path = typer.Option(..., help="Operator store directory."),
    queries: Path = typer.Option(..., help="JSONL of queries ({id?, prompt, completion} or any query form)."),
    out: Path = typer.Option(..., help="Directory for examples.jsonl, queries.jsonl, report.html (resumable)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    model: Path | None = typer.Option(None, help="Model directory, if moved since the build."),
    quiet: bool = typer.Option(False, help="No progress output."),
    **options,
) -> None:
    """Attribute every query of a file and rank the training examples over all of them; with
    --contamination, also flag the benchmark items whose top proponents hold them verbatim or nearly."""
    from stride.query import Attributor
    from stride.result import QueryError
    from stride.store import StoreError
    from worker.scan import ScanInputError
    from worker.scan import scan as run_scan

    _logging()
    try:
        attributor = Attributor.from_store(store, device=device, model=model)
        summary = run_scan(attributor, queries, out, _config(ScanConfig, options), show_progress=not quiet,
                           contamination=_config(ContaminationConfig, options))
    except (ScanInputError, StoreError, QueryError) as e:
        _fail(e)
    typer.echo(json.dumps(summary))


@_command(ScanConfig)
def select(
    store: Path = typer.Option(..., help="Operator store directory."),
    target: Path = typer.Option(..., help="JSONL of target queries: the behaviour to keep."),
    keep: float = typer.Option(..., help="Share of the corpus to keep, in (0, 1]."),
    out: Path = typer.Option(..., help="Pruned corpus (JSONL, the kept lines in corpus order; atomic)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    model: Path | None = typer.Option(None, help="Model directory, if moved since the build."),
    quiet: bool = typer.Option(False, help="No progress output."),
    **options,
) -> None:
    """Keep the examples with the most net positive influence on a target set (opponents go first)."""
    from stride.query import Attributor
    from stride.result import QueryError
    from stride.store import StoreError
    from worker.scan import ScanInputError
    from worker.scan import select as run_select

    _logging()
    try:
        attributor = Attributor.from_store(store, device=device, model=model)
        summary = run_select(attributor, target, keep, out, _config(ScanConfig, options), show_progress=not quiet)
    except (ScanInputError, StoreError, QueryError) as e:
        _fail(e)
    typer.echo(json.dumps(summary))


def _ids(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"{name}: token ids are integers separated by commas or spaces") from None


def _messages(text: str | None) -> list | None:
    """A JSON list of {role, content}, inline or ``@FILE`` (a list, or an object with ``messages``)."""
    if text is None:
        return None
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    data = json.loads(raw)
    return data["messages"] if isinstance(data, dict) and "messages" in data else data


@app.command()
def attribute(
    store: Path = typer.Option(..., help="Operator store directory."),
    prompt: str | None = typer.Option(None, help="Prompt text (or the whole text, without --completion)."),
    completion: str | None = typer.Option(None, help="Completion whose loss is attributed."),
    messages: str | None = typer.Option(None, help="Chat conversation instead of text: a JSON list of "
                                        "{role, content} (the last is the assistant's), or @FILE."),
    prompt_ids: str | None = typer.Option(None, help="Prompt token ids instead of text, e.g. '12,7,99'."),
    completion_ids: str | None = typer.Option(None, help="Completion token ids."),
    span: tuple[int, int] | None = typer.Option(None, help="START END: score only the completion tokens "
                                                "overlapping [START, END) (characters; tokens for ids)."),
    top_k: int = typer.Option(10, help="Proponents and opponents to show."),
    device: str | None = typer.Option(None),
    model: Path | None = typer.Option(None, help="Model directory, if moved since the build."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer as one JSON object (stride.result)."),
) -> None:
    """Attribute one output in-process (no server needed): text, a chat conversation or token ids."""
    from pydantic import ValidationError

    from stride.query import Attributor
    from stride.result import Query, QueryError
    from stride.store import StoreError

    try:
        query = Query(prompt, completion, messages=_messages(messages), prompt_ids=_ids(prompt_ids, "--prompt-ids"),
                      completion_ids=_ids(completion_ids, "--completion-ids"), span=span)
        attributor = Attributor.from_store(store, device=device, model=model)
        result = attributor.attribute(query, top_k=top_k)
    except ValidationError as e:
        _fail(ValueError("; ".join(str(x["msg"]) for x in e.errors())))
    except (StoreError, QueryError, OSError, json.JSONDecodeError) as e:
        _fail(e)
    if as_json:
        typer.echo(result.model_dump_json(by_alias=True))
        return
    typer.echo(f"loss {result.loss:.4f}  ({result.timing_ms.total:.1f} ms)  scored: {result.scored_text!r}")
    for w in result.warnings:
        typer.echo(f"warning ({w.code}): {w.detail}")
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
    from app.serving import ConfigError, prepare
    from stride.store import StoreError

    try:  # settings, store manifest and model directory checked before anything loads
        options = prepare()
    except (ConfigError, StoreError) as e:
        _fail(e)
    uvicorn.run("app.main:app", host=host, port=port, **options)


@app.command("worker-jobs")
def worker_jobs(
    store: Path = typer.Option(..., envvar="STRIDE_STORE", help="Operator store directory (the one served)."),
    redis_url: str = typer.Option(..., envvar="STRIDE_REDIS_URL", help="The service's Redis (the job queue)."),
    jobs_dir: Path | None = typer.Option(None, envvar="STRIDE_JOBS_DIR", help="One directory per job (resumable "
                                         "scan state); default: stride-jobs."),
    device: str | None = typer.Option(None, envvar="STRIDE_DEVICE", help="cpu, cuda ... (default: cuda if present)."),
    threads: int = typer.Option(1, help="Torch threads on CPU (0: torch's default, one per core)."),
    nice: int = typer.Option(10, help="CPU niceness added to this process, so that a scan sharing a machine with "
                             "`stride serve` yields to interactive queries (0: none)."),
) -> None:
    """Run background scan jobs (POST /v1/jobs/scan) from the Redis queue, one at a time (its model is not
    shared between threads: run more workers for more jobs at once); other settings from STRIDE_*."""
    import os

    os.environ["STRIDE_REDIS_URL"] = redis_url
    if jobs_dir is not None:
        os.environ["STRIDE_JOBS_DIR"] = str(jobs_dir)
    from arq import Worker
    from pydantic import ValidationError

    from app.settings import Settings
    from stride.query import Attributor
    from stride.store import StoreError
    from worker.jobs import worker_settings

    _logging()
    try:
        settings = Settings(store=store)
        if nice:
            os.nice(nice)
        if threads:
            import torch

            torch.set_num_threads(threads)
        attributor = Attributor.from_store(store, device=device, model=settings.model, verify=settings.verify_store)
    except (ValidationError, StoreError) as e:
        _fail(e)
    Worker(**worker_settings(settings, attributor)).run()


def main() -> None:
    app()


if __name__ == "__main__":
    main()


_ = SolverConfig  # re-exported for configs that name solver settings
