"""The over-optimisation curve on the tiny world (issue 24): a run killed between two curve points and resumed has
the uninterrupted run's curve, each point once and none missing; ``detox-harness curve`` remakes a finished run's
curve from its checkpoints with the same numbers; the curve leaves training as it was.

The over-optimisation case itself (the judge's curve rising then falling, the regret bound, the selected peak) is
a planted case of test_planted.py; the honest seeds' regret is asserted with every other bound in
test_thresholds_tiny.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_cli import finish

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STEPS, CHECKPOINT_EVERY = 6, 2
SETTINGS = [f"ppo.steps={STEPS}", f"ppo.checkpoint_every={CHECKPOINT_EVERY}", "eval.num_samples=16",
            "eval.curve_every=1"]
FLAGS = ["--no-progress", "--no-report"]
WAIT_S = 400
CLOSE = 1e-6  # the same weights and seeds on the same machine: the same numbers up to float summation order


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--preset", "tiny", "--output", str(out),
                             *SETTINGS, *extra, *FLAGS], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def same_point(a: dict, b: dict) -> bool:
    return all((a[k] is None and b[k] is None) or abs(a[k] - b[k]) <= CLOSE * max(1.0, abs(a[k]))
               for k in ("kl", "toxicity_mean", "second_toxicity_mean", "improvement", "second_improvement",
                         "rouge_l", "length_mean", "faithfulness_mean"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curve") / "whole"
    code, stdout, stderr = finish(start(out), WAIT_S)
    assert code in (0, 1), stderr[-2000:]  # a short run's verdict; 2 or 130 would be a failure
    return out


def test_a_run_killed_between_two_curve_points_resumes_the_same_curve(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start(out)
    deadline = time.time() + WAIT_S
    while len(rows(out / "curve.jsonl")) < 4:  # the points of steps 0-3: the run is past its step-2 checkpoint
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no curve point of step 3 (exit {proc.returncode}): {proc.communicate()[1][-1500:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [r["step"] for r in rows(out / "curve.jsonl")][:4] == [0, 1, 2, 3]
    assert not (out / "results.json").exists()

    code, stdout, stderr = finish(start(out, "--resume"), WAIT_S)
    assert code in (0, 1), stderr[-2000:]
    assert "resumed from" in stdout and "(step 2)" in stdout  # point 3 was past the checkpoint: made again
    whole, resumed = rows(uninterrupted / "curve.jsonl"), rows(out / "curve.jsonl")
    assert [r["step"] for r in resumed] == list(range(STEPS + 1))  # each point once, none missing
    assert all(same_point(a, b) for a, b in zip(whole, resumed)), [(a["kl"], b["kl"]) for a, b in zip(whole, resumed)]
    a, b = (json.loads((d / "results.json").read_text())["metrics"]["curve"] for d in (uninterrupted, out))
    assert a["selected"]["step"] == b["selected"]["step"] and a["peak_step"] == b["peak_step"]
    assert json.loads((out / "selected" / "selection.json").read_text())["step"] == b["selected"]["step"]


def test_the_curve_leaves_training_and_the_final_evaluation_as_they_were(uninterrupted, tmp_path):
    out = tmp_path / "no-curve"
    code, _, stderr = finish(start(out, "eval.curve_every=0"), WAIT_S)
    assert code in (0, 1), stderr[-2000:]
    assert not (out / "curve.jsonl").exists() and not (out / "selected").exists()
    kl = [r["objective/kl"] for r in rows(out / "train_stats.jsonl")]
    assert kl == [r["objective/kl"] for r in rows(uninterrupted / "train_stats.jsonl")]
    with_curve, without = (json.loads((d / "results.json").read_text())["metrics"] for d in (uninterrupted, out))
    assert with_curve["after"]["toxicity_mean"] == without["after"]["toxicity_mean"]
    assert "curve" not in without
    # the last curve point is the final policy: its figures are the final evaluation's on the same prompts
    last = rows(uninterrupted / "curve.jsonl")[-1]
    assert abs(last["kl"] - with_curve["after"]["kl_per_sequence_mean"]) <= CLOSE * max(1.0, last["kl"])


def test_the_curve_command_remakes_a_finished_runs_curve_from_its_checkpoints(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "old-run"
    shutil.copytree(uninterrupted, run)
    during = {r["step"]: r for r in rows(run / "curve.jsonl")}
    (run / "curve.jsonl").unlink()  # as a run made before the curve existed: no file, no selected/, no figures
    shutil.rmtree(run / "selected")
    results = json.loads((run / "results.json").read_text())
    del results["metrics"]["curve"], results["files"]["curve"]
    (run / "results.json").write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "curve", str(run), "eval.curve_every=2"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = rows(run / "curve.jsonl")
    assert [r["step"] for r in after] == [0, 2, 4, 6]  # the checkpoints' steps
    assert all(same_point(during[r["step"]], r) for r in after)
    assert "selected" in proc.stdout and (run / "index.html").is_file()
    page = (run / "index.html").read_text()
    assert 'id="curve"' in page and "detox-harness curve" in page  # said to be made after the run
    assert "curve" not in json.loads((run / "results.json").read_text())["metrics"]  # the verdict's file untouched
    assert json.loads((run / "selected" / "selection.json").read_text())["step"] in (2, 4, 6)
    # settings that would change what the checkpoints are judged by are refused, naming them
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "curve", str(run), "reward.model=tiny://judge"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert bad.returncode == 2 and "reward.model" in bad.stderr
