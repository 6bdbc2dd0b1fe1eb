"""Numerical faults in one PPO step (``harness.ppo.step``, issue 7): a NaN logit, a NaN value, a NaN gradient or
an update that makes a weight non-finite skips the step and leaves every trainable weight, the optimizer state
and the running score moments as they were (``test_ppo_step.py`` covers non-finite scores and a non-finite loss
in a later mini-batch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.config import PolicyConfig, PPOConfig
from suites.weights import trainable_state_dict

FX = Path(__file__).resolve().parents[2] / "fixtures" / "parity"

def _load_policy():
    from harness.models import load_policy

    torch.manual_seed(0)
    return load_policy(PolicyConfig(model=str(FX / "model"), adapter=str(FX / "adapter"), dtype="float32"))


@pytest.fixture(scope="module")
def batch():
    b = json.loads((FX / "batch.json").read_text())
    return ([torch.tensor(q) for q in b["queries"]], [torch.tensor(r[1:]) for r in b["responses"]],
            torch.tensor(b["scores"], dtype=torch.float32))


def _step(policy, optimizer, kl_ctl, batch, config, running):
    """One ppo_step with score scaling on, so that the running moments are in play (and must be restored)."""
    from harness.ppo.step import PPOState, ScoreOptions, StepSettings, TRLQuirks, ppo_step, random_orders

    queries, responses, scores = batch
    settings = StepSettings(config, pad_token_id=0, decoder_start_token_id=0, score_options=ScoreOptions(scaling=True))
    state = PPOState(optimizer, kl_ctl, settings, running, TRLQuirks.from_config(config))
    return ppo_step(policy, state, queries, responses, scores,
                    orders=random_orders(len(queries), torch.Generator().manual_seed(0)))


def _opt_state(optimizer) -> dict:
    out = {}
    for i, st_ in optimizer.state_dict()["state"].items():
        for k, v in st_.items():
            out[f"{i}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _differs(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]


@pytest.fixture
def trained():
    """A policy, its optimizer (after one good step, so that Adam has state), KL controller, running moments."""
    from harness.ppo import core
    from harness.ppo.step import make_optimizer

    policy = _load_policy()
    config = PPOConfig(batch_size=8, mini_batch_size=4, learning_rate=1e-3)
    optimizer = make_optimizer(policy, config)
    kl_ctl = core.make_kl_controller(True, 0.2, 6.0, 10000.0)
    running = core.RunningMoments()
    return policy, optimizer, kl_ctl, running, config


def _assert_untouched(policy, optimizer, kl_ctl, running, run):
    weights, opt = trainable_state_dict(policy), _opt_state(optimizer)
    beta, moments = kl_ctl.value, running.state_dict()
    stats = run()
    assert stats["skipped"] == 1.0, stats
    assert _differs(weights, trainable_state_dict(policy)) == []
    assert _differs(opt, _opt_state(optimizer)) == []
    assert kl_ctl.value == beta and running.state_dict() == moments
    assert all(p.grad is None for p in policy.trainable_parameters())
    return stats


def _skipped_with(trained, batch, install) -> dict:
    """One good step (so Adam has state), then a step with the fault ``install(policy)`` puts in place (a hook
    handle, removed afterwards): the step must be skipped and leave everything untouched. Returns its stats."""
    policy, optimizer, kl_ctl, running, config = trained
    _step(policy, optimizer, kl_ctl, batch, config, running)
    handle = install(policy)
    try:
        return _assert_untouched(policy, optimizer, kl_ctl, running,
                                 lambda: _step(policy, optimizer, kl_ctl, batch, config, running))
    finally:
        handle.remove()


def test_nan_logits_skip_the_step(trained, batch):
    stats = _skipped_with(trained, batch, lambda policy: policy.base_model.lm_head.register_forward_hook(
        lambda m, i, out: out * float("nan")))
    assert stats["skip_reason"] == "non-finite loss"
    policy, optimizer, kl_ctl, running, config = trained
    assert _step(policy, optimizer, kl_ctl, batch, config, running)["skipped"] == 0.0  # and training goes on


def test_inf_logits_skip_the_step(trained, batch):
    _skipped_with(trained, batch, lambda policy: policy.base_model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_fill(-1, torch.tensor([3]), float("inf"))))


def test_nan_values_skip_the_step(trained, batch):
    stats = _skipped_with(trained, batch, lambda policy: policy.value_head.register_forward_hook(
        lambda m, i, out: out * float("nan")))
    assert stats["skip_reason"] == "non-finite loss"


def test_nan_gradient_skips_the_step(trained, batch):
    def nan_gradient(policy):
        param = next(p for n, p in policy.named_parameters() if "lora_A" in n and p.requires_grad)
        return param.register_hook(lambda g: torch.full_like(g, float("nan")))

    stats = _skipped_with(trained, batch, nan_gradient)
    assert stats["skip_reason"] == "non-finite gradient"


def test_an_update_that_makes_a_weight_non_finite_is_undone(trained, batch):
    import dataclasses

    policy, optimizer, kl_ctl, running, config = trained
    _step(policy, optimizer, kl_ctl, batch, config, running)
    config = dataclasses.replace(config, mini_batch_size=8)  # one optimizer step: no later loss to catch it
    for group in optimizer.param_groups:
        group["lr"] = float("inf")
    try:
        stats = _assert_untouched(policy, optimizer, kl_ctl, running,
                                  lambda: _step(policy, optimizer, kl_ctl, batch, config, running))
    finally:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate
    assert stats["skip_reason"] == "non-finite weights after the update"


def test_a_skipped_step_logs_no_nan_into_its_statistics(trained, batch):
    from harness.results import jsonable

    policy, optimizer, kl_ctl, running, config = trained
    queries, responses, scores = batch
    bad = scores.clone()
    bad[0] = float("nan")
    stats = _step(policy, optimizer, kl_ctl, (queries, responses, bad), config, running)
    assert stats["skipped"] == 1.0 and stats["skip_reason"] == "non-finite score"
    json.dumps(jsonable(stats), allow_nan=False)  # the row train_stats.jsonl gets is strict JSON
