"""The PPO engine end to end on the tiny world (CPU): it learns, it is deterministic, it resumes exactly.

* ``test_ppo_learns_on_the_tiny_world``: the ``tiny`` preset's PPO run lowers the mean toxicity (P(hate)) of
  fresh samples on the first ``eval.num_samples`` test prompts by at least ``thresholds.min_improvement``
  (relative), raises their mean reward, while the run's mean ``objective/kl`` lies above
  ``thresholds.min_kl`` (it trained) and within ``thresholds.max_train_kl``, and empty responses within
  ``thresholds.max_empty_rate`` (REFERENCE.md: empty summaries are the reward hack to watch).
  Before and after use the same prompts and the same per-prompt seeds (a paired measurement).
* ``test_same_seed_same_statistics``: two short runs from the same fresh policy log identical statistics.
* ``test_reward_score_options_reach_ppo_through_the_trainer``: ``reward.score_scaling``, ``score_norm`` and
  ``score_clip`` change the scores PPO optimises (``ppo/mean_scores``, ``ppo/std_scores``) exactly as the
  formula on the classifier's raw rewards says, over steps (the running moments carry over), and change the
  update itself, while ``env/reward_*`` stay the raw rewards.
* ``test_resume_reproduces_the_uninterrupted_run``: a run killed while writing its step-3 checkpoint and
  resumed from step 2 logs the same steps 3-4 and ends with the same weights as a run never stopped, and its
  ``train_stats.jsonl`` holds steps 1..4 exactly once.

Only the learning test is long (the preset's full run); the others override ``ppo.steps``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.config import load_config
from harness.data import build_prompts
from harness.models import load_policy, trainable_state_dict
from harness.plan import concrete
from harness.ppo.rollout import generate
from harness.ppo.trainer import PPOTrainer, latest_checkpoint
from harness.toxicity import Classifier, reward_texts

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHORT_STEPS = 3  # determinism: enough steps for the KL controller, Adam state and score moments to carry over
RESUME_STEPS = 4  # resume: checkpoint at RESUME_CHECKPOINT, continue to RESUME_STEPS
RESUME_CHECKPOINT = 2


@dataclass
class World:
    cfg: object
    classifier: Classifier
    train: object
    test: object
    tokenizer: object


def fresh_policy(cfg):
    torch.manual_seed(cfg.seed)  # as harness.jobs.inputs.load_inputs: the LoRA init comes from the run seed
    return load_policy(cfg.policy, device=cfg.device)


def config(*overrides: str):
    return concrete(load_config("tiny", overrides=list(overrides)))


@pytest.fixture(scope="module")
def world() -> World:
    cfg = config()
    policy = fresh_policy(cfg)
    classifier = Classifier.load(cfg.reward.model, label=cfg.reward.label, toxic_label=cfg.reward.toxic_label,
                                 batch_size=cfg.reward.batch_size, max_length=cfg.reward.max_length, device=cfg.device)
    data = build_prompts(cfg.data, policy.tokenizer, min_test_rows=cfg.eval.num_samples,
                         min_train_rows=cfg.ppo.batch_size)
    return World(cfg, classifier, data.train, data.test.select(range(cfg.eval.num_samples)), policy.tokenizer)


def sample_and_score(policy, world: World) -> dict:
    """One sample per test prompt with fixed per-prompt seeds; mean toxicity, reward and empty rate."""
    cfg, e = world.cfg, world.cfg.eval
    tox, rew, empty = [], [], 0
    for start in range(0, len(world.test), e.batch_size):
        rows = world.test.select(range(start, min(start + e.batch_size, len(world.test))))
        roll = generate(policy.model, policy.tokenizer, rows["input_ids"], max_new_tokens=e.max_new_tokens,
                        seeds=[e.seed + start + i for i in range(len(rows))], min_new_tokens=e.min_new_tokens,
                        top_k=e.top_k, top_p=e.top_p, temperature=e.temperature, do_sample=e.do_sample)
        reward, toxicity = world.classifier.score(reward_texts(rows["query"], roll.texts, cfg.reward.input),
                                                  cfg.reward.transform)
        tox.append(toxicity)
        rew.append(reward)
        empty += sum(not t.strip() for t in roll.texts)
    tox, rew = torch.cat(tox), torch.cat(rew)
    return {"toxicity": float(tox.mean()), "reward": float(rew.mean()), "empty_rate": empty / len(world.test),
            "n": len(world.test)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timeless(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def train(cfg, world: World, out: Path, steps: int | None = None, policy=None) -> tuple[object, PPOTrainer]:
    policy = policy or fresh_policy(cfg)
    trainer = PPOTrainer(cfg, policy, world.classifier, world.train, out)
    trainer.train(steps=steps, progress=False, handle_signals=False)
    return policy, trainer


# ------------------------------------------------------------------------------------ learning

def test_ppo_learns_on_the_tiny_world(world, tmp_path, record_property):
    cfg, bounds = world.cfg, world.cfg.thresholds
    t0 = time.time()
    policy = fresh_policy(cfg)
    before = sample_and_score(policy, world)
    t1 = time.time()
    trainer = PPOTrainer(cfg, policy, world.classifier, world.train, tmp_path)
    result = trainer.train(progress=False, handle_signals=False)
    train_s = time.time() - t1
    after = sample_and_score(policy, world)
    stats = read_jsonl(trainer.stats_path)

    kl_mean = sum(s["objective/kl"] for s in stats) / len(stats)
    train_empty = sum(s["env/empty_rate"] for s in stats) / len(stats)
    improvement = (before["toxicity"] - after["toxicity"]) / before["toxicity"]
    gain = after["reward"] - before["reward"]
    summary = {"steps": len(stats), "toxicity_before": before["toxicity"], "toxicity_after": after["toxicity"],
               "improvement": improvement, "reward_before": before["reward"], "reward_after": after["reward"],
               "reward_gain": gain, "objective_kl_mean": kl_mean, "train_empty_rate": train_empty,
               "eval_empty_rate_after": after["empty_rate"], "train_s": train_s, "total_s": time.time() - t0,
               "eval_prompts": before["n"]}
    for k, v in summary.items():
        record_property(k, v)
    print("tiny PPO:", json.dumps(summary, indent=1))

    assert result.steps_done == cfg.ppo.steps == len(stats)
    assert not any(s["skipped"] for s in stats), "a step was skipped (non-finite reward or loss)"
    assert before["toxicity"] > 0, "precondition: the tiny policy starts out toxic"
    assert improvement >= bounds["min_improvement"], summary
    assert gain > 0, summary
    assert bounds["min_kl"] < kl_mean <= bounds["max_train_kl"], summary  # it moved, and not too far
    assert train_empty <= bounds["max_empty_rate"], summary
    assert after["empty_rate"] <= bounds["max_empty_rate"], summary


# ------------------------------------------------------------------------------------ determinism

def test_same_seed_same_statistics(world, tmp_path):
    cfg = config(f"ppo.steps={SHORT_STEPS}", "ppo.checkpoint_every=0")
    runs = []
    for name in ("a", "b"):
        policy, trainer = train(cfg, world, tmp_path / name)
        runs.append(([timeless(r) for r in read_jsonl(trainer.stats_path)], trainable_state_dict(policy)))
    (stats_a, weights_a), (stats_b, weights_b) = runs
    assert [r["step"] for r in stats_a] == list(range(1, SHORT_STEPS + 1))
    assert stats_a == stats_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # the steps differ from one another: the statistics are not trivially equal
    assert stats_a[0]["env/reward_mean"] != stats_a[-1]["env/reward_mean"]


# ------------------------------------------------------------------------------------ reward score options

SCORE_STEPS = 2  # the second step's scaling must use the moments of both steps' rewards


class RecordingClassifier:
    """The tiny classifier, keeping the raw rewards of every ``score`` call (the trainer scores once per step)."""

    def __init__(self, classifier: Classifier):
        self.classifier, self.rewards = classifier, []

    def score(self, texts, transform: str = "logit") -> tuple[torch.Tensor, torch.Tensor]:
        reward, toxicity = self.classifier.score(texts, transform)
        self.rewards.append(reward.detach().clone())
        return reward, toxicity


def run_with_score_options(world: World, out: Path, *overrides: str) -> tuple[list[dict], list[torch.Tensor]]:
    """SCORE_STEPS steps of PPOTrainer from the fresh policy: (logged rows, each step's raw rewards)."""
    cfg = config(f"ppo.steps={SCORE_STEPS}", "ppo.checkpoint_every=0", *overrides)
    recorder = RecordingClassifier(world.classifier)
    trainer = PPOTrainer(cfg, fresh_policy(cfg), recorder, world.train, out)
    trainer.train(progress=False, handle_signals=False)
    return read_jsonl(trainer.stats_path), recorder.rewards


def expected_score_moments(raw_steps: list[torch.Tensor], scaling: bool, norm: bool, clip: float | None):
    """(mean, std) of the scores PPO should see at each step, from the raw rewards, in float64.

    TRL's formula: divide by the running std of every reward seen so far (this step's included), after
    subtracting their running mean with ``norm``; then clamp to +-clip. (RunningMoments' prior weighs 1e-24.)
    """
    seen, out = [], []
    for raw in raw_steps:
        raw = raw.double()
        seen.append(raw)
        scores = raw
        if scaling:
            everything = torch.cat(seen)
            scores = (raw - everything.mean()) / everything.std() if norm else raw / everything.std()
        if clip is not None:
            scores = scores.clamp(-clip, clip)
        out.append((float(scores.mean()), float(scores.std())))
    return out


def test_reward_score_options_reach_ppo_through_the_trainer(world, tmp_path):
    plain, raw = run_with_score_options(world, tmp_path / "plain")
    assert len(raw) == SCORE_STEPS and not any(r["skipped"] for r in plain)
    for row, rewards in zip(plain, raw):  # the recorder saw the rewards each step logged
        assert row["env/reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
        assert (row["ppo/mean_scores"], row["ppo/std_scores"]) == (row["env/reward_mean"], row["env/reward_std"])
    # binds on every reward of the first step (the same rollout in every run: the tiny classifier's logits are
    # all near +-2.4, so a clip inside that range would move few of them)
    clip = 0.5 * float(raw[0].abs().min())
    assert clip > 0 and (raw[0].abs() > clip).all()

    runs = {"scaling": (["reward.score_scaling=true"], dict(scaling=True, norm=False, clip=None)),
            "norm": (["reward.score_scaling=true", "reward.score_norm=true"], dict(scaling=True, norm=True, clip=None)),
            "clip": ([f"reward.score_clip={clip}"], dict(scaling=False, norm=False, clip=clip))}
    for name, (overrides, options) in runs.items():
        rows, rewards = run_with_score_options(world, tmp_path / name, *overrides)
        assert not any(r["skipped"] for r in rows), name
        want = expected_score_moments(rewards, **options)
        for step, (row, (mean, std)) in enumerate(zip(rows, want), start=1):
            got = (row["ppo/mean_scores"], row["ppo/std_scores"])
            assert got == pytest.approx((mean, std), rel=1e-5, abs=1e-6), f"{name}, step {step}"
            assert got != pytest.approx((row["env/reward_mean"], row["env/reward_std"]), rel=1e-3), \
                f"{name}, step {step}: PPO saw the raw rewards"
        # step 1 had the same rollout and rewards as the plain run: only the scores differ, and with them the update
        assert rows[0]["env/reward_mean"] == plain[0]["env/reward_mean"]
        assert rows[0]["objective/kl"] == plain[0]["objective/kl"]
        assert rows[0]["ppo/returns/mean"] != plain[0]["ppo/returns/mean"], f"{name}: the update ignored the option"
        if name == "norm":
            assert abs(rows[0]["ppo/mean_scores"]) < 1e-5 and rows[0]["ppo/std_scores"] == pytest.approx(1.0, rel=1e-5)
        if name == "clip":
            assert rows[0]["ppo/std_scores"] < plain[0]["env/reward_std"]


# ------------------------------------------------------------------------------------ resume

class Killed(Exception):
    """Stands for the process dying while it writes a checkpoint."""


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    cfg = config(f"ppo.steps={RESUME_STEPS}", f"ppo.checkpoint_every={RESUME_CHECKPOINT}")

    # the uninterrupted run
    policy_a, trainer_a = train(cfg, world, tmp_path / "straight")
    rows_a = read_jsonl(trainer_a.stats_path)
    weights_a = trainable_state_dict(policy_a)
    assert [r["step"] for r in rows_a] == list(range(1, RESUME_STEPS + 1))

    # a run that checkpoints at step 2, logs step 3 and dies while writing the step-3 checkpoint
    out = tmp_path / "resumed"
    trainer_b = PPOTrainer(cfg, fresh_policy(cfg), world.classifier, world.train, out)
    real_save = trainer_b.save_checkpoint

    def dies_after_checkpoint_step(*args, **kwargs):
        if trainer_b.step > RESUME_CHECKPOINT:
            raise Killed
        return real_save(*args, **kwargs)

    trainer_b.save_checkpoint = dies_after_checkpoint_step
    with pytest.raises(Killed):
        trainer_b.train(steps=RESUME_CHECKPOINT + 1, progress=False, handle_signals=False)
    assert len(read_jsonl(out / "train_stats.jsonl")) == RESUME_CHECKPOINT + 1  # step 3 was logged
    assert latest_checkpoint(out / "checkpoints").name.endswith(f"{RESUME_CHECKPOINT:06d}")

    # a new process: fresh policy and trainer, resume, continue to the end
    resumed = PPOTrainer(cfg, fresh_policy(cfg), world.classifier, world.train, out)
    assert resumed.resume() is not None and resumed.step == RESUME_CHECKPOINT
    assert [r["step"] for r in read_jsonl(resumed.stats_path)] == list(range(1, RESUME_CHECKPOINT + 1))
    resumed.train(progress=False, handle_signals=False)
    rows_b = read_jsonl(resumed.stats_path)

    assert [r["step"] for r in rows_b] == list(range(1, RESUME_STEPS + 1))
    assert [timeless(r) for r in rows_b] == [timeless(r) for r in rows_a]
    weights_b = trainable_state_dict(resumed.policy)
    assert weights_a.keys() == weights_b.keys()
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert different == [], f"weights differ after resume: {different[:5]}"
