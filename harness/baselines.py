"""Baselines: what honest runs of a preset measured, kept as a data file, and a run compared against it.

A regression suite keeps expected values in data files beside its tests and regenerates them on request
(pytest-regressions' ``--force-regen``). Here the expected values are statistics over seeds:
``detox-harness baseline --preset P --seeds 0,1,2`` runs each seed and writes ``baselines/P.json`` with, per
guarded metric, the mean, the spread (sample standard deviation), the extremes and a tolerance;
``detox-harness run --baseline FILE`` (and the suites' ``--baseline FILE``) then fail a run whose metric
leaves ``mean +- tolerance``. A baseline only compares runs of the same configuration (the seed and the
output settings aside): a mismatch is an input error, not a regression.

Pure functions of results dicts; running the seeds is :func:`harness.pipeline.make_baseline`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import flatten_dict
from .errors import HarnessError
from .results import environment_info, read_json, write_json
from .thresholds import BOUNDS, lookup, text_table

BASELINE_FORMAT = 1
#: tolerance of a metric = max(SIGMAS x spread, RELATIVE x |mean|, ABSOLUTE): wide enough for seed noise
#: (measured spread) and for another machine's float rounding (the relative and absolute floors)
SIGMAS = 4.0
RELATIVE = 0.05
ABSOLUTE = 0.02  # e.g. 2.6 of 128 summaries for a rate
#: metrics a baseline guards, as paths into ``results["metrics"]``: every metric a bound reads, and the
#: headline figures of both phases (a change to the evaluation itself moves "before")
GUARDED: tuple[tuple[str, ...], ...] = tuple(dict.fromkeys(
    [path for path, _, _ in BOUNDS.values()]
    + [("before", "toxicity_mean"), ("after", "toxicity_mean"), ("before", "rougeL"), ("after", "rougeL"),
       ("before", "length_mean"), ("after", "length_mean"), ("after", "response_toxicity_mean"),
       ("after", "second_toxicity_mean"), ("before", "faithfulness_mean"), ("after", "faithfulness_mean")]))
#: config keys that may differ between a baseline and a run compared with it
FREE_KEYS = ("seed", "output", "device", "eval.batch_size", "reward.batch_size", "eval.faithfulness_batch_size",
             "thresholds")


@dataclass
class MetricCheck:
    metric: str  # dotted path, e.g. comparison.mean_improvement
    mean: float
    tolerance: float
    value: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lookup(metrics: dict, path: tuple[str, ...]) -> float | None:
    """The metric at ``path`` when it is a finite number, else None."""
    node = lookup(metrics, path)
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node) else None


def comparable_config(config: dict) -> dict[str, Any]:
    """The flattened config without the keys a baseline does not fix (:data:`FREE_KEYS`)."""
    return {k: v for k, v in flatten_dict(config).items()
            if not any(k == free or k.startswith(free + ".") for free in FREE_KEYS)}


def tolerance(mean: float, spread: float) -> float:
    return max(SIGMAS * spread, RELATIVE * abs(mean), ABSOLUTE)


def build_baseline(runs: list[dict]) -> dict[str, Any]:
    """The baseline of finished runs' ``results.json`` dicts (same preset and config, different seeds)."""
    if len(runs) < 2:
        raise HarnessError(f"a baseline needs at least 2 runs to measure a spread, got {len(runs)}", field="--seeds",
                           fix="give two or more seeds, e.g. --seeds 0,1,2")
    configs = [comparable_config(r["config"]) for r in runs]
    for r, c in zip(runs[1:], configs[1:]):
        if c != configs[0]:
            differs = sorted(k for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k))
            raise HarnessError(f"run {r['run_id']} has another config than {runs[0]['run_id']} ({', '.join(differs)})",
                               field="--seeds", fix="baseline runs differ by their seed only")
    metrics: dict[str, dict] = {}
    for path in GUARDED:
        values = [_lookup(r["metrics"], path) for r in runs]
        if all(v is None for v in values):
            continue  # not measured by this preset (e.g. no second judge): nothing to guard
        if any(v is None for v in values):
            raise HarnessError(f"metric {'.'.join(path)} was measured in some runs only",
                               field="--seeds", fix="check the runs' results.json; a baseline needs it in all")
        mean, spread = statistics.fmean(values), statistics.stdev(values)
        metrics[".".join(path)] = {"mean": mean, "spread": spread, "min": min(values), "max": max(values),
                                   "values": values, "tolerance": tolerance(mean, spread)}
    return {
        "format": BASELINE_FORMAT,
        "preset": runs[0]["preset"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": [r["seeds"]["run"] for r in runs],
        "runs": [r["run_id"] for r in runs],
        "verdicts": [r.get("verdict", {}).get("passed") for r in runs],
        "tolerance_rule": f"max({SIGMAS:g} x spread, {RELATIVE:g} x |mean|, {ABSOLUTE:g})",
        "environment": environment_info(runs[0]["environment"].get("device")),
        "config": runs[0]["config"],
        "metrics": metrics,
    }


def refuse_existing(path: str | Path, force_regen: bool) -> None:
    """A HarnessError when ``path`` exists and regeneration was not asked for."""
    if Path(path).exists() and not force_regen:
        raise HarnessError("the baseline file exists", field="--output", value=str(path),
                           fix="pass --force-regen to rewrite it (review the diff before committing it)")


def write_baseline(path: str | Path, baseline: dict, *, force_regen: bool = False) -> Path:
    path = Path(path)
    refuse_existing(path, force_regen)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, baseline)
    return path


