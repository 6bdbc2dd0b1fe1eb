"""What a run or an evaluation loads before it generates anything: the policy, the judges, the prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import HarnessConfig


@dataclass
class RunInputs:
    device: object
    policy: object
    classifier: object
    second: object
    data: object
    seconds: float
    faithfulness: object = None  # the faithfulness judge (harness.faithfulness); None: eval.faithfulness_model is null


def load_inputs(loads: HarnessConfig, *, min_train_rows: int = 1, device=None) -> RunInputs:
    """Seed torch with the run seed (the fresh LoRA's initialization depends on it), then load the policy, the
    reward classifier, the optional second judge, the optional faithfulness judge and the prompts (at least
    ``eval.num_samples`` test rows), from the plan's concrete locations (``plan.loads``).
    ``device``: the process's device of a data-parallel run (accelerate's), instead of ``loads.device``."""
    import torch

    from ..data import build_prompts
    from ..faithfulness import load_faithfulness_judge
    from ..models import load_policy, resolve_device
    from ..toxicity import load_judges

    t = time.time()
    torch.manual_seed(loads.seed)
    device = device if device is not None else resolve_device(loads.device)
    policy = load_policy(loads.policy, device=device)
    classifier, second = load_judges(loads, device)
    faithfulness = load_faithfulness_judge(loads, device)
    data = build_prompts(loads.data, policy.tokenizer, min_test_rows=loads.eval.num_samples or 1,
                         min_train_rows=min_train_rows)
    return RunInputs(device, policy, classifier, second, data, time.time() - t, faithfulness)
