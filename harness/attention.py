"""transformers' SDPA attention with T5's combined bias-and-mask built once per forward pass, not once per layer.

T5 adds a relative position bias to the attention scores. transformers' ``sdpa`` attention merges it with
the attention mask into one ``(batch, heads, query, key)`` float mask (``create_position_bias_mask``) in
every layer, although every layer of a forward pass gets the same two tensors: the first layer computes the
bias and the others reuse it. For a 12-layer encoder over 4 prompts of 250 tokens that is 12 writes of a
12 MB mask where one would do, in the rollout, the reference's forward and each mini-batch's.

:func:`use_shared_bias_attention` registers ``harness_sdpa`` (transformers' ``AttentionInterface``): the
same function as ``sdpa``, which reuses a mask it built when it is handed the very same bias and mask
tensors again (the same objects, so the same values: nothing is compared by value), and forgets it
with the bias. The numbers are those of ``sdpa`` exactly (``suites/unit/test_attention.py``). Models without
a position bias (BART) pass straight through; a bias that needs a gradient (full fine-tuning, activation
checkpointing) is left to transformers' own way.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # transformers >= 5.14; T5 attends through the AttentionInterface from 5.15 on
    from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
except ImportError:  # an older transformers: the model keeps its own sdpa (use_shared_bias_attention says False)
    create_position_bias_mask = sdpa_attention_forward = None

NAME = "harness_sdpa"
DEVICES = ("cpu", "cuda")  # elsewhere (e.g. Ascend NPUs) sdpa_attention_forward rewrites float masks: not here


class _Masks:
    """The combined masks of the forward passes in flight, keyed weakly by their position-bias tensor: an entry
    goes when its forward pass drops the bias, so nothing outlives it. The bias's identity is the key (an
    object, so the same values); the mask and the shapes it was built for must match too."""

    def __init__(self):
        self.by_bias = WeakIdKeyDictionary()
        self.built = 0  # how many masks were built (the tests count them)

    def get(self, position_bias, attention_mask, causal: bool, query, key) -> torch.Tensor:
        made_for = (causal, query.shape[2], key.shape[2], key.dtype)
        entries = self.by_bias.setdefault(position_bias, [])
        for mask_in, for_what, mask in entries:
            if mask_in is attention_mask and for_what == made_for:
                return mask
        mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        self.built += 1
        if mask is not position_bias:  # the bias itself (no padding mask) costs nothing and would keep its key
            entries.append((attention_mask, made_for, mask))
        return mask

    def clear(self) -> None:
        self.by_bias = WeakIdKeyDictionary()


LAST = _Masks()


def _shareable(module, position_bias, query) -> bool:
    """Whether the mask may be shared: a bias that needs no gradient (with one, activation checkpointing
    recomputes a layer and must see what it saw the first time), no checkpointing in training, not under
    ``torch.compile`` (a global table would be a guard), a device whose sdpa reads float masks."""
    return (position_bias is not None and not position_bias.requires_grad
            and not (module.training and getattr(module, "gradient_checkpointing", False))
            and query.device.type in DEVICES and not torch.compiler.is_compiling())


def shared_bias_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, position_bias=None, **kwargs):
    """``sdpa_attention_forward`` with the position-bias mask taken from :data:`LAST` when it may be."""
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = q_len > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    simple = _shareable(module, position_bias, query) and getattr(module, "num_key_value_groups", 1) == 1 and not (
        causal and kv_len > q_len)  # grouped heads and the cropped causal prefill: transformers' own way
    if simple:
        attention_mask = LAST.get(position_bias, attention_mask, causal, query, key)
        position_bias, is_causal = None, False
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, position_bias=position_bias, **kwargs)


if sdpa_attention_forward is not None:
    AttentionInterface.register(NAME, shared_bias_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets


def use_shared_bias_attention(model) -> bool:
    """Switch a model that attends with ``sdpa`` to :func:`shared_bias_sdpa`; returns whether it did (not with a
    transformers too old for it, nor a model that cannot switch its attention)."""
    if sdpa_attention_forward is None or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
