"""``ppo_step`` and ``rollout.generate`` on a tiny T5 built in this file (no downloads, CPU, seconds).

What is asserted here (``test_parity.py`` already proves the step's numbers against TRL's):

* a step moves only the LoRA and value-head weights: every base weight stays bit-identical, and the
  reference log-probs (adapter disabled) do not move;
* the harness's action mask counts every generated token, ``TRLQuirks.mask_first_action`` masks the first
  one (TRL 0.11.4);
* a non-finite score, or a non-finite loss in a later mini-batch, skips the whole step and restores every
  trainable weight, the optimizer state and the quirks' state bit for bit;
* same seed, same statistics and weights;
* ``TRLQuirks`` live in the caller's ``PPOState``: TRL's one-shot gradient clipping spans steps, survives a
  trainer checkpoint, and ``ppo.trl_compat`` without the quirks is refused; ``ScoreOptions`` reach the scores
  (``suites/integration/test_ppo_tiny.py`` checks them through the trainer); row orders are checked;
* ``generate``: per-row ``max_new_tokens``, no decoder start token, cut after the first EOS, a row's
  sample depends on its prompt and seed only, right padding of the encoder, eval mode while sampling;
* ``count_parameters`` on the flan-t5-base architecture with the reference's LoRA gives REFERENCE.md's
  figures.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from tiny_t5 import BATCH, make_policy, random_prompts

from harness.config import PPOConfig, RewardConfig, load_config
from harness.models import PolicyWithValueHead, ValueHead, count_parameters
from harness.ppo.batch import pad_right, predicting, prepare_inputs, response_mask
from harness.ppo.core import SampledDistribution
from harness.ppo.rollout import SeededSampler, cut_after_eos, generate
from harness.ppo.sampling import CounterNoise
from harness.ppo.step import PPOState, ScoreOptions, TRLQuirks, ppo_step, random_orders
from suites.weights import trainable_state_dict

# REFERENCE.md, "Pipeline" step 2: flan-t5-base + LoRA (r=32, alpha 32, q and v, dropout 0.05) as peft reports it.
REFERENCE_TRAINABLE = 3_538_944
REFERENCE_TOTAL = 251_116_800
REFERENCE_PERCENT = 1.41  # "(1.41%)": two decimals
REFERENCE_VALUE_HEAD = 769  # 768 -> 1
# flan-t5-base's published config.json (the architecture only; the weights are never needed to count)
FLAN_T5_BASE = dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                    vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128)

MAX_RESPONSE = 12  # longest response the step tests generate
LONG_LIMIT = 40  # generate tests: long enough that the random 96-token model samples EOS in some rows
ROWS = 16


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def batch(tiny_t5_dir):
    """(queries, responses, scores) of BATCH rows: responses sampled by the harness's rollout."""
    policy = make_policy(tiny_t5_dir)
    prompts = random_prompts(BATCH, seed=1)
    limits = [1 + (3 * i) % MAX_RESPONSE for i in range(BATCH)]  # includes a one-token response
    roll = generate(policy.model, policy.tokenizer, prompts, max_new_tokens=limits, seeds=range(BATCH))
    scores = torch.linspace(-2.0, 2.0, BATCH)
    return [torch.tensor(p) for p in prompts], roll.responses, scores


def run_step(policy, batch, config: PPOConfig, state: PPOState | None = None, seed: int = 0, scores=None,
             orders=None, score_options: ScoreOptions = ScoreOptions(),
             distribution: SampledDistribution = SampledDistribution()) -> tuple[dict, PPOState]:
    """One ``ppo_step`` on ``batch``; a fresh ``PPOState`` (of ``config``, ``score_options`` and the rollout's
    ``distribution``) unless one is given. Returns (stats, state)."""
    queries, responses, default_scores = batch
    state = state or PPOState.create(policy, config, rollout=distribution, score_options=score_options)
    assert state.settings.config == config, "a given state runs with its own config"
    stats = ppo_step(policy, state, queries, responses, default_scores if scores is None else scores,
                     orders=orders if orders is not None else random_orders(len(queries),
                                                                            torch.Generator().manual_seed(seed)))
    return stats, state


def step_config(**kw) -> PPOConfig:
    return PPOConfig(batch_size=BATCH, **kw)


def reference_logits(policy, batch) -> torch.Tensor:
    queries, responses, _ = batch
    inputs = prepare_inputs(queries, responses, policy.tokenizer.pad_token_id, policy.config.decoder_start_token_id,
                            policy.device)
    return policy.reference_logits(**inputs)


def policy_logits(policy, batch) -> torch.Tensor:
    queries, responses, _ = batch
    inputs = prepare_inputs(queries, responses, policy.tokenizer.pad_token_id, policy.config.decoder_start_token_id,
                            policy.device)
    with torch.no_grad():
        return policy(**inputs)[0]


