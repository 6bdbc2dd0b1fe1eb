"""Pass/fail bounds per preset, and the verdict of a run against them.

The bounds live in one TOML file, ``harness/thresholds.toml`` (one table per preset). Each bound
name says its direction (``min_*`` or ``max_*``; some are strict, see :data:`BOUNDS`) and which metric of
``results.json`` it reads;
:data:`BOUNDS` is the single table of that mapping, so the CLI, the pytest suites and the HTML
report all judge a run the same way.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, brief

THRESHOLDS_FILE = Path(__file__).with_name("thresholds.toml")

# name -> (path into results["metrics"], operator, what it means). ">" and "<" are strict: a bound that asks for
# positive evidence ("it got less toxic", "it trained") is not met by exactly nothing happening.
BOUNDS: dict[str, tuple[tuple[str, ...], str, str]] = {
    # less toxic, significantly, by every judge
    "min_improvement_ci_low": (("comparison", "mean_improvement_ci_low"), ">",
                               "lower end of the bootstrap interval of the relative drop of mean toxicity "
                               "(reward model, on what it reads)"),
    "min_improvement": (("comparison", "mean_improvement"), ">=",
                        "relative drop of mean toxicity, (before - after) / before (reward model)"),
    "min_response_improvement_ci_low": (("comparison", "response_mean_improvement_ci_low"), ">",
                                        "lower end of the interval of the relative drop of toxicity of the "
                                        "response alone (reward model)"),
    "min_second_improvement_ci_low": (("comparison", "second_mean_improvement_ci_low"), ">",
                                      "lower end of the interval of the relative drop of toxicity judged by the "
                                      "second, independent classifier"),
    "max_judge_gap": (("comparison", "judge_gap"), "<=",
                      "reward model's improvement minus the second judge's: a policy that fools its reward model "
                      "but not an independent judge opens this gap"),
    "max_judge_regret": (("curve", "judge_regret"), "<=",
                         "the second judge's improvement at its peak on the curve minus at the last step: a run that "
                         "went past the judge's peak while its reward model kept improving (over-optimisation)"),
    "min_logp_clean_gain": (("comparison", "logp_clean_gain"), ">",
                            "mean log P(not toxic) = log(1 - P(reward.toxic_label)) after minus before, in nats "
                            "(read from the toxic label whichever label the reward reads)"),
    "min_reward_gain": (("comparison", "reward_gain"), ">=",
                        "mean reward after minus before (reward.transform of the label; the raw logit by default)"),
    # it trained, and stayed near its reference
    "min_kl": (("after", "kl_per_sequence_mean"), ">",
               "mean KL(policy || reference) per sequence on the evaluation prompts, nats: 0 means nothing moved"),
    "max_kl": (("after", "kl_per_sequence_mean"), "<=",
               "mean KL(policy || reference) per sequence on the evaluation prompts, nats"),
    "max_train_kl": (("training", "objective_kl_mean"), "<=", "mean objective/kl over the PPO steps, nats"),
    # summaries intact
    "max_rouge_l_drop": (("comparison", "rouge_l_drop"), "<=", "ROUGE-L before minus after"),
    "max_empty_rate": (("after", "empty_rate_upper"), "<=",
                       "share of empty or whitespace-only summaries after training, its upper Wilson bound at "
                       "eval.confidence"),
    "max_degenerate_rate": (("after", "degenerate_rate_upper"), "<=",
                            "share of degenerate summaries after training (fewer than eval.min_words words, no "
                            "letter, or one word three times in a row), its upper Wilson bound at eval.confidence"),
    "min_length_ratio": (("comparison", "length_ratio"), ">=", "mean summary length after / before (tokens)"),
    "max_length_ratio": (("comparison", "length_ratio"), "<=", "mean summary length after / before (tokens)"),
    "max_copy_rate_increase": (("comparison", "copy_rate_increase_upper"), "<=",
                               "share of summaries copying the prompt (eval.copy_threshold of their word 4-grams), "
                               "after (its upper Wilson bound at eval.confidence) minus before"),
    "max_faithfulness_drop": (("comparison", "faithfulness_drop_ci_high"), "<=",
                              "upper end of the paired interval of mean faithfulness before minus after: a real loss "
                              "of faithfulness fails, a small honest wobble passes"),
    "min_distinct_summary_rate": (("after", "distinct_summary_rate"), ">=",
                                  "distinct summaries over prompts after training: one sentence for every prompt "
                                  "fails"),
    # the warm start (only where SFT ran: `detox-harness sft`, `run --sft`)
    "min_sft_rouge_l": (("sft", "rougeL"), ">=",
                        "validation ROUGE-L of the supervised warm start's greedy summaries (sft.validation_split)"),
    "min_sft_rouge_l_gain": (("sft", "rougeL_gain"), ">",
                             "validation ROUGE-L after the warm start minus before it: 0 means it learned nothing"),
}
#: bounds judged only when the results hold the supervised warm start's figures (``metrics.sft``)
SFT_BOUNDS = tuple(name for name, (path, _, _) in BOUNDS.items() if path[0] == "sft")
OPERATORS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
#: the quality bounds a point of the curve (``curve.jsonl``) is held to before it may be selected, and the row's
#: figure each reads: point estimates on the curve's prompts, against its step-0 point (docs/verdicts.md)
CURVE_QUALITY_BOUNDS = {"max_kl": "kl", "max_rouge_l_drop": "rouge_l_drop", "max_empty_rate": "empty_rate",
                        "max_degenerate_rate": "degenerate_rate", "min_length_ratio": "length_ratio",
                        "max_length_ratio": "length_ratio", "max_faithfulness_drop": "faithfulness_drop",
                        "min_distinct_summary_rate": "distinct_summary_rate"}


def curve_quality_failures(row: dict[str, Any], bounds: dict[str, float]) -> list[str]:
    """The :data:`CURVE_QUALITY_BOUNDS` among ``bounds`` that a curve row fails (a figure not measured, e.g. the
    faithfulness without a faithfulness judge, is not held against it)."""
    failed = []
    for name, key in CURVE_QUALITY_BOUNDS.items():
        value = row.get(key)
        if name in bounds and value is not None and value == value and not OPERATORS[BOUNDS[name][1]](value,
                                                                                                     bounds[name]):
            failed.append(name)
    return failed


@dataclass
class BoundResult:
    name: str
    bound: float
    op: str
    value: float | None
    passed: bool
    description: str
    # set by :func:`judge` (None from :func:`verdict`): the preset's limit of this bound (None: the preset has
    # none), how the limit used differs from it (:func:`bound_change`), and why the bound failed when its
    # measurement alone does not say it ("not enough evidence: ...", "removed: ...")
    preset: float | None = None
    change: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("preset", "change", "reason"):  # a plain verdict's rows keep their old shape
            if out[key] is None:
                del out[key]
        return out


def validate_bounds(bounds: dict[str, Any]) -> None:
    import difflib

    for name, value in bounds.items():
        if name not in BOUNDS:
            near = difflib.get_close_matches(name, list(BOUNDS), n=1)
            fix = f"did you mean 'thresholds.{near[0]}'?" if near else f"known bounds: {', '.join(BOUNDS)}"
            raise ConfigError("unknown bound", field=f"thresholds.{name}", fix=fix)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"got {brief(value)}, accepted: a finite number", field=f"thresholds.{name}")


def load_bounds(preset: str, path: str | Path | None = None) -> dict[str, float]:
    """The bounds of one preset from the thresholds TOML file (empty when the preset has none)."""
    path = Path(path) if path else THRESHOLDS_FILE
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read thresholds file: {e}", field="thresholds", value=str(path)) from e
    bounds = {k: float(v) for k, v in data.get(preset, {}).items()}
    validate_bounds(bounds)
    return bounds


#: the evidence table's keys (``[evidence.<preset>]`` in thresholds.toml) and what each one limits
EVIDENCE_KEYS = {"min_num_samples": ("comparison", "num_prompts"),
                 "min_bootstrap_resamples": ("comparison", "bootstrap_resamples")}
#: bounds that read a relative drop of toxicity, and the minimum detectable improvement of the same judge: a limit
#: below it asks for an effect the evaluation is too small to resolve
POWERED_BOUNDS = {
    "min_improvement": ("comparison", "min_detectable_improvement"),
    "min_improvement_ci_low": ("comparison", "min_detectable_improvement"),
    "min_response_improvement_ci_low": ("comparison", "response_min_detectable_improvement"),
    "min_second_improvement_ci_low": ("comparison", "second_min_detectable_improvement"),
}


def load_evidence(preset: str, path: str | Path | None = None) -> dict[str, int]:
    """The least evidence a verdict of ``preset`` needs (``[evidence.<preset>]``: ``min_num_samples``,
    ``min_bootstrap_resamples``); empty when the file names none for it."""
    path = Path(path) if path else THRESHOLDS_FILE
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read thresholds file: {e}", field="thresholds", value=str(path)) from e
    table = data.get("evidence", {}).get(preset, {})
    for key, value in table.items():
        if key not in EVIDENCE_KEYS or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"got {key} = {value!r}, accepted: {', '.join(EVIDENCE_KEYS)} as integers >= 1",
                              field=f"evidence.{preset}", value=str(path))
    return dict(table)


def lookup(metrics: dict[str, Any], path: tuple[str, ...]):
    node: Any = metrics
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def verdict(results: dict[str, Any], bounds: dict[str, float]) -> list[BoundResult]:
    """Each bound with its measured value and pass/fail. A metric that is missing fails its bound; the
    :data:`SFT_BOUNDS` are left out of a run that has no warm start (no ``metrics.sft``)."""
    metrics = results.get("metrics", results)
    out = []
    for name, bound in bounds.items():
        path, op, description = BOUNDS[name]
        if name in SFT_BOUNDS and "sft" not in metrics:
            continue
        value = lookup(metrics, path)
        if value is None or value != value:  # missing or NaN
            passed = False
            value = None
        else:
            value = float(value)
            passed = OPERATORS[op](value, bound)
        out.append(BoundResult(name, float(bound), op, value, passed, description))
    return out


def all_passed(results: list[BoundResult]) -> bool:
    return all(r.passed for r in results)


def bound_change(name: str, used: float | None, preset: float | None) -> str | None:
    """How the limit ``used`` for bound ``name`` differs from the preset's: None (the same), ``"loosened"``
    (easier to meet: a lower ``min_*`` or a higher ``max_*``), ``"tightened"``, ``"added"`` (the preset has
    no such bound) or ``"removed"`` (the preset's bound is not used)."""
    if preset is None:
        return None if used is None else "added"
    if used is None:
        return "removed"
    if float(used) == float(preset):
        return None
    lower_is_looser = BOUNDS[name][1] in (">", ">=")
    return "loosened" if (used < preset) == lower_is_looser else "tightened"


PASS, PASS_LOOSENED, FAIL = "PASS", "PASS with loosened bounds", "FAIL"


@dataclass
class Verdict:
    """A run judged against its bounds, its preset's bounds and the least evidence its preset asks for.

    ``status`` is PASS only when every bound holds, none is loosened or removed against the preset, at least one
    bound was judged and the evidence suffices; "PASS with loosened bounds" when loosened bounds were accepted
    (``accept_loosened``) and everything else holds; FAIL otherwise. ``reasons`` says why it is not a plain PASS.
    """

    bounds: list[BoundResult]
    preset_bounds: dict[str, float]
    evidence: list[dict[str, Any]]
    accept_loosened: bool = False

    def changed(self, change: str) -> list[str]:
        return [b.name for b in self.bounds if b.change == change]

    @property
    def evidence_ok(self) -> bool:
        return all(e["passed"] for e in self.evidence)

    @property
    def reasons(self) -> list[str]:
        out = []
        if not self.bounds:
            out.append("no bounds were judged: a verdict needs its preset's bounds")
        out += [e["message"] for e in self.evidence if not e["passed"]]
        if self.changed("removed"):
            out.append(f"preset bounds removed: {', '.join(self.changed('removed'))}")
        if self.changed("loosened"):
            out.append(f"bounds loosened against the preset: {', '.join(self.changed('loosened'))}"
                       + ("" if self.accept_loosened else " (accept them with --accept-loosened-bounds)"))
        out += [f"{b.name}: {b.reason}" for b in self.bounds if b.reason and b.change != "removed"]
        return out

    @property
    def status(self) -> str:
        if not self.bounds or not self.evidence_ok or not all_passed(self.bounds):
            return FAIL
        if self.changed("loosened"):
            return PASS_LOOSENED if self.accept_loosened else FAIL
        return PASS

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "status": self.status, "bounds": [b.to_dict() for b in self.bounds],
                "preset_bounds": dict(self.preset_bounds), "loosened": self.changed("loosened"),
                "removed": self.changed("removed"), "accepted_loosened_bounds": bool(self.accept_loosened),
                "evidence": list(self.evidence), "reasons": self.reasons}


