"""A run's files: their names, their schema, how they are built, written and read back.

Every file of a run folder (``reports/<run-id>/``) is named here and nowhere else, and every module that
writes or reads one (the jobs, the PPO trainer, the report, the CLI) goes through the functions of this
module:

- :func:`atomic_write_text` / :func:`write_json`: write to a temporary file in the same folder, flush it to
  disk, then rename it into place, so a crash leaves the old file or the new one, never half of one;
- :func:`append_jsonl` (one flushed line, e.g. a PPO step's statistics) and :func:`read_jsonl`;
- :func:`read_json` and :func:`load_results`: a bad file is a :class:`HarnessError` naming the file;
- :func:`jsonable`: plain JSON types (numpy and torch scalars, paths, non-finite numbers as ``null``);
- :func:`build_results` / :func:`write_run_files`: ``results.json`` and ``samples.jsonl``, validated against
  the JSON Schemas in ``harness/schemas/`` (``docs/results-schema.md`` explains every field).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import subprocess  # noqa: S404 - runs git only, with a fixed argument list
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import HarnessConfig
from .errors import HarnessError
from .files import atomic_write_text
from .metrics import COMPARISON_KEYS, PHASE_KEYS, EvalOutput, check_paired, compare, qualitative_rows

# ---------------------------------------------------------------------------------------------- file names
RESULTS_FILE = "results.json"  # written last: its presence marks a finished run
SAMPLES_FILE = "samples.jsonl"
TRAIN_STATS_FILE = "train_stats.jsonl"
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"  # warnings and, after an unexpected exception, its traceback
BEFORE_FILE = "eval_before.json"  # the "before" evaluation, kept so that a resumed run does not redo it
BASE_FILE = "eval_base.json"  # with a starting adapter: the bare base model's evaluation, kept the same way
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"  # SHA-256 of the run's files, written after them (harness.provenance)
CURVE_FILE = "curve.jsonl"  # the over-optimisation curve: one row per evaluated PPO step (harness/curve.py)
SELECTED_DIR = "selected"  # the adapter of the curve's selected point, beside checkpoints/ (harness/curve.py)
SELECTION_FILE = "selection.json"  # inside SELECTED_DIR: the step its adapter is of

SCHEMA_DIR = Path(__file__).with_name("schemas")
RESULTS_SCHEMA_FILE = SCHEMA_DIR / "results.schema.json"
SAMPLE_SCHEMA_FILE = SCHEMA_DIR / "sample.schema.json"
CURVE_SCHEMA_FILE = SCHEMA_DIR / "curve.schema.json"
SCHEMA_FIX = "see docs/results-schema.md"

_RESERVED = {"schema_version", "run_id", "created", "preset", "config", "seeds", "environment", "timings", "metrics",
             "qualitative", "verdict", "baseline", "files"}


# ---------------------------------------------------------------------------------------------- schema

@lru_cache(maxsize=None)
def _schema(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def results_schema() -> dict:
    """The JSON Schema of ``results.json`` (``harness/schemas/results.schema.json``)."""
    return copy.deepcopy(_schema(RESULTS_SCHEMA_FILE))


def sample_schema() -> dict:
    """The JSON Schema of one ``samples.jsonl`` row (``harness/schemas/sample.schema.json``)."""
    return copy.deepcopy(_schema(SAMPLE_SCHEMA_FILE))


SCHEMA_VERSION: int = _schema(RESULTS_SCHEMA_FILE)["properties"]["schema_version"]["const"]


@lru_cache(maxsize=None)
def _validator(path: Path):
    import jsonschema

    schema = _schema(path)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _dotted(path: Sequence, root: str = "") -> str:
    out = root
    for part in path:
        out = f"{out}[{part}]" if isinstance(part, int) else (f"{out}.{part}" if out else str(part))
    return out


def _check_schema(value: Any, schema_file: Path, root: str = "") -> None:
    """Validate ``value``; raise HarnessError whose ``field`` is the dotted path of the first bad key."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(schema_file).iter_errors(value))
    if error is None:
        return
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = [k for k in error.validator_value if isinstance(error.instance, dict) and k not in error.instance]
        raise HarnessError("is missing", field=_dotted([*path, missing[0]], root) if missing else root or "results",
                           fix=SCHEMA_FIX)
    message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
    raise HarnessError(message, field=_dotted(path, root) or root or "results", fix=SCHEMA_FIX)


