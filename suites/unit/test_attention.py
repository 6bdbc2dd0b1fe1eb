"""``harness.attention``: T5's bias-and-mask built once per forward pass gives sdpa's numbers exactly.

The model has three layers and padding in the encoder and the decoder, so that sdpa builds a float mask in
every attention call (3 layers x encoder self, decoder self, cross): the shared-bias attention must build
one per kind and give bit-identical logits, in a whole forward pass and in the decode loop's cached one.
"""

from __future__ import annotations

import pytest
import torch
from tiny_t5 import make_policy
from transformers import T5Config, T5ForConditionalGeneration

from harness import attention
from harness.ppo.rollout import decode

LAYERS = 3
KINDS = 3  # one mask each: the encoder's self-attention, the decoder's, the decoder's cross-attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=LAYERS,
                      num_decoder_layers=LAYERS, relative_attention_num_buckets=8, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 50, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0  # right padding, as the harness pads
    dec = torch.randint(2, 50, (3, 6), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 4:] = 0
    return dict(input_ids=ids * mask, attention_mask=mask, decoder_input_ids=dec * dec_mask,
                decoder_attention_mask=dec_mask)


def logits_with(model, implementation: str, inputs) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


def test_shared_bias_attention_gives_sdpas_logits_exactly_with_one_mask_per_kind(model, inputs):
    want = logits_with(model, "sdpa", inputs)
    attention.LAST.clear()
    built = attention.LAST.built
    got = logits_with(model, attention.NAME, inputs)
    assert torch.equal(got, want)
    assert attention.LAST.built - built == KINDS, f"{LAYERS} layers share each kind's mask"
    again = logits_with(model, attention.NAME, inputs)  # new bias tensors: masks built afresh, not stale ones
    assert torch.equal(again, want)
    assert attention.LAST.built - built == 2 * KINDS


def test_a_mask_is_never_reused_for_other_values_and_is_forgotten_with_its_forward_pass(model, inputs):
    other = dict(inputs, attention_mask=inputs["attention_mask"].flip(0))  # same shapes, other padding
    other["input_ids"] = inputs["input_ids"].flip(0)
    want = logits_with(model, "sdpa", other)
    logits_with(model, attention.NAME, inputs)
    assert torch.equal(logits_with(model, attention.NAME, other), want)
    assert len(attention.LAST.by_bias) == 0, "no mask outlives its forward pass"


def test_activation_checkpointing_gives_sdpas_gradients(inputs):
    """A bias that needs a gradient is not shared: checkpointing recomputes each layer and must see what it saw
    (with a shared mask, transformers' non-reentrant checkpointing raises in the backward pass)."""
    grads = {}
    for implementation in ("sdpa", attention.NAME):
        torch.manual_seed(0)
        config = T5Config(vocab_size=50, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=LAYERS,
                          num_decoder_layers=LAYERS, dropout_rate=0.0, decoder_start_token_id=0)
        m = T5ForConditionalGeneration(config)
        m.set_attn_implementation(implementation)
        m.activation_checkpointing_enable()
        m.train()
        m(**inputs).logits.square().mean().backward()
        grads[implementation] = [p.grad for p in m.parameters()]
    for a, b in zip(grads["sdpa"], grads[attention.NAME]):
        assert torch.equal(a, b)


def test_shared_bias_attention_gives_sdpas_tokens_in_the_cached_decode_loop(model, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    runs = {}
    for implementation in ("sdpa", attention.NAME):
        model.set_attn_implementation(implementation)
        runs[implementation] = decode(model, ids, mask, limits=[9, 5, 9], sampler=None, min_new_tokens=2,
                                      pad_token_id=0, eos_token_id=1)[0]
    assert torch.equal(runs["sdpa"], runs[attention.NAME])


def test_only_an_sdpa_model_is_switched(model):
    model.set_attn_implementation("eager")
    assert not attention.use_shared_bias_attention(model)
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert attention.use_shared_bias_attention(model)
    assert model.config._attn_implementation == attention.NAME


def test_the_harness_loads_its_policy_with_it(tiny_t5_dir):  # noqa: F811 - the fixture imported above
    policy = make_policy(tiny_t5_dir)
    assert policy.base_model.config._attn_implementation == attention.NAME
