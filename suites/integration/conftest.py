"""Session fixtures for the CPU integration suite: each tiny-world run happens once per session.

``tiny_run(seed)`` runs ``detox-harness run --preset tiny --seed SEED`` (in-process, through the CLI's
``main``) into ``<report-dir>/pytest-tiny-s<seed>-<time>`` and caches the outcome, so that every bound
asserted on it reuses the same training run: a failing bound does not retrain.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CliRun:
    seed: int
    exit_code: int
    stdout: str
    stderr: str
    run_dir: Path
    seconds: float

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


@pytest.fixture(scope="session")
def report_dir(detox_report_dir) -> Path:
    """The plugin's ``detox_report_dir``: ``--report-dir``, else a temporary directory (test runs never enter the
    history of a user's reports/)."""
    return detox_report_dir


@pytest.fixture(scope="session")
def tiny_baseline(pytestconfig) -> dict:
    """``--baseline FILE``, else the committed ``baselines/tiny.json``."""
    from harness.baselines import load_baseline

    return load_baseline(pytestconfig.getoption("--baseline") or ROOT / "baselines" / "tiny.json")


@pytest.fixture(scope="session")
def tiny_run(report_dir):
    cache: dict[int, CliRun] = {}

    def get(seed: int) -> CliRun:
        if seed not in cache:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            run_dir = report_dir / f"{stamp}-pytest-tiny-s{seed}"
            t = time.time()
            code, out, err = run_cli(["run", "--preset", "tiny", "--seed", str(seed), "--output", str(run_dir),
                                      "--no-progress"])
            cache[seed] = CliRun(seed, code, out, err, run_dir, time.time() - t)
        return cache[seed]

    return get


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_run) -> Path:
    """A finished tiny-world run folder (results.json, samples.jsonl, train_stats.jsonl, index.html)."""
    run = tiny_run(0)
    assert (run.run_dir / "results.json").exists(), f"the tiny run failed (exit {run.exit_code}):\n{run.stderr}"
    return run.run_dir
