"""The main job: evaluate before, train with PPO, evaluate after, verdict, results files, report.

``run(cfg)`` is what ``detox-harness run`` and the threshold suites call. Each phase's output is
written to the run directory as soon as it exists (the "before" evaluation, PPO statistics after
every step, checkpoints), so an interrupted run resumes without redoing finished work.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import HarnessConfig
from .errors import HarnessError

log = logging.getLogger(__name__)
BEFORE_CACHE = "eval_before.json"


@dataclass
class RunOutcome:
    run_dir: Path
    results: dict
    bounds: list = field(default_factory=list)
    passed: bool = True
    interrupted: bool = False
    report: Path | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.passed else 1


def default_run_id(cfg: HarnessConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{cfg.preset}-s{cfg.seed}"


def resolve_run_dir(cfg: HarnessConfig, output: str | Path | None, resume: bool) -> Path:
    """``--output`` if given; with ``--resume`` and no output, the newest unfinished run of this preset."""
    if output:
        return Path(output)
    root = Path(cfg.output.dir)
    if resume:
        candidates = [p for p in root.glob(f"*-{cfg.preset}-s{cfg.seed}") if (p / "checkpoints").is_dir()
                      and not (p / "results.json").exists()]
        if not candidates:
            raise HarnessError(f"no unfinished run of preset {cfg.preset} with seed {cfg.seed} under {root}",
                               field="--resume", fix="pass --output RUN_DIR of the run to continue")
        return max(candidates, key=lambda p: p.stat().st_mtime)
    return root / (cfg.output.run_id or default_run_id(cfg))


def _eval_to_json(out) -> dict:
    return {"metrics": out.metrics, "samples": out.samples, "seconds": out.seconds}


def _eval_from_json(data: dict):
    from .evaluation import EvalOutput

    return EvalOutput(metrics=data["metrics"], samples=data["samples"], seconds=data["seconds"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def training_summary(stats: list[dict]) -> dict:
    good = [s for s in stats if not s.get("skipped")]
    kls = [s["objective/kl"] for s in good if s.get("objective/kl") is not None]
    rewards = [s["env/reward_mean"] for s in good if s.get("env/reward_mean") is not None]
    return {
        "steps": len(stats), "skipped_steps": len(stats) - len(good),
        "objective_kl_mean": sum(kls) / len(kls) if kls else None,
        "objective_kl_max": max(kls) if kls else None,
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "seconds_per_step": (sum(s.get("time/step", 0.0) for s in stats) / len(stats)) if stats else None,
    }


def read_stats(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RunInputs:
    """What a run or an evaluation loads before it generates anything."""

    device: object
    policy: object
    classifier: object
    second: object
    data: object
    seconds: float


def load_inputs(cfg: HarnessConfig, *, min_train_rows: int = 1) -> RunInputs:
    """Seed torch with the run seed (the fresh LoRA's initialization depends on it), then load the policy, the
    reward classifier, the optional second judge and the prompts (at least ``eval.num_samples`` test rows)."""
    import torch

    from .data import build_prompts
    from .models import load_policy, resolve_device
    from .toxicity import load_judges

    t = time.time()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    policy = load_policy(cfg.policy, device=device)
    classifier, second = load_judges(cfg, device)
    data = build_prompts(cfg.data, policy.tokenizer, min_test_rows=cfg.eval.num_samples,
                         min_train_rows=min_train_rows)
    return RunInputs(device, policy, classifier, second, data, time.time() - t)


def run(cfg: HarnessConfig, *, output: str | Path | None = None, resume: bool = False, progress: bool = True,
        echo=print) -> RunOutcome:
    """Run the whole job; returns the outcome (results, bounds, exit code)."""
    from .evaluation import build_results, evaluate_policy, write_run_files
    from .models import count_parameters, format_parameter_count
    from .ppo.trainer import PPOTrainer
    from .thresholds import all_passed, verdict

    t_start = time.time()
    run_dir = resolve_run_dir(cfg, output, resume)
    if run_dir.exists() and (run_dir / "results.json").exists() and not resume:
        raise HarnessError("the run directory already holds a finished run", field="--output", value=str(run_dir),
                           fix="choose a new --output (or omit it for a fresh run id)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        saved = run_dir / "config.yaml"
        if saved.exists():
            import yaml

            from .config import config_from_dict

            cfg = config_from_dict(yaml.safe_load(saved.read_text()))
            echo(f"resuming {run_dir} with its saved config")
    cfg.save(run_dir / "config.yaml")
    inputs = load_inputs(cfg, min_train_rows=cfg.ppo.batch_size)
    device, policy, classifier, second, data = (inputs.device, inputs.policy, inputs.classifier, inputs.second,
                                                 inputs.data)
    timings: dict[str, float] = {"load_s": inputs.seconds}
    echo(f"run {run_dir.name}: preset {cfg.preset}, seed {cfg.seed}, device {device}")
    echo(format_parameter_count(count_parameters(policy)))
    echo(f"data: {data.stats['kept']} dialogues kept of {data.stats['dialogues']} "
         f"({data.stats['train']} train / {data.stats['test']} test prompts, "
         f"{data.stats['truncated_prompts']} truncated to {data.stats['max_prompt_tokens']} tokens)")
    test = data.test.select(range(cfg.eval.num_samples))

    before_file = run_dir / BEFORE_CACHE
    if resume and before_file.exists():
        before = _eval_from_json(json.loads(before_file.read_text()))
        echo("before: reused the saved evaluation")
    else:
        before = evaluate_policy(policy, classifier, test, cfg, use_reference=True, second_classifier=second,
                                 progress=progress)
        _atomic_write(before_file, json.dumps(_eval_to_json(before)))
    timings["eval_before_s"] = before.seconds
    echo(f"before: toxicity {before.metrics['toxicity_mean']:.4f} +- {before.metrics['toxicity_std']:.4f}, "
         f"reward {before.metrics['reward_mean']:.3f}, ROUGE-L {before.metrics['rougeL']:.3f}")

    t = time.time()
    trainer = PPOTrainer(cfg, policy, classifier, data.train, run_dir)
    if resume:
        ckpt = trainer.resume()
        echo(f"resumed from {ckpt} (step {trainer.step})" if ckpt else "no checkpoint found: training from step 0")
    elif trainer.stats_path.exists():
        trainer.stats_path.unlink()
    result = trainer.train(progress=progress)
    timings["train_s"] = time.time() - t
    stats = read_stats(trainer.stats_path)
    if result.interrupted:
        echo(f"interrupted after step {result.steps_done}; checkpoint {result.checkpoint}. "
             f"Continue with: detox-harness run --preset {cfg.preset} --output {run_dir} --resume")
        return RunOutcome(run_dir=run_dir, results={}, interrupted=True)

    after = evaluate_policy(policy, classifier, test, cfg, use_reference=False, second_classifier=second,
                            progress=progress)
    timings["eval_after_s"] = after.seconds
    timings["total_s"] = time.time() - t_start
    results, samples = build_results(cfg, before, after, run_id=run_dir.name, training=training_summary(stats),
                                     timings=timings, extra={"data": data.stats,
                                                             "parameters": count_parameters(policy),
                                                             "checkpoint": result.checkpoint})
    bounds = verdict(results, cfg.thresholds)
    results["verdict"] = {"passed": all_passed(bounds), "bounds": [b.to_dict() for b in bounds]}
    results.setdefault("files", {})["train_stats"] = "train_stats.jsonl"
    write_run_files(run_dir, results, samples)
    outcome = RunOutcome(run_dir=run_dir, results=results, bounds=bounds, passed=all_passed(bounds))
    if cfg.output.report:
        from .report import render_index, render_run

        outcome.report = render_run(run_dir)
        render_index(run_dir.parent)
    return outcome


def summary_table(results: dict) -> str:
    """Before/after figures for the terminal."""
    m = results["metrics"]
    rows = [("metric", "before", "after")]
    for key, label in (("toxicity_mean", "toxicity mean"), ("toxicity_std", "toxicity std"),
                       ("toxic_rate", "share toxic (>= threshold)"), ("reward_mean", "reward mean"),
                       ("rougeL", "ROUGE-L"), ("empty_rate", "empty outputs"), ("length_mean", "length (tokens)"),
                       ("kl_per_sequence_mean", "KL to reference (nats/seq)")):
        b, a = m["before"].get(key), m["after"].get(key)
        rows.append((label, "-" if b is None else f"{b:.4f}", "-" if a is None else f"{a:.4f}"))
    c = m["comparison"]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"mean toxicity improvement: {100 * c['mean_improvement']:.2f}% "
                 f"(95% CI {100 * c['mean_improvement_ci_low']:.2f}% .. {100 * c['mean_improvement_ci_high']:.2f}%), "
                 f"std improvement: {100 * c['std_improvement']:.2f}%")
    return "\n".join(lines)
