"""Baselines (harness/baselines.py): built from runs of several seeds, a run compared with one.

The runs are the report's demo runs (real metric code on synthetic samples; ``strength`` is how much
training lowered toxicity), so every metric a baseline guards is present and varies with the seed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from harness import baselines as bl
from harness.cli import main
from harness.errors import EXIT_BAD_INPUT, HarnessError
from harness.report.demo import write_demo_run
from harness.results import load_results

SEEDS = (0, 1, 2, 3)


def seed_free_before(runs: list[dict]) -> list[dict]:
    """As in real runs, "before" (the starting policy on fixed evaluation seeds) is the same for every seed."""
    for r in runs[1:]:
        r["metrics"]["before"] = copy.deepcopy(runs[0]["metrics"]["before"])
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return seed_free_before([load_results(write_demo_run(root / f"s{seed}", seed=seed, strength=0.6 + 0.02 * seed))
                             for seed in SEEDS])


@pytest.fixture(scope="module")
def baseline(runs):
    return bl.build_baseline(runs)


def test_a_baseline_holds_each_guarded_metrics_mean_spread_and_tolerance(runs, baseline):
    m = baseline["metrics"]["comparison.mean_improvement"]
    values = [r["metrics"]["comparison"]["mean_improvement"] for r in runs]
    assert m["values"] == values and m["mean"] == pytest.approx(sum(values) / len(SEEDS))
    seed_metrics = [k for k, v in baseline["metrics"].items() if v["kind"] == "seed"]
    factor = bl.prediction_factor(len(SEEDS), len(seed_metrics))
    assert m["kind"] == "seed" and m["spread"] > 0
    assert m["tolerance"] == pytest.approx(max(factor * m["spread"], bl.ABSOLUTE))
    assert baseline["tolerance_rule"]["factor"] == factor and m["scale"] == "linear"
    assert (m["low"], m["high"]) == pytest.approx((m["mean"] - m["tolerance"], m["mean"] + m["tolerance"]))
    # a KL is positive with a long right tail: its band is that of its logs, wider above the mean than below
    kl = baseline["metrics"]["after.kl_per_sequence_mean"]
    assert kl["scale"] == "log" and kl["high"] - kl["mean"] > kl["mean"] - kl["low"] > 0
    assert all(name.startswith("before.") == (v["kind"] == "fixed") for name, v in baseline["metrics"].items())
    assert baseline["seeds"] == list(SEEDS) and baseline["config"] == runs[0]["config"]
    assert {"torch", "transformers"} <= set(baseline["environment"]["versions"])
    # every metric a bound reads is guarded, when the runs measured it
    for path, _, _ in bl.BOUNDS.values():
        if bl._lookup(runs[0]["metrics"], path) is not None:
            assert ".".join(path) in baseline["metrics"]


def test_an_honest_seed_passes_and_a_planted_regression_fails_on_the_metric_that_moved(runs, baseline,
                                                                                       tmp_path):
    held_out = load_results(write_demo_run(tmp_path / "s1", seed=1, strength=0.61))  # not one of its runs
    held_out["metrics"]["before"] = copy.deepcopy(runs[0]["metrics"]["before"])
    assert all(c.passed for c in bl.compare(held_out, baseline))
    planted = json.loads(json.dumps(runs[1]))
    m = baseline["metrics"]["comparison.mean_improvement"]
    planted["metrics"]["comparison"]["mean_improvement"] = m["mean"] - 1.5 * m["tolerance"]
    failed = [c for c in bl.compare(planted, baseline) if not c.passed]
    assert [c.metric for c in failed] == ["comparison.mean_improvement"]
    # moving the other way beyond the tolerance is a change too (a regression suite compares both ways)
    planted["metrics"]["comparison"]["mean_improvement"] = m["mean"] + 1.5 * m["tolerance"]
    assert [c.metric for c in bl.compare(planted, baseline) if not c.passed] == ["comparison.mean_improvement"]
    del planted["metrics"]["after"]["rougeL"]
    assert "after.rougeL" in [c.metric for c in bl.compare(planted, baseline) if not c.passed]


def test_a_run_of_another_config_is_an_input_error_but_another_seed_is_not(runs, baseline):
    other = json.loads(json.dumps(runs[0]))
    other["config"]["seed"] = 99
    other["config"]["output"]["dir"] = "/elsewhere"
    bl.compare(other, baseline)
    other["config"]["ppo"]["learning_rate"] = 1.0
    with pytest.raises(HarnessError) as e:
        bl.compare(other, baseline)
    assert e.value.field == "--baseline" and "ppo.learning_rate" in str(e.value)
    with pytest.raises(HarnessError) as e:
        bl.build_baseline([*runs[:2], other])
    assert "ppo.learning_rate" in str(e.value)


def test_too_few_runs_make_no_baseline(runs):
    with pytest.raises(HarnessError) as e:
        bl.build_baseline(runs[:bl.MIN_SEEDS - 1])
    assert e.value.field == "--seeds"


def test_the_prediction_factor_is_the_t_quantile_of_a_new_seed():
    # one metric, 5 seeds, 5%: t(0.975, 4) = 2.7764 (tables), times sqrt(1 + 1/5)
    assert bl.prediction_factor(5, 1, alpha=0.05) == pytest.approx(2.7764 * (1.2 ** 0.5), abs=1e-3)
    # Bonferroni: 20 metrics share the budget, each at a twentieth of it (the quantile widens)
    assert bl.prediction_factor(5, 20) == pytest.approx(bl.prediction_factor(5, 1, alpha=bl.FAMILY_ALPHA / 20))
    assert bl.prediction_factor(5, 20) > bl.prediction_factor(5, 1)
    assert bl.prediction_factor(5, 20) > bl.prediction_factor(20, 20)  # more seeds, a narrower band


def test_an_honest_run_fails_a_baseline_of_normal_metrics_at_most_at_the_family_rate(monkeypatch):
    """The rule's promise, simulated: m normal metrics, n baseline seeds, one fresh seed; the share of trials
    where any metric leaves its band is at most FAMILY_ALPHA (Bonferroni is a little conservative)."""
    monkeypatch.setattr(bl, "ABSOLUTE", 0.0)  # the floor only widens bands: test the t rule itself
    rng = np.random.default_rng(0)
    trials, n, m = 4000, 5, 24
    seeds = rng.normal(size=(trials, n, m))
    fresh = rng.normal(size=(trials, m))
    factor = bl.prediction_factor(n, m)
    band = np.maximum(factor * seeds.std(axis=1, ddof=1), bl.ABSOLUTE)
    failed = (np.abs(fresh - seeds.mean(axis=1)) > band).any(axis=1).mean()
    se = (bl.FAMILY_ALPHA * (1 - bl.FAMILY_ALPHA) / trials) ** 0.5
    assert bl.FAMILY_ALPHA - 6 * se < failed <= bl.FAMILY_ALPHA + 3 * se, failed
    # the old rule (4 spreads, no family budget) fails far more such runs
    old = (np.abs(fresh - seeds.mean(axis=1)) > 4 * seeds.std(axis=1, ddof=1)).any(axis=1).mean()
    assert old > 4 * bl.FAMILY_ALPHA, old


def test_a_changed_before_evaluation_is_named_as_such(runs, baseline, capsys):
    changed = json.loads(json.dumps(runs[2]))
    changed["metrics"]["before"]["toxicity_mean"] += 1e-3  # far below a seed band, far above rounding
    checks = bl.compare(changed, baseline)
    failed = [c for c in checks if not c.passed]
    assert [(c.metric, c.kind) for c in failed] == [("before.toxicity_mean", "fixed")]
    assert "the before evaluation changed" in bl.format_checks(checks, "b.json")
    # where the baseline's own runs measured "before" differently (nondeterministic kernels), it is a seed metric
    unequal = json.loads(json.dumps(runs))
    unequal[1]["metrics"]["before"]["toxicity_mean"] += 1e-3
    assert bl.build_baseline(unequal)["metrics"]["before.toxicity_mean"]["kind"] == "seed"
    assert baseline["metrics"]["before.toxicity_mean"]["kind"] == "fixed"


def test_a_baseline_of_another_world_is_an_input_error_at_once(runs, baseline, tmp_path):
    mine = json.loads(json.dumps(runs[0]))
    mine["worlds"] = {"0": "f" * 64}
    with pytest.raises(HarnessError, match="another tiny world") as e:
        bl.compare(mine, {**baseline, "worlds": {"0": "a" * 64}})
    assert e.value.field == "--baseline" and "seed 0 aaaaaaaaaaaa" in str(e.value)
    bl.require_same_world({"0": "f" * 64}, {**baseline, "worlds": {"0": "f" * 64}})
    mixed = json.loads(json.dumps(runs))
    mixed[1]["worlds"] = {"0": "b" * 64}
    with pytest.raises(HarnessError, match="another tiny world"):
        bl.build_baseline(mixed)


def test_a_run_against_a_baseline_of_another_world_exits_2_before_loading(tmp_path, capsys):
    """The CLI: the world check comes before any model loads, so it is quick and leaves nothing behind."""
    from harness import tiny

    if not tiny.is_built(tiny.committed_dir()):
        pytest.skip("no committed tiny world")
    committed = json.loads((Path(__file__).parents[2] / "baselines" / "tiny.json").read_text())
    other = tmp_path / "other-world.json"
    other.write_text(json.dumps({**committed, "worlds": {"0": "0" * 64}}))
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--baseline", str(other), "--output", str(out), "--no-progress"]) \
        == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "another tiny world" in err and "--baseline" in err
    assert not out.exists()


def test_the_file_is_kept_unless_regeneration_is_asked_for(tmp_path, baseline):
    path = bl.write_baseline(tmp_path / "baselines" / "tiny.json", baseline)
    assert bl.load_baseline(path)["metrics"] == json.loads(json.dumps(baseline["metrics"]))
    with pytest.raises(HarnessError) as e:
        bl.write_baseline(path, {"format": bl.BASELINE_FORMAT, "metrics": {}})
    assert "--force-regen" in str(e.value)
    bl.write_baseline(path, {**baseline, "seeds": [7, 8]}, force_regen=True)
    assert bl.load_baseline(path)["seeds"] == [7, 8]


@pytest.mark.parametrize("content", ["[]", '{"format": 99, "metrics": {}}', '{"format": 1, "metrics": {}}'])
def test_a_file_that_is_not_a_baseline_is_refused(tmp_path, content):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(HarnessError) as e:
        bl.load_baseline(path)
    assert e.value.field == "--baseline"
    with pytest.raises(HarnessError):
        bl.load_baseline(tmp_path / "missing.json")


@pytest.mark.parametrize("seeds", ["0", "0,1", "0,0,1", "a,b,c", "1,2,-2"])
def test_the_baseline_command_wants_three_distinct_seeds(capsys, seeds):
    assert main(["baseline", "--preset", "tiny", "--seeds", seeds]) == EXIT_BAD_INPUT
    assert "--seeds" in capsys.readouterr().err
