"""Synthetic run folders for tests, docs and trying the report out: no model is loaded.

:func:`write_demo_run` writes ``results.json``, ``samples.jsonl`` and ``train_stats.jsonl`` exactly as
``docs/results-schema.md`` describes them, with plausible numbers drawn from a seeded RNG; the
metrics are computed from the samples it writes, and the verdict comes from
:func:`harness.thresholds.verdict` with the preset's bounds, so the files are self-consistent.

    python -c "from harness.report.demo import write_demo_run; write_demo_run('reports/demo')"
    python -c "from harness.report import render_run; print(render_run('reports/demo'))"
"""

from __future__ import annotations

import json
import math
import platform
import random
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import HarnessConfig
from ..thresholds import load_bounds, verdict

DEFAULT_CREATED = "2026-11-25T07:15:00+00:00"

TRAIN_STAT_KEYS = [
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/loss/policy", "ppo/loss/value",
    "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac",
    "ppo/policy/advantages_mean", "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error",
    "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var", "ppo/val/var_explained", "ppo/mean_scores",
    "ppo/std_scores", "ppo/mean_non_score_reward", "env/reward_mean", "env/reward_std", "tokens/queries_len_mean",
    "tokens/responses_len_mean", "tokens/empty_rate", "ppo/learning_rate", "time/ppo/forward_pass",
    "time/ppo/compute_rewards", "time/ppo/compute_advantages", "time/ppo/optimize_step", "time/ppo/calc_stats",
    "time/ppo/total", "time/rollout/generate", "time/rollout/score", "time/step",
]

_WORDS = ("the customer asks about the delivery date and the manager promises to call back tomorrow "
          "person one and person two plan a trip to the lake they argue about the budget and agree "
          "the doctor explains the results calmly and suggests more rest and water").split()
_TOXIC = "you stupid idiot hate this awful garbage".split()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _ci(xs: list[float], z: float = 1.96) -> tuple[float, float]:
    m, half = _mean(xs), z * _std(xs) / math.sqrt(max(len(xs), 1))
    return m - half, m + half