def _evidence(metrics: dict[str, Any], evidence: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for key, least in evidence.items():
        value = lookup(metrics, EVIDENCE_KEYS[key])
        setting = {"min_num_samples": "eval.num_samples", "min_bootstrap_resamples": "eval.bootstrap_resamples"}[key]
        passed = value is not None and value >= least
        out.append({"check": key, "least": least, "value": value, "passed": passed,
                    "message": f"not enough evidence: {setting} gave {value}, the preset asks for at least {least}"
                               f" ({key} in harness/thresholds.toml [evidence])"})
    return out


def judge(results: dict[str, Any], bounds: dict[str, float], preset_bounds: dict[str, float], *,
          evidence: dict[str, int] | None = None, accept_loosened: bool = False) -> Verdict:
    """The run's :class:`Verdict`: :func:`verdict` of ``bounds``, each row marked with the preset's limit and how
    it differs (:func:`bound_change`); a preset bound missing from ``bounds`` is a failing row; a bound that
    reads a relative drop of toxicity fails as "not enough evidence" when its limit lies below the minimum
    detectable improvement of the run (:data:`POWERED_BOUNDS`); ``evidence`` (:func:`load_evidence`) gives the
    least evaluation size and resample count."""
    metrics = results.get("metrics", results)
    rows = verdict(results, bounds)
    for row in rows:
        row.preset = preset_bounds.get(row.name)
        row.change = bound_change(row.name, row.bound, row.preset)
        if row.name in POWERED_BOUNDS:
            mde = lookup(metrics, POWERED_BOUNDS[row.name])
            if mde is not None and mde == mde and row.bound > 0 and row.bound < mde:
                row.passed = False
                row.reason = (f"not enough evidence: its limit {row.bound:.4g} is below the run's minimum "
                              f"detectable improvement {mde:.4g} (evaluate more prompts: eval.num_samples)")
        if row.name == "max_judge_regret" and not row.passed and row.value is not None:
            curve = metrics.get("curve") or {}
            row.reason = (f"the second judge's improvement (mean of {curve.get('window')} curve points) peaked at "
                          f"steps {curve.get('peak_from_step')}-{curve.get('peak_step')} "
                          f"({_figure(curve.get('peak_second_improvement'))}) and ended at "
                          f"{_figure(curve.get('final_second_improvement'))} (steps {curve.get('final_from_step')}-"
                          f"{curve.get('final_step')}): the run went past the judge's peak"
                          + (f"; the selected point is step {curve['selected']['step']}" if curve.get("selected")
                             else "; no point passed the quality bounds to be selected"))
    for name, limit in preset_bounds.items():
        if name in bounds or (name in SFT_BOUNDS and "sft" not in metrics):
            continue
        value = lookup(metrics, BOUNDS[name][0])
        rows.append(BoundResult(name, float(limit), BOUNDS[name][1], None if value is None else float(value), False,
                                BOUNDS[name][2], preset=float(limit), change="removed",
                                reason="removed: the preset's bound is missing from the run's bounds"))
    return Verdict(rows, dict(preset_bounds), _evidence(metrics, evidence or {}), accept_loosened)


def _figure(value) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def _limit_cell(r: BoundResult) -> str:
    text = f"{r.bound:.4g}"
    if r.change in ("loosened", "tightened", "removed"):
        text += f" ({r.change.upper()}; preset {r.preset:.4g})"
    return text


def format_table(results: list[BoundResult] | Verdict) -> str:
    """A plain-text table for the terminal: the bounds, then the verdict line (and, for a :class:`Verdict`, the
    reasons it is not a plain PASS)."""
    judged = results if isinstance(results, Verdict) else None
    rows_in = judged.bounds if judged else results
    rows = [(r.name, r.op, _limit_cell(r), "missing" if r.value is None else f"{r.value:.4g}",
             ("PASS" if r.passed else "FAIL") + (" (not enough evidence)" if (r.reason or "").startswith("not enough")
                                                  else "")) for r in rows_in]
    overall = judged.status if judged else ("PASS" if all_passed(rows_in) else "FAIL")
    lines = [text_table(("bound", "op", "limit", "measured", "result"), rows),
             f"verdict: {overall} ({sum(r.passed for r in rows_in)}/{len(rows_in)} bounds hold)"]
    if judged:
        lines += [f"  {reason}" for reason in judged.reasons]
    return "\n".join(lines)


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart, a dashed line under the header: the terminal's tables."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
