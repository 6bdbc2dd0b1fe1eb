"""GPU suite: real models on CUDA in bfloat16, parameterized by preset and seed (``--run-gpu``).

Model and data locations come from options or environment variables so that an offline runner can
point at local copies (``--policy-model``/``$DETOX_POLICY_MODEL``, ``--reward-model``/``$DETOX_REWARD_MODEL``,
``--data-path``/``$DETOX_DATA_PATH``, ``--policy-adapter``/``$DETOX_POLICY_ADAPTER``). Each (preset, seed)
trains once per session; every bound is asserted on that one run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_overrides(config) -> list[str]:
    out = ["device=cuda"]
    for option, key in (("--policy-model", "policy.model"), ("--policy-adapter", "policy.adapter"),
                        ("--reward-model", "reward.model"), ("--second-classifier", "eval.second_classifier"),
                        ("--data-path", "data.path")):
        value = config.getoption(option)
        if value:
            out.append(f"{key}={value}")
    out.extend(x for x in config.getoption("--gpu-overrides").split() if x)
    return out


def pytest_generate_tests(metafunc):
    if "gpu_case" not in metafunc.fixturenames:
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
                cases.append(pytest.param((preset, seed, bound), id=f"{preset}-s{seed}-{bound}"))
    metafunc.parametrize("gpu_case", cases)


@pytest.fixture(scope="session")
def gpu_run(pytestconfig):
    from harness.config import load_config
    from harness.pipeline import run

    cache = {}
    # the nightly's reports, kept in their own folder (with their own history page), apart from users' runs
    report_dir = Path(pytestconfig.getoption("--report-dir") or ROOT / "reports" / "pytest-gpu")

    def get(preset: str, seed: int):
        key = (preset, seed)
        if key not in cache:
            cfg = load_config(preset, overrides=gpu_overrides(pytestconfig) + [f"seed={seed}"])
            stamp = time.strftime("%Y%m%dT%H%M%S")
            cache[key] = run(cfg, output=report_dir / f"{stamp}-pytest-gpu-{preset}-s{seed}", progress=False,
                             sft=pytestconfig.getoption("--gpu-sft"))
        return cache[key]

    return get
