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

from .errors import ConfigError

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
    "min_logp_clean_gain": (("comparison", "logp_clean_gain"), ">",
                            "mean log P(reward label, e.g. nothate) after minus before, in nats"),
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


@dataclass
class BoundResult:
    name: str
    bound: float
    op: str
    value: float | None
    passed: bool
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_bounds(bounds: dict[str, Any]) -> None:
    import difflib

    for name, value in bounds.items():
        if name not in BOUNDS:
            near = difflib.get_close_matches(name, list(BOUNDS), n=1)
            fix = f"did you mean 'thresholds.{near[0]}'?" if near else f"known bounds: {', '.join(BOUNDS)}"
            raise ConfigError("unknown bound", field=f"thresholds.{name}", fix=fix)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"got {value!r}, accepted: a finite number", field=f"thresholds.{name}")


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


def format_table(results: list[BoundResult]) -> str:
    """A plain-text table for the terminal."""
    rows = [(r.name, r.op, f"{r.bound:.4g}", "missing" if r.value is None else f"{r.value:.4g}",
             "PASS" if r.passed else "FAIL") for r in results]
    overall = "PASS" if all_passed(results) else "FAIL"
    return (text_table(("bound", "op", "limit", "measured", "result"), rows)
            + f"\nverdict: {overall} ({sum(r.passed for r in results)}/{len(results)} bounds hold)")


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart, a dashed line under the header: the terminal's tables."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
