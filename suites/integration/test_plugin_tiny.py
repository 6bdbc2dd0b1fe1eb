"""The plugin end to end (issue 25): ``detox-harness init`` makes a scratch project, and pytest (in a subprocess,
with the plugin as a team would load it) runs its suite on the tiny world. As written it passes; with a planted
no-op in its config (a learning rate that moves nothing) the same suite fails, printing the verdict's table.

Two tiny runs with the preset's own evidence (128 prompts: a PASS needs at least 100); the planted one reuses the
honest one's "before" evaluation from the cache (same reference, prompts, judges and evaluation settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main

pytestmark = pytest.mark.integration

PLANTED = "\nppo:\n  learning_rate: 1.0e-12  # planted: the optimizer's steps move nothing\n"


def _scratch_pytest(pytester, project: Path, runs: Path, *args: str):
    return pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "-p", "no:cacheprovider", "-c",
                                         str(project / "pytest.ini"), "--rootdir", str(project), "--report-dir",
                                         str(runs), *args, str(project / "suites"), timeout=1500)


def _before_cache(runs: Path) -> list[str]:
    found = sorted(runs.glob("*/results.json"))
    return [json.loads(p.read_text())["provenance"]["before_cache"]["before"] for p in found]


def test_an_init_project_passes_on_the_tiny_world_and_a_planted_no_op_fails_with_the_table(pytester, monkeypatch):
    monkeypatch.setenv("DETOX_HARNESS_CACHE", str(pytester.path / "cache"))  # its own "before" cache
    project = pytester.path / "team"
    assert main(["init", str(project), "--presets", "tiny", "--seeds", "0"]) == 0

    honest = _scratch_pytest(pytester, project, pytester.path / "runs-honest", "-rA")
    print("---- scratch project, as written ----\n" + honest.stdout.str())
    honest.assert_outcomes(passed=3)
    assert _before_cache(pytester.path / "runs-honest") == ["miss"]

    with open(project / "detox.yaml", "a") as f:
        f.write(PLANTED)
    planted = _scratch_pytest(pytester, project, pytester.path / "runs-planted", "-rA")
    print("---- scratch project, planted no-op ----\n" + planted.stdout.str())
    assert planted.ret == 1
    planted.assert_outcomes(failed=2, passed=1)  # the verdict and min_improvement fail; max_kl holds
    text = planted.stdout.str()
    for line in ("*detox-harness verdict: FAIL; failed bounds:*min_improvement*",
                 "*bound*op*limit*measured*result*", "*min_improvement *>=*FAIL*", "*verdict: FAIL (*bounds hold)*"):
        planted.stdout.fnmatch_lines([line])
    assert "Traceback" not in text
    assert _before_cache(pytester.path / "runs-planted") == ["hit"]