def load_baseline(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HarnessError("no such baseline file", field="--baseline", value=str(path),
                           fix="make one with: detox-harness baseline --preset P --seeds 0,1,2")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT or not isinstance(data.get("metrics"), dict):
        raise HarnessError(f"not a baseline file of format {BASELINE_FORMAT}", field="--baseline", value=str(path),
                           fix="regenerate it with detox-harness baseline ... --force-regen")
    return data


def require_same_config(config: dict, baseline: dict, baseline_name: str = "baseline") -> None:
    """A HarnessError naming the differing keys unless ``config`` is the baseline's (:data:`FREE_KEYS` aside)."""
    mine, theirs = comparable_config(config), comparable_config(baseline["config"])
    if mine != theirs:
        differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in differs[:4])
        raise HarnessError(f"the run's config differs from the baseline's ({shown}"
                           f"{', ...' if len(differs) > 4 else ''})", field="--baseline", value=baseline_name,
                           fix="compare runs of the baseline's config, or regenerate the baseline for this one")


def compare(results: dict, baseline: dict, *, baseline_name: str = "baseline") -> list[MetricCheck]:
    """Each guarded metric of ``results`` against ``mean +- tolerance``; a metric the run lacks fails.

    Raises HarnessError (an input error) when the run's config differs from the baseline's.
    """
    require_same_config(results["config"], baseline, baseline_name)
    checks = []
    for name, m in baseline["metrics"].items():
        value = _lookup(results["metrics"], tuple(name.split(".")))
        passed = value is not None and abs(value - m["mean"]) <= m["tolerance"]
        checks.append(MetricCheck(name, m["mean"], m["tolerance"], value, passed))
    return checks


def format_checks(checks: list[MetricCheck], name: str) -> str:
    rows = [(c.metric, f"{c.mean:.4g}", f"{c.tolerance:.3g}", "missing" if c.value is None else f"{c.value:.4g}",
             "PASS" if c.passed else "FAIL") for c in checks]
    moved = [c.metric for c in checks if not c.passed]
    return (text_table(("metric", "baseline", "tolerance", "measured", "result"), rows)
            + f"\nbaseline {name}: " + (f"FAIL, moved: {', '.join(moved)}" if moved else
                                        f"PASS ({len(checks)} metrics within tolerance)"))