def frozen_state_fingerprint(policy: PolicyWithValueHead) -> dict[str, torch.Tensor]:
    """Copies of every frozen (base) parameter, to prove training never touches them."""
    return {k: v.detach().clone() for k, v in policy.model.named_parameters() if not v.requires_grad}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (or missing on one side)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{pid}.{name}"] = torch.as_tensor(value).clone()
    return out


def timeless(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


# ------------------------------------------------------------------------------------ the step

def test_step_moves_only_the_adapter_and_the_value_head(tiny_t5_dir, batch):
    policy = make_policy(tiny_t5_dir)
    base_before = frozen_state_fingerprint(policy)
    trained_before = trainable_state_dict(policy)
    ref_before = reference_logits(policy, batch)
    logits_before = policy_logits(policy, batch)
    assert base_before and trained_before
    assert any("lora_A" in k for k in trained_before) and any("lora_B" in k for k in trained_before)
    assert {k for k in trained_before if k.startswith("value_head.")} == {"value_head.summary.weight",
                                                                          "value_head.summary.bias"}

    config = step_config()
    stats, state = run_step(policy, batch, config)
    assert stats["skipped"] == 0.0
    # a fresh LoRA has B = 0, so A gets no gradient in the first step: a second step moves every tensor
    run_step(policy, batch, config, state, seed=1)

    assert same_state(base_before, frozen_state_fingerprint(policy)) == [], "a base weight moved"
    unchanged = sorted(set(trained_before) - set(same_state(trained_before, trainable_state_dict(policy))))
    assert unchanged == [], f"trainable tensors that did not move: {unchanged}"
    assert torch.equal(reference_logits(policy, batch), ref_before), "the reference moved with training"
    assert not torch.equal(policy_logits(policy, batch), logits_before), "the policy's forward ignores the adapter"
    # the optimizer holds exactly the trainable parameters, and those are LoRA + value head
    opt_params = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in policy.trainable_parameters()}
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("value_head.") for n in names), names


def test_response_mask_counts_every_generated_token():
    responses = [torch.tensor([5]), torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7, 8, 1])]
    lengths = torch.tensor([len(r) for r in responses])
    queries = [torch.tensor([9, 9, 1])] * len(responses)
    start = 0
    inputs = prepare_inputs(queries, responses, pad_token_id=0, decoder_start_token_id=start, device="cpu")
    dec = inputs["decoder_input_ids"]
    assert (dec[:, 0] == start).all(), "the decoder input starts with the decoder start token"
    for i, r in enumerate(responses):
        assert torch.equal(dec[i, 1:1 + len(r)], r)
    harness = response_mask(inputs["decoder_attention_mask"])
    assert harness.shape == (len(responses), int(lengths.max()))
    assert torch.equal(harness.sum(-1), lengths), "every generated token is an action"
    assert (harness[:, 0] == 1).all(), "the first generated token is an action"
    trl = response_mask(inputs["decoder_attention_mask"], mask_first_action=True)
    assert torch.equal(trl.sum(-1), lengths - 1), "TRL 0.11.4 masks the first generated token"
    assert (trl[:, 0] == 0).all()
    assert torch.equal(trl[:, 1:], harness[:, 1:])


