"""Calibration (harness/calibration.py, ``detox-harness calibrate``): limits proposed from honest seeds by the
stated rule, and the planted runs a moved limit would let through."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness import calibration as cal
from harness.baselines import ABSOLUTE, load_baseline
from harness.cli import main
from harness.errors import EXIT_BAD_INPUT, EXIT_PASS
from harness.thresholds import load_bounds

ROOT = Path(__file__).resolve().parents[2]


def baseline_of(**values: list[float]) -> dict:
    """A baseline holding ``values`` per dotted metric path."""
    def entry(v):
        return {"kind": "seed", "values": v, "mean": float(np.mean(v)), "spread": float(np.std(v, ddof=1)),
                "min": min(v), "max": max(v)}

    return {"seeds": list(range(len(next(iter(values.values()))))),
            "metrics": {name.replace("__", "."): entry(v) for name, v in values.items()}}


HONEST_DROP = [0.02, 0.03, 0.04, 0.05, 0.035]  # a ROUGE-L drop: read on a linear scale
HONEST_CI_LOW = [0.83, 0.93, 0.88, 0.86, 0.89]


def test_a_limit_inside_the_prediction_limit_is_moved_out_and_a_safe_one_is_kept():
    base = baseline_of(comparison__rouge_l_drop=HONEST_DROP, comparison__mean_improvement_ci_low=HONEST_CI_LOW)
    tight = cal.propose(base, {"max_rouge_l_drop": 0.06, "min_improvement_ci_low": 0.2})
    by = {p.bound: p for p in tight}
    factor = cal.one_sided_factor(5, 2)
    expected = np.mean(HONEST_DROP) + factor * np.std(HONEST_DROP, ddof=1)
    p = by["max_rouge_l_drop"]
    assert p.prediction_limit == pytest.approx(expected)
    assert not p.safe and p.proposed == cal.round_outwards(expected, lower=False)
    assert p.proposed >= expected  # rounded outwards: never inside the prediction limit
    assert by["min_improvement_ci_low"].safe and by["min_improvement_ci_low"].proposed == 0.2


def test_a_strict_bound_never_moves_past_nothing_happened():
    base = baseline_of(comparison__logp_clean_gain=[0.2, 1.0, 2.0, 3.0, 0.5])
    (p,) = cal.propose(base, {"min_logp_clean_gain": 1.5})  # the spread puts the prediction limit below 0
    assert p.prediction_limit < 0 and not p.safe and p.proposed == 0.0


def test_a_metric_with_no_spread_gets_the_absolute_floor():
    base = baseline_of(after__empty_rate_upper=[0.0207] * 5)
    (p,) = cal.propose(base, {"max_empty_rate": 0.05})
    assert p.prediction_limit == pytest.approx(0.0207 + ABSOLUTE) and p.safe


def test_the_planted_cases_a_moved_limit_would_let_through_are_named():
    base = baseline_of(comparison__rouge_l_drop=HONEST_DROP)
    planted = {"copy": {"comparison": {"rouge_l_drop": 0.5}}, "mild-loss": {"comparison": {"rouge_l_drop": 0.065}}}
    (p,) = cal.propose(base, {"max_rouge_l_drop": 0.06}, planted)
    assert p.caught == ["copy", "mild-loss"]
    assert p.proposed > 0.065 and p.lost == ["mild-loss"]
    text = cal.format_proposals([p], planted=True)
    assert "mild-loss" in text and "to move: max_rouge_l_drop" in text


def test_a_kl_is_read_on_a_log_scale():
    """A KL is positive with a long right tail over seeds: its limit comes from the logs (log-normal)."""
    kl = [2.0, 3.0, 4.0, 8.0, 3.5]
    (p,) = cal.propose(baseline_of(after__kl_per_sequence_mean=kl), {"max_kl": 100.0})
    logs = np.log(kl)
    assert p.prediction_limit == pytest.approx(np.exp(logs.mean() + cal.one_sided_factor(5, 1) * logs.std(ddof=1)))
    assert p.prediction_limit > np.mean(kl) + cal.one_sided_factor(5, 1) * np.std(kl, ddof=1)


@pytest.mark.parametrize("value, lower, expected", [(0.6512, True, 0.65), (0.6512, False, 0.66), (10.47, False, 11),
                                                    (-4.31, True, -4.4), (0.0, True, 0.0)])
def test_round_outwards(value, lower, expected):
    assert cal.round_outwards(value, lower) == pytest.approx(expected)


def test_the_command_checks_the_committed_tiny_bounds(capsys):
    """``detox-harness calibrate --preset tiny``: every tiny limit is at least as loose as its prediction limit
    from the committed baseline's seeds (the tiny bounds come from this command)."""
    assert main(["calibrate", "--preset", "tiny", "--baseline", str(ROOT / "baselines" / "tiny.json"),
                 "--toml"]) == EXIT_PASS
    out = capsys.readouterr().out
    proposals = cal.propose(load_baseline(ROOT / "baselines" / "tiny.json"), load_bounds("tiny"))
    unsafe = [p.bound for p in proposals if not p.safe]
    assert unsafe == [], f"tiny limits inside their prediction limits: {unsafe}\n{out}"
    assert f"{len(proposals)} of {len(proposals)} limits are safe" in out and "[tiny]" in out


def test_the_command_refuses_a_file_that_is_not_a_planted_file(tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"runs": []}))
    assert main(["calibrate", "--preset", "tiny", "--planted", str(bad)]) == EXIT_BAD_INPUT
    assert "--planted" in capsys.readouterr().err


def test_a_limit_the_evaluation_cannot_resolve_is_not_safe_and_a_strict_one_drops_to_significance():
    """A relative-drop limit above 0 but below the seeds' minimum detectable improvement fails honest runs as
    'not enough evidence' (thresholds.judge): calibrate never keeps or proposes one."""
    base = baseline_of(comparison__mean_improvement_ci_low=[0.70, 0.72, 0.74, 0.71, 0.73])
    base["detectable"] = {"comparison.min_detectable_improvement": 0.69}
    (p,) = cal.propose(base, {"min_improvement_ci_low": 0.5})  # looser than the seeds need, but unresolvable
    assert p.detectable == 0.69 and 0.5 < p.prediction_limit < 0.69 and not p.safe and p.proposed == 0.0
    (kept,) = cal.propose(base, {"min_improvement_ci_low": 0.0})
    assert kept.safe and kept.proposed == 0.0
