"""The over-optimisation curve: the policy evaluated by both judges every few PPO steps, and the point selected.

Every ``eval.curve_every`` PPO steps, at step 0 and at the last step, :class:`Curve` evaluates the current
policy with :func:`harness.evaluation.evaluate_policy` on the first ``eval.curve_prompts`` test prompts (at most
``eval.num_samples``), one sample each with the evaluation's seeds (:func:`curve_config`): toxicity by the
reward model and by the second judge, faithfulness, ROUGE-L, length, degenerate rate and the exact KL to the
reference. Each point (:func:`harness.metrics.curve_point`, against the step-0 point of the same prompts and
seeds) is appended to ``curve.jsonl`` as soon as it exists; a resumed run keeps the points up to its checkpoint's
step and makes the later ones again (the same numbers: the weights of a step and the seeds are the same), so the
curve has each point once and none missing.

The point with the highest improvement by the second judge among those that pass the curve's quality bounds
(:data:`harness.thresholds.CURVE_QUALITY_BOUNDS`) is the selected one: its adapter is written to ``selected/``
when it appears (a new best replaces the old), so no extra checkpoint is kept. ``metrics.curve`` of results.json
(:func:`harness.metrics.curve_summary`) gives the peak, the regret (``max_judge_regret``) and the selected point.
See docs/evaluation.md, "The curve".
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import results as rf
from .config import HarnessConfig
from .errors import environment_fault
from .evaluation import select_prompts
from .metrics import curve_point, curve_summary, phase_metrics
from .parallel import SINGLE, Parallel
from .thresholds import curve_quality_failures

log = logging.getLogger(__name__)
SELECTED_TEMP_PREFIX = ".selected-"


def curve_config(cfg: HarnessConfig) -> HarnessConfig:
    """The evaluation settings of a curve point: ``cfg`` with the first ``eval.curve_prompts`` prompts (at most
    ``eval.num_samples``) and one sample per prompt; seeds, sampling and judges as the run's evaluation."""
    out = copy.deepcopy(cfg)
    n = cfg.eval.curve_prompts if cfg.eval.num_samples is None else min(cfg.eval.curve_prompts, cfg.eval.num_samples)
    out.eval.num_samples = n
    out.eval.samples_per_prompt = 1
    return out


def is_due(step: int, every: int, total: int) -> bool:
    """Whether step ``step`` of a run of ``total`` steps has a curve point (step 0, every ``every``, the last)."""
    return every > 0 and (step == 0 or step % every == 0 or step == total)


def start_metrics(row: dict) -> dict:
    """The figures of the step-0 row that :func:`harness.metrics.curve_point` compares a later point with."""
    return {"toxicity_mean": row["toxicity_mean"], "second_toxicity_mean": row["second_toxicity_mean"],
            "rougeL": row["rouge_l"], "length_mean": row["length_mean"], "faithfulness_mean": row["faithfulness_mean"]}


