"""What was judged, and by whom: pinned revisions of the models, a fingerprint of the data, digests of the run files.

A nightly gate must tell a regression of the policy from a judge that changed under it (public toxicity scorers
have been retrained under published leaderboards). So a run records, for each model it reads, the revision it
resolved to (:func:`revision_of`):

- a directory (a ``tiny://`` world's artifact, a local copy of a model, an adapter): ``sha256:<hex>``, the SHA-256
  over its top-level weight and config files (:data:`PINNED_SUFFIXES`), each file's name and bytes in name order;
- a hub id found in the local Hugging Face cache: the commit hash of the cached snapshot (``kind: hub``);
- a hub id not (yet) in the cache: no revision (``kind: hub``, ``revision: null``): the run re-resolves it after
  its models are loaded (:func:`resolve_missing`).

For the data, :func:`rows_fingerprint` hashes the prompts the run used (train and test, each row's text and
token ids). After ``results.json`` and ``samples.jsonl`` are written, :func:`write_manifest` writes
``manifest.json`` with their SHA-256 (and the other run files'); :func:`verify_run` recomputes them
(``detox-harness verify RUN``). Pure file work: nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import HarnessError
from .results import CONFIG_FILE, MANIFEST_FILE, RESULTS_FILE, SAMPLES_FILE, TRAIN_STATS_FILE, read_json, write_json

#: the files of a model directory whose bytes make its revision: weights, configs, tokenizers
PINNED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack", ".json",
                   ".model", ".txt", ".vocab", ".merges", ".tiktoken", ".yaml", ".yml")
#: the models a run records, as (results key, config section, config field)
MODELS = (("policy", "policy", "model"), ("adapter", "policy", "adapter"), ("reward_model", "reward", "model"),
          ("second_judge", "eval", "second_classifier"), ("faithfulness_judge", "eval", "faithfulness_model"))
#: the judges: a baseline made with another revision of one of these is refused
JUDGES = ("reward_model", "second_judge", "faithfulness_judge")

MANIFEST_FORMAT = 1
#: the run files the manifest pins, in order (those a run has)
PINNED_FILES = (RESULTS_FILE, SAMPLES_FILE, TRAIN_STATS_FILE, CONFIG_FILE)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def directory_sha256(directory: str | Path) -> str:
    """SHA-256 over ``directory``'s top-level weight and config files: each name, its length and its bytes, in
    name order (a renamed, added, removed or changed file changes it; logs and checkpoints below do not)."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PINNED_SUFFIXES):
        h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _hub_commit(repo_id: str) -> str | None:
    """The commit hash of ``repo_id``'s snapshot in the local Hugging Face cache (no network); None if absent."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects: the loader reports it with its own message
        return None
    if not isinstance(cached, str):
        return None
    snapshot = Path(cached).parent  # .../models--org--name/snapshots/<commit>/config.json
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def revision_of(location: str | None, concrete: str | None = None) -> dict | None:
    """``{location, kind, revision}`` of one model location (``concrete``: the path it was resolved to, for a
    ``tiny://`` id); None for no model."""
    if not location:
        return None
    path = Path(os.path.expanduser(str(concrete or location)))
    if path.is_dir():
        return {"location": str(location), "kind": "directory", "revision": "sha256:" + directory_sha256(path)}
    if path.is_file():
        return {"location": str(location), "kind": "file", "revision": "sha256:" + file_sha256(path)}
    return {"location": str(location), "kind": "hub", "revision": _hub_commit(str(concrete or location))}


def model_revisions(cfg, loads) -> dict:
    """The revision of each model of a run (:data:`MODELS`): ``cfg`` names them as recorded (``tiny://`` ids
    kept), ``loads`` as loaded (the plan's concrete config)."""
    out = {}
    for key, section, name in MODELS:
        out[key] = revision_of(getattr(getattr(cfg, section), name), getattr(getattr(loads, section), name))
    return out


def resolve_missing(models: Mapping) -> dict:
    """``models`` with every hub model that had no revision resolved again (after loading, it is in the cache)."""
    out = {}
    for key, entry in models.items():
        if entry and entry.get("kind") == "hub" and not entry.get("revision"):
            entry = {**entry, "revision": _hub_commit(entry["location"])}
        out[key] = entry
    return out


def rows_fingerprint(datasets: Iterable, columns: tuple[str, ...] = ("id", "query", "input_ids")) -> str:
    """SHA-256 over the rows of ``datasets`` (each a ``datasets.Dataset`` or a list of dicts), in order: for each
    row the listed columns, as canonical JSON (a column a part lacks is null). Equal prompts and token ids, equal
    fingerprint."""
    h = hashlib.sha256()
    for part, ds in enumerate(datasets):
        h.update(f"part {part}\n".encode())
        if hasattr(ds, "column_names"):  # a datasets.Dataset: column by column, not row objects
            cols = [list(ds[c]) if c in ds.column_names else [None] * len(ds) for c in columns]
            rows = zip(*cols)
        else:
            rows = ([row.get(c) for c in columns] for row in ds)
        for row in rows:
            h.update(json.dumps(list(row), ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def require_same_judges(models: Mapping, baseline: Mapping, baseline_name: str = "baseline") -> None:
    """A HarnessError (exit 2) naming the model when a judge's revision differs from the one the baseline's runs
    used: its figures were measured by another judge. A baseline that recorded no revisions is not checked."""
    theirs = baseline.get("models") or {}
    for key in JUDGES:
        mine, recorded = (models.get(key) or {}), (theirs.get(key) or {})
        if key not in theirs or not recorded.get("revision") or not mine.get("revision"):
            continue
        if mine["revision"] != recorded["revision"]:
            raise HarnessError(
                f"the baseline was made with another revision of {key.replace('_', ' ')} {mine.get('location')} "
                f"({recorded['revision'][:19]}; this run reads {mine['revision'][:19]}): its figures were measured "
                "by another judge", field="--baseline", value=baseline_name,
                fix="run with the baseline's revision of that model, or regenerate the baseline with this one")


# ------------------------------------------------------------------------------------ the manifest

def write_manifest(run_dir: str | Path) -> Path:
    """``manifest.json``: the SHA-256 and size of each run file of :data:`PINNED_FILES` that ``run_dir`` holds.
    Written after them (a later change to one of them is a mismatch)."""
    run_dir = Path(run_dir)
    files = {name: {"sha256": file_sha256(run_dir / name), "bytes": (run_dir / name).stat().st_size}
             for name in PINNED_FILES if (run_dir / name).is_file()}
    path = run_dir / MANIFEST_FILE
    write_json(path, {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files})
    return path


def verify_run(run_dir: str | Path) -> list[str]:
    """The mismatches between ``run_dir``'s files and its manifest (empty: every file is as written).

    A missing run folder or manifest, or a manifest that is not one, is a HarnessError (bad input)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HarnessError("run folder not found", field="RUN", value=str(run_dir),
                           fix="pass the folder of a finished run (it holds results.json and manifest.json)")
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise HarnessError(f"has no {MANIFEST_FILE}", field="RUN", value=str(run_dir),
                           fix="only runs written by a harness that pins its files can be verified; re-run it")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise HarnessError(f"not a manifest of format {MANIFEST_FORMAT}", field=str(path),
                           fix="re-run the run with this harness")
    problems = []
    for name, entry in sorted(files.items()):
        target = run_dir / Path(str(name)).name
        if not target.is_file():
            problems.append(f"{name}: missing")
            continue
        found = file_sha256(target)
        if found != entry.get("sha256"):
            problems.append(f"{name}: sha256 {found[:16]}... differs from the manifest's "
                            f"{str(entry.get('sha256'))[:16]}... ({target.stat().st_size} bytes, manifest "
                            f"{entry.get('bytes')})")
    return problems
