"""The rollout's CUDA paths (issue 14), with a tiny random T5: no download, a few seconds (``--run-gpu``).

- The counter-based noise is bit-identical on CUDA and on the CPU (integer ops on values that never overflow).
- In float32 the decode loop on CUDA draws exactly what ``generate`` on CUDA draws, and what the CPU draws.
- In bfloat16 the loop and ``generate`` agree on most tokens (rounding may flip a near tie and then the rest
  of that row); the recorded log-probs stay within bf16 rounding of the PPO step's forward.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_policy():
    from transformers import T5Config, T5ForConditionalGeneration

    from harness.models import PolicyWithValueHead, ValueHead

    torch.manual_seed(0)
    config = T5Config(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    return PolicyWithValueHead(model, ValueHead(64))


class _Tok:
    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, batch, skip_special_tokens=True):
        return [" ".join(map(str, ids)) for ids in batch]


def _prompts(n=16):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 512, (int(k),), generator=g).tolist() + [1]
            for k in torch.randint(10, 60, (n,), generator=g)]


def test_counter_noise_is_bit_identical_on_cuda():
    from harness.ppo.sampling import CounterNoise

    seeds = [0, 7, 2 ** 62 + 5, 2 ** 63 - 2]
    for position in (0, 5, 399):
        assert torch.equal(CounterNoise(seeds, 32128, "cuda").bits(position).cpu(),
                           CounterNoise(seeds, 32128, "cpu").bits(position))


def test_fp32_loop_equals_generate_on_cuda_and_the_cpu(tiny_policy):
    from harness.ppo.rollout import generate
    from suites.oracles import hf_generate

    prompts, limits = _prompts(), [40 - i for i in range(16)]
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_policy.model.to(device)
        for decoder, decode in (("loop", generate), ("generate", hf_generate)):
            roll = decode(model, _Tok(), prompts, max_new_tokens=limits, seeds=range(16), min_new_tokens=2,
                          temperature=0.9, device=device)
            out[device, decoder] = [r.tolist() for r in roll.responses]
    tiny_policy.model.to("cpu")
    assert out["cuda", "loop"] == out["cuda", "generate"]
    assert out["cuda", "loop"] == out["cpu", "loop"]


def test_bf16_loop_agrees_with_generate_and_records_the_forwards_log_probs(tiny_policy):
    from harness.ppo.batch import Record, prepare_inputs
    from harness.ppo.core import SampledDistribution
    from harness.ppo.rollout import generate
    from harness.ppo.step import old_outputs
    from suites.oracles import hf_generate

    policy = tiny_policy.to("cuda")
    policy.model.to(torch.bfloat16)
    try:
        prompts, limits = _prompts(), [32] * 16
        a = hf_generate(policy.model, _Tok(), prompts, max_new_tokens=limits, seeds=range(16))
        b = generate(policy.model, _Tok(), prompts, max_new_tokens=limits, seeds=range(16),
                     record=Record(policy.value_head, SampledDistribution()))
        same = sum(x == y for ra, rb in zip(a.responses, b.responses) for x, y in zip(ra.tolist(), rb.tolist()))
        assert same >= 0.9 * sum(a.lengths)
        inputs = prepare_inputs([torch.tensor(p) for p in prompts], b.responses, 0, 0, "cuda")
        fwd = old_outputs(policy, inputs, chunk=4, full_logits=False, mask_first_action=False)
        rec = old_outputs(policy, inputs, chunk=4, full_logits=False, mask_first_action=False, recorded=b.recorded)
        m = fwd.masks.bool()
        assert (fwd.logprobs[m] - rec.logprobs[m]).abs().median() < 0.05
    finally:
        policy.model.to(torch.float32)
        policy.to("cpu")
