"""``stride update``: balanced assignment, partial refit, lineage, errors, kill -9 resume, and
removal then re-addition of a planted fact on the demo store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import write_corpus, write_model
from safetensors.torch import load_file, save_file
from test_resume import _fixed_threads  # noqa: F401  (autouse: one thread, so a resumed refit is bit-exact)

from stride.config import BuildConfig
from stride.corpus import Corpus
from stride.design import random_design
from stride.fit import sample_step
from stride.query import Attributor
from stride.store import MANIFEST, content_version, load_store
from stride.update import UpdateConfig, UpdateError, balanced_assignment, plan_update, view
from worker.build import build
from worker.update import update

K, D = 12, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("update")
    model = write_model(root / "model")
    lines = write_corpus(root / "all.jsonl", 48, prompt_every=4).read_text().splitlines(keepends=True)
    (root / "base.jsonl").write_text("".join(lines[:40]))
    (root / "add.jsonl").write_text("".join(lines[40:]))
    (root / "remove.txt").write_text("ex3\nex17\n")
    store = build(model, root / "base.jsonl", root / "store", BuildConfig(steps=20, num_subsets=K, memberships=D,
                                                                           rank=4, seed=1),
                  device="cpu", show_progress=False)
    return {"root": root, "model": model, "store": store}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ balanced assignment


def test_balanced_assignment_fills_the_smallest_subsets_first() -> None:
    sizes = np.array([9, 0, 0, 3, 5, 1, 0, 2])
    rows = balanced_assignment(sizes, 20, 3, seed=0)
    assert rows.shape == (20, 3) and rows.dtype == np.int32
    assert all(len(set(r)) == 3 for r in rows.tolist())  # d distinct subsets each
    after = sizes + np.bincount(rows.ravel(), minlength=8)
    assert after.sum() == sizes.sum() + 60
    # 80 memberships over 8 subsets: all reach 10 except the one that already had 9 ... within one
    assert after.max() - after.min() <= 1, after
    # the first example joins three of the empty subsets
    assert set(rows[0].tolist()) <= {1, 2, 6}
    assert np.array_equal(rows, balanced_assignment(sizes, 20, 3, seed=0))
    assert not np.array_equal(rows, balanced_assignment(sizes, 20, 3, seed=1))  # ties broken by the seed


def test_balanced_assignment_spreads_few_examples_over_equal_subsets() -> None:
    rows = balanced_assignment(np.full(100, 7), 30, 3, seed=4)
    counts = np.bincount(rows.ravel(), minlength=100)
    assert counts.max() == 1 and counts.sum() == 90  # 90 memberships, no subset twice
    with pytest.raises(UpdateError, match="memberships"):
        balanced_assignment(np.zeros(2), 1, 3, seed=0)


# ------------------------------------------------------------------ the plan and the view


def test_plan_checks_ids_and_marks_the_changed_subsets(tiny) -> None:
    st = load_store(tiny["store"])
    ids, mem = st.corpus.ids, st.membership
    with pytest.raises(UpdateError, match=r"not in the store: 'nope'"):
        plan_update(ids, mem, ["ex1", "nope"], None, seed=0)
    added = Corpus.scan(tiny["root"] / "all.jsonl")  # ex0..ex47: ex0..ex39 are already in the store
    with pytest.raises(UpdateError, match=r"40 id\(s\) already in the store: 'ex0', 'ex1'"):
        plan_update(ids, mem, [], added, seed=0)
    new = Corpus.scan(tiny["root"] / "add.jsonl")
    plan = plan_update(ids, mem, ["ex3", "ex17"], new, seed=0)
    old_rows = mem.rows()
    assert plan.keep.tolist() == [i for i in range(40) if i not in (3, 17)]
    assert plan.membership.num_examples == 38 + 8 and plan.membership.memberships == D
    new_rows = plan.membership.rows()
    assert np.array_equal(new_rows[:38], old_rows[plan.keep])  # kept examples keep their subsets
    changed = set(old_rows[[3, 17]].ravel().tolist()) | set(new_rows[38:].ravel().tolist())
    assert plan.affected.tolist() == sorted(changed) and plan.lost.tolist() == sorted(set(old_rows[[3, 17]].ravel()))
    # a replaced document: removed and added again under the same id in one update
    again = plan_update(ids, mem, ["ex5"], Corpus.scan(_write(tiny["root"] / "ex5.jsonl", [("ex5", "a b c .")])), 0)
    assert again.added == ["ex5"] and 5 not in again.keep.tolist()


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    return path


def test_the_view_samples_members_and_outsiders_of_the_affected_subsets_only() -> None:
    mem = random_design(200, 40, 4, seed=3)
    affected = torch.tensor([2, 5, 11, 30, 31])
    part = view(mem, affected)
    assert part.num_subsets == 5 and part.num_examples == 200
    for j, k in enumerate(affected.tolist()):
        assert torch.equal(part.members(j), mem.members(k))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        step = sample_step(part, 3, 4, gen)
        fid_k, stab_k = affected[step.fid_k], affected[step.stab_k]
        rows = mem.subsets_of()
        assert (rows[step.fid_e] == fid_k[:, None]).any(1).all()  # members of the global subset
        assert not (rows[step.stab_e] == stab_k[:, None]).any(1).any()  # outsiders of it
        assert step.stab_e.numel() > 0


# ------------------------------------------------------------------ the update itself


def test_update_refits_only_the_affected_operators_and_records_its_lineage(tiny, tmp_path: Path) -> None:
    out = update(tiny["store"], tmp_path / "v1", add=tiny["root"] / "add.jsonl", remove=tiny["root"] / "remove.txt",
                 config=UpdateConfig(visits=3), device="cpu", show_progress=False)
    old, new = load_store(tiny["store"]), load_store(out)
    lin = new.manifest["lineage"]
    refit = set(plan_update(old.corpus.ids, old.membership, ["ex3", "ex17"],
                            Corpus.scan(tiny["root"] / "add.jsonl"), 0).affected.tolist())
    assert lin["refit"]["subsets"] == len(refit) and 0 < len(refit) < K and lin["refit"]["steps"] > 0
    for k in range(K):
        same = torch.equal(new.operators.A[k], old.operators.A[k])
        assert same == (k not in refit), k  # refit rows moved, the rest copied bit for bit
    for name in ("w_psi", "h_mean", "h_scale"):  # the shared basis is frozen
        assert torch.equal(getattr(new.operators, name), getattr(old.operators, name)), name
    assert new.config == old.config
    ids = list(new.corpus.ids)
    assert "ex3" not in ids and "ex17" not in ids and ids[-8:] == [f"ex{i}" for i in range(40, 48)]
    assert len(ids) == new.membership.num_examples == 46
    text = (out / "corpus.jsonl").read_text()
    assert '"ex3"' not in text and '"ex17"' not in text and '"ex47"' in text
    assert [r.text for r in new.corpus.records(range(46))] == [r.text for r in old.corpus.records(
        [i for i in range(40) if i not in (3, 17)])] + [r.text for r in Corpus.scan(tiny["root"] / "add.jsonl")
                                                         .records(range(8))]
    sizes = new.membership.sizes()
    assert int(sizes.max() - sizes.min()) <= int(old.membership.sizes().max() - old.membership.sizes().min()) + 1
    assert lin["generation"] == 1 and new.generation == 1 and old.generation == 0
    assert lin["parent"]["version"] == old.version != new.version == content_version(new.manifest["files"])
    assert lin["parent"]["manifest_sha256"] == __import__("hashlib").sha256(
        (tiny["store"] / MANIFEST).read_bytes()).hexdigest()
    assert lin["added"]["ids"] == [f"ex{i}" for i in range(40, 48)] and lin["removed"]["ids"] == ["ex3", "ex17"]
    assert lin["update"]["visits"] == 3 and new.manifest["corpus"]["path"].endswith("v1/corpus.jsonl")
    assert _leftovers(tmp_path) == []
    # a second generation from the first
    v2 = update(out, tmp_path / "v2", remove=_lines(tmp_path / "rm2.txt", ["ex40"]), config=UpdateConfig(steps=2),
                device="cpu", show_progress=False)
    st2 = load_store(v2)
    assert st2.generation == 2 and st2.manifest["lineage"]["parent"]["version"] == new.version
    assert Attributor.from_store(v2, device="cpu").attribute("the old farmer", " crossed the river .").proponents


def _lines(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def test_reset_removed_restarts_the_operators_that_lost_an_example(tiny, tmp_path: Path) -> None:
    out = update(tiny["store"], tmp_path / "s", remove=tiny["root"] / "remove.txt",
                 config=UpdateConfig(steps=0, reset_removed=True), device="cpu", show_progress=False)
    old, new = load_store(tiny["store"]), load_store(out)
    lost = set(old.membership.rows()[[3, 17]].ravel().tolist())
    for k in range(K):
        assert (new.operators.A[k].abs().sum() == 0) == (k in lost), k
    assert new.manifest["lineage"]["refit"]["reset"] == len(lost)


def test_a_store_without_a_version_field_is_versioned_by_its_operators(tiny, tmp_path: Path) -> None:
    path = shutil.copytree(tiny["store"], tmp_path / "old")
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["version"], manifest["lineage"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    st = load_store(path)
    assert st.version == manifest["files"]["operators.safetensors"][:16] and st.generation == 0


@pytest.mark.parametrize("case", ["model", "duplicate", "unknown", "no-id", "twice", "nothing"])
def test_bad_updates_are_refused_and_write_nothing(tiny, tmp_path: Path, case: str) -> None:
    root = tiny["root"]
    kwargs: dict = {"add": root / "add.jsonl"}
    if case == "model":
        other = shutil.copytree(tiny["model"], tmp_path / "other")
        weights = load_file(other / "model.safetensors")
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1e-3
        save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
        kwargs["model"], match = other, "not those the store .* was built for"
    elif case == "duplicate":
        kwargs["add"] = _write(tmp_path / "dup.jsonl", [("new1", "a b ."), ("ex7", "c d ."), ("ex9", "e .")])
        match = r"2 id\(s\) already in the store: 'ex7', 'ex9'"
    elif case == "unknown":
        kwargs["remove"], match = _lines(tmp_path / "rm.txt", ["ex1", "ghost"]), "not in the store: 'ghost'"
    elif case == "no-id":
        (tmp_path / "noid.jsonl").write_text('{"id": "n1", "text": "a b ."}\n\n{"text": "c d ."}\n')
        kwargs["add"], match = tmp_path / "noid.jsonl", r"noid.jsonl:3: an added example needs an 'id'"
    elif case == "twice":
        kwargs["remove"], match = _lines(tmp_path / "rm.txt", ["ex1", "ex2", "ex1"]), r"rm.txt:3: id 'ex1' is listed"
    else:
        kwargs, match = {}, "nothing to do"
    with pytest.raises(UpdateError, match=match):
        update(tiny["store"], tmp_path / "out", device="cpu", show_progress=False, **kwargs)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ kill -9 and resume


def test_kill_and_resume_gives_the_same_store(tiny, tmp_path: Path) -> None:
    root = tiny["root"]

    def args(out: Path) -> list[str]:
        return [sys.executable, "-m", "worker.cli", "update", "--store", str(tiny["store"]), "--out", str(out),
                "--add", str(root / "add.jsonl"), "--remove", str(root / "remove.txt"), "--steps", "40",
                "--checkpoint-every", "4", "--device", "cpu", "--quiet"]

    # the reference runs uninterrupted in a fresh process too: in this one, earlier tests may have set up
    # MKL's threads differently, and float sums then change order
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert subprocess.run(args(ref), capture_output=True, text=True, timeout=400).returncode == 0
    state = tmp_path / ".out.ckpt" / "state.pt"
    proc = subprocess.Popen(args(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the update finished before it could be killed"
    assert not out.exists()
    assert 0 < torch.load(state, weights_only=False)["step"] < 40
    done = subprocess.run(args(out), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "resuming at step" in done.stderr and not (tmp_path / ".out.ckpt").exists()
    for name in ("operators.safetensors", "basis.safetensors", "membership.safetensors", "corpus.jsonl"):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name


def test_the_cli_names_a_bad_removal(tiny, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "update", "--store", str(tiny["store"]), "--out",
                           str(tmp_path / "o"), "--remove", str(_lines(tmp_path / "r.txt", ["zz"])), "--quiet"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2 and "not in the store: 'zz'" in proc.stderr and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ on the demo: remove a fact, add it back


def test_a_removed_fact_is_gone_and_found_again_once_added(demo_dir: Path, demo_store: Path, tmp_path: Path) -> None:
    queries = [json.loads(line) for line in (demo_dir / "queries.jsonl").read_text().splitlines() if line.strip()]
    full = Attributor.from_store(demo_store, device="cpu")
    # a fact the full store finds at rank 1
    q = next(q for q in queries[:40] if full.attribute(q["prompt"], q["completion"], top_k=1).proponents[0].id
             in q["support"])
    support = q["support"]
    texts = {rid: full.example(rid).text for rid in support}

    removed = update(demo_store, tmp_path / "removed", remove=_lines(tmp_path / "rm.txt", support),
                     device="cpu", show_progress=False)
    st = load_store(removed)
    assert not any(rid in st.corpus.ids for rid in support)
    corpus_copy = (removed / "corpus.jsonl").read_text()
    assert not any(texts[rid] in corpus_copy or f'"{rid}"' in corpus_copy for rid in support)
    # every operator whose subset held a removed document was refit; the others are bit for bit the parent's
    held = set(full.store.membership.rows()[[full.store.corpus.index_of(r) for r in support]].ravel().tolist())
    moved = {k for k in range(st.operators.num_subsets) if not torch.equal(st.operators.A[k],
                                                                             full.store.operators.A[k])}
    assert moved == held and st.manifest["lineage"]["refit"]["subsets"] == len(held)
    gone = Attributor.from_store(removed, device="cpu").attribute(q["prompt"], q["completion"], top_k=20)
    assert not {s.id for s in gone.proponents + gone.opponents} & set(support)

    # the same documents come back as new examples: the fact's query finds one of them first
    new_ids = [f"readded-{rid}" for rid in support]
    add = _write(tmp_path / "add.jsonl", [(n, texts[rid]) for n, rid in zip(new_ids, support, strict=True)])
    back = update(removed, tmp_path / "back", add=add, device="cpu", show_progress=False)
    top = Attributor.from_store(back, device="cpu").attribute(q["prompt"], q["completion"], top_k=3).proponents
    assert top[0].id in new_ids, [(s.id, s.score) for s in top]
    assert load_store(back).generation == 2