def validate_results(results: dict) -> None:
    """Check ``results`` against the results schema and the rules a schema cannot say.

    Raises :class:`HarnessError` whose ``field`` is the dotted path of the first bad key
    (e.g. ``metrics.before.toxicity_mean``).
    """
    _check_schema(results, RESULTS_SCHEMA_FILE)
    metrics = results["metrics"]
    for phase in ("before", "after"):
        m = metrics[phase]
        if m["toxicity_ci_low"] > m["toxicity_ci_high"]:
            raise HarnessError("the interval's low end is above its high end",
                               field=f"metrics.{phase}.toxicity_ci_low", value=m["toxicity_ci_low"])
    c = metrics["comparison"]
    lo, hi = c["mean_improvement_ci_low"], c["mean_improvement_ci_high"]
    if lo is not None and hi is not None and lo > hi:
        raise HarnessError("the interval's low end is above its high end",
                           field="metrics.comparison.mean_improvement_ci_low", value=lo)
    diffs = [row["reward_diff"] for row in results["qualitative"]]
    if any(a < b for a, b in zip(diffs, diffs[1:])):
        raise HarnessError("rows must be sorted by reward_diff, descending", field="qualitative")


def validate_sample_row(row: dict, index: int) -> None:
    _check_schema(row, SAMPLE_SCHEMA_FILE, root=f"samples[{index}]")


def validate_curve_row(row: dict, where: str = "curve") -> None:
    """One ``curve.jsonl`` row against ``harness/schemas/curve.schema.json``."""
    _check_schema(row, CURVE_SCHEMA_FILE, root=where)