def selected_step(run_dir: Path) -> int | None:
    """The step of the adapter in ``run_dir/selected/`` (None: none there, or unreadable)."""
    try:
        return int(json.loads((run_dir / rf.SELECTED_DIR / rf.SELECTION_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summarize(rows: list[dict], cfg: HarnessConfig, run_dir: Path, final_step: int | None = None) -> dict:
    """``metrics.curve`` of results.json: :func:`harness.metrics.curve_summary` plus the settings, the file and the
    selected adapter's directory (None when ``selected/`` does not hold the selected step's adapter)."""
    summary = curve_summary(rows, final_step)
    chosen = summary["selected"]
    adapter = rf.SELECTED_DIR if chosen is not None and selected_step(run_dir) == chosen["step"] else None
    return {**summary, "every": cfg.eval.curve_every, "prompts": curve_config(cfg).eval.num_samples,
            "file": rf.CURVE_FILE, "adapter": adapter}


def write_selected(run_dir: Path, step: int, save) -> None:
    """``save(directory)`` (the policy's ``save_pretrained``) into ``selected/`` atomically, with the step: written
    into a temporary directory, then swapped into place (a crash leaves the old selection or the new one)."""
    final = run_dir / rf.SELECTED_DIR
    tmp = Path(tempfile.mkdtemp(prefix=SELECTED_TEMP_PREFIX, suffix=".tmp", dir=run_dir))
    try:
        save(tmp)
        (tmp / rf.SELECTION_FILE).write_text(json.dumps({"step": int(step)}) + "\n")
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=SELECTED_TEMP_PREFIX + "old-", suffix=".tmp", dir=run_dir))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise environment_fault(e, f"writing the selected adapter ({final})") from e


def tidy(run_dir: Path) -> None:
    """Remove the temporary directories a crash left while ``selected/`` was written (after the swap's first
    rename, the old selection is put back)."""
    for p in sorted(run_dir.glob(SELECTED_TEMP_PREFIX + "*")):
        inner = p / rf.SELECTED_DIR
        if inner.is_dir() and not (run_dir / rf.SELECTED_DIR).exists():
            os.replace(inner, run_dir / rf.SELECTED_DIR)
        shutil.rmtree(p, ignore_errors=True)


class Curve:
    """The curve of one run: :meth:`start` (fresh or resumed), then :meth:`point` at every due step."""

    def __init__(self, cfg: HarnessConfig, run_dir: Path, policy, classifier, test, *, second=None,
                 faithfulness=None, parallel: Parallel = SINGLE, echo=print):
        self.cfg, self.run_dir, self.parallel, self.echo = cfg, Path(run_dir), parallel, echo
        self.point_cfg = curve_config(cfg)
        self.policy, self.classifier, self.second, self.faithfulness = policy, classifier, second, faithfulness
        self.prompts = select_prompts(test, self.point_cfg.eval.num_samples, "eval.curve_prompts")
        self.path = self.run_dir / rf.CURVE_FILE
        self.rows: list[dict] = []
        self.seconds = 0.0  # this process's time in curve points (timings.curve_s)
        self.enabled = cfg.eval.curve_every > 0

    @property
    def main(self) -> bool:
        return self.parallel.is_main

    def start(self, resumed_step: int | None) -> None:
        """A fresh run (``resumed_step`` None) starts an empty curve; a resumed one keeps the points up to the step
        its checkpoint holds (the later ones will be made again), as ``train_stats.jsonl`` keeps its rows."""
        if self.main:
            tidy(self.run_dir)
            if resumed_step is None:
                self.path.unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / rf.SELECTED_DIR, ignore_errors=True)
            else:
                kept = [r for r in rf.read_curve(self.run_dir, skip_bad_lines=True) if r["step"] <= resumed_step]
                if self.path.exists():
                    rf.write_jsonl(self.path, kept)
        self.parallel.wait()
        self.rows = [] if resumed_step is None else rf.read_curve(self.run_dir)
        if resumed_step is not None and resumed_step > 0 and not any(r["step"] == 0 for r in self.rows):
            self.echo("curve: its step-0 point is missing, so later points have nothing to compare with; no curve "
                      "for this run (make it afterwards with: detox-harness curve " + str(self.run_dir) + ")")
            self.enabled = False

    def has(self, step: int) -> bool:
        return any(r["step"] == step for r in self.rows)

    def maybe_point(self, step: int, total: int) -> dict | None:
        """The point of ``step`` when it is due and not already on the curve (the trainer's ``after_step``)."""
        if not self.enabled or not is_due(step, self.cfg.eval.curve_every, total) or self.has(step):
            return None
        return self.point(step)

    def point(self, step: int) -> dict:
        """Evaluate the policy as it is now as the point of ``step``; append it; write ``selected/`` on a new best."""
        import torch

        from .evaluation import evaluate_policy

        t = time.time()
        with torch.random.fork_rng(devices=[]):  # the evaluation samples with its own seeds: training's RNG untouched
            out = evaluate_policy(self.policy, self.classifier, self.prompts, self.point_cfg, use_reference=False,
                                  second_classifier=self.second, faithfulness_judge=self.faithfulness,
                                  progress=False, parallel=self.parallel)
        here = phase_metrics(out.samples, self.point_cfg)
        start = here if step == 0 else start_metrics(next(r for r in self.rows if r["step"] == 0))
        row = curve_point(step, start, here, len(self.prompts))
        row["quality_failed"] = curve_quality_failures(row, self.cfg.thresholds)
        best = curve_summary(self.rows)["selected"]
        row["seconds"] = time.time() - t
        row = rf.jsonable(row)
        rf.validate_curve_row(row)
        self.rows.append(row)
        if self.main:
            rf.append_jsonl(self.path, row)
        new_best = (step > 0 and not row["quality_failed"] and row["second_improvement"] is not None
                    and (best is None or row["second_improvement"] > best["second_improvement"]))
        if new_best and self.main:
            write_selected(self.run_dir, step, self.policy.save_pretrained)
        self.parallel.wait()
        self.seconds += time.time() - t
        gap = row["second_improvement"]
        self.echo(f"curve step {step}: KL {row['kl']:.2f}, improvement {_pct(row['improvement'])} (reward model), "
                  f"{_pct(gap)} (judge)" + (" [selected]" if new_best else "")
                  + (f" [fails {', '.join(row['quality_failed'])}]" if row["quality_failed"] else ""))
        return row

    def summary(self, final_step: int) -> dict | None:
        """``metrics.curve`` (None without a curve)."""
        if not self.enabled:
            return None
        return summarize(self.rows, self.cfg, self.run_dir, final_step)


def _pct(value) -> str:
    return "not measured" if value is None else f"{100 * value:.1f}%"
