"""kill -9 during a build, re-run with the same arguments: the same store as an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import write_corpus, write_model
from safetensors.torch import load_file

from stride.config import BuildConfig
from stride.store import load_store
from worker.build import build

STEPS = 60


@pytest.fixture(autouse=True)
def _fixed_threads(monkeypatch: pytest.MonkeyPatch):
    """Bit-exact comparisons need one reduction order: MKL and OpenMP may vary thread use with load."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MKL_DYNAMIC", "FALSE")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _subsets(fit: str) -> int:
    return 16 if fit == "fidelity" else 6  # finetune mode fine-tunes a model copy per subset: keep it small


def _args(model: Path, data: Path, out: Path, fit: str) -> list[str]:
    args = [sys.executable, "-m", "worker.cli", "build", "--model", str(model), "--data", str(data),
            "--out", str(out), "--num-subsets", str(_subsets(fit)), "--memberships", "3", "--rank", "4",
            "--batch-size", "8", "--seed", "3", "--device", "cpu", "--quiet", "--fit", fit]
    if fit == "fidelity":
        return [*args, "--steps", str(STEPS), "--checkpoint-every", "5"]
    return [*args, "--steps", "1", "--checkpoint-every", "10", "--finetune-steps", "2"]  # a checkpoint per subset


def _config(fit: str) -> BuildConfig:
    """The BuildConfig the command line above makes."""
    common = dict(num_subsets=_subsets(fit), memberships=3, rank=4, batch_size=8, seed=3, fit=fit)
    if fit == "fidelity":
        return BuildConfig(steps=STEPS, checkpoint_every=5, **common)
    return BuildConfig(steps=1, checkpoint_every=10, finetune_steps=2, **common)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("fit", ["fidelity", "finetune"])
def test_kill_and_resume_gives_the_same_store(tmp_path: Path, fit: str) -> None:
    model = write_model(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.jsonl", 48, prompt_every=5)
    # the reference, uninterrupted, in process (one interpreter start less)
    ref = build(model, data, tmp_path / "ref", _config(fit), device="cpu", show_progress=False)

    out = tmp_path / "out"
    state = tmp_path / ".out.ckpt" / "state.pt"
    proc = subprocess.Popen(_args(model, data, out, fit), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not out.exists()  # a killed build leaves no store ...
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.ckpt"]  # nor temp
    killed_at = torch.load(state, weights_only=False)["step"]
    total = STEPS if fit == "fidelity" else _subsets(fit)
    assert 0 < killed_at < total

    resumed = _run(_args(model, data, out, fit))
    assert f"resuming at {'step' if fit == 'fidelity' else 'subset'} " in resumed.stderr, resumed.stderr
    assert not (tmp_path / ".out.ckpt").exists()

    for name in ("operators.safetensors", "basis.safetensors", "membership.safetensors"):
        a, b = load_file(ref / name), load_file(out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    assert load_store(out).config == load_store(ref).config
    assert load_store(out).operators.A.abs().sum() > 0  # trained, not the zero initialisation


def test_a_checkpoint_from_other_settings_is_ignored(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.jsonl", 32)
    out = tmp_path / "out"
    ckpt = tmp_path / ".out.ckpt"
    ckpt.mkdir()
    torch.save({"ops": {}, "opt": {}, "step": 3, "fingerprint": "not-these-settings"}, ckpt / "state.pt")
    proc = _run([sys.executable, "-m", "worker.cli", "build", "--model", str(model), "--data", str(data),
                 "--out", str(out), "--num-subsets", "16", "--memberships", "3", "--rank", "4", "--steps", "6",
                 "--device", "cpu", "--quiet"])
    assert "ignoring checkpoint" in proc.stderr
    assert load_store(out).config.steps == 6 and not ckpt.exists()
