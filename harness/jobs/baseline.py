"""``detox-harness baseline``: one run per seed (into ``output.dir``), then the baseline file of them."""

from __future__ import annotations

import copy
from pathlib import Path

from ..plan import RunPlan, plan_run
from ..rundir import default_run_id
from .run import run


def make_baseline(plan: RunPlan, *, progress: bool = True, echo=print) -> tuple[Path, dict]:
    """Execute a baseline plan (:func:`harness.plan.plan_baseline`): a run per seed, then the file."""
    from .. import baselines

    runs = []
    for seed in plan.seeds:
        seeded = copy.deepcopy(plan.cfg)
        seeded.seed = seed
        seeded.output.run_id = None
        run_dir = Path(seeded.output.dir) / f"{default_run_id(seeded)}-baseline"
        echo(f"baseline: seed {seed} -> {run_dir}")
        # each seed evaluates its own "before" (no cache): where a GPU's kernels are nondeterministic, the baseline
        # must see the spread of "before" that a later run's fresh evaluation will show
        outcome = run(plan_run(seeded, output=run_dir, cache=False, echo=echo), progress=progress, echo=echo)
        if outcome.interrupted:
            raise KeyboardInterrupt
        runs.append(outcome.results)
    data = baselines.build_baseline(runs)
    return baselines.write_baseline(plan.output, data, force_regen=plan.force_regen), data
