"""``detox-harness curve``: the over-optimisation curve of a finished run, from its saved checkpoints.

For a run made before the curve existed (or with ``eval.curve_every`` set anew): step 0 is the starting policy as
the run loaded it, every later point the checkpoint of a due step (:func:`harness.curve.is_due`: a multiple of
``eval.curve_every``, and the last one). Points are made as a run makes them (:class:`harness.curve.Curve`), into
the same ``curve.jsonl``, and ``selected/`` holds the selected checkpoint's adapter. ``results.json`` and its
verdict are left as the run wrote them; the run's page is rendered again with the curve.
"""

from __future__ import annotations

from pathlib import Path

from .. import results as rf
from ..errors import HarnessError
from ..files import DirectoryLock
from ..plan import RunPlan
from .inputs import load_inputs


def make_curve(plan: RunPlan, *, echo=print) -> tuple[list[dict], dict, Path]:
    """Execute a curve plan (:func:`harness.plan.plan_curve`): returns the rows, ``metrics.curve`` and the page."""
    from ..curve import Curve, is_due, summarize
    from ..ppo.checkpoints import complete_checkpoints, load_adapter

    cfg, run_dir = plan.cfg, plan.run_dir
    with DirectoryLock(run_dir, "curve", field="run_dir"):
        checkpoints = complete_checkpoints(run_dir / rf.CHECKPOINTS_DIR)
        last = max(checkpoints)
        due = [s for s in sorted(checkpoints) if s > 0 and is_due(s, cfg.eval.curve_every, last)]
        skipped = [s for s in range(cfg.eval.curve_every, last, cfg.eval.curve_every) if s not in checkpoints]
        if skipped:
            echo(f"curve: no checkpoint of step {', '.join(map(str, skipped))} (ppo.checkpoint_every = "
                 f"{cfg.ppo.checkpoint_every}): those points are left out")
        inputs = load_inputs(plan.loads)
        if not inputs.policy.is_peft:
            raise HarnessError("the curve of saved checkpoints reads LoRA adapters", field="policy.use_lora",
                               value=cfg.policy.use_lora, fix="make the curve during the run (eval.curve_every)")
        test = inputs.data.test
        curve = Curve(cfg, run_dir, inputs.policy, inputs.classifier, test, second=inputs.second,
                      faithfulness=inputs.faithfulness, echo=echo)
        curve.start(None)
        curve.point(0)
        for step in due:
            load_adapter(checkpoints[step], inputs.policy)
            curve.point(step)
        summary = summarize(curve.rows, cfg, run_dir, last)
        from ..report import render_index, render_run

        page = render_run(run_dir)  # the run's page again, with its curve (as detox-harness report would)
        render_index(run_dir.parent)
    return curve.rows, summary, page
