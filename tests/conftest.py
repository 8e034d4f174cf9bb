"""Shared fixtures: the embedded demo assets and a store built from them, once per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stride.config import BuildConfig
from stride.demo import write_demo_assets
from worker.build import build


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_assets(out)
    return out


@pytest.fixture(scope="session")
def demo_store(demo_dir: Path) -> Path:
    """A store built with the CLI defaults: what `make demo` serves."""
    logging.getLogger("stride").setLevel(logging.WARNING)
    return build(demo_dir / "model", demo_dir / "corpus.jsonl", demo_dir / "store", BuildConfig(),
                 show_progress=False)
