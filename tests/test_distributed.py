"""Data-parallel build: torchrun, 2 CPU processes, gloo."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import write_corpus, write_model

from stride.query import Attributor
from stride.store import load_store

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"), reason="torchrun not installed")
@pytest.mark.parametrize("fit", ["fidelity", "finetune"])
def test_torchrun_two_processes(tmp_path: Path, fit: str) -> None:
    model = write_model(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.jsonl", 40, prompt_every=4)
    out = tmp_path / "store"
    cmd = [str(TORCHRUN if TORCHRUN.exists() else shutil.which("torchrun")), "--nnodes", "1",
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "worker.cli", "build", "--model", str(model), "--data", str(data), "--out", str(out),
           "--num-subsets", "16", "--memberships", "3", "--rank", "4", "--batch-size", "4", "--steps", "12",
           "--checkpoint-every", "5", "--device", "cpu", "--quiet", "--fit", fit, "--finetune-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "model", "store"]  # one store, no leftovers
    store = load_store(out)
    assert store.manifest["build"]["world_size"] == 2
    A = store.operators.A
    assert A.shape == (16, 4, 32) and torch.isfinite(A).all()
    if fit == "finetune":  # every subset got an operator, whichever rank fitted it
        assert (A.flatten(1).abs().sum(1) > 0).all()
    else:
        assert A.abs().sum() > 0
    result = Attributor.from_store(out, device="cpu").attribute("the old farmer", " crossed the river .", top_k=5)
    assert math.isfinite(result.loss)
    assert result.proponents and all(math.isfinite(s.score) for s in result.proponents + result.opponents)
