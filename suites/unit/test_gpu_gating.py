"""The --run-gpu option: skipped without it, a clear failure with it on a machine without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch  # imported before pytester snapshots sys.modules: an inner run must never import it a second time

ROOT = Path(__file__).resolve().parents[2]
GPU_TEST = """
import pytest

@pytest.mark.gpu
def test_on_gpu():
    assert True

def test_plain():
    assert True
"""


# The project's root conftest, plus a line that hides any CUDA device (so the test means the same on a
# GPU machine). The inner pytest runs in this interpreter (a subprocess would import torch again, seconds
# each): ``monkeypatch`` puts torch.cuda.is_available back after the test, whatever the conftest set.
HIDE_CUDA = "\nimport torch\ntorch.cuda.is_available = lambda: False\n"


@pytest.fixture
def gated(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", torch.cuda.is_available)  # restored at teardown
    pytester.makeconftest((ROOT / "conftest.py").read_text() + HIDE_CUDA)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(test_gpu=GPU_TEST)
    return pytester


def test_gpu_tests_are_skipped_without_the_option(gated):
    result = gated.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*needs --run-gpu*"])


def test_gpu_tests_fail_clearly_with_the_option_and_no_cuda(gated):
    result = gated.runpytest_inprocess("--run-gpu")
    result.assert_outcomes(passed=1, errors=1)  # pytest.fail in setup: reported as an error, run fails
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*--run-gpu was given but no CUDA device is available*"])


def test_gpu_sft_adds_the_warm_start_bounds_to_the_gpu_cases(pytester):
    """``--gpu-sft`` runs the recipe, so the cases include the warm start's bounds; without it they are not
    asked of a run that has no warm start."""
    import shutil

    pytester.makeconftest((ROOT / "conftest.py").read_text())
    gpu = pytester.path / "gpu"
    gpu.mkdir()
    for helper in (ROOT / "suites" / "gpu").glob("*.py"):
        if not helper.name.startswith("test_"):
            shutil.copy(helper, gpu / helper.name)
    (gpu / "test_cases.py").write_text("def test_case(gpu_case):\n    pass\n")
    plain = pytester.runpytest_inprocess("--collect-only", "-q", "--gpu-presets", "tiny", str(gpu))
    recipe = pytester.runpytest_inprocess("--collect-only", "-q", "--gpu-presets", "tiny", "--gpu-sft", str(gpu))
    assert "tiny-s0-max_kl" in plain.stdout.str() and "min_sft_rouge_l" not in plain.stdout.str()
    assert "tiny-s0-min_sft_rouge_l" in recipe.stdout.str() and "tiny-s0-max_kl" in recipe.stdout.str()
