"""``detox-harness eval``: evaluate the base model, an adapter or a checkpoint; write the run files and the report."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from .. import provenance, rundir
from .. import results as rf
from ..metrics import EvalOutput
from ..plan import RunPlan
from .inputs import load_inputs


def evaluate(plan: RunPlan, *, progress: bool = True) -> tuple[Path, Path | None]:
    """Execute an evaluation plan (:func:`harness.plan.plan_eval`); returns (run directory, report page or None).

    Without a target, "before" is the reference and "after" the same evaluation (a fresh LoRA adapter does not
    change the base, so evaluating it again would reproduce the same samples; ``timings.eval_after_s`` is 0).
    With a target, "before" is the reference (adapter off) and "after" the target, on the same prompts with the
    same seeds.
    """
    from ..evaluation import evaluate_policy

    cfg, run_dir = plan.cfg, plan.run_dir
    t_start = time.time()
    with rundir.Claim(run_dir, "eval", rundir.require_new_run) as claim:
        try:
            inputs = load_inputs(plan.loads)
        except BaseException:
            claim.abandon()
            raise
        timings: dict[str, float] = {"load_s": inputs.seconds}
        judges = dict(second_classifier=inputs.second, faithfulness_judge=inputs.faithfulness, progress=progress)
        before = evaluate_policy(inputs.policy, inputs.classifier, inputs.data.test, cfg, use_reference=True, **judges)
        if plan.target is None:
            after = EvalOutput(metrics=copy.deepcopy(before.metrics), samples=copy.deepcopy(before.samples),
                               seconds=0.0)
        else:
            after = evaluate_policy(inputs.policy, inputs.classifier, inputs.data.test, cfg, use_reference=False,
                                    **judges)
        timings.update(eval_before_s=before.seconds, eval_after_s=after.seconds, total_s=time.time() - t_start)
        results, samples = rf.build_results(
            cfg, before, after, run_id=run_dir.name, training=None, timings=timings, device=str(inputs.device),
            extra={"data": inputs.data.stats, "worlds": plan.worlds,
                   "provenance": {"models": provenance.resolve_missing(plan.models),
                                  "data": {"fingerprint": provenance.rows_fingerprint([inputs.data.test]),
                                           "train_rows": 0, "test_rows": len(inputs.data.test)}},
                   "target": None if plan.target is None else str(plan.target)})
        cfg.save(run_dir / rf.CONFIG_FILE)
        rf.write_run_files(run_dir, results, samples)
        provenance.write_manifest(run_dir)
        page = None
        if cfg.output.report:
            from ..report import render_index, render_run

            page = render_run(run_dir)
            render_index(run_dir.parent)
    return run_dir, page
