"""``stride update``: a new store version from an old one, some examples added and some removed.

Everything is checked before anything is written (the model's hash, the added file line by line,
unknown or clashing ids). The refit then runs the build's own loop (``worker.build._fit_fidelity``:
checkpoints beside the output, resume after ``kill -9``, progress) on a view of the store holding
only the affected subsets, and the new store is written atomically like a build's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from stride.config import REFERENCE_MODES
from stride.corpus import Corpus, file_sha256
from stride.fit import FeatureSource, Targets
from stride.model import LM, pick_device, weights_sha256
from stride.store import MANIFEST, load_store, write_store
from stride.update import (
    UpdateConfig,
    UpdateError,
    check_added_ids,
    ids_digest,
    merge,
    operator_view,
    plan_update,
    read_removals,
    refit_steps,
    refit_visits,
    view,
    write_merged_corpus,
)
from worker.build import CHECKPOINT_FORMAT, World, _fit_fidelity

log = logging.getLogger("stride.update")


def update(
    store: str | Path, out: str | Path, add: str | Path | None = None, remove: str | Path | None = None,
    config: UpdateConfig | None = None, model: str | Path | None = None, device: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Write ``out``: ``store`` minus the ids listed in ``remove`` plus the examples of ``add`` (JSONL,
    each with an "id"), its affected operators refit. ``model`` if the store's model moved (same weights)."""
    t_start = time.perf_counter()
    cfg = config or UpdateConfig()
    if add is None and remove is None:
        raise UpdateError("nothing to do: give --add NEW.jsonl, --remove IDS.txt or both")
    out = Path(out).resolve()
    parent = load_store(store)  # verifies every file against the manifest
    bcfg = parent.config
    if bcfg.fit == "finetune":
        raise UpdateError(f"{store}: a finetune-mode store cannot be updated (its operators are per-subset "
                          "fine-tunes, not the fitted objective); rebuild it")
    model_dir = Path(model or parent.manifest["model"]["path"])
    want = parent.manifest["model"]["sha256"]
    if not model_dir.is_dir():
        raise UpdateError(f"{model_dir}: the store's model directory is missing (pass --model)")
    model_sha = weights_sha256(model_dir)
    if model_sha != want:
        raise UpdateError(f"{model_dir}: weights (sha256 {model_sha[:12]}) are not those the store {store} was "
                          f"built for (sha256 {want[:12]}); updating needs that model")
    ref_dir = None
    if bcfg.fit == "revert":
        info = parent.manifest.get("reference") or {}
        ref_dir = Path(info.get("path", ""))
        if not ref_dir.is_dir() or weights_sha256(ref_dir) != info.get("sha256"):
            raise UpdateError(f"{ref_dir}: the store's reference model (revert mode) is missing or changed")
    removed = read_removals(remove) if remove is not None else []
    added = Corpus.scan(add) if add is not None else None  # CorpusError names FILE:LINE
    if added is not None:
        check_added_ids(added)
    plan = plan_update(parent.corpus.ids, parent.membership, removed, added, cfg.seed)
    visits = refit_visits(cfg, bcfg.visits)
    steps = refit_steps(cfg, visits, len(plan.affected), bcfg.batch_size)
    rcfg = dataclasses.replace(bcfg, steps=steps, lr=cfg.lr or bcfg.lr, seed=cfg.seed,
                               checkpoint_every=cfg.checkpoint_every)
    parent_sha = file_sha256(Path(store) / MANIFEST)
    settings = [parent_sha, file_sha256(add) if add is not None else None, ids_digest(removed), cfg.to_dict(),
                rcfg.to_dict(), model_sha, CHECKPOINT_FORMAT, "update"]
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    # everything is checked: from here on files are written, beside ``out`` until the atomic rename
    ckpt = out.with_name(f".{out.name}.ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    corpus = write_merged_corpus(parent.corpus, plan.keep, added, ckpt / "corpus.jsonl")
    dev = pick_device(device)
    lm = LM.load(model_dir, dev, bcfg.max_length)
    ref = LM.load(ref_dir, dev, bcfg.max_length) if ref_dir is not None and bcfg.fit in REFERENCE_MODES else None
    K = parent.membership.num_subsets
    log.info("update: %d removed, %d added; refitting %d of %d operators for %d steps (%s mode)",
             len(plan.removed), len(plan.added), len(plan.affected), K, steps, bcfg.fit)
    part = operator_view(parent.operators, plan.affected, plan.lost if cfg.reset_removed else None).to(dev)
    t_fit = time.perf_counter()
    if steps > 0 and len(plan.affected):
        source = FeatureSource(lm, corpus, bcfg.layer, bcfg.activation_cache_mb, Targets.of(bcfg, ref))
        _fit_fidelity(part, lm, source, view(plan.membership, plan.affected), rcfg, World(), ckpt, fingerprint,
                      show_progress)
    fit_s = time.perf_counter() - t_fit
    ops = merge(parent.operators, part, plan.affected, plan.emptied)
    lineage = {
        "generation": parent.generation + 1,
        "parent": {"version": parent.version, "manifest_sha256": parent_sha, "path": str(Path(store).resolve())},
        "added": {"count": len(plan.added), "source": str(Path(add).resolve()) if add is not None else None,
                  "sha256": file_sha256(add) if add is not None else None, "ids": plan.added},
        "removed": {"count": len(plan.removed), "source": str(Path(remove).resolve()) if remove is not None else None,
                    "ids": plan.removed},
        "refit": {"subsets": len(plan.affected), "num_subsets": K, "emptied": len(plan.emptied),
                  "reset": len(plan.lost) if cfg.reset_removed else 0, "visits": visits, "steps": steps,
                  "lr": rcfg.lr,
                  "fit_seconds": round(fit_s, 2), "seconds": round(time.perf_counter() - t_start, 2),
                  "device": str(dev)},
        "update": cfg.to_dict(),
    }
    extra = {k: parent.manifest[k] for k in ("reference", "deployed", "build") if k in parent.manifest}
    write_store(out, config=bcfg, ops=ops, membership=plan.membership, corpus=corpus, model_path=model_dir,
                model_sha256=model_sha, extra=extra, lineage=lineage, corpus_source=f"{out}/corpus.jsonl")
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("update: wrote %s (generation %d) in %.1fs", out, lineage["generation"], time.perf_counter() - t_start)
    return out
