"""The pytest plugin (harness.pytest_plugin) and ``detox-harness init`` without a second pytest: the assertions'
failure is the verdict's table, init refuses bad input, a run is made once per session. The tests that run pytest
in a subprocess (pytester: a new interpreter importing pytest and the plugin, seconds each) are in
suites/integration/test_plugin_pytester.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import EXIT_BAD_INPUT
from harness.pytest_plugin import HarnessRun, assert_bound, assert_passed
from harness.thresholds import BoundResult, Verdict

ROOT = Path(__file__).resolve().parents[2]


def test_init_refuses_an_unknown_preset_naming_it(tmp_path, capsys):
    assert main(["init", str(tmp_path / "p"), "--presets", "flan-t5-xxxl"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--presets" in err and "flan-t5-xxxl" in err and "tiny" in err
    assert not (tmp_path / "p").exists()


def _run(passed: bool) -> HarnessRun:
    rows = [BoundResult("max_kl", 15.0, "<=", 3.2 if passed else 22.5, passed, "KL to the reference"),
            BoundResult("min_improvement", 0.76, ">=", 0.93, True, "mean toxicity improvement")]
    verdict = Verdict(rows, {"max_kl": 15.0, "min_improvement": 0.76}, [], False)
    return HarnessRun(Path("/runs/r1"), 0 if passed else 1, {}, verdict)


def test_the_assertions_fail_with_the_verdicts_table():
    assert_passed(_run(True))
    assert_bound(_run(False), "min_improvement")
    with pytest.raises(pytest.fail.Exception) as failed:
        assert_passed(_run(False))
    text = str(failed.value)
    assert "failed bounds: max_kl" in text and "bound" in text and "limit" in text and "measured" in text
    assert "22.5" in text and "verdict: FAIL (1/2 bounds hold)" in text
    with pytest.raises(pytest.fail.Exception, match="bound max_kl failed"):
        assert_bound(_run(False), "max_kl")
    with pytest.raises(pytest.fail.Exception, match="not judged"):
        assert_bound(_run(True), "no_such_bound")
    broken = HarnessRun(Path("/runs/r2"), 2, error="policy.model: not found; give a directory")
    with pytest.raises(pytest.fail.Exception, match="(?s)could not start.*policy.model: not found"):
        assert_passed(broken)


def test_a_run_is_made_once_per_session_even_when_it_cannot_start_or_crashes(pytestconfig, tmp_path, monkeypatch):
    from harness.errors import HarnessError
    from harness.pytest_plugin import Runner

    calls = []

    def refuse(request, **kwargs):
        calls.append(request)
        if request.preset == "tiny":
            raise HarnessError("no such file", field="data.path", fix="give a DialogSum file")
        raise RuntimeError("a bug")

    monkeypatch.setattr("harness.plan.plan_run", refuse)
    runner = Runner(pytestconfig, tmp_path)
    first = runner.run("tiny", 0, "ppo.steps=2")
    assert runner.run("tiny", 0, "ppo.steps=2") is first and len(calls) == 1
    assert first.exit_code == EXIT_BAD_INPUT and first.error.startswith("data.path: no such file")
    assert "seed=0" in calls[0].overrides and "ppo.steps=2" in calls[0].overrides
    for _ in range(2):
        with pytest.raises(RuntimeError, match="a bug"):
            runner.run("flan-t5-small", 1)
    assert len(calls) == 2
