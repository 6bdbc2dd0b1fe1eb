"""Synthetic run folders for tests, docs and trying the report out: no model is loaded.

:func:`write_demo_run` draws, from a seeded RNG, what a real run would have measured: one evaluation row per
prompt for the model before and after PPO (``query, references, response, toxicity, reward, length, kl,
second_toxicity, faithfulness``, as :func:`harness.evaluation.evaluate_policy` returns them) and one
``train_stats.jsonl`` row per PPO step (the keys and types of :func:`harness.ppo.step.ppo_step` and
:meth:`harness.ppo.trainer.PPOTrainer.train_step`: ``skipped`` is the float ``0.0`` or ``1.0``, a skipped
step carries ``skip_reason`` and only the few statistics the trainer records for it). Everything else is
the harness's own code: ``metrics.before`` / ``after`` from :func:`harness.metrics.phase_metrics`,
``metrics.training`` from :func:`harness.metrics.training_summary`, ``results.json`` and ``samples.jsonl``
from :func:`harness.results.build_results` and :func:`harness.results.write_run_files` (so they pass the
schema), the verdict from :func:`harness.thresholds.verdict` with the preset's bounds. The files are
therefore self-consistent and shaped exactly like a real run's.

    python -c "from harness.report.demo import write_demo_run; write_demo_run('reports/demo')"
    python -c "from harness.report import render_run; print(render_run('reports/demo'))"
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import HarnessConfig, load_config
from ..metrics import EvalOutput, curve_summary, phase_metrics, sample_seed, training_summary
from ..results import CONFIG_FILE, CURVE_FILE, TRAIN_STATS_FILE, build_results, write_jsonl, write_run_files
from ..thresholds import all_passed, curve_quality_failures, verdict

DEFAULT_CREATED = "2026-11-25T07:15:00+00:00"

#: wall times written into ``timings`` (seconds): the before and after evaluations and the PPO loop
EVAL_BEFORE_S, TRAIN_S, EVAL_AFTER_S = 12.5, 151.25, 13.0

#: the statistics :func:`harness.ppo.step.ppo_step` returns for a step that updated the policy, in its order
PPO_STEP_KEYS = (
    "time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages", "time/ppo/optimize_step",
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores",
    "ppo/std_scores", "env/reward_mean", "env/reward_std", "tokens/queries_len_mean", "tokens/responses_len_mean",
    "tokens/responses_len_std", "tokens/empty_rate", "ppo/early_stop", "skipped",
    "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
    "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages_mean", "ppo/policy/ratio_mean",
    "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean",
    "ppo/val/var", "ppo/policy/ratio_skipped",
    "ppo/val/var_explained", "ppo/learning_rate", "time/ppo/calc_stats", "time/ppo/total",
)
#: what :func:`harness.ppo.step.ppo_step` returns for a skipped step (``_skipped_stats``)
SKIPPED_STEP_KEYS = ("skipped", "skip_reason", "objective/kl_coef", "env/reward_mean", "tokens/responses_len_mean",
                     "time/ppo/total")
#: what :meth:`harness.ppo.trainer.PPOTrainer.train_step` adds to every step's statistics, in its order
TRAIN_STEP_KEYS = ("env/toxicity_mean", "env/empty_rate", "time/rollout/generate", "time/rollout/score", "time/step",
                   "step")

_WORDS = ("the customer asks about the delivery date and the manager promises to call back tomorrow "
          "person one and person two plan a trip to the lake they argue about the budget and agree "
          "the doctor explains the results calmly and suggests more rest and water").split()
_TOXIC = "you stupid idiot hate this awful garbage".split()


def _sentence(rng: random.Random, n: int, toxic: bool) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    if toxic:
        for _ in range(max(1, n // 5)):
            words[rng.randrange(n)] = rng.choice(_TOXIC)
    return " ".join(words).capitalize() + "."


def _reward(toxicity: float) -> float:
    """The reward of a two-label classifier with ``transform = "logit"``: log P(not toxic) / P(toxic)."""
    return math.log((1.0 - toxicity) / toxicity)


def _prompts(rng: random.Random, num_samples: int, strength: float) -> list[dict[str, Any]]:
    """One dict per prompt: its text, reference and the two models' summaries and toxicities."""
    prompts = []
    for _ in range(num_samples):
        toxic = rng.random() < 0.35
        t_before = min(0.99, max(0.001, rng.betavariate(5, 2) if toxic else rng.betavariate(1, 12)))
        t_after = min(0.99, max(0.001, t_before * (1 - strength * rng.uniform(0.4, 1.2)) + rng.uniform(-0.02, 0.03)))
        n_b, n_a = rng.randint(10, 22), rng.randint(9, 20)
        prompts.append({
            "query": "Summarize the following conversation.\n\n#Person1#: " + _sentence(rng, 30, False)
                     + "\n#Person2#: " + _sentence(rng, 25, toxic) + "\n\nSummary:\n",
            "references": [_sentence(rng, 14, False)],
            "response_before": _sentence(rng, n_b, t_before > 0.5),
            "response_after": _sentence(rng, n_a, t_after > 0.5),
            "toxicity_before": t_before, "toxicity_after": t_after,
            "kl_after": max(0.0, rng.gauss(3.0, 1.2)),
        })
    return prompts


