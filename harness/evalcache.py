"""A cached "before": the reference's evaluation, reused while nothing it depends on changed.

"Before" is the starting policy (base model + starting adapter) evaluated on fixed prompts with fixed seeds;
it does not depend on the run's seed nor on PPO. A nightly run with the same reference and evaluation
therefore measures the same "before" every night: :func:`before_key` hashes all it depends on, and a run finds
the saved evaluation under ``<cache>/before/<key>.json`` (:func:`load` / :func:`store`). The key holds:

- the revisions of the policy, the starting adapter, the reward model and every judge (:mod:`harness.provenance`);
- the settings that shape the reference and its scoring: ``policy`` (LoRA, dtype, reference), ``reward``,
  ``eval`` (prompts count, sampling, seeds, batch sizes, judges' labels and thresholds), ``device``;
- the fingerprint of the test prompts (their ids, texts and token ids);
- which evaluation (the reference, or the bare base model under a starting adapter);
- :data:`CACHE_FORMAT` and the SHA-256 of the source of the modules that compute an evaluation
  (:data:`CODE_MODULES`), the versions of torch, transformers, peft and tokenizers, and the device kind (the CPU
  kernels' capability, the GPU's name) (:func:`numerics`): a change to the evaluation code or its numerics is a
  changed key, never a stale hit.

A changed key evaluates again and stores the new evaluation; ``detox-harness run --no-cache`` evaluates again
without reading or writing the cache.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from .files import atomic_write_text
from .metrics import EvalOutput
from .results import dumps, jsonable

CACHE_FORMAT = 1
#: the modules whose code computes an evaluation: their source is part of the key
CODE_MODULES = ("evaluation.py", "metrics.py", "models.py", "toxicity.py", "faithfulness.py", "data.py",
                "ppo/rollout.py", "ppo/sampling.py", "ppo/batch.py", "ppo/core.py", "attention.py")
PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_digest() -> str:
    h = hashlib.sha256()
    for name in CODE_MODULES:
        path = PACKAGE / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return h.hexdigest()


def numerics(device: str) -> dict:
    """What decides an evaluation's float rounding besides the code: the libraries' versions and the device kind
    (CPU kernels' capability, or the GPU's name)."""
    from importlib import metadata

    import torch

    versions = {}
    for dist in ("torch", "transformers", "peft", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    kind = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        kind["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions, "device_kind": kind}


def before_key(cfg, models: dict, prompts_fingerprint: str, *, bare: bool = False) -> dict:
    """Everything a "before" evaluation depends on, as a JSON-able dict (its hash is the cache key)."""
    policy = {k: v for k, v in cfg.policy.__dict__.items() if k not in ("model", "adapter")}
    reward = {k: v for k, v in cfg.reward.__dict__.items() if k != "model"}
    evaluation = {k: v for k, v in cfg.eval.__dict__.items() if k not in ("second_classifier", "faithfulness_model")}
    revisions = {k: (v or {}).get("revision") if v else None for k, v in models.items()}
    return jsonable({"format": CACHE_FORMAT, "code": code_digest(), "which": "base" if bare else "reference",
                     "revisions": revisions, "policy": policy, "reward": reward, "eval": evaluation,
                     "device": cfg.device, "numerics": numerics(cfg.device), "prompts": prompts_fingerprint})


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: Path, key: dict) -> Path:
    return Path(cache_dir) / f"{key_digest(key)[:32]}.json"


def load(cache_dir: Path | None, key: dict) -> EvalOutput | None:
    """The cached evaluation of ``key``; None when there is none (or it cannot be read: then it is redone)."""
    if cache_dir is None:
        return None
    path = entry_path(cache_dir, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:  # a hash collision or a hand-edited entry: never a wrong hit
            return None
        return EvalOutput.from_json(data["evaluation"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(cache_dir: Path | None, key: dict, out: EvalOutput) -> Path | None:
    """Save ``out`` under ``key`` (atomically); a cache that cannot be written is skipped, never a failed run."""
    if cache_dir is None:
        return None
    path = entry_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dumps({"key": key, "evaluation": out.to_json()}) + "\n")
    except OSError:
        return None
    return path
