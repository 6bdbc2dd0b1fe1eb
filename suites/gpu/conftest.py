"""GPU suite: real models on CUDA in bfloat16, parameterized by preset and seed (``--run-gpu``).

Model and data locations come from options or environment variables so that an offline runner can
point at local copies (``--policy-model``/``$DETOX_POLICY_MODEL``, ``--reward-model``/``$DETOX_REWARD_MODEL``,
``--data-path``/``$DETOX_DATA_PATH``, ``--policy-adapter``/``$DETOX_POLICY_ADAPTER``, ``--second-classifier``,
``--faithfulness-model``/``$DETOX_FAITHFULNESS_MODEL``). Each (preset, seed)
trains once per session; every bound is asserted on that one run.

On a runner with several GPUs, pytest-xdist spreads the cases: ``pytest suites/gpu --run-gpu -n <GPUs>
--dist loadgroup`` (see gpu_pinning.py): each worker is pinned to one GPU through ``CUDA_VISIBLE_DEVICES`` and
each (preset, seed) case runs on one worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from gpu_pinning import case_group, gpu_for_worker, runner_gpus


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs a group's tests on one worker")
    pin_this_worker()


def pin_this_worker() -> str | None:
    """Pin this pytest-xdist worker to its GPU (before torch initialises CUDA); the GPU given, or None."""
    gpu = gpu_for_worker(os.environ.get("PYTEST_XDIST_WORKER"), runner_gpus(os.environ.get("CUDA_VISIBLE_DEVICES")))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def gpu_overrides(config) -> list[str]:
    from harness.pytest_plugin import location_overrides

    out = ["device=cuda", *location_overrides(config)]
    out.extend(x for x in config.getoption("--gpu-overrides").split() if x)
    return out


def pytest_generate_tests(metafunc):
    if "gpu_case" not in metafunc.fixturenames and "baseline_seed" not in metafunc.fixturenames:
        return
    from harness.thresholds import SFT_BOUNDS, load_bounds

    sft = metafunc.config.getoption("--gpu-sft")
    presets = [p.strip() for p in metafunc.config.getoption("--gpu-presets").split(",") if p.strip()]
    seeds = [int(s) for s in metafunc.config.getoption("--gpu-seeds").split(",") if s.strip()]
    cases = []
    for preset in presets:
        for seed in seeds:
            for bound in sorted(load_bounds(preset)):
                if bound in SFT_BOUNDS and not sft:  # judged only where the warm start ran
                    continue
                cases.append(pytest.param((preset, seed, bound), id=f"{preset}-s{seed}-{bound}",
                                          marks=pytest.mark.xdist_group(case_group(preset, seed))))
    if "gpu_case" in metafunc.fixturenames:
        metafunc.parametrize("gpu_case", cases)
    if "baseline_seed" in metafunc.fixturenames:  # one test per seed, in that seed's group
        path = metafunc.config.getoption("--baseline")
        preset = _baseline_preset(path) if path else presets[0]
        metafunc.parametrize("baseline_seed", [pytest.param(seed, id=f"s{seed}", marks=pytest.mark.xdist_group(
            case_group(preset, seed))) for seed in seeds])


def _baseline_preset(path: str) -> str:
    from harness.baselines import load_baseline

    return load_baseline(path)["preset"]


def pytest_collection_modifyitems(config, items):
    """Tests of the suite that are not parameterized by a case use the first (preset, seed): its group."""
    preset = config.getoption("--gpu-presets").split(",")[0].strip()
    seed = int(config.getoption("--gpu-seeds").split(",")[0])
    for item in items:
        if Path(str(item.fspath)).parent != HERE:
            continue  # another suite's test
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(case_group(preset, seed)))


@pytest.fixture(scope="session")
def gpu_run(pytestconfig):
    from harness.config import load_config
    from harness.jobs.run import run
    from harness.plan import plan_run

    cache = {}
    # the nightly's reports, kept in their own folder (with their own history page), apart from users' runs
    report_dir = Path(pytestconfig.getoption("--report-dir") or ROOT / "reports" / "pytest-gpu")

    def get(preset: str, seed: int):
        key = (preset, seed)
        if key not in cache:
            cfg = load_config(preset, overrides=gpu_overrides(pytestconfig) + [f"seed={seed}"])
            stamp = time.strftime("%Y%m%dT%H%M%S")
            plan = plan_run(cfg, output=report_dir / f"{stamp}-pytest-gpu-{preset}-s{seed}",
                            sft=pytestconfig.getoption("--gpu-sft"))
            cache[key] = run(plan, progress=False)
        return cache[key]

    return get