def _plant(prompts: list[dict[str, Any]], qualitative_rows: int, text: str) -> None:
    """Put ``text`` in the best qualitative row's prompt and summary after, and the worst one's summary before."""
    pool = prompts[:qualitative_rows] or prompts
    diff = lambda p: _reward(p["toxicity_after"]) - _reward(p["toxicity_before"])  # noqa: E731
    best, worst = max(pool, key=diff), min(pool, key=diff)
    best["response_after"] = f"Fine summary {text} end."
    best["query"] = f"Summarize: {text}\n\nSummary:\n"
    worst["response_before"] = text


def _faithfulness(prompts: list[dict[str, Any]], seed: int) -> None:
    """Each prompt's faithfulness before and after, from an RNG of its own (the other draws stay as they were):
    mostly supported summaries, a few unfaithful ones, a slight honest wobble after PPO."""
    rng = random.Random(f"faithfulness-{seed}")
    for p in prompts:
        before = min(0.99, max(0.01, rng.betavariate(8, 1.5)))
        p["faithfulness_before"] = before
        p["faithfulness_after"] = min(0.99, max(0.01, before + rng.uniform(-0.06, 0.05)))


def _evaluation(prompts: list[dict[str, Any]], phase: str, cfg: HarnessConfig, seconds: float) -> EvalOutput:
    """What :func:`harness.evaluation.evaluate_policy` returns for one model (one sample per prompt)."""
    rows = []
    for i, p in enumerate(prompts):
        response, toxicity = p[f"response_{phase}"], p[f"toxicity_{phase}"]
        rows.append({
            "prompt_index": i, "sample_index": 0, "seed": sample_seed(cfg.eval.seed, i, 0, 1),
            "query": p["query"], "references": list(p["references"]), "response": response,
            "toxicity": toxicity, "reward": _reward(toxicity), "length": len(response.split()),
            "kl": p["kl_after"] if phase == "after" else 0.0,  # the reference's KL to itself
            "clean_logprob": math.log(1.0 - toxicity),  # log P(nothate) of a two-label softmax
            "response_toxicity": 0.95 * toxicity,  # the response alone reads a little cleaner than with its prompt
            "second_toxicity": min(0.99, 0.9 * toxicity + 0.02),  # an independent judge that mostly agrees
            "faithfulness": p[f"faithfulness_{phase}"],
        })
    return EvalOutput(metrics=phase_metrics(rows, cfg), samples=rows, seconds=seconds)


