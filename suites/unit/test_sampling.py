"""The rollout's sampler and decoding paths (issue 14).

- The counter-based noise is the function its Python specification says (63-bit seeds included), its
  uniforms lie strictly inside (0, 1), and a row's noise depends only on (seed, position, token id).
- Gumbel-max with that noise samples the softmax: empirical frequencies match the probabilities.
- The decode loop gives exactly the tokens of transformers' ``generate`` with the same sampler (fp32), for
  every sampling setting; its recorded log-probs and values are the PPO step's forward's, and a PPO step
  fed with them gives the step's statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_t5 import make_policy, random_prompts

from harness.config import PPOConfig
from harness.ppo.batch import Record, pad_right, prepare_inputs
from harness.ppo.core import SampledDistribution
from harness.ppo.rollout import _PreallocatedLayer, generate
from harness.ppo.sampling import (
    CounterNoise,
    RowSampler,
    mix32,
    mix32_int,
    noise_bits_int,
    uniform_from_bits,
)
from harness.ppo.step import PPOState, old_outputs, ppo_step, random_orders
from suites.oracles import PerRowMaxNewTokens, hf_generate

SEEDS = [0, 1, 7, 2 ** 31 - 1, 2 ** 32 + 5, 2 ** 62 + 12345, 2 ** 63 - 2]


# ------------------------------------------------------------------------------------ the noise

def test_the_tensor_mixer_is_the_python_one():
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    got = mix32(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [mix32_int(x) for x in xs]
    assert len(set(got)) == len(xs), "the mixer is a bijection: distinct inputs, distinct outputs"
    assert all(0 <= v <= 0xFFFFFFFF for v in got)


def test_counter_noise_is_its_specification_for_every_seed_position_and_token():
    vocab = 300
    noise = CounterNoise(SEEDS, vocab)
    for position in (0, 1, 63, 399):
        bits = noise.bits(position)
        assert bits.shape == (len(SEEDS), vocab)
        for i, seed in enumerate(SEEDS):
            for token in (0, 1, 17, vocab - 1):
                assert int(bits[i, token]) == noise_bits_int(seed, position, token), (seed, position, token)


def test_a_rows_noise_depends_only_on_its_seed_position_and_token():
    alone = CounterNoise([SEEDS[5]], 1000).bits(9)[0]
    crowd = CounterNoise([3, 4, SEEDS[5], 6], 1000).bits(9)[2]
    assert torch.equal(alone, crowd)
    # a longer vocabulary extends the row; it does not reshuffle the shared token ids
    assert torch.equal(CounterNoise([SEEDS[5]], 1500).bits(9)[0, :1000], alone)
    # and each of seed, position, token changes it
    assert not torch.equal(CounterNoise([SEEDS[5] + 1], 1000).bits(9)[0], alone)
    assert not torch.equal(CounterNoise([SEEDS[5]], 1000).bits(10)[0], alone)
    assert (alone[1:] != alone[:-1]).float().mean() > 0.99


def test_uniforms_are_strictly_inside_the_unit_interval_and_flat():
    assert uniform_from_bits(torch.tensor([0, 0xFFFFFFFF])).tolist() == [0.5 / 2 ** 23, 1 - 0.5 / 2 ** 23]
    assert torch.isfinite(-torch.log(-torch.log(uniform_from_bits(torch.tensor([0, 0xFFFFFFFF]))))).all()
    u = uniform_from_bits(CounterNoise(range(8), 32128).bits(3)).flatten()
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50, f"chi-square {chi2:.1f} over 15 degrees of freedom"  # p ~ 1e-5


def test_gumbel_max_with_the_noise_samples_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, float("-inf")])
    probs = torch.softmax(logits, -1)
    n = 40_000
    sampler = RowSampler(range(n), logits.numel(), "cpu")
    draws = sampler.sample(logits.expand(n, -1), position=5)
    freq = torch.bincount(draws, minlength=logits.numel()).double() / n
    assert freq[-1] == 0, "a banned token is never drawn"
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), (freq, probs)


@pytest.mark.parametrize("kw", [dict(top_k=2), dict(top_p=0.7)])
def test_generate_refuses_the_filtering_the_config_refuses(policy, kw):
    """top-k and top-p would sample another distribution than PPO reads: the config refuses them (rollout and
    eval alike), and generate accepts only their defaults (off), rather than ignoring another value."""
    with pytest.raises(ValueError, match="filtering is not supported"):
        generate(policy.model, policy.tokenizer, random_prompts(2, seed=1), max_new_tokens=3, seeds=[0, 1], **kw)


def test_per_row_limits_stop_each_row_at_its_own_length():
    crit = PerRowMaxNewTokens([1, 3, 2])
    ids = torch.zeros((3, 3), dtype=torch.long)  # start token + 2 new tokens
    assert crit(ids, None).tolist() == [True, False, True]
    assert crit.limits.device == ids.device


def test_the_preallocated_cache_hands_out_views_and_refuses_to_overflow():
    layer = _PreallocatedLayer(capacity=3)
    a, b = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 2, 8)
    k, v = layer.update(a, a + 1)
    assert torch.equal(k, a) and layer.get_seq_length() == 1
    k, v = layer.update(b, b + 1)
    assert torch.equal(k, torch.cat([a, b], dim=2)) and torch.equal(v, torch.cat([a, b], dim=2) + 1)
    assert layer.get_seq_length() == 3
    with pytest.raises(RuntimeError, match="holds 3 positions"):
        layer.update(a, a)


# ------------------------------------------------------------------------------------ the decoding paths

@pytest.fixture(scope="module")
def policy(tiny_t5_dir):  # noqa: F811 - the fixture imported above
    return make_policy(tiny_t5_dir, seed=5)


SETTINGS = [dict(), dict(temperature=0.7, min_new_tokens=3), dict(temperature=1.3, min_new_tokens=2),
            dict(do_sample=False)]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_the_decode_loop_draws_exactly_what_generate_draws(policy, kw):
    tok = policy.tokenizer
    prompts = random_prompts(12, seed=2)
    limits = [30 - 2 * i for i in range(12)]
    seeds = [1000 + i for i in range(12)]
    a = hf_generate(policy.model, tok, prompts, max_new_tokens=limits, seeds=seeds, **kw)
    b = generate(policy.model, tok, prompts, max_new_tokens=limits, seeds=seeds, **kw)
    assert [r.tolist() for r in a.responses] == [r.tolist() for r in b.responses]
    assert a.texts == b.texts
    assert sum(b.lengths) > 12, "precondition: responses of some length"


def test_the_decode_loop_stops_once_every_row_has_ended(policy):
    tok = policy.tokenizer
    calls = []
    hook = policy.model.get_base_model().decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = generate(policy.model, tok, random_prompts(6, seed=3), max_new_tokens=500, seeds=range(6))
    finally:
        hook.remove()
    assert all(r.tolist()[-1] == tok.eos_token_id for r in out.responses), "precondition: every row ends with EOS"
    assert len(calls) == max(out.lengths) < 500, "one decoder forward per token, none after the last row's EOS"


@pytest.mark.parametrize("temperature,min_new_tokens", [(1.0, 0), (0.6, 3)])
def test_the_recorded_log_probs_and_values_are_the_forwards(policy, temperature, min_new_tokens):
    tok = policy.tokenizer
    dist = SampledDistribution(temperature, min_new_tokens, tok.eos_token_id if min_new_tokens else None)
    prompts = random_prompts(8, seed=12)
    roll = generate(policy.model, tok, prompts, max_new_tokens=[16 - i for i in range(8)], seeds=range(8),
                    temperature=temperature, min_new_tokens=min_new_tokens, record=Record(policy.value_head, dist))
    assert [x.numel() for x in roll.recorded.logprobs] == roll.lengths == [x.numel() for x in roll.recorded.values]
    inputs = prepare_inputs([torch.tensor(p) for p in prompts], roll.responses, tok.pad_token_id,
                            policy.config.decoder_start_token_id, policy.device)
    forward = old_outputs(policy, inputs, chunk=4, full_logits=False, mask_first_action=False, distribution=dist)
    recorded = old_outputs(policy, inputs, chunk=4, full_logits=False, mask_first_action=False, distribution=dist,
                           recorded=roll.recorded)
    m = forward.masks.bool()
    assert torch.allclose(forward.logprobs[m], recorded.logprobs[m], atol=1e-5)
    assert torch.allclose(forward.values[m], recorded.values[m], atol=1e-5)
    assert torch.equal(forward.ref_logprobs, recorded.ref_logprobs)
    assert float(forward.values[m].std()) > 1e-3, "precondition: values that vary"


def test_a_step_fed_with_the_recorded_outputs_is_the_step(policy, tiny_t5_dir):  # noqa: F811
    tok = policy.tokenizer
    prompts = random_prompts(8, seed=13)
    queries = [torch.tensor(p) for p in prompts]
    scores = torch.linspace(-1.5, 2.0, 8)
    config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3)
    results = []
    for reuse in (False, True):
        p = make_policy(tiny_t5_dir, seed=5)
        roll = generate(p.model, tok, prompts, max_new_tokens=12, seeds=range(8),
                        record=Record(p.value_head) if reuse else None)
        stats = ppo_step(p, PPOState.create(p, config, pad_token_id=0, decoder_start_token_id=0), queries,
                         roll.responses, scores, recorded=roll.recorded,
                         orders=random_orders(8, torch.Generator().manual_seed(0)))
        results.append(stats)
    plain, reused = results
    for key in ("objective/kl", "objective/entropy", "ppo/loss/total", "ppo/loss/value", "ppo/val/mean",
                "ppo/policy/ratio_mean", "ppo/returns/mean"):
        assert math.isclose(plain[key], reused[key], rel_tol=1e-4, abs_tol=1e-5), key


def test_a_step_refuses_recorded_outputs_it_cannot_use(policy):
    tok = policy.tokenizer
    prompts = random_prompts(8, seed=14)
    roll = generate(policy.model, tok, prompts, max_new_tokens=6, seeds=range(8),
                    record=Record(policy.value_head, SampledDistribution(0.5)))
    queries, scores = [torch.tensor(p) for p in prompts], torch.zeros(8)

    def step(config, **kw):
        state = PPOState.create(policy, config, pad_token_id=0, decoder_start_token_id=0, **kw)
        return ppo_step(policy, state, queries, roll.responses, scores, recorded=roll.recorded)

    with pytest.raises(ValueError, match="recorded log-probs of"):
        step(PPOConfig(batch_size=8))  # the step reads temperature 1, the rollout recorded 0.5
    with pytest.raises(ValueError, match="full"):
        step(PPOConfig(batch_size=8, kl_penalty="full"), rollout=SampledDistribution(0.5))


# ------------------------------------------------------------------------------------ the fused activation

def test_fused_gelu_is_flan_t5s_gelu_new_to_float_rounding():
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.activations import GELUTanh, NewGELUActivation

    from harness.models import fuse_activations

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    assert sum(type(m) is NewGELUActivation for m in model.modules()) == 4, "precondition: FLAN-T5's gelu_new"
    x = torch.randint(2, 64, (3, 9))
    before = model(input_ids=x, decoder_input_ids=x).logits
    assert fuse_activations(model) == 4
    assert not any(type(m) is NewGELUActivation for m in model.modules())
    assert sum(type(m) is GELUTanh for m in model.modules()) == 4
    after = model(input_ids=x, decoder_input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert fuse_activations(model) == 0


def test_the_bucketed_encoder_is_the_padded_batchs_encoder(policy):
    from harness.models import encode

    ids, mask = pad_right([torch.tensor(p) for p in random_prompts(10, seed=15, min_len=3, max_len=30)], 0)
    whole = policy.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        bucketed = encode(policy.model, ids, mask, chunk=3).last_hidden_state
    real = mask.bool()
    assert bucketed.shape == whole.shape
    assert torch.allclose(bucketed[real], whole[real], atol=1e-5)
    assert torch.isfinite(bucketed).all()
    assert (bucketed[~real] == 0).any(), "precondition: some padding past a chunk's longest prompt was skipped"
