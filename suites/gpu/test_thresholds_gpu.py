"""The threshold suite on real models (``pytest suites/gpu --run-gpu``): every bound of the preset holds.

Skipped without ``--run-gpu``; with it on a machine without CUDA every test fails with a clear message.
"""

from __future__ import annotations

import pytest

from harness.baselines import compare, format_checks, load_baseline
from harness.thresholds import load_bounds, verdict

pytestmark = pytest.mark.gpu


def test_bound_holds(gpu_run, gpu_case):
    preset, seed, bound = gpu_case
    outcome = gpu_run(preset, seed)
    result = {b.name: b for b in verdict(outcome.results, load_bounds(preset))}[bound]
    assert result.passed, (f"{preset} seed {seed}: {bound} measured {result.value} but must be "
                           f"{result.op} {result.bound} (report: {outcome.report})")


def test_runs_in_bfloat16_on_cuda(gpu_run, pytestconfig):
    preset = pytestconfig.getoption("--gpu-presets").split(",")[0].strip()
    outcome = gpu_run(preset, int(pytestconfig.getoption("--gpu-seeds").split(",")[0]))
    env = outcome.results["environment"]
    assert str(env["device"]).startswith("cuda")
    assert outcome.results["config"]["policy"]["dtype"] in ("auto", "bfloat16")


def test_runs_stay_within_the_baseline(gpu_run, pytestconfig, baseline_seed):
    """With ``--baseline FILE`` (made by ``detox-harness baseline`` on the same runner), every seed's guarded
    metrics stay within its tolerance (one test per seed, so xdist runs it on the worker of that case)."""
    path = pytestconfig.getoption("--baseline")
    if not path:
        pytest.skip("no --baseline FILE given")
    baseline = load_baseline(path)
    outcome = gpu_run(baseline["preset"], baseline_seed)
    checks = compare(outcome.results, baseline, baseline_name=path)
    assert all(c.passed for c in checks), format_checks(checks, path)
