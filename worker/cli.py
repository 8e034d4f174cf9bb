"""The ``stride`` command: build, attribute, demo-assets, serve, bench."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from stride.config import BuildConfig, SolverConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
DEFAULTS = BuildConfig()


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def build(
    model: Path = typer.Option(..., help="Hugging Face causal-LM directory (local)."),
    data: Path = typer.Option(..., help="JSONL corpus: {id?, text} or {id?, prompt, completion} per line."),
    out: Path = typer.Option(..., help="Store directory to write (replaced atomically)."),
    reference_model: Path | None = typer.Option(
        None, help="The checkpoint MODEL was fine-tuned from (same tokenizer and architecture); enables the "
                   "revert (default with it) and add modes."),
    layer: int | None = typer.Option(None, help="Block whose output the basis reads [default: middle, never the "
                                                "last]."),
    rank: int = typer.Option(DEFAULTS.rank, help="Basis rank r."),
    num_subsets: int | None = typer.Option(None, "--num-subsets", "-K", help="K [default: n, clamped to 128..1000]."),
    memberships: int = typer.Option(DEFAULTS.memberships, "--memberships", "-d", help="Subsets per example."),
    steps: int | None = typer.Option(None, help="Optimiser steps [default: --visits x K / --batch-size]."),
    visits: int = typer.Option(DEFAULTS.visits, help="Default steps: times each subset is drawn."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, help="Subsets per step."),
    members_per_subset: int = typer.Option(DEFAULTS.members_per_subset, help="Examples per subset per step."),
    lr: float = typer.Option(DEFAULTS.lr, help="Adam learning rate."),
    stability_weight: float = typer.Option(DEFAULTS.stability_weight, help="Weight of the KL stability term."),
    seed: int = typer.Option(DEFAULTS.seed),
    fit: str | None = typer.Option(None, help="revert | add (need --reference-model) | forget | fidelity | finetune "
                                              "[default: revert with a reference, else fidelity]."),
    target_top_k: int = typer.Option(DEFAULTS.target_top_k, help="Target tokens kept per position (0: all)."),
    positions: int = typer.Option(DEFAULTS.positions, help="Positions scored per example per step (0: all)."),
    forget_factor: float = typer.Option(DEFAULTS.forget_factor, help="forget mode: observed-token scale."),
    max_length: int = typer.Option(DEFAULTS.max_length, help="Tokens per example (longer ones are cut)."),
    finetune_steps: int = typer.Option(DEFAULTS.finetune_steps, help="finetune mode: steps per subset."),
    finetune_lr: float = typer.Option(DEFAULTS.finetune_lr, help="finetune mode: learning rate."),
    checkpoint_every: int = typer.Option(DEFAULTS.checkpoint_every, help="Steps between checkpoints."),
    activation_cache_mb: int = typer.Option(
        DEFAULTS.activation_cache_mb, help="Cache frozen activations up to this many MiB; stream beyond."
    ),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... [default: cuda if present]."),
    config: Path | None = typer.Option(None, help="JSON BuildConfig; command-line options are ignored."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Learn the steering operators for a model and corpus; write an operator store."""
    from stride.config import FIT_MODES, ConfigError
    from stride.corpus import CorpusError
    from stride.model import ModelMismatchError
    from worker.build import build as run_build

    _logging()
    if fit is not None and fit not in FIT_MODES:
        _fail(ConfigError(f"--fit must be one of {', '.join(FIT_MODES)}, not {fit!r}"))
    if config is not None:
        cfg = BuildConfig.from_dict(json.loads(config.read_text()))
    else:
        cfg = BuildConfig(
            layer=layer, rank=rank, num_subsets=num_subsets, memberships=memberships, steps=steps, visits=visits,
            batch_size=batch_size, members_per_subset=members_per_subset, lr=lr,
            stability_weight=stability_weight, seed=seed, fit=fit, max_length=max_length,  # type: ignore[arg-type]
            finetune_steps=finetune_steps, finetune_lr=finetune_lr, checkpoint_every=checkpoint_every,
            activation_cache_mb=activation_cache_mb, target_top_k=target_top_k, positions=positions,
            forget_factor=forget_factor,
        )
    try:
        path = run_build(model, data, out, cfg, device=device, show_progress=not quiet, reference_model=reference_model)
    except (CorpusError, ConfigError, ModelMismatchError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(str(path))


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

    summary = write_demo_assets(out, DemoSpec(seed=seed))
    typer.echo(json.dumps(summary))


@app.command()
def serve(
    store: Path = typer.Option(..., envvar="STRIDE_STORE", help="Operator store directory."),
    host: str = typer.Option("127.0.0.1", envvar="STRIDE_HOST"),
    port: int = typer.Option(8000, envvar="STRIDE_PORT"),
    device: str | None = typer.Option(None, envvar="STRIDE_DEVICE", help="cpu, cuda ... [default: cuda]."),
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