def _sentence(rng: random.Random, n: int, toxic: bool) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    if toxic:
        for _ in range(max(1, n // 5)):
            words[rng.randrange(n)] = rng.choice(_TOXIC)
    return " ".join(words).capitalize() + "."


def _phase_metrics(tox: list[float], rewards: list[float], lengths: list[int], texts: list[str],
                   kl: list[float], rng: random.Random, rouge_shift: float) -> dict[str, Any]:
    lo, hi = _ci(tox)
    tokens = [t for s in texts for t in s.split()]
    bigrams = list(zip(tokens, tokens[1:]))
    return {
        "toxicity_mean": _mean(tox), "toxicity_std": _std(tox), "toxicity_ci_low": lo, "toxicity_ci_high": hi,
        "toxic_rate": _mean([float(t >= 0.5) for t in tox]), "expected_max_toxicity": _mean(tox),
        "toxicity_probability": _mean([float(t >= 0.5) for t in tox]),
        "reward_mean": _mean(rewards), "reward_std": _std(rewards),
        "rouge1": 0.41 - rouge_shift + rng.uniform(-0.005, 0.005), "rouge2": 0.17 - rouge_shift / 2,
        "rougeL": 0.34 - rouge_shift,
        "empty_rate": _mean([float(not s.strip()) for s in texts]), "length_mean": _mean([float(x) for x in lengths]),
        "distinct_1": len(set(tokens)) / max(len(tokens), 1), "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
        "repeated_ngram_rate": 0.012, "second_toxicity_mean": None,
        "kl_per_token_mean": _mean(kl) / max(_mean([float(x) for x in lengths]), 1.0),
        "kl_per_sequence_mean": _mean(kl),
    }


def _train_stats(rng: random.Random, steps: int, skipped_steps: tuple[int, ...]) -> list[dict[str, Any]]:
    rows, kl_coef = [], 0.05
    for step in range(steps):
        p = step / max(steps - 1, 1)
        kl = 0.2 + 5.5 * p + rng.uniform(-0.4, 0.4)
        reward = -0.8 + 3.0 * (1 - math.exp(-4 * p)) + rng.uniform(-0.15, 0.15)
        kl_coef *= 1 + 0.02 * (kl - 6.0) / 6.0
        row: dict[str, Any] = {"step": step}
        for key in TRAIN_STAT_KEYS:
            row[key] = rng.uniform(0.0, 1.0)
        row.update({
            "objective/kl": kl, "objective/kl_coef": kl_coef, "objective/entropy": 28.0 - 6.0 * p + rng.uniform(-1, 1),
            "ppo/loss/policy": rng.uniform(-0.05, 0.02),
            "ppo/loss/value": 0.9 * math.exp(-3 * p) + rng.uniform(0, 0.08),
            "ppo/policy/clipfrac": 0.02 + 0.12 * p * rng.uniform(0.5, 1.0), "ppo/returns/mean": reward - kl_coef * kl,
            "env/reward_mean": reward, "env/reward_std": 1.5 - 0.6 * p, "ppo/mean_scores": reward,
            "tokens/responses_len_mean": 20.0 - 3.0 * p + rng.uniform(-0.5, 0.5), "tokens/queries_len_mean": 180.0,
            "tokens/empty_rate": 0.0, "ppo/learning_rate": 2e-3, "skipped": False,
        })
        if step in skipped_steps:  # a non-finite step: the statistics are NaN, the update was skipped
            row.update({"ppo/loss/policy": math.nan, "ppo/loss/value": math.nan, "ppo/loss/total": math.nan,
                        "skipped": True})
        rows.append(row)
    return rows


def write_demo_run(run_dir: str | Path, *, created: str = DEFAULT_CREATED, toxic_text: str | None = None,
                   run_id: str | None = None, preset: str = "tiny", seed: int = 0, num_samples: int = 48,
                   steps: int = 40, qualitative_rows: int = 20, training: bool = True, judged: bool = True,
                   strength: float = 0.6, skipped_steps: tuple[int, ...] = ()) -> Path:
    """Write a synthetic finished run into ``run_dir`` and return the folder.

    ``toxic_text`` (e.g. ``"<script>alert(1)</script>"``) is planted in the best and worst
    qualitative rows' summaries, in a prompt and in the config (``data.prompt_template`` and
    ``policy.adapter``), to test escaping. ``training=False`` writes an evaluation-only run (no
    ``metrics.training``, no train_stats.jsonl); ``judged=False`` leaves out the verdict.
    ``strength`` is how much PPO lowered toxicity (0: not at all).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    run_id = run_id or run_dir.name

    samples = []
    for i in range(num_samples):
        toxic = rng.random() < 0.35
        t_before = min(0.99, max(0.001, rng.betavariate(5, 2) if toxic else rng.betavariate(1, 12)))
        t_after = min(0.99, max(0.001, t_before * (1 - strength * rng.uniform(0.4, 1.2)) + rng.uniform(-0.02, 0.03)))
        n_b, n_a = rng.randint(10, 22), rng.randint(9, 20)
        samples.append({
            "prompt_index": i, "sample_index": 0, "seed": 1234 + i,
            "query": "Summarize the following conversation.\n\n#Person1#: " + _sentence(rng, 30, False)
                     + "\n#Person2#: " + _sentence(rng, 25, toxic) + "\n\nSummary:\n",
            "references": [_sentence(rng, 14, False)],
            "response_before": _sentence(rng, n_b, t_before > 0.5),
            "response_after": _sentence(rng, n_a, t_after > 0.5),
            "toxicity_before": t_before, "toxicity_after": t_after,
            "reward_before": math.log((1 - t_before) / t_before), "reward_after": math.log((1 - t_after) / t_after),
            "length_before": n_b, "length_after": n_a, "kl_after": max(0.0, rng.gauss(3.0, 1.2)),
            "second_toxicity_before": None, "second_toxicity_after": None,
        })

    ranked = sorted(samples, key=lambda s: s["reward_after"] - s["reward_before"], reverse=True)
    if toxic_text is not None:
        ranked[0]["response_after"] = f"Fine summary {toxic_text} end."
        ranked[0]["query"] = f"Summarize: {toxic_text}\n\nSummary:\n"
        ranked[-1]["response_before"] = toxic_text
    half = qualitative_rows // 2
    picked = ranked if len(ranked) <= qualitative_rows else ranked[:qualitative_rows - half] + ranked[-half:]
    qualitative = [{"query": s["query"], "response_before": s["response_before"],
                    "response_after": s["response_after"], "reward_before": s["reward_before"],
                    "reward_after": s["reward_after"], "reward_diff": s["reward_after"] - s["reward_before"]}
                   for s in picked]

    def col(key: str) -> list:
        return [s[key] for s in samples]

    before = _phase_metrics(col("toxicity_before"), col("reward_before"), col("length_before"),
                            col("response_before"), [0.0] * num_samples, rng, 0.0)
    after = _phase_metrics(col("toxicity_after"), col("reward_after"), col("length_after"),
                           col("response_after"), col("kl_after"), rng, 0.012)
    diffs = [b - a for b, a in zip(col("toxicity_before"), col("toxicity_after"))]
    lo, hi = _ci(diffs)
    mb = before["toxicity_mean"]
    comparison = {
        "mean_improvement": (mb - after["toxicity_mean"]) / mb,
        "std_improvement": (before["toxicity_std"] - after["toxicity_std"]) / before["toxicity_std"],
        "mean_improvement_ci_low": lo / mb, "mean_improvement_ci_high": hi / mb,
        "bootstrap_resamples": 1000, "confidence": 0.95,
        "rouge_l_drop": before["rougeL"] - after["rougeL"],
        "reward_gain": after["reward_mean"] - before["reward_mean"],
        "num_prompts": num_samples, "samples_per_prompt": 1,
    }
    metrics: dict[str, Any] = {"before": before, "after": after, "comparison": comparison}
    stats = _train_stats(rng, steps, skipped_steps) if training else []
    if training:
        kls = [r["objective/kl"] for r in stats]
        metrics["training"] = {"steps": steps, "objective_kl_mean": _mean(kls), "objective_kl_max": max(kls),
                               "reward_first": stats[0]["env/reward_mean"], "reward_last": stats[-1]["env/reward_mean"]}

    config = HarnessConfig(preset=preset).to_dict()
    config["output"]["run_id"] = run_id
    if toxic_text is not None:
        config["data"]["prompt_template"] = f"{toxic_text} {{dialogue}}"
        config["policy"]["adapter"] = toxic_text
    files = {"samples": "samples.jsonl", "config": "config.yaml"}
    if training:
        files["train_stats"] = "train_stats.jsonl"
    results: dict[str, Any] = {
        "schema_version": 1, "run_id": run_id, "created": created, "preset": preset, "config": config,
        "seeds": {"run": seed, "eval": 1234, "bootstrap": 1234},
        "environment": {"versions": {"python": platform.python_version(), "torch": _version("torch"),
                                     "transformers": _version("transformers"), "peft": _version("peft")},
                        "git_commit": "0123456789abcdef0123456789abcdef01234567", "device": "cpu",
                        "platform": platform.platform()},
        "timings": {"eval_before_s": 12.5, "train_s": 151.25, "eval_after_s": 13.0, "total_s": 176.75},
        "metrics": metrics, "qualitative": qualitative, "files": files,
    }
    if judged:
        bounds = load_bounds(preset)
        checked = verdict(results, bounds)
        results["verdict"] = {"passed": all(b.passed for b in checked), "bounds": [b.to_dict() for b in checked]}
        config["thresholds"] = bounds

    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with (run_dir / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    if training:
        with (run_dir / "train_stats.jsonl").open("w") as f:
            for r in stats:
                f.write(json.dumps(r) + "\n")
    return run_dir


def demo_created(day: int, hour: int = 7) -> str:
    """An ISO timestamp in November 2026 (for building a history of demo runs)."""
    return datetime(2026, 11, day, hour, 15, tzinfo=timezone.utc).isoformat()
