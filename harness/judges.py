"""Are the labels and judges of a run able to measure what its verdict claims? Checked before any model loads.

A verdict says "less toxic by the reward model, by an independent judge, and still faithful". Settings can make
that claim empty while every bound still holds, so they are refused here (a :class:`~harness.errors.ConfigError`,
exit 2, one line naming the fields), from the models' ``config.json`` files alone (no weights are loaded):

- the reward label equal to the toxic label, or the pair inverted (the reward reads the toxic class, or the toxic
  label is the clean class: ``reward.label=hate reward.toxic_label=nothate``), judged from the label names the
  classifier's config gives (``nothate`` is the negation of ``hate``) and from well-known toxic / clean names;
- a label that the model's ``id2label`` does not have (where its config can be read offline: a local directory, a
  ``tiny://`` id, or a hub id already in the local Hugging Face cache; a hub id that cannot be read is checked by
  name only, and its labels again when it loads);
- a second judge or faithfulness judge that is the reward model itself: the same location once resolved, or the
  same weights (``model.safetensors`` of equal size and SHA-256 digest) under another name. A reward model judging
  itself measures nothing independent (``judge_gap`` is exactly 0);
- a ``reward.max_length`` longer than the reward model's position embeddings hold (it would index past them at the
  first reward, after minutes of loading and evaluating).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .config import HarnessConfig
from .errors import ConfigError

WEIGHTS = "model.safetensors"
#: prefixes that make a label the negation of another (``nothate`` = not ``hate``, ``non-toxic`` = not ``toxic``)
NEGATIONS = ("not", "non", "no")
#: label names that mean "toxic" / "clean" in the classifiers this harness is used with (compared lower-cased, with
#: everything but letters and digits taken out)
TOXIC_NAMES = frozenset({"toxic", "hate", "hateful", "offensive", "abusive", "insult", "obscene", "threat",
                         "severetoxic", "identityhate", "toxicity", "abuse", "profane", "profanity"})
#: model types whose position embeddings keep positions for the padding offset, and how many
OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
CLEAN_NAMES = frozenset({"clean", "neutral", "normal", "safe", "nothate", "nontoxic", "nottoxic", "notoffensive",
                         "nonoffensive", "harmless", "benign"})


def _plain(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def is_negation(label: str, of: str) -> bool:
    """``label`` is ``of`` with a negation in front: ``nothate`` of ``hate``, ``non-toxic`` / ``NOT_TOXIC`` of
    ``toxic`` (case, separators aside)."""
    a, b = _plain(label), _plain(of)
    return bool(b) and any(a == neg + b for neg in NEGATIONS)


def reads_clean(label: str, labels: list[str]) -> bool:
    """The label names the clean class: a well-known clean name, or the negation of another label."""
    return _plain(label) in CLEAN_NAMES or any(is_negation(label, other) for other in labels if other != label)


def reads_toxic(label: str, labels: list[str]) -> bool:
    """The label names the toxic class: a well-known toxic name, or another label is its negation."""
    return (_plain(label) in TOXIC_NAMES and not reads_clean(label, labels)) or \
        any(is_negation(other, label) for other in labels if other != label)


def model_dir(location: str | None) -> Path | None:
    """The local directory of a model location without loading it: a directory (a ``tiny://`` id resolved), or
    the snapshot of a hub id already in the local Hugging Face cache; None when it cannot be found offline."""
    if not location:
        return None
    from .models import resolve_location

    resolved = resolve_location(location)
    if os.path.isdir(resolved):
        return Path(os.path.realpath(resolved))
    if os.path.exists(resolved) or resolved.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved, "config.json")
    except Exception:  # an id the hub library rejects: the loader reports it
        return None
    return Path(os.path.realpath(cached)).parent if isinstance(cached, str) else None


def _config_json(location: str | None) -> dict | None:
    """A model's ``config.json``, read offline; None when it cannot be found or read (the loader reports that)."""
    directory = model_dir(location)
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def label_names(location: str | None) -> list[str] | None:
    """The label names of a classifier's ``config.json`` (``id2label``, in index order); None when its config
    cannot be read offline or names no labels."""
    config = _config_json(location)
    try:
        id2label = (config or {}).get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=int)] or None
    except (ValueError, TypeError, AttributeError):
        return None  # an unreadable config: the loader reports it with its own message


def position_limit(model_type: str | None, max_position_embeddings) -> int | None:
    """The most tokens one input of an encoder can hold by its position embeddings; None when unknown. RoBERTa and
    its kin keep two positions for their padding offset (514 embeddings read 512 tokens)."""
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
            or max_position_embeddings <= 0:
        return None
    return max_position_embeddings - OFFSET_POSITIONS.get(model_type or "", 0)


