"""Fault injection on the tiny world (issue 7): faults lose nothing, and what is lost is never half-written.

* a reward function that returns NaN at step k: step k is skipped, logged with its reason, and leaves every
  trainable weight exactly as step k-1 left it; training goes on afterwards;
* ``ppo.max_bad_steps`` consecutive NaN steps stop the run with a ``TrainingError`` naming the setting, after
  saving a checkpoint of the last good weights;
* a ``detox-harness run`` subprocess killed with SIGKILL in the middle of training: ``--resume`` continues from
  the last complete checkpoint and finishes with every step logged exactly once and a full results file;
* SIGTERM (and SIGINT) finish the current step, write a loadable checkpoint and exit with 130.

The unit half is ``suites/unit/test_step_faults.py`` (one PPO step with NaN logits, values, gradients) and
``suites/unit/test_checkpoints.py`` (checkpoint files).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_cli import finish

from harness.config import load_config
from harness.data import build_prompts
from harness.errors import TrainingError
from harness.models import load_policy
from harness.plan import concrete
from harness.ppo.checkpoints import is_complete_checkpoint, latest_checkpoint
from harness.ppo.trainer import PPOTrainer
from harness.toxicity import Classifier
from suites.weights import trainable_state_dict

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

NAN_STEP = 2  # 0-based index of the step whose rewards are NaN (the third step)
CLI_STEPS = 6  # a subprocess run long enough to be killed in the middle of training
CLI_CHECKPOINT_EVERY = 2
CLI_SETTINGS = [f"ppo.steps={CLI_STEPS}", f"ppo.checkpoint_every={CLI_CHECKPOINT_EVERY}", "eval.num_samples=16",
                "--no-progress", "--no-report"]
WAIT_S = 300  # a subprocess that has not reached the awaited step by then has hung


def config(*overrides: str):
    return concrete(load_config("tiny", overrides=list(overrides)))


@pytest.fixture(scope="module")
def world():
    cfg = config()
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.policy, device=cfg.device)
    classifier = Classifier.load(cfg.reward.model, label=cfg.reward.label, toxic_label=cfg.reward.toxic_label,
                                 batch_size=cfg.reward.batch_size, device=cfg.device)
    data = build_prompts(cfg.data, policy.tokenizer, min_train_rows=cfg.ppo.batch_size)
    return classifier, data.train


class PlantedRewards:
    """The tiny classifier with some rewards replaced: ``plant(step, rewards)`` returns the rewards PPO gets.

    The trainer scores once per step, so the n-th ``score`` call (from 0) is step n of a run that starts at 0.
    """

    def __init__(self, classifier: Classifier, plant):
        self.classifier, self.plant, self.calls = classifier, plant, 0

    def score(self, texts, transform: str = "logit") -> tuple[torch.Tensor, torch.Tensor]:
        reward, toxicity = self.classifier.score(texts, transform)
        reward = torch.as_tensor(self.plant(self.calls, reward), dtype=torch.float32)
        self.calls += 1
        return reward, toxicity


def trainer_for(cfg, world, out: Path, plant=None) -> PPOTrainer:
    """A trainer on the tiny world from a fresh policy; ``plant``: see :class:`PlantedRewards`."""
    classifier, train = world
    torch.manual_seed(cfg.seed)
    if plant is not None:
        classifier = PlantedRewards(classifier, plant)
    return PPOTrainer(cfg, load_policy(cfg.policy, device=cfg.device), classifier, train, out)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ NaN rewards

def test_a_nan_reward_at_step_k_leaves_the_weights_of_step_k_minus_1(world, tmp_path):
    cfg = config("ppo.steps=4", "ppo.checkpoint_every=0")

    def nan_at_step_k(step, reward):
        return torch.full_like(reward, float("nan")) if step == NAN_STEP else reward

    trainer = trainer_for(cfg, world, tmp_path, nan_at_step_k)
    trainer.train(steps=NAN_STEP, progress=False, handle_signals=False)
    before = trainable_state_dict(trainer.policy)
    trainer.train(steps=NAN_STEP + 1, progress=False, handle_signals=False)
    after = trainable_state_dict(trainer.policy)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"a NaN-reward step changed {changed[:5]}"

    rows = read_jsonl(trainer.stats_path)
    assert rows[NAN_STEP]["skipped"] == 1 and "non-finite" in rows[NAN_STEP]["skip_reason"]
    assert all(not r.get("skipped") for r in rows[:NAN_STEP])
    # the run goes on: the next step is a real update again
    trainer.train(steps=NAN_STEP + 2, progress=False, handle_signals=False)
    assert trainer.bad_steps == 0
    assert not read_jsonl(trainer.stats_path)[-1].get("skipped")
    assert any(not torch.equal(after[k], v) for k, v in trainable_state_dict(trainer.policy).items())


def test_consecutive_bad_steps_stop_the_run_with_a_checkpoint_of_the_last_good_weights(world, tmp_path):
    max_bad = 2
    cfg = config("ppo.steps=6", "ppo.checkpoint_every=0", f"ppo.max_bad_steps={max_bad}")

    def nan_from_step_1(step, reward):
        return torch.full_like(reward, float("nan")) if step >= 1 else reward

    trainer = trainer_for(cfg, world, tmp_path, nan_from_step_1)
    with pytest.raises(TrainingError) as info:
        trainer.train(progress=False, handle_signals=False)
    message = str(info.value)
    assert message.startswith("ppo.max_bad_steps: ") and "\n" not in message
    last_good = trainable_state_dict(trainer.policy)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and str(ckpt) in message
    assert ckpt.name == f"step-{1 + max_bad:06d}"

    # the checkpoint loads into a fresh trainer and holds the weights of the last good step
    fresh = trainer_for(cfg, world, tmp_path)
    assert fresh.resume() == ckpt
    loaded = trainable_state_dict(fresh.policy)
    assert all(torch.equal(loaded[k], last_good[k]) for k in last_good)
    assert [bool(r.get("skipped")) for r in read_jsonl(tmp_path / "train_stats.jsonl")] == [False] + [True] * max_bad


# ------------------------------------------------------------------------------------ processes

def start_run(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--preset", "tiny", "--output", str(out),
                             *CLI_SETTINGS, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, stats: Path, steps: int) -> None:
    """Wait until ``stats`` holds ``steps`` rows (the process is then inside the training loop)."""
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before step {steps}:\n{out[-1500:]}\n{err[-1500:]}")
        if stats.exists() and len([x for x in stats.read_text().splitlines() if x.strip()]) >= steps:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {steps} within {WAIT_S}s")


def test_sigkill_mid_run_then_resume_finishes_every_step_once(tmp_path):
    out = tmp_path / "run"
    proc = start_run(out)
    # past the first checkpoint (step 2) and into step 4: some work after the checkpoint is lost
    wait_for_steps(proc, out / "train_stats.jsonl", CLI_CHECKPOINT_EVERY + 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) >= CLI_CHECKPOINT_EVERY

    code, stdout, stderr = finish(start_run(out, "--resume"), WAIT_S)
    assert code in (0, 1), stderr  # 0 or 1: the verdict of a short run; 2 or 130 would be a failure to resume
    assert f"resumed from {last}" in stdout
    assert "before: reused the saved evaluation" in stdout
    rows = read_jsonl(out / "train_stats.jsonl")
    assert [r["step"] for r in rows] == list(range(1, CLI_STEPS + 1))
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["training"]["steps"] == CLI_STEPS
    assert is_complete_checkpoint(out / "checkpoints" / f"step-{CLI_STEPS:06d}")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_finishes_the_step_and_writes_a_loadable_checkpoint(tmp_path, world, sig):
    out = tmp_path / "run"
    proc = start_run(out)
    wait_for_steps(proc, out / "train_stats.jsonl", 1)
    proc.send_signal(sig)
    code, stdout, stderr = finish(proc, WAIT_S)
    assert code == 130, stderr
    rows = read_jsonl(out / "train_stats.jsonl")
    assert 1 <= len(rows) < CLI_STEPS
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{len(rows):06d}"  # the step in flight was finished and saved
    assert f"--output {out} --resume" in stdout
    assert not (out / "results.json").exists()

    # the checkpoint loads: a new trainer resumes at its step with its weights
    cfg = concrete(load_config("tiny", overrides=[f"ppo.steps={CLI_STEPS}"]))
    trainer = trainer_for(cfg, world, out)
    assert trainer.resume() == ckpt and trainer.step == len(rows)
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved and all(math.isfinite(float(v.abs().sum())) for v in saved.values())
    state = trainable_state_dict(trainer.policy)
    adapter = {k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")}
    assert all(torch.equal(adapter[k], saved[k]) for k in saved)
