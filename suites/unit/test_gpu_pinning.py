"""The GPU suite's spreading over a runner's GPUs (suites/gpu/gpu_pinning.py), checked on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "gpu" / "gpu_pinning.py"
_spec = importlib.util.spec_from_file_location("gpu_pinning_under_test", PATH)
pinning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pinning)


@pytest.mark.parametrize(("worker", "gpus", "expected"), [
    ("gw0", ["0", "1", "2", "3"], "0"),
    ("gw3", ["0", "1", "2", "3"], "3"),
    ("gw5", ["0", "1", "2", "3"], "1"),  # more workers than GPUs: round robin
    ("gw1", ["4", "6"], "6"),  # the runner's own CUDA_VISIBLE_DEVICES list, in its order
    ("gw0", ["GPU-1a2b", "GPU-3c4d"], "GPU-1a2b"),
])
def test_worker_i_gets_gpu_i_mod_n(worker, gpus, expected):
    assert pinning.gpu_for_worker(worker, gpus) == expected


@pytest.mark.parametrize(("worker", "gpus"), [(None, ["0", "1"]), ("master", ["0", "1"]), ("gw2", [])])
def test_no_pinning_outside_xdist_or_without_gpus(worker, gpus):
    assert pinning.gpu_for_worker(worker, gpus) is None


def test_every_gpu_gets_one_of_as_many_workers():
    gpus = [str(i) for i in range(8)]
    assert sorted(pinning.gpu_for_worker(f"gw{i}", gpus) for i in range(8)) == gpus


def test_runner_gpus_from_the_environment_or_nvidia_smi():
    assert pinning.runner_gpus("2, 3") == ["2", "3"]
    assert pinning.runner_gpus("") == []  # CUDA hidden on purpose: no GPU, not nvidia-smi's list
    assert pinning.runner_gpus(None, nvidia_smi="0\n1\n") == ["0", "1"]


def test_a_case_is_one_group():
    assert pinning.case_group("flan-t5-base", 1) == "flan-t5-base-s1"
    assert pinning.case_group("flan-t5-base", 1) != pinning.case_group("flan-t5-base", 2)