def test_one_token_responses_train_under_the_harness_mask(tiny_t5_dir, batch):
    """TRL's mask leaves a one-token response with no action (its compute_rewards crashed); the harness trains it."""
    queries, _, scores = batch
    one = [torch.tensor([7]) for _ in queries]
    policy = make_policy(tiny_t5_dir)
    before = trainable_state_dict(policy)
    stats, _ = run_step(policy, (queries, one, scores), step_config())
    assert stats["skipped"] == 0.0 and stats["tokens/responses_len_mean"] == 1.0
    assert math.isfinite(stats["objective/kl"]) and math.isfinite(stats["ppo/loss/total"])
    moved = same_state(before, trainable_state_dict(policy))
    assert "value_head.summary.weight" in moved and any("lora_B" in k for k in moved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_score_skips_the_step(tiny_t5_dir, batch, bad):
    policy = make_policy(tiny_t5_dir)
    config = step_config()
    _, state = run_step(policy, batch, config)  # a good step first: the optimizer has state
    weights, opt, beta = trainable_state_dict(policy), optimizer_state(state.optimizer), state.kl_ctl.value
    scores = batch[2].clone()
    scores[3] = bad
    stats, _ = run_step(policy, batch, config, state, scores=scores)
    assert stats["skipped"] == 1.0 and stats["skip_reason"] == "non-finite score"
    assert same_state(weights, trainable_state_dict(policy)) == []
    assert same_state(opt, optimizer_state(state.optimizer)) == []
    assert state.kl_ctl.value == beta


@contextlib.contextmanager
def nan_value_in_minibatch(policy, nth: int, record=lambda: None):
    """The value head gives NaN in the optimisation's ``nth`` mini-batch forward, so that mini-batch's loss is NaN.

    Those are the only forwards with gradients on (the old log-probs and values are computed without), so
    the fault lands in mini-batch ``nth`` whatever the order. Yields a list that gets ``record()`` at the
    fault, i.e. after the earlier mini-batches' optimizer steps.
    """
    seen, at_fault = [], []

    def hook(module, inputs, out):
        if not torch.is_grad_enabled():
            return None
        seen.append(1)
        if len(seen) != nth:
            return None
        at_fault.append(record())
        return out * float("nan")

    handle = policy.value_head.register_forward_hook(hook)
    try:
        yield at_fault
    finally:
        handle.remove()


def test_non_finite_loss_in_a_later_minibatch_restores_everything(tiny_t5_dir, batch):
    """The first mini-batch has already stepped Adam when the second one's loss is NaN: all of it is undone."""
    policy = make_policy(tiny_t5_dir)
    config = step_config()
    assert config.ppo_epochs == 1 and config.gradient_accumulation_steps == 1 and BATCH == 2 * config.mini_batch_size
    _, state = run_step(policy, batch, config)
    weights, opt = trainable_state_dict(policy), optimizer_state(state.optimizer)
    with nan_value_in_minibatch(policy, 2, record=lambda: trainable_state_dict(policy)) as at_fault:
        stats, _ = run_step(policy, batch, config, state)
    assert stats["skipped"] == 1.0 and stats["skip_reason"] == "non-finite loss"
    assert len(at_fault) == 1 and same_state(weights, at_fault[0]) != [], "the first mini-batch had stepped Adam"
    assert same_state(weights, trainable_state_dict(policy)) == []
    assert same_state(opt, optimizer_state(state.optimizer)) == []


def test_same_seed_same_statistics(tiny_t5_dir, batch):
    config = step_config(ppo_epochs=2)
    runs = []
    for _ in range(2):
        policy = make_policy(tiny_t5_dir, seed=3)
        state, steps = None, []
        for s in range(2):
            stats, state = run_step(policy, batch, config, state, seed=s)
            steps.append(timeless(stats))
        runs.append((steps, trainable_state_dict(policy)))
    (steps_a, weights_a), (steps_b, weights_b) = runs
    assert steps_a == steps_b
    assert same_state(weights_a, weights_b) == []
    # and the statistics are not trivially constant: a different mini-batch order changes them
    policy = make_policy(tiny_t5_dir, seed=3)
    other, _ = run_step(policy, batch, config, seed=99)
    assert timeless(other) != steps_a[0]


# ------------------------------------------------------------------------------------ the update's forward pass

def test_the_last_decoder_token_is_left_out_without_changing_a_position_read(tiny_t5_dir, batch):
    policy = make_policy(tiny_t5_dir)
    queries, responses, _ = batch
    inputs = prepare_inputs(queries, responses, 0, policy.config.decoder_start_token_id, "cpu")
    part, labels = predicting(inputs)
    assert torch.equal(labels, inputs["decoder_input_ids"][:, 1:])
    with torch.no_grad():
        full_logits, full_values = policy(**inputs)
        logits, values = policy(**part)
    assert logits.shape[1] == labels.shape[1] == inputs["decoder_input_ids"].shape[1] - 1
    assert torch.allclose(logits, full_logits[:, :-1], atol=1e-6)
    assert torch.allclose(values, full_values[:, :-1], atol=1e-6)


def test_a_batch_of_empty_responses_is_refused():
    inputs = prepare_inputs([torch.tensor([5, 1])], [torch.tensor([], dtype=torch.long)], 0, 0, "cpu")
    with pytest.raises(ValueError, match="every response is empty"):
        predicting(inputs)


def test_a_mini_batch_of_empty_responses_skips_the_step_and_restores_the_weights(tiny_t5_dir):
    policy = make_policy(tiny_t5_dir)
    before = trainable_state_dict(policy)
    queries = [torch.tensor(p) for p in random_prompts(2, seed=3)]
    responses = [torch.tensor([7, 9, 1]), torch.tensor([], dtype=torch.long)]
    config = PPOConfig(batch_size=2, mini_batch_size=1)
    stats, _ = run_step(policy, (queries, responses, torch.tensor([1.0, -1.0])), config,
                        orders=iter([[0, 1]]))  # the first mini-batch steps, the second has no action
    assert stats["skipped"] == 1.0 and "without an action" in stats["skip_reason"]
    assert same_state(before, trainable_state_dict(policy)) == []


def test_encoding_each_prompt_alone_gives_the_batchs_outputs_and_gradients(tiny_t5_dir, batch):
    policy = make_policy(tiny_t5_dir)
    queries, responses, _ = batch
    part, _ = predicting(prepare_inputs(queries, responses, 0, policy.config.decoder_start_token_id, "cpu"))
    lengths = part["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max(), "precondition: prompts of different lengths"
    outputs, grads = {}, {}
    for chunk in (None, 1):
        policy.zero_grad(set_to_none=True)
        logits, values = policy(**part, encoder_chunk=chunk)
        (logits.logsumexp(-1).sum() + values.sum()).backward()
        outputs[chunk] = logits.detach()
        grads[chunk] = [p.grad.clone() for p in policy.trainable_parameters() if p.grad is not None]
    assert torch.allclose(outputs[1], outputs[None], atol=1e-5)
    assert len(grads[1]) == len(grads[None]) > 0
    for a, b in zip(grads[1], grads[None]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_on_a_cpu_each_prompt_is_encoded_alone():
    from harness.ppo.step import _encoder_chunk

    mask = torch.ones((4, 30), dtype=torch.long)
    assert _encoder_chunk(mask) == 1
    assert _encoder_chunk(mask.to("meta")) is None, "off the CPU the mini-batch is encoded together"


# ------------------------------------------------------------------------------------ TRL quirks, options, orders

TINY_CLIP = 1e-4  # a gradient-norm bound every optimizer step of these tests exceeds: clipping always changes it


def test_trl_quirks_follow_trl_compat():
    off, on = TRLQuirks.from_config(step_config()), TRLQuirks.from_config(step_config(trl_compat=True))
    assert off == TRLQuirks() and not any(vars(off).values())
    assert on.mask_first_action and on.leak_whitened_padding and on.zero_loss_adam_step_on_ratio_skip
    assert on.clip_only_first_minibatch and not on.clipped_once


def test_trl_compat_clips_only_the_first_optimizer_step_of_the_states_life(tiny_t5_dir, batch):
    """TRL 0.11.4 clips the first optimizer step of the trainer's life and never again: across ppo_step calls."""
    clipping = step_config(trl_compat=True, max_grad_norm=TINY_CLIP)
    never = step_config(trl_compat=True)  # max_grad_norm None

    def two_steps(config, clipped_once=False, policy_seed=0):
        policy = make_policy(tiny_t5_dir, seed=policy_seed)
        state = PPOState.create(policy, config)
        state.quirks.clipped_once = clipped_once
        stats = [timeless(run_step(policy, batch, config, state, seed=s)[0]) for s in range(2)]
        return stats, trainable_state_dict(policy), state

    fresh_stats, fresh_weights, fresh_state = two_steps(clipping)
    assert fresh_state.quirks.clipped_once, "the first optimizer step clipped and the state remembers it"
    # a state that has clipped before never clips again: exactly the steps of a run without max_grad_norm
    late_stats, late_weights, _ = two_steps(clipping, clipped_once=True)
    never_stats, never_weights, never_state = two_steps(never)
    assert late_stats == never_stats and same_state(late_weights, never_weights) == []
    assert not never_state.quirks.clipped_once
    # control: the one clipped step of the fresh state did change the update (the bound binds)
    assert same_state(fresh_weights, never_weights) != []
    # and the harness (no quirk) clips every optimizer step: different again from clipping the first one only
    _, harness_weights, _ = two_steps(step_config(max_grad_norm=TINY_CLIP))
    assert same_state(harness_weights, fresh_weights) != []


def test_a_skipped_step_restores_the_quirks_state(tiny_t5_dir, batch):
    """The first mini-batch clipped (TRL's one shot) before the second one's loss was NaN: the shot is not spent."""
    config = step_config(trl_compat=True, max_grad_norm=TINY_CLIP)
    policy = make_policy(tiny_t5_dir)
    state = PPOState.create(policy, config)
    with nan_value_in_minibatch(policy, 2, record=lambda: state.quirks.clipped_once) as at_fault:
        stats, _ = run_step(policy, batch, config, state)
    assert stats["skipped"] == 1.0 and stats["skip_reason"] == "non-finite loss"
    assert at_fault == [True], "the first mini-batch had clipped"
    assert not state.quirks.clipped_once
    run_step(policy, batch, config, state)  # control: a good step spends it
    assert state.quirks.clipped_once


def test_trl_compat_without_the_quirks_is_refused(tiny_t5_dir, batch):
    policy = make_policy(tiny_t5_dir)
    config = step_config(trl_compat=True)
    harness_state = PPOState.create(policy, config)
    harness_state.quirks = TRLQuirks()  # quirks off
    before = trainable_state_dict(policy)
    with pytest.raises(ValueError, match="trl_compat"):
        run_step(policy, batch, config, harness_state)
    assert same_state(before, trainable_state_dict(policy)) == []
    assert run_step(policy, batch, config, PPOState.create(policy, config))[0]["skipped"] == 0.0


@pytest.mark.parametrize("orders, message", [
    ([[0, 0, 1, 2, 3, 4, 5, 6]], "permutation"),  # a repeated row
    ([list(range(BATCH - 1))], "permutation"),  # a missing row
    ([list(range(BATCH))], "ran out"),  # one order for two epochs
], ids=["repeated", "short", "ran-out"])
def test_bad_row_orders_are_refused_and_leave_the_weights(tiny_t5_dir, batch, orders, message):
    policy = make_policy(tiny_t5_dir)
    config = step_config(ppo_epochs=2)
    _, state = run_step(policy, batch, config)
    weights, opt = trainable_state_dict(policy), optimizer_state(state.optimizer)
    with pytest.raises(ValueError, match=message):
        run_step(policy, batch, config, state, orders=iter(orders))
    # "ran out" failed in the second epoch, after the first had stepped Adam: that was undone too
    assert same_state(weights, trainable_state_dict(policy)) == []
    assert same_state(opt, optimizer_state(state.optimizer)) == []


def test_score_options_are_declared_and_checked():
    reward = RewardConfig(score_scaling=True, score_norm=True, score_clip=2.5)
    assert ScoreOptions.from_reward_config(reward) == ScoreOptions(scaling=True, norm=True, clip=2.5)
    assert ScoreOptions.from_reward_config(RewardConfig()) == ScoreOptions(scaling=False, norm=False, clip=None)
    with pytest.raises(ValueError, match="norm needs scaling"):
        ScoreOptions(norm=True)
    with pytest.raises(ValueError, match="clip"):
        ScoreOptions(clip=0.0)


def test_score_options_change_the_scores_ppo_sees(tiny_t5_dir, batch):
    """One step per option from the same start; ``env/reward_*`` stay the raw scores."""
    queries, responses, raw = batch
    raw = raw * 3 + 1  # mean 1, std ~3.7: neither already normalised nor inside the clip
    seen = {}
    for name, options in {"none": ScoreOptions(), "scaled": ScoreOptions(scaling=True),
                          "normed": ScoreOptions(scaling=True, norm=True), "clipped": ScoreOptions(clip=2.0)}.items():
        stats, _ = run_step(make_policy(tiny_t5_dir), (queries, responses, raw), step_config(),
                            score_options=options)
        assert stats["env/reward_mean"] == pytest.approx(float(raw.mean()), rel=1e-6)
        assert stats["env/reward_std"] == pytest.approx(float(raw.std()), rel=1e-6)
        seen[name] = (stats["ppo/mean_scores"], stats["ppo/std_scores"], stats["ppo/loss/value"])
    assert seen["none"][:2] == pytest.approx((float(raw.mean()), float(raw.std())), rel=1e-6)
    # the first batch's running std is its own std: scaling gives std 1, norm also mean 0
    assert seen["scaled"][:2] == pytest.approx((float(raw.mean() / raw.std()), 1.0), rel=1e-5)
    assert seen["normed"][0] == pytest.approx(0.0, abs=1e-6) and seen["normed"][1] == pytest.approx(1.0, rel=1e-5)
    clipped = raw.clamp(-2.0, 2.0)
    assert seen["clipped"][:2] == pytest.approx((float(clipped.mean()), float(clipped.std())), rel=1e-6)
    # and the update itself used them: the value loss (fit to the returns, hence to the scores) differs
    assert len({v[2] for v in seen.values()}) == len(seen)


def test_the_trainer_owns_the_quirks_and_checkpoints_their_state(tiny_t5_dir, tmp_path):
    from harness.ppo.trainer import PPOTrainer

    cfg = load_config("tiny", overrides=["ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.trl_compat=true"])
    trainer = PPOTrainer(cfg, make_policy(tiny_t5_dir), None, list(range(16)), tmp_path)
    assert trainer.ppo_state.quirks == TRLQuirks.from_config(cfg.ppo) and trainer.ppo_state.quirks.mask_first_action
    trainer.ppo_state.quirks.clipped_once = True
    trainer.step = 1
    path = trainer.save_checkpoint()
    resumed = PPOTrainer(cfg, make_policy(tiny_t5_dir), None, list(range(16)), tmp_path)
    assert not resumed.ppo_state.quirks.clipped_once
    assert resumed.resume() == path and resumed.step == 1
    assert resumed.ppo_state.quirks.clipped_once, "a resumed TRL-compatible run would clip a second time"


# ------------------------------------------------------------------------------------ rollout

def reference_sample(model, prompt: list[int], seed: int, limit: int, eos: int, start: int) -> list[int]:
    """One prompt decoded step by step without ``generate``: the sampler's noise for ``seed``, stop at EOS."""
    sampler = SeededSampler([seed])
    enc = torch.tensor([prompt])
    dec = torch.tensor([[start]])
    with torch.no_grad():
        for _ in range(limit):
            logits = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec).logits[:, -1]
            token = int(sampler.perturb(logits.float(), dec.shape[1] - 1).argmax(-1))
            dec = torch.cat([dec, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
    return dec[0, 1:].tolist()


@pytest.fixture(scope="module")
def rollout_policy(tiny_t5_dir):
    return make_policy(tiny_t5_dir, seed=5)


@pytest.fixture(scope="module")
def long_rollout(rollout_policy):
    """ROWS prompts with per-row limits up to LONG_LIMIT, one generate call."""
    prompts = random_prompts(ROWS, seed=2)
    limits = [LONG_LIMIT - 2 * i for i in range(ROWS)]
    seeds = [1000 + i for i in range(ROWS)]
    tok = rollout_policy.tokenizer
    roll = generate(rollout_policy.model, tok, prompts, max_new_tokens=limits, seeds=seeds)
    return prompts, limits, seeds, roll


def test_generate_honours_per_row_limits_and_cuts_after_eos(rollout_policy, long_rollout):
    prompts, limits, seeds, roll = long_rollout
    eos = rollout_policy.tokenizer.eos_token_id
    ended = 0
    for resp, limit, n in zip(roll.responses, limits, roll.lengths):
        ids = resp.tolist()
        assert n == len(ids) <= limit
        assert eos not in ids[:-1], "a response goes on after its first EOS"
        if ids and ids[-1] == eos:
            ended += 1
        else:
            assert n == limit, "a response without EOS must run to its own max_new_tokens"
    assert 0 < ended < ROWS, "precondition: some rows end with EOS and some at their limit"


def test_generate_equals_step_by_step_decoding(rollout_policy, long_rollout):
    """No decoder start token, stop after the first EOS, each row its own limit and seed: as a plain loop."""
    prompts, limits, seeds, roll = long_rollout
    tok, cfg = rollout_policy.tokenizer, rollout_policy.config
    for i in range(ROWS):
        want = reference_sample(rollout_policy.model, prompts[i], seeds[i], limits[i], tok.eos_token_id,
                                cfg.decoder_start_token_id)
        assert roll.responses[i].tolist() == want, f"row {i}"
    assert roll.texts == tok.batch_decode([r.tolist() for r in roll.responses], skip_special_tokens=True)


def test_generate_without_eos_runs_to_each_limit(rollout_policy):
    prompts = random_prompts(6, seed=4)
    limits = [1, 2, 3, 5, 8, 13]
    roll = generate(rollout_policy.model, rollout_policy.tokenizer, prompts, max_new_tokens=limits,
                    seeds=range(6), min_new_tokens=max(limits))  # EOS suppressed until past every limit
    assert roll.lengths == limits
    assert all(rollout_policy.tokenizer.eos_token_id not in r.tolist() for r in roll.responses)


def test_a_rows_sample_depends_only_on_its_prompt_and_seed(rollout_policy):
    tok = rollout_policy.tokenizer
    target, seed, limit = random_prompts(1, seed=6, min_len=8, max_len=9)[0], 4242, 30
    short = random_prompts(2, seed=7, min_len=3, max_len=5)
    long = random_prompts(4, seed=8, min_len=25, max_len=40)
    a = generate(rollout_policy.model, tok, [target] + short, max_new_tokens=[limit, 3, 4], seeds=[seed, 1, 2])
    b = generate(rollout_policy.model, tok, long[:2] + [target] + long[2:], max_new_tokens=[40, 2, limit, 9, 40],
                 seeds=[7, 8, seed, 9, 10])
    assert a.responses[0].tolist() == b.responses[2].tolist()
    assert len(a.responses[0]) > 1, "precondition: a response long enough to mean something"
    # and the seed matters
    c = generate(rollout_policy.model, tok, [target], max_new_tokens=limit, seeds=[seed + 1])
    assert c.responses[0].tolist() != a.responses[0].tolist()


def test_generate_pads_the_encoder_on_the_right(rollout_policy, monkeypatch):
    import harness.ppo.rollout as rollout

    seen = {}
    real_decode = rollout.decode

    def spy_decode(model, enc_ids, enc_mask, **kwargs):
        seen.update(input_ids=enc_ids, attention_mask=enc_mask)
        return real_decode(model, enc_ids, enc_mask, **kwargs)

    monkeypatch.setattr(rollout, "decode", spy_decode)
    prompts = [[5, 6, 1], [7, 8, 9, 10, 11, 1], [12, 1]]
    generate(rollout_policy.model, rollout_policy.tokenizer, prompts, max_new_tokens=2, seeds=[0, 1, 2])
    ids, mask = seen["input_ids"].cpu(), seen["attention_mask"].cpu()
    pad = rollout_policy.tokenizer.pad_token_id
    for i, p in enumerate(prompts):
        n = len(p)
        assert ids[i, :n].tolist() == p, "prompt tokens first (right padding)"
        assert (ids[i, n:] == pad).all() and (mask[i, :n] == 1).all() and (mask[i, n:] == 0).all()
    # the PPO step's encoder inputs are right-padded the same way
    inputs = prepare_inputs([torch.tensor(p) for p in prompts], [torch.tensor([3])] * 3, pad, 0, "cpu")
    assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], mask)
    padded, m = pad_right([torch.tensor([4, 5]), torch.tensor([6])], pad_value=pad)
    assert padded.tolist() == [[4, 5], [6, pad]] and m.tolist() == [[1, 1], [1, 0]]


def test_generate_samples_in_eval_mode_and_restores_the_mode(tiny_t5_dir):
    """With dropout in the model, a rollout in train mode would differ from one in eval mode."""
    policy = make_policy(tiny_t5_dir, seed=5)
    for module in policy.model.modules():  # T5's own dropout (flan-t5: dropout_rate 0.1; this tiny T5: 0)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    prompts, limits = random_prompts(4, seed=9), [20, 20, 20, 20]
    policy.model.train()  # precondition: the dropout acts in train mode
    x = torch.tensor(prompts[0]).unsqueeze(0)
    torch.manual_seed(0)
    first = policy.model(input_ids=x, decoder_input_ids=x).logits
    assert not torch.equal(first, policy.model(input_ids=x, decoder_input_ids=x).logits)
    policy.model.eval()
    want = generate(policy.model, policy.tokenizer, prompts, max_new_tokens=limits, seeds=range(4)).responses
    policy.model.train()
    got = generate(policy.model, policy.tokenizer, prompts, max_new_tokens=limits, seeds=range(4)).responses
    assert policy.model.training, "generate must give back the mode it found"
    assert [r.tolist() for r in got] == [r.tolist() for r in want]


def test_a_sampled_pad_token_is_kept(rollout_policy, long_rollout):
    prompts, limits, seeds, roll = long_rollout
    pad = rollout_policy.tokenizer.pad_token_id
    hits = [(i, r.tolist().index(pad)) for i, r in enumerate(roll.responses) if pad in r.tolist()]
    assert hits, "precondition: the random model samples the pad id somewhere"
    i, pos = hits[0]
    # the same prompt and seed with the limit right after the sampled pad: the pad is the last action
    again = generate(rollout_policy.model, rollout_policy.tokenizer, [prompts[i]], max_new_tokens=pos + 1,
                     seeds=[seeds[i]])
    assert again.responses[0].tolist() == roll.responses[i][:pos + 1].tolist()
    # the function itself: a row with no EOS cut at its limit keeps all its tokens
    assert cut_after_eos(torch.tensor([7, pad, 9, 9]), eos_token_id=1, pad_token_id=pad, limit=2).tolist() == [7, pad]


# ------------------------------------------------------------------------------------ parameter count

def test_count_parameters_of_the_reference_architecture():
    """flan-t5-base + the reference's LoRA, on the meta device (no memory, no download): REFERENCE.md's figures."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    p = load_config("flan-t5-base").policy  # the preset's LoRA is the reference's
    assert (p.lora_r, p.lora_alpha, p.lora_target_modules) == (32, 32, ["q", "v"])
    config = T5Config(**FLAN_T5_BASE)
    with torch.device("meta"):
        base = T5ForConditionalGeneration(config)
        # transformers 5 builds every T5 with lm_head tied to the embeddings; flan-t5-base's checkpoint holds
        # both, so from_pretrained leaves them untied (as google/flan-t5-base ships): untie as loading does.
        if base.lm_head.weight is base.shared.weight:
            base.lm_head.weight = torch.nn.Parameter(torch.empty_like(base.shared.weight))
        lora = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=list(p.lora_target_modules),
                          lora_dropout=0.0, bias="none", task_type=TaskType.SEQ_2_SEQ_LM)
        model = get_peft_model(base, lora)
        policy = PolicyWithValueHead(model, ValueHead(config.d_model))
    counts = count_parameters(policy)
    assert counts["trainable"] == REFERENCE_TRAINABLE
    assert counts["total"] == REFERENCE_TOTAL
    assert round(counts["percent"], 2) == REFERENCE_PERCENT
    assert counts["value_head"] == REFERENCE_VALUE_HEAD


# ------------------------------------------------------------------------------------ one distribution

@pytest.mark.parametrize("temperature,min_new_tokens", [(0.6, 3), (1.7, 0), (1.0, 5)])
def test_the_rollout_samples_exactly_the_distribution_ppo_reads(rollout_policy, temperature, min_new_tokens):
    # each sampled token is argmax(logits' + Gumbel noise of its row seed), where logits' are what
    # SampledDistribution makes of the model's logits: the Gumbel-max trick samples softmax(logits') exactly,
    # so PPO's log-probs, KL and entropy (all read through SampledDistribution) are of what was sampled
    from harness.ppo.core import SampledDistribution

    tok, model = rollout_policy.tokenizer, rollout_policy.model
    dist = SampledDistribution(temperature, min_new_tokens, tok.eos_token_id)
    prompts, seeds = random_prompts(6, seed=11), [31 + i for i in range(6)]
    roll = generate(model, tok, prompts, max_new_tokens=12, seeds=seeds, temperature=temperature,
                    min_new_tokens=min_new_tokens)
    inputs = prepare_inputs([torch.tensor(p) for p in prompts], roll.responses, tok.pad_token_id,
                            rollout_policy.config.decoder_start_token_id, rollout_policy.device)
    with torch.no_grad():
        logits = dist.apply(model(**inputs).logits.float()[:, :-1])
    banned_eos = 0
    for i, (response, seed) in enumerate(zip(roll.responses, seeds)):
        noise = CounterNoise([seed], logits.shape[-1])
        for t, token in enumerate(response.tolist()):
            gumbel = noise.gumbel(t)[0]
            assert int((logits[i, t] + gumbel).argmax()) == token, f"row {i}, token {t}"
            if t < min_new_tokens:
                assert torch.log_softmax(logits[i, t], -1)[tok.eos_token_id].exp() == 0.0
                banned_eos += 1
    assert banned_eos == (6 * min(min_new_tokens, 12))


def test_ppo_reads_log_probs_and_kl_of_the_sampled_distribution(tiny_t5_dir, batch):
    from harness.ppo.core import SampledDistribution
    from harness.ppo.step import old_outputs

    policy = make_policy(tiny_t5_dir)
    queries, responses, _ = batch
    inputs = prepare_inputs(queries, responses, policy.tokenizer.pad_token_id, policy.config.decoder_start_token_id,
                            policy.device)
    dist = SampledDistribution(0.5, 2, policy.tokenizer.eos_token_id)
    plain = old_outputs(policy, inputs, chunk=4, full_logits=True, mask_first_action=False)
    read = old_outputs(policy, inputs, chunk=4, full_logits=True, mask_first_action=False, distribution=dist)
    want = torch.log_softmax(dist.apply(policy_logits(policy, batch)[:, :-1]), -1)
    labels = inputs["decoder_input_ids"][:, 1:]
    assert torch.allclose(read.logprobs, want.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert not torch.allclose(read.logprobs, plain.logprobs, atol=1e-3)  # the temperature is really applied
    assert torch.allclose(read.ref_logprobs, torch.log_softmax(dist.apply(reference_logits(policy, batch)[:, :-1]),
                                                               -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                          atol=1e-5)



@pytest.mark.parametrize("kl_penalty", ["kl", "full"])
def test_a_step_under_the_eos_ban_is_finite_and_refuses_responses_it_could_not_have_sampled(tiny_t5_dir,
                                                                                            kl_penalty):
    from harness.ppo.core import SampledDistribution

    policy = make_policy(tiny_t5_dir)
    eos = policy.tokenizer.eos_token_id
    dist = SampledDistribution(0.5, 3, eos)
    prompts = random_prompts(BATCH, seed=21)
    roll = generate(policy.model, policy.tokenizer, prompts, max_new_tokens=[2 + i % 6 for i in range(BATCH)],
                    seeds=range(BATCH), temperature=0.5, min_new_tokens=3)
    sampled = ([torch.tensor(p) for p in prompts], roll.responses, torch.linspace(-1.0, 1.0, BATCH))
    stats, _ = run_step(policy, sampled, step_config(kl_penalty=kl_penalty), distribution=dist)
    assert all(math.isfinite(v) for v in timeless(stats).values() if isinstance(v, float))
    assert stats["skipped"] == 0.0
    # a response with EOS where the distribution bans it was not sampled from it
    planted = list(roll.responses)
    planted[3] = torch.tensor([7, eos])
    with pytest.raises(ValueError, match="response 3 holds EOS within its first 3 tokens"):
        run_step(policy, (sampled[0], planted, sampled[2]), step_config(), distribution=dist)


def test_trl_compat_reads_the_raw_softmax_whatever_was_sampled(tiny_t5_dir, batch):
    from harness.ppo.core import SampledDistribution

    config = step_config(trl_compat=True)
    a, _ = run_step(make_policy(tiny_t5_dir), batch, config)
    b, _ = run_step(make_policy(tiny_t5_dir), batch, config, distribution=SampledDistribution(0.5))
    assert timeless(a) == timeless(b)
