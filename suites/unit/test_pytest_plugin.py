"""The pytest plugin (harness.pytest_plugin) and ``detox-harness init``: registered once however it is loaded,
one test per preset and seed, failures that print the verdict's table. Runs pytest in subprocesses (pytester):
the plugin imports torch lazily, but a second pytest in one interpreter would register it twice by design."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import EXIT_BAD_INPUT, EXIT_PASS
from harness.pytest_plugin import HarnessRun, assert_bound, assert_passed
from harness.thresholds import BoundResult, Verdict

ROOT = Path(__file__).resolve().parents[2]


def test_listed_in_a_conftest_and_given_with_p_the_plugin_registers_its_options_once(pytester):
    """An installed entry point is named like the module; ``-p harness.pytest_plugin`` registers it under that name
    the same way, and a conftest's ``pytest_plugins`` then finds it there (no 'option already added' error)."""
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]\n')
    pytester.makepyfile(test_x="def test_x(detox_run):\n    assert callable(detox_run)\n")
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    helped = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--help")
    assert helped.ret == 0
    assert helped.stdout.str().count("--detox-config") == 1 and "--policy-model" in helped.stdout.str()


def test_init_writes_a_starter_whose_suite_has_one_test_per_preset_seed_and_bound(pytester, capsys):
    project = pytester.path / "team"
    assert main(["init", str(project), "--presets", "tiny,flan-t5-small", "--seeds", "0,3"]) == EXIT_PASS
    for name in ("detox.yaml", "suites/test_detox.py", "pytest.ini", "ci/detox-nightly.yml"):
        assert (project / name).is_file(), name
    assert "detox_presets = tiny,flan-t5-small" in (project / "pytest.ini").read_text()
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--collect-only", "-q",
                                           "-p", "no:cacheprovider", "--rootdir", str(project), "-c",
                                           str(project / "pytest.ini"), str(project / "suites"))
    ids = [line for line in result.stdout.lines if "::" in line]
    assert len(ids) == 2 * 2 * 3  # (verdict + 2 bounds) x 2 presets x 2 seeds
    assert any("test_verdict[tiny-s0]" in x for x in ids) and any("test_verdict[flan-t5-small-s3]" in x for x in ids)
    assert any("test_bound[tiny-s3-max_kl]" in x for x in ids)
    assert main(["init", str(project)]) == EXIT_BAD_INPUT  # never over its own files
    assert "would overwrite detox.yaml" in capsys.readouterr().err


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


def test_bad_seeds_are_a_usage_error_naming_the_option(pytester):
    pytester.makepyfile(test_x="def test_x(detox_case):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--detox-seeds", "0,x")
    assert result.ret != 0
    assert "--detox-seeds: 'x' is not a seed" in result.stderr.str() + result.stdout.str()


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
