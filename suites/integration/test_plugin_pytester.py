"""The pytest plugin as pytest loads it: each test runs pytest in a subprocess (pytester), a new interpreter that
imports pytest and the plugin (the plugin imports torch lazily, but a second pytest in one interpreter would register
it twice by design): registered once however it is loaded, one test per preset and seed, a usage error for bad
seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import EXIT_BAD_INPUT, EXIT_PASS

pytestmark = pytest.mark.integration

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


def test_bad_seeds_are_a_usage_error_naming_the_option(pytester):
    pytester.makepyfile(test_x="def test_x(detox_case):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--detox-seeds", "0,x")
    assert result.ret != 0
    assert "--detox-seeds: 'x' is not a seed" in result.stderr.str() + result.stdout.str()
