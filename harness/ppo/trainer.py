"""The PPO loop: rollout -> score -> PPO step -> statistics -> checkpoints.

Deterministic by construction: the prompts of step ``s`` come from a permutation seeded by
``(seed, epoch)``, the rollout of row ``i`` at step ``s`` samples with seed ``f(seed, s, i)``, and the
mini-batch orders come from a generator seeded by ``(seed, s)``. A run resumed from a checkpoint
therefore draws exactly what the uninterrupted run drew.

Checkpoints (``<output>/checkpoints/step-NNNNNN/``, :mod:`harness.ppo.checkpoints`) hold the weights, the
PPO state, the RNG states and the step; a half-written one is never picked up.

Data-parallel (a :class:`harness.parallel.Parallel` of several processes, docs/scale.md): each process
generates and scores its contiguous share of the step's rows, with the rows' global seeds, and
:func:`ppo_step` makes the update the whole batch's; every process holds the same weights and state after
each step. Only the main process writes statistics and checkpoints; a checkpoint holds nothing that depends on
the number of processes, so a run may resume with another one.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import HarnessConfig
from ..errors import HarnessError, TrainingError
from ..parallel import SINGLE, Parallel
from ..results import CHECKPOINTS_DIR, TRAIN_STATS_FILE, append_jsonl, read_jsonl, write_jsonl
from ..toxicity import Classifier, reward_texts
from . import checkpoints
from .batch import Record
from .checkpoints import is_complete_checkpoint, latest_checkpoint
from .core import SampledDistribution
from .rollout import LengthSampler, generate
from .step import PPOState, ScoreOptions, ppo_step, random_orders

__all__ = ["PPOTrainer", "TrainResult", "step_seed"]
log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, row: int = 0) -> int:
    """A stable 63-bit seed for (run seed, step, row)."""
    return (seed * 1_000_003 + step * 10_007 + row * 101 + 12345) % (2 ** 63 - 1)


@dataclass
class TrainResult:
    stats: list[dict] = field(default_factory=list)
    steps_done: int = 0
    interrupted: bool = False
    checkpoint: str | None = None


class PPOTrainer:
    """Trains ``policy`` against ``classifier`` on the prompts of ``train_data`` (a datasets.Dataset)."""

    def __init__(self, cfg: HarnessConfig, policy, classifier: Classifier, train_data, output_dir: str | Path,
                 parallel: Parallel = SINGLE):
        self.cfg = cfg
        self.parallel = parallel
        self.policy = policy
        self.classifier = classifier
        self.data = train_data
        self.output_dir = Path(output_dir)
        if parallel.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.output_dir / CHECKPOINTS_DIR
        self.stats_path = self.output_dir / TRAIN_STATS_FILE
        # the settings every step reads (the distribution it reads included: the rollout's, or TRL's raw
        # softmax), and the optimizer, KL controller, score moments and TRL quirks carried from step to step
        self.ppo_state = PPOState.create(
            policy, cfg.ppo, rollout=SampledDistribution.of(cfg.rollout, policy.tokenizer.eos_token_id),
            score_options=ScoreOptions.from_reward_config(cfg.reward), parallel=parallel)
        self.step = 0
        self.bad_steps = 0
        self._stop_signal: int | None = None
        if len(train_data) < cfg.ppo.batch_size:
            raise HarnessError(f"the train split has {len(train_data)} prompts, fewer than one batch",
                               field="ppo.batch_size", value=cfg.ppo.batch_size,
                               fix=f"set ppo.batch_size <= {len(train_data)} or give more data")
        # every process forwards the same number of rows of the batch and of each mini-batch
        parallel.check_divides(cfg.ppo.batch_size, "ppo.batch_size")
        parallel.check_divides(cfg.ppo.mini_batch_size, "ppo.mini_batch_size")

    # -------------------------------------------------------------------------------- data
    def batch_indices(self, step: int) -> list[int]:
        n, bs = len(self.data), self.cfg.ppo.batch_size
        per_epoch = n // bs
        epoch, pos = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(step_seed(self.cfg.seed, epoch, 7)).shuffle(order)
        return order[pos * bs:(pos + 1) * bs]

    # -------------------------------------------------------------------------------- one step
    def score(self, queries: list[str], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = reward_texts(queries, texts, self.cfg.reward.input)
        return self.classifier.score(inputs, self.cfg.reward.transform)

    def _record(self) -> Record | None:
        """What the rollout records for the PPO step (the policy's log-probs and values under the distribution
        the step reads, so the step skips its own policy forward), or None where the step needs the full
        logits (kl_penalty "full")."""
        if self.cfg.ppo.kl_penalty == "full":
            return None
        return Record(self.policy.value_head, self.ppo_state.settings.distribution)

    def train_step(self) -> dict:
        cfg, tok = self.cfg, self.policy.tokenizer
        t0 = time.time()
        idx = self.batch_indices(self.step)
        sampling = cfg.rollout
        lengths = LengthSampler(sampling.length_min, sampling.length_max,
                                seed=step_seed(cfg.seed, self.step, 3)).sample(len(idx))
        mine = self.parallel.shard(len(idx))  # this process's rows; each keeps its global index for its seeds
        rows = self.data.select([idx[i] for i in mine])
        t = time.time()
        roll = generate(self.policy.model, tok, rows["input_ids"], max_new_tokens=[lengths[i] for i in mine],
                        seeds=[step_seed(cfg.seed, self.step, i) for i in mine], record=self._record(),
                        **sampling.sampling_kwargs())
        t_gen = time.time() - t
        t = time.time()
        rewards, toxicity = self.score(rows["query"], roll.texts)
        t_score = time.time() - t
        orders = random_orders(len(idx), torch.Generator().manual_seed(step_seed(cfg.seed, self.step, 5)))
        stats = ppo_step(self.policy, self.ppo_state, [torch.tensor(x) for x in rows["input_ids"]], roll.responses,
                         rewards, orders=orders, recorded=roll.recorded)
        toxicity = self.parallel.gather(toxicity.reshape(-1).float())
        empty = self.parallel.gather(torch.tensor([float(not s.strip()) for s in roll.texts]))
        stats["env/toxicity_mean"] = float(toxicity.mean())
        stats["env/empty_rate"] = float(empty.sum() / len(empty))
        stats["time/rollout/generate"] = t_gen
        stats["time/rollout/score"] = t_score
        stats["time/step"] = time.time() - t0
        self.step += 1
        stats["step"] = self.step
        return stats

    # -------------------------------------------------------------------------------- loop
    def train(self, steps: int | None = None, progress: bool = True, handle_signals: bool = True,
              after_step=None) -> TrainResult:
        """Train up to ``steps`` (``ppo.steps``); ``after_step(step, total)``, when given, is called after each
        finished step, before its checkpoint (the run's over-optimisation curve, harness/curve.py)."""
        total = steps or self.cfg.ppo.steps
        result = TrainResult()
        every = self.cfg.ppo.checkpoint_every
        old_handlers = self._install_signal_handlers() if handle_signals else {}
        bar = _progress(total, self.step, progress)
        try:
            while self.step < total:
                if self._stopping():  # a signal came while the last checkpoint was written
                    result.interrupted = True
                    result.checkpoint = str(self._checkpoint_of_this_step())
                    break
                stats = self.train_step()
                self._log(stats)
                result.stats.append(stats)
                if stats.get("skipped"):
                    self.bad_steps += 1
                    log.warning("step %d skipped: %s (%d in a row)", self.step, stats.get("skip_reason"),
                                self.bad_steps)
                    if self.bad_steps >= self.cfg.ppo.max_bad_steps:
                        path = self.save_checkpoint()
                        raise TrainingError(
                            f"{self.bad_steps} consecutive steps had a non-finite reward or loss "
                            f"(last: {stats.get('skip_reason')}); weights are those of the last good step, "
                            f"saved in {path}", field="ppo.max_bad_steps",
                            fix="check the reward model's outputs and lower ppo.learning_rate")
                else:
                    self.bad_steps = 0
                if after_step is not None:
                    after_step(self.step, total)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{stats.get('env/reward_mean', float('nan')):.3f}",
                                    kl=f"{stats.get('objective/kl', float('nan')):.2f}",
                                    step_s=f"{stats['time/step']:.2f}")
                if self._stopping():
                    result.interrupted = True
                    result.checkpoint = str(self.save_checkpoint())
                    log.warning("stopped by signal %d after step %d; checkpoint %s", self._stop_signal, self.step,
                                result.checkpoint)
                    break
                if every and self.step % every == 0 and self.step < total:
                    result.checkpoint = str(self.save_checkpoint())
            else:
                result.checkpoint = str(self.save_checkpoint())
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        result.steps_done = self.step
        return result

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("signal %d: finishing the current step, then saving a checkpoint", signum)

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    def _stopping(self) -> bool:
        """Whether a stop signal came, to this process or (data-parallel) to any: all processes stop together."""
        stop = self.parallel.any(self._stop_signal is not None)
        if stop and self._stop_signal is None:  # another process got it
            self._stop_signal = int(signal.SIGTERM)
        return stop

    def _checkpoint_of_this_step(self) -> Path:
        final = checkpoints.checkpoint_dir(self.ckpt_dir, self.step)
        return final if is_complete_checkpoint(final) else self.save_checkpoint()

    def _log(self, stats: dict) -> None:
        if self.parallel.is_main:
            append_jsonl(self.stats_path, stats)

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step atomically (:func:`harness.ppo.checkpoints.save`).

        Data-parallel: the main process writes it (every process holds the same state) while the others wait.
        """
        final = checkpoints.checkpoint_dir(self.ckpt_dir, self.step)
        if self.parallel.is_main:
            checkpoints.save(final, self.policy, self.ppo_state,
                             {"step": self.step, "bad_steps": self.bad_steps, "seed": self.cfg.seed,
                              "config": self.cfg.to_dict()})
        self.parallel.wait()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint (a corrupt file in it: :class:`harness.ppo.checkpoints.CorruptCheckpoint`, exit 2)."""
        state = checkpoints.load(Path(path), self.policy, self.ppo_state)
        self.step = int(state["step"])
        self.bad_steps = int(state["bad_steps"])
        self._truncate_stats(self.step)

    def _truncate_stats(self, step: int) -> None:
        """Drop logged rows after the checkpoint's step (they will be produced again).

        A row cut short by a crash (SIGKILL while appending) is not valid JSON: it is dropped too.
        """
        if self.parallel.is_main and self.stats_path.exists():
            rows = read_jsonl(self.stats_path, skip_bad_lines=True)
            write_jsonl(self.stats_path, [r for r in rows if r.get("step", 0) <= step])

    def resume(self) -> Path | None:
        """Load the last complete checkpoint under the output directory, if any.

        Half-written checkpoints (temporary ``.step-*`` directories left by a crash) are removed. Without
        any checkpoint the run starts from step 0, so the rows a crashed run logged are dropped.
        Data-parallel: the main process tidies the directory, then every process loads the same checkpoint.
        """
        if self.parallel.is_main:
            checkpoints.tidy(self.ckpt_dir)
        self.parallel.wait()
        last = latest_checkpoint(self.ckpt_dir)
        if last is not None:
            self.load_checkpoint(last)
        else:
            self._truncate_stats(0)
        return last


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="PPO", unit="step", dynamic_ncols=True)