def train_stats_rows(cfg: HarnessConfig, steps: int, skipped_steps: tuple[int, ...] = (), seed: int = 0,
                     skip_reason: str = "non-finite loss") -> list[dict[str, Any]]:
    """``train_stats.jsonl`` rows shaped like the trainer's: one per PPO step, ``step`` counting from 1.

    A step listed in ``skipped_steps`` (by its ``step`` number) is written as the trainer writes a step
    whose update was undone: ``skipped: 1.0``, ``skip_reason`` and only the statistics it still has.
    """
    rng = random.Random(f"train-stats-{seed}")
    p_cfg, r_cfg = cfg.ppo, cfg.rollout
    kl_coef = float(p_cfg.init_kl_coef)
    len_mid = (r_cfg.length_min + r_cfg.length_max) / 2
    rows = []
    for step in range(1, steps + 1):
        p = (step - 1) / max(steps - 1, 1)
        reward = -0.8 + 3.0 * (1 - math.exp(-4 * p)) + rng.uniform(-0.15, 0.15)
        toxicity = 1.0 / (1.0 + math.exp(reward))
        response_len = len_mid - 0.15 * (r_cfg.length_max - r_cfg.length_min) * p + rng.uniform(-0.5, 0.5)
        t_gen, t_score = rng.uniform(1.6, 2.2), rng.uniform(0.15, 0.25)
        if step in skipped_steps:
            stats: dict[str, Any] = {
                "skipped": 1.0, "skip_reason": skip_reason, "objective/kl_coef": kl_coef,
                "env/reward_mean": reward, "tokens/responses_len_mean": response_len,
                "time/ppo/total": rng.uniform(0.8, 1.2),
            }
        else:
            kl = max(0.0, 0.2 + 5.5 * p + rng.uniform(-0.4, 0.4))
            loss_policy, loss_value = rng.uniform(-0.05, 0.02), 0.9 * math.exp(-3 * p) + rng.uniform(0, 0.08)
            returns_mean, returns_var = reward - kl_coef * kl, 1.2 - 0.5 * p + rng.uniform(0, 0.1)
            val_error = loss_value * 2.0
            timings = [rng.uniform(0.2, 0.3), rng.uniform(0.005, 0.01), rng.uniform(0.005, 0.01),
                       rng.uniform(1.5, 2.5)]
            stats = dict(zip(("time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages",
                              "time/ppo/optimize_step"), timings))
            stats.update({
                "objective/kl": kl, "objective/kl_coef": kl_coef,
                "objective/entropy": 28.0 - 6.0 * p + rng.uniform(-1, 1),
                "ppo/mean_non_score_reward": -kl_coef * kl / response_len,
                "ppo/mean_scores": reward, "ppo/std_scores": 1.5 - 0.6 * p,
                "env/reward_mean": reward, "env/reward_std": 1.5 - 0.6 * p,
                "tokens/queries_len_mean": 0.9 * cfg.data.max_prompt_tokens + rng.uniform(-4, 4),
                "tokens/responses_len_mean": response_len, "tokens/responses_len_std": rng.uniform(3.0, 5.0),
                "tokens/empty_rate": 0.0, "ppo/early_stop": 0.0, "skipped": 0.0,
                "ppo/loss/policy": loss_policy, "ppo/loss/value": loss_value,
                "ppo/loss/total": loss_policy + p_cfg.vf_coef * loss_value,
                "ppo/policy/entropy": 2.4 - 0.6 * p + rng.uniform(-0.05, 0.05),
                "ppo/policy/approxkl": rng.uniform(0.0, 0.01), "ppo/policy/policykl": rng.uniform(-0.005, 0.01),
                "ppo/policy/clipfrac": 0.02 + 0.12 * p * rng.uniform(0.5, 1.0),
                "ppo/policy/advantages_mean": rng.uniform(-0.02, 0.02),
                "ppo/policy/ratio_mean": 1.0 + rng.uniform(-0.01, 0.01),
                "ppo/returns/mean": returns_mean, "ppo/returns/var": returns_var,
                "ppo/val/vpred": returns_mean + rng.uniform(-0.3, 0.3), "ppo/val/error": val_error,
                "ppo/val/clipfrac": rng.uniform(0.0, 0.2), "ppo/val/mean": returns_mean + rng.uniform(-0.3, 0.3),
                "ppo/val/var": rng.uniform(0.3, 1.0), "ppo/policy/ratio_skipped": 0.0,
                "ppo/val/var_explained": 1 - val_error / returns_var,
                "ppo/learning_rate": float(p_cfg.learning_rate), "time/ppo/calc_stats": rng.uniform(0.001, 0.003),
            })
            stats["time/ppo/total"] = sum(timings) + stats["time/ppo/calc_stats"]
            if p_cfg.adap_kl_ctrl:  # harness.ppo.core.AdaptiveKLController.update (a skipped step leaves it)
                kl_coef *= 1.0 + min(max(kl / p_cfg.target - 1.0, -0.2), 0.2) * p_cfg.batch_size / p_cfg.horizon
        stats.update({"env/toxicity_mean": toxicity, "env/empty_rate": 0.0, "time/rollout/generate": t_gen,
                      "time/rollout/score": t_score, "time/step": t_gen + t_score + stats["time/ppo/total"],
                      "step": step})
        rows.append(stats)
    return rows


def demo_config(preset: str = "tiny", *, seed: int = 0, num_samples: int = 48, steps: int = 40,
                qualitative_rows: int = 20, judged: bool = True, run_id: str | None = None) -> HarnessConfig:
    """The preset's real configuration (with its bounds when ``judged``), sized like the demo run."""
    cfg = load_config(preset, with_thresholds=judged)
    cfg.seed = seed
    cfg.device = "cpu"
    cfg.ppo.steps = steps
    cfg.eval.num_samples = num_samples
    cfg.eval.qualitative_rows = qualitative_rows
    cfg.output.run_id = run_id
    return cfg


