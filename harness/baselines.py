"""Baselines: what honest runs of a preset measured, kept as a data file, and a run compared against it.

A regression suite keeps expected values in data files beside its tests and regenerates them on request
(pytest-regressions' ``--force-regen``). Here the expected values are statistics over seeds:
``detox-harness baseline --preset P --seeds 0,1,2`` runs each seed and writes ``baselines/P.json`` with, per
guarded metric, the mean, the spread (sample standard deviation), the extremes and a tolerance;
``detox-harness run --baseline FILE`` (and the suites' ``--baseline FILE``) then fail a run whose metric
leaves ``mean +- tolerance``. A baseline only compares runs of the same configuration (the seed and the
output settings aside) on the same tiny world (its digest): a mismatch is an input error, not a regression.

**The tolerance rule** (docs/verdicts.md, "False alarms"). A metric of the "before" evaluation does not depend
on the training seed (before is the starting policy on fixed evaluation seeds): every seed measures the same
value, and a run must match it up to float rounding (:data:`ROUNDING`); a miss means the evaluation itself
changed, and is named so. (Where the baseline's own runs measured a before metric differently, as
nondeterministic GPU kernels may, it is compared like the others.) Every other metric gets a two-sided t
prediction interval for one new seed given the baseline's n seeds,
``mean +- t(1 - alpha / 2m, n - 1) x spread x sqrt(1 + 1/n)``, with the family-wise budget ``alpha``
(:data:`FAMILY_ALPHA`) split over the m guarded metrics (Bonferroni): if each metric is normal over seeds, an
honest run fails the whole baseline with probability at most ``alpha``. :data:`ABSOLUTE` is a floor for
metrics that barely move between seeds (a rate that is 0 in every seed may still see 2 summaries of 128).

Pure functions of results dicts; running the seeds is :func:`harness.jobs.baseline.make_baseline`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import flatten_dict
from .errors import HarnessError
from .provenance import require_same_judges
from .results import environment_info, read_json, write_json
from .thresholds import BOUNDS, POWERED_BOUNDS, lookup, text_table

BASELINE_FORMAT = 2  # 2: world digests, fixed "before" metrics, t prediction tolerances with a family budget
#: a whole honest run fails the baseline (any guarded metric) with probability at most this, by design; the
#: bounds spend as much again (harness.calibration.BOUNDS_ALPHA): 5% for a whole run
FAMILY_ALPHA = 0.025
#: floor of a seed-dependent tolerance: about 2.6 of 128 summaries for a rate
ABSOLUTE = 0.02
#: a "before" metric may differ from the baseline's by this much (float rounding of the same evaluation)
ROUNDING = 1e-6
#: seeds a baseline needs at least: the t quantile of 2 seeds is huge (a band that guards nothing)
MIN_SEEDS = 3
#: metrics read on a log scale: positive, with a long right tail over seeds (the KLs; the rates' upper bounds, a
#: count's): their band is the prediction interval of log(value), mapped back (log-normal), wider above than below
LOG_SCALE = ("after.kl_per_sequence_mean", "training.objective_kl_mean", "after.empty_rate_upper",
             "after.degenerate_rate_upper", "comparison.copy_rate_increase_upper")


def prediction_band(name: str, values: list[float], factor: float) -> tuple[float, float, str]:
    """``(low, high, scale)``: mean -+ factor x spread of ``values`` (of their logs for a :data:`LOG_SCALE`
    metric whose values are all positive, mapped back), widened to at least mean -+ :data:`ABSOLUTE`."""
    mean = statistics.fmean(values)
    if name in LOG_SCALE and min(values) > 0:
        logs = [math.log(v) for v in values]
        centre, spread = statistics.fmean(logs), statistics.stdev(logs)
        low, high, scale = math.exp(centre - factor * spread), math.exp(centre + factor * spread), "log"
    else:
        spread = statistics.stdev(values)
        low, high, scale = mean - factor * spread, mean + factor * spread, "linear"
    return min(low, mean - ABSOLUTE), max(high, mean + ABSOLUTE), scale
#: metrics a baseline guards, as paths into ``results["metrics"]``: every metric a bound reads, and the
#: headline figures of both phases (a change to the evaluation itself moves "before")
GUARDED: tuple[tuple[str, ...], ...] = tuple(dict.fromkeys(
    [path for path, _, _ in BOUNDS.values()]
    + [("before", "toxicity_mean"), ("after", "toxicity_mean"), ("before", "rougeL"), ("after", "rougeL"),
       ("before", "length_mean"), ("after", "length_mean"), ("after", "response_toxicity_mean"),
       ("after", "second_toxicity_mean"), ("before", "faithfulness_mean"), ("after", "faithfulness_mean")]))
#: config keys that may differ between a baseline and a run compared with it (the curve's settings too: its points
#: sample with their own seeds and leave training and the final evaluation as they were, harness/curve.py)
FREE_KEYS = ("seed", "output", "device", "eval.batch_size", "reward.batch_size", "eval.faithfulness_batch_size",
             "eval.curve_every", "eval.curve_prompts", "thresholds")


@dataclass
class MetricCheck:
    metric: str  # dotted path, e.g. comparison.mean_improvement
    mean: float
    tolerance: float
    value: float | None
    passed: bool
    kind: str = "seed"  # "seed": a prediction interval over seeds; "fixed": the before evaluation, seed-free

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


def is_fixed(metric: str) -> bool:
    """A metric of the "before" evaluation: the same for every training seed (compared up to :data:`ROUNDING`)."""
    return metric.startswith("before.")


def prediction_factor(n: int, m: int, alpha: float = FAMILY_ALPHA) -> float:
    """``t(1 - alpha / 2m, n - 1) x sqrt(1 + 1/n)``: the half-width, in spreads, of a two-sided prediction
    interval for one new seed from n seeds, at the per-metric level alpha / m (Bonferroni over m metrics)."""
    from scipy import stats

    if n < 2 or m < 1:
        raise ValueError(f"prediction_factor needs n >= 2 seeds and m >= 1 metrics, got n={n}, m={m}")
    return float(stats.t.ppf(1 - alpha / (2 * m), n - 1) * math.sqrt(1 + 1 / n))


def _rounding(mean: float) -> float:
    """How far a "before" metric may lie from the baseline's mean ``mean``: float rounding of one evaluation."""
    return ROUNDING * max(1.0, abs(mean))


