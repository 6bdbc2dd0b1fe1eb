"""The jobs: each executes a :class:`harness.plan.RunPlan` and ends with one assembly of its results, one write
and one render. :mod:`.run` (evaluate before, PPO, evaluate after, verdict), :mod:`.evaluate` (eval-only),
:mod:`.warm_start` (the supervised warm start), :mod:`.baseline` (several seeds, then a baseline file)."""