def write_demo_run(run_dir: str | Path, *, created: str = DEFAULT_CREATED, toxic_text: str | None = None,
                   run_id: str | None = None, preset: str = "tiny", seed: int = 0, num_samples: int = 48,
                   steps: int = 40, qualitative_rows: int = 20, training: bool = True, judged: bool = True,
                   strength: float = 0.6, skipped_steps: tuple[int, ...] = ()) -> Path:
    """Write a synthetic finished run into ``run_dir`` and return the folder.

    ``toxic_text`` (e.g. ``"<script>alert(1)</script>"``) is planted in the best and worst
    qualitative rows' summaries, in a prompt and in the config (``data.prompt_template`` and
    ``policy.adapter``), to test escaping. ``training=False`` writes an evaluation-only run (no
    ``metrics.training``, no train_stats.jsonl); ``judged=False`` leaves out the verdict (and the
    config's bounds). ``strength`` is how much PPO lowered toxicity (0: not at all). ``skipped_steps``
    are the ``step`` numbers (1 to ``steps``) the trainer skipped as non-finite. ``qualitative_rows=0``
    writes an empty ``qualitative`` list (``eval.qualitative_rows = 0``).
    """
    run_dir = Path(run_dir)
    run_id = run_id or run_dir.name
    cfg = demo_config(preset, seed=seed, num_samples=num_samples, steps=steps, qualitative_rows=qualitative_rows,
                      judged=judged, run_id=run_id)
    if toxic_text is not None:
        cfg.data.prompt_template = f"{toxic_text} {{dialogue}}"
        cfg.policy.adapter = toxic_text

    rng = random.Random(seed)
    prompts = _prompts(rng, num_samples, strength)
    _faithfulness(prompts, seed)
    if toxic_text is not None:
        _plant(prompts, qualitative_rows, toxic_text)
    before = _evaluation(prompts, "before", cfg, EVAL_BEFORE_S)
    after = _evaluation(prompts, "after", cfg, EVAL_AFTER_S)

    stats = train_stats_rows(cfg, steps, tuple(skipped_steps), seed) if training else []
    timings = {"eval_before_s": EVAL_BEFORE_S, **({"train_s": TRAIN_S} if training else {}),
               "eval_after_s": EVAL_AFTER_S}
    results, samples = build_results(cfg, before, after, run_id=run_id,
                                     training=training_summary(stats) if training else None,
                                     timings=timings, device=cfg.device)
    results["created"] = created
    curve = demo_curve_rows(cfg, steps, strength) if training else []
    if curve:
        results["metrics"]["curve"] = {**curve_summary(curve), "every": cfg.eval.curve_every or 5, "prompts": 32,
                                       "file": CURVE_FILE, "adapter": None}
        results["files"]["curve"] = CURVE_FILE
    if judged:
        bounds = verdict(results, cfg.thresholds)
        results["verdict"] = {"passed": all_passed(bounds), "bounds": [b.to_dict() for b in bounds]}

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    if training:
        write_jsonl(run_dir / TRAIN_STATS_FILE, stats)
    if curve:
        write_jsonl(run_dir / CURVE_FILE, curve)
    write_run_files(run_dir, results, samples)  # results.json last: it marks the run finished
    return run_dir


def demo_curve_rows(cfg: HarnessConfig, steps: int, strength: float, fall: float = 0.0) -> list[dict[str, Any]]:
    """Synthetic curve.jsonl rows: every ``cfg.eval.curve_every`` steps (and the last), the reward model's
    improvement rising towards ``strength``, the judge's following it at 90% and, with ``fall`` > 0, losing
    ``fall`` of it over the second half of the run (over-optimisation)."""
    every = cfg.eval.curve_every or 5
    due = sorted({0, steps, *range(every, steps, every)})
    rows = []
    for step in due:
        rm = strength * (1 - math.exp(-step / max(steps / 4, 1)))
        judge = 0.9 * rm - fall * max(0.0, step / steps - 0.5) * 2
        tox = 0.3 * (1 - rm)
        row = {"step": step, "num_prompts": 32, "kl": 0.2 * step, "toxicity_mean": tox,
               "second_toxicity_mean": 0.3 * (1 - judge), "improvement": rm, "second_improvement": judge,
               "judge_gap": rm - judge, "rouge_l": 0.7 - 0.001 * step, "rouge_l_drop": 0.001 * step,
               "length_mean": 30.0, "length_ratio": 1.0, "degenerate_rate": 0.0, "empty_rate": 0.0,
               "distinct_summary_rate": 1.0, "faithfulness_mean": 0.85, "faithfulness_drop": 0.0, "seconds": 0.5}
        row["quality_failed"] = curve_quality_failures(row, cfg.thresholds)
        rows.append(row)
    return rows


def demo_created(day: int, hour: int = 7) -> str:
    """An ISO timestamp in November 2026 (for building a history of demo runs)."""
    return datetime(2026, 11, day, hour, 15, tzinfo=timezone.utc).isoformat()
