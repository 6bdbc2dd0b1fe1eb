"""Root pytest configuration: the ``--run-gpu`` option, ``--report-dir``, and hermetic defaults.

Follows pytest's documented pattern for opt-in tests ("Control skipping of tests according to command
line option"): tests marked ``gpu`` are skipped unless ``--run-gpu`` is given; with ``--run-gpu`` on a
machine without CUDA they *fail* with a clear message, so a nightly GPU job can never pass by silently
skipping everything.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

GPU_SKIP_REASON = "needs --run-gpu (and a CUDA device)"
NO_CUDA_MESSAGE = ("--run-gpu was given but no CUDA device is available (torch.cuda.is_available() is False): "
                   "run the GPU suite on a machine with an NVIDIA GPU and a CUDA build of torch, or drop --run-gpu")


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", default=False,
                     help="run tests marked gpu (real models on CUDA); fails if no CUDA device is available")
    parser.addoption("--baseline", action="store", default=None, metavar="FILE",
                     help="baseline file the suites compare their runs with (default for the tiny suite: the "
                          "committed baselines/tiny.json; the GPU suite compares only when this is given)")
    parser.addoption("--report-dir", action="store", default=None,
                     help="where suites that run the harness write their run folders and HTML reports "
                          "(default: a temporary directory for the CPU suites, reports/pytest-gpu/ for the GPU "
                          "suite; never beside a user's own runs in reports/)")
    group = parser.getgroup("detox-harness GPU suite")
    group.addoption("--gpu-presets", default="flan-t5-base",
                    help="comma-separated presets the GPU suite runs (e.g. tiny,flan-t5-base)")
    group.addoption("--gpu-seeds", default="0", help="comma-separated seeds the GPU suite runs")
    group.addoption("--policy-model", default=os.environ.get("DETOX_POLICY_MODEL"),
                    help="local directory (or hub id) replacing the preset's policy model [$DETOX_POLICY_MODEL]")
    group.addoption("--policy-adapter", default=os.environ.get("DETOX_POLICY_ADAPTER"),
                    help="LoRA adapter directory to start from [$DETOX_POLICY_ADAPTER]")
    group.addoption("--reward-model", default=os.environ.get("DETOX_REWARD_MODEL"),
                    help="local directory (or hub id) replacing the preset's reward classifier [$DETOX_REWARD_MODEL]")
    group.addoption("--second-classifier", default=os.environ.get("DETOX_SECOND_CLASSIFIER"),
                    help="local directory (or hub id) replacing the preset's second judge, unitary/toxic-bert "
                         "[$DETOX_SECOND_CLASSIFIER]")
    group.addoption("--faithfulness-model", default=os.environ.get("DETOX_FAITHFULNESS_MODEL"),
                    help="local directory (or hub id) replacing the preset's faithfulness judge, "
                         "FacebookAI/roberta-large-mnli [$DETOX_FAITHFULNESS_MODEL]")
    group.addoption("--data-path", default=os.environ.get("DETOX_DATA_PATH"),
                    help="local DialogSum file/directory (or hub id) replacing the preset's data [$DETOX_DATA_PATH]")
    group.addoption("--gpu-overrides", default="", help="extra space-separated key=value overrides for GPU runs")
    group.addoption("--gpu-sft", action="store_true", default=False,
                    help="run the whole recipe (run --sft: the supervised warm start, then PPO from it) and assert "
                         "the preset's SFT bounds too (min_sft_rouge_l); the warm start is cached between sessions")


def pytest_configure(config):
    if not config.getoption("--run-gpu"):
        # Unit and integration suites never touch the network: a hub lookup fails at once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-gpu"):
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and item.config.getoption("--run-gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.fail(NO_CUDA_MESSAGE, pytrace=False)
