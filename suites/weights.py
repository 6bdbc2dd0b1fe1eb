"""The trainable weights of a policy as a dict of detached copies: what tests compare before and after a step,
a checkpoint or a resume (shared by the unit and integration suites; the package itself never needs it)."""

from __future__ import annotations

import torch


def trainable_state_dict(policy) -> dict[str, torch.Tensor]:
    """``adapter.<peft key>`` (or ``model.<name>``) and ``value_head.<name>`` tensors, detached copies."""
    out: dict[str, torch.Tensor] = {}
    if policy.is_peft:
        from peft import get_peft_model_state_dict

        for k, v in get_peft_model_state_dict(policy.model).items():
            out[f"adapter.{k}"] = v.detach().clone()
    else:
        for k, v in policy.model.named_parameters():
            if v.requires_grad:
                out[f"model.{k}"] = v.detach().clone()
    for k, v in policy.value_head.state_dict().items():
        out[f"value_head.{k}"] = v.detach().clone()
    return out