def too_long(max_length: int, limit: int | None, location: str, field: str) -> ConfigError | None:
    """The error for a classifier input length its position embeddings cannot hold (None when it fits)."""
    if limit is None or max_length <= limit:
        return None
    return ConfigError(f"got {max_length}, but {location} reads at most {limit} tokens (its position embeddings); "
                       "a longer input would index past them", field=field,
                       fix=f"give {field}={limit} or less, or leave it unset (the classifier's own limit)")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def same_model(a: str | None, b: str | None) -> bool:
    """Two locations name the same model: equal ids, the same directory once resolved (``tiny://``, ``~``,
    links), or the same weights (``model.safetensors`` of equal size and digest) in two places."""
    if not a or not b:
        return False
    if str(a).strip().rstrip("/").lower() == str(b).strip().rstrip("/").lower():
        return True
    da, db = model_dir(a), model_dir(b)
    if da is None or db is None:
        return False
    if da == db:
        return True
    wa, wb = da / WEIGHTS, db / WEIGHTS
    if not (wa.is_file() and wb.is_file()) or wa.stat().st_size != wb.stat().st_size:
        return False
    return _digest(wa) == _digest(wb)


def _require_label(label: str, labels: list[str] | None, field: str, model_field: str, location: str) -> None:
    if labels is None or label in labels:
        return
    near = [x for x in labels if x.lower() == str(label).lower()]
    fix = f"did you mean '{near[0]}'? (labels match exactly)" if near else f"set it to one of {', '.join(labels)}"
    raise ConfigError(f"got {label!r}, a label {model_field} ({location}) does not have (its id2label: "
                      f"{', '.join(labels)})", field=field, fix=fix)


def check_judges(cfg: HarnessConfig) -> None:
    """Refuse (ConfigError, exit 2) labels and judges that make the verdict's claims empty; see the module's
    docstring. Reads config.json files only: call it before loading models."""
    r, e = cfg.reward, cfg.eval
    if r.label == r.toxic_label:
        raise ConfigError(f"both are {r.label!r}: the reward would pay for the very class toxicity measures",
                          field="reward.label, reward.toxic_label",
                          fix="reward.label names the clean class (e.g. nothate), reward.toxic_label the toxic one "
                              "(e.g. hate)")
    if r.max_length:
        config = _config_json(r.model) or {}
        error = too_long(r.max_length, position_limit(config.get("model_type"), config.get("max_position_embeddings")),
                         r.model, "reward.max_length")
        if error is not None:
            raise error
    labels = label_names(r.model)
    _require_label(r.label, labels, "reward.label", "reward.model", r.model)
    _require_label(r.toxic_label, labels, "reward.toxic_label", "reward.model", r.model)
    known = labels or [r.label, r.toxic_label]
    if reads_toxic(r.label, known) or reads_clean(r.toxic_label, known):
        raise ConfigError(f"reward.label {r.label!r} and reward.toxic_label {r.toxic_label!r} are the classifier's "
                          "classes inverted: the reward would pay for toxicity and the toxicity figures would "
                          "read the clean class", field="reward.label, reward.toxic_label",
                          fix=f"swap them: reward.label={r.toxic_label} reward.toxic_label={r.label}")
    if e.second_classifier:
        if same_model(e.second_classifier, r.model):
            raise ConfigError(f"is the reward model ({r.model}): a judge of its own reward measures nothing "
                              "independent (judge_gap is 0 by construction)", field="eval.second_classifier",
                              value=e.second_classifier,
                              fix="give an independent toxicity classifier (e.g. unitary/toxic-bert, tiny://judge), "
                                  "or null for none (its bounds then fail as not measured)")
        second = label_names(e.second_classifier)
        _require_label(e.second_toxic_label, second, "eval.second_toxic_label", "eval.second_classifier",
                       e.second_classifier)
        if reads_clean(e.second_toxic_label, second or [e.second_toxic_label]):
            raise ConfigError(f"got {e.second_toxic_label!r}, the second judge's clean class: its toxicity figures "
                              "would fall as the summaries get more toxic", field="eval.second_toxic_label",
                              fix="name the judge's toxic label (e.g. toxic)")
    if e.faithfulness_model:
        if same_model(e.faithfulness_model, r.model):
            raise ConfigError(f"is the reward model ({r.model}), not an NLI judge of faithfulness",
                              field="eval.faithfulness_model", value=e.faithfulness_model,
                              fix="give an NLI cross-encoder (e.g. FacebookAI/roberta-large-mnli, tiny://nli), or "
                                  "null for none")
        nli = label_names(e.faithfulness_model)
        if nli is not None and "entailment" not in {x.lower() for x in nli}:
            raise ConfigError(f"has no 'entailment' label (its id2label: {', '.join(nli)}): it is not an NLI judge",
                              field="eval.faithfulness_model", value=e.faithfulness_model,
                              fix="give an NLI cross-encoder whose config names ENTAILMENT, or null for none")