def read_curve(run_dir: str | Path, *, skip_bad_lines: bool = False) -> list[dict]:
    """The rows of a run's ``curve.jsonl`` (none when it has no curve), each validated, sorted by step; a step
    that appears twice is a HarnessError naming the file (a resumed run never writes a point twice)."""
    path = Path(run_dir) / CURVE_FILE
    rows = read_jsonl(path, missing_ok=True, skip_bad_lines=skip_bad_lines)
    for i, row in enumerate(rows):
        try:
            validate_curve_row(row, f"line {i + 1}")
        except HarnessError as e:
            if skip_bad_lines:
                rows[i] = None
                continue
            raise _file_error(path, str(e), SCHEMA_FIX) from e
    rows = sorted((r for r in rows if r is not None), key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    if len(set(steps)) != len(steps):
        twice = next(s for s in steps if steps.count(s) > 1)
        raise _file_error(path, f"step {twice} has two points", "re-make the curve: detox-harness curve <run_dir>")
    return rows


# ---------------------------------------------------------------------------------------------- writing

def jsonable(value):
    """Plain JSON types: numpy/torch scalars to Python, paths to strings, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy / torch
        return jsonable(value.tolist())
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def dumps(value, indent: int | None = None) -> str:
    """Strict JSON of ``jsonable(value)`` (no NaN, UTF-8 text kept as is)."""
    return json.dumps(jsonable(value), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: str | Path, value, indent: int | None = 2) -> None:
    """``value`` as strict JSON, written atomically (:func:`atomic_write_text`)."""
    atomic_write_text(path, dumps(value, indent) + "\n")


def write_jsonl(path: str | Path, rows: Sequence) -> None:
    """Rows as JSON lines, written atomically."""
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | Path, row) -> None:
    """Append one row and flush it to disk (a crash loses at most the row being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- reading

def _file_error(path: Path, message: str, fix: str | None = None) -> HarnessError:
    return HarnessError(message, field=str(path), fix=fix)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a HarnessError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _file_error(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _file_error(path, f"cannot read the file: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _file_error(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          "the run may have been interrupted while writing; re-run it") from e


def read_jsonl(path: str | Path, *, skip_bad_lines: bool = False, missing_ok: bool = False) -> list[dict]:
    """The object rows of a JSON-lines file; blank lines are skipped.

    A malformed line raises a HarnessError naming the file and the line, unless ``skip_bad_lines`` (a row
    cut short by a crash while it was appended is then dropped). ``missing_ok``: no file means no rows.
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    rows = []
    try:
        handle = path.open(encoding="utf-8", errors="replace" if skip_bad_lines else "strict")
    except OSError as e:
        raise _file_error(path, f"cannot read the file: {e}") from e
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if skip_bad_lines:
                        continue
                    raise _file_error(path, f"line {lineno} is not valid JSON: {e.msg}") from e
                if not isinstance(row, dict):
                    if skip_bad_lines:
                        continue
                    raise _file_error(path, f"line {lineno} must be a JSON object")
                rows.append(row)
        except UnicodeDecodeError as e:
            raise _file_error(path, f"cannot read the file: {e}") from e
    return rows


def load_results(run_dir: str | Path) -> dict:
    """Read ``run_dir/results.json`` and validate it against the schema.

    A HarnessError names the file (and, for a schema fault, the key): a missing folder or file, bad JSON,
    a ``schema_version`` this harness does not read, or a key of the wrong type.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise _file_error(run_dir, "run folder not found", "pass the folder of a finished run (reports/<run-id>)")
    path = run_dir / RESULTS_FILE
    if not path.exists():
        raise _file_error(path, "file not found", f"pass the folder of a finished run (it holds {RESULTS_FILE})")
    results = read_json(path)
    if not isinstance(results, dict):
        raise _file_error(path, f"must hold a JSON object, got {type(results).__name__}")
    version = results.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _file_error(path, f"schema_version {version!r} is not supported (this harness reads {SCHEMA_VERSION})",
                          "render it with the harness version that wrote it")
    try:
        validate_results(results)
    except HarnessError as e:
        raise _file_error(path, str(e)) from e
    return results


def run_file(run_dir: str | Path, results: Mapping, key: str, default: str) -> Path:
    """A companion file of a run (``files.<key>`` of results.json); a name may not leave the run folder."""
    name = (results.get("files") or {}).get(key) or default
    return Path(run_dir) / Path(str(name)).name


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RESULTS_FILE).exists()


# ---------------------------------------------------------------------------------------------- building

def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(directory: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the project (None outside a git checkout or without git)."""
    directory = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(directory), capture_output=True,  # noqa: S607
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def environment_info(device: str | None = None) -> dict:
    """Library versions, git commit, device, platform and Python (``results.json`` ``environment``)."""
    import torch

    versions = {"python": platform.python_version()}
    for dist in ("detox-harness", "torch", "transformers", "peft", "accelerate", "datasets", "rouge-score", "numpy",
                 "scipy"):
        versions[dist] = _distribution_version(dist)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"versions": versions, "git_commit": git_commit(), "device": str(device), "platform": platform.platform(),
            "python": sys.version.split()[0], "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
    return info


def paired_samples(before: EvalOutput, after: EvalOutput) -> list[dict]:
    """``samples.jsonl`` rows: one per prompt and sample, before and after side by side."""
    check_paired(before, after)
    key = lambda s: (s["prompt_index"], s["sample_index"])  # noqa: E731
    rows = []
    for sb, sa in zip(sorted(before.samples, key=key), sorted(after.samples, key=key)):
        row = {"prompt_index": sb["prompt_index"], "sample_index": sb["sample_index"], "seed": sb["seed"],
               "query": sb["query"], "references": list(sb.get("references") or []),
               "response_before": sb["response"], "response_after": sa["response"],
               "toxicity_before": sb["toxicity"], "toxicity_after": sa["toxicity"],
               "reward_before": sb["reward"], "reward_after": sa["reward"],
               "length_before": sb["length"], "length_after": sa["length"], "kl_after": sa["kl"],
               "second_toxicity_before": sb.get("second_toxicity"), "second_toxicity_after": sa.get("second_toxicity"),
               "response_toxicity_before": sb.get("response_toxicity"),
               "response_toxicity_after": sa.get("response_toxicity"),
               "clean_logprob_before": sb.get("clean_logprob"), "clean_logprob_after": sa.get("clean_logprob"),
               "faithfulness_before": sb.get("faithfulness"), "faithfulness_after": sa.get("faithfulness")}
        if sa["seed"] != sb["seed"]:
            row["seed_after"] = sa["seed"]
        rows.append(row)
    return rows


def build_results(cfg: HarnessConfig, before: EvalOutput, after: EvalOutput, *, run_id: str, training: dict | None,
                  timings: dict, device: str | None = None, extra: dict | None = None) -> tuple[dict, list[dict]]:
    """``results.json`` (without ``verdict``) and the paired ``samples.jsonl`` rows of a run.

    ``training`` becomes ``metrics.training`` (left out when None: an evaluation-only run); ``extra`` adds
    top-level keys (e.g. ``data``, ``parameters``, ``checkpoint``); it may not replace a key of the schema.
    """
    clash = _RESERVED & set(extra or {})
    if clash:
        raise ValueError(f"build_results: extra may not replace {', '.join(sorted(clash))}")
    metrics: dict[str, Any] = {"before": dict(before.metrics), "after": dict(after.metrics),
                               "comparison": compare(before, after, cfg)}
    files = {"samples": SAMPLES_FILE, "config": CONFIG_FILE}
    if training is not None:
        metrics["training"] = dict(training)
        files["train_stats"] = TRAIN_STATS_FILE
    timings = {k: float(v) for k, v in timings.items()}
    timings.setdefault("eval_before_s", float(before.seconds))
    timings.setdefault("eval_after_s", float(after.seconds))
    timings.setdefault("total_s", sum(v for k, v in timings.items() if k != "total_s"))
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "seeds": {"run": cfg.seed, "eval": cfg.eval.seed, "bootstrap": cfg.eval.seed},
        "environment": environment_info(device),
        "timings": timings,
        "metrics": metrics,
        "qualitative": qualitative_rows(before, after, cfg.eval.qualitative_rows),
        "files": files,
    }
    results.update(copy.deepcopy(extra or {}))
    return jsonable(results), [jsonable(r) for r in paired_samples(before, after)]


def require_current_keys(results: dict) -> None:
    """Every figure this harness measures is in ``results`` (None where it was not measured): a HarnessError
    naming the first missing one. The schema lets a run written before a figure existed (e.g. the faithfulness
    figures) be read and rendered; a run written now must hold them all."""
    metrics = results["metrics"]
    for section, keys in (("before", PHASE_KEYS), ("after", PHASE_KEYS), ("comparison", COMPARISON_KEYS)):
        missing = [k for k in keys if k not in metrics[section]]
        if missing:
            raise HarnessError("is missing", field=f"metrics.{section}.{missing[0]}", fix=SCHEMA_FIX)


def write_run_files(run_dir: str | Path, results: dict, samples: list[dict]) -> None:
    """Validate, then write ``samples.jsonl`` and (last, marking the run finished) ``results.json`` atomically."""
    results = jsonable(results)
    validate_results(results)
    require_current_keys(results)
    rows = [jsonable(r) for r in samples]
    for i, row in enumerate(rows):
        validate_sample_row(row, i)
    expected = results["metrics"]["comparison"]["num_prompts"] * results["metrics"]["comparison"]["samples_per_prompt"]
    if len(rows) != expected:
        raise HarnessError(f"{len(rows)} sample rows for {expected} samples (num_prompts x samples_per_prompt)",
                           field="samples")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run_file(run_dir, results, "samples", SAMPLES_FILE), rows)
    write_json(run_dir / RESULTS_FILE, results)
