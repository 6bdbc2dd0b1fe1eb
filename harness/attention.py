"""transformers' SDPA attention with T5's combined bias-and-mask built once per forward pass, not once per layer.

T5 adds a relative position bias to the attention scores. transformers' ``sdpa`` attention merges it with
the attention mask into one ``(batch, heads, query, key)`` float mask (``create_position_bias_mask``) in
every layer, although every layer of a forward pass gets the same two tensors: the first layer computes the
bias and the others reuse it. For a 12-layer encoder over 4 prompts of 250 tokens that is 12 writes of a
12 MB mask where one would do, in the rollout, the reference's forward and each mini-batch's.

:func:`use_shared_bias_attention` registers ``harness_sdpa`` (transformers' ``AttentionInterface``): the
same function as ``sdpa``, which reuses a mask it built when it is handed the very same bias and mask
tensors again (the same objects, so the same values: nothing is compared by value). The numbers are
those of ``sdpa`` exactly (``suites/unit/test_attention.py``). Models without a position bias (BART) pass
straight through.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "harness_sdpa"


class _RecentMasks:
    """The combined masks built last and what each was made from (strong references, so that an id is never
    reused while it is kept). A decoder layer attends twice (to itself, then to the encoder), so a few are kept:
    :data:`KEEP`."""

    def __init__(self):
        self.entries: list[tuple[tuple, torch.Tensor]] = []
        self.built = 0  # how many masks were built (the tests count them)

    def get(self, position_bias, attention_mask, causal: bool, query, key) -> torch.Tensor:
        inputs = (position_bias, attention_mask, causal, query.shape[2], key.shape[2], key.dtype)
        for made_from, mask in self.entries:
            if made_from[0] is inputs[0] and made_from[1] is inputs[1] and made_from[2:] == inputs[2:]:
                return mask
        mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        self.entries = [(inputs, mask), *self.entries[:KEEP - 1]]
        self.built += 1
        return mask

    def clear(self) -> None:
        self.entries = []


KEEP = 3  # the encoder's self-attention, the decoder's, its cross-attention


LAST = _RecentMasks()


def shared_bias_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, position_bias=None, **kwargs):
    """``sdpa_attention_forward`` with the position-bias mask taken from :data:`LAST` when it fits."""
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = q_len > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    simple = position_bias is not None and getattr(module, "num_key_value_groups", 1) == 1 and not (
        causal and kv_len > q_len)  # grouped heads and the cropped causal prefill: transformers' own way
    if simple:
        attention_mask = LAST.get(position_bias, attention_mask, causal, query, key)
        position_bias, is_causal = None, False
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, position_bias=position_bias, **kwargs)


AttentionInterface.register(NAME, shared_bias_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets


def use_shared_bias_attention(model) -> bool:
    """Switch a model that attends with ``sdpa`` to :func:`shared_bias_sdpa`; returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
