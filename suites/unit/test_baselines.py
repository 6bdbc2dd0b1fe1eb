"""Baselines (harness/baselines.py): built from runs of several seeds, a run compared with one.

The runs are the report's demo runs (real metric code on synthetic samples; ``strength`` is how much
training lowered toxicity), so every metric a baseline guards is present and varies with the seed.
"""

from __future__ import annotations

import json

import pytest

from harness import baselines as bl
from harness.cli import main
from harness.errors import EXIT_BAD_INPUT, HarnessError
from harness.report.demo import write_demo_run
from harness.results import load_results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [load_results(write_demo_run(root / f"s{seed}", seed=seed, strength=0.6 + 0.02 * seed))
            for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def baseline(runs):
    return bl.build_baseline(runs)


def test_a_baseline_holds_each_guarded_metrics_mean_spread_and_tolerance(runs, baseline):
    m = baseline["metrics"]["comparison.mean_improvement"]
    values = [r["metrics"]["comparison"]["mean_improvement"] for r in runs]
    assert m["values"] == values and m["mean"] == pytest.approx(sum(values) / 3)
    assert m["spread"] > 0 and m["tolerance"] == bl.tolerance(m["mean"], m["spread"])
    assert m["tolerance"] >= bl.SIGMAS * m["spread"]
    assert baseline["seeds"] == [0, 1, 2] and baseline["config"] == runs[0]["config"]
    assert {"torch", "transformers"} <= set(baseline["environment"]["versions"])
    # every metric a bound reads is guarded, when the runs measured it
    for path, _, _ in bl.BOUNDS.values():
        if bl._lookup(runs[0]["metrics"], path) is not None:
            assert ".".join(path) in baseline["metrics"]


def test_an_honest_seed_passes_and_a_planted_regression_fails_on_the_metric_that_moved(runs, baseline,
                                                                                       tmp_path):
    held_out = load_results(write_demo_run(tmp_path / "s1", seed=1, strength=0.61))  # not one of its runs
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
        bl.build_baseline([runs[0], other])
    assert "ppo.learning_rate" in str(e.value)


def test_one_run_has_no_spread(runs):
    with pytest.raises(HarnessError) as e:
        bl.build_baseline(runs[:1])
    assert e.value.field == "--seeds"


def test_the_file_is_kept_unless_regeneration_is_asked_for(tmp_path, baseline):
    path = bl.write_baseline(tmp_path / "baselines" / "tiny.json", baseline)
    assert bl.load_baseline(path)["metrics"] == json.loads(json.dumps(baseline["metrics"]))
    with pytest.raises(HarnessError) as e:
        bl.write_baseline(path, {"format": bl.BASELINE_FORMAT, "metrics": {}})
    assert "--force-regen" in str(e.value)
    bl.write_baseline(path, {**baseline, "seeds": [7, 8]}, force_regen=True)
    assert bl.load_baseline(path)["seeds"] == [7, 8]


@pytest.mark.parametrize("content", ["[]", '{"format": 99, "metrics": {}}', '{"format": 1}'])
def test_a_file_that_is_not_a_baseline_is_refused(tmp_path, content):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(HarnessError) as e:
        bl.load_baseline(path)
    assert e.value.field == "--baseline"
    with pytest.raises(HarnessError):
        bl.load_baseline(tmp_path / "missing.json")


@pytest.mark.parametrize("seeds", ["0", "0,0", "a,b", "1,-2"])
def test_the_baseline_command_wants_two_distinct_seeds(capsys, seeds):
    assert main(["baseline", "--preset", "tiny", "--seeds", seeds]) == EXIT_BAD_INPUT
    assert "--seeds" in capsys.readouterr().err