def build_baseline(runs: list[dict]) -> dict[str, Any]:
    """The baseline of finished runs' ``results.json`` dicts (same preset, config and world, different seeds)."""
    if len(runs) < MIN_SEEDS:
        raise HarnessError(f"a baseline needs at least {MIN_SEEDS} runs to measure a spread, got {len(runs)}",
                           field="--seeds", fix="give three or more seeds, e.g. --seeds 0,1,2,3,4")
    configs = [comparable_config(r["config"]) for r in runs]
    for r, c in zip(runs[1:], configs[1:]):
        if c != configs[0]:
            differs = sorted(k for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k))
            raise HarnessError(f"run {r['run_id']} has another config than {runs[0]['run_id']} ({', '.join(differs)})",
                               field="--seeds", fix="baseline runs differ by their seed only")
        if r.get("worlds") != runs[0].get("worlds"):
            raise HarnessError(f"run {r['run_id']} read another tiny world than {runs[0]['run_id']}",
                               field="--seeds", fix="make every baseline run on one world")
    measured: dict[str, list[float]] = {}
    for path in GUARDED:
        values = [_lookup(r["metrics"], path) for r in runs]
        if all(v is None for v in values):
            continue  # not measured by this preset (e.g. no second judge): nothing to guard
        if any(v is None for v in values):
            raise HarnessError(f"metric {'.'.join(path)} was measured in some runs only",
                               field="--seeds", fix="check the runs' results.json; a baseline needs it in all")
        measured[".".join(path)] = values
    # a before metric is compared up to rounding when every baseline run measured it alike (a deterministic
    # evaluation, as on CPU); where the runs differ (a GPU's nondeterministic kernels), it is a seed metric
    fixed = {name for name, values in measured.items()
             if is_fixed(name) and max(values) - min(values) <= _rounding(statistics.fmean(values))}
    seed_metrics = [name for name in measured if name not in fixed]
    factor = prediction_factor(len(runs), max(len(seed_metrics), 1))
    metrics: dict[str, dict] = {}
    for name, values in measured.items():
        mean, spread = statistics.fmean(values), statistics.stdev(values)
        if name in fixed:
            tol = _rounding(mean)
            metrics[name] = {"kind": "fixed", "mean": mean, "spread": spread, "min": min(values), "max": max(values),
                             "values": values, "tolerance": tol, "low": mean - tol, "high": mean + tol,
                             "scale": "linear"}
        else:
            low, high, scale = prediction_band(name, values, factor)
            metrics[name] = {"kind": "seed", "mean": mean, "spread": spread, "min": min(values), "max": max(values),
                             "values": values, "tolerance": max(high - mean, mean - low), "low": low, "high": high,
                             "scale": scale}
    detectable = {}  # the largest minimum detectable improvement of each judge: calibrate keeps limits above it
    for path in dict.fromkeys(POWERED_BOUNDS.values()):
        values = [_lookup(r["metrics"], path) for r in runs]
        if all(v is not None for v in values):
            detectable[".".join(path)] = max(values)
    return {
        "format": BASELINE_FORMAT,
        "preset": runs[0]["preset"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": [r["seeds"]["run"] for r in runs],
        "runs": [r["run_id"] for r in runs],
        "verdicts": [r.get("verdict", {}).get("passed") for r in runs],
        "worlds": runs[0].get("worlds") or {},
        # the revisions the runs' models resolved to: a run judged by another revision is refused (exit 2)
        "models": (runs[0].get("provenance") or {}).get("models") or {},
        "tolerance_rule": {
            "fixed": f"before.* metrics: |value - mean| <= {ROUNDING:g} x max(1, |mean|) (seed-free evaluation)",
            "seed": f"mean -+ max(t(1 - {FAMILY_ALPHA:g} / (2 x {len(seed_metrics)}), {len(runs) - 1}) x sqrt(1 + 1/"
                    f"{len(runs)}) x spread, {ABSOLUTE:g}) = mean -+ max({factor:.3f} x spread, {ABSOLUTE:g}); on "
                    f"log(value) for {', '.join(LOG_SCALE)}",
            "family_alpha": FAMILY_ALPHA, "guarded_seed_metrics": len(seed_metrics), "factor": factor,
            "assumes": "each metric normal over training seeds; Bonferroni over the guarded metrics"},
        "environment": environment_info(runs[0]["environment"].get("device")),
        "config": runs[0]["config"],
        "metrics": metrics,
        "detectable": detectable,
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
        found = data.get("format") if isinstance(data, dict) else None
        raise HarnessError(f"not a baseline file of format {BASELINE_FORMAT} (found format {found!r})",
                           field="--baseline", value=str(path),
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


def require_same_world(worlds: Mapping[str, str], baseline: dict, baseline_name: str = "baseline") -> None:
    """A HarnessError unless the run reads the tiny worlds (``{seed: digest}``) the baseline was made on."""
    theirs = baseline.get("worlds") or {}
    if dict(worlds) != theirs:
        def show(w):
            return ", ".join(f"seed {s} {d[:12]}" for s, d in sorted(w.items())) or "no tiny world"

        raise HarnessError(f"the baseline was made on another tiny world ({show(theirs)}; this run reads "
                           f"{show(worlds)}): its figures do not apply", field="--baseline", value=baseline_name,
                           fix="run on the baseline's world (the committed one: git checkout -- harness/worlds), "
                               "or regenerate the baseline on this one")


def compare(results: dict, baseline: dict, *, baseline_name: str = "baseline") -> list[MetricCheck]:
    """Each guarded metric of ``results`` against ``mean +- tolerance``; a metric the run lacks fails.

    Raises HarnessError (an input error) when the run's config, tiny world or a judge's revision differs from the
    baseline's.
    """
    require_same_config(results["config"], baseline, baseline_name)
    require_same_world(results.get("worlds") or {}, baseline, baseline_name)
    require_same_judges((results.get("provenance") or {}).get("models") or {}, baseline, baseline_name)
    checks = []
    for name, m in baseline["metrics"].items():
        value = _lookup(results["metrics"], tuple(name.split(".")))
        low, high = m.get("low", m["mean"] - m["tolerance"]), m.get("high", m["mean"] + m["tolerance"])
        passed = value is not None and low <= value <= high
        checks.append(MetricCheck(name, m["mean"], m["tolerance"], value, passed, m.get("kind", "seed")))
    return checks


def format_checks(checks: list[MetricCheck], name: str) -> str:
    rows = [(c.metric, f"{c.mean:.4g}", f"{c.tolerance:.3g}", "missing" if c.value is None else f"{c.value:.4g}",
             "PASS" if c.passed else "FAIL") for c in checks]
    changed = [c.metric for c in checks if not c.passed and c.kind == "fixed"]
    moved = [c.metric for c in checks if not c.passed and c.kind != "fixed"]
    verdict = "; ".join(
        ([f"the before evaluation changed (not the training: the evaluation code, the data or the numerics): "
          f"{', '.join(changed)}"] if changed else [])
        + ([f"moved beyond the seeds' prediction interval: {', '.join(moved)}"] if moved else []))
    return (text_table(("metric", "baseline", "tolerance", "measured", "result"), rows)
            + f"\nbaseline {name}: " + (f"FAIL, {verdict}" if verdict else
                                        f"PASS ({len(checks)} metrics within tolerance)"))
