"""The threshold suite on the tiny preset, CPU, parameterized by seed.

Every bound of harness/thresholds.toml's [tiny] table is asserted through the same ``verdict`` function
the CLI uses; each (seed) training runs once per session (see conftest.py). The warm start's bounds
(``SFT_BOUNDS``) are asserted on the recipe run, in test_sft.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_cli import run_cli

from harness.baselines import compare, format_checks
from harness.thresholds import SFT_BOUNDS, judge, load_bounds, load_evidence, verdict

SEEDS = [0, 1]
BOUNDS = {name: bound for name, bound in load_bounds("tiny").items() if name not in SFT_BOUNDS}

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bound", sorted(BOUNDS))
def test_bound_holds(tiny_run, seed, bound):
    run = tiny_run(seed)
    assert (run.run_dir / "results.json").exists(), f"run failed (exit {run.exit_code}): {run.stderr[-2000:]}"
    result = {b.name: b for b in verdict(run.results, BOUNDS)}[bound]
    assert result.passed, f"seed {seed}: {bound} measured {result.value} but must be {result.op} {result.bound}"


@pytest.mark.parametrize("seed", SEEDS)
def test_the_run_stays_within_the_baseline(tiny_run, tiny_baseline, seed):
    checks = compare(tiny_run(seed).results, tiny_baseline)
    assert all(c.passed for c in checks), format_checks(checks, "baselines/tiny.json")


@pytest.mark.parametrize("seed", SEEDS)
def test_cli_exit_code_and_printed_verdict_match_the_bounds(tiny_run, seed):
    run = tiny_run(seed)
    results = run.results
    judged = judge(results, BOUNDS, load_bounds("tiny"), evidence=load_evidence("tiny"))
    bounds = judged.bounds
    assert results["verdict"]["bounds"] == [b.to_dict() for b in bounds]
    assert results["verdict"]["status"] == judged.status == "PASS"  # an honest run with the preset's bounds
    assert results["verdict"]["preset_bounds"] == load_bounds("tiny")
    assert run.exit_code == (0 if judged.passed else 1)
    assert "verdict:" in run.stdout
    for b in bounds:
        assert b.name in run.stdout
    for name in ("results.json", "samples.jsonl", "train_stats.jsonl", "config.yaml", "index.html"):
        assert (run.run_dir / name).is_file(), name


def test_an_impossible_bound_fails_the_run_and_is_named(report_dir):
    out_dir = report_dir / f"pytest-impossible-bound-{time.time_ns()}"
    code, out, err = run_cli(["run", "--preset", "tiny", "--output", str(out_dir),
                              "--no-progress", "--no-report", "ppo.steps=2", "eval.num_samples=16",
                              "thresholds.max_kl=-1"])
    assert code == 1, err
    failed_line = next(line for line in out.splitlines() if line.startswith("failed bounds: "))
    assert "max_kl" in failed_line.removeprefix("failed bounds: ").split(", ")


def test_bad_input_exits_2_with_one_line(report_dir):
    code, out, err = run_cli(["run", "--preset", "tiny", "ppo.batchsize=3"])
    assert code == 2
    assert err.count("\n") == 1 and "ppo.batch_size" in err and "Traceback" not in err


def test_the_suites_runs_stay_out_of_the_users_reports(report_dir, tiny_run, pytestconfig):
    """Test runs go to a temporary directory, so they never appear in reports/index.html beside real runs."""
    if pytestconfig.getoption("--report-dir"):
        pytest.skip("--report-dir was given: the runs go where it says")
    user_reports = (Path(__file__).resolve().parents[2] / "reports").resolve()
    assert not report_dir.resolve().is_relative_to(user_reports)
    assert not tiny_run(0).run_dir.resolve().is_relative_to(user_reports)
